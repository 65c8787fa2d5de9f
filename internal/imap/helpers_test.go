package imap

import (
	"crypto/tls"
	"encoding/base64"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
	"github.com/usher-mail/usher/internal/wire"
)

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
	// idAfterNext holds the answer to ID until the next command has
	// arrived: a client that waits for it before sending more hangs.
	idAfterNext bool
	events      chan beEvent
}

func newFakeBackend(t testing.TB, setup func(*fakeBackend)) *fakeBackend {
	t.Helper()
	ln := testutil.Listen(t)
	f := &fakeBackend{
		t: t, ln: ln, caps: "IMAP4rev1 ID SASL-IR LITERAL+ AUTH=PLAIN", greetCaps: true,
		users: map[string]string{"alice": "secret"}, events: make(chan beEvent, 100),
	}
	if setup != nil {
		setup(f)
	}
	testutil.Serve(t, ln, func(c net.Conn, _ int) { f.serve(c) })
	return f
}

func (f *fakeBackend) port() int { return testutil.Port(f.ln) }

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
		if a.Kind == wire.List {
			out = append(out, flatten(a.List)...)
		} else {
			out = append(out, a.S)
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
	heldID := ""
	answerID := func(tag string) {
		w(`* ID ("name" "fake")`)
		w(tag + " OK ID done")
	}
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
		if heldID != "" {
			answerID(heldID)
			heldID = ""
		}
		ev := beEvent{tls: secure}
		for i, l := range raw.Lines {
			ev.raw = append(ev.raw, string(l))
			if i < len(raw.Lits) {
				ev.raw = append(ev.raw, string(raw.Lits[i]))
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
			if f.idAfterNext {
				heldID = tag
			} else {
				answerID(tag)
			}
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

// startSession runs srv.Serve on a fresh TCP connection on 127.0.0.1; setup
// may change the session before Serve starts. The session is trusted and
// without TLS unless setup says otherwise.
func startSession(t testing.TB, srv *Server, setup func(*proxy.Session)) *proxytest.Session {
	t.Helper()
	return proxytest.StartSession(t, srv, proxytest.SessionOptions{Proto: "imap", ID: "sess-1", Trusted: true, Setup: setup})
}

// newTestServer returns a Server whose director points at be (nil: a
// director refusing with proxy.ErrUnavailable).
func newTestServer(be *fakeBackend, mod func(*Options)) (*Server, *proxytest.Director) {
	d := proxytest.NewDirector(netip.MustParseAddr("127.0.0.1"))
	o := Options{
		Director:    d,
		Backend:     proxy.BackendOptions{TLS: config.TLSNone, ConnectTimeout: 2 * time.Second, LoginTimeout: 3 * time.Second},
		IdleTimeout: 5 * time.Second,
	}
	if be != nil {
		o.Backend.Port = be.port()
	} else {
		d.SetErr(proxy.ErrUnavailable)
	}
	if mod != nil {
		mod(&o)
	}
	return New(o), d
}
