package e2e

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
)

// `berth status` as an operator runs it: against the daemon, and with no
// daemon (it then lists Docker and the kernel itself).
func TestStatusCommand(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	w.RunEcho("cli", "-p", "27000:80", "--label", "berth.ports=27001:81", "--label", "berth.network=bridge", "--", "-tcp", "80,81")
	b.EventuallyStatus(t, 5*time.Second, "installed", func(rows []reconcile.Row) error {
		if installed(rows, "cli") != 4 {
			return fmt.Errorf("rows %v", rows)
		}
		return nil
	})

	out, err := w.CLI("status", "--output", "json", "--http-addr", b.Addr)
	if err != nil {
		t.Fatalf("berth status -o json: %v\n%s", err, out)
	}
	var rows []map[string]any
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	wantKeys := []string{"container_id", "container_ip", "container_name", "container_port", "error", "host_ip",
		"host_port", "mode", "proto", "source", "state"}
	var got []string
	for _, r := range rows {
		if r["container_name"] != "cli" {
			continue
		}
		var keys []string
		for k := range r {
			if k != "reason" && k != "stats" {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		if strings.Join(keys, ",") != strings.Join(wantKeys, ",") {
			t.Fatalf("row keys %v, want %v", keys, wantKeys)
		}
		got = append(got, fmt.Sprintf("%v %v:%v %v %v %v", r["proto"], r["host_ip"], r["host_port"], r["source"], r["mode"], r["state"]))
	}
	sort.Strings(got)
	want := []string{
		"tcp 0.0.0.0:27000 publish nat installed", "tcp 0.0.0.0:27001 label nat installed",
		"tcp :::27000 publish relay installed", "tcp :::27001 label relay installed",
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("status rows\n got  %v\n want %v", got, want)
	}

	text, err := w.CLI("status", "--http-addr", b.Addr)
	if err != nil || !strings.Contains(text, "4 mappings: 4 installed, 0 pending, 0 errors") ||
		!strings.Contains(text, "PROTO") || !strings.Contains(text, "auto: IPv6 host address, IPv4-only container") {
		t.Fatalf("status text: %v\n%s", err, text)
	}

	// No daemon: status still answers from Docker and the kernel. NAT rules
	// stay in place when berth stops; relay rows need the daemon.
	b.Stop()
	text, err = w.CLI("status", "--http-addr", b.Addr)
	if err != nil {
		t.Fatalf("status without daemon: %v\n%s", err, text)
	}
	for _, s := range []string{"no berth daemon answers", "0.0.0.0:27000", "installed", "skipped"} {
		if !strings.Contains(text, s) {
			t.Fatalf("status without daemon lacks %q:\n%s", s, text)
		}
	}

	if out, err := w.CLI("version"); err != nil || !strings.HasPrefix(out, "berth ") {
		t.Fatalf("version: %v %q", err, out)
	}
	if out, err := w.CLI("status", "--output", "yaml"); err == nil || !strings.Contains(out, `--output "yaml": want text or json`) {
		t.Fatalf("bad --output accepted: %v %q", err, out)
	}
}
