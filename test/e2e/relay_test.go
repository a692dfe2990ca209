package e2e

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

// The relay with real containers: TCP and UDP from a remote host, the
// client address carried by PROXY protocol v2 into the container, and the
// error a relay gives for a port dockerd holds.
func TestRelayWithContainers(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	peer := netns.NewPeer(t, 150)
	b := w.StartBerth()
	w.RunEcho("pp", "--label", "berth.ports=29000:80,29001:53/udp", "--label", "berth.proxy-protocol=v2",
		"--", "-proxy-protocol", "-tcp", "80", "-udp", "53")
	w.RunEcho("plain", "--label", "berth.ports=29002:80,29003:53/udp", "--label", "berth.mode=relay", "--", "-tcp", "80", "-udp", "53")
	w.RunEcho("held", "-p", "29004:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	b.EventuallyStatus(t, 10*time.Second, "relay rows", func(rows []reconcile.Row) error {
		if installed(rows, "pp") != 4 || installed(rows, "plain") != 4 {
			return fmt.Errorf("pp %d plain %d installed", installed(rows, "pp"), installed(rows, "plain"))
		}
		for _, r := range rows {
			if r.ContainerName == "pp" && r.Mode != "relay" {
				return fmt.Errorf("pp row in mode %s: PROXY protocol must pick the relay", r.Mode)
			}
		}
		return nil
	})

	ask := func(proto, addr string) (string, string) {
		var got, local string
		err := peer.Do(func() error {
			var err error
			if proto == "tcp" {
				c, err := net.DialTimeout("tcp", addr, 3*time.Second)
				if err != nil {
					return err
				}
				local = c.LocalAddr().String()
				c.Close()
				got, err = harness.WhoTCP(addr, 3*time.Second)
				return err
			}
			c, err := net.Dial("udp", addr)
			if err != nil {
				return err
			}
			defer c.Close()
			local = c.LocalAddr().String()
			got, err = harness.WhoOn(c, 3*time.Second)
			return err
		})
		if err != nil {
			t.Fatalf("%s %s from the peer: %v", proto, addr, err)
		}
		return got, local
	}

	// PROXY v2: the container sees the remote client's address, not the
	// relay's. TCP: the peer's address; UDP: the exact client socket.
	got, _ := ask("tcp", net.JoinHostPort(peer.LocalAddr, "29000"))
	if harness.Name(got) != "pp" || !strings.HasPrefix(strings.Fields(got)[1], peer.Addr+":") {
		t.Fatalf("tcp PROXY v2: container saw %q, want the peer %s", got, peer.Addr)
	}
	got, local := ask("udp", net.JoinHostPort(peer.LocalAddr, "29001"))
	if harness.Name(got) != "pp" || strings.Fields(got)[1] != local {
		t.Fatalf("udp PROXY v2: container saw %q, want the client socket %s", got, local)
	}
	// Without PROXY protocol the container sees the relay's own address.
	got, _ = ask("tcp", net.JoinHostPort(peer.LocalAddr, "29002"))
	if harness.Name(got) != "plain" || strings.HasPrefix(strings.Fields(got)[1], peer.Addr+":") {
		t.Fatalf("plain relay: container saw %q", got)
	}
	if got, _ := ask("udp", net.JoinHostPort(peer.LocalAddr, "29003")); harness.Name(got) != "plain" {
		t.Fatalf("udp relay: %q", got)
	}
	// IPv6 client to the IPv4-only container.
	if got, _ := ask("tcp", net.JoinHostPort(peer.Local6, "29002")); harness.Name(got) != "plain" {
		t.Fatalf("tcp over IPv6 to an IPv4-only container: %q", got)
	}
	// 1 MiB both ways with half-close.
	payload := []byte(strings.Repeat("berth relay ", 1<<20/12))
	if err := peer.Do(func() error {
		return harness.EchoTCP(net.JoinHostPort(peer.LocalAddr, "29002"), payload, 10*time.Second)
	}); err != nil {
		t.Fatal(err)
	}

	// A -p port in relay mode: dockerd holds the IPv4 socket. The error
	// names the holder and suggests nat or a label; nothing is forwarded
	// silently another way.
	var rows []reconcile.Row
	harness.Eventually(t, 10*time.Second, "held port error", func() error {
		var err error
		if rows, err = b.Status(); err != nil {
			return err
		}
		var v4 *reconcile.Row
		for i, r := range rows {
			if r.ContainerName == "held" && r.HostIP == "0.0.0.0" {
				v4 = &rows[i]
			}
		}
		if v4 == nil || v4.State != reconcile.StateError || v4.Mode != "relay" ||
			!strings.Contains(v4.Error, "address already in use") || !strings.Contains(v4.Error, "dockerd") ||
			!strings.Contains(v4.Error, "use nat mode, or publish through the berth.ports label") {
			return fmt.Errorf("relay on a dockerd-held port: %+v", v4)
		}
		// Its IPv6 side is free and relayed.
		if installed(rows, "held") != 1 {
			return fmt.Errorf("held: %v", rowKeys(rows, "held"))
		}
		return nil
	})
	// The relay's counters show the traffic.
	for _, r := range rows {
		if r.ContainerName == "plain" && r.Proto == "tcp" && r.HostIP == "0.0.0.0" {
			if r.Stats == nil || r.Stats.Conns < 2 || r.Stats.BytesIn < uint64(len(payload)) || r.Stats.BytesOut < uint64(len(payload)) {
				t.Fatalf("relay stats %+v", r.Stats)
			}
		}
	}
}
