// Package relay forwards host ports to containers in process, replacing
// docker-proxy: one listening socket per mapping, TCP connections spliced
// both ways with half-close kept, UDP datagrams through a flow table with one
// connected upstream socket per client. It owns its listeners and nothing in
// the kernel's tables; it is the backend that can take an IPv6 client to an
// IPv4-only container.
package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/sockets"
)

// Options tune a Relay. Zero values take the defaults. The listen backlog is
// the kernel's (net.core.somaxconn, which Go reads at start).
type Options struct {
	// DialTimeout bounds connecting to the container. Default 5s.
	DialTimeout time.Duration
	// UDPIdleTimeout ends a UDP flow after this long without a datagram
	// either way. Default 90s, docker-proxy's value.
	UDPIdleTimeout time.Duration
	// MaxUDPFlows bounds the flow table of one mapping; datagrams from
	// further clients are dropped and counted. Default 4096.
	MaxUDPFlows int
	// MaxConns bounds the open TCP connections of one mapping; further
	// connections are reset and counted as drops. Default 4096.
	MaxConns int
	// Drain is how long open TCP connections may live on after their
	// mapping is removed or moved to another container. 0 closes them at
	// once.
	Drain time.Duration
}

func (o Options) withDefaults() Options {
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.UDPIdleTimeout <= 0 {
		o.UDPIdleTimeout = 90 * time.Second
	}
	if o.MaxUDPFlows <= 0 {
		o.MaxUDPFlows = 4096
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 4096
	}
	return o
}

// Keep-alive on the client leg of every TCP connection: a peer that
// vanishes without a FIN or RST is noticed within about two minutes instead
// of holding a connection slot (MaxConns) forever. It is set once on the
// listening socket; Linux copies it to every accepted one, which saves four
// setsockopt calls per connection. The container leg has none: a container
// cannot vanish without berth seeing it, and its mapping's removal ends
// those connections.
const (
	keepIdle  = 60 // seconds
	keepIntvl = 15
	keepCnt   = 4
)

// Relay is an in-process forward.Forwarder. Apply and List are for one
// goroutine at a time; Stats may be called concurrently with them.
type Relay struct {
	opts Options

	mu        sync.Mutex
	listeners map[forward.Key]*listener
	draining  map[*listener]struct{} // removed, TCP connections still open
	closed    bool

	wg    sync.WaitGroup // every goroutine the relay started
	loops []*pollLoop    // wait on the listening sockets; see pickLoop
}

var (
	_ forward.Forwarder     = (*Relay)(nil)
	_ forward.StatsReporter = (*Relay)(nil)
)

// New returns a Relay with no mappings.
func New(opts Options) *Relay {
	return &Relay{
		opts:      opts.withDefaults(),
		listeners: map[forward.Key]*listener{},
		draining:  map[*listener]struct{}{},
	}
}

// Apply removes, then adds. A removal whose Key is added again with another
// target keeps the listening socket and switches its target, so there is no
// moment in which the port refuses connections; connections to the old
// target end after Drain, UDP flows to it at once.
func (r *Relay) Apply(ctx context.Context, add, remove []forward.Mapping) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errors.New("relay: closed")
	}
	var errs []error
	adds := map[forward.Key]forward.Mapping{}
	var order []forward.Mapping
	for _, m := range add {
		if prev, dup := adds[m.Key]; dup {
			if prev != m {
				errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: fmt.Errorf("%s is also added as %s in the same batch", m.Key, prev)})
			}
			continue
		}
		adds[m.Key] = m
		order = append(order, m)
	}
	for _, m := range remove {
		l := r.listeners[m.Key]
		if l == nil || *l.mapping.Load() != m {
			continue // absent: nothing to do
		}
		if n, ok := adds[m.Key]; ok && n == m {
			continue // removed and added back: keep it as it is
		} else if ok && check(n) == nil {
			l.swap(n, r.opts.Drain)
			continue
		}
		delete(r.listeners, m.Key)
		r.shutdown(l, r.opts.Drain)
	}
	for _, m := range order {
		if l := r.listeners[m.Key]; l != nil {
			if cur := *l.mapping.Load(); cur != m {
				errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: fmt.Errorf("port already forwarded to %s; remove that mapping first", cur.Target())})
			}
			continue
		}
		if err := ctx.Err(); err != nil {
			errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: err})
			continue
		}
		l, err := r.listen(m)
		if err != nil {
			errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: err})
			continue
		}
		r.listeners[m.Key] = l
	}
	return errors.Join(errs...)
}

// List returns the mappings whose listening sockets are open.
func (r *Relay) List(ctx context.Context) ([]forward.Mapping, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]forward.Mapping, 0, len(r.listeners))
	for _, l := range r.listeners {
		if l.live.Load() {
			out = append(out, *l.mapping.Load())
		}
	}
	slices.SortFunc(out, func(a, b forward.Mapping) int {
		return cmp.Or(a.HostIP.Compare(b.HostIP), cmp.Compare(a.HostPort, b.HostPort), cmp.Compare(a.Proto, b.Proto))
	})
	return out, nil
}

// Stats returns the counters of every installed mapping.
func (r *Relay) Stats() map[forward.Key]forward.Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[forward.Key]forward.Stats, len(r.listeners))
	for k, l := range r.listeners {
		out[k] = l.stats.snapshot()
	}
	return out
}

// Close stops every listener, ends every connection and flow, and waits for
// them. The Relay cannot be used afterwards.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	for k, l := range r.listeners {
		delete(r.listeners, k)
		r.shutdown(l, 0)
	}
	for l := range r.draining {
		l.endAll()
	}
	r.mu.Unlock()
	r.wg.Wait()
	for _, lp := range r.loops {
		lp.close()
	}
	return nil
}

// counters are one mapping's forward.Stats, updated with atomics.
type counters struct {
	conns, bytesIn, bytesOut, flows, drops, errors atomic.Uint64
	kernelDrops                                    atomic.Uint64 // the UDP socket's SO_RXQ_OVFL count
	active, activeFlows                            atomic.Int64
}

func (c *counters) snapshot() forward.Stats {
	return forward.Stats{
		Conns:       c.conns.Load(),
		ActiveTCP:   c.active.Load(),
		BytesIn:     c.bytesIn.Load(),
		BytesOut:    c.bytesOut.Load(),
		Flows:       c.flows.Load(),
		ActiveUDP:   c.activeFlows.Load(),
		KernelDrops: c.kernelDrops.Load(),
		Drops:       c.drops.Load(),
		Errors:      c.errors.Load(),
	}
}

// listener is one mapping's socket and what hangs off it.
type listener struct {
	key  forward.Key
	opts *Options
	wg   *sync.WaitGroup // the relay's
	// mapping is the current target; stored under mu so that a
	// connection or flow registers with the mapping it really uses.
	mapping atomic.Pointer[forward.Mapping]
	stats   counters
	live    atomic.Bool

	tcp  *net.TCPListener
	udp  *udpSocket
	loop *pollLoop // the relay's

	ctx    context.Context // bounds the dials of the mapping's connections
	cancel context.CancelFunc
	stop   chan struct{} // closed before the socket is, to cut a backoff sleep

	accepting sync.WaitGroup // an accept burst (TCP)
	tfd       int            // the TCP socket's fd, watched by the loop
	tgen      uint32         // its epoll token

	mu    sync.Mutex
	ended bool // every connection ended (endAll), new ones too
	conns map[*tcpConn]struct{}
	flows map[netip.AddrPort]*flow // guarded by loop.mu
}

// check rejects mappings the relay cannot serve before touching a socket.
func check(m forward.Mapping) error {
	switch {
	case m.Proto != forward.TCP && m.Proto != forward.UDP:
		return fmt.Errorf("relay forwards tcp and udp, not %q", m.Proto)
	case !m.HostIP.IsValid() || m.HostPort == 0:
		return errors.New("no host address or port")
	case !m.ContainerIP.IsValid() || m.ContainerPort == 0:
		return errors.New("no container address or port")
	case m.ProxyProtocol != 0 && m.ProxyProtocol != 2:
		return fmt.Errorf("PROXY protocol version %d not supported (want 2)", m.ProxyProtocol)
	}
	return nil
}

func (r *Relay) listen(m forward.Mapping) (*listener, error) {
	if err := check(m); err != nil {
		return nil, err
	}
	host := netip.AddrPortFrom(m.HostIP.Unmap(), m.HostPort)
	l := &listener{
		key:   m.Key,
		opts:  &r.opts,
		wg:    &r.wg,
		stop:  make(chan struct{}),
		conns: map[*tcpConn]struct{}{},
	}
	l.mapping.Store(&m)
	lp, err := r.pickLoop()
	if err != nil {
		return nil, err
	}
	l.loop = lp
	l.ctx, l.cancel = context.WithCancel(context.Background())
	switch m.Proto {
	case forward.TCP:
		network := "tcp4"
		if m.Is6() {
			network = "tcp6"
		}
		lc := net.ListenConfig{
			KeepAlive: -1, // set on the listening socket, which accepted ones inherit
			Control:   func(_, _ string, c syscall.RawConn) error { return tcpSockopts(c, m.Is6()) },
		}
		ln, err := lc.Listen(context.Background(), network, host.String())
		if err != nil {
			l.cancel()
			return nil, bindError(m, err)
		}
		l.tcp = ln.(*net.TCPListener)
		if err := lp.watchTCP(l); err != nil {
			l.cancel()
			l.tcp.Close()
			return nil, err
		}
	case forward.UDP:
		if err := lp.listenUDP(l, host); err != nil {
			l.cancel()
			return nil, bindError(m, err)
		}
	}
	l.live.Store(true)
	lp.listeners++
	return l, nil
}

// pickLoop chooses the poll loop for a new listener: the one with the
// fewest, or a new one while there are fewer loops than GOMAXPROCS (at most
// 8) and each has a listener. A loop relays the UDP of its mappings on one
// thread, so mappings spread over loops use more than one CPU, as
// docker-proxy's processes would; a single mapping stays on one. Called
// with r.mu held.
func (r *Relay) pickLoop() (*pollLoop, error) {
	var best *pollLoop
	for _, lp := range r.loops {
		if best == nil || lp.listeners < best.listeners {
			best = lp
		}
	}
	if best != nil && (best.listeners == 0 || len(r.loops) >= min(runtime.GOMAXPROCS(0), 8)) {
		return best, nil
	}
	lp, err := newPollLoop(&r.opts)
	if err != nil {
		return nil, err
	}
	r.loops = append(r.loops, lp)
	return lp, nil
}

// tcpSockopts runs before bind. IPV6_V6ONLY keeps [::]:P off the IPv4 side,
// where dockerd or a NAT mapping may hold 0.0.0.0:P. The keep-alive is the
// one accepted connections inherit.
func tcpSockopts(c syscall.RawConn, v6 bool) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if v6 {
			if serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); serr != nil {
				serr = fmt.Errorf("IPV6_V6ONLY: %w", serr)
				return
			}
		}
		for _, o := range [...][3]int{
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
			{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepIdle},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepIntvl},
			{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepCnt},
		} {
			if serr = unix.SetsockoptInt(int(fd), o[0], o[1], o[2]); serr != nil {
				serr = fmt.Errorf("keep-alive: %w", serr)
				return
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// holder is sockets.Holder; tests stand in for dockerd.
var holder = sockets.Holder

// inUseError is EADDRINUSE with the holder of the port named.
type inUseError struct {
	msg string
	err error
}

func (e *inUseError) Error() string { return e.msg }
func (e *inUseError) Unwrap() error { return e.err }

// bindError names who holds a port the relay could not bind, and what to do
// about it. The relay never falls back to another mode on its own.
func bindError(m forward.Mapping, err error) error {
	if !errors.Is(err, syscall.EADDRINUSE) {
		return err
	}
	msg := "listen: address already in use"
	o, ok := holder(m.Proto, m.HostIP, m.HostPort)
	switch {
	case !ok:
		msg += " (holder not found in /proc: a process in another pid namespace?)"
	case o.Pid == os.Getpid():
		msg += ", held by " + o.String() + ", this process (an overlapping mapping?)"
	case o.Comm == "dockerd" || o.Comm == "docker-proxy":
		msg += ", held by " + o.String() + "; dockerd reserves ports it publishes: use nat mode, or publish through the berth.ports label"
	default:
		msg += ", held by " + o.String()
	}
	return &inUseError{msg: msg, err: err}
}

// swap points the listener at n. Connections and flows still using the old
// mapping are ended: TCP after drain, UDP at once.
func (l *listener) swap(n forward.Mapping, drain time.Duration) {
	if l.udp != nil {
		l.loop.mu.Lock()
		l.mapping.Store(&n)
		cur := l.mapping.Load()
		l.loop.endFlows(l, func(f *flow) bool { return f.m != cur })
		l.loop.mu.Unlock()
		return
	}
	l.mu.Lock()
	l.mapping.Store(&n)
	l.mu.Unlock()
	if drain <= 0 {
		l.endStale()
		return
	}
	time.AfterFunc(drain, l.endStale)
}

// endStale ends the TCP connections registered with a mapping other than
// the current one.
func (l *listener) endStale() {
	l.mu.Lock()
	defer l.mu.Unlock()
	cur := l.mapping.Load()
	for c := range l.conns {
		if c.m != cur {
			c.end()
		}
	}
}

// endAll ends every TCP connection of the listener, and any that is still
// being accepted or dialled.
func (l *listener) endAll() {
	l.cancel()
	l.mu.Lock()
	l.ended = true
	for c := range l.conns {
		c.end()
	}
	l.mu.Unlock()
}

// shutdown closes the listening socket and waits until the port is free.
// UDP flows end at once (their replies would have no socket to leave by);
// TCP connections after drain. Called with r.mu held.
func (r *Relay) shutdown(l *listener, drain time.Duration) {
	l.live.Store(false)
	l.loop.listeners--
	close(l.stop)
	if l.tcp != nil {
		l.loop.unwatchTCP(l)
		l.tcp.Close()
		l.accepting.Wait() // the port is free once no Accept holds the socket
	} else {
		l.loop.closeUDP(l)
	}
	if l.udp != nil || drain <= 0 {
		l.endAll()
		return
	}
	r.draining[l] = struct{}{}
	time.AfterFunc(drain, func() {
		l.endAll()
		r.mu.Lock()
		delete(r.draining, l)
		r.mu.Unlock()
	})
}

// backoff sleeps after a failed accept or read (EMFILE, ENOBUFS) so the loop
// does not spin, and reports false when the listener is stopping.
func (l *listener) backoff(delay *time.Duration) bool {
	*delay = min(max(2**delay, 5*time.Millisecond), time.Second)
	t := time.NewTimer(*delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-l.stop:
		return false
	}
}
