package watcher

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/go-connections/nat"
)

// Labels berth reads from containers.
const (
	LabelPorts         = "berth.ports"
	LabelMode          = "berth.mode"
	LabelNetwork       = "berth.network"
	LabelProxyProtocol = "berth.proxy-protocol"
)

// Source says where a wanted mapping came from.
type Source string

const (
	SourcePublish Source = "publish" // -p / -P, read from inspect
	SourceLabel   Source = "label"   // berth.ports
)

// Want is one host port a container wants forwarded, before the reconciler
// picks the mode and the container address of the right family.
type Want struct {
	Key           forward.Key
	ContainerPort uint16
	Mode          forward.Mode // as asked: nat, relay or auto
	ProxyProtocol uint8
	Source        Source
}

// Container is what berth knows of one running container.
type Container struct {
	ID      string // short id, 12 hex digits
	Name    string
	Started time.Time
	Network string     // the network mappings forward through
	IPv4    netip.Addr // on Network; invalid if none
	IPv6    netip.Addr
	Wants   []Want
	// Errors are faults in the container's berth.* labels or network; each
	// names the label and the fault. Published ports still forward.
	Errors []string
}

// ShortID is Docker's 12 digit container id.
func ShortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// FromInspect turns an inspect result into what berth must forward. It is
// pure: everything it needs is in the inspect result.
func FromInspect(c container.InspectResponse, defaultMode forward.Mode) Container {
	out := Container{ID: ShortID(c.ID), Name: strings.TrimPrefix(c.Name, "/")}
	if c.State != nil {
		out.Started, _ = time.Parse(time.RFC3339Nano, c.State.StartedAt)
	}
	var labels map[string]string
	if c.Config != nil {
		labels = c.Config.Labels
	}
	fail := func(format string, a ...any) { out.Errors = append(out.Errors, fmt.Sprintf(format, a...)) }

	mode := defaultMode
	if v, ok := labels[LabelMode]; ok {
		m, err := forward.ParseMode(strings.TrimSpace(v))
		if err != nil {
			fail("label %s: %v", LabelMode, err)
		} else {
			mode = m
		}
	}
	var pp uint8
	if v, ok := labels[LabelProxyProtocol]; ok {
		switch strings.TrimSpace(strings.ToLower(v)) {
		case "v2", "2":
			pp = 2
			if mode == forward.ModeNAT {
				fail("label %s: PROXY protocol needs relay mode, but %s is nat", LabelProxyProtocol, LabelMode)
				pp = 0
			}
		case "", "off", "none":
		default:
			fail("label %s: unknown value %q (want v2)", LabelProxyProtocol, short(v))
		}
	}

	out.Network, out.IPv4, out.IPv6 = pickNetwork(c, labels, fail)

	seen := map[forward.Key]Source{}
	add := func(w Want) {
		if src, dup := seen[w.Key]; dup {
			if w.Source == SourceLabel {
				how := "twice in the label"
				if src == SourcePublish {
					how = "by the label and by docker -p"
				}
				fail("label %s: %s is claimed %s", LabelPorts, w.Key, how)
			}
			return
		}
		seen[w.Key] = w.Source
		out.Wants = append(out.Wants, w)
	}
	if c.HostConfig != nil && c.NetworkSettings != nil {
		for _, w := range published(c.HostConfig.PortBindings, c.NetworkSettings.Ports) {
			w.Mode, w.ProxyProtocol = mode, pp
			add(w)
		}
	}
	if v, ok := labels[LabelPorts]; ok {
		specs, err := ParsePorts(v)
		if err != nil {
			fail("label %s: %v", LabelPorts, err)
		}
		for _, s := range specs {
			for _, ip := range hostAddrs(s.HostIP) {
				add(Want{Key: forward.Key{Proto: s.Proto, HostIP: ip, HostPort: s.HostPort},
					ContainerPort: s.ContainerPort, Mode: mode, ProxyProtocol: pp, Source: SourceLabel})
			}
		}
	}
	if len(out.Wants) > 0 && !out.IPv4.IsValid() && !out.IPv6.IsValid() && out.Network != "" {
		fail("network %s: container has no IP address", out.Network)
	}
	sort.Slice(out.Wants, func(i, j int) bool { return lessKey(out.Wants[i].Key, out.Wants[j].Key) })
	return out
}

var (
	any4 = netip.IPv4Unspecified()
	any6 = netip.IPv6Unspecified()
)

// hostAddrs expands "every address" into one wildcard per family.
func hostAddrs(ip netip.Addr) []netip.Addr {
	if !ip.IsValid() {
		return []netip.Addr{any4, any6}
	}
	return []netip.Addr{ip.Unmap()}
}

// published reads Docker's port bindings. NetworkSettings.Ports is what
// Docker did (the real -P and range ports); PortBindings is what the user
// asked: an empty HostIp there means both families, even when Docker (with
// the userland proxy off, or on an IPv4-only network) reports only 0.0.0.0.
func published(asked, did nat.PortMap) []Want {
	var out []Want
	for port, binds := range did {
		proto, err := ParseProto(port.Proto())
		if err != nil {
			continue
		}
		cport, err := strconv.Atoi(port.Port())
		if err != nil || cport < 1 || cport > 65535 {
			continue
		}
		// -P leaves no request: Docker publishes on every address then.
		bothFamilies := len(asked[port]) == 0
		for _, a := range asked[port] {
			if a.HostIP == "" {
				bothFamilies = true
			}
		}
		for _, b := range binds {
			hport, err := strconv.Atoi(b.HostPort)
			if err != nil || hport < 1 || hport > 65535 {
				continue
			}
			var ips []netip.Addr
			if b.HostIP == "" {
				ips = []netip.Addr{any4, any6}
			} else if ip, err := netip.ParseAddr(b.HostIP); err == nil {
				ips = []netip.Addr{ip.Unmap()}
				if ip.IsUnspecified() && bothFamilies {
					ips = []netip.Addr{any4, any6}
				}
			}
			for _, ip := range ips {
				out = append(out, Want{Key: forward.Key{Proto: proto, HostIP: ip, HostPort: uint16(hport)},
					ContainerPort: uint16(cport), Source: SourcePublish})
			}
		}
	}
	return out
}

// pickNetwork finds the network mappings forward through: berth.network if
// set, else the one named by the network mode, else the first by name.
func pickNetwork(c container.InspectResponse, labels map[string]string, fail func(string, ...any)) (string, netip.Addr, netip.Addr) {
	if c.NetworkSettings == nil || len(c.NetworkSettings.Networks) == 0 {
		return "", netip.Addr{}, netip.Addr{}
	}
	nets := c.NetworkSettings.Networks
	name := ""
	if v, ok := labels[LabelNetwork]; ok {
		if _, ok := nets[v]; !ok {
			fail("label %s: container is not on network %q", LabelNetwork, short(v))
		} else {
			name = v
		}
	}
	if name == "" && c.HostConfig != nil {
		mode := string(c.HostConfig.NetworkMode)
		if mode == "default" {
			mode = "bridge"
		}
		if _, ok := nets[mode]; ok {
			name = mode
		}
	}
	if name == "" {
		names := make([]string, 0, len(nets))
		for n := range nets {
			names = append(names, n)
		}
		sort.Strings(names)
		name = names[0]
	}
	ep := nets[name]
	if ep == nil {
		return name, netip.Addr{}, netip.Addr{}
	}
	v4, _ := netip.ParseAddr(ep.IPAddress)
	v6, _ := netip.ParseAddr(ep.GlobalIPv6Address)
	return name, v4.Unmap(), v6
}

func lessKey(a, b forward.Key) bool {
	if a.Proto != b.Proto {
		return a.Proto < b.Proto
	}
	if a.HostPort != b.HostPort {
		return a.HostPort < b.HostPort
	}
	return a.HostIP.Less(b.HostIP)
}
