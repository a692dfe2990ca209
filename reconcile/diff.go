// Package reconcile decides what berth must install (Resolve, Diff: pure),
// runs the sync loop that makes the backends match (Runner, Reconciler), and
// keeps the status snapshot of every mapping. It is the only package that
// logs.
package reconcile

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/watcher"
)

// Desired is one row of the desired state: a mapping to install, or a fault
// that keeps one from being installed.
type Desired struct {
	Mapping       forward.Mapping
	ContainerName string
	Source        watcher.Source
	Reason        string // why this mode, when auto chose
	Err           string // non-empty: not to be installed, and why
}

// Resolve turns the watcher's containers (oldest first) into desired rows:
// it picks each mapping's mode and container address, and settles host
// port conflicts in favour of the container that started first.
func Resolve(cs []watcher.Container) []Desired {
	var out []Desired
	type slot struct {
		proto forward.Proto
		port  uint16
		v6    bool
	}
	claimed := map[slot][]Desired{}
	for _, c := range cs {
		for _, e := range c.Errors {
			out = append(out, Desired{Mapping: forward.Mapping{ContainerID: c.ID}, ContainerName: c.Name,
				Source: watcher.SourceLabel, Err: fmt.Sprintf("container %s (%s): %s", c.Name, c.ID, e)})
		}
		for _, w := range c.Wants {
			d := resolveOne(c, w)
			if d.Err == "" {
				s := slot{w.Key.Proto, w.Key.HostPort, w.Key.Is6()}
				for _, o := range claimed[s] {
					if o.Mapping.Key.Overlaps(w.Key) {
						d.Err = fmt.Sprintf("%s is already forwarded to container %s (%s)", w.Key, o.ContainerName, o.Mapping.ContainerID)
						break
					}
				}
				if d.Err == "" {
					claimed[s] = append(claimed[s], d)
				}
			}
			out = append(out, d)
		}
	}
	return out
}

func resolveOne(c watcher.Container, w watcher.Want) Desired {
	d := Desired{ContainerName: c.Name, Source: w.Source}
	m := forward.Mapping{Key: w.Key, ContainerPort: w.ContainerPort, ContainerID: c.ID, ProxyProtocol: w.ProxyProtocol}
	fail := func(format string, a ...any) Desired {
		m.Mode = w.Mode
		d.Mapping = m
		d.Err = fmt.Sprintf(format, a...)
		return d
	}
	mode := w.Mode
	if w.Key.Is6() && w.Key.HostIP.IsLoopback() {
		// The kernel never routes ::1 off the host: only the relay serves it.
		if mode == forward.ModeNAT {
			return fail("nat cannot forward %s: the kernel does not route ::1 to a container; use relay or auto mode", w.Key)
		}
		if mode == forward.ModeAuto {
			mode, d.Reason = forward.ModeRelay, "auto: the kernel cannot NAT ::1"
		}
	}
	if w.Key.Is6() {
		switch {
		case c.IPv6.IsValid():
			m.ContainerIP = c.IPv6
		case c.IPv4.IsValid():
			m.ContainerIP = c.IPv4
			if mode == forward.ModeNAT {
				return fail("container %s has no IPv6 address on network %s: nat cannot forward %s to IPv4; use relay or auto mode", c.Name, c.Network, w.Key)
			}
			if mode == forward.ModeAuto {
				mode, d.Reason = forward.ModeRelay, "auto: IPv6 host address, IPv4-only container"
			}
		default:
			return fail("container %s has no IP address on network %q", c.Name, c.Network)
		}
	} else {
		if !c.IPv4.IsValid() {
			return fail("container %s has no IPv4 address on network %q for %s", c.Name, c.Network, w.Key)
		}
		m.ContainerIP = c.IPv4
	}
	if mode == forward.ModeAuto {
		if w.ProxyProtocol != 0 {
			mode, d.Reason = forward.ModeRelay, "auto: PROXY protocol needs the relay"
		} else {
			mode, d.Reason = forward.ModeNAT, "auto: kernel NAT can serve"
		}
	}
	if mode == forward.ModeRelay && w.Key.Proto == forward.SCTP {
		return fail("sctp is served by nat only, not relay")
	}
	m.Mode = mode
	d.Mapping = m
	return d
}

// Plan is what one backend must do: remove, then add.
type Plan struct {
	Add    []forward.Mapping
	Remove []forward.Mapping
}

// Empty reports whether there is nothing to do.
func (p Plan) Empty() bool { return len(p.Add) == 0 && len(p.Remove) == 0 }

// Diff compares what should be installed with what is. A mapping installed
// twice is removed once per extra copy; a key whose container address or
// port changed becomes a remove and an add in the same plan. It is pure and
// its output is sorted.
func Diff(desired, actual []forward.Mapping) Plan {
	want := make(map[forward.Mapping]bool, len(desired))
	for _, m := range desired {
		want[m] = true
	}
	have := make(map[forward.Mapping]int, len(actual))
	var p Plan
	for _, m := range actual {
		have[m]++
		if !want[m] || have[m] > 1 {
			p.Remove = append(p.Remove, m)
		}
	}
	for m := range want {
		if have[m] == 0 {
			p.Add = append(p.Add, m)
		}
	}
	slices.SortFunc(p.Add, compareMapping)
	slices.SortFunc(p.Remove, compareMapping)
	return p
}

func compareMapping(a, b forward.Mapping) int {
	return cmp.Or(
		cmp.Compare(a.Proto, b.Proto),
		cmp.Compare(a.HostPort, b.HostPort),
		a.HostIP.Compare(b.HostIP),
		a.ContainerIP.Compare(b.ContainerIP),
		cmp.Compare(a.ContainerPort, b.ContainerPort),
		cmp.Compare(a.ContainerID, b.ContainerID),
		cmp.Compare(a.Mode, b.Mode),
		cmp.Compare(a.ProxyProtocol, b.ProxyProtocol),
	)
}
