// Command relayperf is a development tool: it runs berth's relay for one
// mapping (fwd) or drives load through an address (load), so the relay's
// per-operation CPU cost can be compared with docker-proxy's on loopback.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/relay"
	"github.com/berth-dev/berth/test/bench"
)

func main() {
	switch os.Args[1] {
	case "fwd":
		fs := flag.NewFlagSet("fwd", flag.ExitOnError)
		proto := fs.String("proto", "tcp", "")
		listen := fs.String("listen", "", "")
		target := fs.String("target", "", "")
		fs.Parse(os.Args[2:])
		l := netip.MustParseAddrPort(*listen)
		t := netip.MustParseAddrPort(*target)
		r := relay.New(relay.Options{})
		m := forward.Mapping{Key: forward.Key{Proto: forward.Proto(*proto), HostIP: l.Addr(), HostPort: l.Port()}, ContainerIP: t.Addr(), ContainerPort: t.Port(), Mode: forward.ModeRelay}
		if err := r.Apply(context.Background(), []forward.Mapping{m}, nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
		<-c
		r.Close()
	case "load":
		fs := flag.NewFlagSet("load", flag.ExitOnError)
		mode := fs.String("mode", "conn", "conn|udp|bulk")
		addr := fs.String("addr", "", "")
		conc := fs.Int("c", 8, "")
		d := fs.Duration("d", 3*time.Second, "")
		fs.Parse(os.Args[2:])
		var r bench.Result
		var err error
		switch *mode {
		case "conn":
			r, err = bench.TCPConnRate(bench.Here, *addr, *conc, *d, 1<<40)
		case "udp":
			r, err = bench.UDPRate(bench.Here, *addr, *conc, *d, 1<<40)
		case "bulk":
			r, err = bench.TCPBulk(bench.Here, *addr, *d)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("rate %.1f count %d errors %d p50 %v p99 %v\n", r.Rate, r.Count, r.Errors, r.P50, r.P99)
	}
}
