package relay

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/forward"
)

// Buffers. A goroutine waiting for a datagram holds none: it takes a 64 KiB
// buffer from the pool only once its socket is readable (inside
// RawConn.Read) and returns it after forwarding. So 1,000 idle UDP
// listeners and their flows cost no buffer memory, and a busy relay needs
// about one buffer per datagram in flight. The front headroom takes a PROXY
// v2 header without copying the payload.
const (
	headroom = 16 + 36 // PROXY v2 signature+fixed part, IPv6 addresses and ports
	maxUDP   = 65535
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, headroom+maxUDP); return &b }}

// epoch gives flows a cheap monotonic clock for their last activity.
var epoch = time.Now()

func now() int64 { return int64(time.Since(epoch)) }

// udpSocket is a mapping's listening UDP socket.
type udpSocket struct {
	conn *net.UDPConn
	raw  syscall.RawConn
	host netip.AddrPort // the bound address; unspecified for a wildcard
	rm   recvmsg        // used by the serve loop only; on the heap with the socket
}

func newUDPSocket(c *net.UDPConn, host netip.AddrPort) (*udpSocket, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &udpSocket{conn: c, raw: raw, host: host}, nil
}

// flow is one client's traffic: a connected socket towards the container
// and a goroutine relaying its replies.
type flow struct {
	m      *forward.Mapping
	client netip.AddrPort
	up     *net.UDPConn
	raw    syscall.RawConn
	hdr    []byte       // PROXY v2 header for every datagram, or nil
	oob    []byte       // IP(V6)_PKTINFO that makes replies leave from the address the client used
	last   atomic.Int64 // now() of the last datagram either way
}

func (f *flow) touch() { f.last.Store(now()) }

func (l *listener) serveUDP() {
	defer l.wg.Done()
	defer close(l.done)
	u := l.udp
	var (
		buf  *[]byte
		n    int
		rerr error
	)
	read := func(fd uintptr) bool {
		buf = bufPool.Get().(*[]byte)
		n, rerr = u.rm.recv(fd, (*buf)[headroom:])
		if rerr == unix.EAGAIN {
			bufPool.Put(buf)
			return false
		}
		return true
	}
	var delay time.Duration
	for {
		if err := u.raw.Read(read); err != nil {
			return // closed
		}
		if rerr != nil {
			bufPool.Put(buf)
			if rerr == unix.EINTR {
				continue
			}
			l.stats.errors.Add(1)
			if !l.backoff(&delay) {
				return
			}
			continue
		}
		delay = 0
		l.forward(u, (*buf)[:headroom+n])
		bufPool.Put(buf)
	}
}

// forward sends one client datagram, which sits in b after headroom bytes,
// to the client's flow, creating the flow when needed.
func (l *listener) forward(u *udpSocket, b []byte) {
	from := u.rm.from()
	l.mu.Lock()
	f := l.flows[from]
	if f == nil {
		if len(l.flows) >= l.opts.MaxUDPFlows {
			l.mu.Unlock()
			l.stats.drops.Add(1)
			return
		}
		var err error
		if f, err = l.newFlow(u, from); err != nil {
			l.mu.Unlock()
			l.stats.errors.Add(1)
			return
		}
	}
	l.mu.Unlock()
	f.touch()
	out := b[headroom-len(f.hdr):]
	copy(out, f.hdr)
	if _, err := f.up.Write(out); err != nil {
		if !errors.Is(err, net.ErrClosed) { // not the flow ended by a move meanwhile
			l.stats.errors.Add(1)
		}
		return
	}
	l.stats.bytesIn.Add(uint64(len(b) - headroom))
}

// newFlow dials the container for a new client. Called with l.mu held, so
// the flow registers with the mapping current at that moment (see swap).
func (l *listener) newFlow(u *udpSocket, client netip.AddrPort) (*flow, error) {
	m := l.mapping.Load()
	up, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(m.Target()))
	if err != nil {
		return nil, err
	}
	raw, err := up.SyscallConn()
	if err != nil {
		up.Close()
		return nil, err
	}
	f := &flow{m: m, client: client, up: up, raw: raw}
	dst := u.host.Addr()
	if d, ifindex, ok := u.rm.dst(); ok {
		dst = d
		if d.Is4() {
			f.oob = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: d.As4()})
		} else {
			pi := unix.Inet6Pktinfo{Addr: d.As16()}
			if d.IsLinkLocalUnicast() {
				pi.Ifindex = uint32(ifindex)
			}
			f.oob = unix.PktInfo6(&pi)
		}
	}
	if m.ProxyProtocol == 2 {
		h := proxyproto.HeaderProxyFromAddrs(2, net.UDPAddrFromAddrPort(client), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, u.host.Port())))
		if f.hdr, err = h.Format(); err != nil || len(f.hdr) > headroom {
			up.Close()
			return nil, errors.Join(err, errors.New("PROXY header does not fit"))
		}
	}
	f.touch()
	l.flows[client] = f
	l.stats.flows.Add(1)
	l.wg.Add(1)
	go l.serveFlow(u, f)
	return f, nil
}

// serveFlow relays the container's replies to the client from the listening
// socket, so they come from the published address, and ends the flow after
// UDPIdleTimeout without traffic.
func (l *listener) serveFlow(u *udpSocket, f *flow) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		if l.flows[f.client] == f {
			delete(l.flows, f.client)
		}
		l.mu.Unlock()
		f.up.Close()
	}()
	idle := int64(l.opts.UDPIdleTimeout)
	var (
		buf  *[]byte
		n    int
		rerr error
	)
	read := func(fd uintptr) bool {
		buf = bufPool.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *buf)
		if rerr == unix.EAGAIN {
			bufPool.Put(buf)
			return false
		}
		return true
	}
	f.up.SetReadDeadline(time.Now().Add(l.opts.UDPIdleTimeout))
	for {
		if err := f.raw.Read(read); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				return // closed: removed, moved or relay closed
			}
			quiet := now() - f.last.Load()
			if quiet >= idle {
				return
			}
			f.up.SetReadDeadline(time.Now().Add(time.Duration(idle - quiet)))
			continue
		}
		if rerr != nil {
			bufPool.Put(buf)
			// ECONNREFUSED: the container's port was closed (ICMP); the
			// flow stays, the client may retry.
			if rerr != unix.EINTR {
				l.stats.errors.Add(1)
			}
			continue
		}
		f.touch()
		if _, _, err := u.conn.WriteMsgUDPAddrPort((*buf)[:n], f.oob, f.client); err != nil {
			l.stats.errors.Add(1)
		} else {
			l.stats.bytesOut.Add(uint64(n))
		}
		bufPool.Put(buf)
	}
}

// recvmsg is a reusable recvmsg(2) call that fills in the sender and the
// PKTINFO control message without allocating, unlike unix.Recvmsg.
type recvmsg struct {
	rsa unix.RawSockaddrAny
	oob [64]byte
	iov unix.Iovec
	msg unix.Msghdr
}

func (r *recvmsg) recv(fd uintptr, p []byte) (int, error) {
	r.iov.Base = &p[0]
	r.iov.SetLen(len(p))
	r.msg = unix.Msghdr{
		Name:    (*byte)(unsafe.Pointer(&r.rsa)),
		Namelen: unix.SizeofSockaddrAny,
		Iov:     &r.iov,
		Control: &r.oob[0],
	}
	r.msg.SetIovlen(1)
	r.msg.SetControllen(len(r.oob))
	n, _, e := unix.Syscall(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&r.msg)), unix.MSG_DONTWAIT)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// from is the sender of the last datagram.
func (r *recvmsg) from() netip.AddrPort {
	switch r.rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&r.rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		ip := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			ip = ip.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(ip, uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// dst is the local address the last datagram was sent to, from PKTINFO
// (only enabled on wildcard sockets).
func (r *recvmsg) dst() (netip.Addr, int, bool) {
	b := r.oob[:min(int(r.msg.Controllen), len(r.oob))]
	for len(b) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		if int(h.Len) < unix.SizeofCmsghdr || int(h.Len) > len(b) {
			break
		}
		data := b[unix.CmsgLen(0):h.Len]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom4(pi.Addr), int(pi.Ifindex), true
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom16(pi.Addr), int(pi.Ifindex), true
		}
		next := unix.CmsgSpace(int(h.Len) - unix.CmsgLen(0))
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return netip.Addr{}, 0, false
}
