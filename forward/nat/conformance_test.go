package nat

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/test/netns"
)

var peerN atomic.Int32

func init() { peerN.Store(100) }

// factory puts the echo servers in a "container" namespace and, unless
// local, the clients in a "remote host" namespace.
func factory(v6, local bool) forwardtest.Factory {
	return func(t *testing.T) forwardtest.Env {
		tab := newTable(t, Options{})
		enableForwarding(t)
		ctr := netns.NewPeer(t, int(peerN.Add(1)))
		remote := netns.NewPeer(t, int(peerN.Add(1)))
		e := forwardtest.Env{
			Forwarder: tab,
			Mode:      forward.ModeNAT,
			Protos:    []forward.Proto{forward.TCP, forward.UDP},
			KeyIP:     netip.IPv4Unspecified(),
			ClientIP:  netip.MustParseAddr(remote.LocalAddr),
			TargetIP:  netip.MustParseAddr(ctr.Addr),
			ListenTCP: func(a netip.AddrPort) (l net.Listener, err error) {
				err = ctr.Do(func() error { l, err = net.Listen("tcp", a.String()); return err })
				return
			},
			ListenUDP: func(a netip.AddrPort) (c net.PacketConn, err error) {
				err = ctr.Do(func() error { c, err = net.ListenPacket("udp", a.String()); return err })
				return
			},
			Dial: func(ctx context.Context, network string, a netip.AddrPort) (c net.Conn, err error) {
				err = remote.Do(func() error {
					var d net.Dialer
					c, err = d.DialContext(ctx, network, a.String())
					return err
				})
				return
			},
		}
		if v6 {
			e.KeyIP = netip.IPv6Unspecified()
			e.ClientIP = netip.MustParseAddr(remote.Local6)
			e.TargetIP = netip.MustParseAddr(ctr.Addr6)
			waitFor(t, remote, net.JoinHostPort(ctr.Addr6, "1")) // refused is fine: routed
		}
		if local {
			e.ClientIP = netip.MustParseAddr("127.0.0.1")
			e.Dial = nil // from the host itself
		}
		return e
	}
}

func TestConformance(t *testing.T) {
	t.Run("remote-ipv4", func(t *testing.T) { forwardtest.Run(t, factory(false, false)) })
	t.Run("localhost", func(t *testing.T) { forwardtest.Run(t, factory(false, true)) })
	t.Run("remote-ipv6", func(t *testing.T) { forwardtest.Run(t, factory(true, false)) })
}
