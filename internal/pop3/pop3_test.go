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
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

func TestCapabilities(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS := pki.Server
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
			h.Client.Send("CAPA")
			h.Client.Expect("+OK Capability list follows")
			if got := multi(h.Client); !slices.Equal(got, tt.want) {
				t.Errorf("CAPA = %q, want %q", got, tt.want)
			}
			h.Client.Send("auth") // keywords are case-insensitive
			h.Client.ExpectPrefix("+OK")
			if got := multi(h.Client); !slices.Equal(got, tt.mech) {
				t.Errorf("AUTH list = %q, want %q", got, tt.mech)
			}
			h.Client.Send("QUIT")
			h.Client.Expect("+OK Logging out.")
			h.Client.ExpectClosed()
			if r := h.Wait(); r != "logout" {
				t.Errorf("reason %q, want logout", r)
			}
		})
	}
}

func TestUserPassLoginXCLIENTFromGreeting(t *testing.T) {
	b := newFakeBackend(t, func(b *fakeBackend) { b.greeting = "+OK [XCLIENT] Dovecot ready." })
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})

	h.Client.Send("USER alice")
	h.Client.Expect("+OK")
	h.Client.Send("PASS secret")
	h.Client.Expect("+OK Logged in.")
	// Spliced: lines reach the backend and its answers come back.
	h.Client.Send("STAT")
	h.Client.Expect("+OK echo STAT")
	h.Client.Send("QUIT")
	h.Client.Expect("+OK bye")
	h.Client.ExpectClosed()
	h.Client.Conn.Close() // Splice waits for both directions to end
	// Either reason: see TestClientClosesAfterLogin.
	if r := h.Wait(); r != "backend closed" && r != "client closed" {
		t.Errorf("reason %q, want backend closed", r)
	}

	want := []string{
		fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.Sess.Remote.Port()),
		"USER alice", "PASS secret", "STAT", "QUIT",
	}
	if got := b.lines(0); !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
	if d.Acquired() != 1 || d.Released() != 1 {
		t.Errorf("leases acquired %d released %d, want 1 and 1", d.Acquired(), d.Released())
	}
	if h.Sess.User != "alice" || h.Sess.Backend != fmt.Sprintf("127.0.0.1:%d", b.port()) {
		t.Errorf("session user %q backend %q", h.Sess.User, h.Sess.Backend)
	}
	if h.Sess.BytesIn.Load() == 0 || h.Sess.BytesOut.Load() == 0 {
		t.Errorf("splice counted no bytes: in %d out %d", h.Sess.BytesIn.Load(), h.Sess.BytesOut.Load())
	}
	logs := h.Logs.String()
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
	h.Client.Send("USER bob", "PASS hunter2")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	got := b.lines(0)
	want := []string{"CAPA", fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.Sess.Remote.Port()),
		"USER bob", "PASS hunter2"}
	if !slices.Equal(got, want) {
		t.Errorf("backend got %q, want %q", got, want)
	}
}

// XCLIENT and the login go out in one write when the backend takes
// pipelined commands (Dovecot, known by [XCLIENT] in its greeting, or
// PIPELINING in CAPA): the fake backend answers only once all have arrived.
func TestPipelinedLogin(t *testing.T) {
	for _, tt := range []struct {
		name      string
		configure func(*fakeBackend)
		send      []string
		want      func(port uint16) []string
	}{
		{"dovecot user pass", func(b *fakeBackend) { b.greeting = "+OK [XCLIENT] Dovecot ready."; b.batch = 3 },
			[]string{"USER bob", "PASS hunter2"},
			func(p uint16) []string {
				return []string{fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", p), "USER bob", "PASS hunter2"}
			}},
		{"dovecot auth plain", func(b *fakeBackend) { b.greeting = "+OK [XCLIENT] Dovecot ready."; b.batch = 2 },
			[]string{"AUTH PLAIN " + plainIR("", "bob", "hunter2")},
			func(p uint16) []string {
				return []string{fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", p), "AUTH PLAIN " + plainIR("", "bob", "hunter2")}
			}},
		{"capa pipelining", func(b *fakeBackend) { b.capa = []string{"USER", "PIPELINING"}; b.batch = 2 },
			[]string{"USER bob", "PASS hunter2"},
			func(uint16) []string { return []string{"CAPA", "USER bob", "PASS hunter2"} }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t, tt.configure)
			h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
			h.Client.Send(tt.send...)
			if len(tt.send) == 2 {
				h.Client.Expect("+OK")
			}
			h.Client.Expect("+OK Logged in.")
			if got, want := b.lines(0), tt.want(h.Sess.Remote.Port()); !slices.Equal(got, want) {
				t.Errorf("backend got %q, want %q", got, want)
			}
		})
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
			h.Client.Send("USER alice")
			h.Client.Expect("+OK")
			h.Client.Send("PASS secret")
			h.Client.Expect("+OK Logged in.")
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
	h.Client.Send("PASS secret")
	h.Client.Expect("-ERR No user name given.")
	h.Client.Send("USER")
	h.Client.Expect("-ERR Empty user name.")
	h.Client.Send("PASS secret")
	h.Client.Expect("-ERR No user name given.")
	if d.Acquired() != 0 || b.connCount() != 0 {
		t.Fatalf("backend contacted without a user")
	}
	h.Client.Send("USER alice")
	h.Client.Expect("+OK")
	h.Client.Send("PASS secret")
	h.Client.Expect("+OK Logged in.")
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
			h.Client.Send(tt.auth)
			if tt.cont {
				h.Client.Expect("+ ")
				h.Client.Send(tt.client...)
			}
			h.Client.Expect("+OK Logged in.")
			want := []string{"CAPA", "AUTH PLAIN " + ir}
			if got := b.lines(0); !slices.Equal(got, want) {
				t.Errorf("backend got %q, want %q", got, want)
			}
			if u := d.Users(); !slices.Equal(u, []string{"alice"}) {
				t.Errorf("director asked for %q", u)
			}
			if strings.Contains(h.Logs.String(), ir) {
				t.Errorf("AUTH response in logs")
			}
		})
	}
}

func TestAuthPlainAuthzidRoutes(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.Client.Send("AUTH PLAIN " + plainIR("carol", "admin", "pw"))
	h.Client.Expect("-ERR [AUTH] Authentication failed.")
	if u := d.Users(); !slices.Equal(u, []string{"carol"}) {
		t.Errorf("director asked for %q, want the authorization identity", u)
	}
}

func TestAuthPlainLongResponseUsesContinuation(t *testing.T) {
	long := strings.Repeat("p", 300)
	b := newFakeBackend(t, func(b *fakeBackend) { b.users["alice"] = long })
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	ir := plainIR("", "alice", long)
	h.Client.Send("AUTH PLAIN " + ir)
	h.Client.Expect("+OK Logged in.")
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
			h.Client.Send(tt.lines[0])
			if tt.cont {
				h.Client.Expect("+ ")
				h.Client.Send(tt.lines[1])
			}
			h.Client.Expect(tt.want)
			if d.Acquired() != 0 || b.connCount() != 0 {
				t.Fatalf("backend contacted")
			}
			// Still in the AUTHORIZATION state.
			h.Client.Send("AUTH PLAIN " + plainIR("", "alice", "secret"))
			h.Client.Expect("+OK Logged in.")
		})
	}
}

func TestWrongPasswordThenRetry(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.Client.Send("USER alice", "PASS wrong")
	h.Client.Expect("+OK")
	h.Client.Expect("-ERR [AUTH] Authentication failed.") // the backend's line, relayed
	if d.Released() != 1 {
		t.Errorf("lease not released after rejected login")
	}
	// The pending user was consumed by PASS.
	h.Client.Send("PASS secret")
	h.Client.Expect("-ERR No user name given.")
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	if b.connCount() != 2 {
		t.Errorf("backend connections %d, want 2", b.connCount())
	}
	if got := b.lines(0); !slices.Equal(got, []string{"CAPA", "USER alice", "PASS wrong"}) {
		t.Errorf("first backend connection got %q", got)
	}
	if strings.Contains(h.Logs.String(), "wrong") {
		t.Errorf("password in logs")
	}
	if !strings.Contains(h.Logs.String(), "result=rejected") {
		t.Errorf("no rejected login logged:\n%s", h.Logs)
	}
}

func TestTooManyLoginFailures(t *testing.T) {
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	for i := 0; i < maxLoginFailures; i++ {
		h.Client.Send("USER alice", "PASS wrong")
		h.Client.Expect("+OK")
		h.Client.Expect("-ERR [AUTH] Authentication failed.")
	}
	h.Client.ExpectClosed()
	if r := h.Wait(); r != "too many login failures" {
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
			d.SetErr(tt.err)
			h := startSession(t, options(nil, d), sessionOpts{trusted: true})
			h.Client.Send("USER alice", "PASS secret")
			h.Client.Expect("+OK")
			h.Client.Expect(tt.want)
			h.Client.Send("CAPA")
			h.Client.Expect("+OK Capability list follows")
			multi(h.Client)
			if !strings.Contains(h.Logs.String(), "level=WARN") {
				t.Errorf("no warning logged:\n%s", h.Logs)
			}
		})
	}
}

func TestBackendFailures(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
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
			b.tls = pki.Server
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
			d := o.Director.(*proxytest.Director)
			if tt.closed {
				b.ln.Close()
			}
			h := startSession(t, o, sessionOpts{trusted: true})
			start := time.Now()
			h.Client.Send("USER alice", "PASS secret")
			h.Client.Expect("+OK")
			h.Client.Expect("-ERR [SYS/TEMP] Backend unavailable, try again later.")
			if time.Since(start) > 3*time.Second {
				t.Errorf("failure took %v", time.Since(start))
			}
			if d.Released() != d.Acquired() || d.Acquired() != 1 {
				t.Errorf("leases acquired %d released %d", d.Acquired(), d.Released())
			}
			if !strings.Contains(h.Logs.String(), "backend=127.0.0.1:") || !strings.Contains(h.Logs.String(), "result=\"backend failed\"") {
				t.Errorf("failure not logged with backend:\n%s", h.Logs)
			}
			h.Client.Send("QUIT")
			h.Client.Expect("+OK Logging out.")
		})
	}
}

func TestSTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	pool := pki.Pool
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: pki.Server})
	h.Client.Send("USER alice")
	h.Client.Expect(replyPlainDisallowed)
	h.Client.Send("AUTH PLAIN " + plainIR("", "alice", "secret"))
	h.Client.Expect(replyPlainDisallowed)
	h.Client.Send("STLS")
	h.Client.Expect("+OK Begin TLS negotiation now.")
	h.Client.StartTLS(pool)
	h.Client.Send("CAPA")
	h.Client.Expect("+OK Capability list follows")
	if got := multi(h.Client); !slices.Contains(got, "USER") || slices.Contains(got, "STLS") {
		t.Errorf("CAPA after STLS = %q", got)
	}
	h.Client.Send("STLS")
	h.Client.Expect("-ERR TLS is already active.")
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	h.Client.Send("LIST")
	h.Client.Expect("+OK echo LIST")
	if !h.Sess.Secure {
		t.Errorf("session not marked secure")
	}
	if _, ok := h.Sess.Conn.(*tls.Conn); !ok {
		t.Errorf("session conn is %T, want *tls.Conn", h.Sess.Conn)
	}
}

func TestSTLSForgetsUser(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	pool := pki.Pool
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS, trusted: true,
		tls: pki.Server})
	h.Client.Send("USER alice")
	h.Client.Expect("+OK")
	h.Client.Send("STLS")
	h.Client.Expect("+OK Begin TLS negotiation now.")
	h.Client.StartTLS(pool)
	h.Client.Send("PASS secret")
	h.Client.Expect("-ERR No user name given.")
}

func TestSTLSPipelinedRejected(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: pki.Server})
	h.Client.Send("STLS\r\nUSER mallory")
	h.Client.Expect("-ERR Unexpected data after STLS.")
	h.Client.ExpectClosed()
	if r := h.Wait(); r != "starttls injection" {
		t.Errorf("reason %q", r)
	}
	if h.Sess.Secure {
		t.Errorf("session marked secure")
	}
}

func TestSTLSNotOffered(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS := pki.Server
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	h.Client.Send("STLS")
	h.Client.Expect("-ERR TLS support isn't enabled.")
	h2 := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSImplicit, tls: srvTLS})
	h2.Client.Send("STLS")
	h2.Client.Expect("-ERR TLS is already active.")
}

func TestSTLSHandshakeFailure(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	h := startSession(t, options(nil, newDirector()), sessionOpts{mode: config.TLSStartTLS,
		tls: pki.Server})
	h.Client.Send("STLS")
	h.Client.Expect("+OK Begin TLS negotiation now.")
	h.Client.Send("this is not a TLS client hello")
	if r := h.Wait(); r != "tls handshake failed" {
		t.Errorf("reason %q", r)
	}
}

func TestLongLines(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{trusted: true})
	h.Client.Send("USER " + strings.Repeat("a", 9000))
	h.Client.Expect("-ERR Line too long.")
	h.Client.Send("CAPA")
	h.Client.Expect("+OK Capability list follows")
	multi(h.Client)

	// A peer that never ends its line is disconnected. The amount is what
	// the reader consumes before giving up (64 lines' worth plus one 4 KiB
	// buffer), so no unread bytes make the close a reset that could eat the
	// reply.
	go func() {
		_ = h.Client.Conn.SetWriteDeadline(time.Now().Add(testutil.DefaultTimeout))
		_, _ = h.Client.Conn.Write([]byte(strings.Repeat("x", 64*8192+4096)))
	}()
	h.Client.Expect("-ERR Line too long.")
	if r := h.Wait(); r != "line too long" {
		t.Errorf("reason %q", r)
	}
}

func TestBadCommands(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{trusted: true})
	h.Client.Send("NOOP") // only valid in the TRANSACTION state
	h.Client.Expect("-ERR Unknown command.")
	h.Client.Send("CAPA")
	h.Client.ExpectPrefix("+OK")
	multi(h.Client)
	// The count is of bad commands in a row; CAPA reset it.
	for i := 1; i < maxBadCommands; i++ {
		h.Client.Send(fmt.Sprintf("BOGUS%d", i))
		h.Client.Expect("-ERR Unknown command.")
	}
	h.Client.Send("\x00\x01")
	h.Client.Expect("-ERR Too many bad commands.")
	h.Client.ExpectClosed()
	if r := h.Wait(); r != "too many bad commands" {
		t.Errorf("reason %q", r)
	}
}

func TestTooManyCommands(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	for i := 0; i < maxCommands; i++ {
		h.Client.Send("USER x")
		h.Client.Expect(replyPlainDisallowed)
	}
	h.Client.Send("USER x")
	h.Client.Expect("-ERR Too many commands without login.")
	h.Client.ExpectClosed()
}

func TestIdleTimeout(t *testing.T) {
	o := options(nil, newDirector())
	o.IdleTimeout = 100 * time.Millisecond
	h := startSession(t, o, sessionOpts{})
	h.Client.Expect("-ERR Disconnected for inactivity.")
	h.Client.ExpectClosed()
	if r := h.Wait(); r != "idle timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestShutdownBeforeLogin(t *testing.T) {
	h := startSession(t, options(nil, newDirector()), sessionOpts{})
	h.Cancel()
	if r := h.Wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
}

func TestBackendSTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	pool := pki.Pool
	b := newFakeBackend(t, func(b *fakeBackend) {
		b.tls = pki.Server
		b.greeting = "+OK [XCLIENT] Dovecot ready."
	})
	o := options(b, newDirector())
	o.Backend.TLS = config.TLSStartTLS
	o.Backend.TLSConfig = &tls.Config{RootCAs: pool}
	h := startSession(t, o, sessionOpts{trusted: true})
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	h.Client.Send("RETR 1")
	h.Client.Expect("+OK echo RETR 1")
	want := []string{"STLS", fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sid1 TTL=4", h.Sess.Remote.Port()),
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
	h.Client.Send("USER alice", "PASS secret", "STAT")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	h.Client.Expect("+OK echo STAT")
}

func TestKick(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	kick := make(chan struct{})
	d.SetDone(kick)
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	close(kick)
	if r := h.Wait(); r != "kicked" {
		t.Errorf("reason %q", r)
	}
	h.Client.ExpectClosed()
	if d.Released() != 1 {
		t.Errorf("lease not released")
	}
}

func TestClientClosesAfterLogin(t *testing.T) {
	b := newFakeBackend(t, nil)
	d := newDirector()
	h := startSession(t, options(b, d), sessionOpts{trusted: true})
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	h.Client.Expect("+OK Logged in.")
	h.Client.Conn.(*net.TCPConn).CloseWrite()
	// The backend sees EOF and closes. proxy.Splice reports the direction
	// whose result reached it first, which can be the backend's here (its
	// client direction half-closes the backend before reporting), so both
	// reasons are accepted.
	if r := h.Wait(); r != "client closed" && r != "backend closed" {
		t.Errorf("reason %q", r)
	}
	if _, err := io.ReadAll(h.Client.R); err != nil {
		t.Errorf("client read after close: %v", err)
	}
	if d.Released() != 1 {
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
	h.Client.Send("USER alice", "PASS secret")
	h.Client.Expect("+OK")
	deadline := time.Now().Add(testutil.DefaultTimeout)
	for b.connCount() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	h.Cancel()
	if r := h.Wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
	if time.Since(start) > time.Second {
		t.Errorf("shutdown took %v", time.Since(start))
	}
	if d.Released() != 1 {
		t.Errorf("lease not released")
	}
}

func TestEmptyPassword(t *testing.T) {
	b := newFakeBackend(t, nil)
	h := startSession(t, options(b, newDirector()), sessionOpts{trusted: true})
	h.Client.Send("USER alice", "PASS")
	h.Client.Expect("+OK")
	h.Client.Expect("-ERR Empty password.")
	if b.connCount() != 0 {
		t.Errorf("backend contacted")
	}
}
