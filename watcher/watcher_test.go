package watcher

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/errdefs"
	"github.com/docker/go-connections/nat"
)

// fakeDocker serves containers from a map and events from a channel the
// test feeds; breaking it ends the current stream with an error.
type fakeDocker struct {
	mu          sync.Mutex
	ctrs        map[string]container.InspectResponse
	streams     int
	lists       int
	msgs        chan events.Message
	errs        chan error
	down        bool
	inspectGate chan struct{} // when set, inspects wait on it
}

func newFakeDocker() *fakeDocker {
	return &fakeDocker{ctrs: map[string]container.InspectResponse{}}
}

func (f *fakeDocker) put(id string, hostPort string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := fakeCtr{nets: map[string][2]string{"bridge": {"172.17.0.2", ""}},
		asked: nat.PortMap{"80/tcp": {pb("", hostPort)}}, did: nat.PortMap{"80/tcp": {pb("0.0.0.0", hostPort)}}}.inspect()
	c.ID = id
	c.Name = "/" + id
	f.ctrs[id] = c
}

func (f *fakeDocker) del(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ctrs, id)
}

func (f *fakeDocker) ContainerList(context.Context, container.ListOptions) ([]container.Summary, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return nil, errors.New("connection refused")
	}
	f.lists++
	var out []container.Summary
	for id := range f.ctrs {
		out = append(out, container.Summary{ID: id})
	}
	return out, nil
}

func (f *fakeDocker) ContainerInspect(ctx context.Context, id string) (container.InspectResponse, error) {
	f.mu.Lock()
	gate := f.inspectGate
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return container.InspectResponse{}, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.ctrs[id]
	if !ok {
		return c, errdefs.NotFound(errors.New("no such container"))
	}
	return c, nil
}

func (f *fakeDocker) NetworkList(context.Context, network.ListOptions) ([]network.Summary, error) {
	return []network.Summary{{Name: "bridge", ID: "abc", IPAM: network.IPAM{Config: []network.IPAMConfig{{Subnet: "172.17.0.0/16"}}}}}, nil
}

func (f *fakeDocker) Events(ctx context.Context, _ events.ListOptions) (<-chan events.Message, <-chan error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.streams++
	errs := make(chan error, 1)
	if f.down {
		errs <- errors.New("connection refused")
		return make(chan events.Message), errs
	}
	f.msgs, f.errs = make(chan events.Message), errs
	return f.msgs, errs
}

func (f *fakeDocker) event(action events.Action, id string) {
	f.mu.Lock()
	ch := f.msgs
	f.mu.Unlock()
	ch <- events.Message{Type: events.ContainerEventType, Action: action, Actor: events.Actor{ID: id}}
}

func (f *fakeDocker) breakStream(down bool) {
	f.mu.Lock()
	f.down = down
	errs := f.errs
	f.mu.Unlock()
	if errs != nil {
		errs <- errors.New("unexpected EOF")
	}
}

func (f *fakeDocker) setDown(down bool) {
	f.mu.Lock()
	f.down = down
	f.mu.Unlock()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func ids(w *Watcher) []string {
	cs, _ := w.Snapshot()
	var out []string
	for _, c := range cs {
		out = append(out, c.ID)
	}
	return out
}

func startWatcher(t *testing.T, d *fakeDocker) (*Watcher, *[]Notice, *sync.Mutex) {
	var mu sync.Mutex
	var notes []Notice
	w := New(d, Options{DefaultMode: forward.ModeAuto, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond,
		OnNotice: func(n Notice) { mu.Lock(); notes = append(notes, n); mu.Unlock() }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return w, &notes, &mu
}

func TestWatcherFollowsEventsAndRelistsAfterLoss(t *testing.T) {
	d := newFakeDocker()
	d.put("aaa", "8080")
	w, notes, mu := startWatcher(t, d)
	waitFor(t, "first list", func() bool { return w.Synced() && len(ids(w)) == 1 })

	d.put("bbb", "8081")
	d.event(events.ActionStart, "bbb")
	waitFor(t, "start event inspected", func() bool { return len(ids(w)) == 2 })

	d.del("aaa")
	d.event(events.ActionDestroy, "aaa")
	waitFor(t, "destroy event removes", func() bool { return len(ids(w)) == 1 && ids(w)[0] == "bbb" })

	// The stream dies and dockerd is down for a while; meanwhile bbb goes
	// away and ccc starts, with no event ever delivered for either.
	d.breakStream(true)
	waitFor(t, "loss noticed", func() bool { return !w.Connected() && !w.Synced() })
	d.del("bbb")
	d.put("ccc", "8082")
	d.setDown(false)
	waitFor(t, "relist after reconnect", func() bool { return w.Synced() && len(ids(w)) == 1 && ids(w)[0] == "ccc" })
	mu.Lock()
	defer mu.Unlock()
	var lost, connected int
	for _, n := range *notes {
		switch n.Kind {
		case "lost":
			lost++
		case "connected":
			connected++
		}
	}
	if lost == 0 || connected < 2 {
		t.Fatalf("notices: %+v", *notes)
	}
}

// The event reader must keep taking events while an inspect hangs:
// dockerd drops a subscriber that does not read within 100ms.
func TestWatcherReaderNeverWaitsOnInspect(t *testing.T) {
	d := newFakeDocker()
	w, _, _ := startWatcher(t, d)
	waitFor(t, "first list", w.Synced)
	gate := make(chan struct{})
	d.mu.Lock()
	d.inspectGate = gate
	d.mu.Unlock()
	for i := 0; i < 300; i++ {
		d.put("c"+string(rune('a'+i%26))+string(rune('a'+i/26)), "9000")
		sent := make(chan struct{})
		go func() { d.event(events.ActionStart, "c"+string(rune('a'+i%26))+string(rune('a'+i/26))); close(sent) }()
		select {
		case <-sent:
		case <-time.After(100 * time.Millisecond):
			t.Fatalf("event %d not taken within 100ms while inspects hang", i)
		}
	}
	close(gate)
	waitFor(t, "all inspected", func() bool { return len(ids(w)) == 300 })
}
