package sieve

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
	"github.com/usher-mail/usher/internal/testutil"
)

func TestGreetingAndCapability(t *testing.T) {
	srvTLS := testutil.LoopbackPKI(t).Server
	tests := []struct {
		name     string
		mode     config.TLSMode
		secure   bool
		trusted  bool
		sasl     string
		starttls bool
	}{
		{"plain untrusted", config.TLSNone, false, false, "", false},
		{"plain trusted", config.TLSNone, false, true, "PLAIN", false},
		{"starttls untrusted", config.TLSStartTLS, false, false, "", true},
		{"starttls trusted", config.TLSStartTLS, false, true, "PLAIN", true},
		{"implicit", config.TLSImplicit, true, false, "PLAIN", false},
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
			greet, okLine := capabilities(c)
			if okLine != `OK "usher ManageSieve ready."` {
				t.Errorf("greeting ends with %q", okLine)
			}
			c.Write("CAPABILITY\r\n")
			again, okLine := capabilities(c)
			if okLine != `OK "Capability completed."` {
				t.Errorf("CAPABILITY ends with %q", okLine)
			}
			for _, caps := range []map[string]string{greet, again} {
				want := map[string]string{"IMPLEMENTATION": "usher", "SIEVE": "", "SASL": tc.sasl, "VERSION": "1.0"}
				if tc.starttls {
					want["STARTTLS"] = ""
				}
				if fmt.Sprint(caps) != fmt.Sprint(want) {
					t.Errorf("capabilities %v, want %v", caps, want)
				}
			}
		})
	}
}

func TestNoopLogout(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write("NOOP\r\nnoop \"abc\"\r\n")
	c.ExpectPrefix(`OK "NOOP completed."`)
	c.ExpectPrefix(`OK (TAG "abc") "Done"`)
	c.Write(`NOOP "q\"b\\s"` + "\r\n")
	c.ExpectPrefix(`OK (TAG "q\"b\\s") "Done"`)
	// A tag that cannot be quoted comes back as a literal-s2c.
	c.Write("NOOP " + lit("a\r\nb", true) + "\r\n")
	c.ExpectPrefix("OK (TAG {4}")
	c.ExpectPrefix("a")
	c.ExpectPrefix(`b) "Done"`)
	c.Write("NOOP x\r\n")
	c.ExpectPrefix(`NO "Invalid command syntax"`)
	c.Write("LOGOUT\r\n")
	c.ExpectPrefix(`OK "Logout completed."`)
	c.ExpectClosed()
	if r := s.Wait(); r != "logout" {
		t.Errorf("reason %q", r)
	}
}

func TestEncryptNeeded(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, func(s *proxy.Session) { s.Trusted = false })
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
	c.ExpectPrefix(`NO (ENCRYPT-NEEDED) `)
	c.Write(`AUTHENTICATE "PLAIN"` + "\r\n")
	c.ExpectPrefix(`NO (ENCRYPT-NEEDED) `) // no challenge before the refusal
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
	be.noEvent(t)
}

func TestAuthenticateForms(t *testing.T) {
	b64 := plainB64("", "alice", "secret")
	tests := []struct {
		name     string
		cmd      string // the AUTHENTICATE command
		response string // sent after the empty challenge, if set
	}{
		{"quoted initial response", `AUTHENTICATE "PLAIN" "` + b64 + "\"\r\n", ""},
		{"non-sync literal initial response", `AUTHENTICATE "PLAIN" ` + lit(b64, true) + "\r\n", ""},
		{"sync literal initial response", `AUTHENTICATE "PLAIN" ` + lit(b64, false) + "\r\n", ""},
		{"literal mechanism", "AUTHENTICATE " + lit("plain", true) + ` "` + b64 + "\"\r\n", ""},
		{"quoted response", `AUTHENTICATE "PLAIN"` + "\r\n", `"` + b64 + "\"\r\n"},
		{"literal response", `AUTHENTICATE "PLAIN"` + "\r\n", lit(b64, true) + "\r\n"},
		{"unpadded response", `AUTHENTICATE "PLAIN"` + "\r\n", `"` + strings.TrimRight(b64, "=") + "\"\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			be := newFakeBackend(t, nil)
			srv, d := newTestServer(be, nil)
			s := startSession(t, srv, nil)
			c := s.Client
			greet(s)
			c.Write(tc.cmd)
			if tc.response != "" {
				if l := c.Line(); l != `""` {
					t.Fatalf("challenge %q, want an empty string", l)
				}
				c.Write(tc.response)
			}
			c.ExpectPrefix(`OK "Logged in."`)
			ev := be.nextNamed(t, "AUTHENTICATE")
			if !slices.Equal(ev.args, []string{"PLAIN", b64, "", "alice", "secret"}) {
				t.Errorf("backend AUTHENTICATE args %q", ev.args)
			}
			// Like Dovecot's proxy: the initial response, quoted.
			if ev.raw != `AUTHENTICATE "PLAIN" "`+b64+"\"\r\n" {
				t.Errorf("backend got %q", ev.raw)
			}
			checkSpliced(t, c, be)
			if _, _, users := d.Counts(); !slices.Equal(users, []string{"alice"}) {
				t.Errorf("director users %q", users)
			}
			if s.Sess.User != "alice" || s.Sess.Backend != fmt.Sprintf("127.0.0.1:%d", be.port()) {
				t.Errorf("session user %q backend %q", s.Sess.User, s.Sess.Backend)
			}
			logs := s.Logs.String()
			if strings.Contains(logs, "secret") || strings.Contains(logs, b64) || strings.Contains(logs, "AUTHENTICATE") {
				t.Errorf("credentials or command line in logs:\n%s", logs)
			}
			if !strings.Contains(logs, "result=ok") {
				t.Errorf("no login log line:\n%s", logs)
			}
		})
	}
}

func TestAuthenticateLongCredentials(t *testing.T) {
	// Base64 over 1024 octets cannot be quoted (RFC 5804 section 4): usher
	// sends a literal-c2s to the backend.
	pass := strings.Repeat("p", 1500)
	be := newFakeBackend(t, func(f *fakeBackend) { f.users = map[string]string{"alice": pass} })
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	b64 := plainB64("", "alice", pass)
	c.Write(`AUTHENTICATE "PLAIN" ` + lit(b64, true) + "\r\n")
	c.ExpectPrefix(`OK "Logged in."`)
	ev := be.nextNamed(t, "AUTHENTICATE")
	if want := `AUTHENTICATE "PLAIN" ` + lit(b64, true) + "\r\n"; ev.raw != want {
		t.Errorf("backend got %.80q..., want a literal", ev.raw)
	}
}

func TestAuthenticateMasterUserRoutesByAuthzid(t *testing.T) {
	be := newFakeBackend(t, func(f *fakeBackend) { f.users = map[string]string{"alice*master": "mpw"} })
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("alice", "master", "mpw") + "\"\r\n")
	c.ExpectPrefix(`OK `)
	if _, _, users := d.Counts(); !slices.Equal(users, []string{"alice"}) {
		t.Errorf("director users %q", users)
	}
	if s.Sess.User != "alice" {
		t.Errorf("session user %q", s.Sess.User)
	}
}

func TestAuthenticateCancel(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	for _, cancel := range []string{`"*"`, "*", lit("*", true)} {
		c.Write(`AUTHENTICATE "PLAIN"` + "\r\n")
		c.ExpectPrefix(`""`)
		c.Write(cancel + "\r\n")
		c.ExpectPrefix(`NO "Authentication canceled"`)
	}
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestAuthenticateErrors(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	steps := []struct{ send, want string }{
		{`AUTHENTICATE "CRAM-MD5"` + "\r\n", `NO "Unsupported authentication mechanism"`},
		{"AUTHENTICATE PLAIN \"" + plainB64("", "alice", "secret") + "\"\r\n", `NO "Invalid command syntax"`}, // atom mechanism
		{`AUTHENTICATE "PLAIN" "!!!notbase64"` + "\r\n", `NO "Invalid base64 data"`},
		{`AUTHENTICATE "PLAIN" ""` + "\r\n", `NO "Authentication failed"`},
		{`AUTHENTICATE "PLAIN" "` + base64.StdEncoding.EncodeToString([]byte("alice\x00secret")) + "\"\r\n", `NO "Authentication failed"`},
		{`AUTHENTICATE "PLAIN" "` + plainB64("", "al\x01ice", "x") + "\"\r\n", `NO "Authentication failed"`},
		{"AUTHENTICATE\r\n", `NO "Invalid command syntax"`},
		{`AUTHENTICATE "PLAIN" "a" "b"` + "\r\n", `NO "Invalid command syntax"`},
		{`AUTHENTICATE "PLAIN" atom` + "\r\n", `NO "Invalid command syntax"`},
	}
	for _, st := range steps {
		c.Write(st.send)
		c.ExpectPrefix(st.want)
	}
	// A command instead of the response to the challenge is refused, not run.
	c.Write(`AUTHENTICATE "PLAIN"` + "\r\n")
	c.ExpectPrefix(`""`)
	c.Write("LOGOUT\r\n")
	c.ExpectPrefix(`NO "Invalid command syntax"`)
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestWrongPasswordThenRetry(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, d := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "wrong") + "\"\r\n")
	c.ExpectPrefix(`NO "Authentication failed."`) // the backend's answer, relayed
	if ev := be.nextNamed(t, "AUTHENTICATE"); ev.args[4] != "wrong" {
		t.Errorf("backend got %q", ev.args)
	}
	// The failed attempt's backend connection is logged out and its lease released.
	be.nextNamed(t, "LOGOUT")
	if a, r, _ := d.Counts(); a != 1 || r != 1 {
		t.Errorf("acquired %d released %d after failed login", a, r)
	}
	if l := s.Logs.String(); !strings.Contains(l, "result=failed") || strings.Contains(l, "wrong") {
		t.Errorf("logs:\n%s", l)
	}
	if s.Sess.Backend != "" {
		t.Errorf("session backend %q after a failed login", s.Sess.Backend)
	}
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
	c.ExpectPrefix(`OK "Logged in."`)
	checkSpliced(t, c, be)
	if a, r, _ := d.Counts(); a != 2 || r != 1 {
		t.Errorf("acquired %d released %d during session", a, r)
	}
	c.Write("LOGOUT\r\n")
	c.ExpectPrefix(`OK "Logout completed."`) // from the backend
	c.ExpectClosed()
	c.Conn.Close()
	if r := s.Wait(); r != "backend closed" {
		t.Errorf("reason %q", r)
	}
	if a, r, _ := d.Counts(); a != 2 || r != 2 {
		t.Errorf("acquired %d released %d after session", a, r)
	}
}

func TestBackendAnswerWithLiteral(t *testing.T) {
	// A response string may be a literal-s2c; it is relayed as it is.
	no := "NO (AUTH-TOO-WEAK) {12}\r\nline1\r\nline2\r\n"
	be := newFakeBackend(t, func(f *fakeBackend) { f.noReply = no })
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "wrong") + "\"\r\n")
	got := c.Line() + "\r\n" + c.Line() + "\r\n" + c.Line() + "\r\n"
	if got != no {
		t.Errorf("client got %q, want %q", got, no)
	}
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK "NOOP completed."`)
}

func TestBackendTryLater(t *testing.T) {
	be := newFakeBackend(t, func(f *fakeBackend) { f.noReply = "NO (TRYLATER) \"Mailbox is being moved.\"\r\n" })
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	for range maxLoginFailures {
		c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "wrong") + "\"\r\n")
		c.ExpectPrefix(`NO (TRYLATER) "Mailbox is being moved."`)
	}
	// Temporary failures do not count as failed logins.
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
	if l := s.Logs.String(); !strings.Contains(l, "result=unavailable") || strings.Contains(l, "result=failed") {
		t.Errorf("logs:\n%s", l)
	}
}

func TestTooManyFailedLogins(t *testing.T) {
	be := newFakeBackend(t, nil)
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	for range maxLoginFailures {
		c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "wrong") + "\"\r\n")
		c.ExpectPrefix(`NO "Authentication failed."`)
	}
	c.ExpectPrefix(`BYE "Too many failed logins"`)
	c.ExpectClosed()
}

func TestUnavailable(t *testing.T) {
	auth := `AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n"
	t.Run("director", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write(auth)
		c.ExpectPrefix(`NO (TRYLATER) "Backend unavailable"`)
		c.Write("NOOP\r\n")
		c.ExpectPrefix(`OK `)
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
		greet(s)
		c.Write(auth)
		c.ExpectPrefix(`NO (TRYLATER) `)
		if a, r, _ := d.Counts(); a != 1 || r != 1 {
			t.Errorf("acquired %d released %d", a, r)
		}
		if l := s.Logs.String(); !strings.Contains(l, fmt.Sprintf("backend=127.0.0.1:%d", port)) || strings.Contains(l, "secret") {
			t.Errorf("logs:\n%s", l)
		}
		c.Write("NOOP\r\n")
		c.ExpectPrefix(`OK `)
	})
	for name, setup := range map[string]func(*fakeBackend){
		"greeting bye":     func(f *fakeBackend) { f.greeting = "BYE \"Too many connections\"\r\n" },
		"greeting garbage": func(f *fakeBackend) { f.greeting = "HTTP/1.1 400 Bad Request\r\n" },
		"no plain":         func(f *fakeBackend) { f.sasl = "GSSAPI" },
		"empty sasl":       func(f *fakeBackend) { f.sasl = "" },
		"xclient refused":  func(f *fakeBackend) { f.xclient, f.xclientNO = true, true },
		"auth bye":         func(f *fakeBackend) { f.noReply = "BYE \"go away\"\r\n" },
		"auth challenge":   func(f *fakeBackend) { f.noReply = "\"c29tZXRoaW5n\"\r\n" },
	} {
		t.Run(name, func(t *testing.T) {
			be := newFakeBackend(t, setup)
			srv, d := newTestServer(be, nil)
			s := startSession(t, srv, nil)
			c := s.Client
			greet(s)
			pass := "secret"
			if strings.HasPrefix(name, "auth") {
				pass = "wrong" // the backend refuses with the scripted reply
			}
			c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", pass) + "\"\r\n")
			c.ExpectPrefix(`NO (TRYLATER) "Backend unavailable"`)
			if a, r, _ := d.Counts(); a != 1 || r != 1 {
				t.Errorf("acquired %d released %d", a, r)
			}
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
		greet(s)
		start := time.Now()
		c.Write(auth)
		c.ExpectPrefix(`NO (TRYLATER) `)
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("login timeout took %v", el)
		}
	})
}

func TestXCLIENT(t *testing.T) {
	auth := `AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n"
	t.Run("advertised", func(t *testing.T) {
		be := newFakeBackend(t, func(f *fakeBackend) { f.xclient = true })
		srv, _ := newTestServer(be, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write(auth)
		c.ExpectPrefix(`OK "Logged in."`)
		ev := be.next(t)
		want := fmt.Sprintf("XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=sess-1 TTL=4\r\n", s.Sess.Remote.Port())
		if ev.name != "XCLIENT" || ev.raw != want {
			t.Errorf("first backend command %q, want %q", ev.raw, want)
		}
		if ev := be.next(t); ev.name != "AUTHENTICATE" {
			t.Errorf("after XCLIENT backend got %s", ev.name)
		}
	})
	t.Run("not advertised", func(t *testing.T) {
		be := newFakeBackend(t, nil)
		srv, _ := newTestServer(be, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write(auth)
		c.ExpectPrefix(`OK "Logged in."`)
		if ev := be.next(t); ev.name != "AUTHENTICATE" {
			t.Errorf("first backend command %s", ev.name)
		}
	})
	t.Run("client may not send it", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write("XCLIENT ADDR=6.6.6.6\r\n")
		c.ExpectPrefix(`NO "Unknown command"`)
	})
}

func TestXCLIENTLine(t *testing.T) {
	tests := []struct {
		remote, id, want string
	}{
		{"192.0.2.1:4000", "abc", "XCLIENT ADDR=192.0.2.1 PORT=4000 SESSION=abc TTL=4"},
		{"[::ffff:192.0.2.1]:4000", "abc", "XCLIENT ADDR=192.0.2.1 PORT=4000 SESSION=abc TTL=4"},
		{"[2001:db8::1]:4000", "", "XCLIENT ADDR=2001:db8::1 PORT=4000 TTL=4"},
		{"192.0.2.1:4000", "has space", "XCLIENT ADDR=192.0.2.1 PORT=4000 TTL=4"},
		{"192.0.2.1:4000", strings.Repeat("x", 65), "XCLIENT ADDR=192.0.2.1 PORT=4000 TTL=4"},
	}
	for _, tc := range tests {
		sess := &proxy.Session{ID: tc.id}
		if err := sess.Remote.UnmarshalText([]byte(tc.remote)); err != nil {
			t.Fatal(err)
		}
		if got := xclientLine(sess); got != tc.want {
			t.Errorf("xclientLine(%s, %q) = %q, want %q", tc.remote, tc.id, got, tc.want)
		}
	}
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
	if caps := greet(s); caps["SASL"] != "" {
		t.Errorf("SASL %q before TLS", caps["SASL"])
	}
	auth := `AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n"
	c.Write(auth)
	c.ExpectPrefix(`NO (ENCRYPT-NEEDED) `)
	c.Write("STARTTLS\r\n")
	c.ExpectPrefix(`OK "Begin TLS negotiation now."`)
	c.StartTLS(pool)
	// RFC 5804 section 2.2: capabilities again, unasked, then OK.
	caps, okLine := capabilities(c)
	if _, has := caps["STARTTLS"]; has || caps["SASL"] != "PLAIN" || okLine != `OK "TLS negotiation successful."` {
		t.Errorf("capabilities after TLS: %v, %q", caps, okLine)
	}
	c.Write("STARTTLS\r\n")
	c.ExpectPrefix(`NO "TLS is already active"`)
	c.Write(auth)
	c.ExpectPrefix(`OK "Logged in."`)
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
		greet(s)
		c.Write("STARTTLS\r\n" + `AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
		c.ExpectPrefix(`BYE "STARTTLS must be the last command`)
		c.ExpectClosed()
		if r := s.Wait(); r != "starttls pipelining" {
			t.Errorf("reason %q", r)
		}
	})
	t.Run("not offered", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write("STARTTLS\r\n")
		c.ExpectPrefix(`NO "STARTTLS not available"`)
		c.Write("NOOP\r\n")
		c.ExpectPrefix(`OK `)
	})
	t.Run("implicit", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, func(s *proxy.Session) {
			s.TLSMode, s.TLSConfig, s.Secure = config.TLSImplicit, srvTLS, true
		})
		c := s.Client
		greet(s)
		c.Write("STARTTLS\r\n")
		c.ExpectPrefix(`NO "TLS is already active"`)
	})
	t.Run("handshake garbage", func(t *testing.T) {
		srv, _ := newTestServer(nil, nil)
		s := startSession(t, srv, func(s *proxy.Session) { s.TLSMode, s.TLSConfig = config.TLSStartTLS, srvTLS })
		c := s.Client
		greet(s)
		c.Write("STARTTLS\r\n")
		c.ExpectPrefix(`OK `)
		c.Write("this is not a TLS client hello\r\n")
		if r := s.Wait(); r != "tls handshake failed" {
			t.Errorf("reason %q", r)
		}
	})
}

func TestBackendStartTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	beTLS, pool := pki.Server, pki.Pool
	// Before TLS the backend offers no mechanism, as Dovecot does with
	// disable_plaintext_auth; usher must use the capabilities sent after TLS.
	be := newFakeBackend(t, func(f *fakeBackend) { f.tlsConf, f.xclient, f.tlsOnly = beTLS, true, true })
	srv, _ := newTestServer(be, func(o *Options) {
		o.Backend.TLS = config.TLSStartTLS
		o.Backend.TLSConfig = &tls.Config{RootCAs: pool}
	})
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
	c.ExpectPrefix(`OK "Logged in."`)
	if ev := be.next(t); ev.name != "STARTTLS" || ev.tls {
		t.Errorf("first backend command %s (tls %v)", ev.name, ev.tls)
	}
	if ev := be.next(t); ev.name != "XCLIENT" || !ev.tls {
		t.Errorf("second backend command %s (tls %v)", ev.name, ev.tls)
	}
	if ev := be.next(t); ev.name != "AUTHENTICATE" || !ev.tls {
		t.Errorf("third backend command %s (tls %v)", ev.name, ev.tls)
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
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
	c.ExpectPrefix(`NO (TRYLATER) `)
	if ev := be.next(t); ev.name != "STARTTLS" {
		t.Errorf("backend got %s", ev.name)
	}
	be.noEvent(t)
}

func TestNeedAuthAndUnknown(t *testing.T) {
	srv, d := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	// The literal's content looks like a command but must not run.
	c.Write(`PUTSCRIPT "x" ` + lit("LOGOUT\r\n xx", true) + "\r\n")
	c.ExpectPrefix(`NO "Authenticate first"`)
	c.Write("LISTSCRIPTS\r\n")
	c.ExpectPrefix(`NO "Authenticate first"`)
	c.Write("FROB\r\n")
	c.ExpectPrefix(`NO "Unknown command"`)
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK "NOOP completed."`)
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestLineTooLong(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`NOOP "` + strings.Repeat("x", 9000) + "\"\r\n")
	c.ExpectPrefix(`NO "Line too long"`)
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
}

func TestLineFlood(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	go func() {
		// Far beyond wire's limit without a line end; errors once closed.
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 16 {
			if _, err := c.Conn.Write(chunk); err != nil {
				return
			}
		}
	}()
	c.ExpectPrefix(`BYE "Line too long"`)
	if r := s.Wait(); r != "line flood" {
		t.Errorf("reason %q", r)
	}
}

func TestLiteralLimits(t *testing.T) {
	srv, d := newTestServer(nil, func(o *Options) { o.MaxLiteral = 100 })
	for _, marker := range []string{"{101+}", "{101}", "{4294967296+}"} {
		t.Run(marker, func(t *testing.T) {
			s := startSession(t, srv, nil)
			c := s.Client
			greet(s)
			c.Write(`AUTHENTICATE "PLAIN" ` + marker + "\r\n")
			c.ExpectPrefix(`BYE "Literal too big"`)
			c.ExpectClosed()
			if r := s.Wait(); r != "literal too big" {
				t.Errorf("reason %q", r)
			}
		})
	}
	t.Run("at cap", func(t *testing.T) {
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write("NOOP " + lit(strings.Repeat("y", 100), true) + "\r\n")
		c.ExpectPrefix(`OK (TAG "yyyy`)
	})
	t.Run("too many literals", func(t *testing.T) {
		s := startSession(t, srv, nil)
		c := s.Client
		greet(s)
		c.Write("NOOP" + strings.Repeat(" "+lit("a", true), maxLiterals+1) + "\r\n")
		c.ExpectPrefix(`BYE "Literal too big"`)
	})
	if n, _, _ := d.Counts(); n != 0 {
		t.Errorf("director asked %d times", n)
	}
}

func TestBadCommands(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	steps := []string{
		"FROBNICATE\r\n",
		"\r\n",
		"\"NOOP\"\r\n",
		"NO0P\r\n",
		"CAPABILITY x\r\n",
		"NOOP \"unterminated\r\n",
		"NOOP (list)\r\n",
		"LOGOUT now\r\n",
		"GETSCRIPT \"x\"\r\n",
	}
	for _, st := range steps {
		c.Write(st)
		c.ExpectPrefix(`NO "`)
	}
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `) // a good command does not reset the count
	c.Write("X\r\n")
	c.ExpectPrefix(`NO "Unknown command"`)
	c.ExpectPrefix(`BYE "Too many invalid commands"`)
	c.ExpectClosed()
	if r := s.Wait(); r != "too many invalid commands" {
		t.Errorf("reason %q", r)
	}
}

func TestIdleTimeout(t *testing.T) {
	srv, _ := newTestServer(nil, func(o *Options) { o.IdleTimeout = 150 * time.Millisecond })
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	start := time.Now()
	c.ExpectPrefix(`BYE "Disconnected for inactivity."`)
	c.ExpectClosed()
	if el := time.Since(start); el < 100*time.Millisecond || el > 2*time.Second {
		t.Errorf("idle timeout after %v", el)
	}
	if r := s.Wait(); r != "idle timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestIdleTimeoutDuringChallenge(t *testing.T) {
	srv, _ := newTestServer(nil, func(o *Options) { o.IdleTimeout = 150 * time.Millisecond })
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN"` + "\r\n")
	c.ExpectPrefix(`""`)
	c.ExpectPrefix(`BYE "Disconnected for inactivity."`)
	if r := s.Wait(); r != "idle timeout" {
		t.Errorf("reason %q", r)
	}
}

func TestShutdown(t *testing.T) {
	srv, _ := newTestServer(nil, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	c.Write("NOOP\r\n")
	c.ExpectPrefix(`OK `)
	s.Cancel()
	c.ExpectPrefix(`BYE (TRYLATER) `)
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
	greet(s)
	s.CancelCause(proxy.ErrLoginTimeout)
	c.ExpectPrefix(`BYE "Login timed out"`)
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
	greet(s)
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\n")
	c.ExpectPrefix(`OK `)
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
	be := newFakeBackend(t, func(f *fakeBackend) {
		// Anything the backend sends right after its OK is relayed too.
		f.okReply = "OK \"Logged in.\"\r\n\"SIEVE\" \"fileinto\"\r\nOK \"caps\"\r\n"
	})
	srv, _ := newTestServer(be, nil)
	s := startSession(t, srv, nil)
	c := s.Client
	greet(s)
	// The PUTSCRIPT is buffered in usher's reader at login time and must
	// reach the backend first thing after the splice.
	script := "keep;\r\n"
	c.Write(`AUTHENTICATE "PLAIN" "` + plainB64("", "alice", "secret") + "\"\r\nPUTSCRIPT \"s\" " + lit(script, true) + "\r\n")
	c.ExpectPrefix(`OK "Logged in."`)
	c.ExpectPrefix(`"SIEVE" "fileinto"`)
	c.ExpectPrefix(`OK "caps"`)
	ev := be.nextNamed(t, "PUTSCRIPT")
	if !ev.post || !slices.Equal(ev.args, []string{"s", script}) {
		t.Errorf("backend got %q", ev.args)
	}
	c.ExpectPrefix(`OK "putscript done"`)
	if s.Sess.BytesIn.Load() == 0 {
		t.Error("pending bytes not counted")
	}
}

func TestReplyFor(t *testing.T) {
	// Every sentinel has a deliberate reply; unknown errors close quietly.
	tests := []struct {
		err   error
		want  string
		close bool
	}{
		{prelogin.ErrUnavailable, `NO (TRYLATER) "Backend unavailable"`, false},
		{prelogin.ErrPrivacy, `NO (ENCRYPT-NEEDED) "`, false},
		{errLitLimit, `BYE "Literal too big"`, true},
		{prelogin.ErrIdle, `BYE "Disconnected for inactivity."`, true},
		{context.Canceled, `BYE (TRYLATER) "`, true},
		{prelogin.ErrTLSPipelined, `BYE "`, true},
		{fmt.Errorf("wrapped: %w", errSyntax), `NO "Invalid command syntax"`, false},
		{prelogin.ErrTLSHandshake, ``, true},
		{errors.New("connection reset"), ``, true},
	}
	for _, tc := range tests {
		rp := replyFor(tc.err)
		got := ""
		if rp.status != "" {
			got = rp.format()
		}
		if !strings.HasPrefix(got, tc.want) || (tc.want == "" && got != "") || rp.close != tc.close {
			t.Errorf("replyFor(%v) = %q (close %v), want prefix %q (close %v)", tc.err, got, rp.close, tc.want, tc.close)
		}
	}
}
