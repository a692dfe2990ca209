package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/watcher"
	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
)

func runCmd(g *globalFlags) *cobra.Command {
	b := &backendFlags{}
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: follow Docker and keep every published port forwarded",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			setGCPercent()
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return runDaemon(ctx, g, b)
		},
	}
	b.register(cmd.Flags())
	withEnvUsage(cmd.Flags())
	return cmd
}

func runDaemon(ctx context.Context, g *globalFlags, b *backendFlags) error {
	log := g.log
	cli, err := dockerClient(g.dockerHost)
	if err != nil {
		return err
	}
	defer cli.Close()
	be, err := b.build(log, true)
	if err != nil {
		return err
	}
	defer be.relay.Close()

	runner := &reconcile.Runner{MinInterval: b.minSync, MaxInterval: b.resync}
	d := &daemon{be: be, ctx: ctx}
	w, err := b.newWatcher(cli, runner.Trigger, func(n watcher.Notice) { d.notice(log, n) })
	if err != nil {
		return err
	}
	opts := be.opts
	opts.FullListEvery = b.resync
	rec := reconcile.New(w, opts)
	rec.SetInfo(be.info...)
	d.rec, d.w = rec, w
	d.m = newMetrics(rec, be.relay)
	runner.Sync = d.sync(log, rec)

	ln, err := net.Listen("tcp", g.httpAddr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: d.handler(), ReadHeaderTimeout: 5 * time.Second}
	log.WithFields(logrus.Fields{"http": ln.Addr().String(), "mode": b.mode, "version": version}).
		Info("berth started; " + joinInfo(be.info))

	var wg sync.WaitGroup
	run := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }
	run(func() { w.Run(ctx) })
	run(func() { runner.Loop(ctx) })
	run(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.WithError(err).Error("http server")
		}
	})
	if be.nat != nil && b.canary > 0 {
		run(func() { canaryLoop(ctx, log, be.nat, b.canary, d, runner.Trigger) })
	}
	run(func() { d.watchdog(ctx, log, b.resync) })
	<-ctx.Done()
	sdNotify(log, sd.SdNotifyStopping)
	log.Info("stopping; NAT rules stay in place and are adopted at the next start")
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	wg.Wait()
	return nil
}

func joinInfo(lines []string) string {
	s := ""
	for i, l := range lines {
		if i > 0 {
			s += "; "
		}
		s += l
	}
	return s
}

func (d *daemon) notice(log logrus.FieldLogger, n watcher.Notice) {
	switch n.Kind {
	case "connected":
		log.Info("docker event stream connected; relisting")
		d.mu.Lock()
		again := d.lost
		d.mu.Unlock()
		if again {
			go d.redescribe(log)
		}
	case "lost":
		d.mu.Lock()
		d.lost = true
		d.mu.Unlock()
		if d.m != nil {
			d.m.reconnects.Inc()
			d.m.errors.WithLabelValues("docker").Inc()
		}
		log.WithError(n.Err).Warn("docker event stream lost; reconnecting")
	case "inspect-failed":
		if d.m != nil {
			d.m.errors.WithLabelValues("inspect").Inc()
		}
		log.WithError(n.Err).Warn("inspect failed")
	case "relisted":
		log.WithField("containers", n.N).Debug("listed docker containers")
	default:
		log.WithError(n.Err).Warn(n.Kind)
	}
}

// redescribe runs after the event stream came back (dockerd restarted,
// perhaps with other flags): dockerd's lines in the status summary are
// worked out again, and logged when they changed.
func (d *daemon) redescribe(log logrus.FieldLogger) {
	if d.be.dockerInfo == nil || d.rec == nil {
		return
	}
	lines := d.be.dockerInfo(d.ctx)
	info := append(slices.Clone(d.be.natInfo), lines...)
	sum := d.rec.Summary()
	if slices.Equal(info, sum.Info) {
		return
	}
	d.rec.SetInfo(info...)
	log.Info("dockerd is back with another configuration; " + joinInfo(lines))
}

// daemon holds what the HTTP handlers and the loops share.
type daemon struct {
	rec *reconcile.Reconciler
	w   *watcher.Watcher
	m   *metrics
	be  *backends
	ctx context.Context // the daemon's

	mu       sync.Mutex
	lastErr  string
	synced   bool
	released int       // mappings at the last releaseMemory
	lost     bool      // the event stream was lost once: a later connect is dockerd back
	lastLoop time.Time // when a sync last finished, for the watchdog
}

// gcPercent is berth's GOGC unless the environment sets one. berth's live
// heap is small (a few MiB at 2,000 relay listeners) and its garbage comes
// in bursts (a container's inspect document, a plan); Go's default of 100
// lets the heap double before collecting, which is most of berth's RSS
// above its binary. 50 keeps RSS near what berth holds for a GC cost that
// does not show beside the system calls of forwarding.
const gcPercent = 50

func setGCPercent() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}

// releaseAfter is how many mappings a sync must add or remove before berth
// returns its freed heap to the kernel at once.
const releaseAfter = 100

// releaseMemory follows a sync that added or removed many mappings: the
// container documents and plans it parsed are garbage now, and Go's
// background scavenger would take minutes to hand their pages back. One
// forced collection does it now, so berth's RSS is what it holds, not
// what the last burst needed. Called with d.mu held.
func (d *daemon) releaseMemory(rec *reconcile.Reconciler) {
	sum := rec.Summary()
	if n := sum.Mappings - d.released; n >= releaseAfter || n <= -releaseAfter {
		d.released = sum.Mappings
		debug.FreeOSMemory()
	}
}

// sync wraps Reconciler.Sync: it logs a failure once, not at every retry.
func (d *daemon) sync(log logrus.FieldLogger, rec *reconcile.Reconciler) func(context.Context) error {
	return func(ctx context.Context) error {
		start := time.Now()
		err := rec.Sync(ctx)
		d.mu.Lock()
		defer d.mu.Unlock()
		d.lastLoop = time.Now()
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if !errors.Is(err, reconcile.ErrNotSynced) {
			d.m.observeSync(time.Since(start), err)
		}
		switch {
		case errors.Is(err, reconcile.ErrNotSynced):
			return err
		case err == nil && d.lastErr != "":
			log.Info("sync succeeded again")
		case err != nil && msg != d.lastErr:
			log.WithError(err).Warn("sync left work undone; retrying with backoff")
		}
		if err == nil {
			d.releaseMemory(rec)
		}
		if err == nil && !d.synced {
			sum := rec.Summary()
			log.WithFields(logrus.Fields{"mappings": sum.Mappings, "installed": sum.Installed, "errors": sum.Errors}).
				Info("first sync done")
			sdNotify(log, sd.SdNotifyReady)
		}
		d.synced = d.synced || err == nil
		d.lastErr = msg
		return err
	}
}

func (d *daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		rows, _ := d.rec.Status()
		writeJSON(w, rows)
	})
	mux.HandleFunc("/status/summary", func(w http.ResponseWriter, _ *http.Request) {
		sum := d.rec.Summary()
		writeJSON(w, sum)
	})
	mux.Handle("/metrics", promhttp.HandlerFor(d.m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		d.mu.Lock()
		ok := d.synced
		d.mu.Unlock()
		switch {
		case !d.w.Connected():
			http.Error(w, "docker unreachable", http.StatusServiceUnavailable)
		case !ok:
			http.Error(w, "first sync not done", http.StatusServiceUnavailable)
		default:
			w.Write([]byte("ok\n"))
		}
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// canaryLoop checks berth's NAT chains every interval; when someone flushed
// them it restores the chains and triggers a full sync.
func canaryLoop(ctx context.Context, log logrus.FieldLogger, nat natBackend, every time.Duration, d *daemon, trigger func()) {
	tick(ctx, every, func() {
		ok, err := nat.Check(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			d.m.errors.WithLabelValues("canary").Inc()
			log.WithError(err).Warn("nat canary check failed")
			return
		}
		if ok {
			return
		}
		log.Warn("berth's NAT chains were flushed or removed (firewall reload?); reinstalling")
		if err := nat.Ensure(ctx); err != nil {
			log.WithError(err).Error("restoring nat chains")
		}
		d.rec.NoteFlushRecovery()
		d.rec.RequestFullList()
		trigger()
	})
}

// tick calls fn every interval until ctx ends.
func tick(ctx context.Context, every time.Duration, fn func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// sdNotify tells systemd (Type=notify) about state changes; a no-op
// outside systemd.
func sdNotify(log logrus.FieldLogger, state string) {
	if _, err := sd.SdNotify(false, state); err != nil {
		log.WithError(err).Debug("sd_notify")
	}
}

// watchdog pings systemd's watchdog while the sync loop is alive: a sync
// must have finished within two resync intervals (the loop's longest
// sleep) plus a margin. A hung loop stops the pings and systemd restarts
// berth.
func (d *daemon) watchdog(ctx context.Context, log logrus.FieldLogger, resync time.Duration) {
	every, err := sd.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	tick(ctx, every/2, func() {
		d.mu.Lock()
		last := d.lastLoop
		d.mu.Unlock()
		if !last.IsZero() && time.Since(last) < 2*resync+every {
			sdNotify(log, sd.SdNotifyWatchdog)
		}
	})
}
