package health

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/testutil"
)

// probeOnce runs one probe of o's first service against 127.0.0.1.
func probeOnce(t *testing.T, o Options) error {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout = 500 * time.Millisecond
	}
	c := New(o)
	return c.probe(context.Background(), &c.o.Services[0], localhost)
}

func TestProbeIMAP(t *testing.T) {
	const user, pass = "probe", `s3cr"t\x`
	wantLogin := `a LOGIN "probe" "s3cr\"t\\x"` // RFC 9051 quoted strings
	good := fakeIMAP{login: func(line string) bool { return line == wantLogin }}
	tests := []struct {
		name      string
		srv       fakeIMAP
		user      string
		pass      string
		wantErr   string // "" for success
		hideInErr string // must not appear in the error
	}{
		{name: "ok", srv: good},
		{name: "ok with login", srv: good, user: user, pass: pass},
		{name: "wrong password", srv: good, user: user, pass: "wrong\"pw", wantErr: "login refused", hideInErr: `wrong\"pw`},
		{name: "bye greeting", srv: fakeIMAP{greeting: "* BYE too many connections"}, wantErr: `greeting "* BYE too many connections"`},
		{name: "preauth greeting", srv: fakeIMAP{greeting: "* PREAUTH welcome"}, wantErr: `greeting "* PREAUTH welcome"`},
		{name: "garbage greeting", srv: fakeIMAP{greeting: "+OK pop3 here"}, wantErr: `greeting "+OK pop3 here"`},
		{name: "control chars quoted", srv: fakeIMAP{greeting: "* NO \x1b[31mred"}, wantErr: `"* NO \x1b[31mred"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFake(t, nil, func(c net.Conn, _ int) { tt.srv.serve(c) })
			err := probeOnce(t, Options{Services: []Service{imapService(srv.port)}, LoginUser: tt.user, LoginPassword: tt.pass})
			checkProbeErr(t, err, tt.wantErr)
			if err != nil && tt.hideInErr != "" && strings.Contains(err.Error(), tt.hideInErr) {
				t.Errorf("error shows the password: %v", err)
			}
			if err != nil && tt.pass != "" && strings.Contains(err.Error(), tt.pass) {
				t.Errorf("error shows the password: %v", err)
			}
		})
	}
}

func checkProbeErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("probe failed: %v", err)
	case want != "" && err == nil:
		t.Fatalf("probe succeeded, want an error containing %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("probe error %q does not contain %q", err, want)
	}
}

// TestProbeIMAPLiteralLogin: a password that a quoted string cannot carry
// goes as a synchronizing literal after the server's continuation request.
func TestProbeIMAPLiteralLogin(t *testing.T) {
	const pass = "p\u00e4ss\r\nword" // 8-bit and CRLF: literal only
	got := make(chan string, 1)
	srv := newFake(t, nil, func(c net.Conn, _ int) {
		l := newLineConn(c)
		l.write("* OK ready")
		line, _ := l.read()
		if line != `a LOGIN "probe" {`+strconv.Itoa(len(pass))+`}` {
			got <- "first line " + line
			return
		}
		l.write("+ go ahead")
		buf := make([]byte, len(pass)+2)
		if _, err := io.ReadFull(l.r, buf); err != nil {
			got <- "literal: " + err.Error()
			return
		}
		got <- string(buf)
		l.write("a OK logged in")
		if line, _ := l.read(); line == "b LOGOUT" {
			l.write("* BYE", "b OK bye")
		}
	})
	err := probeOnce(t, Options{Services: []Service{imapService(srv.port)}, LoginUser: "probe", LoginPassword: pass})
	if err != nil {
		t.Fatalf("probe: %v", err)
	}
	if g := <-got; g != pass+"\r\n" {
		t.Fatalf("server got %q, want the literal %q", g, pass+"\r\n")
	}
}

func TestProbeIMAPStartTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, cliTLS := pki.Server, pki.Client("")
	svc := func(port int) Service {
		s := imapService(port)
		s.Backend.TLS = config.TLSStartTLS
		s.Backend.TLSConfig = cliTLS
		return s
	}
	t.Run("ok", func(t *testing.T) {
		srv := newFake(t, nil, func(c net.Conn, _ int) {
			fakeIMAP{tls: srvTLS, login: func(l string) bool { return l == `b LOGIN "u" "p"` }}.serve(c)
		})
		checkProbeErr(t, probeOnce(t, Options{Services: []Service{svc(srv.port)}, LoginUser: "u", LoginPassword: "p"}), "")
	})
	t.Run("refused", func(t *testing.T) {
		srv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{}.serve(c) })
		checkProbeErr(t, probeOnce(t, Options{Services: []Service{svc(srv.port)}}), `STARTTLS answered "a BAD no TLS here"`)
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		other := testutil.LoopbackPKI(t).Server
		srv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{tls: other}.serve(c) })
		checkProbeErr(t, probeOnce(t, Options{Services: []Service{svc(srv.port)}}), "tls handshake")
	})
	t.Run("plaintext injection", func(t *testing.T) {
		srv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{tls: srvTLS, afterStartTLS: "b OK injected"}.serve(c) })
		checkProbeErr(t, probeOnce(t, Options{Services: []Service{svc(srv.port)}}), "plaintext after the TLS go-ahead")
	})
}

func TestProbeImplicitTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, cliTLS := pki.Server, pki.Client("")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newFake(t, tls.NewListener(ln, srvTLS), func(c net.Conn, _ int) { fakePOP3{}.serve(c) })
	s := pop3Service(srv.port)
	s.Backend.TLS = config.TLSImplicit
	s.Backend.TLSConfig = cliTLS
	checkProbeErr(t, probeOnce(t, Options{Services: []Service{s}}), "")

	// Plaintext server, implicit TLS configured: the handshake fails.
	plain := newFake(t, nil, func(c net.Conn, _ int) { fakePOP3{}.serve(c) })
	s.Backend.Port = plain.port
	checkProbeErr(t, probeOnce(t, Options{Services: []Service{s}}), "tls handshake")
}

func TestProbePOP3(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, cliTLS := pki.Server, pki.Client("")
	good := fakePOP3{user: "probe", pass: "pw with spaces"}
	tests := []struct {
		name     string
		srv      fakePOP3
		starttls bool
		user     string
		pass     string
		wantErr  string
	}{
		{name: "ok", srv: good},
		{name: "ok with login", srv: good, user: "probe", pass: "pw with spaces"},
		{name: "wrong password", srv: good, user: "probe", pass: "nope", wantErr: `login refused: PASS answered "-ERR [AUTH] Authentication failed: PASS <password hidden>"`},
		{name: "err greeting", srv: fakePOP3{greeting: "-ERR go away"}, wantErr: `greeting "-ERR go away"`},
		{name: "stls", srv: fakePOP3{tls: srvTLS, user: "probe", pass: "x"}, starttls: true, user: "probe", pass: "x"},
		{name: "stls refused", srv: fakePOP3{}, starttls: true, wantErr: `STLS answered "-ERR no TLS"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFake(t, nil, func(c net.Conn, _ int) { tt.srv.serve(c) })
			s := pop3Service(srv.port)
			if tt.starttls {
				s.Backend.TLS = config.TLSStartTLS
				s.Backend.TLSConfig = cliTLS
			}
			err := probeOnce(t, Options{Services: []Service{s}, LoginUser: tt.user, LoginPassword: tt.pass})
			checkProbeErr(t, err, tt.wantErr)
		})
	}
}

func TestProbeNetworkErrors(t *testing.T) {
	// A port nothing listens on (bound then closed).
	closedPort := testutil.RefusedPort(t)

	silent := newFake(t, nil, func(c net.Conn, _ int) { _, _ = c.Read(make([]byte, 1)) })
	closing := newFake(t, nil, func(c net.Conn, _ int) {})
	endless := newFake(t, nil, func(c net.Conn, _ int) {
		chunk := []byte(strings.Repeat("x", 4096))
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
	tests := []struct {
		name string
		port int
		want string
	}{
		{"refused", closedPort, "connect 127.0.0.1:" + strconv.Itoa(closedPort) + ": connection refused"},
		{"silent", silent.port, "read greeting: timeout"},
		{"closed", closing.port, "read greeting: EOF"},
		{"endless line", endless.port, "read greeting: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			err := probeOnce(t, Options{Services: []Service{imapService(tt.port)}, Timeout: 150 * time.Millisecond})
			checkProbeErr(t, err, tt.want)
			if d := time.Since(start); d > time.Second {
				t.Errorf("probe took %v with a 150ms timeout", d)
			}
		})
	}
}

// TestProbeStopsOnCancel: ending the context interrupts a probe at once,
// not only when Timeout passes.
func TestProbeStopsOnCancel(t *testing.T) {
	silent := newFake(t, nil, func(c net.Conn, _ int) { _, _ = c.Read(make([]byte, 1)) })
	c := New(Options{Services: []Service{imapService(silent.port)}, Timeout: 10 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	if err := c.probe(ctx, &c.o.Services[0], localhost); err == nil {
		t.Fatal("probe of a silent server succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("probe took %v after cancel", d)
	}
}

func TestLiteralSize(t *testing.T) {
	for in, want := range map[string]int{
		"* 1 FETCH (BODY {12}": 12, "* X {0}": 0, "* X {7+}": 7,
		"* OK done": -1, "* X {}": -1, "* X {+}": -1, "* X {-1}": -1, "* X {99999999999}": -1, "* X {1a}": -1,
	} {
		n, ok := literalSize(in)
		if (want < 0) == ok || (ok && n != want) {
			t.Errorf("literalSize(%q) = %d, %v; want %d", in, n, ok, want)
		}
	}
}
