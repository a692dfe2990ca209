package relay

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
)

// rss is the process's resident set in bytes.
func rss(t *testing.T) uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestMemory2000Listeners holds the budget: 1,000 ports on both families
// (2,000 listening sockets, half TCP, half UDP) in at most 32 MiB RSS for
// the whole process.
func TestMemory2000Listeners(t *testing.T) {
	if raceEnabled {
		t.Skip("memory budget is not meaningful under the race detector")
	}
	if testing.Short() {
		t.Skip("short")
	}
	r := newRelay(t, Options{})
	target := udpEcho(t)
	ms := make([]forward.Mapping, 0, 2000)
	for i := range 1000 {
		proto := forward.TCP
		if i%2 == 1 {
			proto = forward.UDP
		}
		port := forwardtest.Port()
		for _, host := range []string{"0.0.0.0", "::"} {
			ms = append(ms, forward.Mapping{
				Key:         forward.Key{Proto: proto, HostIP: netip.MustParseAddr(host), HostPort: port},
				ContainerIP: target.Addr(), ContainerPort: target.Port(), Mode: forward.ModeRelay,
			})
		}
	}
	before := rss(t)
	if err := r.Apply(context.Background(), ms, nil); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	after := rss(t)
	var st runtime.MemStats
	runtime.ReadMemStats(&st)
	t.Logf("RSS %.1f MiB before, %.1f MiB with %d listeners (%.1f KiB each); Go heap in use %.1f MiB, stacks %.1f MiB, goroutines %d",
		float64(before)/(1<<20), float64(after)/(1<<20), len(ms), float64(after-before)/float64(len(ms))/1024,
		float64(st.HeapInuse)/(1<<20), float64(st.StackInuse)/(1<<20), runtime.NumGoroutine())
	if after > 32<<20 {
		t.Fatalf("RSS %.1f MiB with %d listeners, budget 32 MiB", float64(after)/(1<<20), len(ms))
	}

	// One flow on every UDP listener: idle flows must not hold buffers.
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	flows := 0
	buf := make([]byte, 2048)
	for _, m := range ms {
		if m.Proto != forward.UDP || m.Is6() {
			continue
		}
		to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), m.HostPort)
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.WriteToUDPAddrPort([]byte("hi"), to); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		flows++
	}
	runtime.GC()
	withFlows := rss(t)
	t.Logf("RSS %.1f MiB with %d UDP flows open as well", float64(withFlows)/(1<<20), flows)
	if withFlows > 32<<20 {
		t.Fatalf("RSS %.1f MiB with %d listeners and %d flows, budget 32 MiB", float64(withFlows)/(1<<20), len(ms), flows)
	}
}

// TestUDPHotPathAllocations checks that a datagram through an established
// flow, both ways, allocates nothing: buffers are pooled and recvmsg is
// reused. The relay's goroutines count too: the malloc counter is global.
func TestUDPHotPathAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	r := newRelay(t, Options{})
	for _, tc := range []struct {
		key   string
		proxy uint8
	}{{"0.0.0.0", 0}, {"127.0.0.1", 2}} {
		m := mapping(forward.UDP, tc.key, udpEcho(t))
		m.ProxyProtocol = tc.proxy
		mustApply(t, r, []forward.Mapping{m}, nil)
		c, err := net.Dial("udp4", hostAddr("127.0.0.1", m))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		msg, buf := []byte("ping"), make([]byte, 2048)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		roundTrip := func() {
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(buf); err != nil {
				t.Fatal(err)
			}
		}
		roundTrip() // creates the flow
		// testing.AllocsPerRun rounds down; count over many round trips.
		const runs = 1000
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range runs {
			roundTrip()
		}
		runtime.ReadMemStats(&after)
		if n := after.Mallocs - before.Mallocs; n > runs/20 {
			t.Errorf("%s: %d allocations in %d datagram round trips, want about 0", m, n, runs)
		} else {
			t.Logf("%s: %d allocations in %d round trips", m, n, runs)
		}
	}
}
