package relay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"
	"unsafe"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/forward"
)

// UDP is relayed by the poll loop itself (see loop.go): it reads a batch of
// client datagrams with one recvmmsg, writes each to its flow's connected
// socket, reads the replies of every flow that has one and sends them back
// with one sendmmsg per listening socket. Nothing on this path parks a
// goroutine, wakes another thread or allocates. A goroutine per socket,
// docker-proxy's shape, spends most of its time there instead: the Go
// scheduler's handoffs (netpoll, futex wake, a second thread spinning) cost
// more than the four system calls a round trip needs. The loop's mutex
// guards every UDP listener's flows.

const (
	headroom = 16 + 36 // PROXY v2 signature+fixed part, IPv6 addresses and ports
	maxUDP   = 65535
	batch    = 16 // datagrams per recvmmsg/sendmmsg
)

// epoch gives flows a cheap monotonic clock for their last activity.
var epoch = time.Now()

func now() int64 { return int64(time.Since(epoch)) }

// udpSocket is a mapping's listening UDP socket.
type udpSocket struct {
	l      *listener
	fd     int
	host   netip.AddrPort // the bound address; unspecified for a wildcard
	gen    uint32         // epoll token; see handle
	paused bool           // reading stopped after an error, until the next sweep
}

// flow is one client's traffic: a connected socket towards the container.
type flow struct {
	l      *listener
	m      *forward.Mapping
	client netip.AddrPort
	fd     int
	gen    uint32
	hdr    []byte              // PROXY v2 header for every datagram, or nil
	oob    []byte              // IP(V6)_PKTINFO that makes replies leave from the address the client used
	last   int64               // now() of the last datagram either way
	to     unix.RawSockaddrAny // client, as sendmmsg takes it
	tolen  uint32
}

// slot is one datagram of a recvmmsg or sendmmsg batch and its buffer.
type slot struct {
	buf []byte // headroom + maxUDP; the payload starts at headroom
	rsa unix.RawSockaddrAny
	oob [64]byte
	iov unix.Iovec
	to  *udpSocket // replies: the socket it leaves by (their address and PKTINFO are the flow's)
}

// initSlots points every batch header at its slot's buffer, address and
// control space, once; a batch then only resets the lengths the kernel
// overwrote.
func (lp *pollLoop) initSlots() {
	for i := range batch {
		in, out := &lp.in[i], &lp.out[i]
		in.iov.Base = &in.buf[headroom]
		in.iov.SetLen(maxUDP)
		lp.inh[i].hdr = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&in.rsa)), Iov: &in.iov, Control: &in.oob[0]}
		lp.inh[i].hdr.SetIovlen(1)
		out.iov.Base = &out.buf[0]
		lp.outh[i].hdr = unix.Msghdr{Iov: &out.iov}
		lp.outh[i].hdr.SetIovlen(1)
	}
}

// mmsghdr is struct mmsghdr; Go pads it as C does.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// listenUDP opens and binds a mapping's UDP socket and adds it to the loop.
func (lp *pollLoop) listenUDP(l *listener, host netip.AddrPort) error {
	fd, err := socket(host.Addr(), unix.SOCK_DGRAM)
	if err != nil {
		return err
	}
	if err := udpSockopts(fd, host.Addr().Is6(), host.Addr().IsUnspecified()); err != nil {
		unix.Close(fd)
		return err
	}
	if err := unix.Bind(fd, sockaddr(host)); err != nil {
		unix.Close(fd)
		return fmt.Errorf("listen udp %s: bind: %w", host, err)
	}
	lp.mu.Lock()
	defer lp.mu.Unlock()
	s := &udpSocket{l: l, fd: fd, host: host}
	if s.gen, err = lp.register(fd, unix.EPOLLIN, handle{s: s}); err != nil {
		unix.Close(fd)
		return err
	}
	l.udp = s
	l.flows = map[netip.AddrPort]*flow{}
	return nil
}

// closeUDP closes a listening socket, so the port is free when it returns,
// and ends its flows.
func (lp *pollLoop) closeUDP(l *listener) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if l.udp.fd >= 0 {
		lp.unregister(l.udp.fd)
		l.udp.fd = -1
	}
	lp.endFlows(l, func(*flow) bool { return true })
}

// endFlows ends the flows of l for which end is true. Called with lp.mu held.
func (lp *pollLoop) endFlows(l *listener, end func(*flow) bool) {
	for k, f := range l.flows {
		if end(f) {
			delete(l.flows, k)
			lp.unregister(f.fd)
			f.fd = -1
			lp.flows--
			l.stats.activeFlows.Add(-1)
		}
	}
}

// fromClients reads one batch of datagrams from a listening socket and
// sends each into its client's flow.
func (lp *pollLoop) fromClients(s *udpSocket) {
	l := s.l
	for i := range lp.inh { // the rest of the headers is set once (initSlots)
		lp.inh[i].hdr.Namelen = unix.SizeofSockaddrAny
		lp.inh[i].hdr.SetControllen(len(lp.in[i].oob))
	}
	r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(s.fd), uintptr(unsafe.Pointer(&lp.inh[0])), batch, unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		if e != unix.EAGAIN && e != unix.EINTR {
			l.stats.errors.Add(1)
			lp.pause(s)
		}
		return
	}
	// The kernel's drop count for the socket rides on every datagram; the
	// batch's last has the latest.
	if r > 0 {
		last := &lp.inh[r-1]
		if c := parseControl(lp.in[r-1].oob[:min(int(last.hdr.Controllen), len(lp.in[r-1].oob))]); c.drops > 0 {
			l.stats.kernelDrops.Store(uint64(c.drops))
		}
	}
	t := now()
	for i := range int(r) {
		sl, h := &lp.in[i], &lp.inh[i]
		from := fromSockaddr(&sl.rsa)
		f := l.flows[from]
		if f == nil {
			if len(l.flows) >= l.opts.MaxUDPFlows {
				l.stats.drops.Add(1)
				continue
			}
			var err error
			if f, err = lp.newFlow(s, from, parseControl(sl.oob[:min(int(h.hdr.Controllen), len(sl.oob))])); err != nil {
				l.stats.errors.Add(1)
				continue
			}
		}
		f.last = t
		out := sl.buf[headroom-len(f.hdr) : headroom+int(h.len)]
		copy(out, f.hdr)
		if _, err := unix.Write(f.fd, out); err != nil {
			// ECONNREFUSED: an ICMP error from an earlier datagram (the
			// container's port is closed); the flow stays.
			l.stats.errors.Add(1)
			continue
		}
		l.stats.bytesIn.Add(uint64(h.len))
	}
}

// newFlow opens a connected socket to the container for a new client.
// The flow registers with the mapping current at this moment (see swap).
func (lp *pollLoop) newFlow(s *udpSocket, client netip.AddrPort, c control) (*flow, error) {
	l := s.l
	m := l.mapping.Load()
	target := m.Target()
	fd, err := socket(target.Addr(), unix.SOCK_DGRAM)
	if err != nil {
		return nil, err
	}
	if err := unix.Connect(fd, sockaddr(target)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect %s: %w", target, err)
	}
	f := &flow{l: l, m: m, client: client, fd: fd}
	f.tolen = rawSockaddr(client, &f.to)
	dst := c.dst
	if c.hasDst {
		if dst.Is4() {
			f.oob = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.As4()})
		} else {
			pi := unix.Inet6Pktinfo{Addr: dst.As16()}
			if dst.IsLinkLocalUnicast() {
				pi.Ifindex = uint32(c.ifindex)
			}
			f.oob = unix.PktInfo6(&pi)
		}
	} else {
		dst = s.host.Addr()
	}
	if m.ProxyProtocol == 2 {
		h := proxyproto.HeaderProxyFromAddrs(2, net.UDPAddrFromAddrPort(client), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, s.host.Port())))
		if f.hdr, err = h.Format(); err != nil || len(f.hdr) > headroom {
			unix.Close(fd)
			return nil, errors.Join(err, errors.New("PROXY header does not fit"))
		}
	}
	if f.gen, err = lp.register(fd, unix.EPOLLIN, handle{f: f}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if lp.flows == 0 && lp.paused == 0 {
		lp.sweepAt = now() + int64(lp.sweepEvery())
	}
	lp.flows++
	l.flows[client] = f
	l.stats.flows.Add(1)
	l.stats.activeFlows.Add(1)
	return f, nil
}

// fromContainer reads one reply of a flow and queues it to leave by the
// listening socket, from the address the client sent to.
func (lp *pollLoop) fromContainer(f *flow) {
	if f.l.udp.fd < 0 {
		return
	}
	sl := &lp.out[lp.nout]
	n, err := unix.Read(f.fd, sl.buf)
	if err != nil {
		if err != unix.EAGAIN && err != unix.EINTR {
			// ECONNREFUSED: the container's port was closed (ICMP); the
			// flow stays, the client may retry.
			f.l.stats.errors.Add(1)
		}
		return
	}
	f.last = now()
	sl.to = f.l.udp
	sl.iov.SetLen(n)
	h := &lp.outh[lp.nout]
	h.hdr.Name, h.hdr.Namelen = (*byte)(unsafe.Pointer(&f.to)), f.tolen
	h.hdr.Control = nil
	h.hdr.SetControllen(0)
	if len(f.oob) > 0 {
		h.hdr.Control = &f.oob[0]
		h.hdr.SetControllen(len(f.oob))
	}
	lp.nout++
	if lp.nout == batch {
		lp.flush()
	}
}

// flush sends the queued replies, one sendmmsg per run of replies that
// leave by the same socket.
func (lp *pollLoop) flush() {
	for i := 0; i < lp.nout; {
		s := lp.out[i].to
		j := i + 1
		for j < lp.nout && lp.out[j].to == s {
			j++
		}
		for i < j {
			r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(s.fd), uintptr(unsafe.Pointer(&lp.outh[i])), uintptr(j-i), unix.MSG_DONTWAIT, 0, 0)
			if e != 0 || r == 0 {
				// The first datagram failed (EAGAIN: the socket's send
				// buffer is full; or the client is unreachable): drop it,
				// as a full queue would, and go on with the rest.
				s.l.stats.errors.Add(1)
				i++
				continue
			}
			for k := i; k < i+int(r); k++ {
				s.l.stats.bytesOut.Add(uint64(lp.out[k].iov.Len))
			}
			i += int(r)
		}
	}
	lp.nout = 0
}

// pause stops reading a listening socket that failed (ENOMEM, ENOBUFS) until
// the next sweep, so a lasting error does not spin the loop.
func (lp *pollLoop) pause(s *udpSocket) {
	ev := unix.EpollEvent{Fd: int32(s.fd), Pad: int32(s.gen)}
	if unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_MOD, s.fd, &ev) == nil {
		s.paused = true
		lp.paused++
		lp.sweepAt = min(lp.sweepAt, now()+int64(10*time.Millisecond))
	}
}

// sweepEvery is how often idle flows are looked for: a quarter of the idle
// timeout, between 10 ms and one second.
func (lp *pollLoop) sweepEvery() time.Duration {
	return min(max(lp.opts.UDPIdleTimeout/4, 10*time.Millisecond), time.Second)
}

// sweep ends the flows idle for UDPIdleTimeout and resumes paused sockets.
// Called with lp.mu held.
func (lp *pollLoop) sweep(t int64) {
	lp.sweepAt = t + int64(lp.sweepEvery())
	idle := int64(lp.opts.UDPIdleTimeout)
	stale := func(f *flow) bool { return t-f.last >= idle }
	// Every open UDP listener has one handle, and its flows are in its
	// table: the listening sockets' handles reach every flow once.
	for _, h := range lp.handles {
		if h.s == nil {
			continue
		}
		if h.s.paused {
			h.s.paused = false
			lp.paused--
			ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(h.s.fd), Pad: int32(h.s.gen)}
			unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_MOD, h.s.fd, &ev)
		}
		lp.endFlows(h.s.l, stale)
	}
}

// socket opens a non-blocking socket of addr's family.
func socket(addr netip.Addr, typ int) (int, error) {
	family := unix.AF_INET
	if addr.Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

// udpSockopts: IPV6_V6ONLY keeps [::]:P off the IPv4 side, where dockerd
// or a NAT mapping may hold 0.0.0.0:P. SO_RXQ_OVFL reports the datagrams
// the kernel dropped because the socket's receive buffer was full, which
// Stats shows (raise net.core.rmem_default when it grows). PKTINFO on a
// wildcard socket tells which local address a datagram was sent to, so
// replies leave from that address and not whatever the routing table picks.
func udpSockopts(fd int, v6, wildcard bool) error {
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fmt.Errorf("IPV6_V6ONLY: %w", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RXQ_OVFL, 1); err != nil {
		return fmt.Errorf("SO_RXQ_OVFL: %w", err)
	}
	if !wildcard {
		return nil
	}
	var err error
	if v6 {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
	} else {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
	}
	if err != nil {
		return fmt.Errorf("PKTINFO: %w", err)
	}
	return nil
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if z := ap.Addr().Zone(); z != "" {
		id, _ := strconv.ParseUint(z, 10, 32)
		sa.ZoneId = uint32(id)
	}
	return sa
}

// rawSockaddr writes ap into rsa for a sendmmsg header and returns its length.
func rawSockaddr(ap netip.AddrPort, rsa *unix.RawSockaddrAny) uint32 {
	port := ap.Port()
	if ap.Addr().Is4() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		*sa = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ap.Addr().As4()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		return unix.SizeofSockaddrInet4
	}
	sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
	if z := ap.Addr().Zone(); z != "" {
		id, _ := strconv.ParseUint(z, 10, 32)
		sa.Scope_id = uint32(id)
	}
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(port>>8), byte(port)
	return unix.SizeofSockaddrInet6
}

// fromSockaddr is the sender recvmmsg wrote into rsa.
func fromSockaddr(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		ip := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			ip = ip.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(ip, uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// control is what the control messages of one datagram say.
type control struct {
	dst     netip.Addr // the local address it was sent to (PKTINFO, wildcard sockets only)
	ifindex int
	hasDst  bool
	drops   uint32 // datagrams the kernel dropped at this socket so far (SO_RXQ_OVFL)
}

// parseControl reads the control messages recvmmsg left in b.
func parseControl(b []byte) (c control) {
	for len(b) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		if int(h.Len) < unix.SizeofCmsghdr || int(h.Len) > len(b) {
			break
		}
		data := b[unix.CmsgLen(0):h.Len]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			c.dst, c.ifindex, c.hasDst = netip.AddrFrom4(pi.Addr), int(pi.Ifindex), true
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			c.dst, c.ifindex, c.hasDst = netip.AddrFrom16(pi.Addr), int(pi.Ifindex), true
		case h.Level == unix.SOL_SOCKET && h.Type == unix.SO_RXQ_OVFL && len(data) >= 4:
			c.drops = *(*uint32)(unsafe.Pointer(&data[0]))
		}
		next := unix.CmsgSpace(int(h.Len) - unix.CmsgLen(0))
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return c
}
