// Package forward holds the types every forwarding backend shares and the
// Forwarder contract. Backends live in sub-packages (nat, relay); they return
// errors with the mapping in them and never log.
package forward

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// Proto is a transport protocol a mapping forwards.
type Proto string

const (
	TCP  Proto = "tcp"
	UDP  Proto = "udp"
	SCTP Proto = "sctp" // nat only
)

// Mode says which backend serves a mapping.
type Mode string

const (
	ModeNAT   Mode = "nat"
	ModeRelay Mode = "relay"
	// ModeAuto is a request, never an installed mode: the reconciler
	// resolves it to nat or relay before a mapping reaches a backend.
	ModeAuto Mode = "auto"
)

// ParseMode accepts nat, relay and auto.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeNAT, ModeRelay, ModeAuto:
		return Mode(s), nil
	}
	return "", fmt.Errorf("unknown mode %q (want nat, relay or auto)", s)
}

// Key is what owns a host port. An unspecified HostIP (0.0.0.0 or ::) means
// every address of that family.
type Key struct {
	Proto    Proto
	HostIP   netip.Addr
	HostPort uint16
}

// Is6 reports whether the key is on the IPv6 side.
func (k Key) Is6() bool { return k.HostIP.Is6() && !k.HostIP.Is4In6() }

// Overlaps reports whether two keys compete for the same socket or packets:
// same protocol, port and family, and equal addresses or one of them the
// wildcard.
func (k Key) Overlaps(o Key) bool {
	if k.Proto != o.Proto || k.HostPort != o.HostPort || k.Is6() != o.Is6() {
		return false
	}
	return k.HostIP == o.HostIP || k.HostIP.IsUnspecified() || o.HostIP.IsUnspecified()
}

func (k Key) String() string {
	return string(k.Proto) + " " + netip.AddrPortFrom(k.HostIP, k.HostPort).String()
}

// Mapping is one host port forwarded to one container port. It is comparable
// and used as a map key; two mappings are the same forward only if every
// field is equal.
type Mapping struct {
	Key
	ContainerIP   netip.Addr
	ContainerPort uint16
	// ContainerID is Docker's short (12 hex digit) container id.
	ContainerID string
	Mode        Mode
	// ProxyProtocol is 2 to prepend a PROXY protocol v2 header (relay only),
	// 0 for none.
	ProxyProtocol uint8
}

// Target is the container address the mapping forwards to.
func (m Mapping) Target() netip.AddrPort {
	return netip.AddrPortFrom(m.ContainerIP, m.ContainerPort)
}

// String reads like "tcp 0.0.0.0:8080 -> 172.17.0.2:80 (3f2a9c0d1e2b)".
func (m Mapping) String() string {
	s := m.Key.String() + " -> " + m.Target().String()
	if m.ContainerID != "" {
		s += " (" + m.ContainerID + ")"
	}
	if m.ProxyProtocol != 0 {
		s += " proxy-v" + strconv.Itoa(int(m.ProxyProtocol))
	}
	return s
}

// Forwarder is what a backend offers the reconciler. Implementations must be
// safe for use by one goroutine at a time for Apply and List; Stats (if
// offered) may be called concurrently with them.
type Forwarder interface {
	// Apply removes then adds the given mappings. It is idempotent: adding
	// an installed mapping or removing an absent one is not an error. A
	// failure that concerns single mappings is reported as one or more
	// *MappingError joined with errors.Join; the other mappings of the
	// batch are applied regardless.
	Apply(ctx context.Context, add, remove []Mapping) error
	// List returns what is really installed, read back from the kernel or
	// the live listeners, not from a cache of what was asked.
	List(ctx context.Context) ([]Mapping, error)
}

// Cacher is offered by backends whose List is a costly kernel dump (NAT at
// 10,000 rules). Cached returns what the backend knows it has installed,
// as of its last List or successful Apply, without reading the kernel; ok
// is false when it holds no view it trusts, and the caller must List.
// The reconciler uses it between periodic full resyncs, so a sync costs
// work proportional to the change, not to the table.
type Cacher interface {
	Cached() (ms []Mapping, ok bool)
}

// Stats are a relay's per-mapping counters.
type Stats struct {
	Conns       uint64 `json:"connections"`        // TCP connections accepted
	ActiveTCP   int64  `json:"active_connections"` // open now
	BytesIn     uint64 `json:"bytes_in"`           // client -> container
	BytesOut    uint64 `json:"bytes_out"`          // container -> client
	Flows       uint64 `json:"udp_flows"`          // UDP flows created
	ActiveUDP   int64  `json:"active_udp_flows"`   // UDP flows open now
	Drops       uint64 `json:"drops"`              // refused: table or connection limit
	KernelDrops uint64 `json:"kernel_drops"`       // UDP datagrams the kernel dropped at the listening socket (receive buffer full)
	Errors      uint64 `json:"errors"`             // dial, copy or write failures
}

// StatsReporter is offered by backends that count traffic (the relay).
type StatsReporter interface {
	Stats() map[Key]Stats
}

// MappingError is a failure that concerns one mapping.
type MappingError struct {
	Mapping Mapping
	Op      string // "add" or "remove"
	Err     error
}

func (e *MappingError) Error() string {
	return e.Mapping.String() + ": " + e.Op + ": " + e.Err.Error()
}

func (e *MappingError) Unwrap() error { return e.Err }

// SplitErrors separates an Apply error into per-mapping failures (by key)
// and whatever concerned the whole batch.
func SplitErrors(err error) (per map[Mapping]error, batch error) {
	if err == nil {
		return nil, nil
	}
	per = map[Mapping]error{}
	var rest []error
	var walk func(error)
	walk = func(e error) {
		var me *MappingError
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				walk(x)
			}
			return
		}
		if errors.As(e, &me) {
			per[me.Mapping] = me
			return
		}
		rest = append(rest, e)
	}
	walk(err)
	return per, errors.Join(rest...)
}
