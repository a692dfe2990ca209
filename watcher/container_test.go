package watcher

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/berth-dev/berth/forward"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/go-connections/nat"
)

type fakeCtr struct {
	labels  map[string]string
	asked   nat.PortMap
	did     nat.PortMap
	nets    map[string][2]string // name -> ipv4, ipv6
	netMode string
}

func (f fakeCtr) inspect() container.InspectResponse {
	nets := map[string]*network.EndpointSettings{}
	for n, ips := range f.nets {
		nets[n] = &network.EndpointSettings{IPAddress: ips[0], GlobalIPv6Address: ips[1]}
	}
	mode := f.netMode
	if mode == "" {
		mode = "default"
	}
	return container.InspectResponse{
		ContainerJSONBase: &container.ContainerJSONBase{
			ID: "3f2a9c0d1e2b99999999", Name: "/web",
			State:      &container.State{Running: true, StartedAt: "2026-11-25T10:00:00.5Z"},
			HostConfig: &container.HostConfig{PortBindings: f.asked, NetworkMode: container.NetworkMode(mode)},
		},
		Config:          &container.Config{Labels: f.labels},
		NetworkSettings: &container.NetworkSettings{NetworkSettingsBase: container.NetworkSettingsBase{Ports: f.did}, Networks: nets},
	}
}

func pb(ip, port string) nat.PortBinding { return nat.PortBinding{HostIP: ip, HostPort: port} }

func wantsOf(c Container) []string {
	var out []string
	for _, w := range c.Wants {
		out = append(out, fmt.Sprintf("%s->%d %s %s", w.Key, w.ContainerPort, w.Mode, w.Source))
	}
	sort.Strings(out)
	return out
}

func TestFromInspect(t *testing.T) {
	bridge := map[string][2]string{"bridge": {"172.17.0.2", ""}}
	cases := []struct {
		name   string
		c      fakeCtr
		want   []string
		errs   []string
		ip4    string
		ip6    string
		netSel string
	}{
		{name: "p 8080:80 empty HostIp is both families", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"80/tcp": {pb("", "8080")}},
			did:   nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}}},
			want: []string{"tcp 0.0.0.0:8080->80 auto publish", "tcp [::]:8080->80 auto publish"}, ip4: "172.17.0.2"},
		{name: "docker 29 with proxy lists both families once each", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"80/tcp": {pb("", "8080")}},
			did:   nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080"), pb("::", "8080")}}},
			want: []string{"tcp 0.0.0.0:8080->80 auto publish", "tcp [::]:8080->80 auto publish"}},
		{name: "explicit 0.0.0.0 is IPv4 only", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}},
			did:   nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}}},
			want: []string{"tcp 0.0.0.0:8080->80 auto publish"}},
		{name: "host ip bound", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"5432/tcp": {pb("127.0.0.1", "5432")}},
			did:   nat.PortMap{"5432/tcp": {pb("127.0.0.1", "5432")}}},
			want: []string{"tcp 127.0.0.1:5432->5432 auto publish"}},
		{name: "ipv6 host ip", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"53/udp": {pb("::1", "5353")}},
			did:   nat.PortMap{"53/udp": {pb("::1", "5353")}}},
			want: []string{"udp [::1]:5353->53 auto publish"}},
		{name: "P random port read from NetworkSettings", c: fakeCtr{nets: bridge,
			did: nat.PortMap{"7000/tcp": {pb("0.0.0.0", "32768")}}},
			want: []string{"tcp 0.0.0.0:32768->7000 auto publish", "tcp [::]:32768->7000 auto publish"}},
		{name: "sctp", c: fakeCtr{nets: bridge,
			asked: nat.PortMap{"9/sctp": {pb("", "9")}}, did: nat.PortMap{"9/sctp": {pb("0.0.0.0", "9")}}},
			want: []string{"sctp 0.0.0.0:9->9 auto publish", "sctp [::]:9->9 auto publish"}},
		{name: "exposed but not published", c: fakeCtr{nets: bridge, did: nat.PortMap{"80/tcp": nil}}},
		{name: "stopped container has no ports", c: fakeCtr{nets: bridge, asked: nat.PortMap{"80/tcp": {pb("", "8080")}}}},
		{name: "labels and mode", c: fakeCtr{nets: bridge, labels: map[string]string{
			"berth.ports": "8080:80,[::]:53:53/udp", "berth.mode": "relay"}},
			want: []string{"tcp 0.0.0.0:8080->80 relay label", "tcp [::]:8080->80 relay label", "udp [::]:53->53 relay label"}},
		{name: "publish wins over the same label key", c: fakeCtr{nets: bridge,
			labels: map[string]string{"berth.ports": "8080:81"},
			asked:  nat.PortMap{"80/tcp": {pb("", "8080")}}, did: nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}}},
			want: []string{"tcp 0.0.0.0:8080->80 auto publish", "tcp [::]:8080->80 auto publish"},
			errs: []string{"label berth.ports: tcp 0.0.0.0:8080 is claimed by the label and by docker -p", "tcp [::]:8080 is claimed by the label and by docker -p"}},
		{name: "same key twice in a label", c: fakeCtr{nets: bridge, labels: map[string]string{"berth.ports": "8080:80,0.0.0.0:8080:81"}},
			want: []string{"tcp 0.0.0.0:8080->80 auto label", "tcp [::]:8080->80 auto label"},
			errs: []string{"label berth.ports: tcp 0.0.0.0:8080 is claimed twice in the label"}},
		{name: "bad ports label keeps published ports", c: fakeCtr{nets: bridge,
			labels: map[string]string{"berth.ports": "9000-9010:9000-9005"},
			asked:  nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}}, did: nat.PortMap{"80/tcp": {pb("0.0.0.0", "8080")}}},
			want: []string{"tcp 0.0.0.0:8080->80 auto publish"},
			errs: []string{`label berth.ports: "9000-9010:9000-9005": host range 9000-9010 has 11 ports, container range 9000-9005 has 6`}},
		{name: "bad mode label", c: fakeCtr{nets: bridge, labels: map[string]string{"berth.mode": "fast"}},
			errs: []string{`label berth.mode: unknown mode "fast"`}},
		{name: "proxy protocol with nat mode", c: fakeCtr{nets: bridge, labels: map[string]string{"berth.mode": "nat", "berth.proxy-protocol": "v2"}},
			errs: []string{"label berth.proxy-protocol: PROXY protocol needs relay mode"}},
		{name: "proxy protocol unknown", c: fakeCtr{nets: bridge, labels: map[string]string{"berth.proxy-protocol": "v1"}},
			errs: []string{`label berth.proxy-protocol: unknown value "v1"`}},
		{name: "network label picks network", netSel: "back", ip4: "10.9.0.5", ip6: "fd00::5",
			c: fakeCtr{nets: map[string][2]string{"bridge": {"172.17.0.2", ""}, "back": {"10.9.0.5", "fd00::5"}},
				labels: map[string]string{"berth.network": "back"}}},
		{name: "network label unknown", netSel: "bridge", ip4: "172.17.0.2",
			c:    fakeCtr{nets: bridge, labels: map[string]string{"berth.network": "nope"}},
			errs: []string{`label berth.network: container is not on network "nope"`}},
		{name: "user network mode", netSel: "app", ip4: "10.1.0.2",
			c: fakeCtr{netMode: "app", nets: map[string][2]string{"app": {"10.1.0.2", ""}, "zzz": {"10.2.0.2", ""}}}},
		{name: "no ip on network", c: fakeCtr{nets: map[string][2]string{"bridge": {"", ""}},
			labels: map[string]string{"berth.ports": "8080:80"}},
			want: []string{"tcp 0.0.0.0:8080->80 auto label", "tcp [::]:8080->80 auto label"},
			errs: []string{"network bridge: container has no IP address"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := FromInspect(tc.c.inspect(), forward.ModeAuto)
			if c.ID != "3f2a9c0d1e2b" || c.Name != "web" || c.Started.IsZero() {
				t.Fatalf("identity: %+v", c)
			}
			if got := strings.Join(wantsOf(c), "|"); got != strings.Join(tc.want, "|") {
				t.Errorf("wants:\n got  %v\n want %v", wantsOf(c), tc.want)
			}
			if strings.Join(c.Errors, "|") != strings.Join(tc.errs, "|") {
				var ok = len(c.Errors) == len(tc.errs)
				for i := range tc.errs {
					ok = ok && strings.Contains(c.Errors[i], tc.errs[i])
				}
				if !ok {
					t.Errorf("errors:\n got  %q\n want %q", c.Errors, tc.errs)
				}
			}
			if tc.netSel != "" && c.Network != tc.netSel {
				t.Errorf("network %q, want %q", c.Network, tc.netSel)
			}
			if tc.ip4 != "" && c.IPv4.String() != tc.ip4 {
				t.Errorf("ipv4 %v, want %s", c.IPv4, tc.ip4)
			}
			if tc.ip6 != "" && c.IPv6.String() != tc.ip6 {
				t.Errorf("ipv6 %v, want %s", c.IPv6, tc.ip6)
			}
		})
	}
}
