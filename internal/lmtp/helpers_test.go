package lmtp

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
	"errors"
	"fmt"
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

// testCert returns a self-signed certificate for 127.0.0.0/8 addresses and
// a pool that trusts it.
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
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(127, 0, 0, 2), net.IPv4(127, 0, 0, 3)},
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

// fakeDirector maps users to backend IPs. Users in fail get that error;
// users without a route go to def.
type fakeDirector struct {
	mu     sync.Mutex
	routes map[string]netip.Addr
	fail   map[string]error
	def    netip.Addr
	done   chan struct{} // the leases' Done channel (nil: never)
	users  []string      // every Acquire, in order

	acquired atomic.Int32
	released atomic.Int32
}

func (d *fakeDirector) Acquire(ctx context.Context, user string) (*proxy.Lease, error) {
	d.mu.Lock()
	d.users = append(d.users, user)
	err := d.fail[user]
	ip, ok := d.routes[user]
	var done <-chan struct{}
	if d.done != nil {
		done = d.done
	}
	d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if !ok {
		ip = d.def
	}
	d.acquired.Add(1)
	return proxy.NewLease(user, ip, done, func() { d.released.Add(1) }), nil
}

// route sends user to ip.
func (d *fakeDirector) route(user string, ip netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.routes[user] = ip
}

// failUser makes Acquire fail for user.
func (d *fakeDirector) failUser(user string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.fail[user] = err
}

func (d *fakeDirector) userList() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.users...)
}

// held is the number of leases not yet released.
func (d *fakeDirector) held() int32 { return d.acquired.Load() - d.released.Load() }

// fakeBackend is a small LMTP server standing in for Dovecot. It records
// the commands and the message (in wire form) of every connection and can
// be told to fail in specific ways.
type fakeBackend struct {
	t  testing.TB
	ip netip.Addr
	ln net.Listener

	ext       []string          // LHLO extensions (after the host line)
	xclient   string            // XCLIENT parameters to advertise; "" for none
	tls       *tls.Config       // offer STARTTLS
	mailReply string            // reply to MAIL (default 250)
	rcptReply map[string]string // address -> reply to RCPT (default 250)
	dataReply map[string]string // address -> reply after DATA (default 250)
	// closeMidData closes the connection after the first message line;
	// stall reads the message and then never answers.
	closeMidData bool
	stall        bool
	// onData runs after the message was read, before the replies.
	onData func()

	mu     sync.Mutex
	conns  []*backendRecord
	wg     sync.WaitGroup
	ctx    context.Context // ends with the test
	cancel context.CancelFunc
}

// backendRecord is what one connection to a fake backend received.
type backendRecord struct {
	cmds []string // command lines; "+TLS " prefixes lines read over TLS
	data []byte   // the message as received, without the final ".\r\n"
}

// newBackends starts n fake backends on 127.0.0.1, 127.0.0.2, ... sharing
// one port (usher reaches every backend on the same port), and returns
// them with that port.
func newBackends(t *testing.T, n int, configure func(i int, b *fakeBackend)) ([]*fakeBackend, int) {
	t.Helper()
	for attempt := 0; attempt < 50; attempt++ {
		var lns []net.Listener
		port := 0
		ok := true
		for i := 0; i < n; i++ {
			addr := fmt.Sprintf("127.0.0.%d:%d", i+1, port)
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				ok = false
				break
			}
			if port == 0 {
				port = ln.Addr().(*net.TCPAddr).Port
			}
			lns = append(lns, ln)
		}
		if !ok {
			for _, ln := range lns {
				ln.Close()
			}
			continue
		}
		bs := make([]*fakeBackend, n)
		for i, ln := range lns {
			ctx, cancel := context.WithCancel(context.Background())
			b := &fakeBackend{
				t:      t,
				ip:     netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i+1)),
				ln:     ln,
				ext:    []string{"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"},
				ctx:    ctx,
				cancel: cancel,
			}
			if configure != nil {
				configure(i, b)
			}
			bs[i] = b
			b.wg.Add(1)
			go b.accept()
			t.Cleanup(func() {
				cancel()
				ln.Close()
				b.wg.Wait()
			})
		}
		return bs, port
	}
	t.Fatal("no common port for the fake backends")
	return nil, 0
}

// records returns a copy of what each connection received.
func (b *fakeBackend) records() []backendRecord {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]backendRecord, len(b.conns))
	for i, r := range b.conns {
		out[i] = backendRecord{cmds: append([]string(nil), r.cmds...), data: bytes.Clone(r.data)}
	}
	return out
}

func (b *fakeBackend) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		rec := &backendRecord{}
		b.mu.Lock()
		b.conns = append(b.conns, rec)
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.Close()
			// Unblock a stalled or reading backend when the test ends.
			stop := context.AfterFunc(b.ctx, func() { c.Close() })
			defer stop()
			b.serve(c, rec)
		}()
	}
}

func (b *fakeBackend) record(rec *backendRecord, f func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f()
}

func (b *fakeBackend) serve(c net.Conn, rec *backendRecord) {
	_ = c.SetDeadline(time.Now().Add(2 * testTimeout))
	var conn net.Conn = c
	r := bufio.NewReader(conn)
	secure := false
	write := func(lines ...string) bool {
		_, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	if !write("220 fake" + b.ip.String() + " LMTP ready") {
		return
	}
	var accepted []string
	inMail := false
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line := strings.TrimRight(l, "\r\n")
		prefix := ""
		if secure {
			prefix = "+TLS "
		}
		b.record(rec, func() { rec.cmds = append(rec.cmds, prefix+line) })
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "LHLO":
			lines := []string{"250-fake" + b.ip.String()}
			ext := append([]string(nil), b.ext...)
			if b.xclient != "" {
				ext = append(ext, "XCLIENT "+b.xclient)
			}
			if b.tls != nil && !secure {
				ext = append(ext, "STARTTLS")
			}
			for i, e := range ext {
				sep := "-"
				if i == len(ext)-1 {
					sep = " "
				}
				lines = append(lines, "250"+sep+e)
			}
			if len(ext) == 0 {
				lines[0] = "250 fake" + b.ip.String()
			}
			write(lines...)
			accepted, inMail = nil, false
		case "STARTTLS":
			write("220 2.0.0 Begin TLS")
			tc := tls.Server(c, b.tls)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, r, secure = tc, bufio.NewReader(tc), true
			accepted, inMail = nil, false
		case "XCLIENT":
			write("220 fake" + b.ip.String() + " XCLIENT accepted")
			accepted, inMail = nil, false
		case "MAIL":
			if b.mailReply != "" {
				write(b.mailReply)
				continue
			}
			inMail = true
			write("250 2.1.0 OK")
		case "RCPT":
			if !inMail {
				write("503 5.5.1 MAIL needed first")
				continue
			}
			addr := strings.TrimSuffix(strings.TrimPrefix(arg, "TO:<"), ">")
			if rep, ok := b.rcptReply[addr]; ok {
				write(rep)
				continue
			}
			accepted = append(accepted, addr)
			write("250 2.1.5 OK")
		case "DATA":
			if len(accepted) == 0 {
				write("503 5.5.1 No valid recipients")
				continue
			}
			write("354 OK")
			var data []byte
			for first := true; ; first = false {
				dl, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if dl == ".\r\n" {
					break
				}
				data = append(data, dl...)
				if first && b.closeMidData {
					return
				}
			}
			b.record(rec, func() { rec.data = data })
			if b.onData != nil {
				b.onData()
			}
			if b.stall {
				<-b.ctx.Done()
				return
			}
			for _, a := range accepted {
				if rep, ok := b.dataReply[a]; ok {
					write(rep)
				} else {
					write("250 2.0.0 <" + a + "> Saved")
				}
			}
			accepted, inMail = nil, false
		case "RSET":
			accepted, inMail = nil, false
			write("250 2.0.0 OK")
		case "QUIT":
			write("221 2.0.0 Bye")
			return
		default:
			write("500 5.5.2 Unknown command")
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
	mode config.TLSMode
	tls  *tls.Config
}

// options returns Options for the fake director and a backend port.
func options(d *fakeDirector, port int) Options {
	return Options{
		Director:    d,
		Hostname:    "usher.test",
		IdleTimeout: testTimeout,
		DataTimeout: testTimeout,
		Backend: proxy.BackendOptions{
			Port:           port,
			TLS:            config.TLSNone,
			ConnectTimeout: testTimeout,
			LoginTimeout:   testTimeout,
		},
	}
}

func startSession(t *testing.T, srv *Server, so sessionOpts) *harness {
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
		Proto:     "lmtp",
		Conn:      sc,
		Remote:    netip.MustParseAddrPort(cc.LocalAddr().String()),
		Local:     netip.MustParseAddrPort(sc.LocalAddr().String()),
		Start:     time.Now(),
		Log:       slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		TLSMode:   so.mode,
		TLSConfig: so.tls,
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, sess: sess, logs: logs, cancel: cancel, reason: make(chan string, 1),
		c: &testClient{t: t, conn: cc, r: bufio.NewReader(cc)}}
	go func() {
		r := srv.Serve(ctx, sess)
		sess.Conn.Close()
		sc.Close()
		h.reason <- r
	}()
	t.Cleanup(func() {
		cancel()
		cc.Close()
		select {
		case <-h.reason:
		case <-time.After(2 * testTimeout):
			t.Error("Serve did not return after cleanup")
		}
	})
	h.c.expect("220 usher.test usher LMTP ready")
	return h
}

// wait returns Serve's reason.
func (h *harness) wait() string {
	h.t.Helper()
	select {
	case r := <-h.reason:
		h.reason <- r // keep it for Cleanup
		return r
	case <-time.After(2 * testTimeout):
		h.t.Fatal("Serve did not return")
		return ""
	}
}

// lhlo sends LHLO and returns the extension lines.
func (h *harness) lhlo() []string {
	h.t.Helper()
	h.c.send("LHLO client.example")
	lines := h.c.reply()
	if len(lines) == 0 || lines[0] != "250-usher.test" && lines[0] != "250 usher.test" {
		h.t.Fatalf("LHLO reply %q", lines)
	}
	return lines[1:]
}

// testClient is the MTA side.
type testClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func (c *testClient) send(lines ...string) {
	c.t.Helper()
	c.write(strings.Join(lines, "\r\n") + "\r\n")
}

func (c *testClient) write(s string) {
	c.t.Helper()
	_ = c.conn.SetWriteDeadline(time.Now().Add(testTimeout))
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) line() string {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(2 * testTimeout))
	l, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read reply: %v (got %q)", err, l)
	}
	if !strings.HasSuffix(l, "\r\n") {
		c.t.Fatalf("reply %q not ended by CRLF", l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// reply reads one possibly multi-line reply.
func (c *testClient) reply() []string {
	c.t.Helper()
	var out []string
	for {
		l := c.line()
		out = append(out, l)
		if len(l) < 4 || l[3] != '-' {
			return out
		}
	}
}

// expect reads one single-line reply and checks it equals want.
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

// startTLS upgrades the client side after 220 to STARTTLS.
func (c *testClient) startTLS(pool *x509.CertPool) {
	c.t.Helper()
	tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	_ = tc.SetDeadline(time.Now().Add(testTimeout))
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("client TLS handshake: %v", err)
	}
	_ = tc.SetDeadline(time.Time{})
	c.conn, c.r = tc, bufio.NewReader(tc)
}

// stuff dot-stuffs message lines and ends each with CRLF (RFC 5321
// section 4.5.2): the wire form the backends must receive.
func stuff(lines ...string) string {
	var sb strings.Builder
	for _, l := range lines {
		if strings.HasPrefix(l, ".") {
			sb.WriteByte('.')
		}
		sb.WriteString(l)
		sb.WriteString("\r\n")
	}
	return sb.String()
}

// rcptsOf returns the RCPT commands in a backend record.
func rcptsOf(rec backendRecord) []string {
	var out []string
	for _, c := range rec.cmds {
		if strings.HasPrefix(c, "RCPT ") {
			out = append(out, c)
		}
	}
	return out
}

// waitFor polls cond until it holds or the test times out.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// hasExt reports whether an LHLO reply's extension lines list ext.
func hasExt(lines []string, ext string) bool {
	for _, l := range lines {
		if len(l) > 4 && l[4:] == ext {
			return true
		}
	}
	return false
}
