// Package harness runs the end-to-end world of berth's tests: a private
// dockerd (own data root, exec root, socket and pidfile, started in the
// test binary's own network namespace, see test/netns), images made with
// docker import from busybox-static and a static Go echo server, and berth
// itself. Everything it starts it stops by pid, even when a test fails.
package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/netns"
)

// Images the harness imports into every private dockerd.
const (
	ImageBusybox = "berth-test/busybox:1"
	ImageEcho    = "berth-test/echo:1" // busybox plus /echoserver
)

// Options pick the engine and the dockerd configuration.
type Options struct {
	// Engine is EngineDebian (Debian's docker.io, 20.10) or EngineMoby29
	// (built by test/engines.sh). Empty means EngineDebian.
	Engine        string
	UserlandProxy bool     // --userland-proxy (default false)
	IPTables      bool     // --iptables (and --ip6tables) (default false)
	IPv6          bool     // --ipv6 with a ULA subnet on docker0
	Extra         []string // more dockerd flags (--firewall-backend=nftables)
}

// Engines the e2e tests run against.
const (
	EngineDebian = "debian-20.10"
	EngineMoby29 = "moby-29"
)

// Engines lists the engines present on this machine. Under CI=true the
// Docker 29 engine must be there (make test builds it first).
func Engines(t testing.TB) []string {
	out := []string{EngineDebian}
	if _, err := os.Stat(filepath.Join(mobyDir(), "dockerd")); err == nil {
		out = append(out, EngineMoby29)
	} else if os.Getenv("CI") == "true" {
		t.Fatalf("Docker 29 engine not built at %s: run test/engines.sh", mobyDir())
	} else {
		t.Logf("Docker 29 engine not built at %s (run test/engines.sh); testing Debian's dockerd only", mobyDir())
	}
	return out
}

// mobyDir is where test/engines.sh puts the Docker 29 engine.
func mobyDir() string {
	if d := os.Getenv("BERTH_ENGINE_DIR"); d != "" {
		return d
	}
	v := os.Getenv("BERTH_MOBY_VERSION")
	if v == "" {
		v = "v2.0.0-beta.24"
	}
	c := os.Getenv("BERTH_ENGINE_CACHE")
	if c == "" {
		c = "/var/cache/berth-engines"
	}
	return filepath.Join(c, v)
}

// Prereqs says what is missing to run the e2e world, or "".
func Prereqs() string {
	if os.Geteuid() != 0 {
		return "needs root"
	}
	for _, bin := range []string{"dockerd", "containerd", "runc", "docker", "iptables", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			return bin + " not found: run `make deps` (apt-get install docker.io iptables busybox-static conntrack)"
		}
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		return "/bin/busybox not found: apt-get install busybox-static"
	}
	return ""
}

// Require skips (or fails under CI=true) when the world cannot be built.
func Require(t testing.TB) {
	t.Helper()
	netns.Require(t)
	if why := Prereqs(); why != "" {
		netns.Skip(t, why)
	}
}

// World is one private dockerd and what runs on it.
type World struct {
	t       testing.TB
	Dir     string
	Sock    string
	Host    string // DOCKER_HOST value
	opts    Options
	dockerd *exec.Cmd
	dlog    *os.File
	mu      sync.Mutex
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Bin returns the path of a freshly built static binary of the package at
// pkg (relative to the module root): cmd/berth or test/echoserver.
func Bin(t testing.TB, pkg string) string {
	t.Helper()
	buildOnce.Do(func() {
		removeStaleBuilds()
		buildDir = filepath.Join(os.TempDir(), fmt.Sprintf("berth-bin-%d", os.Getpid()))
		if buildErr = os.MkdirAll(buildDir, 0o755); buildErr != nil {
			return
		}
		root, err := ModuleRoot()
		if err != nil {
			buildErr = err
			return
		}
		for _, p := range []string{"cmd/berth", "test/echoserver"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, filepath.Base(p)), "./"+p)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v: %s", p, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, filepath.Base(pkg))
}

// removeStaleBuilds deletes the build directories of test binaries that
// have exited (named berth-bin-PID): a test binary cannot remove its own,
// since the binaries it built may still run while it exits.
func removeStaleBuilds() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "berth-bin-*"))
	for _, d := range dirs {
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(d), "berth-bin-%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(d)
		}
	}
}

// ModuleRoot is the directory holding go.mod, found upwards from the
// working directory (a test's package directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// Start starts a private dockerd in the test's namespace and imports the
// test images. It is torn down when the test ends.
func Start(t testing.TB, o Options) *World {
	t.Helper()
	Require(t)
	dir, err := os.MkdirTemp("", "berth-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	w := &World{t: t, Dir: dir, Sock: filepath.Join(dir, "docker.sock"), opts: o}
	w.Host = "unix://" + w.Sock
	t.Cleanup(w.teardown)
	w.StartDockerd()
	w.importImages()
	return w
}

func (w *World) dockerdBin() string {
	if w.opts.Engine == EngineMoby29 {
		return filepath.Join(mobyDir(), "dockerd")
	}
	return "dockerd"
}

func (w *World) dockerdArgs() []string {
	args := []string{
		"--data-root", filepath.Join(w.Dir, "data"),
		"--exec-root", filepath.Join(w.Dir, "exec"),
		"--host", w.Host,
		"--pidfile", filepath.Join(w.Dir, "docker.pid"),
		"--userland-proxy=" + fmt.Sprint(w.opts.UserlandProxy),
		"--iptables=" + fmt.Sprint(w.opts.IPTables),
		"--log-level", "warn",
	}
	if w.opts.Engine == EngineMoby29 {
		// Debian's runc 1.1.5 has no time namespaces; without this every
		// container fails to start.
		args = append(args, "--feature", "time-namespaces=false",
			"--userland-proxy-path", filepath.Join(mobyDir(), "docker-proxy"),
			"--ip6tables="+fmt.Sprint(w.opts.IPTables))
	} else if w.opts.UserlandProxy {
		if p, err := exec.LookPath("docker-proxy"); err == nil {
			args = append(args, "--userland-proxy-path", p)
		}
	}
	if w.opts.IPv6 {
		args = append(args, "--ipv6", "--fixed-cidr-v6", "fd00:dc::/64")
	}
	return append(args, w.opts.Extra...)
}

// Reconfigure sets the dockerd flags the next StartDockerd uses (the
// engine stays); call it between StopDockerd and StartDockerd.
func (w *World) Reconfigure(o Options) {
	o.Engine = w.opts.Engine
	w.opts = o
}

// StartDockerd (re)starts the private dockerd and waits until it answers.
func (w *World) StartDockerd() {
	w.t.Helper()
	f, err := os.OpenFile(filepath.Join(w.Dir, "dockerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		w.t.Fatal(err)
	}
	cmd := exec.Command(w.dockerdBin(), w.dockerdArgs()...)
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group, so a stray signal to ours never reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		w.t.Fatalf("start dockerd: %v", err)
	}
	w.mu.Lock()
	w.dockerd, w.dlog = cmd, f
	w.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := w.Docker("version", "--format", "{{.Server.Version}}"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("dockerd did not answer within 30s; log:\n%s", w.DockerdLog())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// StopDockerd stops the private dockerd (SIGTERM, then SIGKILL) and waits.
func (w *World) StopDockerd() {
	w.mu.Lock()
	cmd, f := w.dockerd, w.dlog
	w.dockerd = nil
	w.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
	}
	f.Close()
}

// DockerdLog returns the private dockerd's log.
func (w *World) DockerdLog() string {
	b, _ := os.ReadFile(filepath.Join(w.Dir, "dockerd.log"))
	return string(b)
}

func (w *World) teardown() {
	if w.dockerd != nil {
		// Remove containers first so their mounts and shims go away cleanly.
		if ids, err := w.Docker("ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
			w.Docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
	}
	w.StopDockerd()
	// Anything dockerd left mounted under our directory.
	if out, err := os.ReadFile("/proc/self/mounts"); err == nil {
		var mnts []string
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], w.Dir) {
				mnts = append(mnts, f[1])
			}
		}
		for i := len(mnts) - 1; i >= 0; i-- {
			syscall.Unmount(mnts[i], syscall.MNT_DETACH)
		}
	}
	os.RemoveAll(w.Dir)
}

// Docker runs the docker CLI against the private dockerd.
func (w *World) Docker(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+w.Host, "DOCKER_CONFIG="+filepath.Join(w.Dir, "cli"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// MustDocker is Docker that fails the test on error.
func (w *World) MustDocker(args ...string) string {
	w.t.Helper()
	out, err := w.Docker(args...)
	if err != nil {
		w.t.Fatal(err)
	}
	return out
}

// ContainerIP is a container's IPv4 address on the default bridge.
func (w *World) ContainerIP(name string) string {
	w.t.Helper()
	return w.MustDocker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name)
}

func (w *World) importImages() {
	w.t.Helper()
	root := filepath.Join(w.Dir, "image")
	bin := filepath.Join(root, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		w.t.Fatal(err)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "busybox"), bb, 0o755); err != nil {
		w.t.Fatal(err)
	}
	for _, a := range []string{"sh", "sleep", "cat", "echo", "nc", "httpd", "ls", "ip", "wget", "true", "false"} {
		os.Symlink("busybox", filepath.Join(bin, a))
	}
	tarball := func(name string) string {
		p := filepath.Join(w.Dir, name)
		if out, err := exec.Command("tar", "-C", root, "-cf", p, ".").CombinedOutput(); err != nil {
			w.t.Fatalf("tar: %v: %s", err, out)
		}
		return p
	}
	w.MustDocker("import", tarball("busybox.tar"), ImageBusybox)
	echo, err := os.ReadFile(Bin(w.t, "test/echoserver"))
	if err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "echoserver"), echo, 0o755); err != nil {
		w.t.Fatal(err)
	}
	w.MustDocker("import", "--change", `ENTRYPOINT ["/echoserver"]`, tarball("echo.tar"), ImageEcho)
}

// RunEcho starts an echo-server container: name, docker run flags (ports,
// labels), then echoserver arguments after "--".
func (w *World) RunEcho(name string, args ...string) string {
	w.t.Helper()
	runArgs := []string{"run", "-d", "--name", name, "-e", "NAME=" + name}
	var srv []string
	for i, a := range args {
		if a == "--" {
			srv = args[i+1:]
			break
		}
		runArgs = append(runArgs, a)
	}
	runArgs = append(runArgs, ImageEcho)
	runArgs = append(runArgs, srv...)
	id := w.MustDocker(runArgs...)
	w.WaitEcho(name)
	return id
}

// WaitEcho waits until the echo server in a container listens on all its
// ports (it prints "ready" then), so a probe is not refused by a server
// that has not started yet.
func (w *World) WaitEcho(name string) {
	w.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := w.Docker("logs", name)
		if err == nil && strings.Contains(out, "ready") {
			return
		}
		if st, _ := w.Docker("inspect", "-f", "{{.State.Status}}", name); st == "exited" || st == "dead" {
			return // the test wanted it to fail
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("echo server in %s not ready within 20s: %v %q", name, err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Berth is a running berth daemon.
type Berth struct {
	w    *World
	t    testing.TB
	Cmd  *exec.Cmd
	Addr string // --http-addr
	Log  string // path of its log
	done chan struct{}
}

// StartBerth runs `berth run` against the world's dockerd with extra flags.
func (w *World) StartBerth(extra ...string) *Berth {
	w.t.Helper()
	return w.StartBerthEnv(nil, extra...)
}

// StartBerthEnv is StartBerth with extra environment variables.
func (w *World) StartBerthEnv(env []string, extra ...string) *Berth {
	w.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		w.t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	b := &Berth{w: w, t: w.t, Addr: addr, Log: filepath.Join(w.Dir, fmt.Sprintf("berth-%d.log", time.Now().UnixNano()))}
	f, err := os.Create(b.Log)
	if err != nil {
		w.t.Fatal(err)
	}
	args := append([]string{"run", "--docker-host", w.Host, "--http-addr", addr, "--log-format", "text", "--log-level", "debug"}, extra...)
	b.Cmd = exec.Command(Bin(w.t, "cmd/berth"), args...)
	b.Cmd.Stdout, b.Cmd.Stderr = f, f
	b.Cmd.Env = append(os.Environ(), env...)
	b.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := b.Cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	b.done = make(chan struct{})
	go func() { b.Cmd.Wait(); f.Close(); close(b.done) }()
	w.t.Cleanup(func() {
		b.Stop()
		if w.t.Failed() {
			w.t.Logf("berth log (%s):\n%s", b.Log, tail(b.Log, 80))
		}
	})
	b.WaitHealthy(20 * time.Second)
	return b
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Running reports whether the process is still alive.
func (b *Berth) Running() bool {
	select {
	case <-b.done:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM and waits; SIGKILL after 10s.
func (b *Berth) Stop() {
	if !b.Running() {
		return
	}
	b.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
		b.Cmd.Process.Kill()
		<-b.done
	}
}

// Kill9 kills berth with SIGKILL, as a crash would.
func (b *Berth) Kill9() {
	b.Cmd.Process.Kill()
	<-b.done
}

// WaitHealthy waits for /healthz to answer 200.
func (b *Berth) WaitHealthy(d time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(d)
	var last string
	for time.Now().Before(deadline) {
		if !b.Running() {
			b.t.Fatalf("berth exited; log:\n%s", tail(b.Log, 40))
		}
		resp, err := http.Get("http://" + b.Addr + "/healthz")
		if err == nil {
			body := new(bytes.Buffer)
			body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
			last = body.String()
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.t.Fatalf("berth not healthy within %v: %s; log:\n%s", d, last, tail(b.Log, 40))
}

// Status reads /status.
func (b *Berth) Status() ([]reconcile.Row, error) {
	var rows []reconcile.Row
	return rows, b.get("/status", &rows)
}

// EventuallyStatus polls the daemon's /status until cond accepts its rows,
// as Eventually does, and returns how long that took.
func (b *Berth) EventuallyStatus(t testing.TB, d time.Duration, what string, cond func(rows []reconcile.Row) error) time.Duration {
	t.Helper()
	return Eventually(t, d, what, func() error {
		rows, err := b.Status()
		if err != nil {
			return err
		}
		return cond(rows)
	})
}

// Summary reads /status/summary.
func (b *Berth) Summary() (reconcile.Summary, error) {
	var s reconcile.Summary
	return s, b.get("/status/summary", &s)
}

func (b *Berth) get(path string, v any) error {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + b.Addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}

// CLI runs the berth binary with args against this world (status, reconcile).
func (w *World) CLI(args ...string) (string, error) {
	cmd := exec.Command(Bin(w.t, "cmd/berth"), args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+w.Host, "BERTH_LOG_FORMAT=text")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Eventually polls cond every 20ms until it returns nil or d passes, and
// returns how long it took.
func Eventually(t testing.TB, d time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < d {
		if err = cond(); err == nil {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v: %v", what, d, err)
	return 0
}
