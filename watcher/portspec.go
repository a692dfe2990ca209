package watcher

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// PortSpec is one host port forwarded to one container port, as written in
// the -p syntax. An invalid HostIP means "every address of both families".
type PortSpec struct {
	Proto         forward.Proto
	HostIP        netip.Addr
	HostPort      uint16
	ContainerPort uint16
}

// Limits on label input, so a hostile label cannot make berth allocate
// without bound.
const (
	MaxPortsLabelLen = 16 << 10
	MaxSpecsPerLabel = 20000
)

// ParsePorts parses a comma separated list in Docker's -p syntax:
//
//	[ip:]hostPort[-hostEnd]:containerPort[-containerEnd][/proto]
//
// with IPv6 addresses in brackets and proto tcp (default), udp or sctp.
// Unlike -p it needs an explicit host port: berth owns the host port of a
// label, so there is no ephemeral choice to make.
func ParsePorts(s string) ([]PortSpec, error) {
	if len(s) > MaxPortsLabelLen {
		return nil, fmt.Errorf("value is %d bytes long, more than the %d allowed", len(s), MaxPortsLabelLen)
	}
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("empty port list")
	}
	var out []PortSpec
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return nil, fmt.Errorf("entry %d is empty", i+1)
		}
		specs, err := parseOne(item)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", short(item), err)
		}
		if len(out)+len(specs) > MaxSpecsPerLabel {
			return nil, fmt.Errorf("more than %d ports in one label", MaxSpecsPerLabel)
		}
		out = append(out, specs...)
	}
	return out, nil
}

func short(s string) string {
	if len(s) > 64 {
		return s[:61] + "..."
	}
	return s
}

func parseOne(item string) ([]PortSpec, error) {
	for _, r := range item {
		if r > 0x7e || r < 0x20 {
			return nil, fmt.Errorf("contains a non-ASCII or control character")
		}
	}
	proto := forward.TCP
	if i := strings.LastIndexByte(item, '/'); i >= 0 {
		p, err := ParseProto(item[i+1:])
		if err != nil {
			return nil, err
		}
		proto, item = p, item[:i]
	}
	var hostIP netip.Addr
	rest := item
	if strings.HasPrefix(rest, "[") {
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return nil, fmt.Errorf("unclosed '[' in address")
		}
		a, err := netip.ParseAddr(rest[1:end])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return nil, fmt.Errorf("bad IPv6 address %q", rest[1:end])
		}
		hostIP = a
		rest = rest[end+1:]
		if !strings.HasPrefix(rest, ":") {
			return nil, fmt.Errorf("want ':' after the bracketed address")
		}
		rest = rest[1:]
	}
	parts := strings.Split(rest, ":")
	switch {
	case len(parts) == 3 && !hostIP.IsValid():
		a, err := netip.ParseAddr(parts[0])
		if err != nil || !a.Is4() {
			return nil, fmt.Errorf("bad host address %q (IPv6 addresses go in brackets: [::1]:8080:80)", parts[0])
		}
		hostIP, parts = a, parts[1:]
	case len(parts) == 2:
	case len(parts) == 1:
		return nil, fmt.Errorf("missing host port (write %s:%s)", parts[0], parts[0])
	default:
		return nil, fmt.Errorf("too many ':' (IPv6 addresses go in brackets: [::1]:8080:80)")
	}
	if parts[0] == "" {
		return nil, fmt.Errorf("empty host port (berth needs an explicit host port)")
	}
	hlo, hhi, err := parseRange(parts[0])
	if err != nil {
		return nil, fmt.Errorf("host port: %w", err)
	}
	clo, chi, err := parseRange(parts[1])
	if err != nil {
		return nil, fmt.Errorf("container port: %w", err)
	}
	if hhi-hlo != chi-clo {
		return nil, fmt.Errorf("host range %s has %d ports, container range %s has %d", parts[0], hhi-hlo+1, parts[1], chi-clo+1)
	}
	out := make([]PortSpec, 0, hhi-hlo+1)
	for i := 0; i <= hhi-hlo; i++ {
		out = append(out, PortSpec{Proto: proto, HostIP: hostIP, HostPort: uint16(hlo + i), ContainerPort: uint16(clo + i)})
	}
	return out, nil
}

func parseRange(s string) (lo, hi int, err error) {
	a, b, isRange := strings.Cut(s, "-")
	if lo, err = parsePort(a); err != nil {
		return 0, 0, err
	}
	if !isRange {
		return lo, lo, nil
	}
	if hi, err = parsePort(b); err != nil {
		return 0, 0, err
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("range %s is reversed", s)
	}
	return lo, hi, nil
}

func parsePort(s string) (int, error) {
	if s == "" {
		return 0, fmt.Errorf("empty port")
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, fmt.Errorf("port %q is not a number", short(s))
		}
	}
	if len(s) > 5 {
		return 0, fmt.Errorf("port %q out of range 1-65535", short(s))
	}
	n, _ := strconv.Atoi(s)
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d out of range 1-65535", n)
	}
	return n, nil
}

// ParseProto accepts tcp, udp and sctp.
func ParseProto(s string) (forward.Proto, error) {
	switch p := forward.Proto(strings.ToLower(s)); p {
	case forward.TCP, forward.UDP, forward.SCTP:
		return p, nil
	}
	return "", fmt.Errorf("unknown protocol %q (want tcp, udp or sctp)", short(s))
}
