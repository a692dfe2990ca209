package e2e

import (
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// berth speaks the sd_notify protocol: READY=1 after the first sync,
// WATCHDOG=1 while the loop lives, STOPPING=1 on SIGTERM.
func TestSystemdNotifyProtocol(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	sock := filepath.Join(w.Dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				close(got)
				return
			}
			got <- string(buf[:n])
		}
	}()
	b := w.StartBerthEnv([]string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=400000"})
	want := []string{"READY=1", "WATCHDOG=1"}
	deadline := time.After(10 * time.Second)
	for len(want) > 0 {
		select {
		case m := <-got:
			if m == want[0] {
				want = want[1:]
			}
		case <-deadline:
			t.Fatalf("did not get %v from berth", want)
		}
	}
	b.Stop()
	for {
		select {
		case m := <-got:
			if m == "STOPPING=1" {
				return
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no STOPPING=1 on SIGTERM")
		}
	}
}

// /metrics parses as Prometheus text and carries berth's series with the
// values the status shows.
func TestMetricsEndpoint(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	w.RunEcho("m1", "--label", "berth.ports=25000:80,25001:81", "--label", "berth.mode=relay", "--", "-tcp", "80,81")
	b.EventuallyStatus(t, 5*time.Second, "installed", func(rows []reconcile.Row) error {
		if installed(rows, "m1") != 4 {
			return fmt.Errorf("%d installed", installed(rows, "m1"))
		}
		return nil
	})
	if err := harness.EchoTCP("127.0.0.1:25000", []byte(strings.Repeat("x", 1000)), 3*time.Second); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + b.Addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("metrics do not parse: %v", err)
	}
	value := func(name string, labels map[string]string) float64 {
		f, ok := fams[name]
		if !ok {
			t.Fatalf("metric %s missing", name)
		}
	next:
		for _, m := range f.Metric {
			for _, lp := range m.Label {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			switch {
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
		t.Fatalf("metric %s%v not found", name, labels)
		return 0
	}
	if v := value("berth_mappings", map[string]string{"mode": "relay", "state": "installed"}); v != 4 {
		t.Errorf("berth_mappings{relay,installed} = %v, want 4", v)
	}
	if v := value("berth_syncs_total", map[string]string{"result": "ok"}); v < 1 {
		t.Errorf("berth_syncs_total{ok} = %v", v)
	}
	if v := value("berth_sync_duration_seconds", nil); v < 1 {
		t.Errorf("sync duration histogram empty")
	}
	if v := value("berth_last_successful_sync_timestamp_seconds", nil); time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("last success %v", v)
	}
	if v := value("berth_relay_connections_total", nil); v < 1 {
		t.Errorf("relay connections %v", v)
	}
	if v := value("berth_relay_bytes_total", map[string]string{"direction": "in"}); v < 1000 {
		t.Errorf("relay bytes in %v, want >= 1000", v)
	}
	if v := value("berth_docker_connected", nil); v != 1 {
		t.Errorf("docker connected %v", v)
	}
	for _, name := range []string{"berth_docker_event_stream_reconnects_total", "berth_nat_flush_recoveries_total",
		"berth_errors_total", "berth_relay_udp_flows_total", "berth_relay_active_udp_flows", "berth_relay_udp_kernel_drops_total", "berth_relay_drops_total", "go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}
	for name := range fams {
		if strings.HasPrefix(name, "berth_") && !model.LegacyValidation.IsValidMetricName(name) {
			t.Errorf("bad metric name %s", name)
		}
	}
}
