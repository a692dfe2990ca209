package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

// Ports of TestNATTrafficPaths.
const (
	natAllPort  = 18080 // web: -p 18080:80 (every address, both families)
	natOnePort  = 18081 // web: -p <veth address>:18081:80 too
	natUDPPort  = 18053 // udpA, then udpB: -p 18053:53/udp
	natEgress   = 18099 // the "internet host" listener in the peer
	natOtherLo  = "10.77.0.1"
	natPeerNum  = 71
	natShortTTL = time.Second
)

// The seven traffic paths of the NAT backend, with real bytes, against a
// private dockerd (--userland-proxy=false --iptables=false) and berth in
// its default auto mode, then flush recovery on the same world.
func TestNATTrafficPaths(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	peer := netns.NewPeer(t, natPeerNum)
	sh(t, "ip", "addr", "add", natOtherLo+"/32", "dev", "lo")
	t.Cleanup(func() { exec.Command("ip", "addr", "del", natOtherLo+"/32", "dev", "lo").Run() })
	// dockerd (--ip-forward defaults to true) turns forwarding on when it
	// sets up docker0; containers' egress and hairpin traffic need it.
	if v := strings.TrimSpace(readFile("/proc/sys/net/ipv4/ip_forward")); v != "1" {
		t.Fatalf("net.ipv4.ip_forward is %q in the test namespace after dockerd started; berth's egress and hairpin need 1", v)
	}
	b := w.StartBerth("--canary-interval", "500ms")

	// web: tcp 0.0.0.0 (nat), [::] (relay) and one address (nat).
	// udpA: udp 0.0.0.0 and [::]; it is also the client container of the
	// hairpin and egress paths, until the UDP path replaces it.
	client := "udpA"
	runEchos(t, w,
		[]string{"web", "-p", fmt.Sprintf("%d:80", natAllPort), "-p", fmt.Sprintf("%s:%d:80", peer.LocalAddr, natOnePort), "--", "-tcp", "80"},
		[]string{"udpA", "-p", fmt.Sprintf("%d:53/udp", natUDPPort), "--", "-udp", "53", "-tcp", "80"})
	waitInstalled(t, b, map[string]int{"web": 3, "udpA": 2})
	waitReady(t, w, "web", "udpA")

	wantName := func(t *testing.T, what, got string, err error, name string) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if harness.Name(got) != name {
			t.Fatalf("%s answered %q, want %s", what, got, name)
		}
		t.Logf("%s: %q", what, got)
	}
	all := func(host string) string { return net.JoinHostPort(host, fmt.Sprint(natAllPort)) }

	t.Run("from another host", func(t *testing.T) {
		got, err := peerWho(peer, all(peer.LocalAddr), 3*time.Second)
		wantName(t, "peer -> "+all(peer.LocalAddr), got, err, "web")
		// PREROUTING DNAT keeps the client address: the container sees the peer.
		if !strings.Contains(got, peer.Addr+":") {
			t.Errorf("container saw %q, want the peer's address %s", got, peer.Addr)
		}
	})

	t.Run("from the host to its own address", func(t *testing.T) {
		got, err := harness.WhoTCP(all(peer.LocalAddr), 3*time.Second)
		wantName(t, "host -> "+all(peer.LocalAddr), got, err, "web")
		got, err = harness.WhoTCP(all(natOtherLo), 3*time.Second)
		wantName(t, "host -> "+all(natOtherLo), got, err, "web")
	})

	t.Run("from the host to localhost", func(t *testing.T) {
		got, err := harness.WhoTCP(all("127.0.0.1"), 3*time.Second)
		wantName(t, "host -> "+all("127.0.0.1"), got, err, "web")
		got, err = harness.WhoTCP(all("::1"), 3*time.Second)
		wantName(t, "host -> "+all("::1")+" (relay)", got, err, "web")
		if err := harness.EchoTCP(all("127.0.0.1"), make([]byte, 256<<10), 5*time.Second); err != nil {
			t.Fatalf("256 KiB echo through 127.0.0.1: %v", err)
		}
		// route_localnet on docker0, and the guard against its CVE-2020-8558 hole
		if v := strings.TrimSpace(readFile("/proc/sys/net/ipv4/conf/docker0/route_localnet")); v != "1" {
			t.Errorf("route_localnet on docker0 is %q, want 1", v)
		}
		raw := save(t, b, "iptables", "-t", "raw")
		for _, want := range []string{
			"-A PREROUTING -m comment --comment berth -j BERTH-GUARD",
			`-A BERTH-GUARD -d 127.0.0.0/8 ! -i lo -m comment --comment "berth guard: martian 127.0.0.0/8 (CVE-2020-8558)" -j DROP`,
		} {
			if !hasLine(raw, want) {
				t.Errorf("raw table lacks %q:\n%s", want, raw)
			}
		}
		if rows := rowsOf(t, b, "web"); !anyRow(rows, func(r reconcile.Row) bool {
			return r.HostIP == "::" && r.Mode == "relay" && r.State == reconcile.StateInstalled
		}) {
			t.Errorf("web has no installed relay row on [::]: %+v", rows)
		}
	})

	t.Run("hairpin from containers", func(t *testing.T) {
		// Another container's reply is bridged straight back to the client;
		// it is un-NATed only because bridged IPv4 passes netfilter
		// (br_netfilter, built into this kernel). Without it that path
		// times out: berth neither loads br_netfilter nor masquerades it.
		brnf := strings.TrimSpace(readFile("/proc/sys/net/bridge/bridge-nf-call-iptables"))
		t.Logf("net.bridge.bridge-nf-call-iptables = %q", brnf)
		clientIP, webIP := w.ContainerIP(client), w.ContainerIP("web")
		gw := w.MustDocker("inspect", "-f", "{{.NetworkSettings.Gateway}}", client)
		for _, tc := range []struct{ from, host string }{
			{client, peer.LocalAddr}, // another container's port, via the host address
			{client, gw},             // ... via the bridge gateway
			{"web", peer.LocalAddr},  // a container reaching its own published port
			{"web", gw},
		} {
			got, err := ncWho(w, tc.from, tc.host, natAllPort)
			if err != nil && tc.from == client && brnf != "1" {
				err = fmt.Errorf("%w (bridge-nf-call-iptables is %q, see above)", err, brnf)
			}
			wantName(t, fmt.Sprintf("container %s -> %s:%d", tc.from, tc.host, natAllPort), got, err, "web")
			// the other container's address is kept (bridged reply through
			// conntrack); a container talking to itself is masqueraded
			if tc.from == client && !strings.Contains(got, clientIP+":") {
				t.Errorf("web saw %q, want client's address %s", got, clientIP)
			}
			if tc.from == "web" && strings.Contains(got, " "+webIP+":") {
				t.Errorf("hairpin to itself not masqueraded: web saw its own address in %q", got)
			}
		}
	})

	t.Run("port published on one address", func(t *testing.T) {
		one := net.JoinHostPort(peer.LocalAddr, fmt.Sprint(natOnePort))
		got, err := peerWho(peer, one, 3*time.Second)
		wantName(t, "peer -> "+one, got, err, "web")
		got, err = harness.WhoTCP(one, 3*time.Second)
		wantName(t, "host -> "+one, got, err, "web")
		for _, host := range []string{"127.0.0.1", natOtherLo} {
			other := net.JoinHostPort(host, fmt.Sprint(natOnePort))
			if got, err := harness.WhoTCP(other, natShortTTL); err == nil {
				t.Errorf("%s answered %q: the mapping is only for %s", other, got, peer.LocalAddr)
			}
		}
		// and from the peer, the other host address (routed through the veth)
		if out, err := peer.Exec("ip", "route", "replace", natOtherLo+"/32", "via", peer.LocalAddr); err != nil {
			t.Fatalf("peer route: %v: %s", err, out)
		}
		other := net.JoinHostPort(natOtherLo, fmt.Sprint(natOnePort))
		if got, err := peerWho1s(peer, other); err == nil {
			t.Errorf("peer -> %s answered %q: the mapping is only for %s", other, got, peer.LocalAddr)
		}
		got, err = peerWho(peer, all(natOtherLo), 3*time.Second)
		wantName(t, "peer -> "+all(natOtherLo)+" (control: all-address port)", got, err, "web")
	})

	t.Run("egress from a container", func(t *testing.T) {
		var ln net.Listener
		if err := peer.Do(func() error {
			var err error
			ln, err = net.Listen("tcp", net.JoinHostPort(peer.Addr, fmt.Sprint(natEgress)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		seen := make(chan string, 4)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "hello %s\n", c.RemoteAddr())
				c.Close()
				seen <- c.RemoteAddr().String() + " " + strings.TrimSpace(line)
			}
		}()
		out, err := w.Docker("exec", client, "sh", "-c", fmt.Sprintf("echo hi | nc -w 3 %s %d", peer.Addr, natEgress))
		if err != nil {
			t.Fatalf("container -> internet host %s:%d: %v (%q)", peer.Addr, natEgress, err, out)
		}
		select {
		case s := <-seen:
			t.Logf("internet host saw %q; container got %q", s, out)
			if !strings.HasPrefix(s, peer.LocalAddr+":") || !strings.HasSuffix(s, " hi") {
				t.Errorf("internet host saw %q, want a connection from %s (masqueraded) saying hi", s, peer.LocalAddr)
			}
		case <-time.After(3 * time.Second):
			t.Fatalf("the internet host saw no connection; container got %q", out)
		}
		nat := save(t, b, "iptables", "-t", "nat")
		if !hasLine(nat, `-A BERTH-EGRESS -s 172.17.0.0/16 ! -o docker0 -m comment --comment "berth egress docker0" -j MASQUERADE`) {
			t.Errorf("no egress MASQUERADE for docker0 in:\n%s", nat)
		}
	})

	t.Run("udp after a container is replaced", func(t *testing.T) {
		var c net.Conn
		if err := peer.Do(func() error {
			var err error
			c, err = net.Dial("udp", net.JoinHostPort(peer.LocalAddr, fmt.Sprint(natUDPPort)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		got, err := retryWhoOn(c, "udpA", 5*time.Second)
		wantName(t, "udp from "+c.LocalAddr().String(), got, err, "udpA")
		aIP := w.ContainerIP("udpA")
		w.MustDocker("rm", "-f", "udpA")
		// a filler takes udpA's address, so udpB gets another one and a
		// stale conntrack entry could not reach udpB by chance
		w.RunEcho("filler", "--", "-tcp", "80")
		w.RunEcho("udpB", "-p", fmt.Sprintf("%d:53/udp", natUDPPort), "--", "-udp", "53")
		waitReady(t, w, "filler", "udpB")
		if bIP := w.ContainerIP("udpB"); bIP == aIP {
			t.Fatalf("udpB got udpA's address %s; the test would show nothing", aIP)
		}
		waitInstalled(t, b, map[string]int{"udpB": 2})
		start := time.Now()
		got, err = whoOnce(c)
		if err != nil || harness.Name(got) != "udpB" {
			// Status says installed only after the write and the conntrack
			// flush, so the very first datagram must reach udpB. Retry
			// only to tell "late" from "never" in the failure.
			t.Errorf("first datagram after the replacement: %q, %v (want udpB)", got, err)
			got, err = retryWhoOn(c, "udpB", 3*time.Second)
		}
		wantName(t, fmt.Sprintf("same socket %s after replacement (%v)", c.LocalAddr(), time.Since(start).Round(time.Millisecond)), got, err, "udpB")
	})

	t.Run("flush recovery", func(t *testing.T) {
		fl := flavour(t, b)
		ipt := "iptables-" + fl
		jump := "-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment berth -j BERTH-PREROUTING"
		if !hasLine(save(t, b, "iptables", "-t", "nat"), jump) {
			t.Fatalf("no %q in nat", jump)
		}
		steps := []struct {
			name string
			cmd  []string
		}{
			{"iptables -t nat -F", []string{ipt, "-w", "-t", "nat", "-F"}},
			{"delete the PREROUTING jump", append([]string{ipt, "-w", "-t", "nat", "-D"}, strings.Fields(strings.TrimPrefix(jump, "-A "))...)},
			{"nft flush ruleset", []string{"nft", "flush", "ruleset"}},
		}
		if fl != "nft" {
			steps = steps[:2]
			t.Logf("iptables flavour %s: nft flush ruleset would not touch berth's rules; skipped", fl)
		}
		for _, s := range steps {
			before, err := b.Summary()
			if err != nil {
				t.Fatal(err)
			}
			if got, err := peerWho(peer, all(peer.LocalAddr), 3*time.Second); err != nil || harness.Name(got) != "web" {
				t.Fatalf("before %s: %q %v", s.name, got, err)
			}
			sh(t, s.cmd...)
			flushed := time.Now()
			var last error
			probes := 0
			for time.Since(flushed) < 10*time.Second {
				var got string
				probes++
				got, last = peerWho(peer, all(peer.LocalAddr), 250*time.Millisecond)
				if last == nil && harness.Name(got) == "web" {
					break
				}
				if last == nil {
					last = fmt.Errorf("answered %q", got)
				}
				time.Sleep(20 * time.Millisecond)
			}
			took := time.Since(flushed)
			if last != nil {
				t.Fatalf("%s: forwarding from the peer not back within 10s: %v", s.name, last)
			}
			t.Logf("%s: forwarding from the peer back %v after the flush (canary interval 500ms; %d probes, 250ms timeout)", s.name, took.Round(time.Millisecond), probes)
			if probes == 1 {
				t.Logf("%s: the first probe already answered: berth was quicker than the client, the figure shows nothing", s.name)
			}
			if took > 3*time.Second {
				t.Errorf("%s: recovery took %v, want within a few canary intervals (500ms)", s.name, took)
			}
			// berth counts the recovery once its chains are back, which
			// may be a moment after traffic flows again
			harness.Eventually(t, 2*time.Second, s.name+": flush_recoveries counted", func() error {
				after, err := b.Summary()
				if err == nil && after.FlushRecoveries <= before.FlushRecoveries {
					err = fmt.Errorf("flush_recoveries %d -> %d, want an increase", before.FlushRecoveries, after.FlushRecoveries)
				}
				return err
			})
			// every path comes back, not only PREROUTING
			for _, addr := range []string{all("127.0.0.1"), all(peer.LocalAddr)} {
				harness.Eventually(t, 3*time.Second, s.name+": host -> "+addr, func() error {
					got, err := harness.WhoTCP(addr, natShortTTL)
					if err == nil && harness.Name(got) != "web" {
						err = fmt.Errorf("answered %q", got)
					}
					return err
				})
			}
			if out, err := ncWho(w, "filler", peer.LocalAddr, natAllPort); err != nil || harness.Name(out) != "web" {
				t.Errorf("%s: hairpin after recovery: %q %v", s.name, out, err)
			}
			raw := save(t, b, "iptables", "-t", "raw")
			if !hasLine(raw, "-A PREROUTING -m comment --comment berth -j BERTH-GUARD") {
				t.Errorf("%s: guard jump not restored:\n%s", s.name, raw)
			}
		}
		if !strings.Contains(readFile(b.Log), "flushed or removed") {
			t.Error("berth did not log the flush")
		}
	})
}

// runEchos starts echo containers (RunEcho's arguments) in parallel.
func runEchos(t testing.TB, w *harness.World, ctrs ...[]string) {
	t.Helper()
	errs := make(chan error, len(ctrs))
	for _, c := range ctrs {
		go func() {
			args := []string{"run", "-d", "--name", c[0], "-e", "NAME=" + c[0]}
			i := slices.Index(c, "--")
			args = append(append(append(args, c[1:i]...), harness.ImageEcho), c[i+1:]...)
			_, err := w.Docker(args...)
			errs <- err
		}()
	}
	for range ctrs {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// waitReady waits until each echo server has printed "ready" (it
// listens): docker run returns before that, and a connection in between is
// refused by the container itself.
func waitReady(t testing.TB, w *harness.World, names ...string) {
	t.Helper()
	for _, n := range names {
		harness.Eventually(t, 10*time.Second, n+" listening", func() error {
			out, err := w.Docker("logs", n)
			if err == nil && !strings.Contains(out, "ready") {
				err = fmt.Errorf("no \"ready\" in its output yet")
			}
			return err
		})
	}
}

// sh is netns.Sh.
var sh = netns.Sh

// flavour is the iptables flavour berth says it uses.
func flavour(t testing.TB, b *harness.Berth) string {
	t.Helper()
	s, err := b.Summary()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range s.Info {
		if _, rest, ok := strings.Cut(l, "iptables flavour "); ok {
			return strings.Fields(rest)[0]
		}
	}
	t.Fatalf("berth's status info names no iptables flavour: %q", s.Info)
	return ""
}

// save runs base-FLAVOUR-save (base is iptables or ip6tables) with args.
func save(t testing.TB, b *harness.Berth, base string, args ...string) string {
	t.Helper()
	return sh(t, append([]string{base + "-" + flavour(t, b) + "-save"}, args...)...)
}

func hasLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

// waitInstalled waits until each named container has n installed rows.
func waitInstalled(t testing.TB, b *harness.Berth, want map[string]int) {
	t.Helper()
	b.EventuallyStatus(t, 10*time.Second, fmt.Sprint("installed ", want), func(rows []reconcile.Row) error {
		for name, n := range want {
			if got := installed(rows, name); got != n {
				return fmt.Errorf("%s: %d of %d installed; rows %+v", name, got, n, rows)
			}
		}
		return nil
	})
}

func rowsOf(t testing.TB, b *harness.Berth, name string) []reconcile.Row {
	t.Helper()
	rows, err := b.Status()
	if err != nil {
		t.Fatal(err)
	}
	var out []reconcile.Row
	for _, r := range rows {
		if r.ContainerName == name {
			out = append(out, r)
		}
	}
	return out
}

func anyRow(rows []reconcile.Row, f func(reconcile.Row) bool) bool {
	for _, r := range rows {
		if f(r) {
			return true
		}
	}
	return false
}

// ncWho asks "who?" from inside a container with busybox nc.
func ncWho(w *harness.World, ctr, host string, port int) (string, error) {
	out, err := w.Docker("exec", ctr, "sh", "-c", fmt.Sprintf("echo who? | nc -w 2 %s %d", host, port))
	if err == nil && strings.TrimSpace(out) == "" {
		err = fmt.Errorf("no answer")
	}
	return strings.TrimSpace(out), err
}

// peerWho1s is WhoTCP from the peer with a one-second timeout.
func peerWho1s(p *netns.Peer, addr string) (string, error) { return peerWho(p, addr, natShortTTL) }

// peerWho is WhoTCP from the peer.
func peerWho(p *netns.Peer, addr string, timeout time.Duration) (string, error) {
	var got string
	err := p.Do(func() error {
		var err error
		got, err = harness.WhoTCP(addr, timeout)
		return err
	})
	return got, err
}

// whoOnce is one question on a datagram socket with a one-second timeout.
func whoOnce(c net.Conn) (string, error) { return harness.WhoOn(c, natShortTTL) }

// retryWhoOn asks on the same socket until name answers (the first
// datagrams may meet dockerd's held socket before the DNAT is in).
func retryWhoOn(c net.Conn, name string, d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		got, err := harness.WhoOn(c, 500*time.Millisecond)
		if err == nil && harness.Name(got) == name || time.Now().After(deadline) {
			return got, err
		}
	}
}
