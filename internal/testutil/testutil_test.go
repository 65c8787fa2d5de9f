package testutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestLoopbackPKI(t *testing.T) {
	p := LoopbackPKI(t)
	for _, name := range []string{"127.0.0.1", "127.0.0.3", "localhost"} {
		if _, err := p.Cert.Leaf.Verify(x509Opts(p, name)); err != nil {
			t.Errorf("certificate not valid for %s: %v", name, err)
		}
	}
	if _, err := p.Cert.Leaf.Verify(x509Opts(p, "127.0.0.9")); err == nil {
		t.Error("certificate valid for 127.0.0.9")
	}
	// A handshake over loopback with the client config; another PKI's pool
	// does not trust this one.
	if err := handshake(t, p.Server, p.Client("127.0.0.1")); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if err := handshake(t, p.Server, LoopbackPKI(t).Client("127.0.0.1")); err == nil {
		t.Fatal("handshake trusting another CA succeeded")
	}
	named := NewPKI(t, PKIOptions{DNSNames: []string{"backend.test"}})
	if err := handshake(t, named.Server, named.Client("127.0.0.1")); err == nil {
		t.Fatal("certificate for backend.test accepted for 127.0.0.1")
	}
}

func handshake(t *testing.T, server, client *tls.Config) error {
	a, b := TCPPair(t)
	errc := make(chan error, 1)
	go func() {
		s := tls.Server(b, server)
		_ = s.SetDeadline(time.Now().Add(DefaultTimeout))
		errc <- s.Handshake()
	}()
	c := tls.Client(a, client)
	_ = c.SetDeadline(time.Now().Add(DefaultTimeout))
	err := c.Handshake()
	a.Close()
	<-errc
	return err
}

func TestServeClosesAtCleanup(t *testing.T) {
	var handled atomic.Int32
	returned := make(chan struct{})
	t.Run("inner", func(t *testing.T) {
		ln := Listen(t)
		Serve(t, ln, func(c net.Conn, n int) {
			handled.Add(1)
			// Blocks until the cleanup closes the connection.
			_, _ = io.Copy(io.Discard, c)
			if n == 1 {
				close(returned)
			}
		})
		for range 2 {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
		}
		WaitFor(t, DefaultTimeout, "two handlers", func() bool { return handled.Load() == 2 })
	})
	select {
	case <-returned:
	default:
		t.Fatal("handler still running after the test's cleanup")
	}
}

func TestMemConn(t *testing.T) {
	m := NewMemConn([]byte("in"), netip.MustParseAddrPort("127.0.0.1:143"), netip.MustParseAddrPort("192.0.2.1:4000"))
	if m.LocalAddr().String() != "127.0.0.1:143" || m.RemoteAddr().String() != "192.0.2.1:4000" {
		t.Errorf("addresses %s %s", m.LocalAddr(), m.RemoteAddr())
	}
	b, err := io.ReadAll(m)
	if err != nil || string(b) != "in" {
		t.Fatalf("ReadAll = %q, %v", b, err)
	}
	_, _ = m.Write([]byte("out"))
	if string(m.Output()) != "out" {
		t.Errorf("Output = %q", m.Output())
	}
	m.Close()
	if _, err := m.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
	if _, err := m.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
}

func TestClient(t *testing.T) {
	a, b := TCPPair(t)
	c := NewClient(t, a)
	go func() { _, _ = b.Write([]byte("+OK hello\r\nbare\n")) }()
	c.Expect("+OK hello")
	// A line without CR fails the test: check it on a throwaway T.
	ft := &fakeT{TB: t}
	func() {
		defer func() { recover() }()
		(&Client{T: ft, Conn: a, R: c.R, Timeout: time.Second}).Line()
	}()
	if !ft.failed {
		t.Error("line without CRLF accepted")
	}
	c.Send("A", "B")
	buf := make([]byte, 6)
	if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "A\r\nB\r\n" {
		t.Errorf("Send wrote %q, %v", buf, err)
	}
	b.Close()
	c.ExpectClosed()
}

// fakeT records a fatal failure instead of ending the test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed = true
	panic(strings.TrimSpace(format))
}

func x509Opts(p *PKI, name string) x509.VerifyOptions {
	return x509.VerifyOptions{Roots: p.Pool, DNSName: name}
}
