// Command echoserver is the test container's server: it listens on many TCP
// and UDP ports in one process and echoes what it gets. A client that sends
// "who?" first gets the server's NAME (and, behind a PROXY protocol v2
// header, the client address the header carried) instead, so tests can
// tell which container a forward reached.
//
//	echoserver -tcp 80,9000-9010 -udp 53 [-proxy-protocol]
//	echoserver check -host ADDR -tcp 20000-20999 -expect NAME
//
// The check form is the client the demo and benchmarks use: it asks every
// port and fails unless each answers with the expected name.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

var (
	name       = os.Getenv("NAME")
	proxyProto = flag.Bool("proxy-protocol", false, "expect a PROXY protocol v2 header on every connection and datagram")
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "check" {
		os.Exit(check(os.Args[2:]))
	}
	tcp := flag.String("tcp", "", "TCP ports: 80,9000-9010")
	udp := flag.String("udp", "", "UDP ports")
	flag.Parse()
	if name == "" {
		name, _ = os.Hostname()
	}
	for _, p := range ports(*tcp) {
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go serveTCP(ln)
	}
	for _, p := range ports(*udp) {
		pc, err := net.ListenPacket("udp", ":"+strconv.Itoa(p))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go serveUDP(pc)
	}
	fmt.Println("ready")
	select {}
}

func ports(s string) []int {
	var out []int
	for _, part := range strings.Split(s, ",") {
		if part == "" {
			continue
		}
		lo, hi, _ := strings.Cut(part, "-")
		a, _ := strconv.Atoi(lo)
		b := a
		if hi != "" {
			b, _ = strconv.Atoi(hi)
		}
		for p := a; p <= b; p++ {
			out = append(out, p)
		}
	}
	return out
}

func serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go handle(c)
	}
}

func handle(c net.Conn) {
	defer c.Close()
	peer := c.RemoteAddr().String()
	r := bufio.NewReaderSize(c, 32<<10)
	if *proxyProto {
		h, err := proxyproto.Read(r)
		if err != nil {
			fmt.Fprintf(c, "bad proxy header: %v\n", err)
			return
		}
		peer = h.SourceAddr.String()
	}
	if b, err := r.Peek(5); err == nil && string(b) == "who?\n" {
		r.Discard(5)
		fmt.Fprintf(c, "%s %s\n", name, peer)
		return
	}
	io.Copy(c, r)
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}

func serveUDP(pc net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			continue
		}
		data, peer := buf[:n], addr.String()
		if *proxyProto {
			h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(data)))
			if err != nil {
				pc.WriteTo([]byte("bad proxy header: "+err.Error()), addr)
				continue
			}
			peer = h.SourceAddr.String()
			data = data[len(data)-rest(data, h):]
		}
		if string(data) == "who?" {
			pc.WriteTo([]byte(name+" "+peer), addr)
			continue
		}
		pc.WriteTo(data, addr)
	}
}

// rest is how many bytes of the datagram follow the PROXY header.
func rest(data []byte, h *proxyproto.Header) int {
	hb, err := h.Format()
	if err != nil || len(hb) > len(data) {
		return 0
	}
	return len(data) - len(hb)
}

func check(args []string) int {
	fs := flag.NewFlagSet("check", flag.ExitOnError)
	host := fs.String("host", "127.0.0.1", "address to connect to")
	tcp := fs.String("tcp", "", "TCP ports to ask")
	udp := fs.String("udp", "", "UDP ports to ask")
	expect := fs.String("expect", "", "name every answer must carry")
	timeout := fs.Duration("timeout", 3*time.Second, "per port")
	par := fs.Int("parallel", 32, "ports asked at once")
	fs.Parse(args)
	type job struct {
		proto string
		port  int
	}
	var jobs []job
	for _, p := range ports(*tcp) {
		jobs = append(jobs, job{"tcp", p})
	}
	for _, p := range ports(*udp) {
		jobs = append(jobs, job{"udp", p})
	}
	start := time.Now()
	var ok, bad atomic.Int64
	var firstErr atomic.Value
	sem := make(chan struct{}, *par)
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			addr := net.JoinHostPort(*host, strconv.Itoa(j.port))
			got, err := ask(j.proto, addr, *timeout)
			if err == nil && *expect != "" && !strings.HasPrefix(got, *expect+" ") {
				err = fmt.Errorf("%s %s answered %q, want %s", j.proto, addr, got, *expect)
			}
			if err != nil {
				bad.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			ok.Add(1)
		}()
	}
	wg.Wait()
	fmt.Printf("%d/%d ports on %s answered as %q in %v\n", ok.Load(), len(jobs), *host, *expect, time.Since(start).Round(time.Millisecond))
	if bad.Load() > 0 {
		fmt.Printf("%d failed; first: %v\n", bad.Load(), firstErr.Load())
		return 1
	}
	return 0
}

func ask(proto, addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout(proto, addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	msg := "who?"
	if proto == "tcp" {
		msg += "\n"
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, 512)
	if proto == "udp" {
		n, err := c.Read(buf)
		return strings.TrimSpace(string(buf[:n])), err
	}
	b, err := io.ReadAll(c)
	return strings.TrimSpace(string(b)), err
}
