package pop3

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
)

func TestCapabilities(t *testing.T) {
	cert, _ := testCert(t)
	srvTLS := &tls.Config{Certificates: []tls.Certificate{cert}}
	base := []string{"RESP-CODES", "AUTH-RESP-CODE", "IMPLEMENTATION usher"}
	tests := []struct {
		name string
		so   sessionOpts
		want []string
		mech []string
	}{
		{"plain untrusted", sessionOpts{}, base, nil},
		{"plain trusted", sessionOpts{trusted: true}, append([]string{"USER", "SASL PLAIN"}, base...), []string{"PLAIN"}},
		{"starttls untrusted", sessionOpts{mode: config.TLSStartTLS, tls: srvTLS}, append([]string{"STLS"}, base...), nil},
		{"starttls trusted", sessionOpts{mode: config.TLSStartTLS, tls: srvTLS, trusted: true},
			append([]string{"USER", "SASL PLAIN", "STLS"}, base...), []string{"PLAIN"}},
		{"implicit", sessionOpts{mode: config.TLSImplicit, tls: srvTLS}, append([]string{"USER", "SASL PLAIN"}, base...), []string{"PLAIN"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startSession(t, options(nil, newDirector()), tt.so)
			h.c.send("CAPA")
			h.c.expect("+OK Capability list follows")
			if got := h.c.multi(); !slices.Equal(got, tt.want) {
				t.Errorf("CAPA = %q, want %q", got, tt.want)
			}
			h.c.send("auth") // keywords are case-insensitive
			h.c.expectPrefix("+OK")
			if got := h.c.multi(); !slices.Equal(got, tt.mech) {
				t.Errorf("AUTH list = %q, want %q", got, tt.mech)
			}
			h.c.send("QUIT")
			h.c.expect("+OK Logging out.")
			h.c.expectEOF()
			if r := h.wait(); r != "logout" {
				t.Errorf("reason %q, want logout", r)
			}
		})
	}
}

func TestUserPassLoginXCLIENTFromGreeting(t *testing.T) {
	b := newFakeBackend(t, func(b *fakeBackend) { b.greeting = "+OK [XCLIENT] Dovecot ready." })
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})

	h.c.send("USER alice")
	h.c.expect("+OK")
	h.c.send("PASS secret")
	h.c.expect("+OK Logged in.")
	// Spliced: lines reach the backend and its answers come back.
	h.c.send("STAT")
	h.c.expect("+OK echo STAT")
	h.c.send("QUIT")
	h.c.expect("+OK bye")
	h.c.expectEOF()
	h.c.conn.Close() // Splice waits for both directions to end
	// Either reason: see TestClientClosesAfterLogin.
	if r := h.wait(); r != "backend closed" && r != "client closed" {
		t.Errorf("reason %q, want backend closed", r)
	}

	want := []string{
		fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.sess.Remote.Port()),
		"USER alice", "PASS secret", "STAT", "QUIT",
	}
	if got := b.lines(0); !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
	if d.acquired.Load() != 1 || d.released.Load() != 1 {
		t.Errorf("leases acquired %d released %d, want 1 and 1", d.acquired.Load(), d.released.Load())
	}
	if h.sess.User != "alice" || h.sess.Backend != fmt.Sprintf("127.0.0.1:%d", b.port()) {
		t.Errorf("session user %q backend %q", h.sess.User, h.sess.Backend)
	}
	if h.sess.BytesIn.Load() == 0 || h.sess.BytesOut.Load() == 0 {
		t.Errorf("splice counted no bytes: in %d out %d", h.sess.BytesIn.Load(), h.sess.BytesOut.Load())
	}
	logs := h.logs.String()
	if strings.Contains(logs, "secret") {
		t.Errorf("password in logs:\n%s", logs)
	}
	if !strings.Contains(logs, "user=alice") || !strings.Contains(logs, "backend=127.0.0.1:") || !strings.Contains(logs, "result=ok") {
		t.Errorf("login log line missing user/backend/result:\n%s", logs)
	}
}

func TestXCLIENTFromCAPA(t *testing.T) {
	b := newFakeBackend(t, func(b *fakeBackend) { b.capa = []string{"USER", "XCLIENT"} })
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	h.c.send("USER bob", "PASS hunter2")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	got := b.lines(0)
	want := []string{"CAPA", fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.sess.Remote.Port()),
		"USER bob", "PASS hunter2"}
	if !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
}

func TestNoXCLIENTWhenNotAdvertised(t *testing.T) {
	for _, tt := range []struct {
		name string
		capa []string
	}{
		{"capa without xclient", []string{"USER", "SASL PLAIN"}},
		{"no capa command", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t, func(b *fakeBackend) { b.capa = tt.capa })
			h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
			h.c.send("USER alice")
			h.c.expect("+OK")
			h.c.send("PASS secret")
			h.c.expect("+OK Logged in.")
			want := []string{"CAPA", "USER alice", "PASS secret"}
			if got := b.lines(0); !slices.Equal(got, want) {
				t.Errorf("backend got %q, want %q", got, want)
			}
		})
	}
}

func TestPassWithoutUser(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("PASS secret")
	h.c.expect("-ERR No user name given.")
	h.c.send("USER")
	h.c.expect("-ERR Empty user name.")
	h.c.send("PASS secret")
	h.c.expect("-ERR No user name given.")
	if d.acquired.Load() != 0 || b.connCount() != 0 {
		t.Fatalf("backend contacted without a user")
	}
	h.c.send("USER alice")
	h.c.expect("+OK")
	h.c.send("PASS secret")
	h.c.expect("+OK Logged in.")
}

func TestAuthPlain(t *testing.T) {
	ir := plainIR("", "alice", "secret")
	tests := []struct {
		name   string
		client []string // lines sent after AUTH ...
		auth   string
		cont   bool
	}{
		{name: "initial response", auth: "AUTH PLAIN " + ir},
		{name: "continuation", auth: "AUTH PLAIN", client: []string{ir}, cont: true},
		{name: "lower case mechanism", auth: "auth plain " + ir},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t, nil)
			d := newDirector()
			h := startSession(t, options(b, d), sessionOpts{trusted: true})
			h.c.send(tt.auth)
			if tt.cont {
				h.c.expect("+ ")
				h.c.send(tt.client...)
			}
			h.c.expect("+OK Logged in.")
			want := []string{"CAPA", "AUTH PLAIN " + ir}
			if got := b.lines(0); !slices.Equal(got, want) {
				t.Errorf("backend got %q, want %q", got, want)
			}
			if u := d.userList(); !slices.Equal(u, []string{"alice"}) {
				t.Errorf("director asked for %q", u)
			}
			if strings.Contains(h.logs.String(), ir) {
				t.Errorf("AUTH response in logs")
			}
		})
	}
}

func TestAuthPlainAuthzidRoutes(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("AUTH PLAIN " + plainIR("carol", "admin", "pw"))
	h.c.expect("-ERR [AUTH] Authentication failed.")
	if u := d.userList(); !slices.Equal(u, []string{"carol"}) {
		t.Errorf("director asked for %q, want the authorization identity", u)
	}
}

func TestAuthPlainLongResponseUsesContinuation(t *testing.T) {
	long := strings.Repeat("p", 300)
	b := newFakeBackend(t, func(b *fakeBackend) { b.users["alice"] = long })
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	ir := plainIR("", "alice", long)
	h.c.send("AUTH PLAIN " + ir)
	h.c.expect("+OK Logged in.")
	// RFC 5034 section 4: no initial response when the line would pass 255 octets.
	want := []string{"CAPA", "AUTH PLAIN", ir}
	if got := b.lines(0); !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
}

func TestAuthPlainBadInput(t *testing.T) {
	tests := []struct {
		name  string
		lines []string
		cont  bool
		want  string
	}{
		{"cancel", []string{"AUTH PLAIN", "*"}, true, "-ERR Authentication aborted."},
		{"empty initial response", []string{"AUTH PLAIN ="}, false, "-ERR [AUTH] Invalid PLAIN authentication data."},
		{"empty continuation", []string{"AUTH PLAIN", ""}, true, "-ERR [AUTH] Invalid PLAIN authentication data."},
		{"bad base64", []string{"AUTH PLAIN !!!"}, false, "-ERR Invalid base64 data."},
		{"no password", []string{"AUTH PLAIN " + plainIR("", "alice", "")}, false, "-ERR [AUTH] Invalid PLAIN authentication data."},
		{"two fields", []string{"AUTH PLAIN " + "YWxpY2UAc2VjcmV0"}, false, "-ERR [AUTH] Invalid PLAIN authentication data."},
		{"other mechanism", []string{"AUTH CRAM-MD5"}, false, "-ERR Unsupported authentication mechanism."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t, nil)
			d := newDirector()
			h := startSession(t, options(b, d), sessionOpts{trusted: true})
			h.c.send(tt.lines[0])
			if tt.cont {
				h.c.expect("+ ")
				h.c.send(tt.lines[1])
			}
			h.c.expect(tt.want)
			if d.acquired.Load() != 0 || b.connCount() != 0 {
				t.Fatalf("backend contacted")
			}
			// Still in the AUTHORIZATION state.
			h.c.send("AUTH PLAIN " + plainIR("", "alice", "secret"))
			h.c.expect("+OK Logged in.")
		})
	}
}

func TestWrongPasswordThenRetry(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS wrong")
	h.c.expect("+OK")
	h.c.expect("-ERR [AUTH] Authentication failed.") // the backend's line, relayed
	if d.released.Load() != 1 {
		t.Errorf("lease not released after rejected login")
	}
	// The pending user was consumed by PASS.
	h.c.send("PASS secret")
	h.c.expect("-ERR No user name given.")
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	if b.connCount() != 2 {
		t.Errorf("backend connections %d, want 2", b.connCount())
	}
	if got := b.lines(0); !slices.Equal(got, []string{"CAPA", "USER alice", "PASS wrong"}) {
		t.Errorf("first backend connection got %q", got)
	}
	if strings.Contains(h.logs.String(), "wrong") {
		t.Errorf("password in logs")
	}
	if !strings.Contains(h.logs.String(), "result=rejected") {
		t.Errorf("no rejected login logged:\n%s", h.logs)
	}
}

func TestTooManyLoginFailures(t *testing.T) {
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	for i := 0; i < maxLoginFailures; i++ {
		h.c.send("USER alice", "PASS wrong")
		h.c.expect("+OK")
		h.c.expect("-ERR [AUTH] Authentication failed.")
	}
	h.c.expectEOF()
	if r := h.wait(); r != "too many login failures" {
		t.Errorf("reason %q", r)
	}
}

func TestUnavailable(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want string
	}{
		{"no backend", fmt.Errorf("pool: %w", proxy.ErrUnavailable), "-ERR [SYS/TEMP] No backend available, try again later."},
		{"director error", errors.New("state store broken"), "-ERR [SYS/TEMP] Backend unavailable, try again later."},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := newDirector()
			d.err = tt.err
			h := startSession(t, options(nil, d), sessionOpts{trusted: true})
			h.c.send("USER alice", "PASS secret")
			h.c.expect("+OK")
			h.c.expect(tt.want)
			h.c.send("CAPA")
			h.c.expect("+OK Capability list follows")
			h.c.multi()
			if !strings.Contains(h.logs.String(), "level=WARN") {
				t.Errorf("no warning logged:\n%s", h.logs)
			}
		})
	}
}

func TestBackendFailures(t *testing.T) {
	cert, _ := testCert(t)
	tests := []struct {
		name      string
		configure func(*fakeBackend)
		opts      func(*Options)
		closed    bool // backend listener closed: nothing to connect to
	}{
		{name: "unreachable", closed: true},
		{name: "no greeting", configure: func(b *fakeBackend) { b.silent = true },
			opts: func(o *Options) { o.Backend.LoginTimeout = 200 * time.Millisecond }},
		{name: "bad greeting", configure: func(b *fakeBackend) { b.greeting = "* OK IMAP4rev1" }},
		{name: "backend without STLS", opts: func(o *Options) { o.Backend.TLS = config.TLSStartTLS }},
		{name: "backend cert not trusted", configure: func(b *fakeBackend) {
			b.tls = &tls.Config{Certificates: []tls.Certificate{cert}}
		}, opts: func(o *Options) { o.Backend.TLS = config.TLSStartTLS }},
		{name: "xclient refused", configure: func(b *fakeBackend) { b.greeting = "+OK [XCLIENT] ready"; b.xclientERR = true }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t, tt.configure)
			o := options(b, newDirector())
			if tt.opts != nil {
				tt.opts(&o)
			}
			d := o.Director.(*fakeDirector)
			if tt.closed {
				b.ln.Close()
			}
			h := startSession(t, o, sessionOpts{trusted: true})
			start := time.Now()
			h.c.send("USER alice", "PASS secret")
			h.c.expect("+OK")
			h.c.expect("-ERR [SYS/TEMP] Backend unavailable, try again later.")
			if time.Since(start) > 3*time.Second {
				t.Errorf("failure took %v", time.Since(start))
			}
			if d.released.Load() != d.acquired.Load() || d.acquired.Load() != 1 {
				t.Errorf("leases acquired %d released %d", d.acquired.Load(), d.released.Load())
			}
			if !strings.Contains(h.logs.String(), "backend=127.0.0.1:") || !strings.Contains(h.logs.String(), "result=\"backend failed\"") {
				t.Errorf("failure not logged with backend:\n%s", h.logs)
			}
			h.c.send("QUIT")
			h.c.expect("+OK Logging out.")
		})
	}
}

func TestSTLS(t *testing.T) {
	cert, pool := testCert(t)
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: &tls.Config{Certificates: []tls.Certificate{cert}}})
	h.c.send("USER alice")
	h.c.expect(replyPlainDisallowed)
	h.c.send("AUTH PLAIN " + plainIR("", "alice", "secret"))
	h.c.expect(replyPlainDisallowed)
	h.c.send("STLS")
	h.c.expect("+OK Begin TLS negotiation now.")
	h.c.startTLS(pool)
	h.c.send("CAPA")
	h.c.expect("+OK Capability list follows")
	if got := h.c.multi(); !slices.Contains(got, "USER") || slices.Contains(got, "STLS") {
		t.Errorf("CAPA after STLS = %q", got)
	}
	h.c.send("STLS")
	h.c.expect("-ERR TLS is already active.")
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	h.c.send("LIST")
	h.c.expect("+OK echo LIST")
	if !h.sess.Secure {
		t.Errorf("session not marked secure")
	}
	if _, ok := h.sess.Conn.(*tls.Conn); !ok {
		t.Errorf("session conn is %T, want *tls.Conn", h.sess.Conn)
	}
}

func TestSTLSForgetsUser(t *testing.T) {
	cert, pool := testCert(t)
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS, trusted: true,
		tls: &tls.Config{Certificates: []tls.Certificate{cert}}})
	h.c.send("USER alice")
	h.c.expect("+OK")
	h.c.send("STLS")
	h.c.expect("+OK Begin TLS negotiation now.")
	h.c.startTLS(pool)
	h.c.send("PASS secret")
	h.c.expect("-ERR No user name given.")
}

func TestSTLSPipelinedRejected(t *testing.T) {
	cert, _ := testCert(t)
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: &tls.Config{Certificates: []tls.Certificate{cert}}})
	h.c.send("STLS\r\nUSER mallory")
	h.c.expect("-ERR Unexpected data after STLS.")
	h.c.expectEOF()
	if r := h.wait(); r != "starttls injection" {
		t.Errorf("reason %q", r)
	}
	if h.sess.Secure {
		t.Errorf("session marked secure")
	}
}

func TestSTLSNotOffered(t *testing.T) {
	cert, _ := testCert(t)
	srvTLS := &tls.Config{Certificates: []tls.Certificate{cert}}
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	h.c.send("STLS")
	h.c.expect("-ERR TLS support isn't enabled.")
	h2 := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSImplicit, tls: srvTLS})
	h2.c.send("STLS")
	h2.c.expect("-ERR TLS is already active.")
}

func TestSTLSHandshakeFailure(t *testing.T) {
	cert, _ := testCert(t)
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: &tls.Config{Certificates: []tls.Certificate{cert}}})
	h.c.send("STLS")
	h.c.expect("+OK Begin TLS negotiation now.")
	h.c.send("this is not a TLS client hello")
	if r := h.wait(); r != "tls handshake failed" {
		t.Errorf("reason %q", r)
	}
}

func TestLongLines(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{trusted: true})
	h.c.send("USER " + strings.Repeat("a", 9000))
	h.c.expect("-ERR Line too long.")
	h.c.send("CAPA")
	h.c.expect("+OK Capability list follows")
	h.c.multi()

	// A peer that never ends its line is disconnected. The amount is what
	// the reader consumes before giving up (64 lines' worth plus one 4 KiB
	// buffer), so no unread bytes make the close a reset that could eat the
	// reply.
	go func() {
		_ = h.c.conn.SetWriteDeadline(time.Now().Add(testTimeout))
		_, _ = h.c.conn.Write([]byte(strings.Repeat("x", 64*8192+4096)))
	}()
	h.c.expect("-ERR Line too long.")
	if r := h.wait(); r != "line too long" {
		t.Errorf("reason %q", r)
	}
}

func TestBadCommands(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{trusted: true})
	h.c.send("NOOP") // only valid in the TRANSACTION state
	h.c.expect("-ERR Unknown command.")
	h.c.send("CAPA")
	h.c.expectPrefix("+OK")
	h.c.multi()
	// The count is of bad commands in a row; CAPA reset it.
	for i := 1; i < maxBadCommands; i++ {
		h.c.send(fmt.Sprintf("BOGUS%d", i))
		h.c.expect("-ERR Unknown command.")
	}
	h.c.send("\x00\x01")
	h.c.expect("-ERR Too many bad commands.")
	h.c.expectEOF()
	if r := h.wait(); r != "too many bad commands" {
		t.Errorf("reason %q", r)
	}
}

func TestTooManyCommands(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	for i := 0; i < maxCommands; i++ {
		h.c.send("USER x")
		h.c.expect(replyPlainDisallowed)
	}
	h.c.send("USER x")
	h.c.expect("-ERR Too many commands without login.")
	h.c.expectEOF()
}

func TestIdleTimeout(t *testing.T) {
	o := options(nil, newDirector())
	o.IdleTimeout = 100 * time.Millisecond
	h := startSession(t, o, sessionOpts{})
	h.c.expect("-ERR Disconnected for inactivity.")
	h.c.expectEOF()
	if r := h.wait(); r != "idle timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestShutdownBeforeLogin(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	h.cancel()
	if r := h.wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
}

func TestBackendSTLS(t *testing.T) {
	cert, pool := testCert(t)
	b := newFakeBackend(t, func(b *fakeBackend) {
		b.tls = &tls.Config{Certificates: []tls.Certificate{cert}}
		b.greeting = "+OK [XCLIENT] Dovecot ready."
	})
	o := options(b, newDirector())
	o.Backend.TLS = config.TLSStartTLS
	o.Backend.TLSConfig = &tls.Config{RootCAs: pool}
	h := startSession(t, o, sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	h.c.send("RETR 1")
	h.c.expect("+OK echo RETR 1")
	want := []string{"STLS", fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.sess.Remote.Port()),
		"USER alice", "PASS secret", "RETR 1"}
	if got := b.lines(0); !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
}

func TestPipelinedAfterLoginReachesBackend(t *testing.T) {
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	// One write: the STAT is buffered in usher's reader during login and
	// must be forwarded when the connections are spliced.
	h.c.send("USER alice", "PASS secret", "STAT")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	h.c.expect("+OK echo STAT")
}

func TestKick(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	d.done = make(chan struct{})
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	close(d.done)
	if r := h.wait(); r != "kicked" {
		t.Errorf("reason %q", r)
	}
	h.c.expectEOF()
	if d.released.Load() != 1 {
		t.Errorf("lease not released")
	}
}

func TestClientClosesAfterLogin(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	h.c.expect("+OK Logged in.")
	h.c.conn.(*net.TCPConn).CloseWrite()
	// The backend sees EOF and closes. proxy.Splice reports the direction
	// whose result reached it first, which can be the backend's here (its
	// client direction half-closes the backend before reporting), so both
	// reasons are accepted.
	if r := h.wait(); r != "client closed" && r != "backend closed" {
		t.Errorf("reason %q", r)
	}
	if _, err := io.ReadAll(h.c.r); err != nil {
		t.Errorf("client read after close: %v", err)
	}
	if d.released.Load() != 1 {
		t.Errorf("lease not released")
	}
}

func TestXCLIENTLine(t *testing.T) {
	tests := []struct {
		remote string
		id     string
		want   string
	}{
		{"192.0.2.7:40000", "abc", "XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=abc TTL=4"},
		{"[2001:db8::1]:110", "abc", "XCLIENT ADDR=2001:db8::1 PORT=110 SESSION=abc TTL=4"},
		{"[::ffff:192.0.2.7]:1", "abc", "XCLIENT ADDR=192.0.2.7 PORT=1 SESSION=abc TTL=4"},
		{"[fe80::1%eth0]:1", "abc", "XCLIENT ADDR=fe80::1 PORT=1 SESSION=abc TTL=4"},
		{"192.0.2.7:40000", "has space", "XCLIENT ADDR=192.0.2.7 PORT=40000 TTL=4"},
		{"192.0.2.7:40000", strings.Repeat("x", 65), "XCLIENT ADDR=192.0.2.7 PORT=40000 TTL=4"},
		{"", "abc", "XCLIENT SESSION=abc TTL=4"},
	}
	for _, tt := range tests {
		s := &proxy.Session{ID: tt.id}
		if tt.remote != "" {
			s.Remote = netip.MustParseAddrPort(tt.remote)
		}
		if got := xclientLine(s); got != tt.want {
			t.Errorf("xclientLine(%s, %q) = %q, want %q", tt.remote, tt.id, got, tt.want)
		}
	}
}

func TestGreetingXCLIENT(t *testing.T) {
	for line, want := range map[string]bool{
		"+OK [XCLIENT] Dovecot ready.":  true,
		"+OK [xclient] ready":           true,
		"+OK Dovecot ready.":            false,
		"+OK":                           false,
		"+OK [XCLIEN":                   false,
		"-ERR [XCLIENT] no":             false,
		"+OK Dovecot [XCLIENT] ready.":  false,
		"+OK [XCLIENT]":                 true,
		"+OK [SYS/TEMP] [XCLIENT] what": false,
	} {
		if got := greetingXCLIENT(line); got != want {
			t.Errorf("greetingXCLIENT(%q) = %v, want %v", line, got, want)
		}
	}
}

func TestShutdownDuringBackendLogin(t *testing.T) {
	b := newFakeBackend(t, func(b *fakeBackend) { b.silent = true })
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS secret")
	h.c.expect("+OK")
	deadline := time.Now().Add(testTimeout)
	for b.connCount() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	h.cancel()
	if r := h.wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
	if time.Since(start) > time.Second {
		t.Errorf("shutdown took %v", time.Since(start))
	}
	if d.released.Load() != 1 {
		t.Errorf("lease not released")
	}
}

func TestEmptyPassword(t *testing.T) {
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	h.c.send("USER alice", "PASS")
	h.c.expect("+OK")
	h.c.expect("-ERR Empty password.")
	if b.connCount() != 0 {
		t.Errorf("backend contacted")
	}
}
