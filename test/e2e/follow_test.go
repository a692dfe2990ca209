package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
)

// rowKeys renders status rows of one container as "proto host:port->target
// mode state", sorted.
func rowKeys(rows []reconcile.Row, name string) []string {
	var out []string
	for _, r := range rows {
		if r.ContainerName != name {
			continue
		}
		out = append(out, fmt.Sprintf("%s %s:%d->%d %s", r.Proto, r.HostIP, r.HostPort, r.ContainerPort, r.Mode))
	}
	sort.Strings(out)
	return out
}

func countRows(rows []reconcile.Row, name string) int {
	n := 0
	for _, r := range rows {
		if r.ContainerName == name {
			n++
		}
	}
	return n
}

func TestStatusFollowsPublishedPortsAndLabels(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()

	w.RunEcho("pub", "-p", "18080:80", "-p", "127.0.0.1:15432:5432", "-p", "19000-19002:9000-9002/udp", "--", "-tcp", "80,5432", "-udp", "9000-9002")
	w.RunEcho("rand", "--expose", "7000", "-P", "--", "-tcp", "7000")
	w.RunEcho("lbl", "--label", "berth.ports=28080:80,[::]:2053:53/udp,127.0.0.1:25432:5432",
		"--label", "berth.mode=relay", "--", "-tcp", "80,5432", "-udp", "53")
	w.RunEcho("bad", "--label", "berth.ports=70000:80", "--", "-tcp", "80")

	randPort := strings.TrimPrefix(strings.Split(w.MustDocker("port", "rand", "7000/tcp"), "\n")[0], "0.0.0.0:")
	want := map[string][]string{
		"pub": {
			"tcp 0.0.0.0:18080->80 nat", "tcp 127.0.0.1:15432->5432 nat", "tcp :::18080->80 relay",
			"udp 0.0.0.0:19000->9000 nat", "udp 0.0.0.0:19001->9001 nat", "udp 0.0.0.0:19002->9002 nat",
			"udp :::19000->9000 relay", "udp :::19001->9001 relay", "udp :::19002->9002 relay",
		},
		"rand": {"tcp 0.0.0.0:" + randPort + "->7000 nat", "tcp :::" + randPort + "->7000 relay"},
		"lbl":  {"tcp 0.0.0.0:28080->80 relay", "tcp 127.0.0.1:25432->5432 relay", "tcp :::28080->80 relay", "udp :::2053->53 relay"},
	}
	for name := range want {
		sort.Strings(want[name])
	}
	b.EventuallyStatus(t, 5*time.Second, "status shows every mapping", func(rows []reconcile.Row) error {
		for name, keys := range want {
			if got := rowKeys(rows, name); strings.Join(got, "|") != strings.Join(keys, "|") {
				return fmt.Errorf("%s: got %v\nwant %v", name, got, keys)
			}
		}
		for _, r := range rows {
			if r.ContainerName == "bad" {
				if r.State != reconcile.StateError || !strings.Contains(r.Error, "container bad") ||
					!strings.Contains(r.Error, "berth.ports") || !strings.Contains(r.Error, "port 70000 out of range") {
					return fmt.Errorf("bad label row: %+v", r)
				}
				return nil
			}
		}
		return fmt.Errorf("no error row for container bad")
	})

	// The relay side serves for real: [::1] reaches the IPv4-only
	// container, and the label-declared relay mapping answers on IPv4.
	if got, err := harness.WhoTCP("[::1]:18080", 3*time.Second); err != nil || harness.Name(got) != "pub" {
		t.Fatalf("[::1]:18080: %q, %v", got, err)
	}
	if got, err := harness.WhoTCP("127.0.0.1:28080", 3*time.Second); err != nil || harness.Name(got) != "lbl" {
		t.Fatalf("127.0.0.1:28080: %q, %v", got, err)
	}
	if got, err := harness.WhoUDP("[::1]:2053", 3*time.Second); err != nil || harness.Name(got) != "lbl" {
		t.Fatalf("udp [::1]:2053: %q, %v", got, err)
	}

	// Stop and remove: the mappings go.
	w.MustDocker("stop", "-t", "0", "pub")
	w.MustDocker("rm", "-f", "lbl")
	b.EventuallyStatus(t, 5*time.Second, "mappings of stopped and removed containers disappear", func(rows []reconcile.Row) error {
		if n := countRows(rows, "pub") + countRows(rows, "lbl"); n != 0 {
			return fmt.Errorf("%d rows left", n)
		}
		if countRows(rows, "rand") != 2 {
			return fmt.Errorf("rand rows disturbed: %v", rowKeys(rows, "rand"))
		}
		return nil
	})
	if _, err := harness.WhoTCP("127.0.0.1:28080", time.Second); err == nil {
		t.Fatal("relay of a removed container still answers")
	}
}
