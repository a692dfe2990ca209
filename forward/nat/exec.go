package nat

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Flavours of iptables.
const (
	FlavourNFT    = "nft"
	FlavourLegacy = "legacy"
)

// tools are the binaries of one iptables flavour and family.
type tools struct {
	iptables, save, restore string
}

func findTools(flavour string, v6 bool) (tools, error) {
	base := "iptables"
	if v6 {
		base = "ip6tables"
	}
	var t tools
	for _, x := range []struct {
		dst  *string
		kind string
	}{{&t.iptables, ""}, {&t.save, "-save"}, {&t.restore, "-restore"}} {
		p, err := exec.LookPath(base + "-" + flavour + x.kind)
		if err != nil {
			// Some distributions ship one flavour without the suffix.
			if systemFlavour(base) != flavour {
				return t, fmt.Errorf("%s-%s%s not found: %w", base, flavour, x.kind, err)
			}
			if p, err = exec.LookPath(base + x.kind); err != nil {
				return t, err
			}
		}
		*x.dst = p
	}
	return t, nil
}

// systemFlavour is what the plain `iptables` command is ("" if none).
func systemFlavour(base string) string {
	out, err := exec.Command(base, "--version").Output()
	if err != nil {
		return ""
	}
	if bytes.Contains(out, []byte("legacy")) {
		return FlavourLegacy
	}
	return FlavourNFT
}

// detectFlavour picks the flavour dockerd and the host use: the one whose
// tables hold Docker's chains, else the one holding any rules, else the
// system default. Rules written with the other flavour would sit in tables
// the host's firewall tools never show.
func detectFlavour(ctx context.Context) string {
	type seen struct {
		rules  int
		docker bool
	}
	look := func(fl string) seen {
		var s seen
		if fl == FlavourLegacy && !legacyTablesExist() {
			return s // do not make the kernel load ip_tables just to look
		}
		for _, base := range []string{"iptables", "ip6tables"} {
			out, err := exec.CommandContext(ctx, base+"-"+fl+"-save").Output()
			if err != nil {
				continue
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "-A ") {
					s.rules++
				}
				if strings.HasPrefix(l, ":DOCKER") {
					s.docker = true
				}
			}
		}
		return s
	}
	nft, legacy := look(FlavourNFT), look(FlavourLegacy)
	switch {
	case nft.docker != legacy.docker:
		if legacy.docker {
			return FlavourLegacy
		}
		return FlavourNFT
	case (nft.rules > 0) != (legacy.rules > 0):
		if legacy.rules > 0 {
			return FlavourLegacy
		}
		return FlavourNFT
	case nft.rules > 0 && legacy.rules > nft.rules:
		return FlavourLegacy
	case nft.rules > 0:
		return FlavourNFT
	}
	if systemFlavour("iptables") == FlavourLegacy {
		return FlavourLegacy
	}
	return FlavourNFT
}

func legacyTablesExist() bool {
	for _, f := range []string{"/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"} {
		if b, err := os.ReadFile(f); err == nil && len(bytes.TrimSpace(b)) > 0 {
			return true
		}
	}
	return false
}

// run executes a tool with stdin and returns its stdout.
func run(ctx context.Context, bin, stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}
