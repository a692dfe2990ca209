// Package sockets answers "who listens on this port?" from /proc: the socket
// tables in /proc/net (of the caller's network namespace) and the socket
// inodes in /proc/<pid>/fd. The relay uses it to name the holder of a port it
// cannot bind; the reconciler uses it to refuse a NAT mapping over a port a
// host process serves.
package sockets

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/forward"
)

// Socket is one bound socket: a TCP listener, or any bound UDP or SCTP
// socket.
type Socket struct {
	Proto forward.Proto
	Addr  netip.AddrPort
	Inode uint64
}

// Owner is the process that holds a socket open.
type Owner struct {
	Pid  int
	Comm string
}

// String reads like "pid 812 (dockerd)".
func (o Owner) String() string { return fmt.Sprintf("pid %d (%s)", o.Pid, o.Comm) }

// procRoot is /proc; tests point it at a fake tree.
var procRoot = "/proc"

// netDir is the calling thread's view of the network tables: /proc/net is
// the thread group leader's, which differs when a thread of this process
// entered another namespace (tests do).
const netDir = "thread-self/net"

const tcpListen = 0x0A // TCP_LISTEN in /proc/net/tcp's "st" column

// Listening reads the TCP listeners and the bound UDP and SCTP sockets of the
// caller's network namespace. Missing tables (no IPv6, no sctp module) are
// skipped.
func Listening() ([]Socket, error) {
	// One thread for all the tables: thread-self is per thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var out []Socket
	for _, tb := range []struct {
		file  string
		proto forward.Proto
	}{
		{"tcp", forward.TCP}, {"tcp6", forward.TCP},
		{"udp", forward.UDP}, {"udp6", forward.UDP},
	} {
		f, err := os.Open(filepath.Join(procRoot, netDir, tb.file))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		s, err := ParseTable(f, tb.proto)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s/net/%s: %w", procRoot, tb.file, err)
		}
		out = append(out, s...)
	}
	f, err := os.Open(filepath.Join(procRoot, netDir, "sctp", "eps"))
	if err == nil {
		s, err := ParseSCTP(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s/net/sctp/eps: %w", procRoot, err)
		}
		out = append(out, s...)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return out, nil
}

// ParseTable parses /proc/net/{tcp,tcp6,udp,udp6}. For TCP it keeps only
// listening sockets; for UDP every socket bound to a port.
func ParseTable(r io.Reader, proto forward.Proto) ([]Socket, error) {
	var out []Socket
	sc := bufio.NewScanner(r)
	first := true
	for sc.Scan() {
		if first { // header
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 10 {
			continue
		}
		local, st, inode := f[1], f[3], f[9]
		state, err := strconv.ParseUint(st, 16, 8)
		if err != nil {
			return nil, fmt.Errorf("state %q: %w", st, err)
		}
		if proto == forward.TCP && state != tcpListen {
			continue
		}
		ap, err := ParseAddr(local)
		if err != nil {
			return nil, err
		}
		if ap.Port() == 0 {
			continue
		}
		ino, err := strconv.ParseUint(inode, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("inode %q: %w", inode, err)
		}
		out = append(out, Socket{Proto: proto, Addr: ap, Inode: ino})
	}
	return out, sc.Err()
}

// ParseAddr decodes "0100007F:1F90" (127.0.0.1:8080) or its 32-digit IPv6
// form. The kernel prints the address as 32-bit words in host byte order
// (little-endian here), so every 4-byte group is reversed; the port is plain
// hex.
func ParseAddr(s string) (netip.AddrPort, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q: no port", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: port: %w", s, err)
	}
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q: bad hex address", s)
	}
	for i := 0; i < len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	ip, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(ip, uint16(port)), nil
}

// ParseSCTP parses /proc/net/sctp/eps, whose columns are
// ENDPT SOCK STY SST HBKT LPORT UID INODE LADDRS..., the addresses in text.
func ParseSCTP(r io.Reader) ([]Socket, error) {
	var out []Socket
	sc := bufio.NewScanner(r)
	first := true
	for sc.Scan() {
		if first {
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 9 {
			continue
		}
		port, err := strconv.ParseUint(f[5], 10, 16)
		if err != nil {
			return nil, fmt.Errorf("port %q: %w", f[5], err)
		}
		ino, err := strconv.ParseUint(f[7], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("inode %q: %w", f[7], err)
		}
		for _, a := range f[8:] {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				continue // not an address: a column the kernel added later
			}
			out = append(out, Socket{Proto: forward.SCTP, Addr: netip.AddrPortFrom(ip, uint16(port)), Inode: ino})
		}
	}
	return out, sc.Err()
}

// Owners finds the processes holding the given socket inodes by reading the
// fd links of every process. Sockets of processes we may not inspect are
// left out. When several processes share a socket, the holder whose parent
// does not hold it wins: a forked child (between fork and exec it holds all
// of its parent's fds) never hides the real owner, whatever the pid order
// (pids wrap). Among unrelated holders the lowest pid wins.
func Owners(inodes []uint64) map[uint64]Owner {
	want := make(map[uint64]bool, len(inodes))
	for _, i := range inodes {
		want[i] = true
	}
	holders := map[uint64][]int{}
	procs, err := os.ReadDir(procRoot)
	if err != nil {
		return map[uint64]Owner{}
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fdDir := filepath.Join(procRoot, p.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
			if err != nil || !want[ino] {
				continue
			}
			if h := holders[ino]; len(h) == 0 || h[len(h)-1] != pid {
				holders[ino] = append(h, pid)
			}
		}
	}
	out := make(map[uint64]Owner, len(holders))
	for ino, pids := range holders {
		pid := pickOwner(pids)
		out[ino] = Owner{Pid: pid, Comm: comm(pid)}
	}
	return out
}

// pickOwner chooses among the processes sharing one socket.
func pickOwner(pids []int) int {
	if len(pids) == 1 {
		return pids[0]
	}
	holds := map[int]bool{}
	for _, p := range pids {
		holds[p] = true
	}
	best := -1
	for _, p := range pids {
		if holds[ppid(p)] {
			continue // a child of another holder
		}
		if best < 0 || p < best {
			best = p
		}
	}
	if best < 0 { // a cycle cannot happen; be safe
		best = pids[0]
	}
	return best
}

// ppid reads a process's parent from /proc/PID/stat (0 if unknown).
func ppid(pid int) int {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	p, _ := strconv.Atoi(f[1])
	return p
}

func comm(pid int) string {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "comm"))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// Holder names the process whose socket would make binding proto ip:port
// fail: same port and family with an equal address or either side the
// wildcard. For IPv4 it also considers [::]:port, which /proc lists as IPv6
// whether or not it is dual-stack. ok is false when no such socket, or no
// owner, is found (the holder may be in another pid namespace).
func Holder(proto forward.Proto, ip netip.Addr, port uint16) (Owner, bool) {
	all, err := Listening()
	if err != nil {
		return Owner{}, false
	}
	return holder(all, proto, ip, port)
}

func holder(all []Socket, proto forward.Proto, ip netip.Addr, port uint16) (Owner, bool) {
	var inodes []uint64
	for _, c := range Conflicting(all, proto, ip, port) {
		if c.Inode != 0 {
			inodes = append(inodes, c.Inode)
		}
	}
	if len(inodes) == 0 {
		return Owner{}, false
	}
	owners := Owners(inodes)
	for _, i := range inodes { // first conflicting socket with a known owner
		if o, ok := owners[i]; ok {
			return o, true
		}
	}
	return Owner{}, false
}

// Conflicting returns the sockets of all that compete with proto ip:port,
// exact-family matches first, then dual-stack candidates for IPv4.
func Conflicting(all []Socket, proto forward.Proto, ip netip.Addr, port uint16) []Socket {
	ip = ip.Unmap()
	k := forward.Key{Proto: proto, HostIP: ip, HostPort: port}
	var out, dual []Socket
	for _, s := range all {
		sk := forward.Key{Proto: s.Proto, HostIP: s.Addr.Addr().Unmap(), HostPort: s.Addr.Port()}
		switch {
		case k.Overlaps(sk):
			out = append(out, s)
		case ip.Is4() && s.Proto == proto && s.Addr.Port() == port && s.Addr.Addr() == netip.IPv6Unspecified():
			dual = append(dual, s)
		}
	}
	return append(out, dual...)
}
