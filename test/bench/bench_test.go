//go:build bench

package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/harness"
	"github.com/berth-dev/berth/test/netns"
)

// TestMain runs nothing unless BERTH_BENCH says quick or full (bench.sh
// sets it), and then inside a network namespace of its own.
func TestMain(m *testing.M) {
	if os.Getenv("BERTH_BENCH") == "" {
		fmt.Println("bench: set BERTH_BENCH=quick or full (or run bash test/bench.sh quick)")
		os.Exit(0)
	}
	os.Exit(netns.Run(m))
}

type config struct {
	mode        string
	repeats     int
	dur         time.Duration
	conc        int
	maxOps      int64
	longConns   int
	scale       []int
	natSizes    []int
	natRepeats  int
	readyBudget time.Duration
}

func configFor(mode string) config {
	c := config{mode: mode, repeats: 3, dur: time.Second, conc: 8, maxOps: 200_000, longConns: 1000,
		scale: []int{1, 10, 100}, natSizes: []int{100, 1000, 10000}, natRepeats: 3}
	if mode == "full" {
		c.repeats, c.dur, c.natRepeats = 5, 3*time.Second, 5
		c.scale = append(c.scale, 1000)
	}
	return c
}

// system is one way of reaching the same echo server.
type system struct {
	name    string
	in      In
	tcp     string // address of the echo server's TCP port 80
	udp     string // and of its UDP port 53
	client  string // where the client runs, for the report
	memPids func() []int
	relays  bool // the forwarding is memPids' own work (user space), not the kernel's
}

// fatalTB turns Fatal into a panic while a world is started on another
// goroutine (inside a peer namespace), where t.Fatal must not be called.
type fatalTB struct {
	testing.TB
	async atomic.Bool
}

type fatalMsg string

func (f *fatalTB) Fatal(args ...any) {
	if f.async.Load() {
		panic(fatalMsg(fmt.Sprint(args...)))
	}
	f.TB.Fatal(args...)
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	if f.async.Load() {
		panic(fatalMsg(fmt.Sprintf(format, args...)))
	}
	f.TB.Fatalf(format, args...)
}

// startIn starts a private dockerd inside the peer's namespace: the
// goroutine that forks it has entered that namespace, so dockerd, its
// containers and its docker-proxy processes all live there.
func startIn(t *testing.T, p *netns.Peer, o harness.Options) (*harness.World, error) {
	tb := &fatalTB{TB: t}
	tb.async.Store(true)
	defer tb.async.Store(false)
	var w *harness.World
	err := p.Do(func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				if m, ok := r.(fatalMsg); ok {
					err = errors.New(string(m))
					return
				}
				panic(r)
			}
		}()
		w = harness.Start(tb, o)
		return nil
	})
	return w, err
}

// tune makes connection-rate runs measure the forwarders, not the
// ephemeral port space: reuse TIME_WAIT ports for new outgoing
// connections and widen the range. Set in every namespace of the run.
func tune(in In) error {
	return in(func() error {
		for k, v := range map[string]string{
			"net/ipv4/tcp_tw_reuse":        "1",
			"net/ipv4/ip_forward":          "1",
			"net/ipv4/tcp_max_syn_backlog": "4096",
			"net/core/somaxconn":           "4096",
		} {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
}

func dockerdPid(w *harness.World) int {
	b, _ := os.ReadFile(filepath.Join(w.Dir, "docker.pid"))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// docker runs the CLI against a world with a timeout longer than the
// harness's two minutes (removing 2,000 docker-proxy processes is slow).
func docker(w *harness.World, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+w.Host, "DOCKER_CONFIG="+filepath.Join(w.Dir, "cli"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func whoUDP(in In, addr string) error {
	return in(func() error {
		_, err := harness.WhoUDP(addr, time.Second)
		return err
	})
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianDur(xs []time.Duration) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// agg is the repeats of one test on one system.
type agg struct {
	rates    []float64
	cpu      []float64 // the forwarder's CPU per operation (bulk: per MiB), µs
	p50, p99 []time.Duration
	errs     int64
	count    int64
	note     string
}

func (a *agg) add(r Result) {
	a.rates = append(a.rates, r.Rate)
	a.p50 = append(a.p50, r.P50)
	a.p99 = append(a.p99, r.P99)
	a.errs += r.Errors
	a.count += r.Count
	if a.note == "" {
		a.note = r.Note
	}
}

func TestBench(t *testing.T) {
	if os.Getenv("BERTH_BENCH_NAT_OUT") != "" {
		t.Skip("NAT scale child")
	}
	harness.Require(t)
	cfg := configFor(os.Getenv("BERTH_BENCH"))
	out := os.Getenv("BERTH_BENCH_OUT")
	if out == "" {
		out = "../../bench/out"
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	loadBefore := loadavg()
	logf := func(format string, a ...any) {
		fmt.Printf("[%6.1fs] %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, a...))
	}
	var rep strings.Builder
	section := func(s string) { rep.WriteString(s); rep.WriteString("\n") }

	// The worlds: A (berth) in this namespace, B (docker-proxy) and C
	// (Docker's NAT) each in a peer namespace of their own, so three
	// dockerds with their own docker0 never meet.
	logf("starting three private dockerds (berth, docker-proxy, docker NAT)")
	if err := tune(Here); err != nil {
		t.Fatal(err)
	}
	pA := netns.NewPeer(t, 61) // the remote client of world A
	pB := netns.NewPeer(t, 62) // world B's host
	pC := netns.NewPeer(t, 63) // world C's host
	for _, p := range []*netns.Peer{pA, pB, pC} {
		if err := tune(p.Do); err != nil {
			t.Fatal(err)
		}
	}
	// Every host namespace tracks connections, as any host with Docker's
	// default iptables does: berth's and Docker's NAT rules turn conntrack
	// on in theirs; docker-proxy's (--iptables=false) gets one rule that
	// does the same, so its path pays what the others pay.
	if out, err := pB.Exec("iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"); err != nil {
		t.Fatalf("conntrack rule in the docker-proxy namespace: %v: %s", err, out)
	}
	var wB, wC *harness.World
	var errB, errC error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); wB, errB = startIn(t, pB, harness.Options{UserlandProxy: true}) }()
	go func() { defer wg.Done(); wC, errC = startIn(t, pC, harness.Options{IPTables: true}) }()
	wA := harness.Start(t, harness.Options{})
	wg.Wait()
	if errB != nil || errC != nil {
		t.Fatalf("docker-proxy world: %v; docker NAT world: %v", errB, errC)
	}
	b := wA.StartBerth("--log-level", "info")
	berthPid := b.Cmd.Process.Pid
	logf("worlds up; berth pid %d", berthPid)
	dockerVersion, _ := wA.Docker("version", "--format", "{{.Server.Version}}")

	// The same echo server behind every path.
	perf := []string{"-p", "30080:80", "-p", "30053:53/udp", "--", "-tcp", "80", "-udp", "53"}
	wA.RunEcho("perf", perf...)
	wA.RunEcho("perfr", "--label", "berth.ports=31080:80,31053:53/udp", "--label", "berth.mode=relay", "--", "-tcp", "80", "-udp", "53")
	wB.RunEcho("perf", perf...)
	wC.RunEcho("perf", perf...)
	ipA := wA.ContainerIP("perf")
	proxyPids := func() []int { return Children(dockerdPid(wB), "docker-proxy") }
	berthPids := func() []int { return []int{berthPid} }
	hp := net.JoinHostPort
	systems := []system{
		{"direct", pA.Do, hp(ipA, "80"), hp(ipA, "53"), "remote netns → container IP", nil, false},
		{"docker-proxy", Here, hp(pB.Addr, "30080"), hp(pB.Addr, "30053"), "remote netns → host veth address", proxyPids, true},
		{"docker NAT", Here, hp(pC.Addr, "30080"), hp(pC.Addr, "30053"), "remote netns → host veth address", nil, false},
		{"berth NAT", pA.Do, hp(pA.LocalAddr, "30080"), hp(pA.LocalAddr, "30053"), "remote netns → host veth address", berthPids, false},
		{"berth relay", pA.Do, hp(pA.LocalAddr, "31080"), hp(pA.LocalAddr, "31053"), "remote netns → host veth address", berthPids, true},
	}
	for _, s := range systems {
		expect := "perf"
		if s.name == "berth relay" {
			expect = "perfr"
		}
		if _, err := AllAnswer(s.in, []string{s.tcp}, expect, 30*time.Second); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if err := whoUDP(s.in, s.udp); err != nil {
			t.Fatalf("%s udp: %v", s.name, err)
		}
	}
	logf("all five paths answer")

	// Throughput, connection rate, UDP: interleaved, repeated, median.
	kinds := []string{"bulk", "conn", "udp"}
	res := map[string]map[string]*agg{}
	for _, k := range kinds {
		res[k] = map[string]*agg{}
		for _, s := range systems {
			res[k][s.name] = &agg{}
		}
	}
	for r := 0; r < cfg.repeats; r++ {
		for _, k := range kinds {
			for i := range systems {
				s := systems[(i+r)%len(systems)] // rotate who goes first
				var x Result
				var err error
				var cpu0 time.Duration
				if s.relays {
					cpu0 = CPUOf(s.memPids()...)
				}
				switch k {
				case "bulk":
					x, err = TCPBulk(s.in, s.tcp, cfg.dur)
				case "conn":
					x, err = TCPConnRate(s.in, s.tcp, cfg.conc, cfg.dur, cfg.maxOps)
				case "udp":
					x, err = UDPRate(s.in, s.udp, cfg.conc, cfg.dur, cfg.maxOps)
				}
				if err != nil {
					x.Errors++
					x.Note = err.Error()
				}
				res[k][s.name].add(x)
				if per := float64(x.Count); s.relays && per > 0 {
					if k == "bulk" {
						per /= 1 << 20
					}
					a := res[k][s.name]
					a.cpu = append(a.cpu, float64((CPUOf(s.memPids()...)-cpu0).Microseconds())/per)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		logf("load repeat %d/%d done", r+1, cfg.repeats)
	}

	// 1,000 concurrent connections through one mapping.
	type longRes struct {
		r            Result
		before, held Mem
		after        Mem
		hasMem       bool
	}
	longs := map[string]longRes{}
	for _, s := range systems {
		var lr longRes
		memNow := func() Mem {
			if s.memPids == nil {
				return Mem{}
			}
			runtime.GC()
			m, _ := MemOf(s.memPids()...)
			return m
		}
		lr.hasMem = s.memPids != nil
		lr.before = memNow()
		r, err := LongConns(s.in, s.tcp, cfg.longConns, 50, func() { lr.held = memNow() })
		if err != nil {
			r.Errors++
			r.Note = err.Error()
		}
		time.Sleep(500 * time.Millisecond)
		lr.after = memNow()
		lr.r = r
		longs[s.name] = lr
	}
	logf("long connections done")

	// Scale series: containers publishing 1..1,000 ports.
	type scalePt struct {
		sys        string
		ports      int
		procs      int
		mem        Mem
		run, ready time.Duration
		afterStart time.Duration // ready, counted from the container's StartedAt
		installed  time.Duration // berth status: all installed, from StartedAt
		rm, gone   time.Duration
		err        string
	}
	var scale []scalePt
	// A fresh berth for the scale series, so its memory is not the heap
	// the load tests left behind; it adopts the NAT rules in place.
	b.Stop()
	b = wA.StartBerth("--log-level", "info")
	berthPid = b.Cmd.Process.Pid
	time.Sleep(time.Second)
	runtime.GC()
	berthBase, _ := MemOf(berthPid)
	for _, n := range cfg.scale {
		lo, hi := 20000, 20000+n-1
		rng := fmt.Sprintf("%d-%d", lo, hi)
		if n == 1 {
			rng = strconv.Itoa(lo)
		}
		ports := func(host string) []string {
			var a []string
			for p := lo; p <= hi; p++ {
				a = append(a, hp(host, strconv.Itoa(p)))
			}
			return a
		}
		type variant struct {
			sys   string
			w     *harness.World
			in    In
			args  []string
			addrs []string
		}
		name := fmt.Sprintf("scale%d", n)
		vs := []variant{
			{"docker-proxy", wB, Here, []string{"-p", rng + ":" + rng}, append(ports(pB.Addr), ports(pB.Addr6)...)},
			{"berth (-p, auto)", wA, pA.Do, []string{"-p", rng + ":" + rng}, append(ports(pA.LocalAddr), ports(pA.Local6)...)},
			{"berth relay (label)", wA, pA.Do, []string{"--label", "berth.ports=" + rng + ":" + rng, "--label", "berth.mode=relay"}, append(ports(pA.LocalAddr), ports(pA.Local6)...)},
		}
		for _, v := range vs {
			pt := scalePt{sys: v.sys, ports: n}
			// docker-proxy processes of the perf container stay; count
			// only the ones this container adds.
			basePids := map[int]bool{}
			for _, pid := range proxyPids() {
				basePids[pid] = true
			}
			newPids := func() []int {
				var a []int
				for _, pid := range proxyPids() {
					if !basePids[pid] {
						a = append(a, pid)
					}
				}
				return a
			}
			args := append([]string{"run", "-d", "--name", name, "-e", "NAME=" + name}, v.args...)
			args = append(args, harness.ImageEcho, "-tcp", rng)
			// berth's own view: when its status shows all 2n mappings
			// of this container installed
			installedAt := make(chan time.Time, 1)
			stopPoll := make(chan struct{})
			if v.sys != "docker-proxy" {
				before, _ := b.Summary()
				go func() {
					for {
						select {
						case <-stopPoll:
							installedAt <- time.Time{}
							return
						default:
						}
						if s, err := b.Summary(); err == nil && s.Installed-before.Installed >= 2*n {
							installedAt <- time.Now()
							return
						}
						time.Sleep(10 * time.Millisecond)
					}
				}()
			} else {
				installedAt <- time.Time{}
			}
			t0 := time.Now()
			if _, err := docker(v.w, 10*time.Minute, args...); err != nil {
				t.Fatal(err)
			}
			pt.run = time.Since(t0)
			if v.sys == "docker-proxy" {
				if pp, _ := docker(v.w, time.Minute, "port", name); !strings.Contains(pp, ":::") {
					v.addrs = v.addrs[:n] // this dockerd published IPv4 only
				}
			}
			if _, err := AllAnswer(v.in, v.addrs, name, 60*time.Second+time.Duration(n)*100*time.Millisecond); err != nil {
				pt.err = err.Error()
			}
			pt.ready = time.Since(t0)
			readyAt := time.Now()
			if st, err := docker(v.w, time.Minute, "inspect", "-f", "{{.State.StartedAt}}", name); err == nil {
				if at, err := time.Parse(time.RFC3339Nano, st); err == nil {
					pt.afterStart = readyAt.Sub(at)
					close(stopPoll)
					if inst := <-installedAt; !inst.IsZero() {
						pt.installed = inst.Sub(at)
					}
				}
			}
			if v.sys == "docker-proxy" {
				pt.mem, _ = MemOf(newPids()...)
				pt.procs = pt.mem.Procs
			} else {
				runtime.GC()
				pt.mem, _ = MemOf(berthPid)
				pt.procs = 1
			}
			t1 := time.Now()
			if _, err := docker(v.w, 10*time.Minute, "rm", "-f", name); err != nil {
				t.Fatal(err)
			}
			pt.rm = time.Since(t1)
			if v.sys == "docker-proxy" {
				for len(newPids()) > 0 && time.Since(t1) < time.Minute {
					time.Sleep(20 * time.Millisecond)
				}
			} else {
				for time.Since(t1) < time.Minute {
					if s, err := b.Summary(); err == nil && s.Mappings <= 8 { // the perf containers' mappings stay
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			pt.gone = time.Since(t1)
			scale = append(scale, pt)
			logf("scale %d ports %s: ready %v, rm %v, %d procs, RSS %s %s", n, v.sys, pt.ready.Round(time.Millisecond), pt.rm.Round(time.Millisecond), pt.procs, MiB(pt.mem.RSS), pt.err)
		}
	}

	// NAT scale: synthetic mappings, in a fresh namespace, in a child
	// process that holds only the NAT table.
	natRes, natErr := natScale(t, cfg)
	logf("nat scale done")

	// ---- report ----
	host, _ := os.Hostname()
	kernel, _ := exec.Command("uname", "-r").Output()
	cpu := cpuModel()
	section("# berth benchmark report\n")
	section(fmt.Sprintf("Mode **%s**, %s, on `%s`: %d CPUs (%s), kernel %s, dockerd %s, Go %s. Total run time %v. Load average (1, 5, 15 min) at the start %s, at the end %s: anything well above 0 means other work shared the CPUs and the absolute numbers are low; the ratios, measured interleaved, hold up better.\n",
		cfg.mode, time.Now().UTC().Format("2006-01-02 15:04 MST"), host, runtime.NumCPU(), cpu, strings.TrimSpace(string(kernel)),
		dockerVersion, runtime.Version(), time.Since(began).Round(time.Second), loadBefore, loadavg()))
	section("Systems, all forwarding to the same echo server image (`test/echoserver`) in a private dockerd:\n")
	section("- **direct**: the client connects to the container IP (routed through the host namespace, no forwarding).")
	section("- **docker-proxy**: dockerd `--userland-proxy=true --iptables=false` (Debian's `/usr/sbin/docker-proxy`), every connection goes through docker-proxy.")
	section("- **docker NAT**: dockerd `--iptables=true --userland-proxy=false`, Docker's own DNAT rules.")
	section("- **berth NAT**: dockerd `--iptables=false --userland-proxy=false`, `-p 30080:80`; berth (auto mode) DNATs IPv4.")
	section("- **berth relay**: label `berth.ports=31080:80,31053:53/udp`, `berth.mode=relay`: berth's in-process relay.\n")
	section("Every client runs in a separate \"remote host\" network namespace joined by a veth pair to the namespace where dockerd (and berth) run, and connects to the host's veth address (direct: to the container IP through the same veth). No client uses 127.0.0.1. Each of the three dockerds has its own namespace; all three track connections (the docker-proxy one gets a single `-m conntrack --ctstate INVALID -j DROP` rule, as its `--iptables=false` dockerd writes none, while a default Docker host has conntrack on through Docker's NAT). Note that with Docker's defaults (`--iptables=true --userland-proxy=true`) remote clients are DNATed and docker-proxy only serves localhost and hairpin traffic; the docker-proxy column shows the path where it carries everything. All namespaces run with `tcp_tw_reuse=1` (default ephemeral ports 32768-60999, clear of the published ports), so connection-rate runs do not run out of ephemeral ports.\n")
	section(fmt.Sprintf("Load: each test runs %v per system, systems interleaved (order rotated every repeat), %d repeats; the table shows the median of repeats (p50/p99: median of the repeats' percentiles). Connection and UDP tests use %d concurrent clients.\n",
		cfg.dur, cfg.repeats, cfg.conc))

	base := func(k, s string) float64 { return median(res[k][s].rates) }
	loadTable := func(k, unit, cpuUnit string, div float64, lat bool) string {
		head := []string{"system", unit, "min-max of repeats", "vs direct", "vs docker-proxy", cpuUnit}
		if lat {
			head = append(head, "p50", "p99", "errors")
		} else {
			head = append(head, "errors")
		}
		var rows [][]string
		for _, s := range systems {
			a := res[k][s.name]
			m := median(a.rates)
			lo, hi := slices.Min(a.rates), slices.Max(a.rates)
			cpu := "-"
			if len(a.cpu) > 0 {
				cpu = fmt.Sprintf("%.0f", median(a.cpu))
			}
			row := []string{s.name, fmt.Sprintf("%.1f", m/div), fmt.Sprintf("%.0f-%.0f", lo/div, hi/div), Ratio(m, base(k, "direct")), Ratio(m, base(k, "docker-proxy")), cpu}
			if lat {
				row = append(row, Dur(medianDur(a.p50)), Dur(medianDur(a.p99)))
			}
			e := fmt.Sprint(a.errs)
			if a.errs > 0 && a.note != "" {
				e += " (" + a.note + ")"
			}
			rows = append(rows, append(row, e))
		}
		return Table(head, rows)
	}
	section("## TCP bulk throughput (one connection, echoed both ways)\n")
	section("The forwarder CPU column is the CPU time (user and system) the forwarding processes used during a run, divided by what the run moved: docker-proxy's processes, berth's process for the relay. It does not depend on how the two CPUs were shared, so it is the steadiest comparison here; for NAT the kernel forwards in softirq context, charged to no process, so it is blank.\n")
	section(loadTable("bulk", "MiB/s each way", "forwarder CPU µs/MiB", 1<<20, false))
	section("## TCP connections per second (connect, 1 byte, half-close, echo, close)\n")
	section(loadTable("conn", "conn/s", "forwarder CPU µs/conn", 1, true))
	section("## UDP request/response (32-byte datagrams, one flow per client)\n")
	section(loadTable("udp", "round trips/s", "forwarder CPU µs/round trip", 1, true))

	section(fmt.Sprintf("## %d concurrent TCP connections through one mapping\n", cfg.longConns))
	section("Each connection echoes 8 bytes, all stay open together, each echoes again, then all close. Memory is the forwarding processes' (berth: the one process; docker-proxy: all of its processes) summed RSS.\n")
	var lrows [][]string
	for _, s := range systems {
		lr := longs[s.name]
		row := []string{s.name, fmt.Sprint(lr.r.Errors), Dur(lr.r.Dur)}
		if lr.hasMem {
			row = append(row, MiB(lr.before.RSS), MiB(lr.held.RSS), MiB(lr.held.RSS-lr.before.RSS), MiB(lr.after.RSS))
		} else {
			row = append(row, "-", "-", "-", "-")
		}
		if lr.r.Note != "" {
			row[1] += " (" + lr.r.Note + ")"
		}
		lrows = append(lrows, row)
	}
	section(Table([]string{"system", "errors", "time to open all", "RSS before", "RSS while held", "growth", "RSS after close"}, lrows))

	section("## Scale: one container publishing N TCP ports\n")
	section("`docker run -d -p LO-HI:LO-HI` (docker-proxy and berth auto: IPv4 by NAT, IPv6 by relay) or `--label berth.ports=LO-HI:LO-HI --label berth.mode=relay` (relay, both families). Every port is asked \"who?\" over IPv4 and IPv6 from the remote namespace until all answer. *ready* is from `docker run` to all answering; *after start* is from the container's `State.StartedAt` (the start event) to all answering. The client polls three probe ports (first, middle, last) every ~10-100 ms until they answer, then sweeps every address; *ready* is when that sweep found all answering, so it includes the sweep (up to a few hundred ms for 2,000 addresses on a busy host). For berth, *installed* is when `/status/summary` first counted all 2N mappings installed (polled every 10 ms). berth is restarted before the series (it adopts its NAT rules) so its memory does not carry the load tests' heap. Processes and memory: docker-proxy the processes this container added, summed; berth its one process (it adds none) (its RSS before any scale container: " + MiB(berthBase.RSS) + ", PSS " + MiB(berthBase.PSS) + ").\n")
	var srows [][]string
	for _, p := range scale {
		row := []string{fmt.Sprint(p.ports), p.sys, fmt.Sprint(p.procs), MiB(p.mem.RSS), MiB(p.mem.PSS), Dur(p.run), Dur(p.ready), Dur(p.afterStart), Dur(p.installed), Dur(p.rm), Dur(p.gone)}
		if p.err != "" {
			row[6] += " (" + p.err + ")"
		}
		srows = append(srows, row)
	}
	section(Table([]string{"ports", "system", "forwarding processes", "RSS", "PSS", "docker run", "ready", "after start", "berth status: installed after start", "docker rm", "all gone"}, srows))
	// ratio table at each size
	var rrows [][]string
	for _, n := range cfg.scale {
		var dp, ba *scalePt
		for i := range scale {
			if scale[i].ports == n && scale[i].sys == "docker-proxy" {
				dp = &scale[i]
			}
			if scale[i].ports == n && scale[i].sys == "berth (-p, auto)" {
				ba = &scale[i]
			}
		}
		if dp == nil || ba == nil {
			continue
		}
		rrows = append(rrows, []string{fmt.Sprint(n), fmt.Sprintf("%d / %d", ba.procs, dp.procs),
			Ratio(float64(ba.mem.RSS), float64(dp.mem.RSS)), Ratio(float64(ba.mem.PSS), float64(dp.mem.PSS)),
			Ratio(float64(ba.ready), float64(dp.ready)), Ratio(float64(ba.rm), float64(dp.rm))})
	}
	section("berth (-p, auto) against docker-proxy, same container:\n")
	section(Table([]string{"ports", "processes berth / docker-proxy", "RSS berth/docker-proxy", "PSS berth/docker-proxy", "ready berth/docker-proxy", "rm berth/docker-proxy"}, rrows))
	section("![memory and processes against published ports](chart.svg)\n")

	section("## NAT backend at scale (synthetic mappings, forward/nat alone)\n")
	if natErr != nil {
		section("Not measured: " + natErr.Error() + "\n")
	} else {
		section(natRes)
	}

	section("## Targets\n")
	{
		var trows [][]string
		mark := func(ok bool) string {
			if ok {
				return "met"
			}
			return "**not met**"
		}
		big := cfg.scale[len(cfg.scale)-1]
		for _, p := range scale {
			if p.ports != big {
				continue
			}
			switch p.sys {
			case "docker-proxy":
				trows = append(trows, []string{fmt.Sprintf("%d ports: docker-proxy processes (reference)", big), "~2 per port", fmt.Sprint(p.procs), "-"})
			default:
				trows = append(trows,
					[]string{fmt.Sprintf("%d ports, %s: processes, RSS", big, p.sys), "1, <= 32 MiB", fmt.Sprintf("%d, %s", p.procs, MiB(p.mem.RSS)), mark(p.procs == 1 && p.mem.RSS <= 32<<20)},
					[]string{fmt.Sprintf("%d ports, %s: all answering after the start event", big, p.sys), "<= 1 s", Dur(p.afterStart), mark(p.err == "" && p.afterStart <= time.Second)})
			}
		}
		r := func(k, a, b string) float64 { return base(k, a) / base(k, b) }
		p99 := func(k, s string) time.Duration { return medianDur(res[k][s].p99) }
		trows = append(trows,
			[]string{"TCP bulk, berth NAT / direct", ">= 0.95x", fmt.Sprintf("%.2fx", r("bulk", "berth NAT", "direct")), mark(r("bulk", "berth NAT", "direct") >= 0.95)},
			[]string{"TCP bulk, berth relay / direct", ">= 0.9x", fmt.Sprintf("%.2fx", r("bulk", "berth relay", "direct")), mark(r("bulk", "berth relay", "direct") >= 0.9)},
			[]string{"TCP conn/s, berth relay / docker-proxy", ">= 1.5x", fmt.Sprintf("%.2fx", r("conn", "berth relay", "docker-proxy")), mark(r("conn", "berth relay", "docker-proxy") >= 1.5)},
			[]string{"TCP conn p99, berth relay vs docker-proxy", "no worse", Dur(p99("conn", "berth relay")) + " vs " + Dur(p99("conn", "docker-proxy")), mark(p99("conn", "berth relay") <= p99("conn", "docker-proxy"))},
			[]string{"UDP rt/s, berth relay / docker-proxy", ">= 2x", fmt.Sprintf("%.2fx", r("udp", "berth relay", "docker-proxy")), mark(r("udp", "berth relay", "docker-proxy") >= 2)},
			[]string{"UDP p99, berth relay vs docker-proxy", "no worse", Dur(p99("udp", "berth relay")) + " vs " + Dur(p99("udp", "docker-proxy")), mark(p99("udp", "berth relay") <= p99("udp", "docker-proxy"))},
		)
		lr := longs["berth relay"]
		trows = append(trows, []string{fmt.Sprintf("%d concurrent connections through the relay", cfg.longConns), "no errors, growth stated",
			fmt.Sprintf("%d errors, +%s RSS", lr.r.Errors, MiB(lr.held.RSS-lr.before.RSS)), mark(lr.r.Errors == 0)})
		section(Table([]string{"target", "wanted", "measured", ""}, trows))
		if cfg.mode != "full" {
			section("Quick mode stops the scale series at " + fmt.Sprint(big) + " ports; `make bench` adds 1,000.\n")
		}
	}

	// chart
	var px, pyRSS, pyPSS, pyProcs, bx, byRSS, byProcs, rx, ryRSS []float64
	for _, p := range scale {
		x := float64(p.ports)
		switch p.sys {
		case "docker-proxy":
			px, pyRSS, pyPSS, pyProcs = append(px, x), append(pyRSS, float64(p.mem.RSS)/(1<<20)), append(pyPSS, float64(p.mem.PSS)/(1<<20)), append(pyProcs, float64(p.procs))
		case "berth (-p, auto)":
			bx, byRSS, byProcs = append(bx, x), append(byRSS, float64(p.mem.RSS)/(1<<20)), append(byProcs, float64(p.procs))
		default:
			rx, ryRSS = append(rx, x), append(ryRSS, float64(p.mem.RSS)/(1<<20))
		}
	}
	svg := SVG(fmt.Sprintf("docker-proxy vs berth (%s, %s)", cfg.mode, time.Now().UTC().Format("2006-01-02")),
		Panel{Title: "Memory", XLabel: "published ports (one container)", YLabel: "MiB",
			Series: []Series{
				{Name: "docker-proxy, summed RSS", Color: "#d62728", X: px, Y: pyRSS},
				{Name: "docker-proxy, summed PSS", Color: "#d62728", Dashed: true, X: px, Y: pyPSS},
				{Name: "berth (-p, auto) RSS", Color: "#1f77b4", X: bx, Y: byRSS},
				{Name: "berth relay (label) RSS", Color: "#2ca02c", Dashed: true, X: rx, Y: ryRSS},
			}},
		Panel{Title: "Processes", XLabel: "published ports (one container)", YLabel: "forwarding processes",
			Series: []Series{
				{Name: "docker-proxy", Color: "#d62728", X: px, Y: pyProcs},
				{Name: "berth", Color: "#1f77b4", X: bx, Y: byProcs},
			}})
	if err := os.WriteFile(filepath.Join(out, "chart.svg"), []byte(svg), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "report.md"), []byte(rep.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	logf("report written to %s", filepath.Join(out, "report.md"))
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
