package dockerfwd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// procRoot is /proc; tests point it at a fake tree.
var procRoot = "/proc"

// Scan is one reading of the host: every forward dockerd has in place, and
// the facts the status summary reports.
type Scan struct {
	Forwards []Forward
	// IPTables per family ("ipv4", "ipv6"): the flavour read ("nft",
	// "legacy", "" when no tool) and what its nat table holds.
	Flavour map[string]string
	Tables  map[string]IPTables
	// NFT lists the docker-bridges tables present ("ip", "ip6").
	NFT []string
	// Proxies counts docker-proxy processes in berth's network namespace.
	Proxies int
	// Errs are reads that failed (a tool timed out); the previous scan's
	// forwards of that source are kept in Forwards.
	Errs []error
	At   time.Time
}

// saver reads one family's Docker chain in the iptables flavour that holds
// it: `iptables -t nat -S DOCKER` (and -S PREROUTING, -S OUTPUT for the
// jump), not a whole iptables-save, which at 20,000 rules of berth's own
// takes 10 times longer. It remembers the flavour and looks at the other
// one again only when the chosen one shows no DOCKER chain (at most every
// probeEvery).
type saver struct {
	v6        bool
	bins      map[string]string // flavour -> iptables binary
	cur       string
	lastProbe time.Time
}

const probeEvery = 30 * time.Second

func newSaver(v6 bool) *saver {
	base := "iptables"
	if v6 {
		base = "ip6tables"
	}
	s := &saver{v6: v6, bins: map[string]string{}}
	for _, fl := range []string{"nft", "legacy"} {
		if p, err := exec.LookPath(base + "-" + fl); err == nil {
			s.bins[fl] = p
		}
	}
	if len(s.bins) == 0 { // a distribution with only the plain name
		if p, err := exec.LookPath(base); err == nil {
			fl := "nft"
			if out, err := exec.Command(p, "--version").Output(); err == nil && bytes.Contains(out, []byte("legacy")) {
				fl = "legacy"
			}
			s.bins[fl] = p
		}
	}
	if _, ok := s.bins["nft"]; ok {
		s.cur = "nft"
	} else if _, ok := s.bins["legacy"]; ok {
		s.cur = "legacy"
	}
	return s
}

// legacyInUse reports whether the kernel has legacy tables for the family;
// without them a legacy call would only load the module to print nothing.
func legacyInUse(v6 bool) bool {
	f := "ip_tables_names"
	if v6 {
		f = "ip6_tables_names"
	}
	b, err := os.ReadFile(filepath.Join(procRoot, "net", f))
	return err == nil && len(bytes.TrimSpace(b)) > 0
}

func (s *saver) read(ctx context.Context) (string, IPTables, error) {
	if s.cur == "" {
		return "", IPTables{}, nil
	}
	if s.cur == "legacy" && !legacyInUse(s.v6) {
		if _, ok := s.bins["nft"]; ok {
			s.cur = "nft"
		} else {
			return s.cur, IPTables{}, nil
		}
	}
	t, err := s.list(ctx, s.cur)
	if err != nil {
		return s.cur, IPTables{}, err
	}
	if t.Chain || time.Since(s.lastProbe) < probeEvery {
		return s.cur, t, nil
	}
	s.lastProbe = time.Now()
	for fl := range s.bins {
		if fl == s.cur || (fl == "legacy" && !legacyInUse(s.v6)) {
			continue
		}
		if o, err := s.list(ctx, fl); err == nil && o.Chain {
			s.cur = fl
			return fl, o, nil
		}
	}
	return s.cur, t, nil
}

// list reads the DOCKER chain of the nat table and, when it has DNAT
// rules, whether PREROUTING or OUTPUT jumps to it.
func (s *saver) list(ctx context.Context, flavour string) (IPTables, error) {
	bin := s.bins[flavour]
	out, found, err := listChain(ctx, bin, "DOCKER")
	if err != nil || !found {
		return IPTables{}, err
	}
	t := ParseIPTablesSave(out, s.v6)
	t.Chain = true
	if len(t.DNAT) == 0 {
		return t, nil
	}
	for _, c := range []string{"PREROUTING", "OUTPUT"} {
		out, _, err := listChain(ctx, bin, c)
		if err != nil {
			return IPTables{}, err
		}
		if ParseIPTablesSave(out, s.v6).Jumped {
			t.Jumped = true
			break
		}
	}
	return t, nil
}

// listChain runs `iptables -w -t nat -S CHAIN`. Exit status 1 is a chain
// (or table) that does not exist: iptables-nft 1.8.9 then says
// "incompatible", legacy "No chain/target/match by that name".
func listChain(ctx context.Context, bin, chain string) (string, bool, error) {
	out, err := run(ctx, bin, "-w", "-t", "nat", "-S", chain)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return "", false, nil
	}
	return out, err == nil, err
}

// run executes a tool and returns its stdout.
func run(ctx context.Context, bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// hostReader reads the host for a Detector. It is used by one goroutine
// at a time (the Detector's lock).
type hostReader struct {
	once   sync.Once
	s4, s6 *saver
	nft    string // nft binary, "" if none
	prev   map[string][]Forward
}

func (h *hostReader) init() {
	h.s4, h.s6 = newSaver(false), newSaver(true)
	if p, err := exec.LookPath("nft"); err == nil {
		h.nft = p
	}
	h.prev = map[string][]Forward{}
}

// read runs one iptables-save per family, `nft list tables` (and one list
// per docker-bridges table present), and one pass over /proc/*/comm (the
// command lines only of docker-proxy processes).
func (h *hostReader) read(ctx context.Context) Scan {
	h.once.Do(h.init)
	sc := Scan{Flavour: map[string]string{}, Tables: map[string]IPTables{}, At: time.Now()}
	keep := func(src string, fws []Forward, err error) {
		if err != nil {
			sc.Errs = append(sc.Errs, err)
			fws = h.prev[src]
		}
		h.prev[src] = fws
		sc.Forwards = append(sc.Forwards, fws...)
	}
	for _, fam := range []struct {
		name string
		s    *saver
	}{{"ipv4", h.s4}, {"ipv6", h.s6}} {
		fl, t, err := fam.s.read(ctx)
		sc.Flavour[fam.name], sc.Tables[fam.name] = fl, t
		var fws []Forward
		if t.Jumped {
			fws = t.DNAT
		}
		keep("iptables-"+fam.name, fws, err)
	}
	if h.nft != "" {
		tables, err := run(ctx, h.nft, "list", "tables")
		for _, fam := range []string{"ip", "ip6"} {
			var fws []Forward
			var ferr error
			switch {
			case err != nil:
				ferr = err
			case hasLine(tables, "table "+fam+" docker-bridges"):
				sc.NFT = append(sc.NFT, fam)
				var text string
				if text, ferr = run(ctx, h.nft, "list", "table", fam, "docker-bridges"); ferr == nil {
					fws = ParseNFTTable(text, fam)
				}
			}
			keep("nft-"+fam, fws, ferr)
		}
	}
	fws, n, err := proxies()
	sc.Proxies = n
	keep("docker-proxy", fws, err)
	return sc
}

func hasLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

// proxies finds docker-proxy processes in berth's network namespace (a
// dockerd in another namespace publishes on other addresses) and reads
// their command lines.
func proxies() ([]Forward, int, error) {
	pids, err := pidsByComm("docker-proxy")
	if err != nil {
		return nil, 0, err
	}
	var out []Forward
	for _, pid := range pids {
		b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cmdline"))
		if err != nil {
			continue // gone
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if f, ok := ParseProxyArgs(argv); ok {
			f.Via = "docker-proxy pid " + strconv.Itoa(pid)
			out = append(out, f)
		}
	}
	return out, len(pids), nil
}

// pidsByComm lists the processes named comm that share berth's network
// namespace, lowest pid first. A process whose namespace cannot be read is
// kept (best effort without CAP_SYS_PTRACE).
func pidsByComm(comm string) ([]int, error) {
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, err
	}
	self, _ := os.Readlink(filepath.Join(procRoot, "self", "ns", "net"))
	var out []int
	for _, e := range ents {
		name := e.Name()
		if name == "" || name[0] < '0' || name[0] > '9' {
			continue
		}
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procRoot, name, "comm"))
		if err != nil || strings.TrimSpace(string(b)) != comm {
			continue
		}
		if ns, err := os.Readlink(filepath.Join(procRoot, name, "ns", "net")); err == nil && self != "" && ns != self {
			continue
		}
		out = append(out, pid)
	}
	slices.Sort(out)
	return out, nil
}

var errNoDockerd = errors.New("no dockerd process in berth's network namespace (berth needs the host's pid namespace to see it)")
