//go:build bench

package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/forward/nat"
	"github.com/berth-dev/berth/reconcile"
)

// natOut is what the child process measures.
type natOut struct {
	Flavour   string
	Cold      map[int][]time.Duration
	Noop      []time.Duration // List + reconcile.Diff with nothing changed
	Add       []time.Duration // one 10-port container added at 10,000
	Remove    []time.Duration // and removed again
	Installed int
	Mem       Mem
	Sizes     []int
}

// natScale runs TestNATScale in a child process inside a fresh, empty
// network namespace (never this one, where berth has its chains, and
// never the host's), and formats what it measured.
func natScale(t *testing.T, cfg config) (string, error) {
	name := fmt.Sprintf("berth-bn%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return "", fmt.Errorf("ip netns add: %v: %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", name).Run()
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	res := filepath.Join(t.TempDir(), "nat.json")
	cmd := exec.Command("nsenter", "--net=/run/netns/"+name, "--", self, "-test.run=^TestNATScale$", "-test.v", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), "BERTH_TEST_NETNS="+name, "BERTH_BENCH_NAT_OUT="+res,
		"BERTH_BENCH_NAT_REPEATS="+fmt.Sprint(cfg.natRepeats))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("NAT scale child: %v: %s", err, out)
	}
	b, err := os.ReadFile(res)
	if err != nil {
		return "", err
	}
	var r natOut
	if err := json.Unmarshal(b, &r); err != nil {
		return "", err
	}
	var s strings.Builder
	fmt.Fprintf(&s, "iptables flavour **%s**, IPv4, 10 TCP ports per synthetic container, one `nat.Table` in a child process in an empty namespace; median of %d repeats (min-max in brackets).\n\n", r.Flavour, cfg.natRepeats)
	mm := func(ds []time.Duration) string {
		if len(ds) == 0 {
			return "-"
		}
		lo, hi := ds[0], ds[0]
		for _, d := range ds {
			lo, hi = min(lo, d), max(hi, d)
		}
		return fmt.Sprintf("%s (%s-%s)", Dur(medianDur(ds)), Dur(lo), Dur(hi))
	}
	ok := func(ds []time.Duration, lim time.Duration) string {
		if len(ds) > 0 && medianDur(ds) <= lim {
			return "met"
		}
		return "**not met**"
	}
	var rows [][]string
	for _, n := range r.Sizes {
		tgt, st := "-", ""
		if n == 10000 {
			tgt, st = "<= 1 s", ok(r.Cold[n], time.Second)
		}
		rows = append(rows, []string{fmt.Sprintf("cold install of %d mappings (chains and jumps included)", n), mm(r.Cold[n]), tgt, st})
	}
	rows = append(rows,
		[]string{fmt.Sprintf("no-op resync at %d: List + reconcile.Diff", r.Installed), mm(r.Noop), "<= 200 ms", ok(r.Noop, 200*time.Millisecond)},
		[]string{fmt.Sprintf("add one 10-port container at %d", r.Installed), mm(r.Add), "<= 50 ms", ok(r.Add, 50*time.Millisecond)},
		[]string{fmt.Sprintf("remove one 10-port container at %d", r.Installed), mm(r.Remove), "<= 50 ms", ok(r.Remove, 50*time.Millisecond)},
	)
	st := "**not met**"
	if r.Mem.RSS <= 64<<20 {
		st = "met"
	}
	rows = append(rows, []string{fmt.Sprintf("RSS of the process holding %d mappings (a Go test binary with the nat.Table; PSS %s)", r.Installed, MiB(r.Mem.PSS)), MiB(r.Mem.RSS), "<= 64 MiB", st})
	s.WriteString(Table([]string{"operation", "time / memory", "target", ""}, rows))
	s.WriteString("\nThe real 1,000-port container (start to all ports answering, next to docker-proxy) is in the scale table above.\n")
	return s.String(), nil
}

// synth makes count synthetic containers' mappings, ports each;
// synthContainer(i, n) is container i alone.
func synth(count, ports int) []forward.Mapping {
	return forwardtest.Containers(0, count, ports, 0xbe7000000000)
}

func synthContainer(i, n int) []forward.Mapping {
	return forwardtest.Containers(i, 1, n, 0xbe7000000000)
}

// TestNATScale is the child side of natScale.
func TestNATScale(t *testing.T) {
	outPath := os.Getenv("BERTH_BENCH_NAT_OUT")
	if outPath == "" || os.Getenv("BERTH_TEST_NETNS") == "" {
		t.Skip("run by TestBench in a namespace of its own")
	}
	repeats := 3
	fmt.Sscan(os.Getenv("BERTH_BENCH_NAT_REPEATS"), &repeats)
	// A "bridge" routing the made-up container subnet, as forward/nat's
	// own benchmarks have.
	for _, s := range [][]string{
		{"ip", "link", "add", "bbench", "type", "veth", "peer", "name", "bbench1"},
		{"ip", "addr", "add", "10.200.0.1/16", "dev", "bbench"},
		{"ip", "link", "set", "bbench", "up"},
	} {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", s, err, out)
		}
	}
	tab, err := nat.New(nat.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	defer tab.Cleanup(ctx)
	r := natOut{Flavour: tab.Flavour(), Cold: map[int][]time.Duration{}, Sizes: []int{100, 1000, 10000}}
	for _, n := range r.Sizes {
		ms := synth(n/10, 10)
		for i := 0; i < repeats; i++ {
			if err := tab.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			if err := tab.Apply(ctx, ms, nil); err != nil {
				t.Fatal(err)
			}
			r.Cold[n] = append(r.Cold[n], time.Since(t0))
		}
	}
	desired := synth(1000, 10) // installed now: the last cold run
	extra := synthContainer(1000, 10)
	for i := 0; i < repeats; i++ {
		t0 := time.Now()
		got, err := tab.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if p := reconcile.Diff(desired, got); !p.Empty() {
			t.Fatalf("no-op diff: %d to add, %d to remove", len(p.Add), len(p.Remove))
		}
		r.Noop = append(r.Noop, time.Since(t0))
		r.Installed = len(got)

		t0 = time.Now()
		if err := tab.Apply(ctx, extra, nil); err != nil {
			t.Fatal(err)
		}
		r.Add = append(r.Add, time.Since(t0))
		t0 = time.Now()
		if err := tab.Apply(ctx, nil, extra); err != nil {
			t.Fatal(err)
		}
		r.Remove = append(r.Remove, time.Since(t0))
	}
	runtime.GC()
	r.Mem, _ = MemOf(os.Getpid())
	b, _ := json.Marshal(r)
	if err := os.WriteFile(outPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
