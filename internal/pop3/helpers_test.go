package pop3

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
)

const testTimeout = 5 * time.Second

// testCert returns a self-signed certificate for 127.0.0.1 and a pool that
// trusts it.
func testCert(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "usher test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// fakeDirector hands out leases on one backend, or fails with err.
type fakeDirector struct {
	backend  netip.Addr
	err      error
	done     chan struct{}
	acquired atomic.Int32
	released atomic.Int32

	mu    sync.Mutex
	users []string
}

func (d *fakeDirector) Acquire(ctx context.Context, user string) (*proxy.Lease, error) {
	d.mu.Lock()
	d.users = append(d.users, user)
	d.mu.Unlock()
	if d.err != nil {
		return nil, d.err
	}
	d.acquired.Add(1)
	return proxy.NewLease(user, d.backend, d.done, func() { d.released.Add(1) }), nil
}

func (d *fakeDirector) userList() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.users...)
}

// fakeBackend is a small POP3 server standing in for Dovecot. It records
// every line it receives per connection and, after a successful login,
// answers each line with "+OK echo <line>".
type fakeBackend struct {
	t          testing.TB
	ln         net.Listener
	greeting   string      // default "+OK Dovecot ready."
	capa       []string    // CAPA lines; nil means the backend answers CAPA with -ERR
	tls        *tls.Config // STLS support when set
	users      map[string]string
	silent     bool // never send the greeting
	xclientERR bool // refuse XCLIENT

	mu    sync.Mutex
	conns [][]string
	wg    sync.WaitGroup
}

func newFakeBackend(t testing.TB, configure func(*fakeBackend)) *fakeBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &fakeBackend{
		t:        t,
		ln:       ln,
		greeting: "+OK Dovecot ready.",
		capa:     []string{"CAPA", "TOP", "UIDL", "RESP-CODES", "USER", "SASL PLAIN"},
		users:    map[string]string{"alice": "secret", "bob": "hunter2"},
	}
	if configure != nil {
		configure(b)
	}
	b.wg.Add(1)
	go b.accept()
	t.Cleanup(func() {
		ln.Close()
		b.wg.Wait()
	})
	return b
}

func (b *fakeBackend) port() int { return b.ln.Addr().(*net.TCPAddr).Port }

// lines returns what connection i received.
func (b *fakeBackend) lines(i int) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i >= len(b.conns) {
		return nil
	}
	return append([]string(nil), b.conns[i]...)
}

func (b *fakeBackend) connCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

func (b *fakeBackend) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		idx := len(b.conns)
		b.conns = append(b.conns, nil)
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.Close()
			b.serve(c, idx)
		}()
	}
}

func (b *fakeBackend) record(idx int, line string) {
	b.mu.Lock()
	b.conns[idx] = append(b.conns[idx], line)
	b.mu.Unlock()
}

func (b *fakeBackend) serve(c net.Conn, idx int) {
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	var conn net.Conn = c
	r := bufio.NewReader(conn)
	write := func(lines ...string) bool {
		_, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	if b.silent {
		_, _ = io.Copy(io.Discard, r)
		return
	}
	if !write(b.greeting) {
		return
	}
	user, loggedIn := "", false
	check := func(u, p string) bool {
		want, ok := b.users[u]
		return ok && want == p
	}
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line := strings.TrimRight(l, "\r\n")
		b.record(idx, line)
		if loggedIn {
			if line == "QUIT" {
				write("+OK bye")
				return
			}
			if !write("+OK echo " + line) {
				return
			}
			continue
		}
		name, args, _ := strings.Cut(line, " ")
		switch strings.ToUpper(name) {
		case "STLS":
			if b.tls == nil {
				write("-ERR TLS support isn't enabled.")
				continue
			}
			write("+OK Begin TLS negotiation now.")
			tc := tls.Server(c, b.tls)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, r = tc, bufio.NewReader(tc)
		case "CAPA":
			if b.capa == nil {
				write("-ERR Unknown command.")
				continue
			}
			write(append(append([]string{"+OK"}, b.capa...), ".")...)
		case "XCLIENT":
			if b.xclientERR {
				write("-ERR You are not from trusted IP")
			} else {
				write("+OK Updated")
			}
		case "USER":
			user = args
			write("+OK")
		case "PASS":
			if check(user, args) {
				loggedIn = true
				write("+OK Logged in.")
			} else {
				write("-ERR [AUTH] Authentication failed.")
			}
		case "AUTH":
			mech, ir, has := strings.Cut(args, " ")
			if mech != "PLAIN" {
				write("-ERR Unsupported authentication mechanism.")
				continue
			}
			if !has {
				write("+ ")
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				ir = strings.TrimRight(l, "\r\n")
				b.record(idx, ir)
			}
			msg, err := base64.StdEncoding.DecodeString(ir)
			parts := bytes.Split(msg, []byte{0})
			if err == nil && len(parts) == 3 && check(string(parts[1]), string(parts[2])) {
				loggedIn = true
				write("+OK Logged in.")
			} else {
				write("-ERR [AUTH] Authentication failed.")
			}
		case "QUIT":
			write("+OK Logging out")
			return
		default:
			write("-ERR Unknown command.")
		}
	}
}

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness is one session of Serve on a real loopback connection.
type harness struct {
	t      *testing.T
	sess   *proxy.Session
	c      *testClient
	logs   *syncBuffer
	cancel context.CancelFunc
	reason chan string
}

type sessionOpts struct {
	mode    config.TLSMode
	trusted bool
	tls     *tls.Config // the listener's server config
}

func startSession(t *testing.T, o Options, so sessionOpts) *harness {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if so.mode == "" {
		so.mode = config.TLSNone
	}
	logs := &syncBuffer{}
	sess := &proxy.Session{
		ID:        "sid1",
		Proto:     "pop3",
		Conn:      sc,
		Remote:    netip.MustParseAddrPort(cc.LocalAddr().String()),
		Local:     netip.MustParseAddrPort(sc.LocalAddr().String()),
		Start:     time.Now(),
		Log:       slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		TLSMode:   so.mode,
		TLSConfig: so.tls,
		Trusted:   so.trusted,
	}
	var client net.Conn = cc
	if so.mode == config.TLSImplicit {
		tc := tls.Server(sc, so.tls)
		clientTLS := tls.Client(cc, &tls.Config{InsecureSkipVerify: true})
		errc := make(chan error, 1)
		go func() { errc <- clientTLS.Handshake() }()
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		sess.Conn, sess.Secure, client = tc, true, clientTLS
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, sess: sess, logs: logs, cancel: cancel, reason: make(chan string, 1),
		c: &testClient{t: t, conn: client, r: bufio.NewReader(client)}}
	srv := New(o)
	go func() {
		r := srv.Serve(ctx, sess)
		sc.Close()
		h.reason <- r
	}()
	t.Cleanup(func() {
		cancel()
		cc.Close()
		select {
		case <-h.reason:
		case <-time.After(testTimeout):
			t.Error("Serve did not return after cleanup")
		}
	})
	h.c.expect("+OK usher ready.")
	return h
}

// wait returns Serve's reason.
func (h *harness) wait() string {
	h.t.Helper()
	select {
	case r := <-h.reason:
		h.reason <- r // keep it for Cleanup
		return r
	case <-time.After(testTimeout):
		h.t.Fatal("Serve did not return")
		return ""
	}
}

// testClient is the POP3 client side.
type testClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func (c *testClient) send(lines ...string) {
	c.t.Helper()
	_ = c.conn.SetWriteDeadline(time.Now().Add(testTimeout))
	if _, err := io.WriteString(c.conn, strings.Join(lines, "\r\n")+"\r\n"); err != nil {
		c.t.Fatalf("send %q: %v", lines[0], err)
	}
}

func (c *testClient) line() string {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(testTimeout))
	l, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read reply: %v (got %q)", err, l)
	}
	if !strings.HasSuffix(l, "\r\n") {
		c.t.Fatalf("reply %q not ended by CRLF", l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// expect reads one line and checks it equals want.
func (c *testClient) expect(want string) {
	c.t.Helper()
	if got := c.line(); got != want {
		c.t.Fatalf("got %q, want %q", got, want)
	}
}

// expectPrefix reads one line and checks its prefix.
func (c *testClient) expectPrefix(prefix string) string {
	c.t.Helper()
	got := c.line()
	if !strings.HasPrefix(got, prefix) {
		c.t.Fatalf("got %q, want prefix %q", got, prefix)
	}
	return got
}

// multi reads a multi-line reply after its status line.
func (c *testClient) multi() []string {
	c.t.Helper()
	var out []string
	for {
		l := c.line()
		if l == "." {
			return out
		}
		out = append(out, l)
	}
}

// expectEOF checks the server closed the connection.
func (c *testClient) expectEOF() {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(testTimeout))
	l, err := c.r.ReadString('\n')
	if err == nil {
		c.t.Fatalf("got %q, want connection closed", l)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("connection still open")
	}
}

// startTLS upgrades the client side after +OK to STLS.
func (c *testClient) startTLS(pool *x509.CertPool) {
	c.t.Helper()
	tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	_ = tc.SetDeadline(time.Now().Add(testTimeout))
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("client TLS handshake: %v", err)
	}
	c.conn, c.r = tc, bufio.NewReader(tc)
}

func plainIR(authzid, authcid, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(authzid + "\x00" + authcid + "\x00" + pass))
}

// options returns Options for a fake backend and director.
func options(b *fakeBackend, d *fakeDirector) Options {
	o := Options{
		Director:    d,
		IdleTimeout: testTimeout,
		Backend: proxy.BackendOptions{
			TLS:            config.TLSNone,
			ConnectTimeout: testTimeout,
			LoginTimeout:   testTimeout,
		},
	}
	if b != nil {
		o.Backend.Port = b.port()
	}
	return o
}

func newDirector() *fakeDirector {
	return &fakeDirector{backend: netip.MustParseAddr("127.0.0.1")}
}
