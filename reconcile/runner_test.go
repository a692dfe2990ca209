package reconcile

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

type syncRecorder struct {
	n     atomic.Int64
	fail  atomic.Bool
	ran   chan time.Time
	clock *fakeClock
}

func (s *syncRecorder) sync(context.Context) error {
	s.n.Add(1)
	s.ran <- s.clock.Now()
	if s.fail.Load() {
		return errors.New("backend down")
	}
	return nil
}

func startRunner(t *testing.T) (*Runner, *syncRecorder, *fakeClock) {
	clock := newFakeClock()
	rec := &syncRecorder{ran: make(chan time.Time, 1000), clock: clock}
	r := &Runner{Sync: rec.sync, MinInterval: 50 * time.Millisecond, MaxInterval: 30 * time.Second,
		MinBackoff: 100 * time.Millisecond, MaxBackoff: 400 * time.Millisecond, Clock: clock}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Loop(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	<-rec.ran // the first sync runs at once
	return r, rec, clock
}

func TestRunnerCoalescesBurst(t *testing.T) {
	r, rec, clock := startRunner(t)
	clock.BlockUntil(1) // parked on the periodic timer
	for i := 0; i < 100; i++ {
		r.Trigger()
	}
	// The loop wakes and must wait out the minimum interval: one timer.
	clock.BlockUntil(2)
	clock.Advance(50 * time.Millisecond)
	at := <-rec.ran
	if got := at.Sub(time.Unix(1000, 0)); got != 50*time.Millisecond {
		t.Fatalf("second sync at +%v, want +50ms (min interval)", got)
	}
	clock.BlockUntil(2) // parked again on a fresh periodic timer
	if n := rec.n.Load(); n != 2 {
		t.Fatalf("100 triggers gave %d syncs, want 2 (initial + one coalesced)", n)
	}
}

func TestRunnerPeriodicResync(t *testing.T) {
	_, rec, clock := startRunner(t)
	clock.BlockUntil(1)
	clock.Advance(30 * time.Second)
	<-rec.ran
	if n := rec.n.Load(); n != 2 {
		t.Fatalf("after one resync interval: %d syncs, want 2", n)
	}
}

func TestRunnerBacksOffOnFailure(t *testing.T) {
	r, rec, clock := startRunner(t)
	rec.fail.Store(true)
	clock.BlockUntil(1)
	r.Trigger()
	clock.BlockUntil(2)
	clock.Advance(50 * time.Millisecond)
	<-rec.ran // fails
	var delays []time.Duration
	for i := 0; i < 4; i++ {
		clock.BlockUntil(2) // the old periodic timer and the retry timer
		d := clock.LastDelay()
		delays = append(delays, d)
		clock.Advance(d)
		<-rec.ran
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 400 * time.Millisecond}
	for i := range want {
		if delays[i] != want[i] {
			t.Fatalf("retry delays %v, want %v", delays, want)
		}
	}
	// Success resets to the periodic interval.
	rec.fail.Store(false)
	clock.BlockUntil(2)
	clock.Advance(clock.LastDelay())
	<-rec.ran
	clock.BlockUntil(2)
	if d := clock.LastDelay(); d != 30*time.Second {
		t.Fatalf("after success next run in %v, want 30s", d)
	}
}
