package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/forward/nat"
	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/watcher"
)

// newNAT builds the NAT table and says which iptables flavour it uses.
func (b *backendFlags) newNAT() (natBackend, []string, error) {
	switch b.masquerade {
	case "auto", "on", "off":
	default:
		return nil, nil, fmt.Errorf("--masquerade %q: want auto, on or off", b.masquerade)
	}
	t, err := nat.New(nat.Options{Flavour: b.iptables, IPv6: b.ipv6,
		Masquerade: b.masquerade != "off", NoConntrackFlush: !b.conntrackFlush})
	if err != nil {
		return nil, nil, err
	}
	how := "detected"
	if b.iptables != "auto" && b.iptables != "" {
		how = "from --iptables"
	}
	info := []string{fmt.Sprintf("nat: iptables flavour %s (%s); egress masquerade %s; ipv6 %v", t.Flavour(), how, b.masquerade, b.ipv6)}
	return t, info, nil
}

// beforeSync hands the NAT table the bridges that need berth's egress
// MASQUERADE: all of them with --masquerade=on, and with auto those for
// which dockerd has no MASQUERADE rule of its own (it runs with
// --iptables=false).
func (b *backendFlags) beforeSync(n natBackend) func(context.Context, []watcher.Bridge) error {
	t, ok := n.(*nat.Table)
	if !ok || b.masquerade == "off" {
		return nil
	}
	var mu sync.Mutex
	var lastKey string
	var lastCheck time.Time
	return func(ctx context.Context, bridges []watcher.Bridge) error {
		mu.Lock()
		defer mu.Unlock()
		key := fmt.Sprint(bridges)
		if key == lastKey && time.Since(lastCheck) < b.resync {
			return nil
		}
		var out []nat.Bridge
		for _, br := range bridges {
			nb := nat.Bridge{Name: br.Iface}
			for _, s := range br.Subnets {
				if !s.Addr().Is4() {
					continue // dockerd does not NAT IPv6 bridges by default either
				}
				if b.masquerade == "auto" && dockerMasquerades(ctx, t.Flavour(), br.Iface, s.String()) {
					continue
				}
				nb.Subnets = append(nb.Subnets, s)
			}
			if len(nb.Subnets) > 0 {
				out = append(out, nb)
			}
		}
		t.SetBridges(out)
		lastKey, lastCheck = key, time.Now()
		return nil
	}
}

// dockerMasquerades reports whether dockerd NATs a bridge subnet's egress
// itself: its rule in POSTROUTING (--iptables=true), or a masquerade for
// the subnet in its nftables table (Docker 29 --firewall-backend=nftables).
func dockerMasquerades(ctx context.Context, flavour, iface, subnet string) bool {
	bin := "iptables-" + flavour
	if _, err := exec.LookPath(bin); err != nil {
		bin = "iptables"
	}
	err := exec.CommandContext(ctx, bin, "-w", "-t", "nat", "-C", "POSTROUTING",
		"-s", subnet, "!", "-o", iface, "-j", "MASQUERADE").Run()
	if err == nil {
		return true
	}
	out, err := exec.CommandContext(ctx, "nft", "list", "table", "ip", "docker-bridges").Output()
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "masquerade") && strings.Contains(l, subnet) {
			return true
		}
	}
	return false
}

// natRules is the dry-run text of a plan.
func natRules(ctx context.Context, n natBackend, p reconcile.Plan) string {
	t, ok := n.(*nat.Table)
	if !ok {
		return ""
	}
	s, err := t.Rules(ctx, p.Add, p.Remove)
	if err != nil {
		return "cannot render rules: " + err.Error() + "\n"
	}
	return strings.TrimRight(s, "\n") + "\n"
}
