// Package forwardtest is the conformance suite every forward.Forwarder runs
// on a real kernel: bytes must really cross, from a client to an echo server
// behind the mapping, and List must tell the truth. A backend's test calls
// Run with a Factory that builds the backend and describes the network
// around it (where clients connect, where servers listen, and in which
// namespace each runs).
package forwardtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
)

// Env is one backend under test and the network around it. Only Forwarder,
// Mode, KeyIP and TargetIP are required.
type Env struct {
	Forwarder forward.Forwarder
	// Mode is set on every mapping the suite installs.
	Mode forward.Mode
	// Protos the backend forwards; default TCP and UDP.
	Protos []forward.Proto
	// KeyIP is the HostIP of the mappings; it may be a wildcard.
	KeyIP netip.Addr
	// ClientIP is the address clients connect to: an address of the host
	// that KeyIP covers. Default KeyIP.
	ClientIP netip.Addr
	// TargetIP is the container side: echo servers listen there and
	// mappings point there. Its family may differ from KeyIP's.
	TargetIP netip.Addr
	// ListenTCP and ListenUDP start the echo servers; default net.Listen
	// and net.ListenPacket in the test's namespace. A NAT backend starts
	// them in a peer namespace (netns.Peer.Do).
	ListenTCP func(addr netip.AddrPort) (net.Listener, error)
	ListenUDP func(addr netip.AddrPort) (net.PacketConn, error)
	// Dial opens client sockets; network is "tcp" or "udp". Default a
	// net.Dialer in the test's namespace.
	Dial func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error)
}

// Factory builds a fresh backend for one subtest. It registers its own
// cleanup (closing the backend) with t.Cleanup; the suite removes the
// mappings it added before that cleanup runs.
type Factory func(t *testing.T) Env

// Timeouts keep a broken backend from hanging the suite.
const (
	ioTimeout     = 3 * time.Second
	refuseTimeout = 500 * time.Millisecond // how long "no longer forwarded" waits
)

// Ports come from one counter for the whole test binary, so no two subtests
// (nor two Runs) reuse a port and a stale conntrack entry or TIME_WAIT socket
// of an earlier case cannot pass or fail a later one. The range is below the
// ephemeral ports (32768+), in the host and in the target namespace.
var nextPort atomic.Uint32

// Port returns a port no other case of this test binary uses.
func Port() uint16 {
	p := 10000 + nextPort.Add(1)
	if p > 32000 {
		panic("forwardtest: out of ports")
	}
	return uint16(p)
}

// Run runs every case against backends from f.
func Run(t *testing.T, f Factory) {
	cases := []struct {
		name string
		fn   func(*testing.T, *suite)
	}{
		{"Forwards", testForwards},
		{"IdempotentAdd", testIdempotentAdd},
		{"Remove", testRemove},
		{"RemoveAbsent", testRemoveAbsent},
		{"MoveTarget", testMoveTarget},
		{"Many", testMany},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.fn(t, newSuite(t, f))
		})
	}
}

// suite is one case's backend, with what it installed.
type suite struct {
	Env
	t         *testing.T
	installed map[forward.Mapping]bool
}

func newSuite(t *testing.T, f Factory) *suite {
	e := f(t)
	if e.Forwarder == nil || !e.KeyIP.IsValid() || !e.TargetIP.IsValid() {
		t.Fatal("forwardtest: Env needs Forwarder, KeyIP and TargetIP")
	}
	if len(e.Protos) == 0 {
		e.Protos = []forward.Proto{forward.TCP, forward.UDP}
	}
	if !e.ClientIP.IsValid() {
		e.ClientIP = e.KeyIP
	}
	if e.ListenTCP == nil {
		e.ListenTCP = func(a netip.AddrPort) (net.Listener, error) { return net.Listen("tcp", a.String()) }
	}
	if e.ListenUDP == nil {
		e.ListenUDP = func(a netip.AddrPort) (net.PacketConn, error) { return net.ListenPacket("udp", a.String()) }
	}
	if e.Dial == nil {
		e.Dial = func(ctx context.Context, network string, a netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, a.String())
		}
	}
	s := &suite{Env: e, t: t, installed: map[forward.Mapping]bool{}}
	// Registered after the factory's cleanups, so it runs before them.
	t.Cleanup(func() {
		var rm []forward.Mapping
		for m := range s.installed {
			rm = append(rm, m)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Forwarder.Apply(ctx, nil, rm); err != nil {
			t.Errorf("cleanup: removing %d mappings: %v", len(rm), err)
		}
	})
	return s
}

// mapping returns a mapping from a fresh host port to target, with an echo
// server named name behind it.
func (s *suite) mapping(proto forward.Proto, name string) (forward.Mapping, netip.AddrPort) {
	target := netip.AddrPortFrom(s.TargetIP, Port())
	s.echo(proto, target, name)
	return forward.Mapping{
		Key:           forward.Key{Proto: proto, HostIP: s.KeyIP, HostPort: Port()},
		ContainerIP:   target.Addr(),
		ContainerPort: target.Port(),
		ContainerID:   name,
		Mode:          s.Mode,
	}, target
}

// apply runs Apply and fails the test on any error.
// onePerProto makes a mapping (and its server) for each protocol under
// test, named prefix-proto.
func (s *suite) onePerProto(prefix string) []forward.Mapping {
	var ms []forward.Mapping
	for _, p := range s.Protos {
		m, _ := s.mapping(p, prefix+"-"+string(p))
		ms = append(ms, m)
	}
	return ms
}

func (s *suite) apply(add, remove []forward.Mapping) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := s.Forwarder.Apply(ctx, add, remove)
	for _, m := range remove {
		delete(s.installed, m)
	}
	for _, m := range add {
		s.installed[m] = true
	}
	if err != nil {
		s.t.Fatalf("Apply(add %d, remove %d): %v", len(add), len(remove), err)
	}
}

// expectList checks that List returns exactly want, in any order.
func (s *suite) expectList(want ...forward.Mapping) {
	s.t.Helper()
	got, err := s.Forwarder.List(context.Background())
	if err != nil {
		s.t.Fatalf("List: %v", err)
	}
	key := func(m forward.Mapping) string { return m.String() + " " + string(m.Mode) }
	g, w := make([]string, len(got)), make([]string, len(want))
	for i, m := range got {
		g[i] = key(m)
	}
	for i, m := range want {
		w[i] = key(m)
	}
	slices.Sort(g)
	slices.Sort(w)
	if !slices.Equal(g, w) {
		s.t.Fatalf("List:\n got  %q\n want %q", g, w)
	}
	for _, m := range want { // String() omits nothing that matters, but be exact
		if !slices.Contains(got, m) {
			s.t.Fatalf("List lacks %#v", m)
		}
	}
}

// host is where clients reach m.
func (s *suite) host(m forward.Mapping) netip.AddrPort {
	return netip.AddrPortFrom(s.ClientIP, m.HostPort)
}

// payload is distinct per mapping and case so a mis-route shows.
func payload(tag string, size int) string {
	var b strings.Builder
	for i := 0; b.Len() < size; i++ {
		fmt.Fprintf(&b, "%s.%d;", tag, i)
	}
	return b.String()[:size]
}

// expect checks that a request through m is answered by the echo server
// named name.
func (s *suite) expect(m forward.Mapping, name string) {
	s.t.Helper()
	var got string
	var err error
	p := payload(m.String(), 4096)
	if m.Proto == forward.UDP {
		p = p[:512]
		got, err = s.udpOnce(s.host(m), p)
	} else {
		got, err = s.tcpOnce(s.host(m), p)
	}
	if err != nil {
		s.t.Fatalf("%s: %v", m, err)
	}
	if want := name + ":" + p; got != want {
		s.t.Fatalf("%s: reply %.60q... (%d bytes), want one from echo server %q (%d bytes)", m, got, len(got), name, len(want))
	}
}

// expectNone checks that m no longer forwards to the server named name.
func (s *suite) expectNone(m forward.Mapping, name string) {
	s.t.Helper()
	p := payload("gone "+m.String(), 256)
	var got string
	var err error
	if m.Proto == forward.UDP {
		got, err = s.udpOnceWait(s.host(m), p, refuseTimeout, 1)
	} else {
		got, err = s.tcpOnceWait(s.host(m), p, refuseTimeout)
	}
	if err == nil && got == name+":"+p {
		s.t.Fatalf("%s: still forwarded to %q after removal", m, name)
	}
}

func (s *suite) tcpOnce(addr netip.AddrPort, p string) (string, error) {
	return s.tcpOnceWait(addr, p, ioTimeout)
}

// tcpOnceWait sends p, half-closes, and reads until the server closes.
func (s *suite) tcpOnceWait(addr netip.AddrPort, p string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := s.Dial(ctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, p); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return "", fmt.Errorf("Dial returned %T, which cannot half-close", c)
	}
	if err := cw.CloseWrite(); err != nil {
		return "", fmt.Errorf("close write: %w", err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return string(b), fmt.Errorf("read: %w", err)
	}
	return string(b), nil
}

func (s *suite) udpOnce(addr netip.AddrPort, p string) (string, error) {
	return s.udpOnceWait(addr, p, time.Second, 3)
}

// udpOnceWait sends p from a new socket and waits for one reply, sending
// again up to tries times.
func (s *suite) udpOnceWait(addr netip.AddrPort, p string, wait time.Duration, tries int) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	c, err := s.Dial(ctx, "udp", addr)
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	return udpExchange(c, p, wait, tries)
}

func udpExchange(c net.Conn, p string, wait time.Duration, tries int) (string, error) {
	buf := make([]byte, 64<<10)
	var err error
	for range tries {
		if _, err = c.Write([]byte(p)); err != nil {
			continue // ECONNREFUSED from an earlier ICMP; try again
		}
		c.SetReadDeadline(time.Now().Add(wait))
		var n int
		for {
			n, err = c.Read(buf)
			// An echo of an earlier try's datagram is as good.
			if err == nil && strings.HasSuffix(string(buf[:n]), ":"+p) {
				return string(buf[:n]), nil
			}
			if err != nil {
				break
			}
		}
	}
	return "", err
}

// echo starts a server at addr that answers name + ":" + request: TCP reads
// until the client's half-close, UDP answers each datagram.
func (s *suite) echo(proto forward.Proto, addr netip.AddrPort, name string) {
	s.t.Helper()
	var wg sync.WaitGroup
	if proto == forward.UDP {
		pc, err := s.ListenUDP(addr)
		if err != nil {
			s.t.Fatalf("echo server %s udp %s: %v", name, addr, err)
		}
		s.t.Cleanup(func() { pc.Close(); wg.Wait() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				pc.WriteTo(append([]byte(name+":"), buf[:n]...), from)
			}
		}()
		return
	}
	ln, err := s.ListenTCP(addr)
	if err != nil {
		s.t.Fatalf("echo server %s tcp %s: %v", name, addr, err)
	}
	s.t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(ioTimeout))
				b, err := io.ReadAll(c)
				if err != nil {
					return
				}
				c.Write(append([]byte(name+":"), b...))
			}()
		}
	}()
}

func testForwards(t *testing.T, s *suite) {
	ms := s.onePerProto("fwd")
	s.apply(ms, nil)
	s.expectList(ms...)
	for _, m := range ms {
		s.expect(m, m.ContainerID)
	}
}

func testIdempotentAdd(t *testing.T, s *suite) {
	ms := s.onePerProto("idem")
	s.apply(ms, nil)
	s.apply(ms, nil)
	s.apply(append(slices.Clone(ms), ms...), nil) // duplicates within a batch too
	s.expectList(ms...)
	for _, m := range ms {
		s.expect(m, m.ContainerID)
	}
}

func testRemove(t *testing.T, s *suite) {
	ms := s.onePerProto("rm")
	s.apply(ms, nil)
	for _, m := range ms {
		s.expect(m, m.ContainerID)
	}
	s.apply(nil, ms)
	s.expectList()
	for _, m := range ms {
		s.expectNone(m, m.ContainerID)
	}
	s.apply(nil, ms) // already gone
	s.expectList()
}

func testRemoveAbsent(t *testing.T, s *suite) {
	kept, _ := s.mapping(s.Protos[0], "kept")
	s.apply([]forward.Mapping{kept}, nil)
	absent := s.onePerProto("absent")
	// Same key as an installed mapping, other target: not installed either.
	other := kept
	other.ContainerPort = Port()
	other.ContainerID = "other"
	absent = append(absent, other)
	s.apply(nil, absent)
	s.expectList(kept)
	s.expect(kept, "kept")
}

// testMoveTarget replaces the container behind a key in one Apply, as when
// a container is recreated: new connections and datagrams, even from a UDP
// client that kept its socket, must reach the new one.
func testMoveTarget(t *testing.T, s *suite) {
	for _, p := range s.Protos {
		t.Run(string(p), func(t *testing.T) {
			s := &suite{Env: s.Env, t: t, installed: s.installed}
			old, _ := s.mapping(p, "old-"+string(p))
			s.apply([]forward.Mapping{old}, nil)
			s.expect(old, old.ContainerID)

			var kept net.Conn // a UDP client that keeps its socket across the move
			pl := payload("kept "+old.String(), 200)
			if p == forward.UDP {
				ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
				defer cancel()
				c, err := s.Dial(ctx, "udp", s.host(old))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				kept = c
				if got, err := udpExchange(c, pl, time.Second, 3); err != nil || got != old.ContainerID+":"+pl {
					t.Fatalf("before the move: %q, %v", got, err)
				}
			}

			moved, _ := s.mapping(p, "new-"+string(p))
			moved.Key = old.Key
			s.apply([]forward.Mapping{moved}, []forward.Mapping{old})
			s.expectList(moved)
			s.expect(moved, moved.ContainerID)
			if kept != nil {
				got, err := udpExchange(kept, pl, time.Second, 3)
				if err != nil || got != moved.ContainerID+":"+pl {
					t.Fatalf("a UDP client that kept its socket still reaches %q after the move (got %.40q, %v): stale flow or conntrack entry", old.ContainerID, got, err)
				}
			}

			s.apply(nil, []forward.Mapping{moved})
			s.expectList()
		})
	}
}

// testMany installs 200 mappings in one Apply and checks a sample, each
// against its own echo server.
func testMany(t *testing.T, s *suite) {
	const n = 200
	ms := make([]forward.Mapping, n)
	for i := range ms {
		ms[i], _ = s.mapping(s.Protos[i%len(s.Protos)], fmt.Sprintf("many-%d", i))
	}
	start := time.Now()
	s.apply(ms, nil)
	t.Logf("Apply of %d mappings: %v", n, time.Since(start))
	s.expectList(ms...)
	for i := 0; i < n; i += 13 {
		s.expect(ms[i], ms[i].ContainerID)
	}
	s.expect(ms[n-1], ms[n-1].ContainerID)
	s.expect(ms[n-2], ms[n-2].ContainerID)
}

// Serve accepts on ln until it is closed (at the end of the test) and runs
// handle on a goroutine of its own for each connection, closing the
// connection when handle returns: the test servers behind a forward.
func Serve(t testing.TB, ln net.Listener, handle func(c net.Conn)) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

// ServeUDP answers each datagram on pc with reply(payload), until pc is
// closed at the end of the test. It allocates nothing per datagram itself,
// so a reply that does not allocate keeps allocation counts clean.
func ServeUDP(t testing.TB, pc *net.UDPConn, reply func(p []byte) []byte) {
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(reply(buf[:n]), from)
		}
	}()
}

// Containers makes the TCP mappings of count synthetic containers with
// ports ports each, numbered from first, as `-p` of a port range publishes
// them: container i at 10.200.x.y, host ports 0.0.0.0:20000+i*ports... to
// container ports 80..., ContainerID idBase+i in 12 hex digits. Benchmarks
// use it for tables of thousands of mappings.
func Containers(first, count, ports int, idBase uint64) []forward.Mapping {
	ms := make([]forward.Mapping, 0, count*ports)
	for i := first; i < first+count; i++ {
		ip := netip.AddrFrom4([4]byte{10, 200, byte(i / 250), byte(i%250 + 2)})
		for j := range ports {
			ms = append(ms, forward.Mapping{
				Key:           forward.Key{Proto: forward.TCP, HostIP: netip.IPv4Unspecified(), HostPort: uint16(20000 + i*ports + j)},
				ContainerIP:   ip,
				ContainerPort: uint16(80 + j),
				ContainerID:   fmt.Sprintf("%012x", idBase+uint64(i)),
				Mode:          forward.ModeNAT,
			})
		}
	}
	return ms
}
