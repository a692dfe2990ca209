package netns

import (
	"net"
	"os"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Run(m)) }

// TestPeerReachesTestNamespace proves the plumbing every e2e test stands on:
// the binary runs in its own namespace and a peer reaches it over the veth.
func TestPeerReachesTestNamespace(t *testing.T) {
	Require(t)
	p := NewPeer(t, 201)
	ln, err := net.Listen("tcp", p.LocalAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	var got []byte
	err = p.Do(func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 2)
		n, err := c.Read(buf)
		got = buf[:n]
		return err
	})
	if err != nil || string(got) != "hi" {
		t.Fatalf("peer dial: %v, got %q", err, got)
	}
	// The peer's own address must not exist in the test namespace.
	if _, err := net.Listen("tcp", p.Addr+":0"); err == nil {
		t.Fatalf("peer address %s is bindable in the test namespace: namespaces not separate", p.Addr)
	}
}
