package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/testutil"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// backendListener accepts on 127.0.0.1:0 and runs serve on each connection.
func backendListener(t *testing.T, serve func(net.Conn)) (port int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(ioTimeout))
				serve(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// tlsGreeter completes a TLS handshake with cfg and writes a greeting.
func tlsGreeter(cfg *tls.Config) func(net.Conn) {
	return func(c net.Conn) {
		tc := tls.Server(c, cfg)
		if tc.Handshake() != nil {
			return
		}
		_, _ = tc.Write([]byte("* OK tls backend\r\n"))
		_, _ = tc.Read(make([]byte, 1)) // until the client closes
	}
}

func TestBackendAddr(t *testing.T) {
	o := &BackendOptions{Port: 143}
	if got := o.Addr(netip.MustParseAddr("10.1.2.3")); got != "10.1.2.3:143" {
		t.Errorf("Addr(v4) = %q", got)
	}
	if got := o.Addr(netip.MustParseAddr("2001:db8::1")); got != "[2001:db8::1]:143" {
		t.Errorf("Addr(v6) = %q", got)
	}
}

func TestDialInvalidPort(t *testing.T) {
	// A cancelled context proves no dial is attempted: a dial would fail
	// with context.Canceled, not with the port check.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, port := range []int{0, -1, 65536} {
		o := &BackendOptions{Port: port}
		c, err := o.Dial(ctx, loopback)
		if err == nil {
			c.Close()
			t.Fatalf("port %d: Dial succeeded", port)
		}
		if !strings.Contains(err.Error(), "invalid port") || errors.Is(err, context.Canceled) {
			t.Errorf("port %d: err = %v, want an invalid port error before any dial", port, err)
		}
	}
}

func TestDialPlain(t *testing.T) {
	port := backendListener(t, func(c net.Conn) { _, _ = c.Write([]byte("+OK pop3\r\n")) })
	o := &BackendOptions{Port: port, TLS: config.TLSNone, ConnectTimeout: ioTimeout}
	c, err := o.Dial(context.Background(), loopback)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := unwrapConn(c).(*net.TCPConn); !ok {
		t.Errorf("plaintext Dial returned %T, want a *net.TCPConn under it (so Splice can use splice(2))", c)
	}
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if l := readLine(t, c); l != "+OK pop3\r\n" {
		t.Errorf("greeting %q", l)
	}

	// STARTTLS is the protocol's job: Dial must not start TLS for it.
	o.TLS = config.TLSStartTLS
	c2, err := o.Dial(context.Background(), loopback)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, ok := unwrapConn(c2).(*net.TCPConn); !ok {
		t.Errorf("starttls Dial returned %T, want the plain *net.TCPConn under it", c2)
	}
}

func TestDialRefused(t *testing.T) {
	port := testutil.RefusedPort(t)
	o := &BackendOptions{Port: port, ConnectTimeout: ioTimeout}
	c, err := o.Dial(context.Background(), loopback)
	if err == nil {
		c.Close()
		t.Fatal("dial to a refusing port succeeded")
	}
	if want := "127.0.0.1:" + strconv.Itoa(port); !strings.Contains(err.Error(), want) {
		t.Errorf("err = %v, want it to name %s", err, want)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("err = %v, want it to wrap ECONNREFUSED", err)
	}
}

func TestDialExpiredContext(t *testing.T) {
	port := backendListener(t, func(net.Conn) {})
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	o := &BackendOptions{Port: port, ConnectTimeout: ioTimeout}
	c, err := o.Dial(ctx, loopback)
	if err == nil {
		c.Close()
		t.Fatal("Dial with an expired context succeeded")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want context.DeadlineExceeded", err)
	}
}

func TestDialImplicitTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	port := backendListener(t, tlsGreeter(pki.Server))
	cfg := &tls.Config{RootCAs: pki.Pool}
	o := &BackendOptions{Port: port, TLS: config.TLSImplicit, TLSConfig: cfg, ConnectTimeout: ioTimeout}
	c, err := o.Dial(context.Background(), loopback)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	tc, ok := c.(*tls.Conn)
	if !ok {
		t.Fatalf("implicit Dial returned %T, want *tls.Conn", c)
	}
	if !tc.ConnectionState().HandshakeComplete {
		t.Error("handshake not complete when Dial returned")
	}
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if l := readLine(t, c); l != "* OK tls backend\r\n" {
		t.Errorf("greeting over TLS = %q", l)
	}
	if cfg.ServerName != "" {
		t.Errorf("Dial modified the caller's TLSConfig (ServerName = %q)", cfg.ServerName)
	}
}

func TestDialImplicitTLSWrongCA(t *testing.T) {
	pki, other := testutil.LoopbackPKI(t), testutil.LoopbackPKI(t)
	port := backendListener(t, tlsGreeter(pki.Server))
	o := &BackendOptions{Port: port, TLS: config.TLSImplicit,
		TLSConfig: &tls.Config{RootCAs: other.Pool}, ConnectTimeout: ioTimeout}
	c, err := o.Dial(context.Background(), loopback)
	if err == nil {
		c.Close()
		t.Fatal("Dial trusted a certificate from an unknown CA")
	}
	var ua x509.UnknownAuthorityError
	if !errors.As(err, &ua) {
		t.Errorf("err = %v, want an x509.UnknownAuthorityError", err)
	}
	if !strings.Contains(err.Error(), "tls handshake with backend 127.0.0.1:"+strconv.Itoa(port)) {
		t.Errorf("err = %v, want it to name the operation and address", err)
	}
}

func TestDialImplicitTLSServerName(t *testing.T) {
	// The certificate names only backend.test, not the IP.
	pki := testutil.NewPKI(t, testutil.PKIOptions{DNSNames: []string{"backend.test"}})
	port := backendListener(t, tlsGreeter(pki.Server))

	o := &BackendOptions{Port: port, TLS: config.TLSImplicit,
		TLSConfig: &tls.Config{RootCAs: pki.Pool}, ConnectTimeout: ioTimeout}
	if c, err := o.Dial(context.Background(), loopback); err == nil {
		c.Close()
		t.Error("Dial accepted a certificate for backend.test when verifying the IP 127.0.0.1")
	}

	o.TLSConfig = &tls.Config{RootCAs: pki.Pool, ServerName: "backend.test"}
	c, err := o.Dial(context.Background(), loopback)
	if err != nil {
		t.Fatalf("Dial with ServerName backend.test: %v", err)
	}
	c.Close()
}

func TestDialConnectTimeoutCoversHandshake(t *testing.T) {
	// The backend accepts TCP but never answers the TLS ClientHello.
	closed := make(chan struct{}, 1)
	port := backendListener(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 4096)) // the ClientHello
		_, err := c.Read(make([]byte, 1))
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				closed <- struct{}{} // the dialer hung up
			}
		}
	})
	o := &BackendOptions{Port: port, TLS: config.TLSImplicit,
		TLSConfig: &tls.Config{InsecureSkipVerify: true}, ConnectTimeout: 200 * time.Millisecond}
	start := time.Now()
	c, err := o.Dial(context.Background(), loopback)
	el := time.Since(start)
	if err == nil {
		c.Close()
		t.Fatal("Dial succeeded against a silent TLS backend")
	}
	if el > 2*time.Second {
		t.Errorf("Dial took %v, want about the 200ms ConnectTimeout", el)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want context.DeadlineExceeded", err)
	}
	select {
	case <-closed:
	case <-time.After(ioTimeout):
		t.Error("Dial did not close the TCP connection after the failed handshake")
	}
}

func TestClientTLSDefaults(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	a, b := testutil.TCPPair(t)
	go func() {
		tc := tls.Server(b, pki.Server)
		_ = tc.Handshake()
	}()
	o := &BackendOptions{Port: 143} // nil TLSConfig: system roots, ServerName = IP
	tc := o.ClientTLS(a, loopback)
	_ = tc.SetDeadline(time.Now().Add(ioTimeout))
	err := tc.Handshake()
	var ua x509.UnknownAuthorityError
	if !errors.As(err, &ua) {
		t.Errorf("handshake with nil TLSConfig: err = %v, want the test CA to be unknown (verification on)", err)
	}
}
