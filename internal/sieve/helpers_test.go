package sieve

import (
	"crypto/tls"
	"encoding/base64"
	"net"
	"net/netip"
	"strconv"
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
	ln := testutil.Listen(t)
	f := &fakeBackend{
		t: t, ln: ln, sasl: "PLAIN LOGIN",
		users:  map[string]string{"alice": "secret"},
		events: make(chan beEvent, 100),
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
	lim := wire.FrameLimits{Literal: 1 << 20, Literals: 16, Total: 4 << 20}
	for {
		fr, err := r.ReadFrame(lim, nil)
		if err != nil {
			return
		}
		ev := beEvent{raw: string(fr.Bytes()), tls: secure, post: loggedIn}
		cmd, err := parseCommand(fr)
		if err != nil {
			ev.name = "PARSE-ERROR"
			f.events <- ev
			w("NO \"parse error\"\r\n")
			continue
		}
		ev.name = cmd.name
		for _, a := range cmd.args {
			ev.args = append(ev.args, a.S)
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
			if len(cmd.args) == 0 || !cmd.args[0].IsString() || wire.UpperASCII(cmd.args[0].S) != "PLAIN" {
				f.events <- ev
				w("NO \"Unsupported authentication mechanism.\"\r\n")
				continue
			}
			resp := ""
			if len(cmd.args) == 2 {
				resp = cmd.args[1].S
			} else {
				w("\"\"\r\n")
				fr, err := r.ReadFrame(lim, nil)
				if err != nil {
					return
				}
				ev.raw += string(fr.Bytes())
				args, _ := parseArgs(fr)
				if len(args) == 1 {
					resp = args[0].S
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

// capabilities reads capability lines up to the OK and returns them by
// upper-cased name, and the OK line.
func capabilities(c *testutil.Client) (map[string]string, string) {
	c.T.Helper()
	caps := map[string]string{}
	for range 50 {
		l := c.Line()
		if strings.HasPrefix(l, "OK") {
			return caps, l
		}
		f := &wire.Frame{Lines: [][]byte{[]byte(l)}}
		args, err := parseArgs(f)
		if err != nil || len(args) == 0 || len(args) > 2 || !args[0].IsString() {
			c.T.Fatalf("invalid capability line %q (%v)", l, err)
		}
		name := strings.ToUpper(args[0].S)
		if _, dup := caps[name]; dup {
			c.T.Errorf("capability %s listed twice", name)
		}
		caps[name] = ""
		if len(args) == 2 {
			caps[name] = args[1].S
		}
	}
	c.T.Fatal("capability response without OK")
	return nil, ""
}

// startSession runs srv.Serve on a fresh TCP connection on 127.0.0.1; setup
// may change the session before Serve starts. The session is trusted and
// without TLS unless setup says otherwise.
func startSession(t testing.TB, srv *Server, setup func(*proxy.Session)) *proxytest.Session {
	t.Helper()
	return proxytest.StartSession(t, srv, proxytest.SessionOptions{Proto: "sieve", ID: "sess-1", Trusted: true, Setup: setup})
}

// greet reads the greeting (capabilities and OK).
func greet(s *proxytest.Session) map[string]string {
	caps, _ := capabilities(s.Client)
	return caps
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
func checkSpliced(t *testing.T, c *testutil.Client, be *fakeBackend) {
	t.Helper()
	script := "require \"fileinto\";\r\nfileinto \"Junk\";\r\n"
	c.Write(`PUTSCRIPT "usher-test" ` + lit(script, true) + "\r\n")
	ev := be.nextNamed(t, "PUTSCRIPT")
	if !ev.post || len(ev.args) != 2 || ev.args[0] != "usher-test" || ev.args[1] != script {
		t.Errorf("backend got PUTSCRIPT %q (after login: %v)", ev.args, ev.post)
	}
	c.ExpectPrefix(`OK "putscript done"`)
}
