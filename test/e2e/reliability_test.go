package e2e

// Reliability (issue 8, items 1, 3 and 7): kill -9 during a churn burst and
// adoption by the next berth, 200 cycles of container churn with a bound
// on resource growth, and a relay mapping flooded past its flow and
// connection limits. Identifiers of this file start with "rel" so they do
// not collide with the other e2e files' helpers.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/sockets"
	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/client"
	"github.com/docker/go-connections/nat"
)

// relKind is one way of asking berth for mappings.
type relKind int

const (
	relPubTCP       relKind = iota // -p P:80: nat on 0.0.0.0, relay on [::] (IPv4-only container)
	relPubUDP                      // -p P:53/udp: the same for udp
	relLabelRelay                  // berth.ports=P:80,P+1:53/udp berth.mode=relay: four relay rows
	relLabelNAT                    // berth.ports=P:80 berth.mode=nat: [::] is an error (no IPv6 address)
	relLabelLocal                  // berth.ports=127.0.0.1:P:53/udp (auto: nat to localhost)
	relBadLabel                    // berth.ports=P:0: one error row for the container
	relClashLabel                  // berth.ports=relClashPort:80 relay: the oldest start wins, the others are errors
	relClashPublish                // -p relClashPubPort:80: dockerd refuses a second running container
	relKinds
)

var relKindNames = [...]string{"pub-tcp", "pub-udp", "label-relay", "label-nat", "label-local", "bad-label", "clash-label", "clash-publish"}

func (k relKind) String() string { return relKindNames[k] }

// Host ports the clash kinds share on purpose.
const (
	relClashPort    = 19990
	relClashPubPort = 19991
)

// relSpec is one container of these tests.
type relSpec struct {
	Name string
	Kind relKind
	Port uint16
}

// relRow is the part of a status row the tests predict.
type relRow struct {
	Name, Proto, HostIP string
	Port                uint16
	Mode, State         string
}

func (r relRow) String() string {
	return fmt.Sprintf("%s %s %s:%d %s %s", r.Name, r.Proto, r.HostIP, r.Port, r.Mode, r.State)
}

// rows are the status rows berth must show while the container runs (a
// clash row as installed; relExpected settles clashes).
func (s relSpec) rows() []relRow {
	const inst, bad = reconcile.StateInstalled, reconcile.StateError
	r := func(proto, ip string, port uint16, mode, state string) relRow {
		return relRow{s.Name, proto, ip, port, mode, state}
	}
	switch s.Kind {
	case relPubTCP:
		return []relRow{r("tcp", "0.0.0.0", s.Port, "nat", inst), r("tcp", "::", s.Port, "relay", inst)}
	case relPubUDP:
		return []relRow{r("udp", "0.0.0.0", s.Port, "nat", inst), r("udp", "::", s.Port, "relay", inst)}
	case relLabelRelay:
		return []relRow{r("tcp", "0.0.0.0", s.Port, "relay", inst), r("tcp", "::", s.Port, "relay", inst),
			r("udp", "0.0.0.0", s.Port+1, "relay", inst), r("udp", "::", s.Port+1, "relay", inst)}
	case relLabelNAT:
		return []relRow{r("tcp", "0.0.0.0", s.Port, "nat", inst), r("tcp", "::", s.Port, "nat", bad)}
	case relLabelLocal:
		return []relRow{r("udp", "127.0.0.1", s.Port, "nat", inst)}
	case relBadLabel:
		return []relRow{r("", "", 0, "", bad)}
	case relClashLabel:
		return []relRow{r("tcp", "0.0.0.0", relClashPort, "relay", inst), r("tcp", "::", relClashPort, "relay", inst)}
	case relClashPublish:
		return []relRow{r("tcp", "0.0.0.0", relClashPubPort, "nat", inst), r("tcp", "::", relClashPubPort, "relay", inst)}
	}
	panic("unknown kind")
}

// relSpecs is the model of which container is which, shared by workers.
type relSpecs struct {
	mu sync.Mutex
	m  map[string]relSpec
}

func (s *relSpecs) put(sp relSpec) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]relSpec{}
	}
	s.m[sp.Name] = sp
}

func (s *relSpecs) get(name string) (relSpec, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sp, ok := s.m[name]
	return sp, ok
}

// relExpected is the status berth must show for what docker ps says runs:
// every running container's rows; of the containers claiming the clash
// label port, the one started first is installed and the others are
// errors.
func relExpected(d *relDocker, specs *relSpecs) ([]relRow, error) {
	run, err := d.running()
	if err != nil {
		return nil, err
	}
	var want []relRow
	var clash []string
	for name := range run {
		sp, ok := specs.get(name)
		if !ok {
			return nil, fmt.Errorf("docker lists %q running, which no test started", name)
		}
		if sp.Kind == relClashLabel {
			clash = append(clash, name)
			continue
		}
		want = append(want, sp.rows()...)
	}
	sort.Slice(clash, func(i, j int) bool { return run[clash[i]].Before(run[clash[j]]) })
	for i, name := range clash {
		sp, _ := specs.get(name)
		for _, r := range sp.rows() {
			if i > 0 {
				r.State = reconcile.StateError
			}
			want = append(want, r)
		}
	}
	return want, nil
}

// relCheck compares berth's status with want, the DNAT rules in berth's
// chains with the installed nat rows (exactly one rule per row, IPv4 and
// IPv6), and the sockets berth holds with the installed relay rows. It
// returns what differs, or nil.
func relCheck(b *harness.Berth, want []relRow) error {
	rows, err := b.Status()
	if err != nil {
		return err
	}
	var problems []string
	var got []relRow
	for _, r := range rows {
		got = append(got, relRow{r.ContainerName, r.Proto, r.HostIP, r.HostPort, r.Mode, r.State})
	}
	if d := relMultisetDiff(relStrings(want), relStrings(got)); d != "" {
		problems = append(problems, "status rows (want vs berth status): "+d)
	}

	// Kernel: one DNAT rule per installed nat row, nothing else.
	var wantNAT []string
	wantRelay, wantHairpin := map[string]bool{}, map[string]bool{}
	for _, r := range rows {
		if r.State != reconcile.StateInstalled {
			continue
		}
		ip, err := netip.ParseAddr(r.HostIP)
		if err != nil {
			problems = append(problems, fmt.Sprintf("installed row with host address %q: %v", r.HostIP, err))
			continue
		}
		host := netip.AddrPortFrom(ip, r.HostPort)
		switch r.Mode {
		case "nat":
			cip, _ := netip.ParseAddr(r.ContainerIP)
			id := r.ContainerID
			if len(id) > 12 {
				id = id[:12]
			}
			wantNAT = append(wantNAT, fmt.Sprintf("%s %s %s->%s", id, r.Proto, host, netip.AddrPortFrom(cip, r.ContainerPort)))
			wantHairpin[id+" "+cip.String()] = true
		case "relay":
			wantRelay[r.Proto+" "+host.String()] = true
		}
	}
	gotNAT, hairpins, dups, err := relNATRules()
	if err != nil {
		return err
	}
	if d := relMultisetDiff(wantNAT, gotNAT); d != "" {
		problems = append(problems, "DNAT rules in BERTH-DNAT-* (installed nat rows vs iptables-save/ip6tables-save): "+d)
	}
	if d := relMultisetDiff(relKeys(wantHairpin), hairpins); d != "" {
		problems = append(problems, "hairpin MASQUERADE rules (one per container with installed nat rows): "+d)
	}
	if len(dups) > 0 {
		problems = append(problems, fmt.Sprintf("berth rules present more than once: %q", dups))
	}

	// Relay: the sockets berth's process holds, besides its HTTP listener
	// and UDP flows' ephemeral ports.
	gotRelay, err := relBerthSockets(b)
	if err != nil {
		return err
	}
	if d := relMultisetDiff(relKeys(wantRelay), gotRelay); d != "" {
		problems = append(problems, "relay sockets (installed relay rows vs /proc/net owned by berth): "+d)
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "\n"))
	}
	return nil
}

func relStrings(rs []relRow) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.String()
	}
	return out
}

// relMultisetDiff says which items are missing from got and which are
// extra (or present too often), or "" when both hold the same items.
func relMultisetDiff(want, got []string) string {
	n := map[string]int{}
	for _, s := range want {
		n[s]++
	}
	for _, s := range got {
		n[s]--
	}
	var missing, extra []string
	for s, c := range n {
		for ; c > 0; c-- {
			missing = append(missing, s)
		}
		for ; c < 0; c++ {
			extra = append(extra, s)
		}
	}
	if len(missing) == 0 && len(extra) == 0 {
		return ""
	}
	sort.Strings(missing)
	sort.Strings(extra)
	return fmt.Sprintf("missing %q; extra %q", missing, extra)
}

func relKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

var (
	relDNATRE    = regexp.MustCompile(`^-A BERTH-DNAT-\S+ .*--comment "berth ([0-9a-f]+) (\S+) (\S+->\S+)"`)
	relHairpinRE = regexp.MustCompile(`^-A BERTH-MASQ-\S+ .*--comment "berth ([0-9a-f]+) hairpin (\S+)"`)
)

// relNATRules reads berth's nat rules of both families: the DNAT rules in
// its chains as "ID PROTO HOST->TARGET" from their comments (a rule in a
// BERTH-DNAT chain without such a comment is listed whole), the hairpin
// MASQUERADE rules as "ID CONTAINER-IP", and any berth rule line present
// more than once.
func relNATRules() (dnat, hairpin, dups []string, err error) {
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		b, err := exec.Command(tool, "-t", "nat").CombinedOutput()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%s -t nat: %v: %s", tool, err, b)
		}
		seen := map[string]int{}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "-A ") && (strings.Contains(l, "BERTH-") || strings.Contains(l, "--comment \"berth ")) {
				if seen[l]++; seen[l] == 2 {
					dups = append(dups, tool+": "+l)
				}
			}
			if m := relHairpinRE.FindStringSubmatch(l); m != nil {
				hairpin = append(hairpin, m[1]+" "+m[2])
			}
			if !strings.HasPrefix(l, "-A BERTH-DNAT-") {
				continue
			}
			if m := relDNATRE.FindStringSubmatch(l); m != nil {
				dnat = append(dnat, m[1]+" "+m[2]+" "+m[3])
			} else {
				dnat = append(dnat, l)
			}
		}
	}
	return dnat, hairpin, dups, nil
}

// relBerthSockets lists "PROTO ADDR:PORT" of every TCP listener and bound
// UDP socket berth's process holds, except its HTTP listener and sockets
// on ephemeral ports (UDP flows' upstream sockets).
func relBerthSockets(b *harness.Berth) ([]string, error) {
	all, err := sockets.Listening()
	if err != nil {
		return nil, err
	}
	// The socket inodes berth's own process holds, read from its fd table
	// (not a host-wide owner scan, which names one holder per socket).
	fdDir := fmt.Sprintf("/proc/%d/fd", b.Cmd.Process.Pid)
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, err
	}
	held := map[uint64]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64); err == nil {
			held[ino] = true
		}
	}
	var out []string
	for _, s := range all {
		if !held[s.Inode] {
			continue
		}
		if s.Proto == forward.TCP && s.Addr.String() == b.Addr {
			continue
		}
		if s.Addr.Port() >= 32768 {
			continue
		}
		out = append(out, string(s.Proto)+" "+s.Addr.String())
	}
	return out, nil
}

// relRes is what berth's process uses, read from the process.
type relRes struct {
	Goroutines int
	FDs        int
	RSS        int64 // bytes
}

func (r relRes) String() string {
	return fmt.Sprintf("%d goroutines, %d fds, RSS %.1f MiB", r.Goroutines, r.FDs, float64(r.RSS)/(1<<20))
}

// relResources reads go_goroutines from /metrics, the fd count from
// /proc/PID/fd and VmRSS from /proc/PID/status.
func relResources(t testing.TB, b *harness.Berth) relRes {
	t.Helper()
	var r relRes
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + b.Addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			r.Goroutines = int(f)
		}
	}
	resp.Body.Close()
	if r.Goroutines == 0 {
		t.Fatal("/metrics has no go_goroutines")
	}
	r.FDs = relFDs(t, b)
	r.RSS = relRSS(t, b)
	return r
}

func relFDs(t testing.TB, b *harness.Berth) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", b.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// relFDKinds counts berth's open fds by kind: socket, pipe, anon_inode,
// file.
func relFDKinds(t testing.TB, b *harness.Berth) map[string]int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", b.Cmd.Process.Pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, fd := range fds {
		l, err := os.Readlink(dir + "/" + fd.Name())
		if err != nil {
			continue
		}
		kind, _, ok := strings.Cut(l, ":")
		if !ok || strings.HasPrefix(l, "/") {
			kind = "file"
		}
		out[kind]++
	}
	return out
}

func relRSS(t testing.TB, b *harness.Berth) int64 {
	t.Helper()
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", b.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(v)
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// relParallel runs fn for each item with at most n at a time.
func relParallel[T any](n int, items []T, fn func(T) error) error {
	sem := make(chan struct{}, n)
	errs := make(chan error, len(items))
	var wg sync.WaitGroup
	for _, it := range items {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(it); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// relDockerRefused is dockerd refusing a start because another running
// container publishes the port: the failure the clash-publish kind is for.
func relDockerRefused(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "port is already allocated") || strings.Contains(err.Error(), "address already in use"))
}

// relDocker drives the private dockerd through its API rather than the
// CLI: a CLI process per operation costs more CPU than the operation's
// own work on a loaded host.
type relDocker struct{ c *client.Client }

func relNewDocker(t testing.TB, w *harness.World) *relDocker {
	t.Helper()
	c, err := client.NewClientWithOpts(client.WithHost(w.Host), client.WithAPIVersionNegotiation())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &relDocker{c}
}

func relCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Minute)
}

// run creates and starts the container of s, as docker run -d does; a
// container whose start fails stays created.
func (d *relDocker) run(s relSpec) error {
	ctx, cancel := relCtx()
	defer cancel()
	cfg := &container.Config{Image: harness.ImageEcho, Env: []string{"NAME=" + s.Name},
		Cmd: []string{"-tcp", "80", "-udp", "53"}, Labels: map[string]string{}, ExposedPorts: nat.PortSet{}}
	hc := &container.HostConfig{PortBindings: nat.PortMap{}}
	publish := func(port nat.Port, host uint16) {
		cfg.ExposedPorts[port] = struct{}{}
		hc.PortBindings[port] = []nat.PortBinding{{HostPort: strconv.Itoa(int(host))}}
	}
	switch s.Kind {
	case relPubTCP:
		publish("80/tcp", s.Port)
	case relPubUDP:
		publish("53/udp", s.Port)
	case relLabelRelay:
		cfg.Labels["berth.ports"] = fmt.Sprintf("%d:80,%d:53/udp", s.Port, s.Port+1)
		cfg.Labels["berth.mode"] = "relay"
	case relLabelNAT:
		cfg.Labels["berth.ports"] = fmt.Sprintf("%d:80", s.Port)
		cfg.Labels["berth.mode"] = "nat"
	case relLabelLocal:
		cfg.Labels["berth.ports"] = fmt.Sprintf("127.0.0.1:%d:53/udp", s.Port)
	case relBadLabel:
		cfg.Labels["berth.ports"] = fmt.Sprintf("%d:0", s.Port)
	case relClashLabel:
		cfg.Labels["berth.ports"] = fmt.Sprintf("%d:80", relClashPort)
		cfg.Labels["berth.mode"] = "relay"
	case relClashPublish:
		publish("80/tcp", relClashPubPort)
	}
	if _, err := d.c.ContainerCreate(ctx, cfg, hc, nil, nil, s.Name); err != nil {
		return fmt.Errorf("create %s: %w", s.Name, err)
	}
	return d.start(s.Name)
}

func (d *relDocker) start(name string) error {
	ctx, cancel := relCtx()
	defer cancel()
	if err := d.c.ContainerStart(ctx, name, container.StartOptions{}); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	return nil
}

// stop is docker stop -t 0: the echo server, pid 1, ignores SIGTERM.
func (d *relDocker) stop(name string) error {
	ctx, cancel := relCtx()
	defer cancel()
	zero := 0
	if err := d.c.ContainerStop(ctx, name, container.StopOptions{Timeout: &zero}); err != nil {
		return fmt.Errorf("stop %s: %w", name, err)
	}
	return nil
}

func (d *relDocker) rm(name string) error {
	ctx, cancel := relCtx()
	defer cancel()
	if err := d.c.ContainerRemove(ctx, name, container.RemoveOptions{Force: true}); err != nil {
		return fmt.Errorf("rm %s: %w", name, err)
	}
	return nil
}

// running maps the names of running containers to their start times.
func (d *relDocker) running() (map[string]time.Time, error) {
	ctx, cancel := relCtx()
	defer cancel()
	list, err := d.c.ContainerList(ctx, container.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]time.Time{}
	for _, c := range list {
		if len(c.Names) == 0 {
			continue
		}
		ci, err := d.c.ContainerInspect(ctx, c.ID)
		if err != nil {
			return nil, err
		}
		if ci.State == nil || !ci.State.Running {
			continue
		}
		at, _ := time.Parse(time.RFC3339Nano, ci.State.StartedAt)
		out[strings.TrimPrefix(c.Names[0], "/")] = at
	}
	return out, nil
}

// 1. Crash and adopt: 21 containers (published tcp and udp, label relay,
// label nat, a bad label, two claiming one port); berth is killed with
// SIGKILL in the middle of a churn burst; the next berth's first sync
// leaves berth status, the DNAT rules and the relay's sockets exactly
// equal to what docker ps says runs.
func TestReliabilityCrashAdopt(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	d := relNewDocker(t, w)
	specs := &relSpecs{}
	var all []relSpec
	add := func(kind relKind, n int, base uint16, step uint16) {
		for i := 0; i < n; i++ {
			sp := relSpec{Name: fmt.Sprintf("ca-%s-%d", kind, i), Kind: kind, Port: base + uint16(i)*step}
			specs.put(sp)
			all = append(all, sp)
		}
	}
	add(relPubTCP, 6, 19100, 1)
	add(relPubUDP, 5, 19120, 1)
	add(relLabelRelay, 6, 19140, 2)
	add(relLabelNAT, 1, 19170, 1)
	add(relBadLabel, 1, 19180, 1)
	add(relClashLabel, 1, 0, 0)
	start := time.Now()
	if err := relParallel(4, all, d.run); err != nil {
		t.Fatal(err)
	}
	// The second claimant of the clash port starts last: it is the error.
	second := relSpec{Name: "ca-clash-label-1", Kind: relClashLabel}
	specs.put(second)
	if err := d.run(second); err != nil {
		t.Fatal(err)
	}
	all = append(all, second)
	t.Logf("%d containers started in %v", len(all), time.Since(start).Round(time.Millisecond))

	want, err := relExpected(d, specs)
	if err != nil {
		t.Fatal(err)
	}
	took := harness.Eventually(t, 20*time.Second, "first berth in step", func() error { return relCheck(b, want) })
	t.Logf("first berth: %d rows in step with docker, iptables and its sockets %v after the last start", len(want), took.Round(time.Millisecond))

	// The churn burst: stop and start a published tcp, a published udp,
	// two label relays and the clash winner (whose restart makes the other
	// claimant the winner), round robin, until told to stop.
	churners := []string{"ca-pub-tcp-0", "ca-pub-udp-0", "ca-label-relay-0", "ca-label-relay-1", "ca-clash-label-0"}
	stop := make(chan struct{})
	var ops atomic.Int64
	churnErr := make(chan error, 1)
	go func() {
		running := map[string]bool{}
		for _, n := range churners {
			running[n] = true
		}
		for i := 0; i < 200; i++ {
			select {
			case <-stop:
				churnErr <- nil
				return
			default:
			}
			n := churners[i%len(churners)]
			var err error
			if running[n] {
				err = d.stop(n)
			} else {
				err = d.start(n)
			}
			if err != nil {
				churnErr <- err
				return
			}
			running[n] = !running[n]
			ops.Add(1)
		}
		churnErr <- nil
	}()
	// waitOps waits (at most 10s) until n churn operations are done.
	waitOps := func(n int64) {
		for deadline := time.Now().Add(10 * time.Second); ops.Load() < n && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitOps(3)
	opsAtKill := ops.Load()
	b.Kill9()
	killed := time.Now()
	waitOps(opsAtKill + 3) // churn goes on with no berth
	close(stop)
	if err := <-churnErr; err != nil {
		t.Fatal(err)
	}
	t.Logf("churn: %d docker start/stop before kill -9 (the first berth followed them), %d in all", opsAtKill, ops.Load())
	want, err = relExpected(d, specs)
	if err != nil {
		t.Fatal(err)
	}

	restart := time.Now()
	b2 := w.StartBerth()
	healthy := time.Since(restart)
	err = relCheck(b2, want)
	sum, _ := b2.Summary()
	t.Logf("new berth healthy (first sync done) %v after its start, %v after kill -9; %d syncs so far, %d flush recoveries",
		healthy.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond), sum.Syncs, sum.FlushRecoveries)
	if err != nil {
		t.Errorf("after the first sync of the restarted berth the host is not in step:\n%v", err)
		later := harness.Eventually(t, 15*time.Second, "restarted berth in step", func() error { return relCheck(b2, want) })
		t.Logf("in step %v later", later.Round(time.Millisecond))
	} else {
		t.Logf("restarted berth: %d rows, DNAT rules and relay sockets exact at its first sync", len(want))
	}
	rows, _ := b2.Status()
	errRows := 0
	for _, r := range rows {
		if r.State == reconcile.StateError {
			errRows++
			if !strings.Contains(r.Error, "container "+r.ContainerName) {
				t.Errorf("error row does not name its container: %+v", r)
			}
		}
	}
	t.Logf("%d rows, %d of them the expected errors (bad label, nat on [::] without IPv6, clash loser)", len(rows), errRows)
	if !b2.Running() {
		t.Fatal("restarted berth exited")
	}
}

// 2. Churn: 200 cycles of run / stop / start / rm of containers with
// random (seeded) ports, labels and modes, some failing on purpose (a bad
// label, two containers claiming a label port, dockerd refusing a second
// container on one published port), from 4 workers. At the end the state
// is exact; berth's goroutines, fds and RSS, measured with every container
// stopped after a warm-up of 20 cycles and again at the end, grow by less
// than a stated bound.
func TestReliabilityChurn(t *testing.T) {
	seed := time.Now().UnixNano()
	if s := os.Getenv("BERTH_CHURN_SEED"); s != "" {
		seed, _ = strconv.ParseInt(s, 10, 64)
	}
	t.Logf("seed %d (BERTH_CHURN_SEED=%d repeats this run)", seed, seed)
	const (
		workers    = 4
		slotsEach  = 5
		cycles     = 200
		warmup     = 20
		maxGorout  = 50
		maxFDs     = 50
		maxRSSGrow = 20 << 20
	)
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	d := relNewDocker(t, w)
	specs := &relSpecs{}

	type slot struct {
		idx   int
		gen   int
		name  string
		state int // 0 absent, 1 running, 2 stopped
	}
	const (
		absent = iota
		running
		stopped
	)
	weights := []relKind{relPubTCP, relPubTCP, relPubUDP, relPubUDP, relLabelRelay, relLabelRelay,
		relLabelNAT, relLabelLocal, relBadLabel, relClashLabel, relClashPublish}
	var kindRuns [relKinds]atomic.Int64
	var refused, opsDone atomic.Int64
	slots := make([][]*slot, workers)
	rngs := make([]*rand.Rand, workers)
	for wi := range slots {
		rngs[wi] = rand.New(rand.NewSource(seed + int64(wi)))
		for j := 0; j < slotsEach; j++ {
			slots[wi] = append(slots[wi], &slot{idx: wi*slotsEach + j})
		}
	}
	cycle := func(wi int) error {
		rng := rngs[wi]
		s := slots[wi][rng.Intn(slotsEach)]
		r := rng.Float64()
		var err error
		switch s.state {
		case absent:
			s.gen++
			// Each slot has its own 20 ports, so only the clash kinds clash.
			sp := relSpec{Name: fmt.Sprintf("ch%02d-%d", s.idx, s.gen), Kind: weights[rng.Intn(len(weights))],
				Port: uint16(20000 + s.idx*20 + 2*rng.Intn(10))}
			specs.put(sp)
			s.name = sp.Name
			kindRuns[sp.Kind].Add(1)
			err = d.run(sp)
			s.state = running
			if err != nil && sp.Kind == relClashPublish && relDockerRefused(err) {
				refused.Add(1)
				s.state, err = stopped, nil
			}
		case running:
			if r < 0.6 {
				err = d.stop(s.name)
				s.state = stopped
			} else {
				err = d.rm(s.name)
				s.state = absent
			}
		case stopped:
			if r < 0.6 {
				err = d.start(s.name)
				s.state = running
				sp, _ := specs.get(s.name)
				if err != nil && sp.Kind == relClashPublish && relDockerRefused(err) {
					refused.Add(1)
					s.state, err = stopped, nil
				}
			} else {
				err = d.rm(s.name)
				s.state = absent
			}
		}
		opsDone.Add(1)
		return err
	}
	// The churn stops early (and says so) on a host too slow to finish
	// it in churnCap, so the test stays bounded in time.
	const churnCap = 150 * time.Second
	var capped atomic.Bool
	start := time.Now()
	phase := func(n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for wi := 0; wi < workers; wi++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < n/workers; i++ {
					if time.Since(start) > churnCap {
						capped.Store(true)
						return
					}
					if err := cycle(wi); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	// quiesce stops every running container and waits for berth to show
	// no rows, so two measurements compare like with like.
	quiesce := func() {
		t.Helper()
		run, err := d.running()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for n := range run {
			names = append(names, n)
		}
		if err := relParallel(workers, names, d.stop); err != nil {
			t.Fatal(err)
		}
		for _, ss := range slots {
			for _, s := range ss {
				if s.state == running {
					s.state = stopped
				}
			}
		}
		harness.Eventually(t, 15*time.Second, "all rows gone", func() error { return relCheck(b, nil) })
		time.Sleep(time.Second) // goroutines of closed listeners finish
	}

	phase(warmup)
	quiesce()
	base := relResources(t, b)
	t.Logf("after %d warm-up cycles (%v), all stopped: %v", warmup, time.Since(start).Round(time.Millisecond), base)

	phase(cycles - warmup)
	took := time.Since(start)
	want, err := relExpected(d, specs)
	if err != nil {
		t.Fatal(err)
	}
	conv := harness.Eventually(t, 15*time.Second, "state exact after churn", func() error { return relCheck(b, want) })
	busy := relResources(t, b)
	t.Logf("%d cycles from %d workers in %v (%.1f/s); state exact (%d rows: status = docker ps, DNAT rules = nat rows, sockets = relay rows) %v after the last cycle; %v with them running",
		opsDone.Load(), workers, took.Round(time.Millisecond), float64(opsDone.Load())/took.Seconds(), len(want), conv.Round(time.Millisecond), busy)
	var mix []string
	for k := relKind(0); k < relKinds; k++ {
		mix = append(mix, fmt.Sprintf("%s %d", k, kindRuns[k].Load()))
	}
	if capped.Load() {
		t.Logf("TIME CAP: the churn stopped after %d of %d cycles (%v): this host is too slow for the full run", opsDone.Load(), cycles, churnCap)
	}
	t.Logf("containers run by kind: %s; dockerd refused %d starts on the clash port", strings.Join(mix, ", "), refused.Load())

	quiesce()
	end := relResources(t, b)
	sum, _ := b.Summary()
	t.Logf("end, all stopped: %v; growth since warm-up: %+d goroutines (bound %d), %+d fds (bound %d), %+.1f MiB RSS (bound %d MiB); %d syncs, %d failed",
		end, end.Goroutines-base.Goroutines, maxGorout, end.FDs-base.FDs, maxFDs, float64(end.RSS-base.RSS)/(1<<20), maxRSSGrow>>20, sum.Syncs, sum.FailedSyncs)
	if d := end.Goroutines - base.Goroutines; d > maxGorout {
		t.Errorf("goroutines grew by %d over the churn (bound %d)", d, maxGorout)
	}
	if d := end.FDs - base.FDs; d > maxFDs {
		t.Errorf("open fds grew by %d over the churn (bound %d)", d, maxFDs)
	}
	if d := end.RSS - base.RSS; d > maxRSSGrow {
		t.Errorf("RSS grew by %.1f MiB over the churn (bound %d MiB)", float64(d)/(1<<20), maxRSSGrow>>20)
	}
	if !b.Running() {
		t.Fatal("berth exited")
	}
}

// relStat is the stats of the installed relay row for host:port/proto.
func relStat(b *harness.Berth, proto string, port uint16) (forward.Stats, error) {
	rows, err := b.Status()
	if err != nil {
		return forward.Stats{}, err
	}
	for _, r := range rows {
		if r.Proto == proto && r.HostPort == port && r.Mode == "relay" && r.State == reconcile.StateInstalled && r.Stats != nil {
			return *r.Stats, nil
		}
	}
	return forward.Stats{}, fmt.Errorf("no installed relay row with stats for %s %d: %+v", proto, port, rows)
}

// relUDPRcvbufErrors is the namespace's count of datagrams the kernel
// dropped because a socket's receive buffer was full.
func relUDPRcvbufErrors(t testing.TB) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	var head []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		for i, h := range head {
			if h == "RcvbufErrors" && i < len(f) {
				n, _ := strconv.ParseUint(f[i], 10, 64)
				return n
			}
		}
	}
	t.Fatal("no Udp RcvbufErrors in /proc/net/snmp")
	return 0
}

// 3. Resource limits: a relay mapping of a berth with small bounds takes
// 10,000 short UDP flows and 2,000 concurrent TCP connections. The flow
// table (seen as berth's open sockets) and the open connections stay
// within the bounds, drops count exactly what was refused, RSS stays
// bounded, and another container's mappings answer throughout.
func TestReliabilityResourceLimits(t *testing.T) {
	const (
		maxFlows  = 1000
		maxConns  = 500
		idle      = 5 * time.Second
		udpFlows  = 10000
		udpBatch  = 200
		tcpConns  = 2000
		tcpBatch  = 250
		rssBound  = 64 << 20
		floodTCP  = 19500
		floodUDP  = 19501
		otherTCP  = 19510
		otherUDP  = 19511
		probeEach = 100 * time.Millisecond
	)
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth("--udp-max-flows", strconv.Itoa(maxFlows), "--tcp-max-conns", strconv.Itoa(maxConns), "--udp-idle-timeout", idle.String())
	runEcho := func(name string, tcp, udp int) {
		w.RunEcho(name, "--label", fmt.Sprintf("berth.ports=127.0.0.1:%d:80,127.0.0.1:%d:53/udp", tcp, udp), "--label", "berth.mode=relay", "--", "-tcp", "80", "-udp", "53")
	}
	runEcho("flood", floodTCP, floodUDP)
	runEcho("other", otherTCP, otherUDP)
	harness.Eventually(t, 15*time.Second, "both relays installed and answering", func() error {
		for _, c := range []struct {
			name string
			tcp  bool
			port int
		}{{"flood", true, floodTCP}, {"flood", false, floodUDP}, {"other", true, otherTCP}, {"other", false, otherUDP}} {
			addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port))
			var got string
			var err error
			if c.tcp {
				got, err = harness.WhoTCP(addr, time.Second)
			} else {
				got, err = harness.WhoUDP(addr, time.Second)
			}
			if err != nil || harness.Name(got) != c.name {
				return fmt.Errorf("%s: %q %v", addr, got, err)
			}
		}
		return nil
	})
	// Let the probe flows above end, so the flood starts from an empty table.
	time.Sleep(idle + time.Second)
	base := relResources(t, b)
	baseKinds := relFDKinds(t, b)
	t.Logf("before the flood: %v (fds %v)", base, baseKinds)

	// The other container is asked over TCP and UDP every 100ms
	// throughout; each probe must answer within 2s.
	type probeLog struct {
		n, failed int
		worst     time.Duration
		firstErr  error
	}
	var (
		plMu sync.Mutex
		pl   probeLog
	)
	probeStop := make(chan struct{})
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		tcpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(otherTCP))
		udpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(otherUDP))
		// UDP probes reuse one client socket (one flow in the other
		// mapping's table); every fifth one is a new client, so new flows
		// are tried as well, and few flows pile up on berth's fds.
		var udpConn net.Conn
		defer func() {
			if udpConn != nil {
				udpConn.Close()
			}
		}()
		for i := 0; ; i++ {
			select {
			case <-probeStop:
				return
			case <-time.After(probeEach):
			}
			t0 := time.Now()
			var got string
			var err error
			if i%2 == 0 {
				got, err = harness.WhoTCP(tcpAddr, 2*time.Second)
			} else {
				if udpConn == nil || i%10 == 1 {
					if udpConn != nil {
						udpConn.Close()
					}
					udpConn, err = net.Dial("udp", udpAddr)
				}
				if err == nil {
					got, err = harness.WhoOn(udpConn, 2*time.Second)
				}
			}
			d := time.Since(t0)
			if err == nil && harness.Name(got) != "other" {
				err = fmt.Errorf("answer %q", got)
			}
			plMu.Lock()
			pl.n++
			pl.worst = max(pl.worst, d)
			if err != nil {
				pl.failed++
				if pl.firstErr == nil {
					pl.firstErr = err
				}
			}
			plMu.Unlock()
		}
	}()
	defer func() {
		select {
		case <-probeStop:
		default:
			close(probeStop)
		}
		<-probeDone
	}()

	peakRSS := base.RSS
	sampleRSS := func() { peakRSS = max(peakRSS, relRSS(t, b)) }

	t.Run("udp: 10,000 flows, 1,000 allowed", func(t *testing.T) {
		dst := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: floodUDP}
		rcvbuf0 := relUDPRcvbufErrors(t)
		before, err := relStat(b, "udp", floodUDP)
		if err != nil {
			t.Fatal(err)
		}
		peakFDs := base.FDs
		answered, sent := 0, 0
		start := time.Now()
		for sent < udpFlows {
			n := min(udpBatch, udpFlows-sent)
			conns := make([]*net.UDPConn, 0, n)
			for i := 0; i < n; i++ {
				// A source address of its own per client (all of
				// 127.0.0.0/8 is loopback): ephemeral ports are reused
				// within a flow's lifetime, addresses are not.
				k := sent + i
				src := &net.UDPAddr{IP: net.IPv4(127, 1+byte(k>>16), byte(k>>8), byte(k))}
				c, err := net.DialUDP("udp", src, dst)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c)
				if _, err := c.Write([]byte("who?")); err != nil {
					t.Fatal(err)
				}
			}
			sent += n
			if sent == n {
				// The first batch fits the table: every client gets an answer.
				deadline := time.Now().Add(3 * time.Second)
				buf := make([]byte, 256)
				for _, c := range conns {
					c.SetReadDeadline(deadline)
					if k, err := c.Read(buf); err == nil && harness.Name(string(buf[:k])) == "flood" {
						answered++
					}
				}
			}
			for _, c := range conns {
				c.Close()
			}
			// Pace: wait until berth has seen (or the kernel has dropped)
			// every datagram sent so far.
			wait := time.Now().Add(3 * time.Second)
			for {
				s, err := relStat(b, "udp", floodUDP)
				if err != nil {
					t.Fatal(err)
				}
				seen := (s.Flows - before.Flows) + (s.Drops - before.Drops) + (s.Errors - before.Errors) + (relUDPRcvbufErrors(t) - rcvbuf0)
				if seen >= uint64(sent) || time.Now().After(wait) {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			peakFDs = max(peakFDs, relFDs(t, b))
			sampleRSS()
		}
		elapsed := time.Since(start)
		s, err := relStat(b, "udp", floodUDP)
		if err != nil {
			t.Fatal(err)
		}
		flows, drops, errs := s.Flows-before.Flows, s.Drops-before.Drops, s.Errors-before.Errors
		kdrops := relUDPRcvbufErrors(t) - rcvbuf0
		t.Logf("%d clients, one datagram each, in %v: %d flows created, %d drops, %d errors, %d dropped by the kernel (receive buffer full); first batch: %d of %d answered; berth fds peak %d (%+d), RSS %.1f MiB",
			sent, elapsed.Round(time.Millisecond), flows, drops, errs, kdrops, answered, udpBatch, peakFDs, peakFDs-base.FDs, float64(relRSS(t, b))/(1<<20))
		if answered != udpBatch {
			t.Errorf("first %d clients (table empty): %d answered", udpBatch, answered)
		}
		// Each flow holds one upstream socket: the fd peak is the table's.
		if d := peakFDs - base.FDs; d > maxFlows+16 {
			t.Errorf("berth held %d more fds during the flood than before: the flow table went past its bound %d", d, maxFlows)
		}
		// Flows end after the idle timeout, so a flood longer than it may
		// create more than the bound over its length, never more at once.
		if allowed := uint64(maxFlows) * (1 + uint64(elapsed/idle)); flows > allowed {
			t.Errorf("%d flows created in %v with a table of %d and idle timeout %v (at most %d possible)", flows, elapsed, maxFlows, idle, allowed)
		}
		if elapsed < idle && flows != maxFlows {
			t.Errorf("flood within one idle timeout created %d flows, want exactly the bound %d", flows, maxFlows)
		}
		// Every datagram is accounted for: a flow, a drop, or the kernel's.
		if got := flows + drops + kdrops; got+errs < uint64(sent) || flows+drops > uint64(sent) {
			t.Errorf("flows %d + drops %d + kernel drops %d = %d (errors %d), want the %d datagrams sent", flows, drops, kdrops, got, errs, sent)
		}
		if drops < uint64(sent)-flows-kdrops-errs {
			t.Errorf("drops %d: want at least %d refused", drops, uint64(sent)-flows-kdrops-errs)
		}

		// After the idle timeout the table is empty again and serves.
		// Sockets only: the TCP probes of the other mapping may leave a
		// splice pipe or two in the relay's idle pool.
		baseSockets := baseKinds["socket"]
		gone := harness.Eventually(t, idle+10*time.Second, "flows ended", func() error {
			if n := relFDKinds(t, b)["socket"]; n > baseSockets+16 {
				return fmt.Errorf("berth holds %d sockets, %d before the flood", n, baseSockets)
			}
			return nil
		})
		got, err := harness.WhoUDP(dst.String(), 2*time.Second)
		if err != nil || harness.Name(got) != "flood" {
			t.Errorf("new client after the flood: %q %v", got, err)
		}
		t.Logf("flow table drained %v after the flood (idle timeout %v); a new client is served", gone.Round(time.Millisecond), idle)
	})

	t.Run("tcp: 2,000 held connections, 500 allowed", func(t *testing.T) {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(floodTCP))
		before, err := relStat(b, "tcp", floodTCP)
		if err != nil {
			t.Fatal(err)
		}
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		peakActive, peakFDs := int64(0), base.FDs
		start := time.Now()
		dialed, resetAtDial := 0, 0
		for dialed < tcpConns {
			for i := 0; i < tcpBatch && dialed < tcpConns; i++ {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				dialed++
				if errors.Is(err, syscall.ECONNRESET) {
					// berth accepted and reset it before connect(2)
					// returned: refused like the others, only sooner.
					resetAtDial++
					continue
				}
				if err != nil {
					t.Fatalf("dial %d: %v", dialed, err)
				}
				conns = append(conns, c)
			}
			// Wait until berth has accepted (and kept or refused) all.
			wait := time.Now().Add(5 * time.Second)
			for {
				s, err := relStat(b, "tcp", floodTCP)
				if err != nil {
					t.Fatal(err)
				}
				peakActive = max(peakActive, s.ActiveTCP)
				if (s.Conns-before.Conns)+(s.Drops-before.Drops) >= uint64(dialed) || time.Now().After(wait) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			peakFDs = max(peakFDs, relFDs(t, b))
			sampleRSS()
		}
		s, err := relStat(b, "tcp", floodTCP)
		if err != nil {
			t.Fatal(err)
		}
		accepted, drops := s.Conns-before.Conns, s.Drops-before.Drops
		t.Logf("%d connections dialed and held open in %v (%d reset before connect returned): %d accepted, %d refused (drops), %d active (peak %d), %d errors; berth fds peak %d (%+d), RSS %.1f MiB",
			dialed, time.Since(start).Round(time.Millisecond), resetAtDial, accepted, drops, s.ActiveTCP, peakActive, s.Errors-before.Errors, peakFDs, peakFDs-base.FDs, float64(relRSS(t, b))/(1<<20))
		if peakActive > maxConns || s.ActiveTCP > maxConns {
			t.Errorf("active connections reached %d, bound %d", max(peakActive, s.ActiveTCP), maxConns)
		}
		if accepted != maxConns || drops != tcpConns-maxConns || s.ActiveTCP != maxConns {
			t.Errorf("with %d held connections and a bound of %d: accepted %d, drops %d, active %d; want %d, %d, %d",
				tcpConns, maxConns, accepted, drops, s.ActiveTCP, maxConns, tcpConns-maxConns, maxConns)
		}
		// Six fds per relayed connection: the client and container
		// sockets, and a pipe (two fds) per direction that splice(2)
		// holds while it waits.
		if d := peakFDs - base.FDs; d > 6*maxConns+16 {
			t.Errorf("berth held %d more fds than before with %d connections allowed", d, maxConns)
		}

		// The kept connections are relayed, the refused ones were reset.
		var served, reset atomic.Int64
		idx := make([]int, len(conns))
		for i := range idx {
			idx[i] = i
		}
		relParallel(16, idx, func(i int) error {
			c := conns[i]
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("who?\n")); err != nil {
				reset.Add(1)
				return nil
			}
			got, err := io.ReadAll(c)
			if err == nil && harness.Name(strings.TrimSpace(string(got))) == "flood" {
				served.Add(1)
			} else {
				reset.Add(1)
			}
			return nil
		})
		t.Logf("asked every held connection: %d served by the container, %d reset by berth", served.Load(), reset.Load())
		if served.Load() != maxConns {
			t.Errorf("%d held connections were served, want %d", served.Load(), maxConns)
		}
		for _, c := range conns {
			c.Close()
		}
		conns = nil
		harness.Eventually(t, 10*time.Second, "connections closed", func() error {
			s, err := relStat(b, "tcp", floodTCP)
			if err != nil || s.ActiveTCP != 0 {
				return fmt.Errorf("active %d %v", s.ActiveTCP, err)
			}
			return nil
		})
		if got, err := harness.WhoTCP(addr, 2*time.Second); err != nil || harness.Name(got) != "flood" {
			t.Errorf("new connection after the flood: %q %v", got, err)
		}
		// Closed connections give their sockets back at once, and their
		// splice pipes to the relay's pool, which keeps at most 64 idle
		// (128 fds) and closes the rest.
		kinds := relFDKinds(t, b)
		t.Logf("berth's fds after all connections closed: %v (before the flood: %v)", kinds, baseKinds)
		if kinds["socket"] > baseKinds["socket"]+16 {
			t.Errorf("berth still holds %d sockets after every connection closed (%d before the flood)", kinds["socket"], baseKinds["socket"])
		}
		if kinds["pipe"] > baseKinds["pipe"]+2*64 {
			t.Errorf("berth holds %d pipe fds after every connection closed (%d before the flood): more than the idle pool of 64 pipes", kinds["pipe"], baseKinds["pipe"])
		}
		if n := relFDs(t, b); n > peakFDs {
			t.Errorf("berth holds %d fds after the flood, more than its peak %d during it", n, peakFDs)
		}
	})

	close(probeStop)
	<-probeDone
	after := relResources(t, b)
	t.Logf("other mapping: %d probes (tcp and udp alternately) during both floods, %d failed, slowest %v", pl.n, pl.failed, pl.worst.Round(time.Millisecond))
	if pl.failed > 0 {
		t.Errorf("the other container's mappings failed %d of %d probes during the flood; first: %v", pl.failed, pl.n, pl.firstErr)
	}
	t.Logf("berth RSS: %.1f MiB before, peak %.1f MiB during, %.1f MiB after (bound: +%d MiB); after: %v",
		float64(base.RSS)/(1<<20), float64(peakRSS)/(1<<20), float64(after.RSS)/(1<<20), rssBound>>20, after)
	if peakRSS-base.RSS > rssBound {
		t.Errorf("RSS grew by %.1f MiB during the floods (bound %d MiB)", float64(peakRSS-base.RSS)/(1<<20), rssBound>>20)
	}
	if !b.Running() {
		t.Fatal("berth exited")
	}
}
