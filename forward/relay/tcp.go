package relay

import (
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/berth-dev/berth/forward"
)

// tcpConn is one relayed connection. end closes both legs; it is called
// under the listener's mu, which also guards up and ended.
type tcpConn struct {
	m          *forward.Mapping
	client, up *net.TCPConn
	ended      bool
}

func (c *tcpConn) end() {
	if c.ended {
		return
	}
	c.ended = true
	c.client.Close()
	if c.up != nil {
		c.up.Close()
	}
}

// acceptLinger is how long an accept burst runs before it hands the
// listening socket back to the poll loop.
const acceptLinger = time.Second

// acceptBurst accepts connections for acceptLinger, then re-arms the
// loop's watch and returns. Listening sockets that see no
// connections cost no goroutine (and its stack): 2,000 idle listeners are
// 2,000 entries in one epoll set. A busy one keeps its burst running, so
// the accept path of a steady stream is Go's own.
func (l *listener) acceptBurst() {
	defer l.wg.Done()
	defer l.accepting.Done()
	var delay time.Duration
	// One deadline for the burst, not one per connection: a busy socket
	// is handed back every acceptLinger and, still ready, gets a new
	// burst at once.
	l.tcp.SetDeadline(time.Now().Add(acceptLinger))
	for {
		c, err := l.tcp.AcceptTCP()
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				l.loop.rearmTCP(l)
				return
			case errors.Is(err, net.ErrClosed):
				return
			}
			l.stats.errors.Add(1)
			if !l.backoff(&delay) {
				return
			}
			continue
		}
		delay = 0
		if l.stats.active.Load() >= int64(l.opts.MaxConns) {
			l.stats.drops.Add(1)
			c.SetLinger(0) // reset: the client should not wait for data
			c.Close()
			continue
		}
		l.stats.conns.Add(1)
		l.stats.active.Add(1)
		l.wg.Add(1)
		go l.serveConn(c)
	}
}

// serveConn relays one accepted connection. It costs what docker-proxy's
// does or less: no context or timer of its own (the listener's context
// bounds the dial, its mutex guards ending), keep-alive inherited from the
// listening socket, none on the container leg (berth ends those itself
// when the mapping goes), and the returning direction on this goroutine.
func (l *listener) serveConn(client *net.TCPConn) {
	defer l.wg.Done()
	c := &tcpConn{client: client}
	l.mu.Lock()
	c.m = l.mapping.Load()
	l.conns[c] = struct{}{}
	ended := l.ended
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.conns, c)
		c.end()
		l.mu.Unlock()
		l.stats.active.Add(-1)
	}()
	if ended {
		return
	}

	d := net.Dialer{Timeout: l.opts.DialTimeout, KeepAlive: -1}
	uc, err := d.DialContext(l.ctx, "tcp", c.m.Target().String())
	if err != nil {
		if l.ctx.Err() == nil {
			l.stats.errors.Add(1)
			client.SetLinger(0) // reset, as a closed port would
		}
		return
	}
	up := uc.(*net.TCPConn)
	l.mu.Lock()
	c.up = up
	if c.ended { // ended while dialling
		up.Close()
	}
	l.mu.Unlock()

	if c.m.ProxyProtocol == 2 {
		h := proxyproto.HeaderProxyFromAddrs(2, client.RemoteAddr(), client.LocalAddr())
		if _, err := h.WriteTo(up); err != nil {
			l.stats.errors.Add(1)
			return
		}
	}

	errc := make(chan error, 1)
	go func() {
		err := pipe(up, client, &l.stats.bytesIn)
		if err != nil {
			l.endConn(c)
		}
		errc <- err
	}()
	err1 := pipe(client, up, &l.stats.bytesOut)
	if err1 != nil {
		l.endConn(c)
	}
	err2 := <-errc
	// The side that failed first counts; the other then sees its socket
	// closed under it, as does every leg when the mapping is removed.
	for _, err := range []error{err1, err2} {
		if err != nil && !errors.Is(err, net.ErrClosed) {
			l.stats.errors.Add(1)
			break
		}
	}
}

func (l *listener) endConn(c *tcpConn) {
	l.mu.Lock()
	c.end()
	l.mu.Unlock()
}

// chunk is how much one splice round may move before the byte counters are
// updated, so Stats shows traffic of long-lived connections as it happens.
const chunk = 256 << 10

// pipe copies src to dst until src's EOF, then shuts down dst's write side
// so the peer sees the half-close. TCPConn.ReadFrom from a (limited)
// TCPConn splices inside the kernel, with no user-space buffer.
func pipe(dst, src *net.TCPConn, n *atomic.Uint64) error {
	lr := io.LimitedReader{R: src}
	for {
		lr.N = chunk
		w, err := dst.ReadFrom(&lr)
		n.Add(uint64(w))
		if err != nil {
			return err
		}
		if lr.N > 0 { // stopped before the limit: EOF
			return dst.CloseWrite()
		}
	}
}
