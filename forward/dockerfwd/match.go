package dockerfwd

import (
	"net/netip"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// slot groups forwards by what a lookup knows first.
type slot struct {
	proto forward.Proto
	port  uint16
	v6    bool
}

// Match returns, for the wanted mappings, the host keys dockerd already
// forwards, with who does it. A forward covers a mapping's key when the
// protocol, port and family agree and its destination is every address of
// the family or contains the key's (specific) address. A DNAT rule counts
// only when its target is the mapping's container address and port: rules
// left in an unused DOCKER chain (dockerd --iptables=false keeps them) or
// for a container gone must not make berth skip a port. A docker-proxy
// process counts by key alone: a live one serves the port. Cost is linear
// in mappings plus forwards.
func Match(fws []Forward, ms []forward.Mapping) map[forward.Key]string {
	if len(fws) == 0 || len(ms) == 0 {
		return nil
	}
	by := make(map[slot][]int, len(fws))
	for i, f := range fws {
		s := slot{f.Proto, f.Port, f.Is6()}
		by[s] = append(by[s], i)
	}
	out := map[forward.Key]string{}
	for _, m := range ms {
		if _, done := out[m.Key]; done {
			continue
		}
		ip := m.HostIP.Unmap()
		cands := by[slot{m.Proto, m.HostPort, m.Key.Is6()}]
		var who []string
		for _, i := range cands {
			f := fws[i]
			if !covers(f.Dst, ip) {
				continue
			}
			if !f.Proxy && f.Target != netip.AddrPortFrom(m.ContainerIP.Unmap(), m.ContainerPort) {
				continue
			}
			if !contains(who, f.Via) {
				who = append(who, f.Via)
			}
		}
		if len(who) > 0 {
			out[m.Key] = strings.Join(who, " + ")
		}
	}
	return out
}

func covers(dst netip.Prefix, ip netip.Addr) bool {
	if dst.Bits() == 0 {
		return true
	}
	return !ip.IsUnspecified() && dst.Contains(ip)
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
