package main

import (
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/reconcile"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are berth's Prometheus series. Counters that happen in the loops
// are counted as they happen; the per-mapping state and relay traffic are
// read from the reconciler at scrape time, so there is one source of truth.
type metrics struct {
	reg          *prometheus.Registry
	syncs        *prometheus.CounterVec
	syncDuration prometheus.Histogram
	lastSuccess  prometheus.Gauge
	reconnects   prometheus.Counter
	errors       *prometheus.CounterVec
}

func newMetrics(rec *reconcile.Reconciler, relay forward.StatsReporter) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_syncs_total", Help: "Syncs of the desired state to the backends, by result.",
		}, []string{"result"}),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "berth_sync_duration_seconds", Help: "Time one sync took.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "berth_last_successful_sync_timestamp_seconds", Help: "Unix time of the last sync that left nothing undone.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "berth_docker_event_stream_reconnects_total", Help: "Times the Docker event stream was lost and berth reconnected.",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_errors_total", Help: "Errors by kind: sync, docker, inspect, canary.",
		}, []string{"kind"}),
	}
	for _, r := range []string{"ok", "error"} {
		m.syncs.WithLabelValues(r)
	}
	for _, k := range []string{"sync", "docker", "inspect", "canary"} {
		m.errors.WithLabelValues(k)
	}
	m.reg.MustRegister(m.syncs, m.syncDuration, m.lastSuccess, m.reconnects, m.errors,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&stateCollector{rec: rec, relay: relay})
	return m
}

func (m *metrics) observeSync(d time.Duration, err error) {
	m.syncDuration.Observe(d.Seconds())
	if err != nil {
		m.syncs.WithLabelValues("error").Inc()
		m.errors.WithLabelValues("sync").Inc()
		return
	}
	m.syncs.WithLabelValues("ok").Inc()
	m.lastSuccess.SetToCurrentTime()
}

var (
	descMappings = prometheus.NewDesc("berth_mappings", "Mappings by mode and state.", []string{"mode", "state"}, nil)
	descDocker   = prometheus.NewDesc("berth_docker_connected", "1 while the Docker event stream is up.", nil, nil)
	descFlush    = prometheus.NewDesc("berth_nat_flush_recoveries_total", "Times berth found its NAT chains flushed or removed and reinstalled them.", nil, nil)
	descConns    = prometheus.NewDesc("berth_relay_connections_total", "TCP connections the relay accepted.", nil, nil)
	descActive   = prometheus.NewDesc("berth_relay_active_connections", "TCP connections open through the relay now.", nil, nil)
	descBytes    = prometheus.NewDesc("berth_relay_bytes_total", "Bytes the relay carried, by direction (in: client to container).", []string{"direction"}, nil)
	descFlows    = prometheus.NewDesc("berth_relay_udp_flows_total", "UDP flows the relay created.", nil, nil)
	descFlowsNow = prometheus.NewDesc("berth_relay_active_udp_flows", "UDP flows open in the relay now.", nil, nil)
	descKDrops   = prometheus.NewDesc("berth_relay_udp_kernel_drops_total", "UDP datagrams the kernel dropped at the relay's listening sockets (receive buffer full).", nil, nil)
	descDrops    = prometheus.NewDesc("berth_relay_drops_total", "Connections and datagrams refused because a table or connection limit was full.", nil, nil)
	descRelayErr = prometheus.NewDesc("berth_relay_errors_total", "Dial, copy and write failures in the relay.", nil, nil)
)

// stateCollector reads the mapping table and relay counters at scrape.
type stateCollector struct {
	rec   *reconcile.Reconciler
	relay forward.StatsReporter
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMappings, descDocker, descFlush, descConns, descActive, descBytes, descFlows, descFlowsNow, descKDrops, descDrops, descRelayErr} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	rows, sum := c.rec.Status()
	type ms struct{ mode, state string }
	counts := map[ms]int{}
	for _, mode := range []string{"nat", "relay"} {
		for _, st := range []string{reconcile.StateInstalled, reconcile.StatePending, reconcile.StateError, reconcile.StateSkipped, reconcile.StateDocker} {
			counts[ms{mode, st}] = 0
		}
	}
	for _, r := range rows {
		counts[ms{r.Mode, r.State}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(descMappings, prometheus.GaugeValue, float64(n), k.mode, k.state)
	}
	up := 0.0
	if sum.DockerConnected {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(descDocker, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(descFlush, prometheus.CounterValue, float64(sum.FlushRecoveries))
	if c.relay == nil {
		return
	}
	var t forward.Stats
	for _, s := range c.relay.Stats() {
		t.Conns += s.Conns
		t.ActiveTCP += s.ActiveTCP
		t.BytesIn += s.BytesIn
		t.BytesOut += s.BytesOut
		t.Flows += s.Flows
		t.ActiveUDP += s.ActiveUDP
		t.KernelDrops += s.KernelDrops
		t.Drops += s.Drops
		t.Errors += s.Errors
	}
	ch <- prometheus.MustNewConstMetric(descConns, prometheus.CounterValue, float64(t.Conns))
	ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(t.ActiveTCP))
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(t.BytesIn), "in")
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(t.BytesOut), "out")
	ch <- prometheus.MustNewConstMetric(descFlows, prometheus.CounterValue, float64(t.Flows))
	ch <- prometheus.MustNewConstMetric(descFlowsNow, prometheus.GaugeValue, float64(t.ActiveUDP))
	ch <- prometheus.MustNewConstMetric(descKDrops, prometheus.CounterValue, float64(t.KernelDrops))
	ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(t.Drops))
	ch <- prometheus.MustNewConstMetric(descRelayErr, prometheus.CounterValue, float64(t.Errors))
}
