package relay

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The poll loop is one goroutine and one epoll set for every listening
// socket of the relay and every UDP flow socket. It relays UDP itself
// (udp.go). For a TCP listening socket, which stays Go's, it only waits:
// when connections are pending it starts an accept burst (tcp.go), so an
// idle listener costs an epoll entry instead of a goroutine parked in
// Accept with its stack. It holds its mutex while it handles one batch of
// events, so Apply waits at most for one batch.

// handle is what an epoll event names: the fd and a generation number, so
// that an event read just before its fd was closed and reused is ignored.
type handle struct {
	gen uint32
	s   *udpSocket // a listening UDP socket, or
	f   *flow      // a flow socket, or
	t   *listener  // a listening TCP socket (Go's; watched one-shot)
}

type pollLoop struct {
	opts      *Options
	listeners int // assigned to this loop; the Relay's mu guards it
	epfd      int
	wake      int    // eventfd: close interrupts epoll_wait
	mem       []byte // the slots' buffers, mapped apart from Go's heap

	mu      sync.Mutex
	handles map[int32]handle
	gen     uint32
	flows   int // open flows of every listener
	paused  int // listening sockets paused; at 0 of both the loop sleeps without a timeout
	closed  bool
	sweepAt int64 // now() of the next idle sweep

	in, out   [batch]slot
	inh, outh [batch]mmsghdr
	nout      int
	events    [64]unix.EpollEvent
	done      chan struct{}
}

func newPollLoop(opts *Options) (*pollLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	// The datagram buffers are an anonymous mapping outside Go's heap:
	// its pages become resident only as datagrams are written into them,
	// so a loop costs a few pages per slot in use, not 2×16×64 KiB (a heap
	// allocation may be zeroed, which touches every page).
	const slotSize = headroom + maxUDP
	mem, err := unix.Mmap(-1, 0, 2*batch*slotSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("mmap: %w", err)
	}
	lp := &pollLoop{opts: opts, epfd: epfd, wake: wake, mem: mem, handles: map[int32]handle{}, done: make(chan struct{})}
	for i := range batch {
		lp.in[i].buf = mem[i*slotSize : (i+1)*slotSize : (i+1)*slotSize]
		lp.out[i].buf = mem[(batch+i)*slotSize : (batch+i+1)*slotSize : (batch+i+1)*slotSize]
	}
	lp.initSlots()
	go lp.run()
	return lp, nil
}

// close ends every flow and the loop; the listening sockets must already
// be closed.
func (lp *pollLoop) close() {
	lp.mu.Lock()
	lp.closed = true
	for fd, h := range lp.handles {
		if h.t != nil {
			continue // Go's socket
		}
		unix.Close(int(fd))
		if h.f != nil {
			h.f.fd = -1
		}
	}
	clear(lp.handles)
	lp.mu.Unlock()
	unix.Write(lp.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	<-lp.done
	unix.Close(lp.epfd)
	unix.Close(lp.wake)
	unix.Munmap(lp.mem)
}

// register adds fd to the loop. Called with lp.mu held.
func (lp *pollLoop) register(fd int, events uint32, h handle) (uint32, error) {
	lp.gen++
	h.gen = lp.gen
	ev := unix.EpollEvent{Events: events, Fd: int32(fd), Pad: int32(h.gen)}
	if err := unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return 0, fmt.Errorf("epoll_ctl: %w", err)
	}
	lp.handles[int32(fd)] = h
	return h.gen, nil
}

// unregister closes fd, which also takes it out of the epoll set. Called
// with lp.mu held.
func (lp *pollLoop) unregister(fd int) {
	delete(lp.handles, int32(fd))
	unix.Close(fd)
}

// watchTCP adds a TCP listener's socket to the loop, one-shot: the loop
// starts an accept burst when a connection waits, and the burst re-arms the
// watch when it ends. The socket stays Go's (its netpoller has it too).
func (lp *pollLoop) watchTCP(l *listener) error {
	raw, err := l.tcp.SyscallConn()
	if err != nil {
		return err
	}
	raw.Control(func(fd uintptr) { l.tfd = int(fd) })
	lp.mu.Lock()
	defer lp.mu.Unlock()
	l.tgen, err = lp.register(l.tfd, unix.EPOLLIN|unix.EPOLLONESHOT, handle{t: l})
	return err
}

// rearmTCP watches a listener again after its accept burst. The handle
// check makes sure the fd is still the listener's: unwatchTCP removes it
// before the socket is closed and its number can be reused.
func (lp *pollLoop) rearmTCP(l *listener) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if h, ok := lp.handles[int32(l.tfd)]; ok && h.t == l && h.gen == l.tgen {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT, Fd: int32(l.tfd), Pad: int32(l.tgen)}
		unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_MOD, l.tfd, &ev)
	}
}

// unwatchTCP takes a listener out of the loop before its socket is closed.
func (lp *pollLoop) unwatchTCP(l *listener) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if h, ok := lp.handles[int32(l.tfd)]; ok && h.t == l && h.gen == l.tgen {
		delete(lp.handles, int32(l.tfd))
		unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_DEL, l.tfd, nil)
	}
}

// run is the loop. Its epoll_wait is a blocking system call, not a wait in
// Go's netpoller: parking the goroutine there and waking it costs a second
// epoll_wait and a goroutine switch per wake-up, measured at 30% more CPU
// per datagram than this.
func (lp *pollLoop) run() {
	defer close(lp.done)
	for {
		timeout := -1 // nothing to age: sleep until a datagram comes
		lp.mu.Lock()
		if lp.flows > 0 || lp.paused > 0 {
			timeout = int(max(0, (lp.sweepAt-now())/int64(time.Millisecond)) + 1)
		}
		lp.mu.Unlock()
		n, err := unix.EpollWait(lp.epfd, lp.events[:], timeout)
		if err != nil && err != unix.EINTR {
			return // EBADF, EINVAL: the epoll fd is gone
		}
		lp.mu.Lock()
		if lp.closed {
			lp.mu.Unlock()
			return
		}
		for _, ev := range lp.events[:max(n, 0)] {
			h, ok := lp.handles[ev.Fd]
			if !ok || h.gen != uint32(ev.Pad) {
				continue // a socket closed meanwhile
			}
			switch {
			case h.s != nil:
				lp.fromClients(h.s)
			case h.f != nil:
				lp.fromContainer(h.f)
			default:
				// Connections wait: accept them on a goroutine of
				// their own until they stop coming (acceptBurst).
				h.t.accepting.Add(1)
				h.t.wg.Add(1)
				go h.t.acceptBurst()
			}
		}
		lp.flush()
		if t := now(); t >= lp.sweepAt {
			lp.sweep(t)
		}
		lp.mu.Unlock()
	}
}
