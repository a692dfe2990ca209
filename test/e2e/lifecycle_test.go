package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
)

func installed(rows []reconcile.Row, name string) int {
	n := 0
	for _, r := range rows {
		if r.ContainerName == name && r.State == reconcile.StateInstalled {
			n++
		}
	}
	return n
}

// A container with 300 published ports shows up (both families: 600
// mappings) right after its start, and leaves right after its removal.
func TestThreeHundredPortsFollowStartAndRemove(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	w.MustDocker("create", "--name", "big", "-e", "NAME=big", "-p", "21000-21299:21000-21299", harness.ImageEcho, "-tcp", "21000-21299")
	start := time.Now()
	w.MustDocker("start", "big")
	started := time.Since(start)
	took := b.EventuallyStatus(t, 10*time.Second, "600 mappings installed", func(rows []reconcile.Row) error {
		if n := installed(rows, "big"); n != 600 {
			return fmt.Errorf("%d of 600 installed", n)
		}
		return nil
	})
	t.Logf("300-port container: docker start took %v; all 600 mappings installed %v after docker start returned", started.Round(time.Millisecond), took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("mappings took %v after start; target is 1s (3s allowed for a loaded CI host)", took)
	}

	start = time.Now()
	w.MustDocker("rm", "-f", "big")
	removed := time.Since(start)
	took = b.EventuallyStatus(t, 10*time.Second, "mappings removed", func(rows []reconcile.Row) error {
		if n := countRows(rows, "big"); n != 0 {
			return fmt.Errorf("%d rows left", n)
		}
		return nil
	})
	t.Logf("docker rm took %v; status empty %v after it returned", removed.Round(time.Millisecond), took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("removal took %v to show; target 1s", took)
	}
}

// A burst of 50 container starts is served by a handful of syncs, not 50.
func TestBurstOfStartsCoalesces(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	const n = 50
	var cwg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for i := 0; i < n; i++ {
		cwg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; cwg.Done() }()
			if _, err := w.Docker("create", "--name", fmt.Sprintf("burst%02d", i), "-e", "NAME=x",
				"--label", fmt.Sprintf("berth.ports=%d:80", 22000+i), "--label", "berth.mode=relay", harness.ImageEcho, "-tcp", "80"); err != nil {
				t.Error(err)
			}
		}()
	}
	cwg.Wait()
	before, err := b.Summary()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := w.Docker("start", fmt.Sprintf("burst%02d", i)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	startsTook := time.Since(start)
	b.EventuallyStatus(t, 10*time.Second, "all 100 mappings installed", func(rows []reconcile.Row) error {
		got := 0
		for _, r := range rows {
			if strings.HasPrefix(r.ContainerName, "burst") && r.State == reconcile.StateInstalled {
				got++
			}
		}
		if got != 2*n {
			return fmt.Errorf("%d of %d installed", got, 2*n)
		}
		return nil
	})
	after, err := b.Summary()
	if err != nil {
		t.Fatal(err)
	}
	syncs := after.Syncs - before.Syncs
	t.Logf("50 parallel starts took %v and caused %d syncs", startsTook.Round(time.Millisecond), syncs)
	if syncs >= 10 {
		t.Fatalf("a burst of 50 starts caused %d syncs, want fewer than 10", syncs)
	}
}

// Killing dockerd: berth notices, keeps what is installed, reconnects when
// dockerd is back, relists, and follows what really came back.
func TestDockerdRestartRelists(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	w.RunEcho("stays", "--restart=always", "--label", "berth.ports=23000:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	w.RunEcho("goes", "--label", "berth.ports=23001:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	b.EventuallyStatus(t, 5*time.Second, "both installed", func(rows []reconcile.Row) error {
		if installed(rows, "stays") != 2 || installed(rows, "goes") != 2 {
			return fmt.Errorf("rows %v", rows)
		}
		return nil
	})
	w.StopDockerd()
	harness.Eventually(t, 5*time.Second, "loss seen", func() error {
		s, err := b.Summary()
		if err != nil {
			return err
		}
		if s.DockerConnected {
			return fmt.Errorf("still connected")
		}
		return nil
	})
	// dockerd stops its containers when it stops (no live-restore), so
	// berth may have removed their mappings; it must still be running.
	if !b.Running() {
		t.Fatal("berth exited when dockerd went away")
	}
	w.StartDockerd()
	took := b.EventuallyStatus(t, 10*time.Second, "status matches containers after restart", func(rows []reconcile.Row) error {
		s, _ := b.Summary()
		if !s.DockerConnected {
			return fmt.Errorf("not reconnected")
		}
		if installed(rows, "stays") != 2 || countRows(rows, "goes") != 0 {
			return fmt.Errorf("stays %d installed, goes %d rows", installed(rows, "stays"), countRows(rows, "goes"))
		}
		ip := w.ContainerIP("stays")
		for _, r := range rows {
			if r.ContainerName == "stays" && r.ContainerIP != ip {
				return fmt.Errorf("stays forwards to %s, container is at %s", r.ContainerIP, ip)
			}
		}
		return nil
	})
	t.Logf("berth in step %v after dockerd answered again", took.Round(time.Millisecond))
	if got, err := harness.WhoTCP("127.0.0.1:23000", 3*time.Second); err != nil || harness.Name(got) != "stays" {
		t.Fatalf("127.0.0.1:23000 after restart: %q %v", got, err)
	}
	if !strings.Contains(readFile(b.Log), "docker event stream lost") {
		t.Fatal("berth did not log the loss")
	}
}

// TestDockerdRestartRedescribes: dockerd restarted with other flags; the
// status summary's dockerd lines follow, and berth logs the change.
func TestDockerdRestartRedescribes(t *testing.T) {
	harness.Require(t)
	// dockerd with --iptables writes rules it does not remove when it
	// stops; put the namespace's rules back after the world's teardown.
	t.Cleanup(saveNetnsRules(t))
	w := harness.Start(t, harness.Options{})
	b := w.StartBerth()
	dockerd := func() string {
		s, err := b.Summary()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range s.Info {
			if strings.HasPrefix(l, "dockerd:") {
				return l
			}
		}
		t.Fatalf("no dockerd line in the summary: %q", s.Info)
		return ""
	}
	before := dockerd()
	if !strings.Contains(before, "iptables off") {
		t.Fatalf("dockerd line before: %q, want iptables off", before)
	}
	w.StopDockerd()
	w.Reconfigure(harness.Options{IPTables: true})
	w.StartDockerd()
	harness.Eventually(t, 15*time.Second, "the summary to show dockerd's new flags", func() error {
		if l := dockerd(); !strings.Contains(l, "iptables on") {
			return fmt.Errorf("dockerd line %q", l)
		}
		return nil
	})
	if !strings.Contains(readFile(b.Log), "dockerd is back with another configuration") {
		t.Fatal("berth did not log the new configuration")
	}
}
