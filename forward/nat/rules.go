package nat

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// Chain names. Everything berth owns starts with "BERTH-".
const (
	chainPrefix      = "BERTH-"
	chainPrerouting  = "BERTH-PREROUTING"
	chainOutput      = "BERTH-OUTPUT"
	chainPostrouting = "BERTH-POSTROUTING"
	chainEgress      = "BERTH-EGRESS"
	chainGuard       = "BERTH-GUARD" // raw table, IPv4 only
	dnatPrefix       = "BERTH-DNAT-"
	masqPrefix       = "BERTH-MASQ-"

	// buckets is how many DNAT (and MASQ) chains the mappings are spread
	// over, by container id. Changing one container rewrites one bucket
	// (declaring a chain in iptables-restore flushes it), so the cost of a
	// partial update is ~1/buckets of the table and never needs a "-D" that
	// could fail on a rule someone else already removed.
	buckets = 64

	ownComment    = "berth"
	canaryComment = "berth canary"
	guardComment  = "berth guard: martian 127.0.0.0/8 (CVE-2020-8558)"
)

var loopback4 = netip.MustParsePrefix("127.0.0.0/8")

// spec is one rule's arguments after "-A CHAIN", one token per element.
type spec []string

// String quotes tokens the way iptables-save does, so the text can be fed
// to iptables-restore.
func (s spec) String() string {
	var b strings.Builder
	for i, t := range s {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(quote(t))
	}
	return b.String()
}

func quote(t string) string {
	if t != "" && !strings.ContainsAny(t, " \t\"\\'") {
		return t
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`)
	return `"` + r.Replace(t) + `"`
}

// bucketOf is the bucket a container's rules live in.
func bucketOf(containerID string) int {
	h := fnv.New32a()
	h.Write([]byte(containerID))
	return int(h.Sum32() % buckets)
}

func dnatChain(b int) string { return fmt.Sprintf("%s%02x", dnatPrefix, b) }
func masqChain(b int) string { return fmt.Sprintf("%s%02x", masqPrefix, b) }

// masqFor is the MASQ chain paired with a DNAT chain.
func masqFor(dnat string) string { return masqPrefix + strings.TrimPrefix(dnat, dnatPrefix) }

// jump is a rule in a built-in chain that sends packets to berth.
type jump struct {
	table, chain string
	spec         spec
}

// layout is every chain berth keeps in one table of one family, what the
// structural ones hold, and the jumps from the built-ins.
type layout struct {
	table  string
	chains []string // in creation order
	base   map[string][]spec
	jumps  []jump
}

func jumpSpec(target string) spec {
	return spec{"-m", "comment", "--comment", ownComment, "-j", target}
}

func canarySpec() spec { return spec{"-m", "comment", "--comment", canaryComment} }

func guardSpec() spec {
	return spec{"-d", "127.0.0.0/8", "!", "-i", "lo", "-m", "comment", "--comment", guardComment, "-j", "DROP"}
}

// natLayout is berth's nat table. PREROUTING and OUTPUT enter only for
// local destinations; every bucket is jumped to from both.
func natLayout() layout {
	l := layout{table: "nat", base: map[string][]spec{}}
	l.chains = append(l.chains, chainPrerouting, chainOutput, chainPostrouting, chainEgress)
	pre := []spec{canarySpec()}
	var out, post []spec
	for b := 0; b < buckets; b++ {
		l.chains = append(l.chains, dnatChain(b), masqChain(b))
		pre = append(pre, jumpSpec(dnatChain(b)))
		out = append(out, jumpSpec(dnatChain(b)))
		post = append(post, jumpSpec(masqChain(b)))
	}
	post = append(post, jumpSpec(chainEgress))
	l.base[chainPrerouting] = pre
	l.base[chainOutput] = out
	l.base[chainPostrouting] = post
	local := spec{"-m", "addrtype", "--dst-type", "LOCAL"}
	l.jumps = []jump{
		{"nat", "PREROUTING", append(local[:4:4], jumpSpec(chainPrerouting)...)},
		{"nat", "OUTPUT", append(local[:4:4], jumpSpec(chainOutput)...)},
		{"nat", "POSTROUTING", jumpSpec(chainPostrouting)},
	}
	return l
}

// rawLayout is the IPv4 guard: route_localnet=1 on a bridge lets a
// neighbour send packets to 127.0.0.0/8 through it, so drop any that arrive
// on a non-loopback interface. It sits in raw PREROUTING, before conntrack
// and NAT: replies to DNATed localhost connections still carry the bridge
// address there (they are un-NATed to 127.0.0.1 later), so they pass.
func rawLayout() layout {
	return layout{
		table:  "raw",
		chains: []string{chainGuard},
		base:   map[string][]spec{chainGuard: {guardSpec()}},
		jumps:  []jump{{"raw", "PREROUTING", jumpSpec(chainGuard)}},
	}
}

func (l layout) isBerthChain(c string) bool {
	for _, x := range l.chains {
		if x == c {
			return true
		}
	}
	return false
}

// mappingComment names the container and the mapping, e.g.
// "berth 3f2a9c0d1e2b tcp 0.0.0.0:8080->172.17.0.2:80".
func mappingComment(m forward.Mapping) string {
	return fmt.Sprintf("berth %s %s %s->%s", cidField(m.ContainerID), m.Proto,
		netip.AddrPortFrom(m.HostIP, m.HostPort), m.Target())
}

func cidField(id string) string {
	if id == "" {
		return "-"
	}
	return id
}

func hostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// dnatSpec is the rule for one mapping. An unspecified host address has no
// -d: the jump already restricts to local destinations of the family.
func dnatSpec(m forward.Mapping) spec {
	var s spec
	if !m.HostIP.IsUnspecified() {
		s = append(s, "-d", hostPrefix(m.HostIP))
	}
	p := string(m.Proto)
	s = append(s, "-p", p, "-m", p, "--dport", strconv.Itoa(int(m.HostPort)),
		"-m", "comment", "--comment", mappingComment(m),
		"-j", "DNAT", "--to-destination", m.Target().String())
	return s
}

// masqKind says why berth masquerades traffic to a container.
type masqKind string

const (
	// hairpin: the container reaches itself through its published port;
	// without SNAT its reply would bypass conntrack.
	masqHairpin masqKind = "hairpin"
	// localhost: a host process reached 127.0.0.1:port; the container
	// cannot answer a 127.0.0.0/8 source.
	masqLocalhost masqKind = "localhost"
)

// masqRule is one MASQUERADE rule for a container address. They are per
// container address, not per mapping: a packet from the container to
// itself, or from 127.0.0.0/8 to it, exists only through a DNAT, so a port
// match would add rules without narrowing anything.
type masqRule struct {
	Kind        masqKind
	ContainerID string
	IP          netip.Addr
}

func (r masqRule) spec() spec {
	src := hostPrefix(r.IP)
	if r.Kind == masqLocalhost {
		src = loopback4.String()
	}
	return spec{"-s", src, "-d", hostPrefix(r.IP), "-m", "comment", "--comment",
		fmt.Sprintf("berth %s %s %s", cidField(r.ContainerID), r.Kind, r.IP),
		"-j", "MASQUERADE"}
}

// needsLocalhost reports whether a mapping serves 127.0.0.1 (IPv4 only:
// the kernel never routes ::1 off the host, so NAT cannot serve [::1]).
func needsLocalhost(m forward.Mapping) bool {
	return m.HostIP.Is4() && (m.HostIP.IsUnspecified() || loopback4.Contains(m.HostIP))
}

// masqRules derives a DNAT chain's MASQUERADE rules, deduplicated, in a
// stable order.
func masqRules(ms []forward.Mapping) []masqRule {
	seen := map[masqRule]bool{}
	var out []masqRule
	add := func(r masqRule) {
		if !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	for _, m := range ms {
		add(masqRule{masqHairpin, m.ContainerID, m.ContainerIP})
		if needsLocalhost(m) {
			add(masqRule{masqLocalhost, m.ContainerID, m.ContainerIP})
		}
	}
	return out
}

// Bridge is a Docker network's bridge interface and its subnets, for egress
// masquerade when dockerd runs with --iptables=false.
type Bridge struct {
	Name    string
	Subnets []netip.Prefix
}

// egressRule masquerades a bridge subnet leaving through another interface.
type egressRule struct {
	Subnet netip.Prefix
	Bridge string
}

func (r egressRule) spec() spec {
	return spec{"-s", r.Subnet.Masked().String(), "!", "-o", r.Bridge, "-m", "comment", "--comment",
		"berth egress " + r.Bridge, "-j", "MASQUERADE"}
}

// egressRules is what BERTH-EGRESS should hold for one family.
func egressRules(on bool, bridges []Bridge, v6 bool) []egressRule {
	if !on {
		return nil
	}
	var out []egressRule
	for _, b := range bridges {
		for _, p := range b.Subnets {
			if p.Addr().Is6() == v6 && !p.Addr().Is4In6() {
				out = append(out, egressRule{p.Masked(), b.Name})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Bridge != out[j].Bridge {
			return out[i].Bridge < out[j].Bridge
		}
		return out[i].Subnet.String() < out[j].Subnet.String()
	})
	return out
}

// batch collects one iptables-restore --noflush input for one table:
// chain declarations (create, or flush an existing chain), then deletions,
// then the rest, then chain removals.
type batch struct {
	table   string
	decl    []string
	del     []string
	rules   []string
	remove  []string
	declSet map[string]bool
}

func newBatch(table string) *batch { return &batch{table: table, declSet: map[string]bool{}} }

func (b *batch) declare(chain string) {
	if !b.declSet[chain] {
		b.declSet[chain] = true
		b.decl = append(b.decl, ":"+chain+" - [0:0]")
	}
}

func (b *batch) add(chain string, s spec) { b.rules = append(b.rules, "-A "+chain+" "+s.String()) }

func (b *batch) insert(chain string, s spec) {
	b.rules = append(b.rules, "-I "+chain+" 1 "+s.String())
}

// deleteSaved deletes a rule by the text iptables-save printed for it.
func (b *batch) deleteSaved(chain, savedSpec string) {
	b.del = append(b.del, "-D "+chain+" "+savedSpec)
}

func (b *batch) drop(chain string) {
	b.declare(chain) // make sure it exists and is empty, so -X cannot fail
	b.remove = append(b.remove, "-X "+chain)
}

func (b *batch) empty() bool {
	return len(b.decl)+len(b.del)+len(b.rules)+len(b.remove) == 0
}

func (b *batch) String() string {
	if b.empty() {
		return ""
	}
	var s strings.Builder
	s.WriteString("*" + b.table + "\n")
	for _, part := range [][]string{b.decl, b.del, b.rules, b.remove} {
		for _, l := range part {
			s.WriteString(l)
			s.WriteByte('\n')
		}
	}
	s.WriteString("COMMIT\n")
	return s.String()
}
