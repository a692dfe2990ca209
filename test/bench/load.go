package bench

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// In runs fn with sockets it opens in some network namespace; netns.Peer.Do
// fits, and Here runs fn where the caller is.
type In func(fn func() error) error

// Here runs fn in the caller's own namespace, on a locked OS thread like
// netns.Peer.Do, so every system's client pays the same for its dials.
func Here(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		errc <- fn()
	}()
	return <-errc
}

// Dialer opens sockets inside a namespace: a goroutine whose thread has
// entered it does socket() and connect(), and the caller then uses the
// connection from any goroutine (a socket stays in the namespace it was
// made in). So only dials cross to the locked thread; reads and writes run
// on ordinary goroutines, the same for every system measured.
type Dialer struct {
	req  chan dialReq
	done chan error
}

type dialReq struct {
	network, addr string
	timeout       time.Duration
	resp          chan dialResp
}

type dialResp struct {
	c   net.Conn
	err error
}

// NewDialer starts a dialing thread in the namespace of in.
func NewDialer(in In) *Dialer {
	d := &Dialer{req: make(chan dialReq), done: make(chan error, 1)}
	go func() {
		d.done <- in(func() error {
			for r := range d.req {
				c, err := net.DialTimeout(r.network, r.addr, r.timeout)
				r.resp <- dialResp{c, err}
			}
			return nil
		})
	}()
	return d
}

// Dial connects from inside the namespace.
func (d *Dialer) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	r := dialReq{network, addr, timeout, make(chan dialResp, 1)}
	select {
	case d.req <- r:
	case err := <-d.done:
		if err == nil {
			err = errors.New("dialer stopped")
		}
		d.done <- err
		return nil, err
	}
	x := <-r.resp
	return x.c, x.err
}

// Close ends the dialing thread.
func (d *Dialer) Close() { close(d.req) }

// Result is one measurement of one system.
type Result struct {
	Rate   float64 // per second: bytes, connections or round trips
	Count  int64
	Errors int64
	P50    time.Duration
	P99    time.Duration
	Dur    time.Duration
	Note   string
}

// latencies collects per-operation durations from several workers.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d []time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d...)
	l.mu.Unlock()
}

func (l *latencies) pct(p float64) time.Duration {
	if len(l.d) == 0 {
		return 0
	}
	slices.Sort(l.d)
	i := int(float64(len(l.d)-1) * p)
	return l.d[i]
}

// workers runs n copies of fn, each with a Dialer of its own into the
// namespace of in, and waits for all of them.
func workers(in In, n int, fn func(i int, d *Dialer) error) error {
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := NewDialer(in)
			defer d.Close()
			errs[i] = fn(i, d)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// TCPBulk pushes data through one connection to an echo server for d and
// counts the bytes that came back (the same amount crossed the other way).
func TCPBulk(in In, addr string, d time.Duration) (Result, error) {
	dl := NewDialer(in)
	c, err := dl.Dial("tcp", addr, 3*time.Second)
	dl.Close()
	if err != nil {
		return Result{}, err
	}
	defer abort(c)
	var stop atomic.Bool
	werr := make(chan error, 1)
	go func() {
		buf := make([]byte, 128<<10)
		for i := range buf {
			buf[i] = byte(i)
		}
		c.SetWriteDeadline(time.Now().Add(d + 5*time.Second))
		for !stop.Load() {
			if _, err := c.Write(buf); err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	buf := make([]byte, 256<<10)
	// warm up a little: the first window of a connection is not steady state
	c.SetReadDeadline(time.Now().Add(d + 5*time.Second))
	warm := time.Now().Add(d / 10)
	for time.Now().Before(warm) {
		if _, err := c.Read(buf); err != nil {
			stop.Store(true)
			return Result{}, fmt.Errorf("bulk %s warm-up: %w", addr, err)
		}
	}
	start := time.Now()
	end := start.Add(d)
	var n int64
	for time.Now().Before(end) {
		k, err := c.Read(buf)
		n += int64(k)
		if err != nil {
			stop.Store(true)
			return Result{}, fmt.Errorf("bulk %s: %w", addr, err)
		}
	}
	el := time.Since(start)
	stop.Store(true)
	c.SetDeadline(time.Now()) // unblock the writer
	<-werr
	return Result{Rate: float64(n) / el.Seconds(), Count: n, Dur: el}, nil
}

// abort closes with SO_LINGER 0: a reset, no TIME_WAIT left behind.
func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// TCPConnRate runs conc workers that each connect, send one byte,
// half-close, read the echoed byte and the server's close, and reset the
// connection (SO_LINGER 0, so the client leaves no TIME_WAIT), for d or
// until max connections in all.
func TCPConnRate(in In, addr string, conc int, d time.Duration, max int64) (Result, error) {
	return rate(in, conc, d, max, func(_ int, dl *Dialer) (func() error, func(), error) {
		buf := make([]byte, 16)
		return func() error {
			c, err := dl.Dial("tcp", addr, 2*time.Second)
			if err != nil {
				return err
			}
			defer abort(c)
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte{'x'}); err != nil {
				return err
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				return err
			}
			got := 0
			for {
				n, err := c.Read(buf[got:])
				got += n
				if err == io.EOF {
					break
				}
				if err != nil {
					return err
				}
			}
			if got != 1 || buf[0] != 'x' {
				return fmt.Errorf("echo: got %q", buf[:got])
			}
			return nil
		}, func() {}, nil
	})
}

// UDPRate runs conc workers, each with its own socket (one flow), sending
// a 32-byte datagram and waiting for the echo, for d or max round trips.
// A datagram not answered within 500 ms counts as an error.
func UDPRate(in In, addr string, conc int, d time.Duration, max int64) (Result, error) {
	return rate(in, conc, d, max, func(i int, dl *Dialer) (func() error, func(), error) {
		c, err := dl.Dial("udp", addr, time.Second)
		if err != nil {
			return nil, nil, err
		}
		msg := []byte(fmt.Sprintf("bench-%04d-0123456789abcdefghij", i))[:32]
		buf := make([]byte, 64)
		return func() error {
			c.SetDeadline(time.Now().Add(500 * time.Millisecond))
			_, err := c.Write(msg)
			for err == nil {
				var n int
				if n, err = c.Read(buf); err == nil && string(buf[:n]) == string(msg) {
					return nil
				}
			}
			return err
		}, func() { c.Close() }, nil
	})
}

// rate runs conc workers for d or until max operations in all. mk gives
// each worker its operation (and what to close when it is done); rate
// times the operations that succeed and counts the ones that fail, keeping
// the first error's text as the Result's note.
func rate(in In, conc int, d time.Duration, max int64, mk func(i int, dl *Dialer) (op func() error, done func(), err error)) (Result, error) {
	var lat latencies
	var count, errs atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	end := start.Add(d)
	err := workers(in, conc, func(i int, dl *Dialer) error {
		op, done, err := mk(i, dl)
		if err != nil {
			return err
		}
		defer done()
		var mine []time.Duration
		for time.Now().Before(end) && count.Add(1) <= max {
			t0 := time.Now()
			if err := op(); err != nil {
				errs.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				continue
			}
			mine = append(mine, time.Since(t0))
		}
		lat.add(mine)
		return nil
	})
	el := time.Since(start)
	r := Result{Count: int64(len(lat.d)), Errors: errs.Load(), Dur: el,
		P50: lat.pct(0.50), P99: lat.pct(0.99)}
	r.Rate = float64(r.Count) / el.Seconds()
	if e := firstErr.Load(); e != nil {
		r.Note = e.(string)
	}
	return r, err
}

// LongConns opens n connections (dial concurrency conc), exchanges 8 bytes
// on each, calls held while all are open, exchanges again on every one and
// closes them. It returns how many failed at any step.
func LongConns(in In, addr string, n, conc int, held func()) (Result, error) {
	conns := make([]net.Conn, n)
	var errs atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		errs.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	exchange := func(c net.Conn, i int) error {
		msg := []byte(fmt.Sprintf("L%07d", i))
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(msg); err != nil {
			return err
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
		if string(got) != string(msg) {
			return fmt.Errorf("conn %d: echo %q", i, got)
		}
		return nil
	}
	start := time.Now()
	var next atomic.Int64
	workers(in, conc, func(_ int, d *Dialer) error {
		for {
			i := int(next.Add(1) - 1)
			if i >= n {
				return nil
			}
			c, err := d.Dial("tcp", addr, 5*time.Second)
			if err != nil {
				fail(err)
				continue
			}
			conns[i] = c
			if err := exchange(c, i); err != nil {
				fail(err)
			}
		}
	})
	open := time.Since(start)
	held()
	var wg sync.WaitGroup
	sem := make(chan struct{}, conc)
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := exchange(c, i); err != nil {
				fail(err)
			}
			abort(c)
		}()
	}
	wg.Wait()
	r := Result{Count: int64(n), Errors: errs.Load(), Dur: open}
	if e := firstErr.Load(); e != nil {
		r.Note = e.(string)
	}
	return r, nil
}

// AllAnswer asks every address "who?" over TCP until each has answered
// with the expected name once, or until d passes. It returns how many
// never answered. It first polls a few probes (first, middle, last) with
// short timeouts until they answer, so the ready time is not set by the
// sweep of thousands of ports that are not forwarded yet, then sweeps all.
func AllAnswer(in In, addrs []string, expect string, d time.Duration) (int, error) {
	deadline := time.Now().Add(d)
	if len(addrs) > 3 {
		probes := []string{addrs[0], addrs[len(addrs)/2], addrs[len(addrs)-1]}
		for len(probes) > 0 && time.Now().Before(deadline) {
			var mu sync.Mutex
			var still []string
			workers(in, len(probes), func(i int, d *Dialer) error {
				if !whoIsWithin(d, probes[i], expect, 100*time.Millisecond) {
					mu.Lock()
					still = append(still, probes[i])
					mu.Unlock()
				}
				return nil
			})
			probes = still
			if len(probes) > 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	pending := slices.Clone(addrs)
	for len(pending) > 0 && time.Now().Before(deadline) {
		var mu sync.Mutex
		var still []string
		var next atomic.Int64
		workers(in, 64, func(_ int, d *Dialer) error {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(pending) {
					return nil
				}
				if ok := whoIs(d, pending[i], expect); !ok {
					mu.Lock()
					still = append(still, pending[i])
					mu.Unlock()
				}
			}
		})
		pending = still
		if len(pending) > 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if len(pending) > 0 {
		return len(pending), fmt.Errorf("%d of %d addresses did not answer as %q within %v (first: %s)", len(pending), len(addrs), expect, d, pending[0])
	}
	return 0, nil
}

// NoneAnswer is true when no address answers "who?" (tried once each).
func NoneAnswer(in In, addrs []string, expect string) bool {
	var any atomic.Bool
	var next atomic.Int64
	workers(in, 64, func(_ int, d *Dialer) error {
		for {
			i := int(next.Add(1) - 1)
			if i >= len(addrs) || any.Load() {
				return nil
			}
			if whoIs(d, addrs[i], expect) {
				any.Store(true)
			}
		}
	})
	return !any.Load()
}

// whoIs asks once. A port whose forward is not in place yet usually hangs
// (dockerd's held socket listens but never accepts) until the timeout.
func whoIs(d *Dialer, addr, expect string) bool {
	return whoIsWithin(d, addr, expect, 250*time.Millisecond)
}

func whoIsWithin(d *Dialer, addr, expect string, wait time.Duration) bool {
	c, err := d.Dial("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer abort(c)
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte("who?\n")); err != nil {
		return false
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return false
	}
	return len(b) > len(expect) && string(b[:len(expect)+1]) == expect+" "
}
