package reconcile

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/watcher"
)

// memForwarder records state only; it exists for these unit tests and is
// never selectable from the CLI.
type memForwarder struct {
	mu        sync.Mutex
	installed []forward.Mapping
	refuse    map[uint16]error // host port -> per-mapping failure
	down      error            // whole-backend failure
	applies   int
}

func (f *memForwarder) Apply(_ context.Context, add, remove []forward.Mapping) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down != nil {
		return f.down
	}
	if len(add)+len(remove) > 0 {
		f.applies++ // writes; an empty Apply writes nothing
	}
	for _, r := range remove {
		for i, m := range f.installed {
			if m == r {
				f.installed = append(f.installed[:i], f.installed[i+1:]...)
				break
			}
		}
	}
	var errs []error
	for _, a := range add {
		if e := f.refuse[a.HostPort]; e != nil {
			errs = append(errs, &forward.MappingError{Mapping: a, Op: "add", Err: e})
			continue
		}
		f.installed = append(f.installed, a)
	}
	return errors.Join(errs...)
}

func (f *memForwarder) List(context.Context) ([]forward.Mapping, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down != nil {
		return nil, f.down
	}
	return append([]forward.Mapping(nil), f.installed...), nil
}

type staticSource struct{ cs []watcher.Container }

func (s *staticSource) Snapshot() ([]watcher.Container, []watcher.Bridge) { return s.cs, nil }
func (s *staticSource) Connected() bool                                   { return true }
func (s *staticSource) Synced() bool                                      { return true }

func states(rows []Row) string {
	var b strings.Builder
	for _, r := range rows {
		fmt.Fprintf(&b, "%s %s:%d %s %s|", r.Proto, r.HostIP, r.HostPort, r.Mode, r.State)
	}
	return b.String()
}

func TestReconcilerSync(t *testing.T) {
	auto := forward.ModeAuto
	web := ctr("aaa", "web", 1, "172.17.0.2", "",
		want(key("tcp", "0.0.0.0", 80), 80, auto), want(key("tcp", "::", 80), 80, auto))
	src := &staticSource{cs: []watcher.Container{web}}
	nat, relay := &memForwarder{}, &memForwarder{}
	r := New(src, Options{NAT: nat, Relay: relay})
	ctx := context.Background()

	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	rows, sum := r.Status()
	if got := states(rows); got != "tcp 0.0.0.0:80 nat installed|tcp :::80 relay installed|" {
		t.Fatalf("rows: %s", got)
	}
	if len(nat.installed) != 1 || len(relay.installed) != 1 || sum.Installed != 2 || sum.Syncs != 1 {
		t.Fatalf("nat %v relay %v sum %+v", nat.installed, relay.installed, sum)
	}

	// In step: nothing written.
	if err := r.Sync(ctx); err != nil || nat.applies != 1 || relay.applies != 1 {
		t.Fatalf("no-op sync applied: nat %d relay %d err %v", nat.applies, relay.applies, err)
	}

	// The container is replaced behind the same port: one remove + add.
	web2 := ctr("bbb", "web2", 2, "172.17.0.9", "", want(key("tcp", "0.0.0.0", 80), 80, auto))
	src.cs = []watcher.Container{web2}
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if len(nat.installed) != 1 || nat.installed[0].ContainerIP.String() != "172.17.0.9" || len(relay.installed) != 0 {
		t.Fatalf("after replace: nat %v relay %v", nat.installed, relay.installed)
	}

	// A per-mapping failure marks that mapping only, and the sync fails so
	// the runner retries.
	nat.refuse = map[uint16]error{81: errors.New("boom")}
	web2.Wants = append(web2.Wants, want(key("tcp", "0.0.0.0", 81), 81, auto))
	src.cs = []watcher.Container{web2}
	if err := r.Sync(ctx); err == nil {
		t.Fatal("sync with a refused mapping returned nil")
	}
	rows, _ = r.Status()
	if got := states(rows); got != "tcp 0.0.0.0:80 nat installed|tcp 0.0.0.0:81 nat error|" {
		t.Fatalf("rows: %s", got)
	}
	if !strings.Contains(rows[1].Error, "tcp 0.0.0.0:81 -> 172.17.0.9:81 (bbb): add: boom") {
		t.Fatalf("error text %q", rows[1].Error)
	}

	// A backend that is down leaves its mappings pending, not lost.
	nat.refuse, nat.down = nil, errors.New("iptables-restore: exit 4")
	if err := r.Sync(ctx); err == nil {
		t.Fatal("want error")
	}
	rows, sum = r.Status()
	if sum.Pending != 2 || !strings.Contains(rows[0].Error, "iptables-restore") {
		t.Fatalf("rows %+v sum %+v", rows, sum)
	}
}

func TestReconcilerDisabledRelay(t *testing.T) {
	web := ctr("aaa", "web", 1, "172.17.0.2", "", want(key("tcp", "::", 80), 80, forward.ModeAuto))
	r := New(&staticSource{cs: []watcher.Container{web}}, Options{NAT: &memForwarder{}})
	r.Sync(context.Background())
	rows, _ := r.Status()
	if len(rows) != 1 || rows[0].State != StateSkipped || !strings.Contains(rows[0].Error, "relay mode is disabled") {
		t.Fatalf("rows %+v", rows)
	}
}

func TestReconcilerHostConflict(t *testing.T) {
	lbl := want(key("tcp", "0.0.0.0", 22), 22, forward.ModeNAT)
	lbl.Source = watcher.SourceLabel
	// The -p port is held by dockerd itself: never checked.
	web := ctr("aaa", "web", 1, "172.17.0.2", "", lbl, want(key("tcp", "0.0.0.0", 8080), 80, forward.ModeNAT))
	nat := &memForwarder{}
	r := New(&staticSource{cs: []watcher.Container{web}}, Options{NAT: nat,
		HostConflicts: func(ms []forward.Mapping) map[forward.Mapping]error {
			out := map[forward.Mapping]error{}
			for _, m := range ms {
				if m.HostPort == 22 || m.HostPort == 8080 {
					out[m] = fmt.Errorf("%s is in use by pid 812 (sshd)", m.Key)
				}
			}
			return out
		}})
	r.Sync(context.Background())
	rows, _ := r.Status()
	if len(nat.installed) != 1 || nat.installed[0].HostPort != 8080 || rows[0].State != StateError || !strings.Contains(rows[0].Error, "pid 812 (sshd)") {
		t.Fatalf("installed %v rows %+v", nat.installed, rows)
	}
}

// cachingForwarder counts kernel reads and offers a cached view.
type cachingForwarder struct {
	memForwarder
	lists int
}

func (f *cachingForwarder) List(ctx context.Context) ([]forward.Mapping, error) {
	f.lists++
	return f.memForwarder.List(ctx)
}

func (f *cachingForwarder) Cached() ([]forward.Mapping, bool) {
	ms, _ := f.memForwarder.List(context.Background())
	return ms, true
}

func TestReconcilerUsesCacheBetweenFullLists(t *testing.T) {
	web := ctr("aaa", "web", 1, "172.17.0.2", "", want(key("tcp", "0.0.0.0", 80), 80, forward.ModeNAT))
	src := &staticSource{cs: []watcher.Container{web}}
	nat := &cachingForwarder{}
	r := New(src, Options{NAT: nat, FullListEvery: time.Hour})
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		if err := r.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if nat.lists != 1 {
		t.Fatalf("5 syncs read the kernel %d times, want 1 (the first, full one)", nat.lists)
	}
	// Someone flushed the table behind berth's back; the canary asks for a
	// full read, which finds the gap and repairs it.
	nat.installed = nil
	r.RequestFullList()
	if err := r.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if nat.lists != 2 || len(nat.installed) != 1 {
		t.Fatalf("after RequestFullList: lists %d installed %v", nat.lists, nat.installed)
	}
	// A failed sync makes the next one read the kernel again.
	nat.refuse = map[uint16]error{80: errors.New("boom")}
	nat.installed = nil
	r.Sync(ctx)
	nat.refuse = nil
	r.Sync(ctx)
	if nat.lists != 3 {
		t.Fatalf("lists %d after a failed sync, want 3 (the sync after the failure reads the kernel)", nat.lists)
	}
}

func TestReconcilerLeavesDockersOwnForwardsAlone(t *testing.T) {
	web := ctr("aaa", "web", 1, "172.17.0.2", "",
		want(key("tcp", "0.0.0.0", 80), 80, forward.ModeAuto), want(key("tcp", "::", 80), 80, forward.ModeAuto))
	nat, relay := &memForwarder{}, &memForwarder{}
	// berth installed the IPv4 side earlier; now dockerd forwards it.
	nat.installed = []forward.Mapping{{Key: key("tcp", "0.0.0.0", 80), ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80, ContainerID: "aaa", Mode: forward.ModeNAT}}
	r := New(&staticSource{cs: []watcher.Container{web}}, Options{NAT: nat, Relay: relay,
		DockerForwards: func(_ context.Context, ms []forward.Mapping) map[forward.Key]string {
			return map[forward.Key]string{key("tcp", "0.0.0.0", 80): "dockerd iptables DNAT (chain DOCKER)"}
		}})
	if err := r.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	rows, sum := r.Status()
	if got := states(rows); got != "tcp 0.0.0.0:80 nat docker|tcp :::80 relay installed|" {
		t.Fatalf("rows %s", got)
	}
	if rows[0].Reason != "dockerd iptables DNAT (chain DOCKER)" || sum.ByDocker != 1 {
		t.Fatalf("reason %q sum %+v", rows[0].Reason, sum)
	}
	if len(nat.installed) != 0 || len(relay.installed) != 1 {
		t.Fatalf("berth must not double-forward: nat %v relay %v", nat.installed, relay.installed)
	}
}
