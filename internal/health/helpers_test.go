package health

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
)

var localhost = netip.MustParseAddr("127.0.0.1")

// fakeServer is a scripted mail server on 127.0.0.1 counting its
// connections.
type fakeServer struct {
	ln        net.Listener
	port      int
	conns     atomic.Int64 // connections accepted
	active    atomic.Int64 // connections open now
	maxActive atomic.Int64
	handle    func(c net.Conn, n int)

	mu   sync.Mutex
	open map[net.Conn]bool
	wg   sync.WaitGroup
}

// newFake serves handle (given each connection and its index from 0) on
// 127.0.0.1:0, or on ln when not nil.
func newFake(t *testing.T, ln net.Listener, handle func(c net.Conn, n int)) *fakeServer {
	t.Helper()
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	s := &fakeServer{ln: ln, port: ln.Addr().(*net.TCPAddr).Port, handle: handle, open: map[net.Conn]bool{}}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.close)
	return s
}

func (s *fakeServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		n := int(s.conns.Add(1)) - 1
		a := s.active.Add(1)
		for {
			m := s.maxActive.Load()
			if a <= m || s.maxActive.CompareAndSwap(m, a) {
				break
			}
		}
		s.mu.Lock()
		s.open[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
				c.Close()
				s.active.Add(-1)
			}()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			s.handle(c, n)
		}()
	}
}

func (s *fakeServer) close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// lineConn reads lines from a fake server's connection.
type lineConn struct {
	c net.Conn
	r *bufio.Reader
}

func newLineConn(c net.Conn) *lineConn { return &lineConn{c: c, r: bufio.NewReader(c)} }

func (l *lineConn) read() (string, bool) {
	line, err := l.r.ReadString('\n')
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r"), true
}

func (l *lineConn) write(lines ...string) bool {
	_, err := l.c.Write([]byte(strings.Join(lines, "\r\n") + "\r\n"))
	return err == nil
}

// fakeIMAP describes a fake IMAP server's behaviour on one connection.
type fakeIMAP struct {
	greeting string      // default "* OK ready"
	tls      *tls.Config // answers STARTTLS when set
	// login answers a LOGIN line ("a LOGIN ...") with true for OK.
	login func(line string) bool
	// afterStartTLS, when set, is written together with the tagged OK to
	// STARTTLS (plaintext injection).
	afterStartTLS string
}

func (f fakeIMAP) serve(c net.Conn) {
	l := newLineConn(c)
	g := f.greeting
	if g == "" {
		g = "* OK ready"
	}
	if !l.write(g) || !strings.HasPrefix(g, "* OK") {
		return
	}
	for {
		line, ok := l.read()
		if !ok {
			return
		}
		tag, rest, _ := strings.Cut(line, " ")
		cmd, _, _ := strings.Cut(rest, " ")
		switch strings.ToUpper(cmd) {
		case "STARTTLS":
			if f.tls == nil {
				l.write(tag + " BAD no TLS here")
				continue
			}
			if f.afterStartTLS != "" {
				l.write(tag+" OK Begin TLS", f.afterStartTLS)
			} else {
				l.write(tag + " OK Begin TLS")
			}
			tc := tls.Server(c, f.tls)
			if tc.Handshake() != nil {
				return
			}
			l = newLineConn(tc)
		case "LOGIN":
			if f.login != nil && f.login(line) {
				// An untagged response with a literal holding a CRLF: 5 bytes "HI\r\nX".
				l.write("* ID {5}", "HI", "X more", tag+" OK [CAPABILITY IMAP4rev1] Logged in")
			} else {
				// Echo the command, as a careless server might.
				l.write(tag + " NO [AUTHENTICATIONFAILED] failed: " + line)
			}
		case "LOGOUT":
			l.write("* BYE Logging out", tag+" OK Logout completed.")
			return
		default:
			l.write(tag + " BAD unknown command")
		}
	}
}

// fakePOP3 describes a fake POP3 server's behaviour on one connection.
type fakePOP3 struct {
	greeting string // default "+OK ready"
	tls      *tls.Config
	user     string
	pass     string
}

func (f fakePOP3) serve(c net.Conn) {
	l := newLineConn(c)
	g := f.greeting
	if g == "" {
		g = "+OK ready"
	}
	if !l.write(g) || !strings.HasPrefix(g, "+OK") {
		return
	}
	var user string
	for {
		line, ok := l.read()
		if !ok {
			return
		}
		cmd, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(cmd) {
		case "STLS":
			if f.tls == nil {
				l.write("-ERR no TLS")
				continue
			}
			l.write("+OK Begin TLS negotiation")
			tc := tls.Server(c, f.tls)
			if tc.Handshake() != nil {
				return
			}
			l = newLineConn(tc)
		case "USER":
			user = arg
			l.write("+OK")
		case "PASS":
			if user == f.user && arg == f.pass {
				l.write("+OK Logged in.")
			} else {
				l.write("-ERR [AUTH] Authentication failed: " + line)
			}
		case "QUIT":
			l.write("+OK Logging out.")
			return
		default:
			l.write("-ERR unknown command")
		}
	}
}

// recorder records the Checker's callbacks in order.
type recorder struct {
	mu     sync.Mutex
	events []recEvent
}

type recEvent struct {
	report bool // a Report call, else an Observe call
	up, ok bool
	proto  string
	cause  string
	at     time.Time
	addr   netip.Addr
	held   time.Time // for down reports: Status().HeldUntil at report time
}

func (r *recorder) observe(addr netip.Addr, proto string, ok bool, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, recEvent{addr: addr, proto: proto, ok: ok, at: time.Now()})
}

func (r *recorder) add(e recEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

func (r *recorder) snapshot() []recEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]recEvent(nil), r.events...)
}

func (r *recorder) reports() []recEvent {
	var out []recEvent
	for _, e := range r.snapshot() {
		if e.report {
			out = append(out, e)
		}
	}
	return out
}

// harness runs a Checker for one test.
type harness struct {
	c    *Checker
	rec  *recorder
	logs *testutil.LogBuffer
	stop func() // cancels Run and waits for it
}

// start runs a Checker with o (Report, Observe and Logger filled in) on
// addrs. Report calls Status from inside the callback, which also checks
// that no lock is held.
func start(t *testing.T, o Options, addrs ...netip.Addr) *harness {
	t.Helper()
	h := &harness{rec: &recorder{}, logs: &testutil.LogBuffer{}}
	o.Observe = h.rec.observe
	o.Report = func(addr netip.Addr, up bool, cause string) {
		e := recEvent{report: true, addr: addr, up: up, cause: cause, at: time.Now()}
		if st, ok := h.c.Status(addr); ok {
			e.held = st.HeldUntil
		}
		h.rec.add(e)
	}
	o.Logger = testutil.NewLogger(h.logs)
	h.c = New(o)
	h.c.SetBackends(addrs)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.c.Run(ctx)
	}()
	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Error("Run did not return within 5s of cancel")
			}
		})
	}
	t.Cleanup(h.stop)
	return h
}

func imapService(port int) Service {
	return Service{Proto: ProtoIMAP, Backend: proxy.BackendOptions{Port: port, TLS: config.TLSNone}}
}

func pop3Service(port int) Service {
	return Service{Proto: ProtoPOP3, Backend: proxy.BackendOptions{Port: port, TLS: config.TLSNone}}
}

// fastOptions is a quick schedule for tests.
func fastOptions(services ...Service) Options {
	return Options{Services: services, Interval: 20 * time.Millisecond, Timeout: 200 * time.Millisecond, Fall: 3, Rise: 2}
}
