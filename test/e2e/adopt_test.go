package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

// Ports of TestNATAdoptionForeignRulesCleanup.
const (
	adoptTCPPort = 18180 // web: -p 18180:80
	adoptUDPPort = 18153 // dns: -p 18153:53/udp
	adoptPeerNum = 72
)

// One world, in order: foreign rules a user had before berth; `berth
// reconcile --dry-run` with no daemon shows the exact rules and changes
// nothing; `berth reconcile` applies them and a second run has nothing to
// do; the daemon adopts them; a TCP stream keeps flowing across kill -9
// and restart with no duplicate rule; `berth reconcile --cleanup` leaves
// exactly the foreign rules. The foreign rules are identical throughout.
func TestNATAdoptionForeignRulesCleanup(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	peer := netns.NewPeer(t, adoptPeerNum)

	// What a user or another tool had before berth ever ran.
	for _, c := range [][]string{
		{"iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d", peer.LocalAddr + "/32", "-p", "tcp", "--dport", "2222",
			"-m", "comment", "--comment", "user dnat", "-j", "DNAT", "--to-destination", peer.Addr + ":22"},
		{"iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-o", peer.LocalIf, "-j", "MASQUERADE"},
		{"iptables", "-w", "-N", "DOCKER-USER"},
		{"iptables", "-w", "-A", "DOCKER-USER", "-s", "198.51.100.0/24", "-j", "DROP"},
		{"iptables", "-w", "-A", "DOCKER-USER", "-j", "RETURN"},
		{"iptables", "-w", "-I", "FORWARD", "-j", "DOCKER-USER"},
		{"ip6tables", "-w", "-A", "INPUT", "-s", "2001:db8::/32", "-p", "tcp", "--dport", "22", "-j", "REJECT"},
		{"ip6tables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:dead::/64", "-j", "MASQUERADE"},
	} {
		sh(t, c...)
		// undo it for the tests that follow in this namespace
		undo := append([]string{}, c...)
		switch i := slices.IndexFunc(undo, func(a string) bool { return a == "-A" || a == "-I" || a == "-N" }); undo[i] {
		case "-N":
			t.Cleanup(func() { exec.Command(undo[0], "-w", "-X", "DOCKER-USER").Run() })
		default:
			undo[i] = "-D"
			t.Cleanup(func() { exec.Command(undo[0], undo[1:]...).Run() })
		}
	}
	w.RunEcho("web", "-p", fmt.Sprintf("%d:80", adoptTCPPort), "--", "-tcp", "80")
	w.RunEcho("dns", "-p", fmt.Sprintf("%d:53/udp", adoptUDPPort), "--", "-udp", "53")
	waitReady(t, w, "web", "dns")
	webID := w.MustDocker("inspect", "-f", "{{.Id}}", "web")
	baseline := foreignRules(t)
	if !strings.Contains(baseline, "user dnat") || !strings.Contains(baseline, "DOCKER-USER") || !strings.Contains(baseline, "2001:db8::/32") {
		t.Fatalf("foreign rules not in place:\n%s", baseline)
	}
	sameForeign := func(t *testing.T, when string) {
		t.Helper()
		if got := foreignRules(t); got != baseline {
			t.Errorf("%s: the rules that are not berth's changed\n--- before berth\n%s\n--- %s\n%s", when, baseline, when, got)
		}
	}
	peerAll := net.JoinHostPort(peer.LocalAddr, strconv.Itoa(adoptTCPPort))

	var dryRules []string       // DNAT and MASQ lines of the dry-run
	dryAll := map[string]bool{} // every rule line of the dry-run, -I as -A
	t.Run("dry-run shows the rules and changes nothing", func(t *testing.T) {
		before := allRules(t)
		out, err := w.CLI("reconcile", "--dry-run", "--docker-host", w.Host)
		t.Logf("berth reconcile --dry-run (chain declarations and bucket jumps left out here):\n%s", compact(out))
		if err != nil {
			t.Fatalf("dry-run: %v", err)
		}
		for _, want := range []string{
			"would add",
			fmt.Sprintf("tcp 0.0.0.0:%d -> ", adoptTCPPort),
			fmt.Sprintf("udp 0.0.0.0:%d -> ", adoptUDPPort),
			"rules berth would write (iptables-restore --noflush):",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("dry-run output lacks %q", want)
			}
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "-A ") {
				dryAll[l] = true
			}
			if f := strings.Fields(l); len(f) > 3 && f[0] == "-I" && f[2] == "1" {
				dryAll["-A "+f[1]+" "+strings.Join(f[3:], " ")] = true
			}
			if strings.HasPrefix(l, "-A BERTH-DNAT-") || strings.HasPrefix(l, "-A BERTH-MASQ-") {
				dryRules = append(dryRules, l)
			}
		}
		// web: DNAT, hairpin and localhost MASQUERADE; dns: the same
		if len(dryRules) != 6 {
			t.Errorf("dry-run shows %d DNAT/MASQ rules, want 6:\n%s", len(dryRules), strings.Join(dryRules, "\n"))
		}
		if after := allRules(t); after != before {
			t.Errorf("dry-run changed the tables\n--- before\n%s\n--- after\n%s", before, after)
		}
		if got, err := peerWho1s(peer, peerAll); err == nil {
			t.Errorf("peer -> %s answered %q before any berth rule", peerAll, got)
		}
	})

	t.Run("reconcile applies, then has nothing to do", func(t *testing.T) {
		out, err := w.CLI("reconcile", "--docker-host", w.Host)
		t.Logf("berth reconcile:\n%s", out)
		if err != nil {
			t.Fatalf("reconcile: %v", err)
		}
		nat := sh(t, "iptables-save", "-t", "nat")
		for _, r := range dryRules {
			if !hasLine(nat, r) {
				t.Errorf("dry-run promised %q; iptables-save -t nat after reconcile does not have it", r)
			}
		}
		// the dry-run showed every rule the real run wrote
		for _, c := range [][]string{{"iptables-save", "-t", "nat"}, {"iptables-save", "-t", "raw"}, {"ip6tables-save", "-t", "nat"}} {
			for _, l := range strings.Split(sh(t, c...), "\n") {
				if !strings.HasPrefix(l, "-A ") || !isBerth(l) || dryAll[l] {
					continue
				}
				t.Errorf("berth reconcile wrote a rule the dry-run did not show (%s): %s", strings.Join(c, " "), l)
			}
		}
		if n := countMatching(nat, "-A BERTH-DNAT-", ""); n != 2 {
			t.Errorf("%d DNAT rules after reconcile, want 2 (dry-run showed what berth would write)", n)
		}
		if !strings.Contains(nat, "berth "+webID[:12]) && !strings.Contains(nat, "berth "+webID) {
			t.Errorf("no rule comment names web (%s):\n%s", webID[:12], nat)
		}
		got, err := peerWho1s(peer, peerAll)
		if err != nil || harness.Name(got) != "web" {
			t.Errorf("peer -> %s after one-shot reconcile: %q %v", peerAll, got, err)
		}
		out, err = w.CLI("reconcile", "--docker-host", w.Host)
		t.Logf("second berth reconcile:\n%s", out)
		if err != nil {
			t.Fatalf("second reconcile: %v", err)
		}
		if !strings.Contains(out, "nothing to change") {
			t.Errorf("second reconcile did not say nothing to change")
		}
		if after := sh(t, "iptables-save", "-t", "nat"); stripCounters(after) != stripCounters(nat) {
			t.Errorf("second reconcile changed nat\n--- before\n%s\n--- after\n%s", nat, after)
		}
		sameForeign(t, "after berth reconcile")
	})

	b := w.StartBerth()
	waitInstalled(t, b, map[string]int{"web": 2, "dns": 2})
	if got := flavour(t, b); !strings.Contains(sh(t, "iptables", "--version"), "("+map[string]string{"nft": "nf_tables", "legacy": "legacy"}[got]+")") {
		t.Logf("berth uses iptables-%s, the default iptables is %s: the foreign comparison below uses the default", got, sh(t, "iptables", "--version"))
	}
	sameForeign(t, "while berth runs")

	t.Run("kill -9 and restart keep a stream and the rules", func(t *testing.T) {
		if s, _ := b.Summary(); s.FlushRecoveries != 0 {
			t.Errorf("first daemon counted %d flush recoveries adopting a one-shot reconcile's rules", s.FlushRecoveries)
		}
		var conn net.Conn
		if err := peer.Do(func() error {
			var err error
			conn, err = net.DialTimeout("tcp", peerAll, 3*time.Second)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		st := startStream(conn)
		defer st.stop()
		time.Sleep(300 * time.Millisecond)
		dnatBefore := dnatPackets(t, adoptTCPPort)
		b.Kill9()
		killed := time.Now()
		time.Sleep(200 * time.Millisecond)
		b2 := w.StartBerth()
		up := time.Since(killed)
		waitInstalled(t, b2, map[string]int{"web": 2, "dns": 2})
		time.Sleep(500 * time.Millisecond)
		n, maxGap, err := st.stop()
		t.Logf("stream: %d round trips of 1 byte every 20ms, longest %v; new berth healthy %v after kill -9", n, maxGap.Round(time.Millisecond), up.Round(time.Millisecond))
		if err != nil {
			t.Fatalf("stream broke across kill -9 and restart: %v", err)
		}
		if maxGap > time.Second {
			t.Errorf("stream stalled %v across the restart", maxGap)
		}
		if after := dnatPackets(t, adoptTCPPort); after < dnatBefore {
			t.Errorf("web's DNAT rule counter went %d -> %d: the rule was replaced, not adopted", dnatBefore, after)
		}
		for _, fam := range []string{"iptables", "ip6tables"} {
			for _, table := range []string{"nat", "raw"} {
				out := sh(t, fam+"-save", "-t", table)
				if d := duplicateBerthLines(out); len(d) > 0 {
					t.Errorf("%s -t %s: berth lines present more than once: %q", fam, table, d)
				}
			}
		}
		for _, j := range []string{"-j BERTH-PREROUTING", "-j BERTH-OUTPUT", "-j BERTH-POSTROUTING"} {
			if n := countMatching(sh(t, "iptables-save", "-t", "nat"), "-A ", j); n != 1 {
				t.Errorf("%d jumps %q in nat, want 1", n, j)
			}
		}
		rows, err := b2.Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			if r.State != reconcile.StateInstalled {
				t.Errorf("after restart: %+v", r)
			}
		}
		if s, _ := b2.Summary(); s.FlushRecoveries != 0 {
			t.Errorf("restart after kill -9 counted %d flush recoveries", s.FlushRecoveries)
		}
		// Adopted, not reinstalled: the new daemon logs no NAT change.
		for _, l := range strings.Split(readFile(b2.Log), "\n") {
			if strings.Contains(l, "mode=nat") && (strings.Contains(l, "msg=installed") || strings.Contains(l, "msg=removed")) {
				t.Errorf("restarted berth changed a NAT mapping that was still right: %s", l)
			}
		}
		sameForeign(t, "after kill -9 and restart")
		b2.Stop()
	})

	t.Run("cleanup removes berth and nothing else", func(t *testing.T) {
		out, err := w.CLI("reconcile", "--cleanup", "--docker-host", w.Host)
		t.Logf("berth reconcile --cleanup: %s", out)
		if err != nil {
			t.Fatalf("cleanup: %v", err)
		}
		sameForeign(t, "after berth reconcile --cleanup")
		all := allRules(t)
		for _, l := range strings.Split(all, "\n") {
			if strings.Contains(l, "BERTH") || strings.Contains(strings.ToLower(l), "berth") {
				t.Errorf("left after cleanup: %s", l)
			}
		}
		if got, err := peerWho1s(peer, peerAll); err == nil {
			t.Errorf("peer -> %s still answered %q after cleanup", peerAll, got)
		}
		if d := emptyTablesAdded(baseline, all); len(d) > 0 {
			// iptables-nft cannot delete a table; an empty one with
			// ACCEPT policies is harmless but not what was there before.
			t.Logf("tables left behind empty (ACCEPT policies only): %v", d)
		}
	})
}

var structureRE = regexp.MustCompile(`^(:BERTH-|-A BERTH-(PREROUTING|OUTPUT|POSTROUTING) -m comment --comment berth -j BERTH-(DNAT|MASQ)-)`)

// compact leaves out the structural lines of berth's batches.
func compact(s string) string {
	var b strings.Builder
	left := 0
	for _, l := range strings.Split(s, "\n") {
		if structureRE.MatchString(l) {
			left++
			continue
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "(%d structural lines left out)", left)
	return b.String()
}

// allRules is iptables-save and ip6tables-save of every table, without
// comment lines and counters.
func allRules(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, c := range []string{"iptables-save", "ip6tables-save"} {
		fmt.Fprintf(&b, "## %s\n%s", c, stripCounters(sh(t, c)))
	}
	return b.String()
}

var countersRE = regexp.MustCompile(` \[\d+:\d+\]$`)

// stripCounters drops # lines and the [packets:bytes] of chain lines.
func stripCounters(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if strings.HasPrefix(l, ":") {
			l = countersRE.ReplaceAllString(l, "")
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

// isBerth says whether a save line is berth's: its chains, jumps and rules.
func isBerth(l string) bool {
	return strings.Contains(l, "BERTH-") || strings.Contains(l, "--comment berth") || strings.Contains(l, `--comment "berth `)
}

// foreignRules is allRules minus berth's lines, and minus tables that are
// left with nothing in them (built-in chains with ACCEPT policy only):
// iptables-nft shows a table as soon as any tool created it, and cannot
// remove one.
func foreignRules(t testing.TB) string {
	t.Helper()
	var out strings.Builder
	for _, block := range splitTables(allRules(t)) {
		var keep []string
		rules := 0
		policyOnly := true
		for _, l := range block {
			if isBerth(l) {
				continue
			}
			keep = append(keep, l)
			switch {
			case strings.HasPrefix(l, "-A "):
				rules++
			case strings.HasPrefix(l, ":") && !strings.HasSuffix(l, " ACCEPT"):
				policyOnly = false
			}
		}
		if len(keep) > 0 && strings.HasPrefix(keep[0], "*") && rules == 0 && policyOnly {
			continue
		}
		for _, l := range keep {
			out.WriteString(l)
			out.WriteByte('\n')
		}
	}
	return out.String()
}

// splitTables cuts save output into blocks: "## tool" lines and
// "*table ... COMMIT" groups.
func splitTables(s string) [][]string {
	var blocks [][]string
	var cur []string
	for _, l := range strings.Split(s, "\n") {
		switch {
		case l == "":
		case strings.HasPrefix(l, "##") || strings.HasPrefix(l, "*"):
			if len(cur) > 0 {
				blocks = append(blocks, cur)
			}
			cur = []string{l}
		default:
			cur = append(cur, l)
		}
	}
	if len(cur) > 0 {
		blocks = append(blocks, cur)
	}
	return blocks
}

// emptyTablesAdded lists "*table" blocks present in after but not in the
// baseline's text.
func emptyTablesAdded(baseline, after string) []string {
	var out []string
	tool := ""
	for _, block := range splitTables(after) {
		if strings.HasPrefix(block[0], "##") {
			tool = block[0]
			continue
		}
		if !strings.Contains(baseline, block[0]+"\n") || !strings.Contains(baseline, tool) {
			out = append(out, strings.TrimPrefix(tool, "## ")+" "+block[0])
		}
	}
	return out
}

func countMatching(text, prefix, contains string) int {
	n := 0
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) && strings.Contains(l, contains) {
			n++
		}
	}
	return n
}

// duplicateBerthLines lists berth rule lines that appear more than once.
func duplicateBerthLines(save string) []string {
	seen := map[string]int{}
	var dup []string
	for _, l := range strings.Split(save, "\n") {
		if !strings.HasPrefix(l, "-A ") || !isBerth(l) {
			continue
		}
		seen[l]++
		if seen[l] == 2 {
			dup = append(dup, l)
		}
	}
	return dup
}

// dnatPackets is the packet counter of the IPv4 DNAT rule for a host port.
func dnatPackets(t testing.TB, port int) uint64 {
	t.Helper()
	re := regexp.MustCompile(`^\[(\d+):\d+\] -A BERTH-DNAT-.* --dport ` + strconv.Itoa(port) + ` `)
	for _, l := range strings.Split(sh(t, "iptables-save", "-c", "-t", "nat"), "\n") {
		if m := re.FindStringSubmatch(l); m != nil {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			return n
		}
	}
	t.Fatalf("no DNAT rule for port %d", port)
	return 0
}

// stream is a TCP connection echoing one byte every 20ms in lock step.
type stream struct {
	c      net.Conn
	quit   chan struct{}
	done   chan struct{}
	once   sync.Once
	n      int
	maxGap time.Duration
	err    error
}

func startStream(c net.Conn) *stream {
	s := &stream{c: c, quit: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s
}

func (s *stream) run() {
	defer close(s.done)
	// the echo server looks at the first 5 bytes before echoing
	hello := []byte("hello")
	s.c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := s.c.Write(hello); err != nil {
		s.err = err
		return
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s.c, buf); err != nil || !bytes.Equal(buf, hello) {
		s.err = fmt.Errorf("hello: %q %v", buf, err)
		return
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-s.quit:
			return
		case <-tick.C:
		}
		start := time.Now()
		s.c.SetDeadline(start.Add(3 * time.Second))
		out := []byte{byte(i)}
		if _, err := s.c.Write(out); err != nil {
			s.err = fmt.Errorf("write %d: %w", i, err)
			return
		}
		if _, err := io.ReadFull(s.c, buf[:1]); err != nil || buf[0] != out[0] {
			s.err = fmt.Errorf("round trip %d: got %v, %v", i, buf[0], err)
			return
		}
		s.n++
		s.maxGap = max(s.maxGap, time.Since(start))
	}
}

// stop ends the stream and returns its round trips, slowest one, error.
func (s *stream) stop() (int, time.Duration, error) {
	s.once.Do(func() { close(s.quit) })
	<-s.done
	s.c.Close()
	return s.n, s.maxGap, s.err
}
