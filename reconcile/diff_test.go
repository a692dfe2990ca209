package reconcile

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/watcher"
)

func mp(proto forward.Proto, host string, hport uint16, cip string, cport uint16, id string) forward.Mapping {
	return forward.Mapping{
		Key:         forward.Key{Proto: proto, HostIP: netip.MustParseAddr(host), HostPort: hport},
		ContainerIP: netip.MustParseAddr(cip), ContainerPort: cport, ContainerID: id, Mode: forward.ModeNAT,
	}
}

func TestDiff(t *testing.T) {
	a := mp("tcp", "0.0.0.0", 8080, "172.17.0.2", 80, "aaa")
	a2 := mp("tcp", "0.0.0.0", 8080, "172.17.0.3", 80, "bbb") // same key, new container
	b := mp("udp", "0.0.0.0", 53, "172.17.0.2", 53, "aaa")
	c := mp("tcp", "127.0.0.1", 5432, "172.17.0.4", 5432, "ccc")
	relayA := a
	relayA.Mode = forward.ModeRelay
	cases := []struct {
		name             string
		desired, actual  []forward.Mapping
		wantAdd, wantRem []forward.Mapping
	}{
		{name: "both empty"},
		{name: "cold install", desired: []forward.Mapping{b, a}, wantAdd: []forward.Mapping{a, b}},
		{name: "in step", desired: []forward.Mapping{a, b}, actual: []forward.Mapping{b, a}},
		{name: "remove stale", desired: []forward.Mapping{a}, actual: []forward.Mapping{a, b}, wantRem: []forward.Mapping{b}},
		{name: "remove all", actual: []forward.Mapping{a, b}, wantRem: []forward.Mapping{a, b}},
		{name: "change container behind key", desired: []forward.Mapping{a2}, actual: []forward.Mapping{a}, wantAdd: []forward.Mapping{a2}, wantRem: []forward.Mapping{a}},
		{name: "duplicate installed", desired: []forward.Mapping{a}, actual: []forward.Mapping{a, a, a}, wantRem: []forward.Mapping{a, a}},
		{name: "duplicate desired", desired: []forward.Mapping{a, a}, wantAdd: []forward.Mapping{a}},
		{name: "mode change is a change", desired: []forward.Mapping{relayA}, actual: []forward.Mapping{a}, wantAdd: []forward.Mapping{relayA}, wantRem: []forward.Mapping{a}},
		{name: "mixed", desired: []forward.Mapping{a2, c}, actual: []forward.Mapping{a, b, c}, wantAdd: []forward.Mapping{a2}, wantRem: []forward.Mapping{a, b}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := Diff(tc.desired, tc.actual)
			if !reflect.DeepEqual(p.Add, tc.wantAdd) || !reflect.DeepEqual(p.Remove, tc.wantRem) {
				t.Fatalf("Diff:\n add    %v\n remove %v\nwant\n add    %v\n remove %v", p.Add, p.Remove, tc.wantAdd, tc.wantRem)
			}
			if p.Empty() != (len(tc.wantAdd)+len(tc.wantRem) == 0) {
				t.Fatalf("Empty() = %v", p.Empty())
			}
		})
	}
}

func key(proto forward.Proto, ip string, port uint16) forward.Key {
	return forward.Key{Proto: proto, HostIP: netip.MustParseAddr(ip), HostPort: port}
}

func ctr(id, name string, start int, v4, v6 string, wants ...watcher.Want) watcher.Container {
	c := watcher.Container{ID: id, Name: name, Started: time.Unix(int64(start), 0), Network: "bridge", Wants: wants}
	if v4 != "" {
		c.IPv4 = netip.MustParseAddr(v4)
	}
	if v6 != "" {
		c.IPv6 = netip.MustParseAddr(v6)
	}
	return c
}

func want(k forward.Key, cport uint16, mode forward.Mode) watcher.Want {
	return watcher.Want{Key: k, ContainerPort: cport, Mode: mode, Source: watcher.SourcePublish}
}

func TestResolve(t *testing.T) {
	auto, nat, relay := forward.ModeAuto, forward.ModeNAT, forward.ModeRelay
	type row struct {
		mode   forward.Mode
		target string // container ip:port
		err    string // substring
	}
	cases := []struct {
		name string
		in   []watcher.Container
		want []row
	}{
		{"auto v4 is nat", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "", want(key("tcp", "0.0.0.0", 80), 8080, auto))},
			[]row{{nat, "172.17.0.2:8080", ""}}},
		{"auto v6 to v4-only is relay", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "", want(key("tcp", "::", 80), 80, auto))},
			[]row{{relay, "172.17.0.2:80", ""}}},
		{"auto v6 to dual-stack is nat", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "fd00::2", want(key("tcp", "::", 80), 80, auto))},
			[]row{{nat, "[fd00::2]:80", ""}}},
		{"nat v6 to v4-only fails", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "", want(key("tcp", "::", 80), 80, nat))},
			[]row{{nat, "", "no IPv6 address on network bridge: nat cannot forward tcp [::]:80"}}},
		{"auto ::1 is relay even to dual-stack", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "fd00::2", want(key("tcp", "::1", 80), 80, auto))},
			[]row{{relay, "[fd00::2]:80", ""}}},
		{"nat ::1 fails", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "fd00::2", want(key("tcp", "::1", 80), 80, nat))},
			[]row{{nat, "", "kernel does not route ::1"}}},
		{"relay stays relay", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "", want(key("udp", "0.0.0.0", 53), 53, relay))},
			[]row{{relay, "172.17.0.2:53", ""}}},
		{"sctp relay fails", []watcher.Container{ctr("a", "web", 1, "172.17.0.2", "", want(key("sctp", "0.0.0.0", 9), 9, relay))},
			[]row{{relay, "", "sctp is served by nat only"}}},
		{"no ip", []watcher.Container{ctr("a", "web", 1, "", "", want(key("tcp", "0.0.0.0", 80), 80, auto))},
			[]row{{auto, "", "no IPv4 address"}}},
		{"earlier container keeps port", []watcher.Container{
			ctr("a", "first", 1, "172.17.0.2", "", want(key("tcp", "0.0.0.0", 80), 80, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("tcp", "0.0.0.0", 80), 80, auto))},
			[]row{{nat, "172.17.0.2:80", ""}, {nat, "172.17.0.3:80", "tcp 0.0.0.0:80 is already forwarded to container first (a)"}}},
		{"wildcard overlaps specific", []watcher.Container{
			ctr("a", "first", 1, "172.17.0.2", "", want(key("tcp", "127.0.0.1", 80), 80, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("tcp", "0.0.0.0", 80), 80, auto))},
			[]row{{nat, "172.17.0.2:80", ""}, {nat, "", "already forwarded to container first"}}},
		{"different addresses coexist", []watcher.Container{
			ctr("a", "first", 1, "172.17.0.2", "", want(key("tcp", "127.0.0.1", 80), 80, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("tcp", "127.0.0.2", 80), 80, auto))},
			[]row{{nat, "172.17.0.2:80", ""}, {nat, "172.17.0.3:80", ""}}},
		{"families do not clash", []watcher.Container{
			ctr("a", "first", 1, "172.17.0.2", "", want(key("tcp", "0.0.0.0", 80), 80, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("tcp", "::", 80), 80, auto))},
			[]row{{nat, "172.17.0.2:80", ""}, {relay, "172.17.0.3:80", ""}}},
		{"protocols do not clash", []watcher.Container{
			ctr("a", "first", 1, "172.17.0.2", "", want(key("tcp", "0.0.0.0", 53), 53, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("udp", "0.0.0.0", 53), 53, auto))},
			[]row{{nat, "172.17.0.2:53", ""}, {nat, "172.17.0.3:53", ""}}},
		{"failed mapping claims nothing", []watcher.Container{
			ctr("a", "first", 1, "", "", want(key("tcp", "0.0.0.0", 80), 80, auto)),
			ctr("b", "second", 2, "172.17.0.3", "", want(key("tcp", "0.0.0.0", 80), 80, auto))},
			[]row{{auto, "", "no IPv4"}, {nat, "172.17.0.3:80", ""}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Resolve(tc.in)
			if len(got) != len(tc.want) {
				t.Fatalf("Resolve gave %d rows, want %d: %+v", len(got), len(tc.want), got)
			}
			for i, w := range tc.want {
				g := got[i]
				if g.Mapping.Mode != w.mode {
					t.Errorf("row %d mode %s, want %s", i, g.Mapping.Mode, w.mode)
				}
				if w.err != "" {
					if !strings.Contains(g.Err, w.err) {
						t.Errorf("row %d err %q, want %q", i, g.Err, w.err)
					}
					continue
				}
				if g.Err != "" || g.Mapping.Target().String() != w.target {
					t.Errorf("row %d: target %s err %q, want %s", i, g.Mapping.Target(), g.Err, w.target)
				}
			}
		})
	}
}

func TestResolveContainerErrorsNameContainer(t *testing.T) {
	c := ctr("3f2a9c0d1e2b", "web", 1, "172.17.0.2", "")
	c.Errors = []string{`label berth.ports: "0:80": host port: port 0 out of range 1-65535`}
	got := Resolve([]watcher.Container{c})
	if len(got) != 1 || !strings.Contains(got[0].Err, "container web (3f2a9c0d1e2b): label berth.ports") {
		t.Fatalf("got %+v", got)
	}
}
