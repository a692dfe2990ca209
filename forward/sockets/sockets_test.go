package sockets

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/berth-dev/berth/forward"
	"github.com/berth-dev/berth/test/netns"
)

func TestMain(m *testing.M) { os.Exit(netns.Run(m)) }

func TestParseAddr(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
	}{
		{"0100007F:1F90", "127.0.0.1:8080"},
		{"00000000:0016", "0.0.0.0:22"},
		{"020011AC:0050", "172.17.0.2:80"},
		{"00000000000000000000000001000000:0035", "[::1]:53"},
		{"00000000000000000000000000000000:01BB", "[::]:443"},
		// fd00:1::2 is the words fd000001 00000000 00000000 00000002.
		{"010000FD000000000000000002000000:1F90", "[fd00:1::2]:8080"},
		// ::ffff:10.1.2.3, a v4-mapped address in tcp6.
		{"0000000000000000FFFF00000302010A:0050", "[::ffff:10.1.2.3]:80"},
		{"B80D0120000000000000000001000000:FFFF", "[2001:db8::1]:65535"},
	} {
		got, err := ParseAddr(tc.in)
		if err != nil {
			t.Errorf("ParseAddr(%q): %v", tc.in, err)
			continue
		}
		if got.String() != tc.want {
			t.Errorf("ParseAddr(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
	for _, bad := range []string{"", "0100007F", "0100007:1F90", "0100007F:XYZ", "01000:1", "0100007F:10000"} {
		if _, err := ParseAddr(bad); err == nil {
			t.Errorf("ParseAddr(%q): no error", bad)
		}
	}
}

const tcpSample = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1059 1 00000000b034d6d1 100 0 0 10 0
   1: 020200C0:BB0C 507100CB:01BB 01 00000000:00000000 03:00000FB2 00000000     0        0 2222 3 000000003e251531
   2: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 100 0 0 10 0
`

const tcp6Sample = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 06 00000000:00000000 03:00000FB2 00000000     0        0 0 3 0000000000000000
`

const udpSample = `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5555 2 0000000000000000 0
  101: 0100007F:A000 0200007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 6666 2 0000000000000000 0
`

const sctpSample = ` ENDPT     SOCK   STY SST HBKT LPORT   UID INODE LADDRS
ffff88017e0a0200 ffff880299f7fa00 2   10  29   3868      0 7777 10.0.0.1 fd00::1 
`

func TestParseTable(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		name  string
		in    string
		proto forward.Proto
		want  []Socket
	}{
		{"tcp keeps listeners", tcpSample, forward.TCP, []Socket{
			{forward.TCP, ap("0.0.0.0:8080"), 1059},
			{forward.TCP, ap("127.0.0.1:22"), 3333},
		}},
		{"tcp6", tcp6Sample, forward.TCP, []Socket{{forward.TCP, ap("[::]:8080"), 4444}}},
		{"udp keeps every bound socket", udpSample, forward.UDP, []Socket{
			{forward.UDP, ap("0.0.0.0:53"), 5555},
			{forward.UDP, ap("127.0.0.1:40960"), 6666},
		}},
		{"header only", "  sl  local_address\n", forward.TCP, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseTable(strings.NewReader(tc.in), tc.proto)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
	got, err := ParseSCTP(strings.NewReader(sctpSample))
	if err != nil {
		t.Fatal(err)
	}
	want := []Socket{{forward.SCTP, ap("10.0.0.1:3868"), 7777}, {forward.SCTP, ap("[fd00::1]:3868"), 7777}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("sctp: got %v, want %v", got, want)
	}
	if _, err := ParseTable(strings.NewReader("h\n 0: 0100007F:0016 00000000:0000 ZZ a b c d e 1\n"), forward.TCP); err == nil {
		t.Error("bad state: no error")
	}
}

func TestConflicting(t *testing.T) {
	ap := netip.MustParseAddrPort
	all := []Socket{
		{forward.TCP, ap("0.0.0.0:80"), 1},
		{forward.TCP, ap("127.0.0.1:81"), 2},
		{forward.TCP, ap("[::]:82"), 3},
		{forward.UDP, ap("0.0.0.0:80"), 4},
		{forward.TCP, ap("[::1]:80"), 5},
	}
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		proto forward.Proto
		ip    netip.Addr
		port  uint16
		want  []uint64
	}{
		{forward.TCP, ip("127.0.0.1"), 80, []uint64{1}}, // under the wildcard
		{forward.TCP, ip("0.0.0.0"), 81, []uint64{2}},   // wildcard over a specific address
		{forward.TCP, ip("10.0.0.1"), 81, nil},          // different specific address
		{forward.TCP, ip("0.0.0.0"), 82, []uint64{3}},   // maybe dual-stack [::]
		{forward.TCP, ip("::"), 80, []uint64{5}},        // v4 socket does not count for v6
		{forward.UDP, ip("0.0.0.0"), 80, []uint64{4}},
		{forward.UDP, ip("::ffff:0.0.0.0"), 80, []uint64{4}},
		{forward.TCP, ip("::1"), 82, []uint64{3}},
	} {
		var got []uint64
		for _, s := range Conflicting(all, tc.proto, tc.ip, tc.port) {
			got = append(got, s.Inode)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Conflicting(%s %s:%d) = %v, want %v", tc.proto, tc.ip, tc.port, got, tc.want)
		}
	}
}

func TestHolderFindsThisProcess(t *testing.T) {
	netns.Require(t)
	self, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	comm := strings.TrimSpace(string(self))
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	u, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()

	tport := uint16(l.Addr().(*net.TCPAddr).Port)
	uport := uint16(u.LocalAddr().(*net.UDPAddr).Port)
	for _, tc := range []struct {
		proto forward.Proto
		ip    string
		port  uint16
	}{
		{forward.TCP, "0.0.0.0", tport},
		{forward.TCP, "127.0.0.1", tport},
		{forward.UDP, "::", uport},
	} {
		o, ok := Holder(tc.proto, netip.MustParseAddr(tc.ip), tc.port)
		if !ok || o.Pid != os.Getpid() || o.Comm != comm {
			t.Errorf("Holder(%s %s:%d) = %v, %v; want pid %d (%s)", tc.proto, tc.ip, tc.port, o, ok, os.Getpid(), comm)
		}
	}
	if o, ok := Holder(forward.TCP, netip.MustParseAddr("::"), tport); ok {
		t.Errorf("v6 holder of a v4-only port: %v", o)
	}
	if o, ok := Holder(forward.UDP, netip.MustParseAddr("0.0.0.0"), tport); ok && o.Pid == os.Getpid() {
		t.Errorf("udp holder of a tcp port: %v", o)
	}
}

// A child between fork and exec holds its parent's sockets; with pids that
// wrapped, the child may have the lower pid. The parent is still the owner.
func TestOwnersPrefersParentOverForkedChild(t *testing.T) {
	root := t.TempDir()
	old := procRoot
	procRoot = root
	t.Cleanup(func() { procRoot = old })
	mk := func(pid, parent int, comm string, inodes ...int) {
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.MkdirAll(filepath.Join(dir, "fd"), 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "comm"), []byte(comm+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "stat"), []byte(fmt.Sprintf("%d (%s) S %d 1 1 0", pid, comm, parent)), 0o644)
		for i, ino := range inodes {
			os.Symlink(fmt.Sprintf("socket:[%d]", ino), filepath.Join(dir, "fd", strconv.Itoa(i+3)))
		}
	}
	mk(30000, 1, "berth", 111, 222)
	mk(300, 30000, "berth", 111, 222) // forked child, lower pid after wrap
	mk(500, 1, "sshd", 333)
	mk(400, 1, "a", 444) // two unrelated holders: lowest pid
	mk(450, 1, "b", 444)
	got := Owners([]uint64{111, 222, 333, 444, 999})
	want := map[uint64]Owner{111: {30000, "berth"}, 222: {30000, "berth"}, 333: {500, "sshd"}, 444: {400, "a"}}
	if len(got) != len(want) {
		t.Fatalf("Owners = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("Owners[%d] = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}
