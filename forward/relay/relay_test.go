package relay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/forward/sockets"
	"github.com/berth-dev/berth/test/netns"
)

func TestMain(m *testing.M) { os.Exit(netns.Run(m)) }

var ip = netip.MustParseAddr

func TestConformance(t *testing.T) {
	for _, tc := range []struct{ name, key, client, target string }{
		{"v4 wildcard", "0.0.0.0", "127.0.0.1", "127.0.0.1"},
		{"v4 address", "127.0.0.1", "127.0.0.1", "127.0.0.1"},
		{"v6 wildcard to v4", "::", "::1", "127.0.0.1"},
		{"v6 to v6", "::1", "::1", "::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forwardtest.Run(t, func(t *testing.T) forwardtest.Env {
				netns.Require(t)
				r := New(Options{DialTimeout: time.Second})
				t.Cleanup(func() { r.Close() })
				return forwardtest.Env{
					Forwarder: r,
					Mode:      forward.ModeRelay,
					KeyIP:     ip(tc.key),
					ClientIP:  ip(tc.client),
					TargetIP:  ip(tc.target),
				}
			})
		})
	}
}

// newRelay starts a relay that the test closes.
func newRelay(t *testing.T, o Options) *Relay {
	t.Helper()
	netns.Require(t)
	r := New(o)
	t.Cleanup(func() { r.Close() })
	return r
}

func mapping(proto forward.Proto, host string, target netip.AddrPort) forward.Mapping {
	return forward.Mapping{
		Key:           forward.Key{Proto: proto, HostIP: ip(host), HostPort: forwardtest.Port()},
		ContainerIP:   target.Addr(),
		ContainerPort: target.Port(),
		ContainerID:   "c0ffee",
		Mode:          forward.ModeRelay,
	}
}

func mustApply(t *testing.T, r *Relay, add, remove []forward.Mapping) {
	t.Helper()
	if err := r.Apply(context.Background(), add, remove); err != nil {
		t.Fatal(err)
	}
}

// lineEcho is a TCP server on 127.0.0.1 that echoes everything it gets
// until the client half-closes, then closes.
func lineEcho(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	forwardtest.Serve(t, ln, func(c net.Conn) {
		// Plain read and write: Go's splice would keep pipes of its
		// own, which TestSplicePipesBounded counts.
		io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c})
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// udpEcho answers every datagram with itself.
func udpEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Allocation-free, for TestUDPHotPathAllocations.
	forwardtest.ServeUDP(t, pc.(*net.UDPConn), func(p []byte) []byte { return p })
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func hostAddr(client string, m forward.Mapping) string {
	return netip.AddrPortFrom(ip(client), m.HostPort).String()
}

// roundTrip writes a line and reads it back.
func roundTrip(c net.Conn, s string) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, s+"\n"); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != s+"\n" {
		return fmt.Errorf("got %q, want %q", got, s)
	}
	return nil
}

// udpRoundTrip sends s and expects it back.
func udpRoundTrip(c net.Conn, s string) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, s); err != nil {
		return err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != s {
		return fmt.Errorf("got %q, want %q", buf[:n], s)
	}
	return nil
}

// relayed adds a TCP mapping to a line echo server and returns it with a
// client connection that has crossed it once (so the relay has accepted it).
func relayed(t *testing.T, r *Relay) (forward.Mapping, net.Conn) {
	t.Helper()
	m := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := roundTrip(c, "hello"); err != nil {
		t.Fatal(err)
	}
	return m, c
}

// expectClosed waits for the relay to end c.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	_, err := c.Read(make([]byte, 1))
	if err == nil {
		t.Fatal("connection still open: read returned data")
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("connection still open after %v", within)
	}
}

// eventually polls cond for up to two seconds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestV6OnlyLeavesIPv4Free(t *testing.T) {
	r := newRelay(t, Options{})
	tm := mapping(forward.TCP, "::", lineEcho(t))
	um := mapping(forward.UDP, "::", udpEcho(t))
	um.HostPort = tm.HostPort
	mustApply(t, r, []forward.Mapping{tm, um}, nil)
	// dockerd (or a NAT mapping) holds 0.0.0.0:P while berth serves [::]:P.
	ln, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", tm.HostPort))
	if err != nil {
		t.Fatalf("IPv4 side of the port taken by the [::] listener: %v", err)
	}
	ln.Close()
	pc, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", um.HostPort))
	if err != nil {
		t.Fatalf("IPv4 side of the UDP port taken by the [::] socket: %v", err)
	}
	pc.Close()
}

// TestIPv6ToIPv4 is the reason the relay exists: an IPv6 client reaches an
// IPv4-only container.
func TestIPv6ToIPv4(t *testing.T) {
	r := newRelay(t, Options{})
	tm := mapping(forward.TCP, "::1", lineEcho(t))
	um := mapping(forward.UDP, "::1", udpEcho(t))
	mustApply(t, r, []forward.Mapping{tm, um}, nil)
	c, err := net.Dial("tcp6", hostAddr("::1", tm))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c, "hello over v6"); err != nil {
		t.Fatal(err)
	}
	u, err := net.Dial("udp6", hostAddr("::1", um))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if err := udpRoundTrip(u, "datagram over v6"); err != nil {
		t.Fatal(err)
	}
}

// proxyEchoTCP reads a PROXY v2 header and answers "src dst".
func proxyEchoTCP(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	forwardtest.Serve(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		h, err := proxyproto.Read(bufio.NewReader(c))
		if err != nil {
			fmt.Fprintf(c, "error %v", err)
			return
		}
		fmt.Fprintf(c, "%s %s", h.SourceAddr, h.DestinationAddr)
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// proxyEchoUDP answers each datagram with "src dst payload" from its header.
func proxyEchoUDP(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	forwardtest.ServeUDP(t, pc.(*net.UDPConn), func(p []byte) []byte {
		br := bufio.NewReader(bytes.NewReader(p))
		h, err := proxyproto.Read(br)
		if err != nil {
			return []byte("error " + err.Error())
		}
		rest, _ := io.ReadAll(br)
		return fmt.Appendf(nil, "%t %s %s %s", h.TransportProtocol.IsDatagram(), h.SourceAddr, h.DestinationAddr, rest)
	})
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestProxyProtocolV2(t *testing.T) {
	r := newRelay(t, Options{})
	for _, tc := range []struct{ key, client string }{
		{"0.0.0.0", "127.0.0.1"}, // wildcard: the destination comes from the socket (TCP) or PKTINFO (UDP)
		{"::", "::1"},
		{"::1", "::1"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			tm := mapping(forward.TCP, tc.key, proxyEchoTCP(t))
			um := mapping(forward.UDP, tc.key, proxyEchoUDP(t))
			tm.ProxyProtocol, um.ProxyProtocol = 2, 2
			mustApply(t, r, []forward.Mapping{tm, um}, nil)
			defer mustApply(t, r, nil, []forward.Mapping{tm, um})

			c, err := net.Dial("tcp", hostAddr(tc.client, tm))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(3 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			if want := c.LocalAddr().String() + " " + hostAddr(tc.client, tm); string(got) != want {
				t.Errorf("tcp: upstream saw %q, want %q", got, want)
			}

			u, err := net.Dial("udp", hostAddr(tc.client, um))
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			u.SetDeadline(time.Now().Add(3 * time.Second))
			for _, p := range []string{"first", "second"} { // every datagram has the header
				if _, err := io.WriteString(u, p); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 2048)
				n, err := u.Read(buf)
				if err != nil {
					t.Fatal(err)
				}
				if want := "true " + u.LocalAddr().String() + " " + hostAddr(tc.client, um) + " " + p; string(buf[:n]) != want {
					t.Errorf("udp: upstream saw %q, want %q", buf[:n], want)
				}
			}
		})
	}
}

func TestBindConflictNamesHolder(t *testing.T) {
	r := newRelay(t, Options{})
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	held := mapping(forward.TCP, "0.0.0.0", lineEcho(t))
	ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", held.HostPort))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	heldU := mapping(forward.UDP, "::", udpEcho(t))
	pc, err := net.ListenPacket("udp6", fmt.Sprintf("[::1]:%d", heldU.HostPort))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	free := mapping(forward.TCP, "127.0.0.1", lineEcho(t))

	err = r.Apply(context.Background(), []forward.Mapping{held, free, heldU}, nil)
	per, batch := forward.SplitErrors(err)
	if batch != nil || len(per) != 2 || per[held] == nil || per[heldU] == nil {
		t.Fatalf("want errors for %s and %s only, got %v", held, heldU, err)
	}
	owner := fmt.Sprintf("held by pid %d (%s)", os.Getpid(), strings.TrimSpace(string(comm)))
	for _, m := range []forward.Mapping{held, heldU} {
		msg := per[m].Error()
		t.Log(msg)
		if !strings.HasPrefix(msg, m.String()+": add: listen: address already in use") || !strings.Contains(msg, owner) {
			t.Errorf("error %q does not say what is in use and %q", msg, owner)
		}
		if !errors.Is(per[m], syscall.EADDRINUSE) {
			t.Errorf("error %q is not EADDRINUSE", msg)
		}
	}
	got, _ := r.List(context.Background())
	if len(got) != 1 || got[0] != free {
		t.Fatalf("List = %v, want only %s", got, free)
	}
}

func TestBindErrorText(t *testing.T) {
	m := forward.Mapping{
		Key:         forward.Key{Proto: forward.TCP, HostIP: ip("0.0.0.0"), HostPort: 8080},
		ContainerIP: ip("172.17.0.2"), ContainerPort: 80, ContainerID: "abc",
	}
	defer func(h func(forward.Proto, netip.Addr, uint16) (sockets.Owner, bool)) { holder = h }(holder)
	for _, tc := range []struct {
		owner sockets.Owner
		found bool
		want  string
	}{
		{sockets.Owner{Pid: 812, Comm: "dockerd"}, true, "tcp 0.0.0.0:8080 -> 172.17.0.2:80 (abc): add: listen: address already in use, held by pid 812 (dockerd); dockerd reserves ports it publishes: use nat mode, or publish through the berth.ports label"},
		{sockets.Owner{Pid: 77, Comm: "nginx"}, true, "tcp 0.0.0.0:8080 -> 172.17.0.2:80 (abc): add: listen: address already in use, held by pid 77 (nginx)"},
		{sockets.Owner{}, false, "tcp 0.0.0.0:8080 -> 172.17.0.2:80 (abc): add: listen: address already in use (holder not found in /proc: a process in another pid namespace?)"},
	} {
		holder = func(forward.Proto, netip.Addr, uint16) (sockets.Owner, bool) { return tc.owner, tc.found }
		err := &forward.MappingError{Mapping: m, Op: "add", Err: bindError(m, &net.OpError{Op: "listen", Net: "tcp4", Err: os.NewSyscallError("bind", syscall.EADDRINUSE)})}
		if err.Error() != tc.want {
			t.Errorf("got  %s\nwant %s", err, tc.want)
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			t.Errorf("%v is not EADDRINUSE", err)
		}
	}
	// Not in use: any other error passes through unchanged.
	other := errors.New("listen tcp4 0.0.0.0:8080: bind: permission denied")
	if got := bindError(m, other); got != other {
		t.Errorf("bindError changed %v into %v", other, got)
	}
}

func TestUDPFlowLimit(t *testing.T) {
	const max, extra = 4, 3
	r := newRelay(t, Options{MaxUDPFlows: max})
	m := mapping(forward.UDP, "127.0.0.1", udpEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	for i := range max + extra {
		c, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if i < max {
			if err := udpRoundTrip(c, fmt.Sprintf("client %d", i)); err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
			continue
		}
		if _, err := io.WriteString(c, "over the limit"); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "drops", func() bool { return r.Stats()[m.Key].Drops == extra })
	st := r.Stats()[m.Key]
	if st.Drops != extra || st.Flows != max {
		t.Fatalf("stats %+v: want %d drops and %d flows", st, extra, max)
	}
}

// flowCount is the size of a mapping's flow table; the active-flows gauge
// in its stats must say the same.
func (r *Relay) flowCount(t *testing.T, k forward.Key) int {
	r.mu.Lock()
	l := r.listeners[k]
	r.mu.Unlock()
	l.loop.mu.Lock()
	defer l.loop.mu.Unlock()
	if n := int(l.stats.activeFlows.Load()); n != len(l.flows) {
		t.Errorf("active UDP flows gauge %d, flow table %d", n, len(l.flows))
	}
	return len(l.flows)
}

func TestUDPIdleTimeout(t *testing.T) {
	r := newRelay(t, Options{UDPIdleTimeout: 200 * time.Millisecond})
	m := mapping(forward.UDP, "0.0.0.0", udpEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	for i := range 3 {
		c, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := udpRoundTrip(c, fmt.Sprint("flow ", i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := r.flowCount(t, m.Key); n != 3 {
		t.Fatalf("%d flows, want 3", n)
	}
	// A flow with traffic outlives the timeout.
	busy, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for range 5 {
		if err := udpRoundTrip(busy, "busy"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(80 * time.Millisecond)
	}
	if n := r.flowCount(t, m.Key); n != 1 {
		t.Fatalf("%d flows after the idle ones expired, want the busy one", n)
	}
	eventually(t, "flows to expire", func() bool { return r.flowCount(t, m.Key) == 0 })
}

// TestUDPBatches: more clients than one recvmmsg batch send at once; each
// gets exactly its own datagrams back, in order, from the published
// address (the replies of many flows leave through one sendmmsg). The last
// round sends the largest IPv4 datagram, from two clients only (a burst of
// those would overflow the default socket buffers, on any relay).
func TestUDPBatches(t *testing.T) {
	r := newRelay(t, Options{})
	m := mapping(forward.UDP, "0.0.0.0", udpEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	const clients = 3 * batch
	sizes := []int{1, 200, 1400, maxUDP - 28}
	cs := make([]*net.UDPConn, clients)
	for i := range cs {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(hostAddr("127.0.0.1", m))))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs[i] = c
	}
	msg := func(i, j int) []byte {
		b := bytes.Repeat([]byte{byte(i)}, sizes[j])
		copy(b, fmt.Sprintf("%d/%d", i, j))
		return b
	}
	buf := make([]byte, maxUDP)
	for j := range sizes {
		senders := cs
		if j == len(sizes)-1 {
			senders = cs[:2]
		}
		// Every client sends before any reads, so datagrams queue up on
		// the listening socket and replies on the flows.
		for i, c := range senders {
			if _, err := c.Write(msg(i, j)); err != nil {
				t.Fatal(err)
			}
		}
		for i, c := range senders {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("client %d, datagram of %d bytes: %v", i, sizes[j], err)
			}
			if want := hostAddr("127.0.0.1", m); from.String() != want {
				t.Errorf("client %d: reply from %s, want %s", i, from, want)
			}
			if want := msg(i, j); !bytes.Equal(buf[:n], want) {
				t.Fatalf("client %d: got %d bytes starting %q, want %d starting %q", i, n, buf[:min(n, 8)], len(want), want[:min(len(want), 8)])
			}
		}
	}
	st := r.Stats()[m.Key]
	if st.ActiveUDP != clients || st.Flows != clients || st.Drops != 0 || st.Errors != 0 {
		t.Errorf("stats %+v: want %d flows open and created, no drops or errors", st, clients)
	}
}

func TestRemoveClosesConnections(t *testing.T) {
	r := newRelay(t, Options{})
	m, c := relayed(t, r)
	mustApply(t, r, nil, []forward.Mapping{m})
	expectClosed(t, c, time.Second)
	eventually(t, "goroutines to end", func() bool { return r.Stats()[m.Key].ActiveTCP == 0 })
}

func TestDrainKeepsConnectionsForAWhile(t *testing.T) {
	const drain = 300 * time.Millisecond
	r := newRelay(t, Options{Drain: drain})
	m := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Open means accepted by the relay: one still in the kernel's backlog
	// is reset when the listening socket closes, as on any server.
	eventually(t, "the relay to accept", func() bool { return r.Stats()[m.Key].Conns == 1 })
	removed := time.Now()
	mustApply(t, r, nil, []forward.Mapping{m})
	if _, err := net.DialTimeout("tcp4", hostAddr("127.0.0.1", m), time.Second); err == nil {
		t.Fatal("new connection accepted after removal")
	}
	if err := roundTrip(c, "during drain"); err != nil {
		t.Fatalf("open connection ended before the drain: %v", err)
	}
	expectClosed(t, c, 2*time.Second)
	if d := time.Since(removed); d < drain {
		t.Fatalf("closed after %v, before the %v drain", d, drain)
	}
}

// TestMoveKeepsListener checks the target swap: the same socket serves the
// new target, and a connection to the old one is ended (Drain 0).
func TestMoveKeepsListener(t *testing.T) {
	r := newRelay(t, Options{})
	old, c := relayed(t, r)
	before := r.listeners[old.Key]
	moved := old
	target := lineEcho(t)
	moved.ContainerIP, moved.ContainerPort = target.Addr(), target.Port()
	mustApply(t, r, []forward.Mapping{moved}, []forward.Mapping{old})
	if r.listeners[old.Key] != before {
		t.Fatal("listener replaced, not switched")
	}
	expectClosed(t, c, time.Second)
	c2, err := net.Dial("tcp4", hostAddr("127.0.0.1", moved))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := roundTrip(c2, "to new"); err != nil {
		t.Fatal(err)
	}
	got, _ := r.List(context.Background())
	if len(got) != 1 || got[0] != moved {
		t.Fatalf("List = %v, want %s", got, moved)
	}
	// Adding the key with a third target without removing the second is a
	// conflict, not a silent replacement.
	third := moved
	third.ContainerPort++
	if err := r.Apply(context.Background(), []forward.Mapping{third}, nil); err == nil || !strings.Contains(err.Error(), "already forwarded") {
		t.Fatalf("conflicting add: %v", err)
	}
}

func TestMaxConns(t *testing.T) {
	r := newRelay(t, Options{MaxConns: 2})
	m := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	for i := range 2 {
		c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := roundTrip(c, fmt.Sprint("conn ", i)); err != nil {
			t.Fatal(err)
		}
	}
	// On loopback the reset may even beat connect(2)'s return.
	if c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m)); err == nil {
		defer c.Close()
		expectClosed(t, c, time.Second)
	}
	eventually(t, "the drop", func() bool { return r.Stats()[m.Key].Drops == 1 })
	if st := r.Stats()[m.Key]; st.Drops != 1 || st.Conns != 2 || st.ActiveTCP != 2 {
		t.Fatalf("stats %+v: want 1 drop, 2 connections open", st)
	}
}

func TestStatsCountBytes(t *testing.T) {
	r := newRelay(t, Options{})
	tm := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	um := mapping(forward.UDP, "127.0.0.1", udpEcho(t))
	mustApply(t, r, []forward.Mapping{tm, um}, nil)

	c, err := net.Dial("tcp4", hostAddr("127.0.0.1", tm))
	if err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", 700<<10) // more than one splice chunk
	if err := roundTrip(c, big); err != nil {
		t.Fatal(err)
	}
	c.Close()
	u, err := net.Dial("udp4", hostAddr("127.0.0.1", um))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for range 3 {
		if err := udpRoundTrip(u, "0123456789"); err != nil {
			t.Fatal(err)
		}
	}
	// Counters move after the write the client may already have seen.
	eventually(t, "the connection to end", func() bool { return r.Stats()[tm.Key].ActiveTCP == 0 })
	eventually(t, "the last datagrams to count", func() bool { s := r.Stats()[um.Key]; return s.BytesIn == 30 && s.BytesOut == 30 })
	ts, us := r.Stats()[tm.Key], r.Stats()[um.Key]
	n := uint64(len(big) + 1)
	if ts.Conns != 1 || ts.BytesIn != n || ts.BytesOut != n || ts.Errors != 0 {
		t.Errorf("tcp stats %+v, want 1 connection, %d bytes each way, no errors", ts, n)
	}
	if us.Flows != 1 || us.BytesIn != 30 || us.BytesOut != 30 || us.Drops != 0 || us.Errors != 0 {
		t.Errorf("udp stats %+v, want 1 flow, 30 bytes each way", us)
	}
}

func TestApplyRejectsBadMappings(t *testing.T) {
	r := newRelay(t, Options{})
	good := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	sctp := mapping(forward.SCTP, "127.0.0.1", netip.MustParseAddrPort("127.0.0.1:9"))
	pp1 := mapping(forward.TCP, "127.0.0.1", netip.MustParseAddrPort("127.0.0.1:9"))
	pp1.ProxyProtocol = 1
	err := r.Apply(context.Background(), []forward.Mapping{sctp, good, pp1}, nil)
	per, batch := forward.SplitErrors(err)
	if batch != nil || len(per) != 2 || per[sctp] == nil || per[pp1] == nil {
		t.Fatalf("got %v", err)
	}
	got, _ := r.List(context.Background())
	if len(got) != 1 || got[0] != good {
		t.Fatalf("List = %v, want %s", got, good)
	}
}

// TestKeepAliveOnClientLeg: the accepted (client) socket carries the
// keep-alive that was set once on the listening socket.
func TestKeepAliveOnClientLeg(t *testing.T) {
	r := newRelay(t, Options{})
	m, _ := relayed(t, r)
	r.mu.Lock()
	l := r.listeners[m.Key]
	r.mu.Unlock()
	l.mu.Lock()
	var got [][2]int
	for tc := range l.conns {
		raw, err := tc.client.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		raw.Control(func(fd uintptr) {
			for _, o := range [][2]int{{unix.SOL_SOCKET, unix.SO_KEEPALIVE}, {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE}, {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL}, {unix.IPPROTO_TCP, unix.TCP_KEEPCNT}} {
				v, err := unix.GetsockoptInt(int(fd), o[0], o[1])
				if err != nil {
					t.Error(err)
				}
				got = append(got, [2]int{o[1], v})
			}
		})
	}
	l.mu.Unlock()
	want := [][2]int{{unix.SO_KEEPALIVE, 1}, {unix.TCP_KEEPIDLE, keepIdle}, {unix.TCP_KEEPINTVL, keepIntvl}, {unix.TCP_KEEPCNT, keepCnt}}
	if !slices.Equal(got, want) {
		t.Fatalf("client leg socket options (option, value) = %v, want %v", got, want)
	}
}

// pipeFDs counts this process's open pipes.
func pipeFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			n++
		}
	}
	return n
}

// TestSplicePipesBounded: a burst of concurrent connections uses a pipe per
// direction each; once they end, at most maxIdlePipes stay open for reuse.
func TestSplicePipesBounded(t *testing.T) {
	r := newRelay(t, Options{})
	m := mapping(forward.TCP, "127.0.0.1", lineEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	// Start from an empty pool: earlier tests leave pipes in it.
	pipePool.mu.Lock()
	for _, p := range pipePool.free {
		unix.Close(p.r)
		unix.Close(p.w)
	}
	pipePool.free = nil
	pipePool.mu.Unlock()
	before := pipeFDs(t)
	const conns = 150
	cs := make([]net.Conn, 0, conns)
	for i := range conns {
		c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
		if err := roundTrip(c, fmt.Sprint("conn ", i)); err != nil {
			t.Fatal(err)
		}
	}
	if during := pipeFDs(t) - before; during < 2*2*conns {
		t.Fatalf("%d connections open with %d pipe fds, want 2 pipes (4 fds) each", conns, during)
	}
	for _, c := range cs {
		c.Close()
	}
	eventually(t, "connections to end", func() bool { return r.Stats()[m.Key].ActiveTCP == 0 })
	if after := pipeFDs(t) - before; after > 2*maxIdlePipes {
		t.Fatalf("%d pipe fds left after all connections ended, want at most %d (the idle pool)", after, 2*maxIdlePipes)
	}
}

// TestAcceptAfterBurstEnds: an accept burst hands the socket back to the
// poll loop after acceptLinger; connections after that are still accepted
// (the loop's one-shot watch was re-armed), and the burst's goroutine is
// gone in between.
func TestAcceptAfterBurstEnds(t *testing.T) {
	r := newRelay(t, Options{})
	m, _ := relayed(t, r)
	idle := func() bool { // no goroutine is in acceptBurst (a frame, not a "created by" line)
		buf := make([]byte, 1<<20)
		return !bytes.Contains(buf[:runtime.Stack(buf, true)], []byte("relay.(*listener).acceptBurst("))
	}
	for round := range 3 {
		deadline := time.Now().Add(acceptLinger + 2*time.Second)
		for !idle() {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: accept burst still running %v after the last connection", round, acceptLinger+2*time.Second)
			}
			time.Sleep(50 * time.Millisecond)
		}
		c, err := net.Dial("tcp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, fmt.Sprint("after burst ", round)); err != nil {
			t.Fatalf("round %d: connection after the burst ended: %v", round, err)
		}
		c.Close()
	}
	if got := r.Stats()[m.Key].Conns; got != 4 {
		t.Fatalf("%d connections accepted, want 4", got)
	}
}

// TestLoopsSpreadMappings: mappings spread over up to GOMAXPROCS poll
// loops, the least loaded first, and each forwards on its own loop.
func TestLoopsSpreadMappings(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	r := newRelay(t, Options{})
	target := udpEcho(t)
	var ms []forward.Mapping
	for range 4 {
		m := mapping(forward.UDP, "127.0.0.1", target)
		mustApply(t, r, []forward.Mapping{m}, nil)
		ms = append(ms, m)
	}
	counts := func() []int {
		r.mu.Lock()
		defer r.mu.Unlock()
		var n []int
		for _, lp := range r.loops {
			n = append(n, lp.listeners)
		}
		return n
	}
	if got := counts(); !slices.Equal(got, []int{2, 2}) {
		t.Fatalf("listeners per loop %v, want [2 2]", got)
	}
	for i, m := range ms {
		c, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := udpRoundTrip(c, fmt.Sprint("mapping ", i)); err != nil {
			t.Fatalf("mapping %d: %v", i, err)
		}
	}
	// Removing both of one loop's mappings makes it the one the next goes to.
	first := r.listeners[ms[0].Key].loop
	var gone []forward.Mapping
	for _, m := range ms {
		if r.listeners[m.Key].loop == first {
			gone = append(gone, m)
		}
	}
	mustApply(t, r, nil, gone)
	next := mapping(forward.UDP, "127.0.0.1", target)
	mustApply(t, r, []forward.Mapping{next}, nil)
	if r.listeners[next.Key].loop != first || len(r.loops) != 2 {
		t.Fatalf("new mapping went to another loop (or a third loop: %d)", len(r.loops))
	}
}

// TestUDPRepliesFromTheAddressUsed: on a wildcard socket each reply leaves
// from the address its client sent to (PKTINFO), not the one routing would
// pick; a connected client socket takes nothing else. IPv4 and IPv6, two
// local addresses each.
func TestUDPRepliesFromTheAddressUsed(t *testing.T) {
	netns.Require(t) // adds an address to lo: only in the test's own namespace
	if out, err := exec.Command("ip", "addr", "add", "fd00:be27::1/128", "dev", "lo", "nodad").CombinedOutput(); err != nil && !strings.Contains(string(out), "exists") {
		t.Fatalf("ip addr add: %v: %s", err, out)
	}
	r := newRelay(t, Options{})
	target := udpEcho(t)
	v4 := mapping(forward.UDP, "0.0.0.0", target)
	v6 := mapping(forward.UDP, "::", target)
	mustApply(t, r, []forward.Mapping{v4, v6}, nil)
	for _, tc := range []struct {
		m    forward.Mapping
		dial string
	}{{v4, "127.0.0.1"}, {v4, "127.0.0.2"}, {v6, "::1"}, {v6, "fd00:be27::1"}} {
		to := netip.AddrPortFrom(netip.MustParseAddr(tc.dial), tc.m.HostPort)
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := udpRoundTrip(c, "to "+tc.dial); err != nil {
			t.Errorf("client of %s: %v (a reply from another address is not taken)", to, err)
		}
	}
}

// TestUDPKernelDropsCounted: datagrams the kernel drops because the
// listening socket's buffer is full (the loop held up here) show in Stats.
func TestUDPKernelDropsCounted(t *testing.T) {
	r := newRelay(t, Options{})
	m := mapping(forward.UDP, "127.0.0.1", udpEcho(t))
	mustApply(t, r, []forward.Mapping{m}, nil)
	c, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lp := r.listeners[m.Key].loop
	lp.mu.Lock() // the loop cannot read while the test holds its mutex
	big := make([]byte, 32<<10)
	const sent = 64 // 2 MiB: far past the default receive buffer
	for range sent {
		if _, err := c.Write(big); err != nil {
			lp.mu.Unlock()
			t.Fatal(err)
		}
	}
	lp.mu.Unlock()
	// The count rides on datagrams queued after the drops (the kernel
	// stamps each as it queues it): send more until one gets in.
	eventually(t, "kernel drops in stats", func() bool {
		c.Write([]byte("after the burst"))
		return r.Stats()[m.Key].KernelDrops > 0
	})
	st := r.Stats()[m.Key]
	if st.KernelDrops >= sent {
		t.Fatalf("stats %+v: %d kernel drops of %d sent", st, st.KernelDrops, sent)
	}
	t.Logf("%d of %d datagrams dropped by the kernel at the listening socket", st.KernelDrops, sent)
}
