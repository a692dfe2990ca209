package nat

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/test/netns"
)

// newTable makes a Table in the test namespace and removes everything it
// made when the test ends.
func newTable(t *testing.T, opts Options) *Table {
	t.Helper()
	netns.Require(t)
	if opts.Flavour == "" {
		opts.Flavour = os.Getenv("BERTH_TEST_FLAVOUR") // "" = auto
	}
	opts.IPv6 = true
	tab, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	dummyOnce.Do(func() { makeDummy(t) })
	t.Cleanup(func() {
		if err := tab.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return tab
}

// makeDummy adds a "bridge" that routes the made-up container subnet
// 10.200.0.0/16.
func makeDummy(t testing.TB) {
	for _, s := range [][]string{
		{"ip", "link", "add", "bdummy", "type", "veth", "peer", "name", "bdummy1"},
		{"ip", "addr", "add", "10.200.0.1/16", "dev", "bdummy"},
		{"ip", "link", "set", "bdummy", "up"},
	} {
		sh(t, s...)
	}
}

var dummyOnce sync.Once

// sh is netns.Sh.
var sh = netns.Sh

// tables is iptables-save and ip6tables-save of the flavour in use, without
// comment lines and, with foreignOnly, without berth's lines.
func tables(t testing.TB, tab *Table, foreignOnly bool) string {
	t.Helper()
	var b strings.Builder
	for _, f := range tab.all {
		for _, l := range strings.Split(sh(t, f.t.save), "\n") {
			if strings.HasPrefix(l, "#") || (foreignOnly && (strings.Contains(l, "BERTH-") || strings.Contains(l, "berth"))) {
				continue
			}
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func berthLines(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "BERTH-") || strings.Contains(l, "berth") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func sortMappings(ms []forward.Mapping) []forward.Mapping {
	out := slices.Clone(ms)
	slices.SortFunc(out, func(a, b forward.Mapping) int { return strings.Compare(a.String(), b.String()) })
	return out
}

func mustList(t *testing.T, tab *Table) []forward.Mapping {
	t.Helper()
	got, err := tab.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return sortMappings(got)
}

func TestKernelRoundTrip(t *testing.T) {
	tab := newTable(t, Options{})
	ctx := context.Background()
	t.Logf("flavour %s", tab.Flavour())
	ms := []forward.Mapping{
		mp("tcp", "0.0.0.0", 8080, "10.200.0.2", 80, "3f2a9c0d1e2b"),
		mp("udp", "127.0.0.1", 5353, "10.200.0.2", 53, "3f2a9c0d1e2b"),
		mp("sctp", "10.0.0.1", 9999, "10.200.0.3", 9, "0123456789ab"),
		mp("tcp", "::", 8080, "fd00:200::2", 80, "3f2a9c0d1e2b"),
		mp("udp", "fd00::1", 53, "fd00:200::3", 53, ""),
	}
	if err := tab.Apply(ctx, ms, nil); err != nil {
		t.Fatal(err)
	}
	if got := mustList(t, tab); !slices.Equal(got, sortMappings(ms)) {
		t.Fatalf("List = %v\nwant %v", got, ms)
	}
	before := tables(t, tab, false)
	for _, l := range []string{
		"-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment berth -j BERTH-PREROUTING",
		"-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment berth -j BERTH-OUTPUT",
		"-A POSTROUTING -m comment --comment berth -j BERTH-POSTROUTING",
		"-A PREROUTING -m comment --comment berth -j BERTH-GUARD",
	} {
		if n := strings.Count(before, l+"\n"); n < 1 {
			t.Errorf("missing %q", l)
		}
	}
	// idempotent: a second Apply, a fresh Table adopting the rules, and
	// Ensure change nothing
	if err := tab.Apply(ctx, ms, nil); err != nil {
		t.Fatal(err)
	}
	tab2 := newTable(t, Options{})
	if got := mustList(t, tab2); !slices.Equal(got, sortMappings(ms)) {
		t.Fatalf("adopted List = %v", got)
	}
	if err := tab2.Apply(ctx, ms, nil); err != nil {
		t.Fatal(err)
	}
	if err := tab2.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if after := tables(t, tab, false); after != before {
		t.Errorf("re-apply changed the tables:\n%s\n---\n%s", before, after)
	}
	if err := tab.Apply(ctx, nil, ms[:2]); err != nil {
		t.Fatal(err)
	}
	if got := mustList(t, tab); !slices.Equal(got, sortMappings(ms[2:])) {
		t.Fatalf("after remove List = %v", got)
	}
	if err := tab.Apply(ctx, nil, ms); err != nil {
		t.Fatal(err)
	}
	if got := mustList(t, tab); len(got) != 0 {
		t.Fatalf("after removing all: %v", got)
	}
	// refused mappings come back per mapping, the rest is applied
	bad := mp("tcp", "::1", 80, "fd00::2", 80, "x")
	err := tab.Apply(ctx, []forward.Mapping{bad, ms[0]}, nil)
	per, batch := forward.SplitErrors(err)
	if per[bad] == nil || batch != nil || len(per) != 1 {
		t.Errorf("Apply with ::1: per=%v batch=%v", per, batch)
	}
	if got := mustList(t, tab); !slices.Equal(got, ms[:1]) {
		t.Errorf("List = %v", got)
	}
}

func TestKernelForeignUntouched(t *testing.T) {
	tab := newTable(t, Options{Masquerade: true})
	ctx := context.Background()
	ipt := tab.all[0].t.iptables
	for _, f := range tab.all {
		save := sh(t, f.t.save)
		restore := f.t.restore
		t.Cleanup(func() {
			cmd := exec.Command(restore)
			cmd.Stdin = strings.NewReader(save)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("restoring the tables: %v: %s", err, out)
			}
		})
	}
	sh(t, ipt, "-t", "nat", "-N", "DOCKER")
	sh(t, ipt, "-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER")
	sh(t, ipt, "-t", "nat", "-A", "DOCKER", "-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "172.17.0.9:80")
	sh(t, ipt, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-m", "comment", "--comment", "user rule", "-j", "ACCEPT")
	sh(t, ipt, "-t", "filter", "-N", "DOCKER-USER")
	sh(t, ipt, "-t", "filter", "-A", "FORWARD", "-j", "DOCKER-USER")
	sh(t, ipt, "-t", "filter", "-A", "DOCKER-USER", "-s", "10.9.0.0/16", "-j", "DROP")
	sh(t, ipt, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "7", "-j", "DROP")
	sh(t, tab.all[1].t.iptables, "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:9::/64", "-j", "MASQUERADE")
	orig := tables(t, tab, false)

	tab.SetBridges([]Bridge{{"docker0", nil}})
	ms := []forward.Mapping{
		mp("tcp", "0.0.0.0", 8080, "10.200.0.2", 80, "3f2a9c0d1e2b"),
		mp("udp", "::", 53, "fd00:200::3", 53, "3f2a9c0d1e2b"),
	}
	if err := tab.Apply(ctx, ms, nil); err != nil {
		t.Fatal(err)
	}
	tab.SetBridges([]Bridge{{"docker0", nil}, {"br-x", []netip.Prefix{netip.MustParsePrefix("172.18.0.0/16"), netip.MustParsePrefix("fd00:18::/64")}}})
	if err := tab.Apply(ctx, nil, nil); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(tables(t, tab, false), `-A BERTH-EGRESS -s 172.18.0.0/16 ! -o br-x -m comment --comment "berth egress br-x" -j MASQUERADE`) {
		t.Errorf("egress rule missing:\n%s", tables(t, tab, false))
	}
	if got := tables(t, tab, true); got != orig {
		t.Errorf("foreign rules changed by Apply:\n%s\n---\n%s", orig, got)
	}
	if err := tab.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tab.Cleanup(ctx); err != nil {
		t.Fatalf("second cleanup: %v", err)
	}
	if got := tables(t, tab, false); got != orig {
		t.Errorf("tables after Cleanup differ:\n%s\n---\n%s", orig, got)
	}
}

func TestKernelDuplicateAdoption(t *testing.T) {
	tab := newTable(t, Options{})
	ctx := context.Background()
	m := mp("tcp", "0.0.0.0", 8080, "10.200.0.2", 80, "3f2a9c0d1e2b")
	if err := tab.Apply(ctx, []forward.Mapping{m}, nil); err != nil {
		t.Fatal(err)
	}
	// a crash between two writes, or a second berth, left a copy
	args := append([]string{tab.all[0].t.iptables, "-t", "nat", "-A", dnatChain(bucketOf(m.ContainerID))}, dnatSpec(m)...)
	sh(t, args...)
	tab2 := newTable(t, Options{})
	got := mustList(t, tab2)
	if len(got) != 2 || got[0] != m || got[1] != m {
		t.Fatalf("List = %v, want the mapping twice", got)
	}
	if err := tab2.Apply(ctx, nil, []forward.Mapping{m}); err != nil {
		t.Fatal(err)
	}
	if got := mustList(t, tab2); len(got) != 1 || got[0] != m {
		t.Fatalf("after removing the extra copy: %v", got)
	}
}

func TestKernelCanary(t *testing.T) {
	for _, flush := range [][]string{
		{"iptables", "-t", "nat", "-F"},
		{"nft", "flush", "ruleset"},
		{"iptables", "-t", "nat", "-F", chainPrerouting},
	} {
		t.Run(strings.Join(flush, " "), func(t *testing.T) {
			tab := newTable(t, Options{})
			ctx := context.Background()
			ms := []forward.Mapping{mp("tcp", "0.0.0.0", 8080, "10.200.0.2", 80, "3f2a9c0d1e2b")}
			if err := tab.Apply(ctx, ms, nil); err != nil {
				t.Fatal(err)
			}
			if ok, err := tab.Check(ctx); !ok || err != nil {
				t.Fatalf("Check on fresh rules: %v %v", ok, err)
			}
			want := berthLines(tables(t, tab, false))
			if flush[0] == "nft" && tab.Flavour() != FlavourNFT {
				t.Skip("nft flush only concerns the nft flavour")
			}
			if flush[0] == "iptables" {
				flush[0] = tab.all[0].t.iptables
			}
			sh(t, flush...)
			if ok, err := tab.Check(ctx); ok || err != nil {
				t.Fatalf("Check after %v: %v %v", flush, ok, err)
			}
			// the reconciler's repair: List, diff, Apply the difference
			have := mustList(t, tab)
			var add []forward.Mapping
			for _, m := range ms {
				if !slices.Contains(have, m) {
					add = append(add, m)
				}
			}
			if err := tab.Apply(ctx, add, nil); err != nil {
				t.Fatal(err)
			}
			if ok, err := tab.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after repair: %v %v", ok, err)
			}
			if got := berthLines(tables(t, tab, false)); got != want {
				t.Errorf("repaired tables differ:\n%s\n---\n%s", want, got)
			}
		})
	}
}

// --- traffic ---

func enableForwarding(t *testing.T) {
	t.Helper()
	for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// serveTCP runs a server in the peer that answers each connection with
// name and then echoes one line.
func serveTCP(t *testing.T, p *netns.Peer, addr, name string) {
	t.Helper()
	var ln net.Listener
	if err := p.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return }); err != nil {
		t.Fatal(err)
	}
	forwardtest.Serve(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "%s %s", name, line)
	})
}

func serveUDP(t *testing.T, p *netns.Peer, addr, name string) {
	t.Helper()
	var pc net.PacketConn
	if err := p.Do(func() (err error) { pc, err = net.ListenPacket("udp", addr); return }); err != nil {
		t.Fatal(err)
	}
	forwardtest.ServeUDP(t, pc.(*net.UDPConn), func(p []byte) []byte { return []byte(name + " " + string(p)) })
}

// talk dials addr (from the peer when p is not nil) and returns the answer.
func talk(p *netns.Peer, addr string) (string, error) {
	var c net.Conn
	dial := func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return
	}
	var err error
	if p != nil {
		err = p.Do(dial)
	} else {
		err = dial()
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "hello\n")
	b, err := io.ReadAll(c)
	return string(b), err
}

func waitFor(t *testing.T, from *netns.Peer, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if err = from.Do(func() error {
			c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
			if err == nil {
				c.Close()
			}
			return err
		}); err == nil || errors.Is(err, syscall.ECONNREFUSED) {
			return // routed (refused is an answer too)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never reachable: %v", addr, err)
		}
	}
}

func TestKernelTraffic(t *testing.T) {
	tab := newTable(t, Options{})
	ctx := context.Background()
	enableForwarding(t)
	ctr := netns.NewPeer(t, 11)    // the "container"
	remote := netns.NewPeer(t, 12) // another host
	serveTCP(t, ctr, ":80", "ctr")
	ms := []forward.Mapping{
		mp("tcp", "0.0.0.0", 8080, ctr.Addr, 80, "3f2a9c0d1e2b"),
		mp("tcp", "::", 8080, ctr.Addr6, 80, "3f2a9c0d1e2b"),
		mp("tcp", remote.LocalAddr, 8081, ctr.Addr, 80, "3f2a9c0d1e2b"),
	}
	if err := tab.Apply(ctx, ms, nil); err != nil {
		t.Fatal(err)
	}
	// fresh namespaces need a moment before IPv6 forwards (link-local
	// DAD); wait until the plain route works so a failure below is NAT's
	waitFor(t, remote, net.JoinHostPort(ctr.Addr6, "80"))
	for _, tc := range []struct {
		name string
		from *netns.Peer
		addr string
	}{
		{"remote v6", remote, net.JoinHostPort(remote.Local6, "8080")},
		{"remote v4", remote, net.JoinHostPort(remote.LocalAddr, "8080")},
		{"remote v6", remote, net.JoinHostPort(remote.Local6, "8080")},
		{"remote specific address", remote, net.JoinHostPort(remote.LocalAddr, "8081")},
		{"host to its own address", nil, net.JoinHostPort(remote.LocalAddr, "8080")},
		{"host to 127.0.0.1", nil, "127.0.0.1:8080"},
		{"host to 127.0.0.1 on specific-address mapping", nil, "127.0.0.1:8081"},
		{"hairpin from the container", ctr, net.JoinHostPort(ctr.LocalAddr, "8080")},
	} {
		got, err := talk(tc.from, tc.addr)
		want := "ctr hello\n"
		if tc.name == "host to 127.0.0.1 on specific-address mapping" {
			// 10.12.0.1:8081 is not served on 127.0.0.1
			if err == nil && got == want {
				t.Errorf("%s: answered", tc.name)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("%s: %q, %v", tc.name, got, err)
		}
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/" + ctr.LocalIf + "/route_localnet"); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("route_localnet on %s = %q", ctr.LocalIf, b)
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/" + remote.LocalIf + "/route_localnet"); strings.TrimSpace(string(b)) != "0" {
		t.Errorf("route_localnet on %s = %q, should be untouched", remote.LocalIf, b)
	}
	// removal stops the forward
	if err := tab.Apply(ctx, nil, ms[:1]); err != nil {
		t.Fatal(err)
	}
	if got, err := talk(remote, net.JoinHostPort(remote.LocalAddr, "8080")); err == nil {
		t.Errorf("removed mapping still answers: %q", got)
	}
}

// TestKernelLocalnetGuard shows the CVE-2020-8558 path: with route_localnet
// on the bridge, a neighbour on it can reach a host service bound to
// 127.0.0.1. The guard in raw PREROUTING closes it.
func TestKernelLocalnetGuard(t *testing.T) {
	tab := newTable(t, Options{})
	ctx := context.Background()
	enableForwarding(t)
	ctr := netns.NewPeer(t, 21)
	serveTCP(t, ctr, ":80", "ctr")
	if err := tab.Apply(ctx, []forward.Mapping{mp("tcp", "0.0.0.0", 8080, ctr.Addr, 80, "abc")}, nil); err != nil {
		t.Fatal(err)
	}
	// a host service bound to localhost only; UDP so that one datagram
	// shows the hole (the neighbour need not accept a 127.0.0.1 reply)
	pc, err := net.ListenPacket("udp", "127.0.0.1:7777")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	got := make(chan string, 10)
	go func() {
		buf := make([]byte, 100)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- string(buf[:n])
		}
	}()
	attack := func(msg string) bool {
		if err := ctr.Do(func() error {
			c, err := net.Dial("udp", "127.0.0.1:7777")
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte(msg))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-got:
			return m == msg
		case <-time.After(500 * time.Millisecond):
			return false
		}
	}
	// the neighbour routes 127.0.0.0/8 to the host
	for _, s := range [][]string{
		{"ip", "route", "del", "table", "local", "local", "127.0.0.0/8", "dev", "lo"},
		{"ip", "route", "del", "table", "local", "local", "127.0.0.1", "dev", "lo"},
		{"ip", "route", "add", "127.0.0.0/8", "via", ctr.LocalAddr},
		{"sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"},
	} {
		if out, err := ctr.Exec(s...); err != nil {
			t.Fatalf("%v: %v: %s", s, err, out)
		}
	}
	ipt := tab.all[0].t.iptables
	sh(t, append([]string{ipt, "-t", "raw", "-D", chainGuard}, guardSpec()...)...)
	if !attack("unguarded") {
		t.Fatal("without the guard the neighbour's datagram to 127.0.0.1 did not arrive: the test shows nothing")
	}
	if ok, _ := tab.Check(ctx); ok {
		t.Log("Check looks at jumps and canary only; Ensure repairs the chain itself")
	}
	if err := tab.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if attack("guarded") {
		t.Fatal("guarded: the neighbour's datagram reached 127.0.0.1:7777")
	}
	// and localhost DNAT still works through the guard (replies pass)
	if got, err := talk(nil, "127.0.0.1:8080"); err != nil || got != "ctr hello\n" {
		t.Errorf("localhost through guard: %q, %v", got, err)
	}
}

func TestKernelUDPConntrack(t *testing.T) {
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoConntrackFlush=%v", keep), func(t *testing.T) {
			tab := newTable(t, Options{NoConntrackFlush: keep})
			ctx := context.Background()
			enableForwarding(t)
			n := 31
			if keep {
				n = 41
			}
			a, b, client := netns.NewPeer(t, n), netns.NewPeer(t, n+1), netns.NewPeer(t, n+2)
			serveUDP(t, a, ":53", "A")
			serveUDP(t, b, ":53", "B")
			ma := mp("udp", "0.0.0.0", 5353, a.Addr, 53, "aaaaaaaaaaaa")
			mb := mp("udp", "0.0.0.0", 5353, b.Addr, 53, "bbbbbbbbbbbb")
			if err := tab.Apply(ctx, []forward.Mapping{ma}, nil); err != nil {
				t.Fatal(err)
			}
			var conn net.Conn
			if err := client.Do(func() (err error) {
				conn, err = net.Dial("udp", net.JoinHostPort(client.LocalAddr, "5353"))
				return
			}); err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ask := func() string {
				conn.Write([]byte("q"))
				conn.SetReadDeadline(time.Now().Add(time.Second))
				buf := make([]byte, 100)
				n, err := conn.Read(buf)
				if err != nil {
					return err.Error()
				}
				return string(buf[:n])
			}
			if got := ask(); got != "A q" {
				t.Fatalf("first answer %q", got)
			}
			if err := tab.Apply(ctx, []forward.Mapping{mb}, []forward.Mapping{ma}); err != nil {
				t.Fatal(err)
			}
			want := "B q"
			if keep {
				want = "A q" // the old binding stays: this is why berth flushes
			}
			if got := ask(); got != want {
				t.Fatalf("after the change the same socket got %q, want %q", got, want)
			}
		})
	}
}
