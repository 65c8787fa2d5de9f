package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/testutil"
)

const refusal = "* BYE [UNAVAILABLE] Too many connections\r\n"

// greetHandler reports each session on ch (buffered by the caller), greets
// with "HELLO <id>" and reads until the client closes.
func greetHandler(ch chan<- *Session) Handler {
	return handlerFunc(func(ctx context.Context, s *Session) string {
		if ch != nil {
			ch <- s
		}
		if _, err := fmt.Fprintf(s.Conn, "HELLO %s\r\n", s.ID); err != nil {
			return "write failed"
		}
		if _, err := io.Copy(io.Discard, s.Conn); err != nil {
			return "read failed"
		}
		return "client closed"
	})
}

// expectAdmitted reads the greeting of an admitted session.
func expectAdmitted(t *testing.T, c net.Conn) {
	t.Helper()
	if l := readLine(t, c); !strings.HasPrefix(l, "HELLO ") {
		t.Fatalf("admitted client got %q, want a HELLO greeting", l)
	}
}

// expectRefused reads the refusal line, then EOF.
func expectRefused(t *testing.T, c net.Conn) {
	t.Helper()
	if l := readLine(t, c); l != refusal {
		t.Fatalf("refused client got %q, want %q", l, refusal)
	}
	expectEOF(t, c)
}

func TestMaxSessions(t *testing.T) {
	ts := startServer(t, ServerOptions{Handler: greetHandler(nil), MaxSessions: 2, Refusal: refusal})

	c1 := dialFrom(t, "", ts.addr)
	expectAdmitted(t, c1)
	c2 := dialFrom(t, "", ts.addr)
	expectAdmitted(t, c2)
	if n := ts.srv.Sessions(); n != 2 {
		t.Fatalf("Sessions() = %d with two admitted, want 2", n)
	}

	c3 := dialFrom(t, "", ts.addr)
	expectRefused(t, c3)
	if n := ts.srv.Sessions(); n != 2 {
		t.Fatalf("Sessions() = %d after a refusal, want 2 (refused must not count)", n)
	}

	// One leaves: the next one is admitted.
	c1.Close()
	testutil.WaitFor(t, ioTimeout, "Sessions() == 1", func() bool { return ts.srv.Sessions() == 1 })
	c4 := dialFrom(t, "", ts.addr)
	expectAdmitted(t, c4)

	// Still full.
	c5 := dialFrom(t, "", ts.addr)
	expectRefused(t, c5)

	c2.Close()
	c4.Close()
	testutil.WaitFor(t, ioTimeout, "Sessions() == 0", func() bool { return ts.srv.Sessions() == 0 })

	recs := ts.logs.records(t)
	refused := withMsg(recs, "connection refused")
	if len(refused) != 2 {
		t.Fatalf("%d 'connection refused' lines, want 2:\n%s", len(refused), ts.logs)
	}
	for _, r := range refused {
		if r["reason"] != "max_sessions reached" {
			t.Errorf("refusal reason %v, want max_sessions reached", r["reason"])
		}
		for _, k := range []string{"session", "proto", "remote"} {
			if _, ok := r[k]; !ok {
				t.Errorf("refusal line lacks key %q: %v", k, r)
			}
		}
	}
	// Refused connections are not sessions: 3 admitted, 3 starts, 3 ends.
	if n := len(withMsg(recs, "session start")); n != 3 {
		t.Errorf("%d session start lines, want 3", n)
	}
	if n := len(withMsg(recs, "session end")); n != 3 {
		t.Errorf("%d session end lines, want 3", n)
	}
}

func TestMaxSessionsPerIP(t *testing.T) {
	ts := startServer(t, ServerOptions{Handler: greetHandler(nil), MaxSessionsPerIP: 2, Refusal: refusal})

	a1 := dialFrom(t, "127.0.0.1", ts.addr)
	expectAdmitted(t, a1)
	a2 := dialFrom(t, "127.0.0.1", ts.addr)
	expectAdmitted(t, a2)
	a3 := dialFrom(t, "127.0.0.1", ts.addr)
	expectRefused(t, a3)

	// Another IP is not affected by 127.0.0.1's count.
	b1 := dialFrom(t, "127.0.0.2", ts.addr)
	expectAdmitted(t, b1)
	b2 := dialFrom(t, "127.0.0.2", ts.addr)
	expectAdmitted(t, b2)
	b3 := dialFrom(t, "127.0.0.2", ts.addr)
	expectRefused(t, b3)
	if n := ts.srv.Sessions(); n != 4 {
		t.Fatalf("Sessions() = %d, want 4", n)
	}

	// 127.0.0.1 frees a slot; 127.0.0.2 stays full.
	a1.Close()
	testutil.WaitFor(t, ioTimeout, "Sessions() == 3", func() bool { return ts.srv.Sessions() == 3 })
	a4 := dialFrom(t, "127.0.0.1", ts.addr)
	expectAdmitted(t, a4)
	b4 := dialFrom(t, "127.0.0.2", ts.addr)
	expectRefused(t, b4)

	for _, c := range []net.Conn{a2, a4, b1, b2} {
		c.Close()
	}
	testutil.WaitFor(t, ioTimeout, "Sessions() == 0", func() bool { return ts.srv.Sessions() == 0 })

	refused := withMsg(ts.logs.records(t), "connection refused")
	if len(refused) != 3 {
		t.Fatalf("%d 'connection refused' lines, want 3:\n%s", len(refused), ts.logs)
	}
	for _, r := range refused {
		if r["reason"] != "max_sessions_per_ip reached" {
			t.Errorf("refusal reason %v, want max_sessions_per_ip reached", r["reason"])
		}
	}
	// The per-IP table must not keep entries for IPs with no session.
	ts.srv.lim.mu.Lock()
	left := len(ts.srv.lim.perIP)
	ts.srv.lim.mu.Unlock()
	if left != 0 {
		t.Errorf("perIP has %d entries after all sessions closed, want 0", left)
	}
}

func TestSessionFieldsAndTrusted(t *testing.T) {
	ch := make(chan *Session, 4)
	ts := startServer(t, ServerOptions{
		Proto:   "pop3",
		Handler: greetHandler(ch),
		Trusted: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
	})

	for _, tc := range []struct {
		from    string
		trusted bool
	}{{"127.0.0.1", true}, {"127.0.0.2", false}} {
		c := dialFrom(t, tc.from, ts.addr)
		expectAdmitted(t, c)
		s := <-ch
		if s.Trusted != tc.trusted {
			t.Errorf("from %s: Trusted = %v, want %v", tc.from, s.Trusted, tc.trusted)
		}
		if s.PlaintextAllowed() != tc.trusted {
			t.Errorf("from %s: PlaintextAllowed() = %v, want %v (plaintext listener)", tc.from, s.PlaintextAllowed(), tc.trusted)
		}
		if s.Secure {
			t.Errorf("from %s: Secure on a plaintext listener", tc.from)
		}
		if s.Proto != "pop3" {
			t.Errorf("Proto = %q, want pop3", s.Proto)
		}
		if s.TLSMode != config.TLSNone {
			t.Errorf("TLSMode = %q, want %q for a listener with no mode", s.TLSMode, config.TLSNone)
		}
		if s.ID == "" || strings.ContainsAny(s.ID, " \r\n\t") {
			t.Errorf("session ID %q is empty or not printable", s.ID)
		}
		if got, want := s.Remote.String(), c.LocalAddr().String(); got != want {
			t.Errorf("Remote = %s, want the client's address %s", got, want)
		}
		if got, want := s.Local.String(), ts.addr; got != want {
			t.Errorf("Local = %s, want the listener's address %s", got, want)
		}
		if s.Log == nil || s.Start.IsZero() {
			t.Error("Log or Start not set")
		}
		// The handler gets the socket with raw reads and writes
		// (rawconn_linux.go) where there are such; the socket under it.
		if _, ok := unwrapConn(s.Conn).(*net.TCPConn); !ok {
			t.Errorf("Conn = %T, want a *net.TCPConn under it", s.Conn)
		}
		if _, raw := unwrapRaw(s.Conn); raw != (runtime.GOOS == "linux") {
			t.Errorf("Conn = %T: raw wrapper %v on %s", s.Conn, raw, runtime.GOOS)
		}
		c.Close()
	}
}

func TestTrustedNone(t *testing.T) {
	ch := make(chan *Session, 1)
	ts := startServer(t, ServerOptions{
		Handler: greetHandler(ch),
		Trusted: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("127.0.0.2/32")},
	})
	c := dialFrom(t, "127.0.0.1", ts.addr)
	expectAdmitted(t, c)
	if s := <-ch; s.Trusted {
		t.Error("127.0.0.1 is Trusted although only 10/8 and 127.0.0.2/32 are listed")
	}
}

func TestSessionIDsUnique(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := newSessionID()
		if seen[id] {
			t.Fatalf("duplicate session id %q", id)
		}
		seen[id] = true
	}
}

func TestImplicitTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	type seen struct {
		secure, isTLS, plain bool
		mode                 config.TLSMode
		cfg                  *tls.Config
	}
	ch := make(chan seen, 4)
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			_, isTLS := s.Conn.(*tls.Conn)
			ch <- seen{s.Secure, isTLS, s.PlaintextAllowed(), s.TLSMode, s.TLSConfig}
			_ = s.Conn.SetDeadline(time.Now().Add(ioTimeout))
			line := make([]byte, 64)
			n, err := s.Conn.Read(line)
			if err != nil {
				return "read failed"
			}
			if _, err := s.Conn.Write(append([]byte("ECHO "), line[:n]...)); err != nil {
				return "write failed"
			}
			return "done"
		}),
		Listeners:        []ListenerSpec{{Address: "127.0.0.1:0", TLS: config.TLSImplicit, TLSConfig: pki.Server}},
		HandshakeTimeout: 300 * time.Millisecond,
	})

	t.Run("tls client", func(t *testing.T) {
		d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: ioTimeout}, Config: &tls.Config{RootCAs: pki.Pool}}
		c, err := d.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatalf("tls dial: %v", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		s := <-ch
		if !s.secure || !s.isTLS || !s.plain {
			t.Errorf("handler saw Secure=%v, Conn is *tls.Conn=%v, PlaintextAllowed=%v; want all true", s.secure, s.isTLS, s.plain)
		}
		if s.mode != config.TLSImplicit || s.cfg != pki.Server {
			t.Errorf("handler saw TLSMode=%q TLSConfig=%p, want implicit and the listener's config", s.mode, s.cfg)
		}
		if _, err := c.Write([]byte("ping\r\n")); err != nil {
			t.Fatal(err)
		}
		if l := readLine(t, c); l != "ECHO ping\r\n" {
			t.Errorf("echo over TLS = %q", l)
		}
	})

	t.Run("plaintext client", func(t *testing.T) {
		c := dialFrom(t, "", ts.addr)
		if _, err := c.Write([]byte("a001 LOGIN user pass\r\n")); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
		_, err := io.ReadAll(c) // a TLS alert at most, then EOF
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server did not close a plaintext connection on an implicit TLS listener")
		}
		if time.Since(start) > 250*time.Millisecond {
			t.Logf("note: a non-TLS first record took %v to fail", time.Since(start))
		}
	})

	t.Run("silent client", func(t *testing.T) {
		c := dialFrom(t, "", ts.addr)
		start := time.Now()
		_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
		_, err := io.ReadAll(c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server did not give up the handshake after HandshakeTimeout")
		}
		if el := time.Since(start); el < 250*time.Millisecond {
			t.Errorf("handshake abandoned after %v, before the 300ms HandshakeTimeout", el)
		}
	})

	if len(ch) != 0 {
		t.Errorf("handler was called %d times for sessions whose handshake failed", len(ch))
	}
	testutil.WaitFor(t, ioTimeout, "Sessions() == 0", func() bool { return ts.srv.Sessions() == 0 })
	ends := withMsg(ts.logs.records(t), "session end")
	failed := 0
	for _, r := range ends {
		if r["reason"] == "tls handshake failed" {
			failed++
		}
	}
	if len(ends) != 3 || failed != 2 {
		t.Errorf("%d session end lines (%d with reason tls handshake failed), want 3 and 2:\n%s", len(ends), failed, ts.logs)
	}
}

func TestSessionLogLines(t *testing.T) {
	ch := make(chan string, 8)
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			s.User = "user-" + s.ID
			s.Backend = "127.0.0.9:143"
			s.BytesIn.Add(10)
			s.BytesOut.Add(2000)
			ch <- s.ID
			_, _ = io.Copy(io.Discard, s.Conn)
			return "logout"
		}),
	})
	const n = 5
	remotes := map[string]bool{}
	for range n {
		c := dialFrom(t, "", ts.addr)
		remotes[c.LocalAddr().String()] = true
		<-ch
		c.Close()
	}
	testutil.WaitFor(t, ioTimeout, "Sessions() == 0", func() bool { return ts.srv.Sessions() == 0 })

	recs := ts.logs.records(t)
	starts := map[string]map[string]any{}
	ends := map[string]map[string]any{}
	for _, r := range recs {
		id, _ := r["session"].(string)
		switch r["msg"] {
		case "session start":
			if starts[id] != nil {
				t.Errorf("two session start lines for %q", id)
			}
			starts[id] = r
		case "session end":
			if ends[id] != nil {
				t.Errorf("two session end lines for %q", id)
			}
			ends[id] = r
		}
	}
	if len(starts) != n || len(ends) != n {
		t.Fatalf("%d start and %d end lines (by session id), want %d each:\n%s", len(starts), len(ends), n, ts.logs)
	}
	for id, st := range starts {
		if id == "" {
			t.Error("session start without a session id")
		}
		end := ends[id]
		if end == nil {
			t.Errorf("session %q has a start line but no end line with the same id", id)
			continue
		}
		for _, k := range []string{"session", "proto", "remote"} {
			if _, ok := st[k]; !ok {
				t.Errorf("start line lacks %q: %v", k, st)
			}
		}
		for _, k := range []string{"session", "proto", "remote", "user", "backend", "bytes_in", "bytes_out", "duration", "reason"} {
			if _, ok := end[k]; !ok {
				t.Errorf("end line lacks %q: %v", k, end)
			}
		}
		if st["proto"] != "imap" || end["proto"] != "imap" {
			t.Errorf("proto = %v / %v, want imap", st["proto"], end["proto"])
		}
		if st["remote"] != end["remote"] || !remotes[fmt.Sprint(end["remote"])] {
			t.Errorf("remote %v / %v is not one of the clients %v", st["remote"], end["remote"], remotes)
		}
		if end["user"] != "user-"+id || end["backend"] != "127.0.0.9:143" {
			t.Errorf("user/backend = %v/%v", end["user"], end["backend"])
		}
		if end["bytes_in"] != float64(10) || end["bytes_out"] != float64(2000) {
			t.Errorf("bytes_in/bytes_out = %v/%v, want 10/2000", end["bytes_in"], end["bytes_out"])
		}
		if end["reason"] != "logout" {
			t.Errorf("reason = %v, want the handler's logout", end["reason"])
		}
		if d, err := time.ParseDuration(fmt.Sprint(end["duration"])); err != nil || d < 0 || d > ioTimeout {
			t.Errorf("duration %v: not a sane duration (%v)", end["duration"], err)
		}
	}
}

func TestServeStopsOnCancel(t *testing.T) {
	started := make(chan struct{}, 4)
	reasons := make(chan error, 4)
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			started <- struct{}{}
			// No deadline on purpose: only the server's cancellation can
			// unblock this read.
			_, err := s.Conn.Read(make([]byte, 1))
			reasons <- err
			return "unblocked"
		}),
		Listeners: []ListenerSpec{{Address: "127.0.0.1:0"}, {Address: "127.0.0.1:0"}},
	})
	var clients []net.Conn
	for _, a := range ts.addrs {
		for range 2 {
			clients = append(clients, dialFrom(t, "", a))
			<-started
		}
	}
	if n := ts.srv.Sessions(); n != 4 {
		t.Fatalf("Sessions() = %d, want 4", n)
	}

	ts.stop(t)

	for range 4 {
		if err := <-reasons; err == nil {
			t.Error("handler read returned no error after shutdown")
		}
	}
	for _, c := range clients {
		expectEOF(t, c)
	}
	if n := ts.srv.Sessions(); n != 0 {
		t.Errorf("Sessions() = %d after Serve returned, want 0", n)
	}
	for _, a := range ts.addrs {
		if c, err := net.DialTimeout("tcp", a, ioTimeout); err == nil {
			c.Close()
			t.Errorf("listener %s still accepts after Serve returned", a)
		}
	}
	if n := len(withMsg(ts.logs.records(t), "session end")); n != 4 {
		t.Errorf("%d session end lines after shutdown, want 4", n)
	}
}

func TestListenErrors(t *testing.T) {
	h := greetHandler(nil)
	s := NewServer(ServerOptions{Proto: "imap", Handler: h, Logger: discardLogger(),
		Listeners: []ListenerSpec{{Address: "127.0.0.1:0", TLS: config.TLSImplicit}}})
	if err := s.Listen(); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("implicit TLS listener without a config: err = %v, want a certificate error", err)
	}

	// Address in use: the first listener opened must be closed again.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	s = NewServer(ServerOptions{Proto: "imap", Handler: h, Logger: discardLogger(),
		Listeners: []ListenerSpec{{Address: "127.0.0.1:0"}, {Address: busy.Addr().String()}}})
	err = s.Listen()
	if err == nil || !strings.Contains(err.Error(), "listen imap") {
		t.Fatalf("listen on a busy address: err = %v, want a 'listen imap' error", err)
	}
	if len(s.lns) != 1 {
		t.Fatalf("%d listeners recorded, want the 1 opened before the failure", len(s.lns))
	}
	if c, err := net.DialTimeout("tcp", s.lns[0].Addr().String(), ioTimeout); err == nil {
		c.Close()
		t.Error("listener opened before the failing one is still open")
	}
}

func TestAddrPortUnmaps(t *testing.T) {
	for _, tc := range []struct {
		in   net.Addr
		want string
	}{
		// net.ParseIP returns IPv4 in 16-byte form: it must not come out as
		// ::ffff:127.0.0.1, or trusted prefixes and per-IP counts break.
		{&net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 1143}, "127.0.0.1:1143"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.0.0.5"), Port: 143}, "10.0.0.5:143"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 993}, "[2001:db8::1]:993"},
	} {
		if got := addrPort(tc.in).String(); got != tc.want {
			t.Errorf("addrPort(%v) = %s, want %s", tc.in, got, tc.want)
		}
	}
	if got := addrPort(&net.UnixAddr{Name: "/x", Net: "unix"}); got.IsValid() {
		t.Errorf("addrPort(unix) = %v, want the zero AddrPort", got)
	}
}

// TestStartTLSConnClosedOnShutdown: after a handler replaced sess.Conn with a
// TLS layer (STARTTLS), cancelling Serve still unblocks it.
func TestStartTLSConnClosedOnShutdown(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	upgraded := make(chan struct{}, 1)
	readErr := make(chan error, 1)
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			if s.TLSMode != config.TLSStartTLS || s.TLSConfig != pki.Server {
				t.Errorf("TLSMode=%q TLSConfig=%p, want starttls and the listener config", s.TLSMode, s.TLSConfig)
			}
			_ = s.Conn.SetDeadline(time.Now().Add(ioTimeout))
			tc := tls.Server(s.Conn, s.TLSConfig)
			if err := tc.HandshakeContext(ctx); err != nil {
				return "starttls failed"
			}
			_ = tc.SetDeadline(time.Time{}) // only shutdown can unblock the read
			s.Conn, s.Secure = tc, true
			upgraded <- struct{}{}
			_, err := tc.Read(make([]byte, 1))
			readErr <- err
			return "shutdown"
		}),
		Listeners: []ListenerSpec{{Address: "127.0.0.1:0", TLS: config.TLSStartTLS, TLSConfig: pki.Server}},
	})
	raw := dialFrom(t, "", ts.addr)
	c := tls.Client(raw, &tls.Config{RootCAs: pki.Pool, ServerName: "127.0.0.1"})
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	<-upgraded
	ts.stop(t)
	select {
	case err := <-readErr:
		if err == nil {
			t.Error("read on the upgraded conn returned no error after shutdown")
		}
	default:
		t.Error("Serve returned while the handler was still blocked")
	}
}

// A session that has not logged in within LoginTimeout has its context
// cancelled with cause ErrLoginTimeout, however busy the client is, and ends
// with reason "login timeout"; a logged-in session is left alone.
func TestLoginTimeout(t *testing.T) {
	causes := make(chan bool, 2)
	ts := startServer(t, ServerOptions{LoginTimeout: 200 * time.Millisecond,
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			r := bufio.NewReader(s.Conn)
			line, err := r.ReadString('\n')
			if err != nil {
				return "read failed"
			}
			if line == "login\n" {
				s.LoginDone(LoginOK, netip.MustParseAddr("127.0.0.1"), 0)
				select {
				case <-ctx.Done():
					causes <- LoginTimedOut(ctx)
					return "cancelled"
				case <-time.After(400 * time.Millisecond):
					causes <- false
					return "done"
				}
			}
			// Busy but not logging in: a line every 50ms.
			for {
				select {
				case <-ctx.Done():
					causes <- LoginTimedOut(ctx)
					return "shutdown"
				default:
				}
				_ = s.Conn.SetReadDeadline(time.Now().Add(time.Second))
				if _, err := r.ReadString('\n'); err != nil && ctx.Err() == nil {
					return "read failed"
				}
			}
		})})

	busy := dialFrom(t, "", ts.addr)
	stopBusy := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopBusy:
				return
			case <-time.After(50 * time.Millisecond):
				if _, err := busy.Write([]byte("noop\n")); err != nil {
					return
				}
			}
		}
	}()
	defer close(stopBusy)
	if timedOut := <-causes; !timedOut {
		t.Error("busy pre-login session: context cause is not ErrLoginTimeout")
	}
	loggedIn := dialFrom(t, "", ts.addr)
	if _, err := loggedIn.Write([]byte("login\n")); err != nil {
		t.Fatal(err)
	}
	if timedOut := <-causes; timedOut {
		t.Error("a logged-in session was cancelled by the login timeout")
	}
	testutil.WaitFor(t, ioTimeout, "Sessions() == 0", func() bool { return ts.srv.Sessions() == 0 })
	reasons := map[any]int{}
	for _, r := range withMsg(ts.logs.records(t), "session end") {
		reasons[r["reason"]]++
	}
	if reasons["login timeout"] != 1 || reasons["done"] != 1 {
		t.Errorf("session end reasons %v, want one login timeout and one done", reasons)
	}
	if n := len(withMsg(ts.logs.records(t), "login timeout")); n != 1 {
		t.Errorf("%d login timeout log lines, want 1", n)
	}
}

// testHandedOffSession: through a Server, the Handler returns as soon as
// Splice has handed the session over (to the Relay rl, or without one to
// fresh goroutines), yet the session counts as open (limits, drain) until it
// ends, and it is logged once, with its reason and byte counts. pairs, when
// set, counts the Relay's sessions.
func testHandedOffSession(t *testing.T, rl *Relay, pairs func() int) {
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer backendLn.Close()
	backends := make(chan net.Conn, 1)
	go func() {
		c, err := backendLn.Accept()
		if err == nil {
			backends <- c
		}
	}()
	returned := make(chan struct{}, 1)
	released := make(chan struct{})
	ts := startServer(t, ServerOptions{Relay: rl,
		Handler: handlerFunc(func(ctx context.Context, s *Session) string {
			b, err := net.Dial("tcp", backendLn.Addr().String())
			if err != nil {
				return "dial failed"
			}
			lease := NewLease("u", netip.MustParseAddr("127.0.0.1"), nil, func() { close(released) })
			defer lease.Release()
			defer func() { returned <- struct{}{} }()
			return Splice(ctx, s, s.Conn, []byte("hello\n"), b, nil, lease)
		})})
	c := dialFrom(t, "", ts.addr)
	backend := <-backends
	defer backend.Close()
	<-returned
	if got := readLine(t, backend); got != "hello\n" {
		t.Fatalf("backend got %q", got)
	}
	if _, err := backend.Write([]byte("world\n")); err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, c); got != "world\n" {
		t.Fatalf("client got %q", got)
	}
	if n := ts.srv.Sessions(); n != 1 {
		t.Errorf("Sessions() = %d while handed over, want 1", n)
	}
	if pairs != nil && pairs() != 1 {
		t.Errorf("Relay.pairs() = %d, want 1", pairs())
	}
	select {
	case <-released:
		t.Fatal("lease released while the session is handed over")
	default:
	}
	if n := len(withMsg(ts.logs.records(t), "session end")); n != 0 {
		t.Fatalf("%d session end lines while the session is handed over", n)
	}
	// Drain closes it after the grace.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if n := ts.srv.Drain(ctx); n != 1 {
		t.Errorf("Drain closed %d sessions, want 1", n)
	}
	expectEOF(t, c)
	select {
	case <-released:
	case <-time.After(ioTimeout):
		t.Fatal("lease not released after the handed-over session ended")
	}
	ends := withMsg(ts.logs.records(t), "session end")
	if len(ends) != 1 || ends[0]["reason"] != relayShutdown || ends[0]["bytes_in"] != float64(6) || ends[0]["bytes_out"] != float64(6) {
		t.Errorf("session end lines %v, want one with reason shutdown and 6 bytes each way", ends)
	}
	if n := ts.srv.Sessions(); n != 0 {
		t.Errorf("Sessions() = %d after the drain, want 0", n)
	}
}

// Without a Relay (TLS sessions, other systems) the session moves to fresh
// goroutines in the same way.
func TestServerHandedOffSession(t *testing.T) {
	testHandedOffSession(t, nil, nil)
}
