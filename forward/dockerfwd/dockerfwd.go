// Package dockerfwd finds the published ports dockerd forwards itself, so
// berth never forwards a port twice and fills only the gaps. dockerd
// forwards a host port with a DNAT rule of its own (the nat table's DOCKER
// chain with the iptables firewall backend, the ip/ip6 docker-bridges
// tables with --firewall-backend=nftables) or with a docker-proxy process
// (--userland-proxy, the default). With --iptables=false and
// --userland-proxy=false it forwards nothing and only holds the ports.
//
// The parsers are pure; Detector reads the host (iptables-save, nft,
// /proc) at most once per MinInterval and reuses a reading while the
// wanted mappings are unchanged, up to MaxAge.
package dockerfwd

import (
	"context"
	"hash/maphash"
	"sync"
	"time"

	"github.com/berth-dev/berth/forward"
)

// Options configure a Detector. Zero values take the defaults.
type Options struct {
	// MinInterval is the least time between two readings of the host
	// (default 1s). A sync whose mappings changed sooner waits for it: a
	// just-started container's port read from an old reading would be
	// installed by berth and removed again a moment later.
	MinInterval time.Duration
	// MaxAge is how long a reading serves syncs whose wanted mappings are
	// unchanged (default 10s): a firewall reload or a dockerd restart with
	// other flags shows after at most this long (and the next sync).
	MaxAge time.Duration
	// Read replaces the host reader (tests).
	Read func(ctx context.Context) Scan
}

// Detector answers reconcile's DockerForwards hook. Safe for concurrent
// use; readings are serialised.
type Detector struct {
	opts Options
	seed maphash.Seed

	mu     sync.Mutex
	last   Scan
	have   bool
	fp     uint64
	n      int
	result map[forward.Key]string
	reads  int
	fresh  bool // last was read by Refresh and not matched yet
}

// New returns a Detector over the host (or opts.Read).
func New(opts Options) *Detector {
	if opts.MinInterval <= 0 {
		opts.MinInterval = time.Second
	}
	if opts.MaxAge <= 0 {
		opts.MaxAge = 10 * time.Second
	}
	if opts.MaxAge < opts.MinInterval {
		opts.MaxAge = opts.MinInterval
	}
	if opts.Read == nil {
		h := &hostReader{}
		opts.Read = h.read
	}
	return &Detector{opts: opts, seed: maphash.MakeSeed()}
}

// Forwards is the reconcile.Options.DockerForwards hook: of the wanted
// mappings, the host keys dockerd forwards itself, with who does it. The
// returned map is shared with later calls: read it, do not change it.
func (d *Detector) Forwards(ctx context.Context, ms []forward.Mapping) map[forward.Key]string {
	fp := d.fingerprint(ms)
	d.mu.Lock()
	defer d.mu.Unlock()
	age := time.Since(d.last.At)
	if d.have && fp == d.fp && len(ms) == d.n && age < d.opts.MaxAge {
		return d.result
	}
	// A reading nobody has matched yet (Refresh at start-up) serves the
	// first sync; otherwise read, but not sooner than MinInterval.
	if !(d.have && d.fresh && age < d.opts.MinInterval) {
		if d.have && age < d.opts.MinInterval {
			t := time.NewTimer(d.opts.MinInterval - age)
			select {
			case <-ctx.Done():
				t.Stop()
				// Answer from the reading we have rather than not at all.
				return Match(d.last.Forwards, ms)
			case <-t.C:
			}
		}
		d.readLocked(ctx)
	}
	d.fresh = false
	d.fp, d.n = fp, len(ms)
	d.result = Match(d.last.Forwards, ms)
	return d.result
}

// Refresh reads the host now and returns the reading.
func (d *Detector) Refresh(ctx context.Context) Scan {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.readLocked(ctx)
	d.fresh = true // the next Forwards matches against it without reading
	return d.last
}

// Last returns the latest reading (zero before the first).
func (d *Detector) Last() Scan {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.last
}

// Reads counts host readings (for tests and metrics).
func (d *Detector) Reads() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reads
}

func (d *Detector) readLocked(ctx context.Context) {
	sc := d.opts.Read(ctx)
	if sc.At.IsZero() {
		sc.At = time.Now()
	}
	d.last, d.have = sc, true
	d.reads++
}

// fingerprint is an order-independent hash of the mappings: a sum of
// per-mapping hashes, linear and allocation-free.
func (d *Detector) fingerprint(ms []forward.Mapping) uint64 {
	var sum uint64
	for _, m := range ms {
		sum += maphash.Comparable(d.seed, m)
	}
	return sum
}
