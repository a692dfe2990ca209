// Package watcher follows the Docker daemon: it lists and inspects running
// containers, follows the event stream, and keeps a cache of what each
// container wants forwarded. It never logs; it reports through callbacks.
package watcher

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/errdefs"
)

// Docker is the narrow part of the Docker API the watcher uses; the real
// *client.Client satisfies it and unit tests use a fake.
type Docker interface {
	ContainerList(ctx context.Context, options container.ListOptions) ([]container.Summary, error)
	ContainerInspect(ctx context.Context, id string) (container.InspectResponse, error)
	Events(ctx context.Context, options events.ListOptions) (<-chan events.Message, <-chan error)
	NetworkList(ctx context.Context, options network.ListOptions) ([]network.Summary, error)
}

// Bridge is a Docker bridge network: its interface and subnets.
type Bridge struct {
	Network string
	Iface   string
	Subnets []netip.Prefix
}

// Notice is a change in the watcher's link to Docker, for logs and metrics.
type Notice struct {
	Kind string // "connected", "lost", "relisted", "inspect-failed"
	Err  error
	N    int // containers after a relist
}

// Options configure a Watcher.
type Options struct {
	DefaultMode    forward.Mode
	ResyncInterval time.Duration // full relist period; default 30s
	MinBackoff     time.Duration // first reconnect delay; default 100ms
	MaxBackoff     time.Duration // cap; default 1s, so berth is back within ~1s of dockerd
	// OnChange is called after the cache changed. It must not block.
	OnChange func()
	// OnNotice reports connection changes. It must not block.
	OnNotice func(Notice)
}

// Watcher keeps the cache. Snapshot, Synced and Connected are safe to call
// from any goroutine while Run runs.
type Watcher struct {
	d    Docker
	opts Options

	mu         sync.Mutex
	containers map[string]Container
	bridges    []Bridge
	synced     bool
	connected  bool
	pending    map[string]struct{}
	relist     bool
	wake       chan struct{}
}

// New returns a watcher; call Run to start it.
func New(d Docker, opts Options) *Watcher {
	if opts.DefaultMode == "" {
		opts.DefaultMode = forward.ModeAuto
	}
	if opts.ResyncInterval <= 0 {
		opts.ResyncInterval = 30 * time.Second
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = time.Second
	}
	if opts.OnChange == nil {
		opts.OnChange = func() {}
	}
	if opts.OnNotice == nil {
		opts.OnNotice = func(Notice) {}
	}
	return &Watcher{d: d, opts: opts, containers: map[string]Container{},
		pending: map[string]struct{}{}, wake: make(chan struct{}, 1)}
}

// Snapshot returns the running containers, oldest start first, and the
// bridge networks.
func (w *Watcher) Snapshot() ([]Container, []Bridge) {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Container, 0, len(w.containers))
	for _, c := range w.containers {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Started.Equal(out[j].Started) {
			return out[i].Started.Before(out[j].Started)
		}
		return out[i].ID < out[j].ID
	})
	return out, append([]Bridge(nil), w.bridges...)
}

// Synced reports whether a full list has completed since the last (re)connect.
func (w *Watcher) Synced() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.synced
}

// Connected reports whether the event stream is up.
func (w *Watcher) Connected() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.connected
}

// Run follows Docker until ctx ends. The event reader only queues container
// ids; one worker inspects them and relists, so a slow inspect never makes
// dockerd drop the subscription.
func (w *Watcher) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); w.work(ctx) }()
	defer wg.Wait()

	backoff := w.opts.MinBackoff
	for {
		// Note T before the relist; events since T are replayed, so nothing
		// between the list and the subscription is lost.
		since := time.Now().Add(-time.Second)
		err := w.stream(ctx, since, func() { backoff = w.opts.MinBackoff })
		if ctx.Err() != nil {
			return nil
		}
		w.setConnected(false)
		w.opts.OnNotice(Notice{Kind: "lost", Err: err})
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, w.opts.MaxBackoff)
	}
}

func (w *Watcher) stream(ctx context.Context, since time.Time, onUp func()) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	f := filters.NewArgs(
		filters.Arg("type", "container"), filters.Arg("type", "network"),
		filters.Arg("event", "start"), filters.Arg("event", "die"),
		filters.Arg("event", "destroy"), filters.Arg("event", "rename"),
		filters.Arg("event", "connect"), filters.Arg("event", "disconnect"),
		filters.Arg("event", "create"),
	)
	msgs, errs := w.d.Events(sctx, events.ListOptions{
		Since:   fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
		Filters: f,
	})
	// Events() returns before dockerd answers; a dead daemon shows up on
	// errs at once. If none came within a moment the stream is up: relist
	// then (in the worker, never here).
	up := time.NewTimer(50 * time.Millisecond)
	defer up.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return err
		case m, ok := <-msgs:
			if !ok {
				return errors.New("event stream closed")
			}
			w.handle(m)
		case <-up.C:
			onUp()
			w.setConnected(true)
			w.opts.OnNotice(Notice{Kind: "connected"})
			w.requestRelist()
		}
	}
}

func (w *Watcher) handle(m events.Message) {
	id := m.Actor.ID
	switch m.Type {
	case events.NetworkEventType:
		if m.Action == events.ActionCreate || m.Action == events.ActionDestroy {
			w.requestRelist()
			return
		}
		id = m.Actor.Attributes["container"]
	case events.ContainerEventType:
		if m.Action == events.ActionCreate {
			return // nothing runs yet; start follows
		}
	default:
		return
	}
	if id == "" {
		return
	}
	w.mu.Lock()
	w.pending[id] = struct{}{}
	w.mu.Unlock()
	w.poke()
}

func (w *Watcher) requestRelist() {
	w.mu.Lock()
	w.relist = true
	w.mu.Unlock()
	w.poke()
}

func (w *Watcher) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Watcher) setConnected(up bool) {
	w.mu.Lock()
	w.connected = up
	if !up {
		w.synced = false
	}
	w.mu.Unlock()
}

func (w *Watcher) work(ctx context.Context) {
	tick := time.NewTicker(w.opts.ResyncInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if w.Connected() {
				w.requestRelist()
			}
			continue
		case <-w.wake:
		}
		w.mu.Lock()
		relist, ids := w.relist, w.pending
		w.relist, w.pending = false, map[string]struct{}{}
		w.mu.Unlock()
		if relist {
			if err := w.relistAll(ctx); err != nil {
				w.opts.OnNotice(Notice{Kind: "relist-failed", Err: err})
				// The stream will fail too and reconnect; retry then.
				continue
			}
		} else if len(ids) > 0 {
			w.inspectSome(ctx, ids)
		} else {
			continue
		}
		w.opts.OnChange()
	}
}

const inspectWorkers = 8

// inspectMany inspects ids with bounded concurrency; gone is true for a
// container that no longer exists or no longer runs.
func (w *Watcher) inspectMany(ctx context.Context, ids []string, each func(id string, c Container, gone bool, err error)) {
	var mu sync.Mutex
	sem := make(chan struct{}, inspectWorkers)
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			ins, err := w.d.ContainerInspect(ctx, id)
			var c Container
			gone := false
			switch {
			case errdefs.IsNotFound(err):
				gone, err = true, nil
			case err != nil:
			case ins.ContainerJSONBase == nil || ins.State == nil || !ins.State.Running:
				gone = true
				c.ID = ShortID(ins.ID)
			default:
				c = FromInspect(ins, w.opts.DefaultMode)
			}
			mu.Lock()
			each(id, c, gone, err)
			mu.Unlock()
		}()
	}
	wg.Wait()
}

func (w *Watcher) inspectSome(ctx context.Context, set map[string]struct{}) {
	ids := make([]string, 0, len(set))
	for id := range set {
		ids = append(ids, id)
	}
	w.inspectMany(ctx, ids, func(id string, c Container, gone bool, err error) {
		if err != nil {
			w.opts.OnNotice(Notice{Kind: "inspect-failed", Err: fmt.Errorf("container %s: %w", ShortID(id), err)})
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		if gone {
			delete(w.containers, ShortID(id))
			return
		}
		w.containers[c.ID] = c
	})
}

func (w *Watcher) relistAll(ctx context.Context) error {
	list, err := w.d.ContainerList(ctx, container.ListOptions{})
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	bridges, err := w.listBridges(ctx)
	if err != nil {
		return err
	}
	ids := make([]string, 0, len(list))
	for _, s := range list {
		ids = append(ids, s.ID)
	}
	fresh := map[string]Container{}
	var firstErr error
	w.inspectMany(ctx, ids, func(id string, c Container, gone bool, err error) {
		if err != nil && firstErr == nil {
			firstErr = fmt.Errorf("inspect %s: %w", ShortID(id), err)
		}
		if err == nil && !gone {
			fresh[c.ID] = c
		}
	})
	if firstErr != nil {
		return firstErr
	}
	w.mu.Lock()
	w.containers, w.bridges, w.synced = fresh, bridges, true
	w.mu.Unlock()
	w.opts.OnNotice(Notice{Kind: "relisted", N: len(fresh)})
	return nil
}

func (w *Watcher) listBridges(ctx context.Context) ([]Bridge, error) {
	nets, err := w.d.NetworkList(ctx, network.ListOptions{Filters: filters.NewArgs(filters.Arg("driver", "bridge"))})
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	var out []Bridge
	for _, n := range nets {
		b := Bridge{Network: n.Name, Iface: n.Options["com.docker.network.bridge.name"]}
		if b.Iface == "" {
			if n.Name == "bridge" {
				b.Iface = "docker0"
			} else {
				b.Iface = "br-" + ShortID(n.ID)
			}
		}
		for _, c := range n.IPAM.Config {
			if p, err := netip.ParsePrefix(strings.TrimSpace(c.Subnet)); err == nil {
				b.Subnets = append(b.Subnets, p.Masked())
			}
		}
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Network < out[j].Network })
	return out, nil
}

// ListOnce lists and inspects all running containers once, without
// following events: for `berth reconcile` and `berth status`.
func (w *Watcher) ListOnce(ctx context.Context) error { return w.relistAll(ctx) }
