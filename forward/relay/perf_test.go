package relay

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/test/netns"
)

// naiveProxy is docker-proxy's shape: accept, dial, io.Copy both ways.
func naiveProxy(t testing.TB, target netip.AddrPort) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	forwardtest.Serve(t, ln, func(c net.Conn) {
		up, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(target))
		if err != nil {
			return
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { io.Copy(up, c); up.CloseWrite(); wg.Done() }()
		io.Copy(c, up)
		c.(*net.TCPConn).CloseWrite()
		wg.Wait()
		up.Close()
	})
	return ln.Addr().String()
}

// connRate runs 8 clients doing connect, 1 byte, half-close, read, close.
func connRate(b *testing.B, addr string) {
	var n atomic.Int64
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N/8 + 1
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1)
			for range per {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Error(err)
					return
				}
				c.Write([]byte{'x'})
				c.(*net.TCPConn).CloseWrite()
				io.ReadFull(c, buf)
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(n.Load())/b.Elapsed().Seconds(), "conn/s")
}

func BenchmarkConnRate(b *testing.B) {
	netns.Require(b)
	target := lineEcho(b)
	b.Run("naive", func(b *testing.B) { connRate(b, naiveProxy(b, target)) })
	b.Run("relay", func(b *testing.B) {
		r := New(Options{})
		b.Cleanup(func() { r.Close() })
		port := forwardtest.Port()
		m := forward.Mapping{Key: forward.Key{Proto: forward.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: port},
			ContainerIP: target.Addr(), ContainerPort: target.Port(), Mode: forward.ModeRelay}
		if err := r.Apply(b.Context(), []forward.Mapping{m}, nil); err != nil {
			b.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		connRate(b, netip.AddrPortFrom(m.HostIP, port).String())
	})
}
