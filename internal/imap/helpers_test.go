package imap

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
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// testTLS returns a server config with a fresh self-signed certificate for
// 127.0.0.1 and a pool that trusts it.
func testTLS(t testing.TB) (*tls.Config, *x509.CertPool) {
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
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}}}, pool
}

// fakeDirector hands out leases on one backend IP, or fails with err.
type fakeDirector struct {
	mu       sync.Mutex
	ip       netip.Addr
	err      error
	done     chan struct{}
	users    []string
	acquired int
	released int
}

func (d *fakeDirector) Acquire(_ context.Context, user string) (*proxy.Lease, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.users = append(d.users, user)
	if d.err != nil {
		return nil, d.err
	}
	d.acquired++
	return proxy.NewLease(user, d.ip, d.done, func() {
		d.mu.Lock()
		d.released++
		d.mu.Unlock()
	}), nil
}

func (d *fakeDirector) counts() (acquired, released int, users []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.acquired, d.released, append([]string(nil), d.users...)
}

// beEvent is one command the fake backend received.
type beEvent struct {
	name string   // command name; "POST" for a line after login
	args []string // string arguments, lists flattened
	raw  []string // the command's lines and literals as received
	tls  bool     // received over TLS
}

// fakeBackend is a small IMAP server on 127.0.0.1 standing in for Dovecot.
type fakeBackend struct {
	t          testing.TB
	ln         net.Listener
	caps       string // pre-login capabilities; STARTTLS is added when tlsConf is set
	greetCaps  bool   // send [CAPABILITY ...] in the greeting
	greeting   string // replaces the greeting when set
	tlsConf    *tls.Config
	users      map[string]string // user -> password
	loginExtra string            // untagged line sent before a successful login's OK
	events     chan beEvent
}

func newFakeBackend(t testing.TB, setup func(*fakeBackend)) *fakeBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeBackend{
		t: t, ln: ln, caps: "IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN", greetCaps: true,
		users: map[string]string{"alice": "secret"}, events: make(chan beEvent, 100),
	}
	if setup != nil {
		setup(f)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(c)
		}
	}()
	return f
}

func (f *fakeBackend) port() int { return f.ln.Addr().(*net.TCPAddr).Port }

func (f *fakeBackend) next(t testing.TB) beEvent {
	t.Helper()
	select {
	case ev := <-f.events:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("fake backend: no command received")
		return beEvent{}
	}
}

// nextNamed skips events until one named name.
func (f *fakeBackend) nextNamed(t testing.TB, name string) beEvent {
	t.Helper()
	for {
		if ev := f.next(t); ev.name == name {
			return ev
		}
	}
}

func flatten(args []arg) []string {
	var out []string
	for _, a := range args {
		if a.kind == argList {
			out = append(out, flatten(a.list)...)
		} else {
			out = append(out, a.s)
		}
	}
	return out
}

func (f *fakeBackend) serve(conn net.Conn) {
	defer func() { conn.Close() }()
	w := func(s string) { _, _ = conn.Write([]byte(s + "\r\n")) }
	caps := f.caps
	if f.tlsConf != nil {
		caps += " STARTTLS"
	}
	switch {
	case f.greeting != "":
		w(f.greeting)
	case f.greetCaps:
		w("* OK [CAPABILITY " + caps + "] fake ready")
	default:
		w("* OK fake ready")
	}
	r := wire.NewReader(conn, 10*time.Second, 0)
	secure, loggedIn := false, false
	for {
		if loggedIn {
			line, err := r.ReadLine()
			if err != nil {
				return
			}
			f.events <- beEvent{name: "POST", raw: []string{string(line)}, tls: secure}
			tag, _, _ := strings.Cut(string(line), " ")
			w(tag + " OK done")
			continue
		}
		raw, err := readCommand(r, 1<<20, func() error { w("+ go ahead"); return nil })
		if err != nil {
			return
		}
		ev := beEvent{tls: secure}
		for i, l := range raw.lines {
			ev.raw = append(ev.raw, string(l))
			if i < len(raw.lits) {
				ev.raw = append(ev.raw, string(raw.lits[i]))
			}
		}
		cmd, err := parseCommand(raw)
		if err != nil {
			ev.name = "PARSE-ERROR"
			f.events <- ev
			w("* BAD parse error")
			continue
		}
		ev.name, ev.args = cmd.name, flatten(cmd.args)
		tag := cmd.tag
		switch cmd.name {
		case "CAPABILITY":
			f.events <- ev
			w("* CAPABILITY " + caps)
			w(tag + " OK done")
		case "STARTTLS":
			f.events <- ev
			w(tag + " OK Begin TLS")
			tc := tls.Server(conn, f.tlsConf)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, secure, caps = tc, true, f.caps
			r = wire.NewReader(conn, 10*time.Second, 0)
		case "ID":
			f.events <- ev
			w(`* ID ("name" "fake")`)
			w(tag + " OK ID done")
		case "LOGIN", "AUTHENTICATE":
			var user, pass string
			if cmd.name == "LOGIN" {
				if len(ev.args) == 2 {
					user, pass = ev.args[0], ev.args[1]
				}
			} else {
				resp := ""
				if len(ev.args) == 2 {
					resp = ev.args[1]
				} else {
					w("+ ")
					line, err := r.ReadLine()
					if err != nil {
						return
					}
					resp = string(line)
					ev.raw = append(ev.raw, resp)
				}
				msg, _ := base64.StdEncoding.DecodeString(resp)
				parts := strings.Split(string(msg), "\x00")
				if len(parts) == 3 {
					ev.args = append(ev.args, parts...)
					user, pass = parts[1], parts[2]
					if parts[0] != "" {
						user = parts[0] + "*" + parts[1]
					}
				}
			}
			f.events <- ev
			if pw, ok := f.users[user]; ok && pw == pass {
				if f.loginExtra != "" {
					w(f.loginExtra)
				}
				w(tag + " OK [CAPABILITY IMAP4rev1 IMAP4rev2 IDLE] Logged in")
				loggedIn = true
			} else {
				w(tag + " NO [AUTHENTICATIONFAILED] Authentication failed.")
			}
		case "LOGOUT":
			f.events <- ev
			w("* BYE Logging out")
			w(tag + " OK Logout completed")
			return
		default:
			f.events <- ev
			w(tag + " BAD unexpected")
		}
	}
}

// syncBuffer collects log output.
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

// tclient is the test's IMAP client.
type tclient struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
}

func (c *tclient) send(s string) {
	c.t.Helper()
	_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write([]byte(s)); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

// line reads one server line without CRLF.
func (c *tclient) line() string {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	l, err := c.br.ReadString('\n')
	if err != nil {
		c.t.Fatalf("client read: %v (got %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// expect reads one line and checks its prefix.
func (c *tclient) expect(prefix string) string {
	c.t.Helper()
	l := c.line()
	if !strings.HasPrefix(l, prefix) {
		c.t.Fatalf("got %q, want prefix %q", l, prefix)
	}
	return l
}

// expectClosed checks that the server closed the connection.
func (c *tclient) expectClosed() {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	l, err := c.br.ReadString('\n')
	if err == nil || isTimeout(err) {
		c.t.Fatalf("connection still open (read %q, err %v)", l, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// startTLS upgrades the client connection after a STARTTLS OK.
func (c *tclient) startTLS(pool *x509.CertPool) {
	c.t.Helper()
	tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("client TLS handshake: %v", err)
	}
	c.conn, c.br = tc, bufio.NewReader(tc)
}

// session is one Serve run against a test client.
type session struct {
	client *tclient
	sess   *proxy.Session
	logs   *syncBuffer
	cancel context.CancelFunc
	reason chan string
}

// waitReason returns Serve's end reason.
func (s *session) waitReason(t testing.TB) string {
	t.Helper()
	select {
	case r := <-s.reason:
		s.reason <- r
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
		return ""
	}
}

// startSession runs srv.Serve on a fresh TCP connection on 127.0.0.1; setup
// may change the session before Serve starts.
func startSession(t testing.TB, srv *Server, setup func(*proxy.Session)) *session {
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
	logs := &syncBuffer{}
	ap := func(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }
	sess := &proxy.Session{
		ID: "sess-1", Proto: "imap", Conn: sc, Remote: ap(sc.RemoteAddr()), Local: ap(sc.LocalAddr()),
		Start: time.Now(), TLSMode: config.TLSNone, Trusted: true,
		Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if setup != nil {
		setup(sess)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{client: &tclient{t: t, conn: cc, br: bufio.NewReader(cc)}, sess: sess, logs: logs,
		cancel: cancel, reason: make(chan string, 1)}
	go func() {
		r := srv.Serve(ctx, sess)
		sess.Conn.Close()
		sc.Close()
		s.reason <- r
	}()
	t.Cleanup(func() {
		cancel()
		s.client.conn.Close()
		select {
		case <-s.reason:
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return s
}

// newTestServer returns a Server whose director points at be (nil: a
// director refusing with proxy.ErrUnavailable).
func newTestServer(be *fakeBackend, mod func(*Options)) (*Server, *fakeDirector) {
	d := &fakeDirector{ip: netip.MustParseAddr("127.0.0.1")}
	o := Options{
		Director:    d,
		Backend:     proxy.BackendOptions{TLS: config.TLSNone, ConnectTimeout: 2 * time.Second, LoginTimeout: 3 * time.Second},
		IdleTimeout: 5 * time.Second,
	}
	if be != nil {
		o.Backend.Port = be.port()
	} else {
		d.err = proxy.ErrUnavailable
	}
	if mod != nil {
		mod(&o)
	}
	return New(o), d
}
