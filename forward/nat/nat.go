// Package nat is berth's kernel forwarding backend: DNAT rules in chains
// berth owns (BERTH-* in the nat table, and an IPv4 guard in raw), written
// in one iptables-restore --noflush batch per family and read back with
// iptables-save. It never edits a chain or rule it did not create.
//
// Layout (nat table, per family):
//
//	PREROUTING  -m addrtype --dst-type LOCAL -j BERTH-PREROUTING  (one rule, comment "berth")
//	OUTPUT      -m addrtype --dst-type LOCAL -j BERTH-OUTPUT
//	POSTROUTING -j BERTH-POSTROUTING
//	BERTH-PREROUTING: canary, then -j BERTH-DNAT-00 .. -3f
//	BERTH-OUTPUT:     -j BERTH-DNAT-00 .. -3f
//	BERTH-POSTROUTING: -j BERTH-MASQ-00 .. -3f, -j BERTH-EGRESS
//	BERTH-DNAT-xx: one DNAT rule per mapping of the containers hashed there
//	BERTH-MASQ-xx: hairpin and localhost MASQUERADE for those containers
//	BERTH-EGRESS: bridge subnet MASQUERADE (dockerd --iptables=false)
//
// and in raw (IPv4): PREROUTING -j BERTH-GUARD, which drops packets to
// 127.0.0.0/8 arriving on any interface but lo.
//
// NAT cannot serve [::1]: the kernel never routes ::1 off the host, so a
// mapping on ::1 is refused and an IPv6 mapping on :: does not answer
// [::1] clients; the reconciler sends those to the relay.
package nat

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/coreos/go-iptables/iptables"
)

// Options configure a Table.
type Options struct {
	// Flavour is "auto" (or empty) to detect what dockerd and the host
	// use, or "nft" or "legacy".
	Flavour string
	// IPv6 enables the ip6tables side; without it IPv6 mappings are
	// refused.
	IPv6 bool
	// Masquerade turns on egress MASQUERADE for the bridges given with
	// SetBridges (for dockerd --iptables=false).
	Masquerade bool
	// Bridges are the initial bridges for egress masquerade.
	Bridges []Bridge
	// NoConntrackFlush keeps conntrack entries of changed UDP mappings.
	// By default they are deleted so existing flows meet the new rules.
	NoConntrackFlush bool
}

// Table is berth's NAT forwarder. It implements forward.Forwarder. All
// methods are safe for concurrent use; they serialise on one lock.
type Table struct {
	mu         sync.Mutex
	flavour    string
	fams       []*family // IPv4, then IPv6 when enabled
	all        []*family // both, for Cleanup
	masquerade bool
	bridges    []Bridge
	noFlush    bool
}

var _ forward.Forwarder = (*Table)(nil)

// family is one address family's tools and what berth knows of its tables.
type family struct {
	v6  bool
	t   tools
	ipt *iptables.IPTables
	// st is the last state read back (List) and updated by each
	// successful write; nil means "read it again before writing".
	st *state
	// ensured is true once chains and jumps were verified in both tables;
	// Check failing or a write failing clears it.
	ensured bool
	// localnet are container addresses whose route_localnet could not be
	// set; every Apply retries them while a mapping to them is installed.
	localnet map[netip.Addr]bool
}

func (f *family) name() string {
	if f.v6 {
		return "ipv6"
	}
	return "ipv4"
}

// state is what the DNAT buckets hold, read from iptables-save.
type state struct {
	chains map[string][]forward.Mapping // DNAT bucket -> mappings in order, duplicates kept
	count  map[forward.Mapping]int
	dirty  map[string]bool // buckets to rewrite: rules berth cannot read, MASQ out of step
	egress []egressRule
	// egressBad: BERTH-EGRESS holds something berth cannot read.
	egressBad bool
	saved     *saved
}

// New makes a Table. It detects the flavour (Options.Flavour "auto") but
// writes nothing: Apply and Ensure create the chains.
func New(opts Options) (*Table, error) {
	fl := opts.Flavour
	switch fl {
	case "", "auto":
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		fl = detectFlavour(ctx)
		cancel()
	case FlavourNFT, FlavourLegacy:
	default:
		return nil, fmt.Errorf("nat: unknown iptables flavour %q (want auto, nft or legacy)", opts.Flavour)
	}
	t := &Table{flavour: fl, masquerade: opts.Masquerade, bridges: cloneBridges(opts.Bridges), noFlush: opts.NoConntrackFlush}
	for _, v6 := range []bool{false, true} {
		f, err := newFamily(fl, v6)
		if err != nil {
			if v6 && !opts.IPv6 {
				continue // Cleanup of IPv6 is best effort then
			}
			return nil, fmt.Errorf("nat: %w", err)
		}
		t.all = append(t.all, f)
		if !v6 || opts.IPv6 {
			t.fams = append(t.fams, f)
		}
	}
	return t, nil
}

func newFamily(fl string, v6 bool) (*family, error) {
	tl, err := findTools(fl, v6)
	if err != nil {
		return nil, err
	}
	proto := iptables.ProtocolIPv4
	if v6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.Path(tl.iptables), iptables.IPFamily(proto))
	if err != nil {
		return nil, err
	}
	return &family{v6: v6, t: tl, ipt: ipt}, nil
}

func cloneBridges(bs []Bridge) []Bridge {
	out := make([]Bridge, len(bs))
	for i, b := range bs {
		out[i] = Bridge{b.Name, slices.Clone(b.Subnets)}
	}
	return out
}

// Flavour is the iptables flavour in use: "nft" or "legacy".
func (t *Table) Flavour() string { return t.flavour }

// SetBridges sets the bridges for egress masquerade; the next Apply brings
// BERTH-EGRESS in step.
func (t *Table) SetBridges(bs []Bridge) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.bridges = cloneBridges(bs)
}

// SetMasquerade turns egress masquerade on or off from the next Apply.
func (t *Table) SetMasquerade(on bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.masquerade = on
}

// validID is what berth accepts as a container id in comments and names.
func validID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return id != "-"
}

// validate says why a mapping cannot be served by NAT (nil if it can).
func (t *Table) validate(m forward.Mapping) error {
	switch {
	case m.Mode != forward.ModeNAT:
		return fmt.Errorf("mode %q is not nat", m.Mode)
	case m.Proto != forward.TCP && m.Proto != forward.UDP && m.Proto != forward.SCTP:
		return fmt.Errorf("protocol %q not supported", m.Proto)
	case !m.HostIP.IsValid() || m.HostIP.Is4In6() || m.HostIP.Zone() != "":
		return fmt.Errorf("host address %v not usable (want plain IPv4 or IPv6)", m.HostIP)
	case !m.ContainerIP.IsValid() || m.ContainerIP.Is4In6() || m.ContainerIP.Zone() != "" || m.ContainerIP.IsUnspecified():
		return fmt.Errorf("container address %v not usable", m.ContainerIP)
	case m.HostIP.Is6() != m.ContainerIP.Is6():
		return errors.New("NAT cannot forward between IPv4 and IPv6 (use relay)")
	case m.HostPort == 0 || m.ContainerPort == 0:
		return errors.New("port 0")
	case m.HostIP == netip.IPv6Loopback():
		return errors.New("NAT cannot serve [::1]: the kernel never routes ::1 off the host (use relay)")
	case m.HostIP.Is6() && len(t.fams) < 2:
		return errors.New("IPv6 NAT is disabled")
	case m.ContainerID != "" && !validID(m.ContainerID):
		return fmt.Errorf("container id %q has characters berth does not put in a rule comment", m.ContainerID)
	case m.ProxyProtocol != 0:
		return errors.New("PROXY protocol needs the relay")
	}
	return nil
}

// List reads back what berth's DNAT chains hold, one Mapping per rule (a
// duplicated rule is listed twice). It takes one iptables-save per family.
func (t *Table) List(ctx context.Context) ([]forward.Mapping, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []forward.Mapping
	for _, f := range t.fams {
		if err := t.refresh(ctx, f); err != nil {
			return nil, err
		}
		out = append(out, f.st.mappings()...)
	}
	return out, nil
}

// Cached returns the mappings as of the last List or successful Apply, or
// ok=false when a family must be read again first (never read, a write
// failed, or Check found the chains gone). It implements forward.Cacher.
func (t *Table) Cached() ([]forward.Mapping, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []forward.Mapping
	for _, f := range t.fams {
		if f.st == nil || !f.ensured {
			return nil, false
		}
		out = append(out, f.st.mappings()...)
	}
	return out, true
}

var _ forward.Cacher = (*Table)(nil)

func (s *state) mappings() []forward.Mapping {
	var out []forward.Mapping
	for b := 0; b < buckets; b++ {
		out = append(out, s.chains[dnatChain(b)]...)
	}
	return out
}

// refresh reads the family's nat table into f.st.
func (t *Table) refresh(ctx context.Context, f *family) error {
	out, err := run(ctx, f.t.save, "", "-t", "nat")
	if err != nil {
		f.st = nil
		return fmt.Errorf("nat %s: %w", f.name(), err)
	}
	f.st = readState(parseSave(out, "nat"), f.v6)
	if !structureFix(f.st.saved, natLayout()).empty() {
		f.ensured = false
	}
	return nil
}

// readState interprets the nat table: mappings per bucket, and which
// buckets need a rewrite to be what berth would write.
func readState(sv *saved, v6 bool) *state {
	st := &state{chains: map[string][]forward.Mapping{}, count: map[forward.Mapping]int{}, dirty: map[string]bool{}, saved: sv}
	for b := 0; b < buckets; b++ {
		c := dnatChain(b)
		var ms []forward.Mapping
		for _, r := range sv.rules[c] {
			m, ok := parseDNAT(r, v6)
			if !ok {
				st.dirty[c] = true
				continue
			}
			ms = append(ms, m)
			st.count[m]++
		}
		if len(ms) > 0 {
			st.chains[c] = ms
		}
		var masq []masqRule
		for _, r := range sv.rules[masqFor(c)] {
			mr, ok := parseMasq(r, v6)
			if !ok {
				st.dirty[c] = true
				continue
			}
			masq = append(masq, mr)
		}
		if !slices.Equal(masq, masqRules(ms)) {
			st.dirty[c] = true
		}
	}
	for _, r := range sv.rules[chainEgress] {
		e, ok := parseEgress(r)
		if !ok || e.Subnet.Addr().Is6() != v6 {
			st.egressBad = true
			continue
		}
		st.egress = append(st.egress, e)
	}
	return st
}

// structureFix is the batch that makes a table's chains, structural rules
// and built-in jumps what the layout says, touching nothing else: missing
// chains are created, wrong structural chains rewritten, jumps deduplicated
// and put first, stale BERTH- chains removed. Bucket contents are kept.
func structureFix(sv *saved, l layout) *batch {
	b := newBatch(l.table)
	created := map[string]bool{}
	for _, c := range l.chains {
		if !sv.chains[c] {
			b.declare(c)
			created[c] = true
		}
	}
	for _, c := range l.chains {
		want, ok := l.base[c]
		if !ok {
			continue
		}
		got := sv.rules[c]
		same := !created[c] && len(got) == len(want)
		for i := 0; same && i < len(got); i++ {
			same = sameSpec(got[i], want[i])
		}
		if same {
			continue
		}
		b.declare(c)
		for _, s := range want {
			b.add(c, s)
		}
	}
	for _, j := range l.jumps {
		got := sv.jumps[j.chain]
		if len(got) == 1 && sameSpec(got[0], j.spec) {
			continue
		}
		for _, g := range got {
			b.deleteSaved(j.chain, g)
		}
		b.insert(j.chain, j.spec)
	}
	var stale []string
	for c := range sv.chains {
		if !l.isBerthChain(c) {
			stale = append(stale, c)
		}
	}
	sort.Strings(stale)
	for _, c := range stale {
		b.drop(c)
	}
	return b
}

// Check reports whether berth's entry points are still in place: the
// PREROUTING jump and canary in nat (and the raw guard jump for IPv4). It
// runs a few `iptables -C`, never a full listing. When it returns false,
// the reconciler should List (which then shows what survived) and Apply
// the difference; Apply recreates the chains first.
func (t *Table) Check(ctx context.Context) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	intact := true
	for _, f := range t.fams {
		checks := []jump{
			natLayout().jumps[0],
			{"nat", chainPrerouting, canarySpec()},
		}
		if !f.v6 {
			checks = append(checks, rawLayout().jumps[0])
		}
		for _, c := range checks {
			if err := ctx.Err(); err != nil {
				return false, err
			}
			ok, err := f.ipt.Exists(c.table, c.chain, c.spec...)
			var ie *iptables.Error
			if errors.As(err, &ie) && ie.IsNotExist() {
				ok, err = false, nil // the chain or jump target is gone
			}
			if err != nil {
				return false, fmt.Errorf("nat %s: check %s %s: %w", f.name(), c.table, c.chain, err)
			}
			if !ok {
				intact = false
				f.ensured = false
				f.st = nil
				break
			}
		}
	}
	return intact, nil
}

// Ensure creates berth's chains and jumps where they are missing and
// repairs the structural ones, without touching bucket contents, and sets
// route_localnet again for every installed mapping that serves localhost.
func (t *Table) Ensure(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, f := range t.fams {
		if err := t.ensure(ctx, f); err != nil {
			errs = append(errs, err)
			continue
		}
		var ips []netip.Addr
		for _, ms := range f.st.chains {
			for _, m := range ms {
				if needsLocalhost(m) {
					ips = append(ips, m.ContainerIP)
				}
			}
		}
		for ip, err := range enableRouteLocalnet(dedupAddrs(ips)) {
			errs = append(errs, fmt.Errorf("nat: %s: %w", ip, err))
		}
	}
	return errors.Join(errs...)
}

func (t *Table) ensure(ctx context.Context, f *family) error {
	natOut, err := run(ctx, f.t.save, "", "-t", "nat")
	if err != nil {
		return fmt.Errorf("nat %s: %w", f.name(), err)
	}
	sv := parseSave(natOut, "nat")
	text := structureFix(sv, natLayout()).String()
	if !f.v6 {
		rawOut, err := run(ctx, f.t.save, "", "-t", "raw")
		if err != nil {
			return fmt.Errorf("nat %s: %w", f.name(), err)
		}
		text += structureFix(parseSave(rawOut, "raw"), rawLayout()).String()
	}
	if text != "" {
		if _, err := run(ctx, f.t.restore, text, "-w", "--noflush"); err != nil {
			f.st = nil
			return fmt.Errorf("nat %s: ensure chains: %w", f.name(), err)
		}
	}
	f.st = readState(sv, f.v6)
	f.ensured = true
	return nil
}

// plan is one family's write for an Apply.
type plan struct {
	chains   map[string][]forward.Mapping // new content of rewritten buckets
	delta    map[forward.Mapping]int
	egress   []egressRule
	egressOK bool // BERTH-EGRESS is rewritten
	text     string
	udp      []forward.Key // changed UDP keys, for conntrack
	local    []netip.Addr  // container addresses that need route_localnet
}

// makePlan works out the buckets to rewrite for removing then adding the
// given (valid, same-family) mappings. Removing deletes one installed copy
// per listed mapping; adding an installed mapping does nothing.
func (t *Table) makePlan(f *family, add, remove []forward.Mapping) *plan {
	st := f.st
	p := &plan{chains: map[string][]forward.Mapping{}, delta: map[forward.Mapping]int{}}
	cur := func(c string) []forward.Mapping {
		if w, ok := p.chains[c]; ok {
			return w
		}
		return st.chains[c]
	}
	touch := func(c string) []forward.Mapping {
		if w, ok := p.chains[c]; ok {
			return w
		}
		w := slices.Clone(st.chains[c])
		p.chains[c] = w
		return w
	}
	removeFrom := func(c string, m forward.Mapping) bool {
		i := slices.Index(cur(c), m)
		if i < 0 {
			return false
		}
		p.chains[c] = slices.Delete(touch(c), i, i+1)
		return true
	}
	udp := map[forward.Key]bool{}
	for _, m := range remove {
		if st.count[m]+p.delta[m] <= 0 {
			continue
		}
		if !removeFrom(dnatChain(bucketOf(m.ContainerID)), m) {
			for b := 0; b < buckets; b++ { // a rule in another bucket: older layout
				if removeFrom(dnatChain(b), m) {
					break
				}
			}
		}
		p.delta[m]--
		if m.Proto == forward.UDP {
			udp[m.Key] = true
		}
	}
	local := map[netip.Addr]bool{}
	for _, m := range add {
		if st.count[m]+p.delta[m] > 0 {
			continue
		}
		c := dnatChain(bucketOf(m.ContainerID))
		p.chains[c] = append(touch(c), m)
		p.delta[m]++
		if m.Proto == forward.UDP {
			udp[m.Key] = true
		}
		if needsLocalhost(m) {
			local[m.ContainerIP] = true
		}
	}
	for c := range st.dirty {
		touch(c)
	}
	want := egressRules(t.masquerade, t.bridges, f.v6)
	p.egressOK = st.egressBad || !slices.Equal(st.egress, want)
	p.egress = want

	b := newBatch("nat")
	names := make([]string, 0, len(p.chains))
	for c := range p.chains {
		names = append(names, c)
	}
	sort.Strings(names)
	for _, c := range names {
		b.declare(c)
		b.declare(masqFor(c))
	}
	for _, c := range names {
		for _, m := range p.chains[c] {
			b.add(c, dnatSpec(m))
		}
		for _, r := range masqRules(p.chains[c]) {
			b.add(masqFor(c), r.spec())
		}
	}
	if p.egressOK {
		b.declare(chainEgress)
		for _, r := range want {
			b.add(chainEgress, r.spec())
		}
	}
	p.text = b.String()
	for k := range udp {
		p.udp = append(p.udp, k)
	}
	for a := range local {
		p.local = append(p.local, a)
	}
	return p
}

// commit records a written plan in the family's state.
func (f *family) commit(p *plan) {
	st := f.st
	for c, ms := range p.chains {
		if len(ms) == 0 {
			delete(st.chains, c)
		} else {
			st.chains[c] = ms
		}
		delete(st.dirty, c)
	}
	for m, d := range p.delta {
		if n := st.count[m] + d; n > 0 {
			st.count[m] = n
		} else {
			delete(st.count, m)
		}
	}
	if p.egressOK {
		st.egress, st.egressBad = p.egress, false
	}
}

// split validates mappings and sorts them by family. Invalid removals are
// dropped silently: berth can never have installed them.
func (t *Table) split(add, remove []forward.Mapping) (adds, removes [2][]forward.Mapping, errs []error) {
	fi := func(m forward.Mapping) int {
		if m.Is6() {
			return 1
		}
		return 0
	}
	for _, m := range remove {
		if t.validate(m) == nil {
			removes[fi(m)] = append(removes[fi(m)], m)
		}
	}
	for _, m := range add {
		if err := t.validate(m); err != nil {
			errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: err})
			continue
		}
		adds[fi(m)] = append(adds[fi(m)], m)
	}
	return adds, removes, errs
}

// Apply removes then adds mappings with one iptables-restore per family
// that rewrites only the buckets of the containers concerned. It creates
// berth's chains and jumps first when they were never verified or Check
// found them gone. When the write fails it reads the table again and
// retries once. Mappings NAT cannot serve come back as *MappingError.
func (t *Table) Apply(ctx context.Context, add, remove []forward.Mapping) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	adds, removes, errs := t.split(add, remove)
	var udp []forward.Key
	for i, f := range t.fams {
		p, err := t.applyFamily(ctx, f, adds[i], removes[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		udp = append(udp, p.udp...)
		errs = append(errs, f.routeLocalnet(p.local, adds[i])...)
	}
	if !t.noFlush {
		if err := flushUDP(udp); err != nil {
			errs = append(errs, fmt.Errorf("nat: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (t *Table) applyFamily(ctx context.Context, f *family, add, remove []forward.Mapping) (*plan, error) {
	var last error
	for attempt := 0; attempt < 2; attempt++ {
		if !f.ensured {
			if err := t.ensure(ctx, f); err != nil {
				last = err
				continue
			}
		}
		if f.st == nil {
			if err := t.refresh(ctx, f); err != nil {
				last = err
				continue
			}
		}
		p := t.makePlan(f, add, remove)
		if p.text == "" {
			return p, nil
		}
		if _, err := run(ctx, f.t.restore, p.text, "-w", "--noflush"); err != nil {
			last = fmt.Errorf("nat %s: %w", f.name(), err)
			f.st, f.ensured = nil, false
			continue
		}
		f.commit(p)
		return p, nil
	}
	return nil, last
}

// routeLocalnet enables route_localnet for newly added localhost-serving
// mappings and retries earlier failures. A failure is reported against the
// mappings of this call, or as a batch error for an earlier one, so the
// reconciler keeps retrying until it works or the mapping is gone.
func (f *family) routeLocalnet(ips []netip.Addr, adds []forward.Mapping) []error {
	var retry []netip.Addr
	if len(f.localnet) > 0 {
		live := map[netip.Addr]bool{}
		for m := range f.st.count {
			if f.localnet[m.ContainerIP] && needsLocalhost(m) {
				live[m.ContainerIP] = true
			}
		}
		for ip := range live {
			retry = append(retry, ip)
		}
		f.localnet = nil
	}
	fail := enableRouteLocalnet(dedupAddrs(append(retry, ips...)))
	var errs []error
	reported := map[netip.Addr]bool{}
	for _, m := range adds {
		if err := fail[m.ContainerIP]; err != nil && needsLocalhost(m) {
			errs = append(errs, &forward.MappingError{Mapping: m, Op: "add", Err: err})
			reported[m.ContainerIP] = true
		}
	}
	for ip, err := range fail {
		if f.localnet == nil {
			f.localnet = map[netip.Addr]bool{}
		}
		f.localnet[ip] = true
		if !reported[ip] {
			errs = append(errs, fmt.Errorf("nat: localhost forwarding to %s: %w", ip, err))
		}
	}
	return errs
}

// Rules is the iptables-restore input the next Apply(add, remove) would
// run, per family, for `berth reconcile --dry-run`. It reads the tables
// when berth has not yet, and writes nothing.
func (t *Table) Rules(ctx context.Context, add, remove []forward.Mapping) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	adds, removes, errs := t.split(add, remove)
	var out strings.Builder
	for i, f := range t.fams {
		if f.st == nil {
			if err := t.refresh(ctx, f); err != nil {
				return "", err
			}
		}
		text := ""
		if !f.ensured {
			// what ensure would write first: nat structure, then the
			// IPv4 guard in raw
			text = structureFix(f.st.saved, natLayout()).String()
			if !f.v6 {
				rawOut, err := run(ctx, f.t.save, "", "-t", "raw")
				if err != nil {
					return "", fmt.Errorf("nat %s: %w", f.name(), err)
				}
				text += structureFix(parseSave(rawOut, "raw"), rawLayout()).String()
			}
		}
		text += t.makePlan(f, adds[i], removes[i]).text
		if text == "" {
			continue
		}
		fmt.Fprintf(&out, "# %s -w --noflush\n%s", f.t.restore, text)
	}
	return out.String(), errors.Join(errs...)
}

// Cleanup removes every chain, rule and jump berth owns, in nat and raw,
// for both families, and nothing else. What is already gone is fine.
func (t *Table) Cleanup(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, f := range t.all {
		var text string
		for _, table := range []string{"nat", "raw"} {
			out, err := run(ctx, f.t.save, "", "-t", table)
			if err != nil {
				errs = append(errs, fmt.Errorf("nat %s: %w", f.name(), err))
				continue
			}
			text += teardown(parseSave(out, table)).String()
		}
		if text != "" {
			if _, err := run(ctx, f.t.restore, text, "-w", "--noflush"); err != nil {
				errs = append(errs, fmt.Errorf("nat %s: cleanup: %w", f.name(), err))
			}
		}
		f.st, f.ensured = nil, false
	}
	return errors.Join(errs...)
}

// teardown removes berth's jumps and chains from one table.
func teardown(sv *saved) *batch {
	b := newBatch(sv.table)
	var chains []string
	for c := range sv.chains {
		chains = append(chains, c)
	}
	sort.Strings(chains)
	for _, c := range chains {
		b.declare(c)
	}
	var bi []string
	for c := range sv.jumps {
		bi = append(bi, c)
	}
	sort.Strings(bi)
	for _, c := range bi {
		for _, r := range sv.jumps[c] {
			b.deleteSaved(c, r)
		}
	}
	for _, c := range chains {
		b.drop(c)
	}
	return b
}

func dedupAddrs(a []netip.Addr) []netip.Addr {
	slices.SortFunc(a, func(x, y netip.Addr) int { return x.Compare(y) })
	return slices.Compact(a)
}
