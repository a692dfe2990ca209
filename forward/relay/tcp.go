package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/berth-dev/berth/forward"
)

// tcpConn is one relayed connection; cancel closes both legs.
type tcpConn struct {
	m      *forward.Mapping
	cancel context.CancelFunc
}

func (l *listener) serveTCP() {
	defer l.wg.Done()
	defer close(l.done)
	var delay time.Duration
	for {
		c, err := l.tcp.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
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

func (l *listener) serveConn(client *net.TCPConn) {
	defer l.wg.Done()
	ctx, cancel := context.WithCancel(l.ctx)
	c := &tcpConn{cancel: cancel}
	l.mu.Lock()
	c.m = l.mapping.Load()
	l.conns[c] = struct{}{}
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.conns, c)
		l.mu.Unlock()
		cancel()
		l.stats.active.Add(-1)
	}()
	context.AfterFunc(ctx, func() { client.Close() })

	d := net.Dialer{Timeout: l.opts.DialTimeout, KeepAliveConfig: keepAlive}
	uc, err := d.DialContext(ctx, "tcp", c.m.Target().String())
	if err != nil {
		if ctx.Err() == nil {
			l.stats.errors.Add(1)
			client.SetLinger(0) // reset, as a closed port would
		}
		return
	}
	up := uc.(*net.TCPConn)
	context.AfterFunc(ctx, func() { up.Close() })

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
			cancel()
		}
		errc <- err
	}()
	err1 := pipe(client, up, &l.stats.bytesOut)
	if err1 != nil {
		cancel()
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
