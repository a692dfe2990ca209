package deploy

import (
	"archive/tar"
	"debug/elf"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

const (
	imageBase  = "berth-test/base:1"  // imported from the host's own binaries
	imageBerth = "berth-test/berth:1" // deploy/Dockerfile's final stage on it
)

// rootfsTar writes a root file system made of the host's own binaries:
// busybox for the shell, xtables-nft-multi and xtables-legacy-multi with
// every iptables name linked to them, conntrack, the shared libraries and
// iptables extensions they load (found with ldd). It stands in for
// debian:bookworm-slim plus `apt-get install iptables conntrack`, which
// needs a registry.
func rootfsTar(t testing.TB, dst string) {
	t.Helper()
	files := map[string]bool{}
	links := map[string]string{} // path -> target
	add := func(p string) {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("rootfs: %v", err)
		}
		files[p] = true
	}
	add("/bin/busybox")
	for _, a := range []string{"sh", "ls", "cat", "touch", "echo", "true", "false"} {
		links["/bin/"+a] = "busybox"
	}
	multi := func(name string) string {
		p, err := exec.LookPath(name)
		if err != nil {
			netns.Skip(t, name+" not found: apt-get install iptables")
		}
		add(p)
		return p
	}
	nft, legacy := multi("xtables-nft-multi"), multi("xtables-legacy-multi")
	dflt := "nft"
	if target, err := filepath.EvalSymlinks("/usr/sbin/iptables"); err == nil && strings.Contains(target, "legacy") {
		dflt = "legacy"
	}
	for _, fam := range []string{"iptables", "ip6tables"} {
		for _, kind := range []string{"", "-save", "-restore"} {
			links[path.Join(path.Dir(nft), fam+"-nft"+kind)] = path.Base(nft)
			links[path.Join(path.Dir(legacy), fam+"-legacy"+kind)] = path.Base(legacy)
			to := nft
			if dflt == "legacy" {
				to = legacy
			}
			links[path.Join(path.Dir(to), fam+kind)] = path.Base(to)
		}
	}
	if p, err := exec.LookPath("conntrack"); err == nil {
		add(p)
	}
	var exts []string
	for _, pat := range []string{"/usr/lib/*/xtables/*.so", "/usr/lib/xtables/*.so", "/lib/*/xtables/*.so"} {
		m, _ := filepath.Glob(pat)
		exts = append(exts, m...)
	}
	if len(exts) == 0 {
		t.Fatal("rootfs: no iptables extensions (xtables/*.so) found")
	}
	for _, e := range exts {
		add(e)
	}
	var bins []string
	for p := range files {
		if p != "/bin/busybox" {
			bins = append(bins, p)
		}
	}
	deps, err := sharedLibs(bins)
	if err != nil {
		t.Fatalf("rootfs: %v", err)
	}
	for _, d := range deps {
		add(d)
	}
	for _, f := range []string{"/etc/protocols", "/etc/services", "/etc/ethertypes", "/etc/iproute2/rt_tables"} {
		if _, err := os.Stat(f); err == nil {
			add(f)
		}
	}

	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	dirs := map[string]bool{}
	var mkdir func(d string)
	mkdir = func(d string) {
		if d == "/" || d == "." || dirs[d] {
			return
		}
		mkdir(path.Dir(d))
		dirs[d] = true
		mode := int64(0o755)
		if d == "/tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: mode}); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"/tmp", "/run", "/proc", "/sys", "/dev", "/etc", "/usr/local/bin", "/var"} {
		mkdir(d)
	}
	var names []string
	for p := range files {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		b, err := os.ReadFile(p) // follows symlinks: the file's real content
		if err != nil {
			t.Fatal(err)
		}
		mkdir(path.Dir(p))
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: 0o755, Size: int64(len(b))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	for p, to := range links {
		if files[p] {
			continue
		}
		mkdir(path.Dir(p))
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: strings.TrimPrefix(p, "/"), Linkname: to, Mode: 0o777}); err != nil {
			t.Fatal(err)
		}
	}
	// /var/run as on every distribution.
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "var/run", Linkname: "../run", Mode: 0o777}); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// imageDockerfile is deploy/Dockerfile's final stage with FROM pointed at
// base and the binary copied from the build context instead of the Go
// builder stage (which needs golang:*, that is a registry).
func imageDockerfile(t testing.TB, base string) string {
	t.Helper()
	lines := strings.Split(deployFile(t, "Dockerfile"), "\n")
	last := -1
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "FROM ") {
			last = i
		}
	}
	if last < 0 {
		t.Fatal("deploy/Dockerfile has no FROM")
	}
	stage := lines[last:]
	if stage[0] != "FROM ${BASE}" {
		t.Fatalf("deploy/Dockerfile: final stage starts %q, want FROM ${BASE} (the base image build argument)", stage[0])
	}
	stage[0] = "FROM " + base
	text := strings.Join(stage, "\n")
	copyRe := regexp.MustCompile(`(?m)^COPY --from=\S+ /\S+ (/usr/local/bin/berth)$`)
	if !copyRe.MatchString(text) {
		t.Fatalf("deploy/Dockerfile: final stage does not COPY --from=<builder> ... /usr/local/bin/berth:\n%s", text)
	}
	return copyRe.ReplaceAllString(text, "COPY berth $1")
}

// deploy/Dockerfile's image, built without a registry on a base made of the
// host's own binaries, runs as its header documents (privileged, host
// network and pid, the Docker socket) and forwards; so does the
// minimal-capabilities variant.
func TestImageForwards(t *testing.T) {
	t0 := time.Now()
	w := harness.Start(t, harness.Options{})
	bin := harness.Bin(t, "cmd/berth")
	t.Logf("dockerd up, test images imported in %v", time.Since(t0).Round(time.Millisecond))

	dir := t.TempDir()
	tarball := filepath.Join(dir, "rootfs.tar")
	rootfsTar(t, tarball)
	w.MustDocker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", tarball, imageBase)

	ctx := filepath.Join(dir, "context")
	if err := os.MkdirAll(ctx, 0o755); err != nil {
		t.Fatal(err)
	}
	df := imageDockerfile(t, imageBase)
	if err := os.WriteFile(filepath.Join(ctx, "Dockerfile"), []byte(df), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ctx, "berth"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	// The classic builder: it takes a local FROM image as it is, and works
	// with every dockerd (no buildx plugin needed).
	t.Setenv("DOCKER_BUILDKIT", "0")
	t.Logf("base image imported in %v", time.Since(t0).Round(time.Millisecond))
	start := time.Now()
	if out, err := w.Docker("build", "-q", "-t", imageBerth, ctx); err != nil {
		t.Fatalf("docker build: %v\n%s\nDockerfile:\n%s", err, out, df)
	}
	t.Logf("image built in %v", time.Since(start).Round(time.Millisecond))
	if ep := w.MustDocker("image", "inspect", "-f", "{{json .Config.Entrypoint}}", imageBerth); ep != `["/usr/local/bin/berth","run"]` {
		t.Errorf("ENTRYPOINT %s, want [\"/usr/local/bin/berth\",\"run\"]", ep)
	}
	// The tools run (their libraries and extensions resolve) in the image.
	check := "iptables -V && iptables-nft-save -V && iptables-legacy-save -V && ip6tables-nft-restore -V && iptables-nft -t nat -S >/dev/null"
	if out, err := w.Docker("run", "--rm", "--network", "host", "--cap-add", "NET_ADMIN", "--entrypoint", "sh", imageBerth, "-c", check); err != nil {
		t.Errorf("iptables tools in the image: %v\n%s", err, out)
	} else {
		t.Logf("in the image: %s", strings.ReplaceAll(out, "\n", "; "))
	}

	w.RunEcho("img-relay", "--label", "berth.ports=24000:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	w.RunEcho("img-nat", "-p", "24001:80", "--", "-tcp", "80")

	gw := w.MustDocker("inspect", "-f", "{{.NetworkSettings.Gateway}}", "img-nat")
	if gw == "" {
		t.Fatal("img-nat has no gateway address (the host's bridge address)")
	}
	// Each variant starts from a host without berth's rules (NAT rules
	// outlive the daemon and would be adopted), so what forwards is the
	// variant's own work. The minimal-capabilities variant cannot set
	// route_localnet (read-only /proc/sys), so its NAT is proven on the
	// host's bridge address instead of 127.0.0.1.
	variants := []struct {
		name   string
		flags  []string
		natVia string
	}{
		{"minimal-caps", []string{"--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
			"--cap-add", "NET_BIND_SERVICE", "--cap-add", "SYS_PTRACE", "--security-opt", "apparmor=unconfined"}, gw},
		{"privileged", privileged(t), "127.0.0.1"},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			addr := freeAddr(t)
			name := "berth-" + v.name
			args := append([]string{"run", "-d", "--name", name}, v.flags...)
			args = append(args, "--network", "host", "--pid", "host",
				"-v", w.Sock+":/var/run/docker.sock",
				imageBerth, "--http-addr", addr, "--log-format", "text", "--log-level", "debug")
			// An older dockerd does not know the newest capabilities
			// (20.10: no CAP_BPF): leave out what it refuses.
			unknown := regexp.MustCompile(`unknown capability: "CAP_([A-Z_]+)"`)
			for {
				out, err := w.Docker(args...)
				if err == nil {
					break
				}
				m := unknown.FindStringSubmatch(err.Error())
				if m == nil || !dropCap(&args, m[1]) {
					t.Fatalf("%v\n%s", err, out)
				}
			}
			logs := func() string {
				out, _ := w.Docker("logs", "--tail", "60", name)
				l2, _ := w.Docker("inspect", "-f", "{{.State.Status}} exit={{.State.ExitCode}} {{.State.Error}}", name)
				return out + "\n(state: " + l2 + ")"
			}
			alive := func() bool {
				s, err := w.Docker("inspect", "-f", "{{.State.Running}}", name)
				return err == nil && s == "true"
			}
			t.Cleanup(func() {
				if t.Failed() {
					out, _ := w.Docker("logs", name)
					t.Logf("%s log:\n%s", name, tail(out, 80))
				}
				w.Docker("rm", "-f", name)
			})
			waitHealthy(t, addr, 20*time.Second, alive, logs)

			harness.Eventually(t, 10*time.Second, "relay 127.0.0.1:24000 from inside the image", who("127.0.0.1:24000", "img-relay"))
			t.Run("nat", func(t *testing.T) {
				skipWithoutNAT(t, addr, "img-nat")
				target := net.JoinHostPort(v.natVia, "24001")
				harness.Eventually(t, 10*time.Second, "nat "+target+" from inside the image", who(target, "img-nat"))
			})
			if _, err := w.Docker("rm", "-f", name); err != nil {
				t.Fatal(err)
			}
			if out, err := w.CLI("reconcile", "--cleanup"); err != nil {
				t.Fatalf("berth reconcile --cleanup: %v\n%s", err, out)
			}
		})
	}
}

// who checks that the echo server behind hostport is the named container.
func who(hostport, name string) func() error {
	return func() error {
		got, err := harness.WhoTCP(hostport, time.Second)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(got, name+" ") {
			return fmt.Errorf("%s answered %q, want %s", hostport, got, name)
		}
		return nil
	}
}

// privileged is --privileged, or where this sandbox's own capability
// bounding set is not full (runc then cannot grant "all" and refuses to
// start the container) the same thing spelled out: every capability the
// sandbox has, no AppArmor, seccomp or masked/read-only /proc paths.
func privileged(t testing.TB) []string {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	var bnd uint64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "CapBnd:"); ok {
			bnd, _ = strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	lastB, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		t.Fatal(err)
	}
	last, _ := strconv.Atoi(strings.TrimSpace(string(lastB)))
	if bnd == 1<<(last+1)-1 {
		return []string{"--privileged"}
	}
	flags := []string{"--cap-drop", "ALL", "--security-opt", "apparmor=unconfined",
		"--security-opt", "seccomp=unconfined", "--security-opt", "systempaths=unconfined"}
	var missing []string
	for i := 0; i <= last; i++ {
		name, ok := capNames[i]
		if !ok {
			continue
		}
		if bnd&(1<<i) != 0 {
			flags = append(flags, "--cap-add", name)
		} else {
			missing = append(missing, name)
		}
	}
	t.Logf("this sandbox lacks %v, so runc cannot start a --privileged container; using the same rights spelled out", missing)
	return flags
}

// capNames are Linux capability numbers as Docker names them.
var capNames = map[int]string{
	0: "CHOWN", 1: "DAC_OVERRIDE", 2: "DAC_READ_SEARCH", 3: "FOWNER", 4: "FSETID", 5: "KILL",
	6: "SETGID", 7: "SETUID", 8: "SETPCAP", 9: "LINUX_IMMUTABLE", 10: "NET_BIND_SERVICE",
	11: "NET_BROADCAST", 12: "NET_ADMIN", 13: "NET_RAW", 14: "IPC_LOCK", 15: "IPC_OWNER",
	16: "SYS_MODULE", 17: "SYS_RAWIO", 18: "SYS_CHROOT", 19: "SYS_PTRACE", 20: "SYS_PACCT",
	21: "SYS_ADMIN", 22: "SYS_BOOT", 23: "SYS_NICE", 24: "SYS_RESOURCE", 25: "SYS_TIME",
	26: "SYS_TTY_CONFIG", 27: "MKNOD", 28: "LEASE", 29: "AUDIT_WRITE", 30: "AUDIT_CONTROL",
	31: "SETFCAP", 32: "MAC_OVERRIDE", 33: "MAC_ADMIN", 34: "SYSLOG", 35: "WAKE_ALARM",
	36: "BLOCK_SUSPEND", 37: "AUDIT_READ", 38: "PERFMON", 39: "BPF", 40: "CHECKPOINT_RESTORE",
}

// dropCap removes "--cap-add name" from args.
func dropCap(args *[]string, name string) bool {
	a := *args
	for i := 0; i+1 < len(a); i++ {
		if a[i] == "--cap-add" && a[i+1] == name {
			*args = append(a[:i:i], a[i+2:]...)
			return true
		}
	}
	return false
}

// sharedLibs are the ELF interpreters and shared libraries the binaries
// need, transitively, resolved in the usual library directories (what ldd
// prints, without running the dynamic loader once per file).
func sharedLibs(bins []string) ([]string, error) {
	var dirs []string
	for _, pat := range []string{"/lib/*-linux-gnu*", "/usr/lib/*-linux-gnu*"} {
		m, _ := filepath.Glob(pat)
		dirs = append(dirs, m...)
	}
	dirs = append(dirs, "/lib64", "/usr/lib64", "/lib", "/usr/lib")
	seen := map[string]bool{}
	var out []string
	queue := append([]string(nil), bins...)
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		f, err := elf.Open(p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b := make([]byte, prog.Filesz)
				if _, err := prog.ReadAt(b, 0); err == nil {
					interp := strings.TrimRight(string(b), "\x00")
					if !seen[interp] {
						seen[interp] = true
						out = append(out, interp)
					}
				}
			}
		}
		needed, err := f.ImportedLibraries()
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		for _, n := range needed {
			found := ""
			for _, d := range dirs {
				if _, err := os.Stat(filepath.Join(d, n)); err == nil {
					found = filepath.Join(d, n)
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("%s needs %s: not found in %v", p, n, dirs)
			}
			if !seen[found] {
				seen[found] = true
				out = append(out, found)
				queue = append(queue, found)
			}
		}
	}
	return out, nil
}
