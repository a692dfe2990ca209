// Package netns puts a test binary in a network namespace of its own, so
// tests that write iptables rules, bind ports or start dockerd never touch
// the host's interfaces and tables, and offers "remote hosts": further
// namespaces joined to the test's one by a veth pair.
package netns

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	envName = "BERTH_TEST_NETNS"      // set inside the re-executed binary
	envSkip = "BERTH_TEST_NETNS_SKIP" // why the namespace could not be made
)

// Run is for TestMain. Outside a namespace it creates one, runs the same
// test binary again inside it with nsenter (not `ip netns exec`, which
// remounts /sys and breaks dockerd), deletes the namespace and returns the
// child's exit code. Inside, it brings lo up and runs the tests. When the
// namespace cannot be made (not root, no ip or nsenter) the tests run in
// place and Require skips them, or fails them under CI=true.
func Run(m *testing.M) int {
	if name := os.Getenv(envName); name != "" {
		if err := exec.Command("ip", "link", "set", "lo", "up").Run(); err != nil {
			fmt.Fprintf(os.Stderr, "netns %s: lo up: %v\n", name, err)
			return 1
		}
		return m.Run()
	}
	if why := missing(); why != "" {
		os.Setenv(envSkip, why)
		return m.Run()
	}
	name := fmt.Sprintf("berth-t%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		os.Setenv(envSkip, fmt.Sprintf("ip netns add %s: %v: %s", name, err, out))
		return m.Run()
	}
	defer exec.Command("ip", "netns", "del", name).Run()
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "netns:", err)
		return 1
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + Path(name), "--", self}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), envName+"="+name)
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "netns:", err)
		return 1
	}
	return 0
}

func missing() string {
	if os.Geteuid() != 0 {
		return "needs root to create a network namespace"
	}
	for _, bin := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			return bin + " not installed (apt-get install iproute2 util-linux)"
		}
	}
	return ""
}

// Require skips the test when it does not run inside a test namespace, and
// fails it under CI=true, where a missing prerequisite is an error.
func Require(t testing.TB) {
	t.Helper()
	if os.Getenv(envName) != "" {
		return
	}
	why := os.Getenv(envSkip)
	if why == "" {
		why = "test binary was not started through netns.Run in TestMain"
	}
	Skip(t, why)
}

// Skip skips with the reason, or fails under CI=true.
func Skip(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("prerequisite missing under CI=true: %s", why)
	}
	t.Skip(why)
}

// Sh runs a command (in the test's namespace, where the test runs) and
// fails the test on error; it returns the combined output.
func Sh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Name is the namespace this test binary runs in ("" outside one).
func Name() string { return os.Getenv(envName) }

// Path is where `ip netns` keeps a namespace handle.
func Path(name string) string { return filepath.Join("/run/netns", name) }

// Peer is another namespace, a "remote host", joined to the test's
// namespace by a veth pair: LocalAddr on the test side, Addr on the peer.
type Peer struct {
	Name      string
	Addr      string // the peer's IPv4 address
	LocalAddr string // the test namespace's IPv4 address on the link
	Addr6     string
	Local6    string
	LocalIf   string
}

// NewPeer creates a peer namespace on subnet 10.<n>.0.0/24 and
// fd00:<n>::/64 and removes it when the test ends.
func NewPeer(t testing.TB, n int) *Peer {
	t.Helper()
	Require(t)
	p := &Peer{
		Name:      fmt.Sprintf("%s-p%d", Name(), n),
		Addr:      fmt.Sprintf("10.%d.0.2", n),
		LocalAddr: fmt.Sprintf("10.%d.0.1", n),
		Addr6:     fmt.Sprintf("fd00:%d::2", n),
		Local6:    fmt.Sprintf("fd00:%d::1", n),
		LocalIf:   fmt.Sprintf("bt%d", n),
	}
	peerIf := fmt.Sprintf("bp%d", n)
	ns := "--net=" + Path(p.Name)
	steps := [][]string{
		{"ip", "netns", "add", p.Name},
		{"ip", "link", "add", p.LocalIf, "type", "veth", "peer", "name", peerIf, "netns", p.Name},
		{"ip", "addr", "add", p.LocalAddr + "/24", "dev", p.LocalIf},
		{"ip", "addr", "add", p.Local6 + "/64", "dev", p.LocalIf, "nodad"},
		{"ip", "link", "set", p.LocalIf, "up"},
		{"nsenter", ns, "ip", "link", "set", "lo", "up"},
		{"nsenter", ns, "ip", "addr", "add", p.Addr + "/24", "dev", peerIf},
		{"nsenter", ns, "ip", "addr", "add", p.Addr6 + "/64", "dev", peerIf, "nodad"},
		{"nsenter", ns, "ip", "link", "set", peerIf, "up"},
		{"nsenter", ns, "ip", "route", "add", "default", "via", p.LocalAddr},
		{"nsenter", ns, "ip", "-6", "route", "add", "default", "via", p.Local6},
	}
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", p.LocalIf).Run()
		exec.Command("ip", "netns", "del", p.Name).Run()
	})
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return p
}

// Do runs fn on an OS thread that has entered the peer's namespace, so
// sockets fn opens belong to the peer. The thread returns to the test's
// namespace afterwards; if it cannot, it is discarded. (A thread left in
// the peer would be reused by other goroutines, and if it is the main
// thread, /proc/self/net would then show the peer's tables.)
func (p *Peer) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return // still locked: the thread is discarded
		}
		defer home.Close()
		f, err := os.Open(Path(p.Name))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", p.Name, err)
			return
		}
		err = fn()
		if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Exec runs a command inside the peer namespace.
func (p *Peer) Exec(args ...string) ([]byte, error) {
	return exec.Command("nsenter", append([]string{"--net=" + Path(p.Name), "--"}, args...)...).CombinedOutput()
}
