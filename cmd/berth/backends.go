package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/forward/dockerfwd"
	"github.com/berth-dev/berth/forward/relay"
	"github.com/berth-dev/berth/forward/sockets"
	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/watcher"
	"github.com/docker/docker/client"
	"github.com/sirupsen/logrus"
	"github.com/spf13/pflag"
)

// backendFlags configure the watcher and both backends; run, reconcile and
// status share them so all three see the same desired state.
type backendFlags struct {
	mode           string
	resync         time.Duration
	minSync        time.Duration
	masquerade     string
	iptables       string
	ipv6           bool
	canary         time.Duration
	udpIdle        time.Duration
	udpMaxFlows    int
	tcpMaxConns    int
	dialTimeout    time.Duration
	drain          time.Duration
	conntrackFlush bool
}

func (b *backendFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&b.mode, "mode", "auto", "default mode for mappings without a berth.mode label: nat, relay or auto (nat where the kernel can serve, relay where it cannot)")
	fs.DurationVar(&b.resync, "resync-interval", 30*time.Second, "full relist of Docker and resync of every backend")
	fs.DurationVar(&b.minSync, "min-sync-interval", 50*time.Millisecond, "least time between two syncs; events in between are coalesced")
	fs.StringVar(&b.masquerade, "masquerade", "auto", "egress MASQUERADE for Docker bridge subnets: auto (when dockerd does not NAT them), on or off")
	fs.StringVar(&b.iptables, "iptables", "auto", "iptables flavour: auto (the one dockerd and the host use), nft or legacy")
	fs.BoolVar(&b.ipv6, "ipv6", true, "also manage ip6tables rules for IPv6 mappings")
	fs.DurationVar(&b.canary, "canary-interval", 5*time.Second, "how often to check that berth's NAT chains are still in the kernel")
	fs.DurationVar(&b.udpIdle, "udp-idle-timeout", 90*time.Second, "relay: end a UDP flow after this long without traffic")
	fs.IntVar(&b.udpMaxFlows, "udp-max-flows", 4096, "relay: UDP flows per mapping; datagrams of further clients are dropped and counted")
	fs.IntVar(&b.tcpMaxConns, "tcp-max-conns", 4096, "relay: open TCP connections per mapping; further ones are refused and counted")
	fs.DurationVar(&b.dialTimeout, "dial-timeout", 5*time.Second, "relay: time to connect to the container")
	fs.DurationVar(&b.drain, "drain", 0, "relay: how long open connections live on after their mapping is removed (0: closed at once)")
	fs.BoolVar(&b.conntrackFlush, "conntrack-flush", true, "nat: delete conntrack entries of a UDP mapping that changed, so old flows do not stick to the old container")
}

func dockerClient(host string) (*client.Client, error) {
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if host != "" {
		opts = append(opts, client.WithHost(host))
	}
	c, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return c, nil
}

func (b *backendFlags) newWatcher(cli watcher.Docker, onChange func(), onNotice func(watcher.Notice)) (*watcher.Watcher, error) {
	mode, err := forward.ParseMode(b.mode)
	if err != nil {
		return nil, fmt.Errorf("--mode: %w", err)
	}
	return watcher.New(cli, watcher.Options{DefaultMode: mode, ResyncInterval: b.resync,
		OnChange: onChange, OnNotice: onNotice}), nil
}

// backends is what a command has to forward with.
type backends struct {
	nat   natBackend // nil when unavailable
	relay *relay.Relay
	opts  reconcile.Options
	info  []string // the status summary's lines: the backends' facts, then dockerd's
	// dockerInfo computes dockerd's lines afresh (its flags, what it
	// forwards itself); nil for a one-shot command.
	natInfo    []string
	dockerInfo func(context.Context) []string
}

// natBackend is the NAT table as the command uses it beyond Forwarder.
type natBackend interface {
	forward.Forwarder
	Flavour() string
	Check(ctx context.Context) (bool, error)
	Ensure(ctx context.Context) error
	Cleanup(ctx context.Context) error
}

// build makes the backends. withRelay is false for one-shot commands: a
// relay lives only as long as the process that runs it.
func (b *backendFlags) build(log logrus.FieldLogger, withRelay bool) (*backends, error) {
	out := &backends{opts: reconcile.Options{Log: log, Disabled: map[forward.Mode]string{},
		HostConflicts: hostConflicts}}
	nat, info, err := b.newNAT()
	if err != nil {
		out.opts.Disabled[forward.ModeNAT] = "nat backend unavailable: " + err.Error()
		log.WithError(err).Warn("nat backend unavailable; nat mappings will show as errors")
	} else {
		out.nat = nat
		out.opts.NAT = nat
		out.opts.BeforeSync = b.beforeSync(nat)
	}
	out.natInfo = info
	out.info = append(out.info, info...)
	out.info = append(out.info, dockerCoexistence(out)...)
	if withRelay {
		out.relay = relay.New(relay.Options{DialTimeout: b.dialTimeout, UDPIdleTimeout: b.udpIdle,
			MaxUDPFlows: b.udpMaxFlows, MaxConns: b.tcpMaxConns, Drain: b.drain})
		out.opts.Relay = out.relay
	} else {
		out.opts.Disabled[forward.ModeRelay] = "relay mappings are served by the berth daemon (berth run), not by a one-shot command"
	}
	return out, nil
}

// dockerCoexistence makes berth leave alone the ports dockerd forwards
// itself (its DNAT rules, docker-proxy): they show as state docker. It
// returns the summary lines (dockerd's configuration as found, what berth
// will and will not do, the daemon.json for full ownership) that
// `berth status` shows and the daemon's "berth started" line logs.
func dockerCoexistence(out *backends) []string {
	det := dockerfwd.New(dockerfwd.Options{})
	out.opts.DockerForwards = det.Forwards
	out.dockerInfo = func(ctx context.Context) []string {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cfg, cerr := dockerfwd.DetectConfig(ctx)
		return dockerfwd.Describe(cfg, cerr, det.Refresh(ctx))
	}
	return out.dockerInfo(context.Background())
}

// hostConflicts refuses NAT mappings over a port a host process (not
// dockerd, not berth) listens on: a DNAT would silently hide it.
func hostConflicts(ms []forward.Mapping) map[forward.Mapping]error {
	all, err := sockets.Listening()
	if err != nil || len(all) == 0 {
		return nil
	}
	type slot struct {
		proto forward.Proto
		port  uint16
	}
	byPort := map[slot][]sockets.Socket{}
	for _, s := range all {
		k := slot{s.Proto, s.Addr.Port()}
		byPort[k] = append(byPort[k], s)
	}
	hits := map[forward.Mapping][]sockets.Socket{}
	var inodes []uint64
	for _, m := range ms {
		if m.Mode != forward.ModeNAT {
			continue
		}
		cands := byPort[slot{m.Proto, m.HostPort}]
		if len(cands) == 0 {
			continue
		}
		if c := sockets.Conflicting(cands, m.Proto, m.HostIP, m.HostPort); len(c) > 0 {
			hits[m] = c
			for _, s := range c {
				inodes = append(inodes, s.Inode)
			}
		}
	}
	if len(hits) == 0 {
		return nil
	}
	owners := sockets.Owners(inodes)
	self := os.Getpid()
	out := map[forward.Mapping]error{}
	for m, socks := range hits {
		for _, s := range socks {
			o, known := owners[s.Inode]
			if known && (o.Pid == self || o.Comm == "dockerd" || o.Comm == "docker-proxy") {
				continue // dockerd's reservation of a port it publishes, or our relay
			}
			who := "a process berth cannot see (another pid namespace?)"
			if known {
				who = o.String()
			}
			out[m] = fmt.Errorf("%s is in use by %s on %s; refusing to hide it behind a DNAT", m.Key, who, s.Addr)
			break
		}
	}
	return out
}
