package pop3

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

// fakeBackend is a small POP3 server standing in for Dovecot. It records
// every line it receives per connection and, after a successful login,
// answers each line with "+OK echo <line>".
type fakeBackend struct {
	t          testing.TB
	ln         net.Listener
	greeting   string      // default "+OK Dovecot ready."
	capa       []string    // CAPA lines; nil means the backend answers CAPA with -ERR
	tls        *tls.Config // STLS support when set
	users      map[string]string
	silent     bool // never send the greeting
	xclientERR bool // refuse XCLIENT
	// batch holds the replies to the first batch commands (CAPA aside)
	// until all of them have arrived: a client that waits for a reply
	// before sending the next command hangs (pipelining test).
	batch int

	mu    sync.Mutex
	conns [][]string
}

func newFakeBackend(t testing.TB, configure func(*fakeBackend)) *fakeBackend {
	t.Helper()
	ln := testutil.Listen(t)
	b := &fakeBackend{
		t:        t,
		ln:       ln,
		greeting: "+OK Dovecot ready.",
		capa:     []string{"CAPA", "TOP", "UIDL", "RESP-CODES", "USER", "SASL PLAIN"},
		users:    map[string]string{"alice": "secret", "bob": "hunter2"},
	}
	if configure != nil {
		configure(b)
	}
	testutil.Serve(t, ln, func(c net.Conn, _ int) {
		b.mu.Lock()
		idx := len(b.conns)
		b.conns = append(b.conns, nil)
		b.mu.Unlock()
		b.serve(c, idx)
	})
	return b
}

func (b *fakeBackend) port() int { return testutil.Port(b.ln) }

// lines returns what connection i received.
func (b *fakeBackend) lines(i int) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i >= len(b.conns) {
		return nil
	}
	return append([]string(nil), b.conns[i]...)
}

func (b *fakeBackend) connCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

func (b *fakeBackend) record(idx int, line string) {
	b.mu.Lock()
	b.conns[idx] = append(b.conns[idx], line)
	b.mu.Unlock()
}

func (b *fakeBackend) serve(c net.Conn, idx int) {
	_ = c.SetDeadline(time.Now().Add(testutil.DefaultTimeout))
	var conn net.Conn = c
	r := bufio.NewReader(conn)
	held, holding := b.batch, false
	var heldLines []string
	write := func(lines ...string) bool {
		if holding {
			heldLines = append(heldLines, lines...)
			return true
		}
		_, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	if b.silent {
		_, _ = io.Copy(io.Discard, r)
		return
	}
	if !write(b.greeting) {
		return
	}
	user, loggedIn := "", false
	check := func(u, p string) bool {
		want, ok := b.users[u]
		return ok && want == p
	}
	for {
		if held == 0 && len(heldLines) > 0 {
			holding = false
			if !write(heldLines...) {
				return
			}
			heldLines = nil
		}
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line := strings.TrimRight(l, "\r\n")
		// CAPA is answered at once: a client must know before it pipelines.
		if holding = held > 0 && !strings.EqualFold(line, "CAPA"); holding {
			held--
		}
		b.record(idx, line)
		if loggedIn {
			if line == "QUIT" {
				write("+OK bye")
				return
			}
			if !write("+OK echo " + line) {
				return
			}
			continue
		}
		name, args, _ := strings.Cut(line, " ")
		switch strings.ToUpper(name) {
		case "STLS":
			if b.tls == nil {
				write("-ERR TLS support isn't enabled.")
				continue
			}
			write("+OK Begin TLS negotiation now.")
			tc := tls.Server(c, b.tls)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, r = tc, bufio.NewReader(tc)
		case "CAPA":
			if b.capa == nil {
				write("-ERR Unknown command.")
				continue
			}
			write(append(append([]string{"+OK"}, b.capa...), ".")...)
		case "XCLIENT":
			if b.xclientERR {
				write("-ERR You are not from trusted IP")
			} else {
				write("+OK Updated")
			}
		case "USER":
			user = args
			write("+OK")
		case "PASS":
			if check(user, args) {
				loggedIn = true
				write("+OK Logged in.")
			} else {
				write("-ERR [AUTH] Authentication failed.")
			}
		case "AUTH":
			mech, ir, has := strings.Cut(args, " ")
			if mech != "PLAIN" {
				write("-ERR Unsupported authentication mechanism.")
				continue
			}
			if !has {
				write("+ ")
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				ir = strings.TrimRight(l, "\r\n")
				b.record(idx, ir)
			}
			msg, err := base64.StdEncoding.DecodeString(ir)
			parts := bytes.Split(msg, []byte{0})
			if err == nil && len(parts) == 3 && check(string(parts[1]), string(parts[2])) {
				loggedIn = true
				write("+OK Logged in.")
			} else {
				write("-ERR [AUTH] Authentication failed.")
			}
		case "QUIT":
			write("+OK Logging out")
			return
		default:
			write("-ERR Unknown command.")
		}
	}
}

type sessionOpts struct {
	mode    config.TLSMode
	trusted bool
	tls     *tls.Config // the listener's server config
}

// startSession runs a Server with o on a real loopback connection and reads
// the greeting.
func startSession(t *testing.T, o Options, so sessionOpts) *proxytest.Session {
	t.Helper()
	h := proxytest.StartSession(t, New(o), proxytest.SessionOptions{Proto: "pop3", ID: "sid1", Trusted: so.trusted,
		TLSMode: so.mode, TLSConfig: so.tls, ClientTLS: &tls.Config{InsecureSkipVerify: true}})
	h.Client.Expect("+OK usher ready.")
	return h
}

// multi reads a multi-line reply after its status line.
func multi(c *testutil.Client) []string {
	c.T.Helper()
	var out []string
	for {
		l := c.Line()
		if l == "." {
			return out
		}
		out = append(out, l)
	}
}

func plainIR(authzid, authcid, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(authzid + "\x00" + authcid + "\x00" + pass))
}

// options returns Options for a fake backend and director.
func options(b *fakeBackend, d *proxytest.Director) Options {
	o := Options{
		Director:    d,
		IdleTimeout: testutil.DefaultTimeout,
		Backend: proxy.BackendOptions{
			TLS:            config.TLSNone,
			ConnectTimeout: testutil.DefaultTimeout,
			LoginTimeout:   testutil.DefaultTimeout,
		},
	}
	if b != nil {
		o.Backend.Port = b.port()
	}
	return o
}

func newDirector() *proxytest.Director {
	return proxytest.NewDirector(netip.MustParseAddr("127.0.0.1"))
}
