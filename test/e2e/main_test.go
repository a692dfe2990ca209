// Package e2e runs berth against a real, private dockerd inside the test
// binary's own network namespace.
package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/berth-dev/berth/test/netns"
)

// TestMain runs the tests in a namespace of their own, and checks from the
// outside that the host's own rules and interfaces are exactly as before.
func TestMain(m *testing.M) {
	if netns.Name() != "" || os.Geteuid() != 0 {
		os.Exit(netns.Run(m))
	}
	before := hostState()
	code := netns.Run(m)
	if after := hostState(); !bytes.Equal(before, after) {
		fmt.Fprintf(os.Stderr, "FAIL: the e2e run changed the host's rules or interfaces\n--- before\n%s\n--- after\n%s\n", before, after)
		code = 1
	}
	os.Exit(code)
}

// hostState is what make test must leave untouched on the host: every
// iptables flavour's rules, the nft ruleset, the links.
func hostState() []byte {
	var b bytes.Buffer
	for _, c := range [][]string{
		{"iptables-nft-save"}, {"ip6tables-nft-save"}, {"iptables-legacy-save"}, {"ip6tables-legacy-save"},
		{"nft", "list", "ruleset"}, {"ip", "-o", "link", "show"},
	} {
		if _, err := exec.LookPath(c[0]); err != nil {
			continue
		}
		out, _ := exec.Command(c[0], c[1:]...).CombinedOutput()
		fmt.Fprintf(&b, "## %v\n", c)
		for _, l := range bytes.Split(out, []byte("\n")) {
			// Comment lines of *-save carry a timestamp.
			if bytes.HasPrefix(l, []byte("#")) {
				continue
			}
			b.Write(l)
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
