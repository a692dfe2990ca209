package dockerfwd

import (
	"github.com/berth-dev/berth/forward/iptsave"
	"net/netip"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// Forward is one host port dockerd forwards itself: a DNAT rule of its own
// (iptables chain DOCKER, nftables table docker-bridges) or a docker-proxy
// process.
type Forward struct {
	Proto forward.Proto
	// Dst is the host addresses matched: a /0 prefix is every address of
	// the family (a rule without -d, docker-proxy on 0.0.0.0 or ::).
	Dst  netip.Prefix
	Port uint16
	// Target is where the port goes (the rule's --to-destination, the
	// proxy's -container-ip:-container-port).
	Target netip.AddrPort
	// Via names who forwards: "dockerd iptables DNAT (chain DOCKER)".
	Via string
	// Proxy is true for a docker-proxy process: it serves its host key
	// whatever the target (a live process holds the socket), while a DNAT
	// rule counts only when its target is a running container's.
	Proxy bool
}

// Is6 reports whether the forward is on the IPv6 side.
func (f Forward) Is6() bool { return f.Dst.Addr().Is6() && !f.Dst.Addr().Is4In6() }

// Who strings, as shown in berth status.
const (
	ViaIPTables  = "dockerd iptables DNAT (chain DOCKER)"
	ViaIP6Tables = "dockerd ip6tables DNAT (chain DOCKER)"
	ViaNFT       = "dockerd nftables DNAT (table ip docker-bridges)"
	ViaNFT6      = "dockerd nftables DNAT (table ip6 docker-bridges)"
)

// IPTables is what one `iptables-save -t nat` (or ip6tables-save) output
// holds of Docker's port forwarding.
type IPTables struct {
	// Chain: the nat table declares a DOCKER chain (dockerd ran with
	// --iptables at some point; it leaves the chain when switched off).
	Chain bool
	// Jumped: PREROUTING or OUTPUT jumps to DOCKER, so its rules see
	// traffic. DNAT rules of a chain nothing jumps to forward nothing.
	Jumped bool
	// DNAT are the DNAT rules of the DOCKER chain, in order.
	DNAT []Forward
}

// ParseIPTablesSave reads iptables-save or ip6tables-save output (all
// tables or just -t nat), or `iptables -t nat -S CHAIN`. It never fails: rules it cannot read as a
// single-port DNAT are left out (Docker writes one rule per port).
func ParseIPTablesSave(text string, v6 bool) IPTables {
	var out IPTables
	via := ViaIPTables
	if v6 {
		via = ViaIP6Tables
	}
	iptsave.Lines(text, func(table, line string) {
		switch {
		case table != "nat" && table != "": // no header: `iptables -t nat -S` output
		case strings.HasPrefix(line, ":DOCKER "), line == "-N DOCKER":
			out.Chain = true
		case strings.HasPrefix(line, "-A DOCKER "):
			if f, ok := parseDNATRule(line[len("-A DOCKER "):], v6); ok {
				f.Via = via
				out.DNAT = append(out.DNAT, f)
			}
		case strings.HasPrefix(line, "-A PREROUTING "), strings.HasPrefix(line, "-A OUTPUT "):
			if strings.HasSuffix(line, " -j DOCKER") || strings.Contains(line, " -j DOCKER ") {
				out.Jumped = true
			}
		}
	})
	return out
}

// parseDNATRule reads the options of one DOCKER chain rule: -p, -d,
// --dport, -j DNAT --to-destination. A negated destination or port, a
// port range or an unreadable target makes it unusable.
func parseDNATRule(rest string, v6 bool) (Forward, bool) {
	var f Forward
	toks, ok := iptsave.Tokenize(rest)
	if !ok {
		return f, false
	}
	var dst, dport, to, jump, proto string
	for i := 0; i < len(toks); i++ {
		neg := false
		if toks[i] == "!" {
			neg = true
			i++
			if i >= len(toks) {
				return f, false
			}
		}
		k := toks[i]
		v := ""
		if i+1 < len(toks) {
			v = toks[i+1]
		}
		switch k {
		case "-d", "--destination":
			if neg {
				return f, false
			}
			dst = v
		case "--dport", "--destination-port":
			if neg {
				return f, false
			}
			dport = v
		case "-p", "--protocol":
			if neg {
				return f, false
			}
			proto = v
		case "-j":
			jump = v
		case "--to-destination":
			to = v
		default:
			continue // a flag we do not need, or its value
		}
		i++
	}
	if jump != "DNAT" || to == "" || dport == "" {
		return f, false
	}
	switch forward.Proto(proto) {
	case forward.TCP, forward.UDP, forward.SCTP:
		f.Proto = forward.Proto(proto)
	default:
		return f, false
	}
	port, err := strconv.ParseUint(dport, 10, 16)
	if err != nil || port == 0 {
		return f, false // a range "a:b" or garbage
	}
	f.Port = uint16(port)
	target, ok := parseTarget(to, f.Port)
	if !ok {
		return f, false
	}
	f.Target = target
	pfx, ok := parseDst(dst, v6)
	if !ok {
		return f, false
	}
	f.Dst = pfx
	return f, true
}

// parseDst reads "-d 127.0.0.1/32" (or a bare address); "" is every
// address of the family.
func parseDst(s string, v6 bool) (netip.Prefix, bool) {
	if s == "" {
		if v6 {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0), true
		}
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0), true
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, false
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return p, false
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is6() != v6 {
		return p, false
	}
	if p.Bits() == 0 { // 0.0.0.0/0 may be printed with its address
		return netip.PrefixFrom(p.Addr().Unmap(), 0).Masked(), true
	}
	return p.Masked(), true
}

// parseTarget reads a DNAT target: "172.17.0.2:80", "[fd00::2]:80", or an
// address alone (the port is kept). Port ranges are not Docker's.
func parseTarget(s string, port uint16) (netip.AddrPort, bool) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, ap.Port() != 0
	}
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a, port), true
}

// ParseNFTTable reads `nft list table ip docker-bridges` (family "ip") or
// `nft list table ip6 docker-bridges` ("ip6"): every rule with a DNAT to a
// single address and port, keyed by its protocol, port and daddr.
func ParseNFTTable(text, family string) []Forward {
	v6 := family == "ip6"
	via := ViaNFT
	if v6 {
		via = ViaNFT6
	}
	var out []Forward
	for line := range strings.Lines(text) {
		if !strings.Contains(line, "dnat ") {
			continue
		}
		if f, ok := parseNFTRule(strings.TrimSpace(line), v6); ok {
			f.Via = via
			out = append(out, f)
		}
	}
	return out
}

func parseNFTRule(line string, v6 bool) (Forward, bool) {
	var f Forward
	toks := fields(line)
	var dst, to string
	for i := 0; i+1 < len(toks); i++ {
		k, v := toks[i], toks[i+1]
		switch {
		case (k == "ip" || k == "ip6") && v == "daddr" && i+2 < len(toks):
			d := toks[i+2]
			if d == "!=" || strings.HasPrefix(d, "{") || strings.HasPrefix(d, "@") {
				return f, false
			}
			dst = d
			i += 2
		case (k == "tcp" || k == "udp" || k == "sctp") && v == "dport" && i+2 < len(toks):
			p, err := strconv.ParseUint(toks[i+2], 10, 16)
			if err != nil || p == 0 {
				return f, false // "!=", a range, a set
			}
			f.Proto, f.Port = forward.Proto(k), uint16(p)
			i += 2
		case k == "dnat":
			j := i + 1
			if j < len(toks) && (toks[j] == "ip" || toks[j] == "ip6") {
				j++
			}
			if j+1 < len(toks) && toks[j] == "to" {
				to = toks[j+1]
			}
			i = len(toks)
		}
	}
	if f.Proto == "" || to == "" {
		return f, false
	}
	target, ok := parseTarget(to, f.Port)
	if !ok {
		return f, false
	}
	pfx, ok := parseDst(dst, v6)
	if !ok {
		return f, false
	}
	f.Target, f.Dst = target, pfx
	return f, true
}

// ParseProxyArgs reads a docker-proxy command line (argv, program name
// first): -proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip
// 172.17.0.2 -container-port 80, in Go's flag syntax (-x v, -x=v, --x).
func ParseProxyArgs(argv []string) (Forward, bool) {
	var f Forward
	if len(argv) == 0 {
		return f, false
	}
	vals := map[string]string{"proto": "tcp", "host-ip": "0.0.0.0"}
	for i := 1; i < len(argv); i++ {
		a := argv[i]
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name := strings.TrimLeft(a, "-")
		if k, v, ok := strings.Cut(name, "="); ok {
			vals[k] = v
			continue
		}
		switch name {
		case "proto", "host-ip", "host-port", "container-ip", "container-port":
			if i+1 < len(argv) {
				vals[name] = argv[i+1]
				i++
			}
		}
	}
	switch forward.Proto(vals["proto"]) {
	case forward.TCP, forward.UDP, forward.SCTP:
		f.Proto = forward.Proto(vals["proto"])
	default:
		return f, false
	}
	hp, err := strconv.ParseUint(vals["host-port"], 10, 16)
	if err != nil || hp == 0 {
		return f, false
	}
	cp, err := strconv.ParseUint(vals["container-port"], 10, 16)
	if err != nil || cp == 0 {
		return f, false
	}
	hip, err := netip.ParseAddr(vals["host-ip"])
	if err != nil {
		return f, false
	}
	cip, err := netip.ParseAddr(vals["container-ip"])
	if err != nil {
		return f, false
	}
	hip = hip.Unmap()
	bits := hip.BitLen()
	if hip.IsUnspecified() {
		bits = 0
	}
	f.Dst = netip.PrefixFrom(hip, bits)
	f.Port = uint16(hp)
	f.Target = netip.AddrPortFrom(cip.Unmap(), uint16(cp))
	f.Proxy = true
	return f, true
}

// fields splits an nft rule into tokens: spaces separate, double quotes
// group (with backslash escapes), the quotes are dropped. It is lenient
// with quotes inside a token ({ "a", "b" }), which nft prints and iptables
// rules (read with iptsave.Tokenize) never hold.
func fields(s string) []string {
	if strings.IndexByte(s, '"') < 0 {
		return strings.Fields(s)
	}
	toks := make([]string, 0, 24)
	for i := 0; i < len(s); {
		if s[i] == ' ' || s[i] == '\t' {
			i++
			continue
		}
		var b strings.Builder
		quoted := false
		for i < len(s) {
			c := s[i]
			if !quoted && (c == ' ' || c == '\t') {
				break
			}
			if c == '"' {
				quoted = !quoted
				i++
				continue
			}
			if quoted && c == '\\' && i+1 < len(s) {
				b.WriteByte(s[i+1])
				i += 2
				continue
			}
			b.WriteByte(c)
			i++
		}
		toks = append(toks, b.String())
	}
	return toks
}
