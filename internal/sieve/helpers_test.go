package sieve

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
	"strconv"
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
	name string   // command name, upper case
	args []string // string and atom arguments
	raw  string   // the command as received, literals included
	tls  bool     // received over TLS
	post bool     // received after a successful login
}

// fakeBackend is a small ManageSieve server on 127.0.0.1 standing in for
// Dovecot's managesieve-login and managesieve.
type fakeBackend struct {
	t         testing.TB
	ln        net.Listener
	sasl      string // SASL capability; "" omits it
	xclient   bool   // advertise XCLIENT
	xclientNO bool   // refuse XCLIENT
	tlsOnly   bool   // list SASL mechanisms only over TLS, as Dovecot with disable_plaintext_auth
	greeting  string // replaces the whole capability greeting when set
	tlsConf   *tls.Config
	users     map[string]string // user -> password; "*" joins authzid and authcid
	noReply   string            // replaces the answer to a rejected login
	okReply   string            // replaces the answer to a successful login
	events    chan beEvent
}

func newFakeBackend(t testing.TB, setup func(*fakeBackend)) *fakeBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeBackend{
		t: t, ln: ln, sasl: "PLAIN LOGIN",
		users:  map[string]string{"alice": "secret"},
		events: make(chan beEvent, 100),
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

// noEvent checks that the backend receives nothing for a while.
func (f *fakeBackend) noEvent(t testing.TB) {
	t.Helper()
	select {
	case ev := <-f.events:
		t.Errorf("backend got unexpected %s %q", ev.name, ev.args)
	case <-time.After(100 * time.Millisecond):
	}
}

func (f *fakeBackend) capabilities(secure bool) string {
	if f.greeting != "" {
		return f.greeting
	}
	s := "\"IMPLEMENTATION\" \"fake\"\r\n\"SIEVE\" \"fileinto vacation\"\r\n"
	switch {
	case f.tlsOnly && !secure:
		s += "\"SASL\" \"\"\r\n"
	case f.sasl != "":
		s += "\"SASL\" \"" + f.sasl + "\"\r\n"
	}
	if f.tlsConf != nil && !secure {
		s += "\"STARTTLS\"\r\n"
	}
	s += "\"VERSION\" \"1.0\"\r\n"
	if f.xclient {
		s += "\"XCLIENT\"\r\n"
	}
	return s + "OK \"fake ready\"\r\n"
}

func (f *fakeBackend) serve(conn net.Conn) {
	defer func() { conn.Close() }()
	w := func(s string) { _, _ = conn.Write([]byte(s)) }
	secure, loggedIn := false, false
	w(f.capabilities(secure))
	r := wire.NewReader(conn, 10*time.Second, 0)
	lim := frameLimits{literal: 1 << 20, literals: 16, total: 4 << 20}
	for {
		fr, err := readFrame(r, lim)
		if err != nil {
			return
		}
		ev := beEvent{raw: string(fr.bytes()), tls: secure, post: loggedIn}
		cmd, err := parseCommand(fr)
		if err != nil {
			ev.name = "PARSE-ERROR"
			f.events <- ev
			w("NO \"parse error\"\r\n")
			continue
		}
		ev.name = cmd.name
		for _, a := range cmd.args {
			ev.args = append(ev.args, a.s)
		}
		if loggedIn {
			f.events <- ev
			if cmd.name == "LOGOUT" {
				w("OK \"Logout completed.\"\r\n")
				return
			}
			w("OK \"" + strings.ToLower(cmd.name) + " done\"\r\n")
			continue
		}
		switch cmd.name {
		case "CAPABILITY":
			f.events <- ev
			w(f.capabilities(secure))
		case "STARTTLS":
			f.events <- ev
			w("OK \"Begin TLS negotiation now.\"\r\n")
			tc := tls.Server(conn, f.tlsConf)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, secure = tc, true
			r = wire.NewReader(conn, 10*time.Second, 0)
			w(f.capabilities(secure))
		case "XCLIENT":
			f.events <- ev
			if f.xclientNO {
				w("NO \"You are not from trusted IP\"\r\n")
			} else {
				w("OK \"Updated\"\r\n")
			}
		case "AUTHENTICATE":
			if len(cmd.args) == 0 || !cmd.args[0].isString() || asciiUpper(cmd.args[0].s) != "PLAIN" {
				f.events <- ev
				w("NO \"Unsupported authentication mechanism.\"\r\n")
				continue
			}
			resp := ""
			if len(cmd.args) == 2 {
				resp = cmd.args[1].s
			} else {
				w("\"\"\r\n")
				fr, err := readFrame(r, lim)
				if err != nil {
					return
				}
				ev.raw += string(fr.bytes())
				args, _ := parseArgs(fr)
				if len(args) == 1 {
					resp = args[0].s
				}
			}
			var user, pass string
			msg, _ := base64.StdEncoding.DecodeString(resp)
			if parts := strings.Split(string(msg), "\x00"); len(parts) == 3 {
				ev.args = append(ev.args, parts...)
				user, pass = parts[1], parts[2]
				if parts[0] != "" {
					user = parts[0] + "*" + parts[1]
				}
			}
			f.events <- ev
			if pw, ok := f.users[user]; ok && pw == pass {
				if f.okReply != "" {
					w(f.okReply)
				} else {
					w("OK \"Logged in.\"\r\n")
				}
				loggedIn = true
			} else if f.noReply != "" {
				w(f.noReply)
			} else {
				w("NO \"Authentication failed.\"\r\n")
			}
		case "LOGOUT":
			f.events <- ev
			w("OK \"Logout completed.\"\r\n")
			return
		default:
			f.events <- ev
			w("NO \"unexpected\"\r\n")
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

// tclient is the test's ManageSieve client.
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

// capabilities reads capability lines up to the OK and returns them by
// upper-cased name, and the OK line.
func (c *tclient) capabilities() (map[string]string, string) {
	c.t.Helper()
	caps := map[string]string{}
	for range 50 {
		l := c.line()
		if strings.HasPrefix(l, "OK") {
			return caps, l
		}
		f := &rawFrame{lines: [][]byte{[]byte(l)}}
		args, err := parseArgs(f)
		if err != nil || len(args) == 0 || len(args) > 2 || !args[0].isString() {
			c.t.Fatalf("invalid capability line %q (%v)", l, err)
		}
		name := strings.ToUpper(args[0].s)
		if _, dup := caps[name]; dup {
			c.t.Errorf("capability %s listed twice", name)
		}
		caps[name] = ""
		if len(args) == 2 {
			caps[name] = args[1].s
		}
	}
	c.t.Fatal("capability response without OK")
	return nil, ""
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
// may change the session before Serve starts. The session is trusted and
// without TLS unless setup says otherwise.
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
		ID: "sess-1", Proto: "sieve", Conn: sc, Remote: ap(sc.RemoteAddr()), Local: ap(sc.LocalAddr()),
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

// greet reads the greeting (capabilities and OK).
func (s *session) greet() map[string]string {
	caps, _ := s.client.capabilities()
	return caps
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

func plainB64(authz, authc, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(authz + "\x00" + authc + "\x00" + pass))
}

// lit renders s as a client literal.
func lit(s string, nonSync bool) string {
	plus := ""
	if nonSync {
		plus = "+"
	}
	return "{" + strconv.Itoa(len(s)) + plus + "}\r\n" + s
}

// checkSpliced uploads a script after login and checks that the backend gets
// it verbatim and its answer comes back.
func checkSpliced(t *testing.T, c *tclient, be *fakeBackend) {
	t.Helper()
	script := "require \"fileinto\";\r\nfileinto \"Junk\";\r\n"
	c.send(`PUTSCRIPT "usher-test" ` + lit(script, true) + "\r\n")
	ev := be.nextNamed(t, "PUTSCRIPT")
	if !ev.post || len(ev.args) != 2 || ev.args[0] != "usher-test" || ev.args[1] != script {
		t.Errorf("backend got PUTSCRIPT %q (after login: %v)", ev.args, ev.post)
	}
	c.expect(`OK "putscript done"`)
}
