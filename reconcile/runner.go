package reconcile

import (
	"context"
	"sync"
	"time"
)

// Clock is the time the Runner sees; tests inject a fake one.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// RealClock is the wall clock.
var RealClock Clock = realClock{}

// Runner calls a sync function when triggered, coalescing any number of
// triggers into one run (a one-slot channel), never more often than
// MinInterval, at least every MaxInterval, and after a failure again with
// exponential backoff from MinBackoff up to MaxBackoff.
type Runner struct {
	Sync        func(ctx context.Context) error
	MinInterval time.Duration
	MaxInterval time.Duration
	MinBackoff  time.Duration
	MaxBackoff  time.Duration
	Clock       Clock

	once    sync.Once
	trigger chan struct{}
}

func (r *Runner) init() {
	r.once.Do(func() {
		r.trigger = make(chan struct{}, 1)
		if r.Clock == nil {
			r.Clock = RealClock
		}
		if r.MaxInterval <= 0 {
			r.MaxInterval = 30 * time.Second
		}
		if r.MinBackoff <= 0 {
			r.MinBackoff = 100 * time.Millisecond
		}
		if r.MaxBackoff <= 0 {
			r.MaxBackoff = 30 * time.Second
		}
	})
}

// Trigger asks for a sync soon. It never blocks.
func (r *Runner) Trigger() {
	r.init()
	select {
	case r.trigger <- struct{}{}:
	default:
	}
}

// Loop runs syncs until ctx ends. The first sync runs at once.
func (r *Runner) Loop(ctx context.Context) {
	r.init()
	var last time.Time
	backoff := time.Duration(0)
	wait := time.Duration(0)
	for {
		if wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.trigger:
			case <-r.Clock.After(wait):
			}
		}
		if !last.IsZero() {
			if gap := r.MinInterval - r.Clock.Now().Sub(last); gap > 0 {
				select {
				case <-ctx.Done():
					return
				case <-r.Clock.After(gap):
				}
			}
		}
		// Triggers that arrived until now are served by this run.
		select {
		case <-r.trigger:
		default:
		}
		last = r.Clock.Now()
		if err := r.Sync(ctx); err != nil && ctx.Err() == nil {
			backoff = min(max(2*backoff, r.MinBackoff), r.MaxBackoff)
			wait = backoff
		} else {
			backoff = 0
			wait = r.MaxInterval
		}
		if ctx.Err() != nil {
			return
		}
	}
}
