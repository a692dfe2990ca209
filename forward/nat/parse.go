package nat

import (
	"github.com/berth-dev/berth/forward/iptsave"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// saved is what one table of an iptables-save output holds of berth's.
// Lines of other chains are skipped, except rules in built-in chains that
// jump to berth or carry its comment.
type saved struct {
	table  string
	chains map[string]bool     // BERTH-* chains declared
	jumps  map[string][]string // built-in chain -> berth rules, as printed after "-A CHAIN "
	rules  map[string][]string // BERTH-* chain -> its rules, as printed, in order
}

var builtins = map[string]bool{
	"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true,
}

// parseSave reads the given table out of iptables-save output. It never
// fails: what it cannot read as berth's is left out, and a missing table is
// an empty one.
func parseSave(text, table string) *saved {
	s := &saved{table: table, chains: map[string]bool{}, jumps: map[string][]string{}, rules: map[string][]string{}}
	iptsave.Lines(text, func(tbl, line string) {
		switch {
		case tbl != table:
		case strings.HasPrefix(line, ":"+chainPrefix):
			name, _, _ := strings.Cut(line[1:], " ")
			s.chains[name] = true
		case strings.HasPrefix(line, "-A "):
			chain, rest, _ := strings.Cut(line[3:], " ")
			if strings.HasPrefix(chain, chainPrefix) {
				s.rules[chain] = append(s.rules[chain], rest)
			} else if builtins[chain] && isBerthJump(rest) {
				s.jumps[chain] = append(s.jumps[chain], rest)
			}
		}
	})
	return s
}

// isBerthJump reports whether a built-in chain's rule is berth's: it jumps
// to a BERTH- chain or carries the bare "berth" comment.
func isBerthJump(rest string) bool {
	if !strings.Contains(rest, chainPrefix) && !strings.Contains(rest, ownComment) {
		return false
	}
	toks, ok := iptsave.Tokenize(rest)
	if !ok {
		return false
	}
	for i := 0; i+1 < len(toks); i++ {
		switch toks[i] {
		case "-j", "-g":
			if strings.HasPrefix(toks[i+1], chainPrefix) {
				return true
			}
		case "--comment":
			if toks[i+1] == ownComment {
				return true
			}
		}
	}
	return false
}

// sameSpec compares a printed rule with the one berth would write,
// ignoring the order of options (iptables prints matches in its own order).
func sameSpec(printed string, want spec) bool {
	got, ok := iptsave.Tokenize(printed)
	if !ok || len(got) != len(want) {
		return false
	}
	w := slices.Clone([]string(want))
	slices.Sort(got)
	slices.Sort(w)
	return slices.Equal(got, w)
}

// ruleOpts are the options of a rule berth writes.
type ruleOpts struct {
	d, s, p, dport, comment, j, to string
}

// options reads a rule as option -> value pairs. Only the options berth
// writes are accepted, each once; anything else (a negation, a foreign
// match) makes the rule not berth's shape.
func options(printed string, dnat bool) (ruleOpts, bool) {
	var o ruleOpts
	toks, ok := iptsave.Tokenize(printed)
	if !ok || len(toks)%2 != 0 {
		return o, false
	}
	for i := 0; i < len(toks); i += 2 {
		k, v := toks[i], toks[i+1]
		var dst *string
		switch k {
		case "-m":
			switch v {
			case "tcp", "udp", "sctp":
				if !dnat {
					return o, false
				}
			case "comment":
			default:
				return o, false
			}
			continue
		case "-d":
			dst = &o.d
		case "--comment":
			dst = &o.comment
		case "-j":
			dst = &o.j
		case "-s":
			if dnat {
				return o, false
			}
			dst = &o.s
		case "-p", "--dport", "--to-destination":
			if !dnat {
				return o, false
			}
			switch k {
			case "-p":
				dst = &o.p
			case "--dport":
				dst = &o.dport
			default:
				dst = &o.to
			}
		default:
			return o, false
		}
		if *dst != "" || v == "" {
			return o, false
		}
		*dst = v
	}
	return o, true
}

// parseDNAT reads a rule of a DNAT bucket back into the mapping it serves.
// The rule's own matches are the truth; the comment gives only the
// container id.
func parseDNAT(printed string, v6 bool) (forward.Mapping, bool) {
	var m forward.Mapping
	opt, ok := options(printed, true)
	if !ok || opt.j != "DNAT" {
		return m, false
	}
	switch p := forward.Proto(opt.p); p {
	case forward.TCP, forward.UDP, forward.SCTP:
		m.Proto = p
	default:
		return m, false
	}
	port, err := strconv.ParseUint(opt.dport, 10, 16)
	if err != nil || port == 0 {
		return m, false
	}
	m.HostPort = uint16(port)
	if opt.d != "" {
		p, err := netip.ParsePrefix(opt.d)
		if err != nil || p.Bits() != p.Addr().BitLen() || p.Addr().Is6() != v6 || p.Addr().IsUnspecified() {
			return m, false
		}
		m.HostIP = p.Addr()
	} else if v6 {
		m.HostIP = netip.IPv6Unspecified()
	} else {
		m.HostIP = netip.IPv4Unspecified()
	}
	to, err := netip.ParseAddrPort(opt.to)
	if err != nil || to.Port() == 0 || to.Addr().Is6() != v6 || to.Addr().Zone() != "" {
		return m, false
	}
	m.ContainerIP, m.ContainerPort = to.Addr(), to.Port()
	id, ok := commentID(opt.comment)
	if !ok {
		return m, false
	}
	m.ContainerID = id
	m.Mode = forward.ModeNAT
	return m, true
}

// commentID takes the container id out of "berth <id> ...".
func commentID(c string) (string, bool) {
	f := strings.Fields(c)
	if len(f) < 2 || f[0] != ownComment {
		return "", false
	}
	if f[1] == "-" {
		return "", true
	}
	return f[1], validID(f[1])
}

// parseMasq reads a rule of a MASQ bucket.
func parseMasq(printed string, v6 bool) (masqRule, bool) {
	var r masqRule
	opt, ok := options(printed, false)
	if !ok || opt.j != "MASQUERADE" {
		return r, false
	}
	f := strings.Fields(opt.comment)
	if len(f) != 4 || f[0] != ownComment {
		return r, false
	}
	id, ok := commentID(opt.comment)
	if !ok {
		return r, false
	}
	r.ContainerID = id
	r.Kind = masqKind(f[2])
	d, err := netip.ParsePrefix(opt.d)
	if err != nil || d.Bits() != d.Addr().BitLen() || d.Addr().Is6() != v6 {
		return r, false
	}
	r.IP = d.Addr()
	s, err := netip.ParsePrefix(opt.s)
	if err != nil {
		return r, false
	}
	switch r.Kind {
	case masqHairpin:
		ok = s == d
	case masqLocalhost:
		ok = !v6 && s == loopback4
	default:
		ok = false
	}
	return r, ok
}

// parseEgress reads a rule of BERTH-EGRESS.
func parseEgress(printed string) (egressRule, bool) {
	var r egressRule
	toks, ok := iptsave.Tokenize(printed)
	if !ok {
		return r, false
	}
	// -s P ! -o BR -m comment --comment "berth egress BR" -j MASQUERADE
	want := egressRule{Bridge: "x"}.spec()
	if len(toks) != len(want) {
		return r, false
	}
	var sub, br string
	for i := 0; i < len(toks); i++ {
		switch {
		case toks[i] == "-s" && i+1 < len(toks):
			sub = toks[i+1]
			i++
		case toks[i] == "-o" && i+1 < len(toks):
			br = toks[i+1]
			i++
		}
	}
	p, err := netip.ParsePrefix(sub)
	if err != nil || br == "" {
		return r, false
	}
	r = egressRule{p, br}
	return r, sameSpec(printed, r.spec())
}
