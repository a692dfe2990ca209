package deploy

import (
	"bufio"
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/harness"
)

// unitFile is a parsed systemd unit: section -> key -> values in order.
type unitFile map[string]map[string][]string

func parseUnit(t testing.TB, text string) unitFile {
	t.Helper()
	u := unitFile{}
	sec := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	var cont string
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if cont != "" {
			line = cont + " " + line
			cont = ""
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cont = strings.TrimSuffix(line, "\\")
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			sec = line[1 : len(line)-1]
			if u[sec] == nil {
				u[sec] = map[string][]string{}
			}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || sec == "" {
			t.Fatalf("unit: not a key=value line in a section: %q", line)
		}
		u[sec][strings.TrimSpace(k)] = append(u[sec][strings.TrimSpace(k)], strings.TrimSpace(v))
	}
	return u
}

// one is the single value of a key ("" when absent); several fail.
func (u unitFile) one(t testing.TB, sec, key string) string {
	t.Helper()
	v := u[sec][key]
	if len(v) > 1 {
		t.Errorf("[%s] %s set %d times: %q", sec, key, len(v), v)
	}
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// words are all space-separated words of every value of a key.
func (u unitFile) words(sec, key string) []string {
	var out []string
	for _, v := range u[sec][key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func has(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// The unit's directives are the ones the design asks for, and the docker
// dependency is ordering plus Wants only: never BindsTo/PartOf/Requires,
// which would turn "docker stopped" into "berth stopped" for good.
func TestSystemdUnitDirectives(t *testing.T) {
	u := parseUnit(t, deployFile(t, "systemd/berth.service"))
	want := map[string]map[string]string{
		"Unit": {"StartLimitIntervalSec": "0"},
		"Service": {
			"Type": "notify", "WatchdogSec": "30s", "Restart": "always", "RestartSec": "1",
			"EnvironmentFile": "-/etc/default/berth", "ExecStart": "/usr/local/bin/berth run",
			"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
			"NotifyAccess": "main",
		},
		"Install": {"WantedBy": "multi-user.target"},
	}
	for sec, kv := range want {
		for k, v := range kv {
			if got := u.one(t, sec, k); got != v {
				t.Errorf("[%s] %s=%q, want %q", sec, k, got, v)
			}
		}
	}
	if !has(u.words("Unit", "After"), "docker.service") {
		t.Errorf("After= lacks docker.service: %q", u["Unit"]["After"])
	}
	if !has(u.words("Unit", "Wants"), "docker.service") {
		t.Errorf("Wants= lacks docker.service: %q", u["Unit"]["Wants"])
	}
	for _, k := range []string{"BindsTo", "PartOf", "Requires", "Requisite"} {
		if has(u.words("Unit", k), "docker.service") {
			t.Errorf("%s=docker.service: a docker stop would stop berth and Restart= would not bring it back", k)
		}
	}
	caps := u.words("Service", "CapabilityBoundingSet")
	sort.Strings(caps)
	if got, w := strings.Join(caps, " "), "CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW CAP_SYS_PTRACE"; got != w {
		t.Errorf("CapabilityBoundingSet=%s, want %s", got, w)
	}
	if v := u.one(t, "Service", "ProtectKernelTunables"); v != "" && v != "no" && v != "false" {
		t.Errorf("ProtectKernelTunables=%s: berth writes /proc/sys/net/ipv4/conf/*/route_localnet", v)
	}
	fams := u.words("Service", "RestrictAddressFamilies")
	for _, f := range []string{"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} {
		if !has(fams, f) {
			t.Errorf("RestrictAddressFamilies lacks %s: %q", f, fams)
		}
	}
	rw := u.words("Service", "ReadWritePaths")
	if !has(rw, "/run/xtables.lock") && !has(rw, "-/run/xtables.lock") {
		t.Errorf("ReadWritePaths lacks /run/xtables.lock (the iptables lock under ProtectSystem=strict): %q", rw)
	}
}

// testUnit writes the unit into dir with ExecStart pointing at bin.
func testUnit(t testing.TB, dir, bin string) string {
	t.Helper()
	text := deployFile(t, "systemd/berth.service")
	re := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/berth\b`)
	if !re.MatchString(text) {
		t.Fatal("unit has no ExecStart=/usr/local/bin/berth line")
	}
	text = re.ReplaceAllString(text, "ExecStart="+bin)
	p := filepath.Join(dir, "berth.service")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// systemd-analyze verify accepts the unit without a word, and its
// hardening scores at most 5.0 ("OK") in systemd-analyze security.
func TestSystemdUnitVerify(t *testing.T) {
	need(t, "systemd-analyze")
	bin := harness.Bin(t, "cmd/berth")
	dir := t.TempDir()
	unit := testUnit(t, dir, bin)

	cmd := exec.Command("systemd-analyze", "verify", "--man=no", unit)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	var complaints []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l == "" {
			continue
		}
		// Lines about other units on this machine are not ours.
		if strings.Contains(l, "berth.service") || strings.Contains(l, unit) || !strings.Contains(l, ".service") {
			complaints = append(complaints, l)
		} else {
			t.Logf("systemd-analyze (other unit): %s", l)
		}
	}
	if err != nil || len(complaints) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, strings.Join(complaints, "\n"))
	}

	cmd = exec.Command("systemd-analyze", "security", "--offline=yes", "--no-pager", unit)
	cmd.Dir = dir
	out, _ = cmd.CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for berth\.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		if bytes.Contains(out, []byte("unrecognized option")) || bytes.Contains(out, []byte("Unknown command")) {
			t.Logf("systemd-analyze security --offline not supported here: %s", out)
			return
		}
		t.Fatalf("systemd-analyze security: no exposure level in:\n%s", out)
	}
	score, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: exposure %.1f", score)
	if score > 5.0 {
		t.Errorf("exposure %.1f > 5.0; hardening regressed:\n%s", score, out)
	}
}

var envLine = regexp.MustCompile(`(?m)^#?(BERTH_[A-Z0-9_]+)=(.*)$`)

// defaultEnv is every BERTH_* setting of berth.default, commented or not.
func defaultEnv(t testing.TB) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, m := range envLine.FindAllStringSubmatch(deployFile(t, "systemd/berth.default"), -1) {
		env[m[1]] = strings.TrimSpace(m[2])
	}
	if len(env) == 0 {
		t.Fatal("berth.default sets no BERTH_* variable")
	}
	return env
}

// The sample env file names exactly the env twins of `berth run`'s flags.
func TestDefaultEnvFileMatchesFlags(t *testing.T) {
	bin := harness.Bin(t, "cmd/berth")
	out, err := exec.Command(bin, "run", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("berth run --help: %v\n%s", err, out)
	}
	flags := map[string]bool{}
	for _, m := range regexp.MustCompile(`\[\$(BERTH_[A-Z0-9_]+)\]`).FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	if len(flags) == 0 {
		t.Fatalf("no [$BERTH_*] twins in berth run --help:\n%s", out)
	}
	env := defaultEnv(t)
	for k := range env {
		if !flags[k] {
			t.Errorf("berth.default sets %s, which is no flag of berth run", k)
		}
	}
	for k := range flags {
		if _, ok := env[k]; !ok {
			t.Errorf("berth.default does not mention %s", k)
		}
	}
}

// The unit's ExecStart, run as systemd would run it: the unit's capability
// bounding set and NoNewPrivileges (through setpriv), every setting of
// berth.default in the environment, a fake NOTIFY_SOCKET and watchdog.
// berth must report READY=1 and WATCHDOG=1, forward a relay mapping, and
// forward a docker -p port through NAT (which needs CAP_SYS_PTRACE to tell
// dockerd's hold on the port from a foreign listener), then STOPPING=1.
func TestSystemdExecStartWithUnitCaps(t *testing.T) {
	need(t, "setpriv")
	w := harness.Start(t, harness.Options{})
	bin := harness.Bin(t, "cmd/berth")
	u := parseUnit(t, deployFile(t, "systemd/berth.service"))

	exec0 := strings.Fields(u.one(t, "Service", "ExecStart"))
	var bounding []string
	for _, c := range u.words("Service", "CapabilityBoundingSet") {
		bounding = append(bounding, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	args := []string{"--inh-caps=-all", "--bounding-set=-all," + strings.Join(bounding, ",")}
	if u.one(t, "Service", "NoNewPrivileges") == "yes" {
		args = append(args, "--no-new-privs")
	}
	args = append(append(args, "--", bin), exec0[1:]...)

	sock := filepath.Join(w.Dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	notes := make(chan string, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				close(notes)
				return
			}
			for _, l := range strings.Split(string(buf[:n]), "\n") {
				notes <- l
			}
		}
	}()

	addr := freeAddr(t)
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BERTH_") && !strings.HasPrefix(kv, "DOCKER_") {
			env = append(env, kv)
		}
	}
	for k, v := range defaultEnv(t) {
		env = append(env, k+"="+v)
	}
	env = append(env, "BERTH_DOCKER_HOST="+w.Host, "BERTH_HTTP_ADDR="+addr, "BERTH_LOG_LEVEL=debug",
		"NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=1000000")

	logPath := filepath.Join(w.Dir, "berth-unit.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("setpriv", args...)
	cmd.Env, cmd.Stdout, cmd.Stderr = env, logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	alive := func() bool {
		select {
		case <-done:
			return false
		default:
			return true
		}
	}
	stop := func() {
		if alive() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-done
			}
		}
	}
	logs := func() string { b, _ := os.ReadFile(logPath); return tail(string(b), 60) }
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("berth log:\n%s", logs())
		}
	})
	t.Logf("setpriv %s", strings.Join(args, " "))

	waitFor := func(what string, d time.Duration) {
		t.Helper()
		deadline := time.After(d)
		for {
			select {
			case n, ok := <-notes:
				if !ok {
					t.Fatalf("notify socket closed before %s", what)
				}
				if n == what {
					return
				}
			case <-deadline:
				t.Fatalf("no %s on NOTIFY_SOCKET within %v (Type=notify would never start or be killed by the watchdog)", what, d)
			}
		}
	}
	waitFor("READY=1", 20*time.Second)
	waitHealthy(t, addr, 10*time.Second, alive, logs)
	waitFor("WATCHDOG=1", 3*time.Second)

	w.RunEcho("unit-relay", "--label", "berth.ports=24100:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	w.RunEcho("unit-nat", "-p", "24101:80", "--", "-tcp", "80")
	t.Run("relay", func(t *testing.T) {
		harness.Eventually(t, 10*time.Second, "relay 127.0.0.1:24100", who("127.0.0.1:24100", "unit-relay"))
	})
	t.Run("nat", func(t *testing.T) {
		skipWithoutNAT(t, addr, "unit-nat")
		harness.Eventually(t, 10*time.Second, "nat 127.0.0.1:24101", who("127.0.0.1:24101", "unit-nat"))
	})
	stop()
	waitFor("STOPPING=1", 2*time.Second)
}
