package e2e

import (
	"fmt"
	"net"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

// berthRules is berth's part of iptables-save/ip6tables-save, sorted, with
// counters dropped.
func berthRules(t *testing.T) string {
	t.Helper()
	var out []string
	for _, bin := range []string{"iptables-save", "ip6tables-save"} {
		b, err := exec.Command(bin).Output()
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "BERTH") || strings.Contains(l, `"berth`) {
				if strings.HasPrefix(l, ":") {
					l = strings.Fields(l)[0]
				}
				out = append(out, bin+" "+l)
			}
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// The core scenarios on every engine: Debian's 20.10 and Docker 29.
func TestEnginesCoreScenarios(t *testing.T) {
	for i, engine := range harness.Engines(t) {
		t.Run(engine, func(t *testing.T) {
			w := harness.Start(t, harness.Options{Engine: engine})
			peer := netns.NewPeer(t, 140+i)
			b := w.StartBerth()
			w.RunEcho("core", "-p", "28000:80", "-p", "28001:53/udp", "--", "-tcp", "80", "-udp", "53")
			b.EventuallyStatus(t, 10*time.Second, "status follows -p", func(rows []reconcile.Row) error {
				want := []string{"tcp 0.0.0.0:28000->80 nat", "tcp :::28000->80 relay", "udp 0.0.0.0:28001->53 nat", "udp :::28001->53 relay"}
				if got := rowKeys(rows, "core"); strings.Join(got, "|") != strings.Join(want, "|") || installed(rows, "core") != 4 {
					return fmt.Errorf("got %v (%d installed), want %v", got, installed(rows, "core"), want)
				}
				return nil
			})
			remote := net.JoinHostPort(peer.LocalAddr, "28000")
			var got string
			if err := peer.Do(func() (err error) { got, err = harness.WhoTCP(remote, 3*time.Second); return }); err != nil || harness.Name(got) != "core" {
				t.Fatalf("remote %s: %q %v", remote, got, err)
			}
			for _, addr := range []string{"127.0.0.1:28000", "[::1]:28000"} {
				if got, err := harness.WhoTCP(addr, 3*time.Second); err != nil || harness.Name(got) != "core" {
					t.Fatalf("%s: %q %v", addr, got, err)
				}
			}
			if got, err := harness.WhoUDP("[::1]:28001", 3*time.Second); err != nil || harness.Name(got) != "core" {
				t.Fatalf("udp [::1]:28001: %q %v", got, err)
			}

			// kill -9 and restart: the rules are adopted as they are.
			before := berthRules(t)
			b.Kill9()
			b2 := w.StartBerth()
			harness.Eventually(t, 10*time.Second, "adopted", func() error {
				rows, err := b2.Status()
				if err != nil || installed(rows, "core") != 4 {
					return fmt.Errorf("rows %v %v", rows, err)
				}
				return nil
			})
			if after := berthRules(t); after != before {
				t.Fatalf("rules changed across kill -9 + restart:\nbefore\n%s\nafter\n%s", before, after)
			}
			if got, err := harness.WhoTCP("[::1]:28000", 3*time.Second); err != nil || harness.Name(got) != "core" {
				t.Fatalf("[::1]:28000 after restart: %q %v", got, err)
			}
		})
	}
}
