package nat

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/forward"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run with -update to create)", err)
	}
	if got != string(want) {
		t.Errorf("%s: got\n%s\nwant\n%s", name, got, want)
	}
}

// offline is a Table whose families hold the given iptables-save text,
// for planning without a kernel.
func offline(v4save, v6save string) (*Table, *family, *family) {
	f4 := &family{st: readState(parseSave(v4save, "nat"), false), ensured: true}
	f6 := &family{v6: true, st: readState(parseSave(v6save, "nat"), true), ensured: true}
	return &Table{fams: []*family{f4, f6}}, f4, f6
}

func TestPlanGolden(t *testing.T) {
	web := mp("tcp", "0.0.0.0", 8080, "172.17.0.2", 80, "3f2a9c0d1e2b")
	dns := mp("udp", "127.0.0.1", 53, "172.17.0.2", 53, "3f2a9c0d1e2b")
	other := mp("tcp", "10.1.0.1", 9000, "172.17.0.3", 9000, "0123456789ab")
	v6 := mp("sctp", "::", 36412, "fd00:1::2", 36412, "3f2a9c0d1e2b")

	tab, f4, f6 := offline("", "")
	p := tab.makePlan(f4, []forward.Mapping{web, dns, other, web}, nil)
	golden(t, "add_v4", p.text)
	if len(p.udp) != 1 || p.udp[0] != dns.Key {
		t.Errorf("udp keys = %v", p.udp)
	}
	if len(p.local) != 1 || p.local[0] != web.ContainerIP {
		t.Errorf("route_localnet for %v", p.local)
	}
	f4.commit(p)

	// the state now reads back like the kernel would show it
	if got := f4.st.mappings(); len(got) != 3 {
		t.Fatalf("after commit: %v", got)
	}
	if p := tab.makePlan(f4, []forward.Mapping{web, dns, other}, nil); p.text != "" {
		t.Errorf("re-adding installed mappings writes:\n%s", p.text)
	}
	p = tab.makePlan(f4, nil, []forward.Mapping{dns, dns})
	golden(t, "remove_v4", p.text)
	f4.commit(p)
	if p := tab.makePlan(f4, nil, []forward.Mapping{dns}); p.text != "" {
		t.Errorf("removing an absent mapping writes:\n%s", p.text)
	}

	p = tab.makePlan(f6, []forward.Mapping{v6}, nil)
	golden(t, "add_v6", p.text)
	if len(p.local) != 0 {
		t.Errorf("IPv6 needs no route_localnet: %v", p.local)
	}

	tab.masquerade = true
	tab.bridges = []Bridge{{"docker0", []netip.Prefix{netip.MustParsePrefix("172.17.0.0/16"), netip.MustParsePrefix("fd00:1::/64")}}}
	golden(t, "egress_v4", tab.makePlan(f4, nil, nil).text)
}

func TestPlanDuplicates(t *testing.T) {
	web := mp("tcp", "0.0.0.0", 8080, "172.17.0.2", 80, "3f2a9c0d1e2b")
	c := dnatChain(bucketOf(web.ContainerID))
	line := "-A " + c + " " + dnatSpec(web).String() + "\n"
	var masq string
	for _, r := range masqRules([]forward.Mapping{web}) {
		masq += "-A " + masqFor(c) + " " + r.spec().String() + "\n"
	}
	save := "*nat\n:" + c + " - [0:0]\n" + line + line + masq + "COMMIT\n"
	tab, f4, _ := offline(save, "")
	if got := f4.st.mappings(); len(got) != 2 {
		t.Fatalf("duplicate listed %d times", len(got))
	}
	if len(f4.st.dirty) != 0 {
		t.Errorf("dirty = %v", f4.st.dirty)
	}
	// removing one copy rewrites the bucket with the other
	p := tab.makePlan(f4, nil, []forward.Mapping{web})
	if strings.Count(p.text, "-j DNAT") != 1 {
		t.Errorf("removing one of two copies:\n%s", p.text)
	}
}

func TestValidate(t *testing.T) {
	tab := &Table{fams: []*family{{}}}
	ok := mp("tcp", "0.0.0.0", 80, "172.17.0.2", 80, "abc")
	if err := tab.validate(ok); err != nil {
		t.Fatal(err)
	}
	bad := map[string]forward.Mapping{}
	m := ok
	m.Mode = forward.ModeRelay
	bad["relay"] = m
	m = ok
	m.ContainerIP = netip.MustParseAddr("fd00::2")
	bad["mixed"] = m
	bad["::1"] = mp("tcp", "::1", 80, "fd00::2", 80, "abc")
	bad["v6 off"] = mp("tcp", "::", 80, "fd00::2", 80, "abc")
	bad["quote id"] = mp("tcp", "0.0.0.0", 80, "172.17.0.2", 80, `a"b`)
	bad["space id"] = mp("tcp", "0.0.0.0", 80, "172.17.0.2", 80, "a b")
	m = ok
	m.HostPort = 0
	bad["port 0"] = m
	m = ok
	m.Proto = "icmp"
	bad["icmp"] = m
	m = ok
	m.ProxyProtocol = 2
	bad["proxy"] = m
	for name, m := range bad {
		if err := tab.validate(m); err == nil {
			t.Errorf("%s: %v accepted", name, m)
		}
	}
}
