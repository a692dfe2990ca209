// Package deploy checks every deployment form in deploy/: the systemd unit
// (verified, its hardening scored, its ExecStart run with the unit's
// capabilities and a fake NOTIFY_SOCKET), the container image (built
// without a registry on a private dockerd and proven to forward), the
// Compose file and Swarm stack, and the daemon.json sample.
package deploy

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
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

func TestMain(m *testing.M) { os.Exit(netns.Run(m)) }

// root is the module root.
func root(t testing.TB) string {
	t.Helper()
	dir, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// deployFile reads a file under deploy/.
func deployFile(t testing.TB, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root(t), "deploy", rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// need skips (fails under CI=true) when a tool is missing.
func need(t testing.TB, bins ...string) {
	t.Helper()
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			netns.Skip(t, b+" not installed: "+installHint(b))
		}
	}
}

func installHint(bin string) string {
	switch bin {
	case "systemd-analyze":
		return "apt-get install systemd"
	case "docker-compose":
		return "apt-get install docker-compose"
	case "setpriv":
		return "apt-get install util-linux"
	case "ldd":
		return "apt-get install libc-bin"
	}
	return "see test/deps.sh"
}

// freeAddr is a 127.0.0.1 address with a port nobody listens on.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitHealthy polls http://addr/healthz until it answers 200; alive reports
// whether the daemon still runs, logs what to show on failure.
func waitHealthy(t testing.TB, addr string, d time.Duration, alive func() bool, logs func() string) {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(d)
	last := ""
	for time.Now().Before(deadline) {
		if alive != nil && !alive() {
			t.Fatalf("berth exited before it was healthy; log:\n%s", logs())
		}
		resp, err := c.Get("http://" + addr + "/healthz")
		if err == nil {
			var body bytes.Buffer
			body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(body.String()))
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("berth not healthy at %s within %v: %s; log:\n%s", addr, d, last, logs())
}

// run runs a command with a timeout and returns its combined output.
func run(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("%s: timed out after %v", name, timeout)
	}
	return string(out), err
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// statusRows reads berth's /status.
func statusRows(addr string) ([]reconcile.Row, error) {
	c := &http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + "/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var rows []reconcile.Row
	return rows, json.NewDecoder(resp.Body).Decode(&rows)
}

// skipWithoutNAT waits until berth lists the container's mappings and
// skips the test when this build of berth has no NAT backend (its rows then
// say "nat backend unavailable").
func skipWithoutNAT(t *testing.T, addr, container string) {
	t.Helper()
	var rows []reconcile.Row
	harness.Eventually(t, 10*time.Second, container+" in /status", func() error {
		all, err := statusRows(addr)
		if err != nil {
			return err
		}
		rows = rows[:0]
		for _, r := range all {
			if r.ContainerName == container || strings.TrimPrefix(r.ContainerName, "/") == container {
				rows = append(rows, r)
			}
		}
		if len(rows) == 0 {
			return fmt.Errorf("no rows for %s", container)
		}
		return nil
	})
	for _, r := range rows {
		if strings.Contains(r.Error, "nat backend unavailable") {
			t.Skipf("this berth build has no NAT backend yet: %s", r.Error)
		}
	}
}
