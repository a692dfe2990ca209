package watcher

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/berth-dev/berth/forward"
)

func spec(p forward.Proto, ip string, h, c uint16) PortSpec {
	s := PortSpec{Proto: p, HostPort: h, ContainerPort: c}
	if ip != "" {
		s.HostIP = netip.MustParseAddr(ip)
	}
	return s
}

func TestParsePorts(t *testing.T) {
	tcp, udp, sctp := forward.TCP, forward.UDP, forward.SCTP
	cases := []struct {
		in      string
		want    []PortSpec
		wantErr string // substring; empty means success
	}{
		{in: "8080:80", want: []PortSpec{spec(tcp, "", 8080, 80)}},
		{in: "8080:80/tcp", want: []PortSpec{spec(tcp, "", 8080, 80)}},
		{in: "53:53/udp", want: []PortSpec{spec(udp, "", 53, 53)}},
		{in: "53:53/UDP", want: []PortSpec{spec(udp, "", 53, 53)}},
		{in: "9:9/sctp", want: []PortSpec{spec(sctp, "", 9, 9)}},
		{in: "127.0.0.1:5432:5432", want: []PortSpec{spec(tcp, "127.0.0.1", 5432, 5432)}},
		{in: "0.0.0.0:1:2", want: []PortSpec{spec(tcp, "0.0.0.0", 1, 2)}},
		{in: "[::]:53:53/udp", want: []PortSpec{spec(udp, "::", 53, 53)}},
		{in: "[::1]:8080:80", want: []PortSpec{spec(tcp, "::1", 8080, 80)}},
		{in: "[fd00::5]:443:8443/tcp", want: []PortSpec{spec(tcp, "fd00::5", 443, 8443)}},
		{in: "65535:65535", want: []PortSpec{spec(tcp, "", 65535, 65535)}},
		{in: "1:1", want: []PortSpec{spec(tcp, "", 1, 1)}},
		{in: "9000-9002:9100-9102/udp", want: []PortSpec{spec(udp, "", 9000, 9100), spec(udp, "", 9001, 9101), spec(udp, "", 9002, 9102)}},
		{in: "10.0.0.1:7-8:17-18", want: []PortSpec{spec(tcp, "10.0.0.1", 7, 17), spec(tcp, "10.0.0.1", 8, 18)}},
		{in: "5-5:6-6", want: []PortSpec{spec(tcp, "", 5, 6)}},
		{in: " 8080:80 , 8081:81 ", want: []PortSpec{spec(tcp, "", 8080, 80), spec(tcp, "", 8081, 81)}},
		{in: "8080:80,127.0.0.1:5432:5432,[::]:53:53/udp", want: []PortSpec{spec(tcp, "", 8080, 80), spec(tcp, "127.0.0.1", 5432, 5432), spec(udp, "::", 53, 53)}},
		{in: "00080:80", want: []PortSpec{spec(tcp, "", 80, 80)}},
		// faults
		{in: "", wantErr: "empty port list"},
		{in: "   ", wantErr: "empty port list"},
		{in: "8080:80,", wantErr: "entry 2 is empty"},
		{in: ",8080:80", wantErr: "entry 1 is empty"},
		{in: "80", wantErr: "missing host port"},
		{in: ":80", wantErr: "empty host port"},
		{in: "127.0.0.1::80", wantErr: "empty host port"},
		{in: "0:80", wantErr: "port 0 out of range"},
		{in: "80:0", wantErr: "container port: port 0 out of range"},
		{in: "70000:80", wantErr: "port 70000 out of range"},
		{in: "65536:80", wantErr: "out of range"},
		{in: "99999999999999999999:80", wantErr: "out of range"},
		{in: "-1:80", wantErr: "empty port"},
		{in: "+80:80", wantErr: "not a number"},
		{in: "abc:80", wantErr: "not a number"},
		{in: "8080:80/icmp", wantErr: "unknown protocol \"icmp\""},
		{in: "8080:80/", wantErr: "unknown protocol"},
		{in: "9010-9000:9010-9000", wantErr: "reversed"},
		{in: "9000-9010:9000-9005", wantErr: "host range 9000-9010 has 11 ports, container range 9000-9005 has 6"},
		{in: "9000-9010:80", wantErr: "has 11 ports"},
		{in: "9000-:80", wantErr: "empty port"},
		{in: "9000-9001-9002:80", wantErr: "not a number"},
		{in: "::1:8080:80", wantErr: "brackets"},
		{in: "fe80::1:80:80", wantErr: "brackets"},
		{in: "[::1:8080:80", wantErr: "unclosed"},
		{in: "[127.0.0.1]:80:80", wantErr: "bad IPv6 address"},
		{in: "[fe80::1%eth0]:80:80", wantErr: "bad IPv6 address"},
		{in: "[::1]8080:80", wantErr: "want ':'"},
		{in: "256.0.0.1:80:80", wantErr: "bad host address"},
		{in: "localhost:80:80", wantErr: "bad host address"},
		{in: "1.2.3.4:5:6:7", wantErr: "too many ':'"},
		{in: "8080:80:90", wantErr: "bad host address"},
		{in: "8080：80", wantErr: "non-ASCII"},
		{in: "80\n:80", wantErr: "control character"},
		{in: "1-65535:1-65535,1-65535:1-65535/udp", wantErr: "more than 20000 ports"},
		{in: strings.Repeat("8080:80,", 20000), wantErr: "bytes long"},
	}
	for _, c := range cases {
		t.Run(c.in[:min(len(c.in), 40)], func(t *testing.T) {
			got, err := ParsePorts(c.in)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("ParsePorts(%q) error = %v, want one containing %q", c.in, err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParsePorts(%q): %v", c.in, err)
			}
			if len(got) != len(c.want) {
				t.Fatalf("ParsePorts(%q) = %v, want %v", c.in, got, c.want)
			}
			for i := range got {
				if got[i] != c.want[i] {
					t.Fatalf("ParsePorts(%q)[%d] = %+v, want %+v", c.in, i, got[i], c.want[i])
				}
			}
		})
	}
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
	}
}

func FuzzParsePorts(f *testing.F) {
	for _, s := range []string{"8080:80", "[::]:53:53/udp", "9000-9010:9000-9010/udp", "127.0.0.1:5432:5432", "::1:80:80", "0:0", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		specs, err := ParsePorts(s)
		if err != nil {
			return
		}
		if len(specs) == 0 || len(specs) > MaxSpecsPerLabel {
			t.Fatalf("ParsePorts(%q) returned %d specs without error", s, len(specs))
		}
		for _, sp := range specs {
			if sp.HostPort == 0 || sp.ContainerPort == 0 {
				t.Fatalf("ParsePorts(%q) returned port 0: %+v", s, sp)
			}
		}
	})
}
