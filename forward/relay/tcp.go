package relay

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

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

// pipe copies src to dst until src's EOF, then shuts down dst's write side
// so the peer sees the half-close. The bytes move inside the kernel:
// splice from src into a pipe, splice from the pipe into dst; dst's send
// buffer running full stops the reading, so a slow peer holds back a fast
// one instead of filling memory. The pipe comes from a bounded pool and goes
// back to it (Go's own splice keeps every pipe it ever made until a GC, two
// per connection a burst of connections ago).
func pipe(dst, src *net.TCPConn, n *atomic.Uint64) error {
	p, err := getPipe()
	if err != nil {
		return err
	}
	defer putPipe(p)
	sr, err := src.SyscallConn()
	if err != nil {
		return err
	}
	dr, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	var (
		k    int64
		serr error
	)
	// Each returns false on EAGAIN only, to wait for the socket; a retry
	// on EINTR must not wait, the readiness it waits for may have passed.
	fill := func(fd uintptr) bool {
		for {
			k, serr = unix.Splice(int(fd), nil, p.w, nil, pipeSize, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN
			}
		}
	}
	drain := func(fd uintptr) bool {
		for {
			k, serr = unix.Splice(p.r, nil, int(fd), nil, int(p.n), unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN
			}
		}
	}
	for {
		if err := sr.Read(fill); err != nil {
			return err
		}
		if serr != nil {
			return os.NewSyscallError("splice", serr)
		}
		if k == 0 { // EOF
			return dst.CloseWrite()
		}
		p.n += k
		for p.n > 0 {
			if err := dr.Write(drain); err != nil {
				return err
			}
			if serr != nil {
				return os.NewSyscallError("splice", serr)
			}
			if k <= 0 {
				return errors.New("splice: pipe gave nothing")
			}
			p.n -= k
			n.Add(uint64(k))
		}
	}
}

// pipeSize is the capacity of a splice pipe, Go's choice too: up to 1 MiB
// moves per system call on a bulk stream. Its pages are taken only as data
// passes through it.
const pipeSize = 1 << 20

// maxIdlePipes bounds the pool; pipes beyond it are closed when their
// connection ends.
const maxIdlePipes = 64

// splicePipe is a pipe and the bytes in it.
type splicePipe struct {
	r, w int
	n    int64
}

var pipePool struct {
	mu   sync.Mutex
	free []*splicePipe
}

func getPipe() (*splicePipe, error) {
	pipePool.mu.Lock()
	if k := len(pipePool.free); k > 0 {
		p := pipePool.free[k-1]
		pipePool.free = pipePool.free[:k-1]
		pipePool.mu.Unlock()
		return p, nil
	}
	pipePool.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	// A smaller pipe still works (splice moves less per call): the
	// limit (fs.pipe-max-size) may be lower for an unprivileged berth.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return &splicePipe{r: fds[0], w: fds[1]}, nil
}

// putPipe keeps an empty pipe for the next connection; one with bytes left
// in it (its connection failed mid-copy) is closed.
func putPipe(p *splicePipe) {
	if p.n == 0 {
		pipePool.mu.Lock()
		if len(pipePool.free) < maxIdlePipes {
			pipePool.free = append(pipePool.free, p)
			pipePool.mu.Unlock()
			return
		}
		pipePool.mu.Unlock()
	}
	unix.Close(p.r)
	unix.Close(p.w)
}
