package nat

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/forwardtest"
	"github.com/berth-dev/berth/test/netns"
)

// containers makes count synthetic containers' mappings, ports each;
// container(i, n) is container i alone.
func containers(count, ports int) []forward.Mapping {
	return forwardtest.Containers(0, count, ports, 0xc0ffee000000)
}

func container(i, n int) []forward.Mapping {
	return forwardtest.Containers(i, 1, n, 0xc0ffee000000)
}

func requireNetns(b *testing.B) {
	netns.Require(b)
	dummyOnce.Do(func() { makeDummy(b) })
}

func benchTable(b *testing.B) *Table {
	tab, err := New(Options{Flavour: os.Getenv("BERTH_TEST_FLAVOUR")})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tab.Cleanup(context.Background()) })
	return tab
}

// BenchmarkColdInstall is the first Apply of n mappings (10 per container)
// into empty tables, chains and jumps included.
func BenchmarkColdInstall(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			requireNetns(b)
			tab := benchTable(b)
			ms := containers(n/10, 10)
			ctx := context.Background()
			for b.Loop() {
				b.StopTimer()
				if err := tab.Cleanup(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := tab.Apply(ctx, ms, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAt10k measures the steady state with 10,000 mappings installed
// (1,000 containers of 10 ports): a no-op sync (List, then Apply with
// nothing to do) and adding or removing one 10-port container.
func BenchmarkAt10k(b *testing.B) {
	requireNetns(b)
	tab := benchTable(b)
	ctx := context.Background()
	if err := tab.Apply(ctx, containers(1000, 10), nil); err != nil {
		b.Fatal(err)
	}
	extra := container(1000, 10)
	b.Run("noop-list-apply", func(b *testing.B) {
		for b.Loop() {
			ms, err := tab.List(ctx)
			if err != nil || len(ms) != 10000 {
				b.Fatal(len(ms), err)
			}
			if err := tab.Apply(ctx, nil, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("iptables-save", func(b *testing.B) {
		for b.Loop() {
			if _, err := run(ctx, tab.fams[0].t.save, "", "-t", "nat"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("list", func(b *testing.B) {
		for b.Loop() {
			if _, err := tab.List(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("add-container", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			if err := tab.Apply(ctx, nil, extra); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := tab.Apply(ctx, extra, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("remove-container", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			if err := tab.Apply(ctx, extra, nil); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := tab.Apply(ctx, nil, extra); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("check", func(b *testing.B) {
		for b.Loop() {
			if ok, err := tab.Check(ctx); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
}

// BenchmarkParse10k is List's parsing alone, on what iptables-save prints
// for 10,000 mappings.
func BenchmarkParse10k(b *testing.B) {
	tab, f4, _ := offline("", "")
	p := tab.makePlan(f4, containers(1000, 10), nil)
	text := simulate(structureFix(parseSave("", "nat"), natLayout()).String() + p.text)
	b.ResetTimer()
	for b.Loop() {
		st := readState(parseSave(text, "nat"), false)
		if len(st.count) != 10000 {
			b.Fatal(len(st.count))
		}
	}
}
