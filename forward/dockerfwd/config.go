package dockerfwd

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Config is dockerd's forwarding configuration: its flags, then its
// daemon.json, then the defaults of its version.
type Config struct {
	Pid             int    // 0: no dockerd seen
	Version         string // "20.10.24+dfsg1", "" when unknown
	ConfigFile      string // daemon.json read ("" when none)
	UserlandProxy   bool
	IPTables        bool
	IP6Tables       bool
	FirewallBackend string // "iptables" or "nftables"
	// From lists where the settings came from ("flags", the file).
	From []string
}

// RecommendedDaemonJSON is the daemon.json for berth's full ownership of
// forwarding (deploy/daemon.json).
const RecommendedDaemonJSON = `{"userland-proxy": false, "iptables": false, "ip6tables": false}`

// ParseDockerdArgs reads dockerd's command line and its daemon.json text
// (may be empty) into a Config. Flags win over the file (dockerd refuses
// both for one setting, so either is the truth). version picks the
// ip6tables default: on from Docker 27, off before.
func ParseDockerdArgs(argv []string, daemonJSON []byte, version string) Config {
	c := Config{UserlandProxy: true, IPTables: true, FirewallBackend: "iptables", Version: version}
	// ip6tables is on by default from Docker 27; an unknown version is
	// taken as a current engine.
	c.IP6Tables = major(version) >= 27 || major(version) < 17
	if len(daemonJSON) > 0 {
		var f map[string]any
		if err := json.Unmarshal(daemonJSON, &f); err == nil {
			setBool := func(key string, dst *bool) {
				if v, ok := f[key].(bool); ok {
					*dst = v
				}
			}
			setBool("userland-proxy", &c.UserlandProxy)
			setBool("iptables", &c.IPTables)
			setBool("ip6tables", &c.IP6Tables)
			if v, ok := f["firewall-backend"].(string); ok && v != "" {
				c.FirewallBackend = v
			}
		}
	}
	flags := false
	for i := 1; i < len(argv); i++ {
		a := argv[i]
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, val, hasVal := strings.Cut(a[2:], "=")
		boolFlag := func(dst *bool) {
			v := true
			if hasVal {
				if b, err := strconv.ParseBool(val); err == nil {
					v = b
				}
			}
			*dst = v
			flags = true
		}
		switch name {
		case "userland-proxy":
			boolFlag(&c.UserlandProxy)
		case "iptables":
			boolFlag(&c.IPTables)
		case "ip6tables":
			boolFlag(&c.IP6Tables)
		case "firewall-backend":
			if !hasVal && i+1 < len(argv) {
				val = argv[i+1]
				i++
			}
			if val != "" {
				c.FirewallBackend = val
				flags = true
			}
		}
	}
	if flags {
		c.From = append(c.From, "flags")
	}
	if !c.IPTables {
		// --iptables=false implies no ip6tables rules either in every
		// version that has both (dockerd refuses ip6tables without
		// iptables from 27 on).
		c.IP6Tables = false
	}
	return c
}

func major(v string) int {
	m, _, _ := strings.Cut(v, ".")
	n, _ := strconv.Atoi(m)
	return n
}

// ConfigFileArg is the --config-file of a dockerd command line, or the
// default path.
func ConfigFileArg(argv []string) string {
	for i := 1; i < len(argv); i++ {
		a := argv[i]
		if v, ok := strings.CutPrefix(a, "--config-file="); ok {
			return v
		}
		if a == "--config-file" && i+1 < len(argv) {
			return argv[i+1]
		}
	}
	return "/etc/docker/daemon.json"
}

var versionRE = regexp.MustCompile(`[Vv]ersion ([^ ,]+)`)

// DetectConfig finds the dockerd of berth's network namespace and reads
// its command line, its daemon.json (through /proc/PID/root, so a berth in
// a container reads the host's file) and its version (`dockerd --version`
// through /proc/PID/exe).
func DetectConfig(ctx context.Context) (Config, error) {
	pids, err := pidsByComm("dockerd")
	if err != nil {
		return Config{}, err
	}
	if len(pids) == 0 {
		return Config{}, errNoDockerd
	}
	pid := pids[0]
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	b, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil {
		return Config{}, err
	}
	argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	file := ConfigFileArg(argv)
	js, err := os.ReadFile(filepath.Join(dir, "root", file))
	if err != nil {
		js, file = nil, ""
	}
	version := ""
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if out, err := run(vctx, filepath.Join(dir, "exe"), "--version"); err == nil {
		if m := versionRE.FindStringSubmatch(out); m != nil {
			version = strings.TrimPrefix(m[1], "v")
		}
	}
	c := ParseDockerdArgs(argv, js, version)
	c.Pid = pid
	if file != "" {
		c.ConfigFile = file
		c.From = append(c.From, file)
	}
	return c, nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// Describe is the start-up log and status summary text: which dockerd
// configuration berth found, what dockerd forwards and what berth will and
// will not do, and the daemon.json for full ownership when berth does not
// have it. cerr is DetectConfig's error.
func Describe(c Config, cerr error, sc Scan) []string {
	var lines []string
	var seen []string
	for _, fam := range []string{"ipv4", "ipv6"} {
		t := sc.Tables[fam]
		switch {
		case len(t.DNAT) > 0 && t.Jumped:
			seen = append(seen, fmt.Sprintf("%s DOCKER chain with %d DNAT rules (iptables-%s)", fam, len(t.DNAT), sc.Flavour[fam]))
		case t.Chain:
			seen = append(seen, fmt.Sprintf("%s DOCKER chain without live DNAT rules (iptables-%s)", fam, sc.Flavour[fam]))
		}
	}
	for _, f := range sc.NFT {
		seen = append(seen, "nftables table "+f+" docker-bridges")
	}
	if sc.Proxies > 0 {
		seen = append(seen, fmt.Sprintf("%d docker-proxy processes", sc.Proxies))
	}
	if len(seen) == 0 {
		seen = append(seen, "no Docker DNAT rules, no docker-proxy")
	}
	found := "host: " + strings.Join(seen, ", ")
	if cerr != nil {
		lines = append(lines, "dockerd: configuration unknown ("+cerr.Error()+"); "+found)
		lines = append(lines, "coexistence: berth checks every published port against dockerd's DNAT rules and docker-proxy processes on each sync: "+
			"those dockerd forwards show as state docker and berth installs nothing for them; berth forwards the rest and berth.ports label ports")
		lines = append(lines, "for full ownership by berth set "+RecommendedDaemonJSON+" in /etc/docker/daemon.json and restart dockerd")
		return lines
	}
	ver := c.Version
	if ver == "" {
		ver = "version unknown"
	}
	from := "defaults"
	if len(c.From) > 0 {
		from = strings.Join(c.From, " + ") + " over defaults"
	}
	lines = append(lines, fmt.Sprintf("dockerd: pid %d, %s: userland-proxy %s, iptables %s, ip6tables %s, firewall backend %s (from %s); %s",
		c.Pid, ver, onOff(c.UserlandProxy), onOff(c.IPTables), onOff(c.IP6Tables), c.FirewallBackend, from, found))
	var does, berth string
	switch {
	case c.UserlandProxy:
		does = "dockerd forwards every -p port on both families itself (docker-proxy"
		if c.IPTables {
			does += " and " + c.FirewallBackend + " DNAT"
		}
		does += ")"
		berth = "berth shows those ports as state docker and installs nothing for them; it forwards berth.ports label ports only"
	case c.IPTables:
		does = "dockerd forwards -p ports with " + c.FirewallBackend + " DNAT (IPv4"
		if c.IP6Tables {
			does += ", and IPv6 for containers with an IPv6 address"
		}
		does += "), no docker-proxy"
		berth = "berth shows those as state docker and installs nothing for them; it forwards the IPv6 side of IPv4-only containers (relay on [::]) and berth.ports label ports"
	default:
		does = "dockerd forwards nothing (it only holds the published ports)"
		berth = "berth forwards every -p port on both families (NAT, relay for IPv6 clients of IPv4-only containers) and berth.ports label ports"
	}
	lines = append(lines, "coexistence: "+does+"; "+berth+" (checked per port on every sync: stale DOCKER rules do not count)")
	if c.UserlandProxy || c.IPTables || c.IP6Tables {
		lines = append(lines, "for full ownership by berth set "+RecommendedDaemonJSON+" in "+configPath(c)+" and restart dockerd")
	}
	return lines
}

func configPath(c Config) string {
	if c.ConfigFile != "" {
		return c.ConfigFile
	}
	return "/etc/docker/daemon.json"
}
