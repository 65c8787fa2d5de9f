package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/usher-mail/usher/internal/config"
)

// ListenerSpec is one address a Server accepts on.
type ListenerSpec struct {
	// Address is host:port, or unix:/path for a UNIX socket.
	Address   string
	TLS       config.TLSMode
	TLSConfig *tls.Config // required for starttls and implicit
	// Mode applies to a UNIX socket (0: 0660); with Chown, UID and GID too
	// (-1 leaves one unchanged).
	Mode     os.FileMode
	Chown    bool
	UID, GID int
	// ProxyProtocol expects a PROXY v1/v2 header from a ProxyTrusted peer
	// before anything else.
	ProxyProtocol bool
	// Takeover lets a UNIX listener replace a live socket at its path: on a
	// reload the new server takes over the path from the server it replaces
	// (the old listener keeps its open socket until it stops accepting).
	Takeover bool
}

// ServerOptions configures a Server for one protocol.
type ServerOptions struct {
	Proto     string // "imap", "pop3"
	Handler   Handler
	Listeners []ListenerSpec
	// Limiter counts sessions against the service's limits. Servers that
	// replace each other on a config reload share one, so sessions of the
	// old server still count. Nil: a new one from MaxSessions(PerIP).
	Limiter          *Limiter
	MaxSessions      int            // 0 = unlimited (used when Limiter is nil)
	MaxSessionsPerIP int            // 0 = unlimited (used when Limiter is nil)
	Trusted          []netip.Prefix // clients allowed plaintext logins without TLS
	// Allow, when not empty, lists the only client networks admitted (the
	// real client address, after a PROXY header). UNIX-socket clients are
	// governed by the socket's file permissions instead.
	Allow []netip.Prefix
	// ProxyTrusted are the load balancers allowed to send PROXY headers.
	ProxyTrusted       []netip.Prefix
	ProxyHeaderTimeout time.Duration // default 5s
	// Refusal is written to a client refused by a limit, e.g.
	// "* BYE [UNAVAILABLE] Too many connections\r\n".
	Refusal          string
	HandshakeTimeout time.Duration // implicit TLS handshake; default 10s
	Observer         Observer      // metrics; nil = none
	Logger           *slog.Logger
	// Relay, when set, carries logged-in sessions without goroutines (see
	// Splice); servers replacing each other on a reload share one.
	Relay *Relay
	// LoginTimeout bounds the whole time from connect to a successful
	// login (0: no bound; for protocols without a login, such as LMTP).
	// Each command also has its idle timeout, but a client sending a
	// command now and then could otherwise hold a pre-login session, and
	// a slot of max_sessions_per_ip, for ever. When it expires the
	// session's context is cancelled with cause ErrLoginTimeout: the
	// handler says goodbye and returns.
	LoginTimeout time.Duration
}

// ErrLoginTimeout is the cause of a session context cancelled because the
// client did not log in within ServerOptions.LoginTimeout.
var ErrLoginTimeout = errors.New("login timeout")

// Limiter counts open sessions of one service, in total and per client IP.
type Limiter struct {
	mu       sync.Mutex
	max      int
	maxPerIP int
	total    int
	perIP    map[netip.Addr]int
}

// NewLimiter returns a Limiter; 0 means unlimited.
func NewLimiter(max, maxPerIP int) *Limiter {
	return &Limiter{max: max, maxPerIP: maxPerIP, perIP: map[netip.Addr]int{}}
}

// SetLimits changes the limits; sessions already open are not closed.
func (l *Limiter) SetLimits(max, maxPerIP int) {
	l.mu.Lock()
	l.max, l.maxPerIP = max, maxPerIP
	l.mu.Unlock()
}

// admit counts a new session against the limits; it reports false when a
// limit is reached.
func (l *Limiter) admit(ip netip.Addr) (ok bool, why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.max > 0 && l.total >= l.max {
		return false, "max_sessions reached"
	}
	if l.maxPerIP > 0 && l.perIP[ip] >= l.maxPerIP {
		return false, "max_sessions_per_ip reached"
	}
	l.total++
	l.perIP[ip]++
	return true, ""
}

func (l *Limiter) leave(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.perIP[ip]--; l.perIP[ip] <= 0 {
		delete(l.perIP, ip)
	}
}

// Open returns the number of open sessions.
func (l *Limiter) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// Server runs the listeners of one protocol.
type Server struct {
	o   ServerOptions
	log *slog.Logger
	lim *Limiter

	mu  sync.Mutex
	lns []net.Listener

	accepters sync.WaitGroup
	sessions  sync.WaitGroup
	// cancelSessions ends every session (hard stop after the drain).
	sessCtx        context.Context
	cancelSessions context.CancelFunc
}

// NewServer returns a Server; call Listen, then Start (or Serve).
func NewServer(o ServerOptions) *Server {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.ProxyHeaderTimeout <= 0 {
		o.ProxyHeaderTimeout = 5 * time.Second
	}
	if o.Observer == nil {
		o.Observer = NopObserver{}
	}
	lim := o.Limiter
	if lim == nil {
		lim = NewLimiter(o.MaxSessions, o.MaxSessionsPerIP)
	}
	for i := range o.Listeners {
		if o.Listeners[i].TLS == "" {
			o.Listeners[i].TLS = config.TLSNone
		}
	}
	return &Server{o: o, log: o.Logger.With("proto", o.Proto), lim: lim}
}

// listenConfig sets SO_REUSEPORT so that a reloaded server can bind its
// addresses while the server it replaces still holds them: no connection is
// refused during a reload.
var listenConfig = net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix_SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}}

// unix_SO_REUSEPORT is SO_REUSEPORT on Linux (not exported by syscall).
const unix_SO_REUSEPORT = 0xf

// Listen opens every listener, so that configuration errors (address in use)
// surface before serving starts.
func (s *Server) Listen() error {
	for _, l := range s.o.Listeners {
		if l.TLS != config.TLSNone && l.TLSConfig == nil {
			s.StopAccepting()
			return fmt.Errorf("listen %s %s: tls %s needs a certificate", s.o.Proto, l.Address, l.TLS)
		}
		ln, err := listen(l)
		if err != nil {
			s.StopAccepting()
			return fmt.Errorf("listen %s: %w", s.o.Proto, err)
		}
		s.mu.Lock()
		s.lns = append(s.lns, ln)
		s.mu.Unlock()
		addr := l.Address
		if !strings.HasPrefix(addr, "unix:") {
			addr = ln.Addr().String() // the port chosen for :0
		}
		s.log.Info("listening", "address", addr, "tls", string(l.TLS), "proxy_protocol", l.ProxyProtocol)
	}
	return nil
}

// listen opens one TCP or UNIX listener.
func listen(l ListenerSpec) (net.Listener, error) {
	path, isUnix := strings.CutPrefix(l.Address, "unix:")
	if !isUnix {
		return listenConfig.Listen(context.Background(), "tcp", l.Address)
	}
	// A socket file left by a previous run is replaced; anything else at
	// the path is an error.
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if !l.Takeover {
			if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
				c.Close()
				return nil, fmt.Errorf("%s: another process is listening", path)
			}
		}
	}
	// The socket is made under a temporary name and renamed over the path,
	// so the path always answers, also across a reload.
	tmp := fmt.Sprintf("%s.%d.new", path, os.Getpid())
	os.Remove(tmp)
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	// Closing must not unlink the path: by then it may belong to the server
	// that took over. A stale file is replaced at the next start.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		ln.Close()
		os.Remove(tmp)
		return nil, err
	}
	mode := l.Mode
	if mode == 0 {
		mode = 0o660
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(err)
	}
	if l.Chown {
		if err := os.Lchown(tmp, l.UID, l.GID); err != nil {
			return fail(err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	return ln, nil
}

// StopAccepting closes the listeners; open sessions go on.
func (s *Server) StopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ln := range s.lns {
		ln.Close()
	}
}

// Start accepts on every listener in the background. Sessions run under
// ctx: when it ends, they are closed.
func (s *Server) Start(ctx context.Context) {
	s.sessCtx, s.cancelSessions = context.WithCancel(ctx)
	s.mu.Lock()
	lns := append([]net.Listener(nil), s.lns...)
	s.mu.Unlock()
	for i, ln := range lns {
		s.accepters.Add(1)
		go func() {
			defer s.accepters.Done()
			s.accept(ln, s.o.Listeners[i])
		}()
	}
}

// Drain stops accepting and waits for the open sessions to end until ctx
// ends; then it closes the remaining sessions and waits for them. It
// returns how many sessions had to be closed.
func (s *Server) Drain(ctx context.Context) int {
	s.StopAccepting()
	s.accepters.Wait()
	done := make(chan struct{})
	go func() {
		s.sessions.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancelSessions()
		return 0
	case <-ctx.Done():
	}
	n := s.lim.Open()
	s.cancelSessions()
	<-done
	return n
}

// Serve is Start, then, when ctx ends, Drain without grace.
func (s *Server) Serve(ctx context.Context) {
	s.Start(context.WithoutCancel(ctx))
	<-ctx.Done()
	s.Drain(ctx)
}

func (s *Server) accept(ln net.Listener, spec ListenerSpec) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary failure (EMFILE...): back off like net/http.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.sessions.Add(1) // done when the session ends (handle, or the Relay later)
		go s.handle(s.sessCtx, wrapConn(c), spec)
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// Addrs returns the addresses of the open listeners (useful with port 0).
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.lns))
	for i, ln := range s.lns {
		out[i] = ln.Addr()
	}
	return out
}

// Sessions returns the number of open sessions of the server's Limiter.
func (s *Server) Sessions() int { return s.lim.Open() }

// closeGrace is how long a handler has to say goodbye after its session's
// context ended before the connection is closed under it.
const closeGrace = time.Second

func newSessionID() string {
	var b [9]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func contains(prefixes []netip.Prefix, ip netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// remoteString names the client in logs: its address, or the socket path.
func remoteString(remote netip.AddrPort, listener string) string {
	if remote.IsValid() {
		return remote.String()
	}
	return listener
}

// readProxyHeader reads a PROXY protocol v1/v2 header (from a ProxyTrusted
// peer only, within ProxyHeaderTimeout) and returns the connection to use
// and the client and local addresses the header carries. A LOCAL header
// (health checks of the load balancer) keeps the peer's own addresses.
func (s *Server) readProxyHeader(c net.Conn, remote, local netip.AddrPort) (net.Conn, netip.AddrPort, netip.AddrPort, error) {
	if !remote.IsValid() || !contains(s.o.ProxyTrusted, remote.Addr()) {
		return c, remote, local, fmt.Errorf("peer %s is not in proxy_trusted", remote)
	}
	_ = c.SetReadDeadline(time.Now().Add(s.o.ProxyHeaderTimeout))
	br := bufio.NewReaderSize(c, 4096)
	h, err := proxyproto.Read(br)
	_ = c.SetReadDeadline(noDeadline)
	if err != nil {
		return c, remote, local, fmt.Errorf("read PROXY header: %w", err)
	}
	if h.Command.IsProxy() {
		if src, ok := h.SourceAddr.(*net.TCPAddr); ok {
			ap := src.AddrPort()
			remote = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		if dst, ok := h.DestinationAddr.(*net.TCPAddr); ok {
			ap := dst.AddrPort()
			local = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	if n := br.Buffered(); n > 0 {
		// The peer sent more than the header: keep those bytes in front.
		pending, _ := br.Peek(n)
		c = &prefixConn{Conn: c, pre: bytes.NewReader(append([]byte(nil), pending...))}
	}
	return c, remote, local, nil
}

// prefixConn is a connection with bytes already read put back in front.
type prefixConn struct {
	net.Conn
	pre *bytes.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if p.pre.Len() > 0 {
		return p.pre.Read(b)
	}
	return p.Conn.Read(b)
}

// unwrapConn returns the socket under usher's own wrappers: under a
// prefixConn once nothing is left in front of it, and under a rawConn; so
// that the Relay can take it and io.Copy splice it. Anything else (TLS, a
// prefix still pending) is returned as it is.
func unwrapConn(c net.Conn) net.Conn {
	for {
		if p, ok := c.(*prefixConn); ok && p.pre.Len() == 0 {
			c = p.Conn
			continue
		}
		var ok bool
		if c, ok = unwrapRaw(c); !ok {
			return c
		}
	}
}

func (s *Server) handle(ctx context.Context, c net.Conn, spec ListenerSpec) {
	ended := false
	defer func() {
		if !ended {
			s.sessions.Done() // refused before the session began
		}
	}()
	remote, local := addrPort(c.RemoteAddr()), addrPort(c.LocalAddr())
	id := newSessionID()
	isUnix := strings.HasPrefix(spec.Address, "unix:")
	log := s.log.With("session", id, "remote", remoteString(remote, spec.Address))
	if spec.ProxyProtocol {
		var err error
		c, remote, local, err = s.readProxyHeader(c, remote, local)
		if err != nil {
			log.Warn("connection refused", "reason", "proxy protocol", "err", err)
			c.Close()
			return
		}
		log = s.log.With("session", id, "remote", remoteString(remote, spec.Address), "proxy", c.RemoteAddr().String())
	}
	if !isUnix && len(s.o.Allow) > 0 && !contains(s.o.Allow, remote.Addr()) {
		log.Warn("connection refused", "reason", "client address not in allow list")
		c.Close()
		return
	}
	if ok, why := s.lim.admit(remote.Addr()); !ok {
		log.Warn("connection refused", "reason", why)
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Write([]byte(s.o.Refusal))
		c.Close()
		return
	}

	sess := &Session{
		ID: id, Proto: s.o.Proto, Conn: c, Remote: remote, Local: local, Start: time.Now(), Log: log,
		TLSMode: spec.TLS, TLSConfig: spec.TLSConfig, Obs: s.o.Observer, relay: s.o.Relay,
		// Local UNIX-socket clients are as trusted as loopback ones.
		Trusted: isUnix && !spec.ProxyProtocol || contains(s.o.Trusted, remote.Addr()),
	}
	// Closing the raw connection also ends any TLS layer the handler put on it.
	ctx, cancelCause := context.WithCancelCause(ctx)
	cancel := func() { cancelCause(nil) }
	stopLoginTimer := func() bool { return false }
	if d := s.o.LoginTimeout; d > 0 {
		t := time.AfterFunc(d, func() {
			if sess.phase.CompareAndSwap(phasePreLogin, phaseLoginTimedOut) {
				log.Info("login timeout", "limit", d.String())
				cancelCause(ErrLoginTimeout)
			}
		})
		stopLoginTimer = t.Stop
	}
	// Handlers watch ctx and say goodbye (IMAP "* BYE", POP3 "-ERR"); the
	// connection is closed shortly after in case one does not.
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(closeGrace, func() { c.Close() }) })
	// finish ends the session: here when the Handler returns, or from the
	// Relay when the Handler handed the spliced session over (sess.detached).
	sess.finish = func(reason string) {
		stopLoginTimer()
		stop()
		cancel()
		if sess.phase.Load() == phaseLoginTimedOut {
			reason = "login timeout"
		}
		sess.Conn.Close()
		c.Close()
		backend := ""
		if sess.loggedIn.IsValid() {
			backend = sess.loggedIn.String()
		}
		s.o.Observer.SessionClosed(s.o.Proto, backend, sess.BytesIn.Load(), sess.BytesOut.Load())
		log.Info("session end", "user", sess.User, "backend", sess.Backend,
			"bytes_in", sess.BytesIn.Load(), "bytes_out", sess.BytesOut.Load(),
			"duration", time.Since(sess.Start).Round(time.Millisecond).String(), "reason", reason)
		s.lim.leave(remote.Addr())
		s.sessions.Done()
	}
	ended = true
	s.o.Observer.SessionOpened(s.o.Proto)
	log.Info("session start", "local", remoteString(local, spec.Address), "tls", string(sess.TLSMode))

	reason := ""
	defer func() {
		// A bug in one session must not take the director down.
		if r := recover(); r != nil {
			log.Error("session panic", "panic", r, "stack", string(debug.Stack()))
			reason = "internal error"
		}
		if !sess.detached {
			sess.finish(reason)
		}
	}()
	if spec.TLS == config.TLSImplicit {
		tc := tls.Server(c, spec.TLSConfig)
		hctx, hcancel := context.WithTimeout(ctx, s.o.HandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		hcancel()
		if err != nil {
			reason = "tls handshake failed"
			log.Info("tls handshake failed", "err", err)
		} else {
			sess.Conn, sess.Secure = tc, true
		}
	}
	if reason == "" {
		reason = s.o.Handler.Serve(ctx, sess)
	}
}
