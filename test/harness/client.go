package harness

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// WhoTCP asks the echo server behind addr for its name; it returns "NAME
// PEER" where PEER is the client address the server saw.
func WhoTCP(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("who?\n")); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// WhoUDP is WhoTCP over one UDP datagram.
func WhoUDP(addr string, timeout time.Duration) (string, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return WhoOn(c, timeout)
}

// WhoOn sends "who?" on an open datagram socket and reads the answer, so a
// test can keep one client address across several questions.
func WhoOn(c net.Conn, timeout time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("who?")); err != nil {
		return "", err
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		return "", fmt.Errorf("udp %s: %w", c.RemoteAddr(), err)
	}
	return string(buf[:n]), nil
}

// EchoTCP sends payload, half-closes, and checks the same bytes come back.
func EchoTCP(addr string, payload []byte, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("write to %s: %w", addr, werr)
	}
	if err != nil {
		return fmt.Errorf("read from %s: %w", addr, err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo through %s: sent %d bytes, got %d back (different)", addr, len(payload), len(got))
	}
	return nil
}

// Name is the first word of a WhoTCP/WhoUDP answer.
func Name(answer string) string {
	name, _, _ := strings.Cut(answer, " ")
	return name
}
