package imap

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/prelogin"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/testutil"
)

func capsOf(t *testing.T, line, prefix string) []string {
	t.Helper()
	rest, ok := strings.CutPrefix(line, prefix)
	if !ok {
		t.Fatalf("got %q, want prefix %q", line, prefix)
	}
	rest, _, _ = strings.Cut(rest, "]")
	return strings.Fields(rest)
}

func TestGreetingAndCapability(t *testing.T) {
	srvTLS := testutil.LoopbackPKI(t).Server
	tests := []struct {
		name    string
		mode    config.TLSMode
		secure  bool
		trusted bool
		want    []string
		notWant []string
	}{
		{"plain untrusted", config.TLSNone, false, false,
			[]string{"IMAP4rev1", "ID", "SASL-IR", "LITERAL+", "LOGINDISABLED"}, []string{"AUTH=PLAIN", "STARTTLS"}},
		{"plain trusted", config.TLSNone, false, true,
			[]string{"IMAP4rev1", "AUTH=PLAIN"}, []string{"LOGINDISABLED", "STARTTLS"}},
		{"starttls untrusted", config.TLSStartTLS, false, false,
			[]string{"STARTTLS", "LOGINDISABLED"}, []string{"AUTH=PLAIN"}},
		{"starttls trusted", config.TLSStartTLS, false, true,
			[]string{"STARTTLS", "AUTH=PLAIN"}, []string{"LOGINDISABLED"}},
		{"implicit", config.TLSImplicit, true, false,
			[]string{"AUTH=PLAIN"}, []string{"LOGINDISABLED", "STARTTLS"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, _ := newTestServer(nil, nil)
			s := startSession(t, srv, func(s *proxy.Session) {
				s.TLSMode, s.Secure, s.Trusted = tc.mode, tc.secure, tc.trusted
				if tc.mode != config.TLSNone {
					s.TLSConfig = srvTLS
				}
			})
			c := s.Client
			greet := c.Line()
			if !strings.HasSuffix(greet, "] usher ready.") {
				t.Errorf("greeting %q", greet)
			}
			c.Write("a1 CAPABILITY\r\n")
			untagged := c.Line()
			c.ExpectPrefix("a1 OK ")
			for _, caps := range [][]string{capsOf(t, greet, "* OK [CAPABILITY "), capsOf(t, untagged, "* CAPABILITY ")} {
				for _, w := range tc.want {
					if !slices.Contains(caps, w) {
						t.Errorf("capabilities %v lack %s", caps, w)
					}
				}
				for _, w := range tc.notWant {
					if slices.Contains(caps, w) {
						t.Errorf("capabilities %v contain %s", caps, w)
					}
				}
			}
		})
	}
}

func TestNoopLogout(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a NOOP\r\nb noop\r\n")
	c.ExpectPrefix("a OK ")
	c.ExpectPrefix("b OK ")
	c.Write("c LOGOUT\r\n")
	c.ExpectPrefix("* BYE ")
	c.ExpectPrefix("c OK ")
	c.ExpectClosed()
	if r := s.Wait(); r != "logout" {
		t.Errorf("reason %q", r)
	}
}

func TestPrivacyRequired(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, func(s *proxy.Session) { s.Trusted = false })
	c := s.Client
	c.Line()
	c.Write("a LOGIN alice secret\r\n")
	c.ExpectPrefix("a NO [PRIVACYREQUIRED] ")
	c.Write("b AUTHENTICATE PLAIN " + plainB64("", "alice", "secret") + "\r\n")
	c.ExpectPrefix("b NO [PRIVACYREQUIRED] ")
	c.Write("c AUTHENTICATE PLAIN\r\n")
	c.ExpectPrefix("c NO [PRIVACYREQUIRED] ") // no continuation before the refusal
	c.Write("d NOOP\r\n")
	c.ExpectPrefix("d OK ")
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func plainB64(authz, authc, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(authz + "\x00" + authc + "\x00" + pass))
}

// checkSpliced sends a command after login and checks that the backend gets
// it verbatim and its answer comes back.
func checkSpliced(t *testing.T, c *testutil.Client, be *fakeBackend) {
	t.Helper()
	c.Write("a9 SELECT INBOX\r\n")
	ev := be.nextNamed(t, "POST")
	if ev.raw[0] != "a9 SELECT INBOX" {
		t.Errorf("backend got %q after login", ev.raw[0])
	}
	c.ExpectPrefix("a9 OK done")
}

func TestLoginForms(t *testing.T) {
	tests := []struct {
		name, user, pass, cmd string
		wantCont              bool
	}{
		{"atom", "alice", "secret", "a1 LOGIN alice secret\r\n", false},
		{"quoted", "alice", `p"w\d x`, `a1 LOGIN "alice" "p\"w\\d x"` + "\r\n", false},
		{"sync literal", "alice", "pa ss", "a1 LOGIN {5}\r\nalice {5}\r\npa ss\r\n", true},
		{"non-sync literal", "alice", "pässwörd", "a1 LOGIN {5+}\r\nalice {10+}\r\npässwörd\r\n", false},
		{"mixed", "alice", "x\ty", "a1 LOGIN alice {3+}\r\nx\ty\r\n", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			be := newFakeBackend(t, func(f *fakeBackend) { f.users = map[string]string{tc.user: tc.pass} })
			srv, d := newTestServer(be, nil)
			s := startSession(t, srv, nil)
			c := s.Client
			c.Line()
			if tc.wantCont {
				// Send piecewise, waiting for each continuation.
				parts := strings.SplitAfter(tc.cmd, "}\r\n")
				for i, p := range parts {
					c.Write(p)
					if i < len(parts)-1 {
						c.ExpectPrefix("+ ")
					}
				}
			} else {
				c.Write(tc.cmd)
			}
			c.ExpectPrefix("a1 OK [CAPABILITY IMAP4rev1 IMAP4rev2 IDLE] Logged in")
			ev := be.nextNamed(t, "LOGIN")
			if len(ev.args) != 2 || ev.args[0] != tc.user || ev.args[1] != tc.pass {
				t.Errorf("backend LOGIN args %q", ev.args)
			}
			if strings.HasPrefix(ev.raw[0], "a1 ") {
				t.Errorf("client tag leaked to backend: %q", ev.raw[0])
			}
			checkSpliced(t, c, be)
			if _, _, users := d.Counts(); !slices.Equal(users, []string{tc.user}) {
				t.Errorf("director users %q", users)
			}
			if s.Sess.User != tc.user || s.Sess.Backend != fmt.Sprintf("127.0.0.1:%d", be.port()) {
				t.Errorf("session user %q backend %q", s.Sess.User, s.Sess.Backend)
			}
			if strings.Contains(s.Logs.String(), tc.pass) || strings.Contains(s.Logs.String(), "LOGIN") {
				t.Errorf("password or LOGIN line in logs:\n%s", s.Logs.String())
			}
			if !strings.Contains(s.Logs.String(), "result=ok") {
				t.Errorf("no login log line:\n%s", s.Logs.String())
			}
		})
	}
}

func TestIDForwarded(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write(`i1 ID ("name" "TestMail" "version" {3+}` + "\r\n" + `1.0 "x-originating-ip" "6.6.6.6" "os" NIL)` + "\r\n")
	c.ExpectPrefix("* ID NIL")
	c.ExpectPrefix("i1 OK ")
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 OK ")
	ev := be.nextNamed(t, "ID")
	want := []string{
		"x-originating-ip", "127.0.0.1",
		"x-originating-port", fmt.Sprint(s.Sess.Remote.Port()),
		"x-connected-ip", "127.0.0.1",
		"x-connected-port", fmt.Sprint(s.Sess.Local.Port()),
		"x-session-id", "sess-1",
		"name", "TestMail", "version", "1.0", "os", "NIL",
	}
	if !slices.Equal(ev.args, want) {
		t.Errorf("backend ID args\n got %q\nwant %q", ev.args, want)
	}
	if !strings.HasSuffix(ev.raw[0], ` "os" NIL)`) {
		t.Errorf("NIL value not sent as NIL: %q", ev.raw[0])
	}
	if ev2 := be.next(t); ev2.name != "LOGIN" {
		t.Errorf("after ID backend got %s", ev2.name)
	}
}

// The ID command and the login go out together (one round trip): a backend
// that answers ID only after the next command still logs the user in.
func TestIDPipelinedWithLogin(t *testing.T) {
	for _, caps := range []string{"IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN", "IMAP4rev1 ID AUTH=PLAIN"} {
		be := newFakeBackend(t, func(f *fakeBackend) { f.caps = caps; f.idAfterNext = true })
		srv, _ := newTestServer(be, func(o *Options) { o.Backend.LoginTimeout = 2 * time.Second })
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 AUTHENTICATE PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00alice\x00secret")) + "\r\n")
		c.ExpectPrefix("a1 OK ")
		if ev := be.next(t); ev.name != "ID" {
			t.Errorf("%s: first backend command %s, want ID", caps, ev.name)
		}
		if ev := be.next(t); ev.name != "AUTHENTICATE" {
			t.Errorf("%s: second backend command %s, want AUTHENTICATE", caps, ev.name)
		}
	}
}

func TestIDNotSentWithoutCapability(t *testing.T) {
	be := newFakeBackend(t, func(f *fakeBackend) { f.caps = "IMAP4rev1 AUTH=PLAIN"; f.greetCaps = false })
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 OK ")
	// No capabilities in the greeting: usher asks, then logs in without ID.
	if ev := be.next(t); ev.name != "CAPABILITY" {
		t.Errorf("first backend command %s", ev.name)
	}
	if ev := be.next(t); ev.name != "LOGIN" {
		t.Errorf("second backend command %s", ev.name)
	}
}

func TestBackendLiteralEncoding(t *testing.T) {
	// Without LITERAL+ a non-ASCII password needs a synchronizing literal.
	const pass = "grüße\"x"
	be := newFakeBackend(t, func(f *fakeBackend) {
		f.caps = "IMAP4rev1 ID AUTH=PLAIN"
		f.users = map[string]string{"bob": pass}
	})
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN bob {9+}\r\n" + pass + "\r\n")
	c.ExpectPrefix("a1 OK ")
	ev := be.nextNamed(t, "LOGIN")
	if !slices.Equal(ev.args, []string{"bob", pass}) {
		t.Errorf("args %q", ev.args)
	}
	if !strings.HasSuffix(ev.raw[0], `LOGIN "bob" {9}`) {
		t.Errorf("first line %q, want synchronizing literal", ev.raw[0])
	}
}

func TestLoginPieces(t *testing.T) {
	tests := []struct {
		name string
		cr   sasl.Credentials
		caps string
		want []string
	}{
		{"quoted", sasl.Credentials{Mech: "LOGIN", Authcid: `a"b`, Password: `c\d`}, "",
			[]string{`T1 LOGIN "a\"b" "c\\d"` + "\r\n"}},
		{"literal+", sasl.Credentials{Mech: "LOGIN", Authcid: "u", Password: "ü\r\n"}, "LITERAL+",
			[]string{"T1 LOGIN \"u\" {4+}\r\nü\r\n\r\n"}},
		{"literal-", sasl.Credentials{Mech: "LOGIN", Authcid: "u", Password: "ü"}, "LITERAL-",
			[]string{"T1 LOGIN \"u\" {2+}\r\nü\r\n"}},
		{"sync", sasl.Credentials{Mech: "LOGIN", Authcid: "ü", Password: "ä"}, "",
			[]string{"T1 LOGIN {2}\r\n", "ü {2}\r\n", "ä\r\n"}},
		{"plain sasl-ir", sasl.Credentials{Mech: "PLAIN", Authzid: "z", Authcid: "u", Password: "p"}, "SASL-IR",
			[]string{"T1 AUTHENTICATE PLAIN " + plainB64("z", "u", "p") + "\r\n"}},
		{"plain", sasl.Credentials{Mech: "PLAIN", Authcid: "u", Password: "p"}, "",
			[]string{"T1 AUTHENTICATE PLAIN\r\n", plainB64("", "u", "p") + "\r\n"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			caps := map[string]bool{}
			for _, c := range strings.Fields(tc.caps) {
				caps[c] = true
			}
			var got []string
			for _, p := range loginPieces("T1", &tc.cr, caps) {
				got = append(got, string(p))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestAuthenticatePlain(t *testing.T) {
	for _, clientIR := range []bool{true, false} {
		for _, backendIR := range []bool{true, false} {
			t.Run(fmt.Sprintf("clientIR=%v/backendIR=%v", clientIR, backendIR), func(t *testing.T) {
				be := newFakeBackend(t, func(f *fakeBackend) {
					if !backendIR {
						f.caps = "IMAP4rev1 ID AUTH=PLAIN"
					}
				})
				srv, _ := newTestServer(be, nil)
				s := startSession(t, srv, nil)
				c := s.Client
				c.Line()
				if clientIR {
					c.Write("a1 AUTHENTICATE PLAIN " + plainB64("", "alice", "secret") + "\r\n")
				} else {
					c.Write("a1 AUTHENTICATE plain\r\n")
					if l := c.Line(); l != "+ " {
						t.Fatalf("continuation %q", l)
					}
					c.Write(plainB64("", "alice", "secret") + "\r\n")
				}
				c.ExpectPrefix("a1 OK [CAPABILITY ")
				ev := be.nextNamed(t, "AUTHENTICATE")
				if !slices.Contains(ev.args, "secret") || !slices.Contains(ev.args, "alice") {
					t.Errorf("backend AUTHENTICATE args %q", ev.args)
				}
				if got := len(ev.raw); backendIR && got != 1 || !backendIR && got != 2 {
					t.Errorf("backend exchange %q (SASL-IR %v)", ev.raw, backendIR)
				}
				checkSpliced(t, c, be)
				if strings.Contains(s.Logs.String(), "secret") || strings.Contains(s.Logs.String(), plainB64("", "alice", "secret")) {
					t.Errorf("credentials in logs:\n%s", s.Logs.String())
				}
			})
		}
	}
}

func TestAuthenticateMasterUserRoutesByAuthzid(t *testing.T) {
	be := newFakeBackend(t, func(f *fakeBackend) { f.users = map[string]string{"alice*master": "mpw"} })
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 AUTHENTICATE PLAIN " + plainB64("alice", "master", "mpw") + "\r\n")
	c.ExpectPrefix("a1 OK ")
	if _, _, users := d.Counts(); !slices.Equal(users, []string{"alice"}) {
		t.Errorf("director users %q", users)
	}
	if s.Sess.User != "alice" {
		t.Errorf("session user %q", s.Sess.User)
	}
}

func TestAuthenticateErrors(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 AUTHENTICATE PLAIN\r\n")
	c.ExpectPrefix("+ ")
	c.Write("*\r\n")
	c.ExpectPrefix("a1 BAD ")
	c.Write("a2 AUTHENTICATE PLAIN !!!notbase64\r\n")
	c.ExpectPrefix("a2 BAD ")
	c.Write("a3 AUTHENTICATE CRAM-MD5\r\n")
	c.ExpectPrefix("a3 NO [CANNOT] ")
	c.Write("a4 AUTHENTICATE PLAIN =\r\n") // empty initial response: not a PLAIN message
	c.ExpectPrefix("a4 NO [AUTHENTICATIONFAILED] ")
	c.Write("a5 AUTHENTICATE PLAIN " + base64.StdEncoding.EncodeToString([]byte("alice\x00secret")) + "\r\n")
	c.ExpectPrefix("a5 NO [AUTHENTICATIONFAILED] ")
	c.Write("a6 AUTHENTICATE\r\n")
	c.ExpectPrefix("a6 BAD ")
	c.Write("a7 NOOP\r\n")
	c.ExpectPrefix("a7 OK ")
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestWrongPasswordThenRetry(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice wrong\r\n")
	c.ExpectPrefix("a1 NO [AUTHENTICATIONFAILED] Authentication failed.")
	if ev := be.nextNamed(t, "LOGIN"); ev.args[1] != "wrong" {
		t.Errorf("backend got %q", ev.args)
	}
	// The failed attempt's backend connection is logged out and its lease released.
	be.nextNamed(t, "LOGOUT")
	if a, r, _ := d.Counts(); a != 1 || r != 1 {
		t.Errorf("acquired %d released %d after failed login", a, r)
	}
	if !strings.Contains(s.Logs.String(), "result=failed") || strings.Contains(s.Logs.String(), "wrong") {
		t.Errorf("logs:\n%s", s.Logs.String())
	}
	c.Write("a2 LOGIN alice secret\r\n")
	c.ExpectPrefix("a2 OK ")
	checkSpliced(t, c, be)
	if a, r, _ := d.Counts(); a != 2 || r != 1 {
		t.Errorf("acquired %d released %d during session", a, r)
	}
	c.Write("a10 LOGOUT\r\n")
	be.nextNamed(t, "POST")
	c.ExpectPrefix("a10 OK done") // the fake backend answers everything with OK
	c.Conn.Close()
	s.Wait()
	if a, r, _ := d.Counts(); a != 2 || r != 2 {
		t.Errorf("acquired %d released %d after session", a, r)
	}
}

func TestTooManyFailedLogins(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	for i := range maxLoginFailures {
		c.Write(fmt.Sprintf("a%d LOGIN alice wrong\r\n", i))
		c.ExpectPrefix(fmt.Sprintf("a%d NO ", i))
	}
	c.ExpectPrefix("* BYE ")
	c.ExpectClosed()
}

func TestUntaggedRelayedDuringLogin(t *testing.T) {
	be := newFakeBackend(t, func(f *fakeBackend) { f.loginExtra = "* OK [ALERT] Hello there" })
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("* OK [ALERT] Hello there")
	c.ExpectPrefix("a1 OK ")
}

func TestUnavailable(t *testing.T) {
	t.Run("director", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 LOGIN alice secret\r\n")
		c.ExpectPrefix("a1 NO [UNAVAILABLE] ")
		c.Write("a2 NOOP\r\n")
		c.ExpectPrefix("a2 OK ")
		if !strings.Contains(s.Logs.String(), "result=unavailable") {
			t.Errorf("logs:\n%s", s.Logs.String())
		}
	})
	t.Run("backend down", func(t *testing.T) {
		port := testutil.RefusedPort(t)
		srv, d := newTestServer(nil, func(o *Options) { o.Backend.Port = port })
		d.SetErr(nil)
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 LOGIN alice secret\r\n")
		c.ExpectPrefix("a1 NO [UNAVAILABLE] ")
		if a, r, _ := d.Counts(); a != 1 || r != 1 {
			t.Errorf("acquired %d released %d", a, r)
		}
		if l := s.Logs.String(); !strings.Contains(l, fmt.Sprintf("backend=127.0.0.1:%d", port)) || strings.Contains(l, "secret") {
			t.Errorf("logs:\n%s", l)
		}
		c.Write("a2 NOOP\r\n")
		c.ExpectPrefix("a2 OK ")
	})
	for name, greeting := range map[string]string{
		"greeting bye":     "* BYE go away",
		"greeting preauth": "* PREAUTH already logged in",
		"garbage":          "HTTP/1.1 400 Bad Request",
	} {
		t.Run(name, func(t *testing.T) {
			be := newFakeBackend(t, func(f *fakeBackend) { f.greeting = greeting })
			srv, _ := newTestServer(be, nil)
			s := startSession(t, srv, nil)
			c := s.Client
			c.Line()
			c.Write("a1 LOGIN alice secret\r\n")
			c.ExpectPrefix("a1 NO [UNAVAILABLE] ")
		})
	}
	t.Run("backend silent", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				defer c.Close()
				time.Sleep(3 * time.Second)
			}
		}()
		srv, d := newTestServer(nil, func(o *Options) {
			o.Backend.Port = ln.Addr().(*net.TCPAddr).Port
			o.Backend.LoginTimeout = 200 * time.Millisecond
		})
		d.SetErr(nil)
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		start := time.Now()
		c.Write("a1 LOGIN alice secret\r\n")
		c.ExpectPrefix("a1 NO [UNAVAILABLE] ")
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("login timeout took %v", el)
		}
	})
}

func TestStartTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, pool := pki.Server, pki.Pool
	be := newFakeBackend(t, nil)
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, func(s *proxy.Session) {
		s.TLSMode, s.TLSConfig, s.Trusted = config.TLSStartTLS, srvTLS, false
	})
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 NO [PRIVACYREQUIRED] ")
	c.Write("a2 STARTTLS\r\n")
	c.ExpectPrefix("a2 OK Begin TLS negotiation now")
	c.StartTLS(pool)
	c.Write("a3 CAPABILITY\r\n")
	caps := capsOf(t, c.Line(), "* CAPABILITY ")
	if slices.Contains(caps, "STARTTLS") || slices.Contains(caps, "LOGINDISABLED") || !slices.Contains(caps, "AUTH=PLAIN") {
		t.Errorf("capabilities after TLS: %v", caps)
	}
	c.ExpectPrefix("a3 OK ")
	c.Write("a4 STARTTLS\r\n")
	c.ExpectPrefix("a4 BAD ")
	c.Write("a5 LOGIN alice secret\r\n")
	c.ExpectPrefix("a5 OK ")
	checkSpliced(t, c, be)
	if !s.Sess.Secure {
		t.Error("session not marked secure")
	}
	if _, ok := s.Sess.Conn.(*tls.Conn); !ok {
		t.Errorf("session conn is %T", s.Sess.Conn)
	}
}

func TestStartTLSRefused(t *testing.T) {
	srvTLS := testutil.LoopbackPKI(t).Server
	t.Run("pipelined", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, func(s *proxy.Session) { s.TLSMode, s.TLSConfig = config.TLSStartTLS, srvTLS })
		c := s.Client
		c.Line()
		c.Write("a1 STARTTLS\r\na2 LOGIN alice secret\r\n")
		c.ExpectPrefix("a1 BAD ")
		c.ExpectClosed()
		if r := s.Wait(); r != "starttls pipelining" {
			t.Errorf("reason %q", r)
		}
	})
	t.Run("not offered", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 STARTTLS\r\n")
		c.ExpectPrefix("a1 BAD ")
		c.Write("a2 NOOP\r\n")
		c.ExpectPrefix("a2 OK ")
	})
	t.Run("implicit", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, func(s *proxy.Session) {
			s.TLSMode, s.TLSConfig, s.Secure = config.TLSImplicit, srvTLS, true
		})
		c := s.Client
		c.Line()
		c.Write("a1 STARTTLS\r\n")
		c.ExpectPrefix("a1 BAD ")
	})
	t.Run("handshake garbage", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, func(s *proxy.Session) { s.TLSMode, s.TLSConfig = config.TLSStartTLS, srvTLS })
		c := s.Client
		c.Line()
		c.Write("a1 STARTTLS\r\n")
		c.ExpectPrefix("a1 OK ")
		c.Write("this is not a TLS client hello\r\n")
		if r := s.Wait(); r != "tls handshake failed" {
			t.Errorf("reason %q", r)
		}
	})
}

func TestBackendStartTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	beTLS, pool := pki.Server, pki.Pool
	be := newFakeBackend(t, func(f *fakeBackend) { f.tlsConf = beTLS })
	srv, _ := newTestServer(be, func(o *Options) {
		o.Backend.TLS = config.TLSStartTLS
		o.Backend.TLSConfig = &tls.Config{RootCAs: pool}
	})
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 OK ")
	if ev := be.next(t); ev.name != "STARTTLS" || ev.tls {
		t.Errorf("first backend command %s (tls %v)", ev.name, ev.tls)
	}
	// Capabilities are asked again over TLS (RFC 9051 section 6.2.1).
	if ev := be.next(t); ev.name != "CAPABILITY" || !ev.tls {
		t.Errorf("second backend command %s (tls %v)", ev.name, ev.tls)
	}
	if ev := be.nextNamed(t, "LOGIN"); !ev.tls {
		t.Error("LOGIN sent without TLS")
	}
	checkSpliced(t, c, be)
}

func TestBackendStartTLSUntrusted(t *testing.T) {
	beTLS := testutil.LoopbackPKI(t).Server
	be := newFakeBackend(t, func(f *fakeBackend) { f.tlsConf = beTLS })
	srv, _ := newTestServer(be, func(o *Options) {
		o.Backend.TLS = config.TLSStartTLS
		o.Backend.TLSConfig = &tls.Config{} // system roots: the test CA is unknown
	})
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 NO [UNAVAILABLE] ")
	if ev := be.next(t); ev.name != "STARTTLS" {
		t.Errorf("backend got %s", ev.name)
	}
	select {
	case ev := <-be.events:
		t.Errorf("backend got %s after a failed handshake", ev.name)
	case <-time.After(100 * time.Millisecond):
	}
}

func TestLineTooLong(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN " + strings.Repeat("x", 9000) + " y\r\n")
	c.ExpectPrefix("* BAD [TOOBIG] ")
	c.Write("a2 NOOP\r\n")
	c.ExpectPrefix("a2 OK ")
}

func TestLineFlood(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	go func() {
		// Far beyond wire's limit without a line end; errors once closed.
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 16 {
			if _, err := c.Conn.Write(chunk); err != nil {
				return
			}
		}
	}()
	c.ExpectPrefix("* BYE ")
	if r := s.Wait(); r != "line flood" {
		t.Errorf("reason %q", r)
	}
}

func TestLiteralLimits(t *testing.T) {
	srv, d := newTestServer(nil, func(o *Options) { o.MaxLiteral = 100 })
	t.Run("sync over cap", func(t *testing.T) {
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 LOGIN {101}\r\n")
		// Refused before any continuation request.
		c.ExpectPrefix("a1 BAD [TOOBIG] ")
		c.Write("a2 NOOP\r\n")
		c.ExpectPrefix("a2 OK ")
		c.Write("a3 LOGIN {100}\r\n")
		c.ExpectPrefix("+ ")
	})
	t.Run("non-sync over cap", func(t *testing.T) {
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		c.Write("a1 LOGIN {4294967296+}\r\n")
		c.ExpectPrefix("* BYE [TOOBIG] ")
		c.ExpectClosed()
	})
	t.Run("literal in invalid command consumed", func(t *testing.T) {
		s := startSession(t, srv, nil)
		c := s.Client
		c.Line()
		// The literal's content looks like a command but must not run.
		c.Write("a1 FROB {11+}\r\nb1 LOGOUT\r\n xx\r\n")
		c.ExpectPrefix("a1 BAD ")
		c.Write("a2 NOOP\r\n")
		c.ExpectPrefix("a2 OK ")
	})
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestBadCommands(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	steps := []struct{ send, want string }{
		{"a1 FROBNICATE\r\n", "a1 BAD "},
		{"a2 SELECT INBOX\r\n", "a2 BAD "},
		{"\r\n", "* BAD "},
		{"+tag NOOP\r\n", "* BAD "},
		{"a3\r\n", "a3 BAD "},
		{"a4 LOGIN onlyuser\r\n", "a4 BAD "},
		{"a5 LOGIN \"unterminated\r\n", "a5 BAD "},
		{"a6 NOOP extra\r\n", "a6 BAD "},
		{"a7 ID (\"odd\")\r\n", "a7 BAD "},
	}
	for _, st := range steps {
		c.Write(st.send)
		c.ExpectPrefix(st.want)
	}
	c.Write("a8 NOOP\r\n")
	c.ExpectPrefix("a8 OK ") // a good command does not reset the count
	c.Write("b1 X\r\n")
	c.ExpectPrefix("b1 BAD ")
	c.ExpectPrefix("* BYE Too many invalid commands")
	c.ExpectClosed()
	if r := s.Wait(); r != "too many invalid commands" {
		t.Errorf("reason %q", r)
	}
}

func TestIdleTimeout(t *testing.T) {
	srv, _ := newTestServer(nil, func(o *Options) { o.IdleTimeout = 150 * time.Millisecond })
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	start := time.Now()
	c.ExpectPrefix("* BYE Autologout")
	c.ExpectClosed()
	if el := time.Since(start); el < 100*time.Millisecond || el > 2*time.Second {
		t.Errorf("idle timeout after %v", el)
	}
	if r := s.Wait(); r != "idle timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestShutdown(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 NOOP\r\n")
	c.ExpectPrefix("a1 OK ")
	s.Cancel()
	c.ExpectPrefix("* BYE [UNAVAILABLE] ")
	if r := s.Wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
}

// The Server cancels a session that did not log in in time with cause
// proxy.ErrLoginTimeout: the client is told why.
func TestLoginTimeout(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	s.CancelCause(proxy.ErrLoginTimeout)
	c.ExpectPrefix("* BYE Login timed out")
	if r := s.Wait(); r != "login timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestKickAfterLogin(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	kick := make(chan struct{})
	d.SetDone(kick)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	c.Write("a1 LOGIN alice secret\r\n")
	c.ExpectPrefix("a1 OK ")
	checkSpliced(t, c, be)
	close(kick)
	if r := s.Wait(); r != "kicked" {
		t.Errorf("reason %q", r)
	}
	if _, r, _ := d.Counts(); r != 1 {
		t.Errorf("released %d", r)
	}
}

func TestPipelinedAfterLogin(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	c.Line()
	// The second command is buffered in usher's reader at login time and
	// must reach the backend first thing after the splice.
	c.Write("a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
	c.ExpectPrefix("a1 OK ")
	ev := be.nextNamed(t, "POST")
	if ev.raw[0] != "a2 SELECT INBOX" {
		t.Errorf("backend got %q", ev.raw[0])
	}
	c.ExpectPrefix("a2 OK done")
	if s.Sess.BytesIn.Load() == 0 {
		t.Error("pending bytes not counted")
	}
}

func TestReplyFor(t *testing.T) {
	// Every sentinel has a deliberate reply; unknown errors close quietly.
	tests := []struct {
		err  error
		want string
	}{
		{prelogin.ErrUnavailable, "t NO [UNAVAILABLE] "},
		{prelogin.ErrPrivacy, "t NO [PRIVACYREQUIRED] "},
		{prelogin.ErrMechanism, "t NO [CANNOT] "},
		{errLitLimit, "t BAD [TOOBIG] "},
		{errNonSyncLimit, "* BYE [TOOBIG] "},
		{errBadTag, "* BAD "},
		{prelogin.ErrIdle, "* BYE Autologout"},
		{context.Canceled, "* BYE [UNAVAILABLE] "},
	}
	for _, tc := range tests {
		rp := replyFor(tc.err)
		tag := "t"
		if errors.Is(tc.err, errBadTag) {
			tag = ""
		}
		got := ""
		if rp.status != "" {
			got = rp.format(tag)
		}
		if !strings.HasPrefix(got, tc.want) || (tc.want == "" && got != "") {
			t.Errorf("replyFor(%v) = %q, want prefix %q", tc.err, got, tc.want)
		}
	}
	if !replyFor(errors.New("connection reset")).close {
		t.Error("unknown read error does not close")
	}
}
