package e2e

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/reconcile"
	"github.com/berth-dev/berth/test/harness"
)

// Malformed and hostile input: each gives an error that names the
// container and the fault, berth keeps running, and a healthy container's
// mappings keep answering throughout.
func TestBadInputIsContained(t *testing.T) {
	w := harness.Start(t, harness.Options{})
	// A host process holding a port, as sshd would hold 22.
	squatter, err := net.Listen("tcp", "0.0.0.0:26222")
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	b := w.StartBerth()
	w.RunEcho("good", "--label", "berth.ports=26000:80", "--label", "berth.mode=relay", "--", "-tcp", "80")
	b.EventuallyStatus(t, 5*time.Second, "good installed", func(rows []reconcile.Row) error {
		if installed(rows, "good") != 2 {
			return fmt.Errorf("good not installed: %v", rows)
		}
		return nil
	})

	huge := strings.Repeat("8080:80,", 100<<10/8)
	cases := []struct {
		name   string
		labels []string
		flags  []string
		fault  string
	}{
		{"junk", []string{"berth.ports=abc"}, nil, `missing host port`},
		{"port0", []string{"berth.ports=0:80"}, nil, "port 0 out of range"},
		{"port70000", []string{"berth.ports=70000:80"}, nil, "port 70000 out of range"},
		{"reversed", []string{"berth.ports=9010-9000:9010-9000"}, nil, "reversed"},
		{"mismatch", []string{"berth.ports=9000-9010:9000-9005"}, nil, "host range 9000-9010 has 11 ports, container range 9000-9005 has 6"},
		{"proto", []string{"berth.ports=8080:80/icmp"}, nil, `unknown protocol "icmp"`},
		{"v6nobrackets", []string{"berth.ports=::1:8080:80"}, nil, "IPv6 addresses go in brackets"},
		{"v6unclosed", []string{"berth.ports=[::1:8080:80"}, nil, "unclosed"},
		{"v6zone", []string{"berth.ports=[fe80::1%eth0]:8080:80"}, nil, "bad IPv6 address"},
		{"huge", []string{"berth.ports=" + huge}, nil, "bytes long"},
		{"unicode", []string{"berth.ports=８０８０:80"}, nil, "non-ASCII"},
		{"nohostport", []string{"berth.ports=8080"}, nil, "missing host port"},
		{"emptyhost", []string{"berth.ports=:80"}, nil, "empty host port"},
		{"trailingcomma", []string{"berth.ports=8080:80,"}, nil, "entry 2 is empty"},
		{"spaces", []string{"berth.ports=   "}, nil, "empty port list"},
		{"plus", []string{"berth.ports=+80:80"}, nil, "not a number"},
		{"toomany", []string{"berth.ports=1-65535:1-65535"}, nil, "more than 20000 ports"},
		{"badhostip", []string{"berth.ports=256.1.1.1:80:80"}, nil, "bad host address"},
		{"badmode", []string{"berth.ports=26001:80", "berth.mode=fast"}, nil, `label berth.mode: unknown mode "fast"`},
		{"badpp", []string{"berth.ports=26002:80", "berth.proxy-protocol=v1"}, nil, `unknown value "v1"`},
		{"ppnat", []string{"berth.ports=26003:80", "berth.mode=nat", "berth.proxy-protocol=v2"}, nil, "PROXY protocol needs relay mode"},
		{"badnet", []string{"berth.ports=26004:80", "berth.network=nope"}, nil, `not on network "nope"`},
		{"sctprelay", []string{"berth.ports=26005:80/sctp", "berth.mode=relay"}, nil, "sctp is served by nat only"},
		{"dupkey", []string{"berth.ports=26006:80,0.0.0.0:26006:81", "berth.mode=relay"}, nil, "claimed twice in the label"},
		{"claimer2", []string{"berth.ports=26000:80", "berth.mode=relay"}, nil, "already forwarded to container good"},
		{"squatted", []string{"berth.ports=26222:80", "berth.mode=relay"}, nil, "address already in use"},
		{"nonlocal", []string{"berth.ports=10.99.99.99:26007:80", "berth.mode=relay"}, nil, "cannot assign requested address"},
		{"nonet", []string{"berth.ports=26008:80"}, []string{"--network", "none"}, "has no IP address"},
		{"hostnet", []string{"berth.ports=26009:80"}, []string{"--network", "host"}, "has no IP address"},
		{"ctrl", []string{"berth.ports=80\t:80"}, nil, "control character"},
	}
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for _, c := range cases {
		args := []string{"run", "-d", "--name", c.name, "-e", "NAME=" + c.name}
		args = append(args, c.flags...)
		for _, l := range c.labels {
			args = append(args, "--label", l)
		}
		args = append(args, harness.ImageEcho, "-tcp", "80")
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if _, err := w.Docker(args...); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	// One that dies between its start event and berth's inspect.
	w.MustDocker("run", "-d", "--name", "flash", "--label", "berth.ports=26010:80", harness.ImageBusybox, "true")

	b.EventuallyStatus(t, 15*time.Second, "every bad container has its error", func(rows []reconcile.Row) error {
		var missing []string
		for _, c := range cases {
			found := false
			for _, r := range rows {
				if r.ContainerName == c.name && r.State == reconcile.StateError &&
					strings.Contains(r.Error, c.fault) && strings.Contains(r.Error, c.name) {
					found = true
				}
			}
			if !found {
				var got []string
				for _, r := range rows {
					if r.ContainerName == c.name {
						got = append(got, r.State+": "+r.Error)
					}
				}
				missing = append(missing, fmt.Sprintf("%s (want %q, got %q)", c.name, c.fault, got))
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%d without their error:\n%s", len(missing), strings.Join(missing, "\n"))
		}
		if countRows(rows, "flash") != 0 {
			return fmt.Errorf("dead container flash still has rows")
		}
		return nil
	})
	if !b.Running() {
		t.Fatal("berth died")
	}
	rows, _ := b.Status()
	if installed(rows, "good") != 2 {
		t.Fatalf("good's mappings disturbed: %v", rowKeys(rows, "good"))
	}
	if got, err := harness.WhoTCP("127.0.0.1:26000", 3*time.Second); err != nil || harness.Name(got) != "good" {
		t.Fatalf("good no longer answers: %q %v", got, err)
	}
}
