package e2e

import (
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

const coexistPeerNum = 73

// coexistCase is one dockerd configuration of the coexistence matrix.
type coexistCase struct {
	name   string
	engine string
	opts   harness.Options
	// Which side dockerd forwards itself for `-p PORT:80` of an IPv4-only
	// container: berth must show state docker there and install nothing.
	docker4, docker6 bool
	// Strings the status summary must carry about the configuration.
	info []string
	does string // for the table: what dockerd does
	// stale adds a DOCKER chain with a DNAT rule for the published port to
	// a container that is gone, as a crashed dockerd that ran with
	// --iptables leaves it: berth must not take it for dockerd's forward.
	stale bool
	// dnat is what dockerd's own DNAT for the port looks like in the
	// rules, "" when it writes none.
	dnat string
}

func coexistCases(engines []string) []coexistCase {
	var cs []coexistCase
	for _, e := range engines {
		cs = append(cs,
			coexistCase{name: "defaults", engine: e, opts: harness.Options{Engine: e, UserlandProxy: true, IPTables: true},
				docker4: true, docker6: true, info: []string{"userland-proxy on, iptables on", "for full ownership"},
				does: "DNAT (IPv4) + docker-proxy (0.0.0.0 and ::)", dnat: "-j DNAT"},
			coexistCase{name: "userland-proxy=false", engine: e, opts: harness.Options{Engine: e, IPTables: true},
				docker4: true, info: []string{"userland-proxy off, iptables on", "IPv6 side of IPv4-only containers"},
				does: "DNAT (IPv4) only, holds [::] free", dnat: "-j DNAT"},
			coexistCase{name: "userland-proxy=false iptables=false", engine: e, opts: harness.Options{Engine: e},
				info: []string{"userland-proxy off, iptables off, ip6tables off", "dockerd forwards nothing"},
				does: "nothing (holds the IPv4 socket); a stale DOCKER DNAT to a gone container", stale: true},
		)
		if e == harness.EngineMoby29 {
			cs = append(cs, coexistCase{name: "userland-proxy=false firewall-backend=nftables", engine: e,
				opts:    harness.Options{Engine: e, IPTables: true, Extra: []string{"--firewall-backend=nftables"}},
				docker4: true, info: []string{"userland-proxy off, iptables on", "firewall backend nftables", "table ip docker-bridges"},
				does: "nft DNAT (ip docker-bridges) only", dnat: "dnat to"})
		}
	}
	return cs
}

// vantages are the places a client asks from: another host, the host to
// its own address, loopback of each family, another host over IPv6.
var vantages = []string{"remote", "host", "127.0.0.1", "[::1]", "remote6"}

// ask measures from every vantage point at once which container answers
// on port: true where the echo server named want does.
func ask(peer *netns.Peer, port int, want string, timeout time.Duration) map[string]bool {
	p := strconv.Itoa(port)
	dial := map[string]func() (string, error){
		"remote": func() (got string, err error) {
			err = peer.Do(func() (e error) { got, e = harness.WhoTCP(net.JoinHostPort(peer.LocalAddr, p), timeout); return })
			return
		},
		"host":      func() (string, error) { return harness.WhoTCP(net.JoinHostPort(peer.LocalAddr, p), timeout) },
		"127.0.0.1": func() (string, error) { return harness.WhoTCP("127.0.0.1:"+p, timeout) },
		"[::1]":     func() (string, error) { return harness.WhoTCP("[::1]:"+p, timeout) },
		"remote6": func() (got string, err error) {
			err = peer.Do(func() (e error) { got, e = harness.WhoTCP(net.JoinHostPort(peer.Local6, p), timeout); return })
			return
		},
	}
	out := map[string]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, v := range vantages {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := dial[v]()
			mu.Lock()
			out[v] = err == nil && harness.Name(got) == want
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out
}

var nftCounter = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// dockerAndHostRules is everything in iptables-save, ip6tables-save and nft
// list ruleset that is not berth's: rules outside BERTH-* chains without
// berth's comment, and non-ACCEPT chain policies. Empty built-in chains
// berth's first rule brings into being are not counted as changes.
func dockerAndHostRules(t *testing.T) string {
	t.Helper()
	var out []string
	for _, bin := range []string{"iptables-save", "ip6tables-save"} {
		b, err := exec.Command(bin).Output()
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		table := ""
		for _, l := range strings.Split(string(b), "\n") {
			switch {
			case strings.HasPrefix(l, "*"):
				table = l
			case strings.Contains(l, "BERTH") || strings.Contains(l, "--comment berth") || strings.Contains(l, `"berth`):
			case strings.HasPrefix(l, "-A "):
				out = append(out, bin+" "+table+" "+l)
			case strings.HasPrefix(l, ":"):
				if f := strings.Fields(l); len(f) > 1 && f[1] != "ACCEPT" && f[1] != "-" {
					out = append(out, bin+" "+table+" "+f[0]+" "+f[1])
				}
			}
		}
	}
	if _, err := exec.LookPath("nft"); err == nil {
		b, err := exec.Command("nft", "list", "ruleset").Output()
		if err != nil {
			t.Fatalf("nft list ruleset: %v", err)
		}
		table, chain := "", ""
		for _, l := range strings.Split(string(b), "\n") {
			l = strings.TrimSpace(l)
			switch {
			case strings.HasPrefix(l, "table "):
				table, chain = strings.TrimSuffix(l, " {"), ""
			case strings.HasPrefix(l, "chain ") || strings.HasPrefix(l, "map ") || strings.HasPrefix(l, "set "):
				chain = strings.TrimSuffix(l, " {")
			case l == "" || l == "}" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, "type "):
			case strings.HasPrefix(chain, "chain BERTH-") || strings.Contains(l, "BERTH-") || strings.Contains(l, `comment "berth`):
			default:
				out = append(out, "nft "+table+" "+chain+": "+nftCounter.ReplaceAllString(l, "counter"))
			}
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// saveNetnsRules returns a function that puts the test namespace's
// iptables and nft rules back as they are now: a dockerd with --iptables
// leaves its chains (and FORWARD policy DROP) behind when it stops, and the
// other tests of this binary expect a namespace without them.
func saveNetnsRules(t *testing.T) func() {
	t.Helper()
	v4, err4 := exec.Command("iptables-save").Output()
	v6, err6 := exec.Command("ip6tables-save").Output()
	if err4 != nil || err6 != nil {
		t.Fatalf("iptables-save: %v %v", err4, err6)
	}
	return func() {
		for _, fam := range []string{"ip", "ip6"} {
			exec.Command("nft", "delete", "table", fam, "docker-bridges").Run()
		}
		for _, r := range []struct {
			bin  string
			text []byte
		}{{"iptables", v4}, {"ip6tables", v6}} {
			// Flush what the save does not mention (nat, filter, raw as
			// dockerd made them), then restore.
			for _, tb := range []string{"nat", "filter", "raw", "mangle"} {
				exec.Command(r.bin, "-t", tb, "-F").Run()
				exec.Command(r.bin, "-t", tb, "-X").Run()
			}
			exec.Command(r.bin, "-P", "FORWARD", "ACCEPT").Run()
			cmd := exec.Command(r.bin + "-restore")
			cmd.Stdin = strings.NewReader(string(r.text))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s-restore: %v: %s", r.bin, err, out)
			}
		}
	}
}

func yesNo(before, after bool) string {
	m := map[bool]string{true: "yes", false: "no"}
	if before == after {
		return m[after]
	}
	return m[before] + "→" + m[after]
}

// The coexistence matrix (issue 9): for each dockerd configuration, a
// published port and a label port are asked from every vantage point
// before berth starts and while it runs. Never worse, better where dockerd
// leaves a gap; dockerd's own rules untouched; what dockerd forwards shown
// as state docker and not installed by berth.
func TestCoexistWithDockerd(t *testing.T) {
	harness.Require(t)
	start := time.Now()
	peer := netns.NewPeer(t, coexistPeerNum)
	var table []string
	for i, c := range coexistCases(harness.Engines(t)) {
		t.Run(c.engine+"/"+strings.ReplaceAll(c.name, " ", "+"), func(t *testing.T) {
			cstart := time.Now()
			t.Cleanup(saveNetnsRules(t)) // runs after the world's teardown
			w := harness.Start(t, c.opts)
			pub, lab := 29100+10*i, 29101+10*i
			w.RunEcho("co", "-p", fmt.Sprintf("%d:80", pub), "--label", fmt.Sprintf("berth.ports=%d:80", lab), "--", "-tcp", "80")
			// dockerd's forwarding is in place once the container runs;
			// wait for the published port to answer where it will.
			harness.Eventually(t, 10*time.Second, "container listening", func() error {
				if _, err := harness.WhoTCP(net.JoinHostPort(w.ContainerIP("co"), "80"), 2*time.Second); err != nil {
					return err
				}
				return nil
			})
			if c.stale {
				for _, r := range [][]string{
					{"-N", "DOCKER"},
					{"-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"},
					{"-A", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"},
					{"-A", "DOCKER", "!", "-i", "docker0", "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(pub), "-j", "DNAT", "--to-destination", "172.17.0.250:80"},
				} {
					if out, err := exec.Command("iptables", append([]string{"-w", "-t", "nat"}, r...)...).CombinedOutput(); err != nil {
						t.Fatalf("stale rule %v: %v: %s", r, err, out)
					}
				}
			}
			before := ask(peer, pub, "co", 3*time.Second)
			beforeLab := ask(peer, lab, "co", 3*time.Second)
			rules := dockerAndHostRules(t)
			if c.dnat != "" && !strings.Contains(rules, c.dnat) {
				t.Fatalf("dockerd's DNAT (%q) not in the rules:\n%s", c.dnat, rules)
			}

			b := w.StartBerth()
			var rows []reconcile.Row
			state := func(fam string) string {
				for _, r := range rows {
					if r.ContainerName == "co" && r.HostPort == uint16(pub) && (strings.Contains(r.HostIP, ":") == (fam == "6")) {
						return r.State + " " + r.Mode + " " + r.Reason
					}
				}
				return "missing"
			}
			harness.Eventually(t, 20*time.Second, "status of the published and label ports", func() error {
				var err error
				if rows, err = b.Status(); err != nil {
					return err
				}
				for fam, docker := range map[string]bool{"4": c.docker4, "6": c.docker6} {
					want := reconcile.StateInstalled
					if docker {
						want = reconcile.StateDocker
					}
					if got := state(fam); !strings.HasPrefix(got, want+" ") {
						return fmt.Errorf("IPv%s side of %d: %q, want %s; rows %+v", fam, pub, got, want, rows)
					}
				}
				n := 0
				for _, r := range rows {
					if r.ContainerName == "co" && r.HostPort == uint16(lab) && r.State == reconcile.StateInstalled {
						n++
					}
				}
				if n != 2 {
					return fmt.Errorf("label port %d: %d of 2 installed; rows %+v", lab, n, rows)
				}
				return nil
			})
			after := ask(peer, pub, "co", 3*time.Second)
			afterLab := ask(peer, lab, "co", 3*time.Second)

			for _, v := range vantages {
				if !after[v] {
					t.Errorf("published %d from %s: no answer with berth running (before berth: %v)", pub, v, before[v])
				}
				if !afterLab[v] {
					t.Errorf("label port %d from %s: no answer with berth running", lab, v)
				}
				if beforeLab[v] {
					t.Errorf("label port %d answered from %s before berth ran", lab, v)
				}
			}
			if got := dockerAndHostRules(t); got != rules {
				t.Errorf("berth changed rules that are not its own:\nbefore\n%s\nafter\n%s", rules, got)
			}
			// Installed once: no berth DNAT for a side dockerd forwards.
			brules := berthRules(t)
			var dnat4, dnat6, masq int
			for _, l := range strings.Split(brules, "\n") {
				switch {
				case strings.Contains(l, "MASQUERADE") && strings.Contains(l, "172.17.0.0/16"):
					masq++
				case strings.Contains(l, fmt.Sprintf("--dport %d ", pub)) && strings.HasPrefix(l, "iptables-save"):
					dnat4++
				case strings.Contains(l, fmt.Sprintf("--dport %d ", pub)) && strings.HasPrefix(l, "ip6tables-save"):
					dnat6++
				}
				if !strings.Contains(l, fmt.Sprintf("--dport %d ", pub)) || !strings.Contains(l, "DNAT") {
					continue
				}
				if (c.docker4 && strings.HasPrefix(l, "iptables-save")) || (c.docker6 && strings.HasPrefix(l, "ip6tables-save")) {
					t.Errorf("berth installed a DNAT for a port dockerd forwards: %s", l)
				}
			}
			sum, err := b.Summary()
			if err != nil {
				t.Fatal(err)
			}
			info := strings.Join(sum.Info, "\n")
			for _, s := range c.info {
				if !strings.Contains(info, s) {
					t.Errorf("status summary lacks %q:\n%s", s, info)
				}
			}
			if log := readFile(b.Log); !strings.Contains(log, "coexistence: ") {
				t.Errorf("no coexistence line in berth's start-up log")
			}
			if t.Failed() {
				t.Logf("summary info:\n%s", info)
				for _, cmd := range [][]string{{"iptables-save", "-t", "nat"}, {"nft", "list", "ruleset"}} {
					out, _ := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
					t.Logf("%v:\n%s", cmd, out)
				}
			}
			short := func(s string) string { // "docker nat reason..." -> "docker nat"
				f := strings.Fields(s)
				if len(f) > 2 {
					f = f[:2]
				}
				return strings.Join(f, " ")
			}
			cells := []string{c.engine, c.name, c.does, fmt.Sprintf("v4 %s, v6 %s; berth rules for the port: %d v4, %d v6; egress masq %d",
				short(state("4")), short(state("6")), dnat4, dnat6, masq)}
			for _, v := range vantages {
				cells = append(cells, yesNo(before[v], after[v]))
			}
			cells = append(cells, fmt.Sprintf("%.0fs", time.Since(cstart).Seconds()))
			table = append(table, "| "+strings.Join(cells, " | ")+" |")
			t.Logf("v4: %s; v6: %s; summary:\n%s", state("4"), state("6"), info)
		})
	}
	t.Logf("coexistence matrix (published port, answer before berth→with berth; label ports answer everywhere only with berth), %v total:\n"+
		"| engine | dockerd flags | dockerd forwards | berth (state per side) | remote | host | 127.0.0.1 | [::1] | remote IPv6 | time |\n"+
		"|---|---|---|---|---|---|---|---|---|---|\n%s", time.Since(start).Round(time.Second), strings.Join(table, "\n"))
}
