package reconcile

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
	"github.com/berth-dev/berth/watcher"
	"github.com/sirupsen/logrus"
)

// States a mapping can be in.
const (
	StateInstalled = "installed"
	StatePending   = "pending"
	StateError     = "error"
	// StateSkipped is a mapping whose mode this berth does not serve (a
	// relay mapping seen by a one-shot command, or a disabled backend).
	StateSkipped = "skipped"
	// StateDocker is a mapping dockerd already forwards itself (its own
	// DNAT rules or a docker-proxy): berth installs nothing for it.
	StateDocker = "docker"
)

// Source is where the desired state comes from (the watcher).
type Source interface {
	Snapshot() ([]watcher.Container, []watcher.Bridge)
	Connected() bool
	// Synced is true once the containers have been listed since the last
	// (re)connect. Until then a sync would see an empty desired state and
	// tear down mappings that are still right, so it does nothing.
	Synced() bool
}

// ErrNotSynced is returned by Sync while the source has not listed Docker.
var ErrNotSynced = errors.New("waiting for a full list of Docker containers")

// Options configure a Reconciler.
type Options struct {
	// NAT and Relay are the backends; nil means that mode is unavailable
	// and mappings asking for it are shown as errors.
	NAT   forward.Forwarder
	Relay forward.Forwarder
	Log   logrus.FieldLogger
	// HostConflicts reports, for mappings about to be installed, those
	// whose host port a process other than dockerd or berth listens on.
	HostConflicts func(ms []forward.Mapping) map[forward.Mapping]error
	// BeforeSync runs at the start of each sync with the bridges (NAT
	// egress masquerade). It must only probe and remember, never write:
	// it also runs for dry runs. An error fails the sync.
	BeforeSync func(ctx context.Context, bridges []watcher.Bridge) error
	// Disabled explains, per mode, why a nil backend is missing.
	Disabled map[forward.Mode]string
	// Observe makes Sync read and report only: nothing is applied and
	// missing mappings are shown as pending.
	Observe bool
	// DockerForwards reports, for wanted mappings, those whose host key
	// dockerd already forwards itself, with who does it. Nil: never.
	DockerForwards func(ctx context.Context, ms []forward.Mapping) map[forward.Key]string
	// FullListEvery is how often a sync reads every backend back from the
	// kernel even when the backend offers a cached view (forward.Cacher).
	// Zero means every sync.
	FullListEvery time.Duration
}

// Row is one line of `berth status`.
type Row struct {
	Proto         string         `json:"proto"`
	HostIP        string         `json:"host_ip"`
	HostPort      uint16         `json:"host_port"`
	ContainerIP   string         `json:"container_ip"`
	ContainerPort uint16         `json:"container_port"`
	ContainerID   string         `json:"container_id"`
	ContainerName string         `json:"container_name"`
	Source        string         `json:"source"`
	Mode          string         `json:"mode"`
	State         string         `json:"state"`
	Error         string         `json:"error"`
	Reason        string         `json:"reason,omitempty"`
	Stats         *forward.Stats `json:"stats,omitempty"`
}

// Summary is the daemon-wide part of the status.
type Summary struct {
	Syncs           uint64    `json:"syncs"`
	FailedSyncs     uint64    `json:"failed_syncs"`
	LastSync        time.Time `json:"last_sync"`
	LastSuccess     time.Time `json:"last_success"`
	LastSyncSeconds float64   `json:"last_sync_seconds"`
	LastError       string    `json:"last_error,omitempty"`
	Mappings        int       `json:"mappings"`
	Installed       int       `json:"installed"`
	Pending         int       `json:"pending"`
	Errors          int       `json:"errors"`
	Skipped         int       `json:"skipped"`
	ByDocker        int       `json:"docker"`
	FlushRecoveries uint64    `json:"flush_recoveries"`
	DockerConnected bool      `json:"docker_connected"`
	Info            []string  `json:"info,omitempty"`
}

// Reconciler makes the backends match the watcher's desired state. Sync
// is called by one goroutine (the Runner); Status from any.
type Reconciler struct {
	src  Source
	opts Options
	log  logrus.FieldLogger

	mu      sync.Mutex
	rows    []Row
	summary Summary
	info    []string

	// Owned by the Sync goroutine.
	lastFull  time.Time
	forceFull bool
	lastOK    bool
}

// RequestFullList makes the next sync read every backend from the kernel
// (after a canary found the chains flushed, say).
func (r *Reconciler) RequestFullList() {
	r.mu.Lock()
	r.forceFull = true
	r.mu.Unlock()
}

// list reads what a backend has installed: its cached view between full
// resyncs when it offers one, else List.
func (r *Reconciler) list(ctx context.Context, fw forward.Forwarder, full bool) ([]forward.Mapping, error) {
	if c, ok := fw.(forward.Cacher); ok && !full {
		if ms, ok := c.Cached(); ok {
			return ms, nil
		}
	}
	return fw.List(ctx)
}

// New returns a reconciler over src.
func New(src Source, opts Options) *Reconciler {
	log := opts.Log
	if log == nil {
		l := logrus.New()
		l.SetLevel(logrus.PanicLevel)
		log = l
	}
	return &Reconciler{src: src, opts: opts, log: log}
}

// SetInfo sets lines shown in the status summary (backend facts such as
// the iptables flavour).
func (r *Reconciler) SetInfo(lines ...string) {
	r.mu.Lock()
	r.info = lines
	r.mu.Unlock()
}

func (r *Reconciler) backends() []struct {
	mode forward.Mode
	fw   forward.Forwarder
} {
	return []struct {
		mode forward.Mode
		fw   forward.Forwarder
	}{{forward.ModeNAT, r.opts.NAT}, {forward.ModeRelay, r.opts.Relay}}
}

// Plan computes, without changing anything, what each backend would do.
func (r *Reconciler) Plan(ctx context.Context) (map[forward.Mode]Plan, []Desired, error) {
	cs, _ := r.src.Snapshot()
	desired := Resolve(cs)
	plans := map[forward.Mode]Plan{}
	var errs []error
	for _, b := range r.backends() {
		want := wanted(desired, b.mode)
		if b.fw == nil {
			continue
		}
		have, err := b.fw.List(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: list: %w", b.mode, err))
			continue
		}
		plans[b.mode] = Diff(want, have)
	}
	return plans, desired, errors.Join(errs...)
}

func wanted(desired []Desired, mode forward.Mode) []forward.Mapping {
	var out []forward.Mapping
	for _, d := range desired {
		if d.Err == "" && d.Mapping.Mode == mode {
			out = append(out, d.Mapping)
		}
	}
	return out
}

// Sync makes the host match the desired state once. It returns an error
// when anything is left undone, so the Runner retries with backoff.
func (r *Reconciler) Sync(ctx context.Context) error {
	start := time.Now()
	if !r.src.Synced() {
		return ErrNotSynced
	}
	cs, bridges := r.src.Snapshot()
	names := map[string]string{}
	for _, c := range cs {
		names[c.ID] = c.Name
	}
	var errs []error
	if r.opts.BeforeSync != nil {
		if err := r.opts.BeforeSync(ctx, bridges); err != nil {
			errs = append(errs, err)
		}
	}
	r.mu.Lock()
	seq := r.summary.Syncs + 1
	full := r.forceFull || !r.lastOK || r.opts.FullListEvery <= 0 || time.Since(r.lastFull) >= r.opts.FullListEvery
	r.forceFull = false
	r.mu.Unlock()
	desired := Resolve(cs)
	published := map[forward.Mapping]bool{}
	for _, d := range desired {
		if d.Source == watcher.SourcePublish {
			published[d.Mapping] = true
		}
	}
	byDocker := map[forward.Mapping]string{}
	if r.opts.DockerForwards != nil {
		var ms []forward.Mapping
		for _, d := range desired {
			if d.Err == "" {
				ms = append(ms, d.Mapping)
			}
		}
		if fw := r.opts.DockerForwards(ctx, ms); len(fw) > 0 {
			for _, m := range ms {
				if who, ok := fw[m.Key]; ok {
					byDocker[m] = who
				}
			}
		}
	}
	failed := map[forward.Mapping]string{} // per mapping
	pending := map[forward.Mode]string{}   // whole backend
	notInstalled := map[forward.Mapping]bool{}
	skipped := map[forward.Mapping]string{}
	for _, b := range r.backends() {
		want := wanted(desired, b.mode)
		if len(byDocker) > 0 {
			kept := want[:0]
			for _, m := range want {
				if byDocker[m] == "" {
					kept = append(kept, m)
				}
			}
			want = kept
		}
		if b.fw == nil {
			why := r.opts.Disabled[b.mode]
			if why == "" {
				why = fmt.Sprintf("%s mode is disabled in this berth", b.mode)
			}
			for _, m := range want {
				skipped[m] = why
			}
			continue
		}
		have, err := r.list(ctx, b.fw, full)
		if err != nil {
			pending[b.mode] = fmt.Sprintf("%s backend: list: %v", b.mode, err)
			errs = append(errs, fmt.Errorf("%s: list: %w", b.mode, err))
			continue
		}
		plan := Diff(want, have)
		if r.opts.HostConflicts != nil && len(plan.Add) > 0 {
			// A -p port's socket is dockerd's own reservation (docker run
			// fails if anyone else holds it): only label ports can clash
			// with a host process.
			var check []forward.Mapping
			for _, m := range plan.Add {
				if !published[m] {
					check = append(check, m)
				}
			}
			conflicts := r.opts.HostConflicts(check)
			kept := plan.Add[:0]
			for _, m := range plan.Add {
				if err, ok := conflicts[m]; ok {
					failed[m] = err.Error()
					errs = append(errs, err)
					continue
				}
				kept = append(kept, m)
			}
			plan.Add = kept
		}
		if r.opts.Observe {
			for _, m := range plan.Add {
				notInstalled[m] = true
			}
			continue
		}
		// Apply runs even with an empty plan: a backend may have state of
		// its own to bring in step (NAT chains on first start, egress
		// MASQUERADE for a new bridge); with nothing to do it writes
		// nothing.
		err = b.fw.Apply(ctx, plan.Add, plan.Remove)
		per, batch := forward.SplitErrors(err)
		for m, e := range per {
			failed[m] = e.Error()
		}
		if batch != nil {
			pending[b.mode] = fmt.Sprintf("%s backend: %v", b.mode, batch)
		}
		if err != nil {
			errs = append(errs, err)
		}
		r.logPlan(r.log.WithField("sync", seq), b.mode, plan, per, batch, names)
	}
	err := errors.Join(errs...)
	if full && err == nil {
		r.lastFull = start
	}
	r.lastOK = err == nil
	r.record(desired, outcome{failed: failed, pending: pending, notInstalled: notInstalled,
		skipped: skipped, byDocker: byDocker}, start, err)
	return err
}

// logPlan writes one line per applied change, or one per container when a
// container brings many (a 1,000-port container is one line, not 2,000).
func (r *Reconciler) logPlan(log logrus.FieldLogger, mode forward.Mode, p Plan, per map[forward.Mapping]error, batch error, names map[string]string) {
	if batch != nil {
		log.WithField("mode", mode).WithError(batch).Error("apply failed")
		return
	}
	for _, m := range p.Remove {
		if _, bad := per[m]; bad {
			log.WithFields(fields(m, names)).WithError(per[m]).Error("remove failed")
		}
	}
	for _, m := range p.Add {
		if _, bad := per[m]; bad {
			log.WithFields(fields(m, names)).WithError(per[m]).Error("install failed")
		}
	}
	if len(p.Add)+len(p.Remove) <= 20 {
		for _, m := range p.Remove {
			if per[m] == nil {
				log.WithFields(fields(m, names)).Info("removed")
			}
		}
		for _, m := range p.Add {
			if per[m] == nil {
				log.WithFields(fields(m, names)).Info("installed")
			}
		}
		return
	}
	type count struct{ add, rem int }
	by := map[string]*count{}
	for _, m := range p.Add {
		if by[m.ContainerID] == nil {
			by[m.ContainerID] = &count{}
		}
		by[m.ContainerID].add++
	}
	for _, m := range p.Remove {
		if by[m.ContainerID] == nil {
			by[m.ContainerID] = &count{}
		}
		by[m.ContainerID].rem++
	}
	for id, c := range by {
		log.WithFields(logrus.Fields{"container": containerLabel(id, names), "mode": mode}).
			Infof("installed %d, removed %d mappings", c.add, c.rem)
	}
}

func containerLabel(id string, names map[string]string) string {
	if n := names[id]; n != "" {
		return n + " (" + id + ")"
	}
	return id
}

func fields(m forward.Mapping, names map[string]string) logrus.Fields {
	return logrus.Fields{"container": containerLabel(m.ContainerID, names), "mapping": m.String(), "mode": m.Mode}
}

// outcome is what one sync found per mapping, for the status rows.
type outcome struct {
	failed       map[forward.Mapping]string // per-mapping errors
	pending      map[forward.Mode]string    // a whole backend failed
	notInstalled map[forward.Mapping]bool   // observe mode: missing
	skipped      map[forward.Mapping]string // mode not served here
	byDocker     map[forward.Mapping]string // dockerd forwards it itself
}

func (r *Reconciler) record(desired []Desired, o outcome, start time.Time, err error) {
	rows := make([]Row, 0, len(desired))
	var sum Summary
	for _, d := range desired {
		m := d.Mapping
		row := Row{ContainerID: m.ContainerID, ContainerName: d.ContainerName, Source: string(d.Source),
			Mode: string(m.Mode), Reason: d.Reason}
		if m.Key.HostIP.IsValid() {
			row.Proto, row.HostIP, row.HostPort = string(m.Proto), m.HostIP.String(), m.HostPort
		}
		if m.ContainerIP.IsValid() {
			row.ContainerIP, row.ContainerPort = m.ContainerIP.String(), m.ContainerPort
		} else {
			row.ContainerPort = m.ContainerPort
		}
		switch {
		case d.Err != "":
			row.State, row.Error = StateError, nameContainer(d, d.Err)
		case o.byDocker[m] != "":
			row.State, row.Reason = StateDocker, o.byDocker[m]
		case o.failed[m] != "":
			row.State, row.Error = StateError, nameContainer(d, o.failed[m])
		case o.pending[m.Mode] != "":
			row.State, row.Error = StatePending, o.pending[m.Mode]
		case o.skipped[m] != "":
			row.State, row.Error = StateSkipped, o.skipped[m]
		case o.notInstalled[m]:
			row.State, row.Error = StatePending, "not installed"
		default:
			row.State = StateInstalled
		}
		switch row.State {
		case StateInstalled:
			sum.Installed++
		case StatePending:
			sum.Pending++
		case StateSkipped:
			sum.Skipped++
		case StateDocker:
			sum.ByDocker++
		default:
			sum.Errors++
		}
		rows = append(rows, row)
	}
	sort.SliceStable(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		if a.ContainerName != b.ContainerName {
			return a.ContainerName < b.ContainerName
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		if a.HostPort != b.HostPort {
			return a.HostPort < b.HostPort
		}
		return a.HostIP < b.HostIP
	})
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	sum.Syncs = r.summary.Syncs + 1
	sum.FailedSyncs = r.summary.FailedSyncs
	sum.FlushRecoveries = r.summary.FlushRecoveries
	sum.LastSuccess = r.summary.LastSuccess
	sum.LastSync = now
	sum.LastSyncSeconds = now.Sub(start).Seconds()
	sum.Mappings = len(rows)
	if err != nil {
		sum.FailedSyncs++
		sum.LastError = err.Error()
	} else {
		sum.LastSuccess = now
	}
	r.rows, r.summary = rows, sum
}

// nameContainer makes sure an error names the container it is about.
func nameContainer(d Desired, msg string) string {
	if strings.Contains(msg, "container "+d.ContainerName) {
		return msg
	}
	return fmt.Sprintf("container %s (%s): %s", d.ContainerName, d.Mapping.ContainerID, msg)
}

// NoteFlushRecovery counts a reinstall after someone flushed berth's rules.
func (r *Reconciler) NoteFlushRecovery() {
	r.mu.Lock()
	r.summary.FlushRecoveries++
	r.mu.Unlock()
}

// Summary is Status without the rows (and their relay counters), for
// callers that need the counts only: cheap enough for every sync.
func (r *Reconciler) Summary() Summary {
	r.mu.Lock()
	sum := r.summaryLocked()
	r.mu.Unlock()
	sum.DockerConnected = r.src.Connected()
	return sum
}

func (r *Reconciler) summaryLocked() Summary {
	sum := r.summary
	sum.Info = append([]string(nil), r.info...)
	return sum
}

// Status returns the rows of the last sync (with live relay counters) and
// the summary.
func (r *Reconciler) Status() ([]Row, Summary) {
	r.mu.Lock()
	rows := append([]Row(nil), r.rows...)
	sum := r.summaryLocked()
	r.mu.Unlock()
	sum.DockerConnected = r.src.Connected()
	if sr, ok := r.opts.Relay.(forward.StatsReporter); ok && r.opts.Relay != nil {
		stats := sr.Stats()
		for i := range rows {
			if rows[i].Mode != string(forward.ModeRelay) || rows[i].State != StateInstalled {
				continue
			}
			ip, err := netip.ParseAddr(rows[i].HostIP)
			if err != nil {
				continue
			}
			if s, ok := stats[forward.Key{Proto: forward.Proto(rows[i].Proto), HostIP: ip, HostPort: rows[i].HostPort}]; ok {
				rows[i].Stats = &s
			}
		}
	}
	return rows, sum
}
