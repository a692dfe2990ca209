package nat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"github.com/berth-dev/berth/forward"
	"github.com/ti-mo/conntrack"
	"github.com/vishvananda/netlink"
)

// enableRouteLocalnet sets route_localnet=1 on the interface that routes
// to each container address, so a DNATed packet from 127.0.0.1 may leave
// through it (the guard in raw PREROUTING drops what this would let in).
// It returns the failures by address.
func enableRouteLocalnet(ips []netip.Addr) map[netip.Addr]error {
	if len(ips) == 0 {
		return nil
	}
	fail := map[netip.Addr]error{}
	h, err := netlink.NewHandle()
	if err != nil {
		for _, ip := range ips {
			fail[ip] = err
		}
		return fail
	}
	defer h.Close()
	done := map[int]error{}
	for _, ip := range ips {
		routes, err := h.RouteGet(net.IP(ip.AsSlice()))
		if err != nil || len(routes) == 0 {
			fail[ip] = fmt.Errorf("route to %s: %v", ip, err)
			continue
		}
		idx := routes[0].LinkIndex
		if err, ok := done[idx]; ok {
			if err != nil {
				fail[ip] = err
			}
			continue
		}
		err = setRouteLocalnet(h, idx)
		done[idx] = err
		if err != nil {
			fail[ip] = err
		}
	}
	return fail
}

func setRouteLocalnet(h *netlink.Handle, idx int) error {
	link, err := h.LinkByIndex(idx)
	if err != nil {
		return fmt.Errorf("link %d: %w", idx, err)
	}
	name := link.Attrs().Name
	if name == "lo" {
		return nil
	}
	p := "/proc/sys/net/ipv4/conf/" + name + "/route_localnet"
	if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == "1" {
		return nil
	}
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("route_localnet on %s: %w", name, err)
	}
	return nil
}

// flushUDP deletes conntrack entries whose original destination is one of
// the keys, so the next datagram of an existing flow meets the new rules
// instead of following the old NAT binding.
func flushUDP(keys []forward.Key) error {
	if len(keys) == 0 {
		return nil
	}
	c, err := conntrack.Dial(nil)
	if err != nil {
		return fmt.Errorf("conntrack: %w", err)
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		return fmt.Errorf("conntrack dump: %w", err)
	}
	var errs []error
	for _, f := range flows {
		o := f.TupleOrig
		if o.Proto.Protocol != syscall.IPPROTO_UDP {
			continue
		}
		dst := o.IP.DestinationAddress.Unmap()
		for _, k := range keys {
			if k.HostPort != o.Proto.DestinationPort || k.Is6() != dst.Is6() {
				continue
			}
			if !k.HostIP.IsUnspecified() && k.HostIP != dst {
				continue
			}
			if err := c.Delete(f); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("conntrack delete %s: %w", o, err))
			}
			break
		}
	}
	return errors.Join(errs...)
}
