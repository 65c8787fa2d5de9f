// Package pop3 is usher's POP3 front end: it speaks the AUTHORIZATION state
// of POP3 to the client (RFC 1939, with CAPA and extended response codes of
// RFC 2449, the SYS and AUTH codes of RFC 3206, STLS of RFC 2595 and SASL
// AUTH PLAIN of RFC 5034) until it knows the user name and password, asks
// the Director for the user's backend, replays the login there and then
// splices the two connections. Before the login usher sends XCLIENT when the
// backend offers it (Dovecot's "+OK [XCLIENT]" greeting to trusted peers, or
// an XCLIENT capability), so the backend sees the real client and usher's
// session ID.
//
// Invariants:
//   - Every client read has the idle deadline and a line cap (wire.Reader);
//     every backend exchange is bounded by one login deadline.
//   - Passwords live only in credentials values, which log as the user
//     name; PASS and AUTH lines are never logged, nor are commands sent to
//     the backend put into errors.
//   - Plaintext credentials are refused unless the session is secure or
//     trusted (RFC 2595 section 3.2); USER and SASL PLAIN are then not
//     advertised either.
//   - STLS with bytes pipelined after it is refused and the session closed,
//     so no plaintext can be injected into the TLS session.
//   - A login the backend rejects leaves the client in the AUTHORIZATION
//     state with the backend's -ERR line; the backend connection is closed
//     and the Director lease released. A successful login holds the lease
//     until the spliced session ends.
//   - Bad commands, commands before login and failed logins are counted and
//     bounded; exceeding a bound closes the session.
package pop3

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// Limits of the AUTHORIZATION state.
const (
	// maxBadCommands closes a session after this many unknown or malformed
	// commands in a row (Dovecot 2.2 used 10 as well).
	maxBadCommands = 10
	// maxCommands bounds all commands before login; a real client needs a
	// handful (CAPA, STLS, CAPA, USER, PASS).
	maxCommands = 100
	// maxLoginFailures closes a session after this many logins the backend
	// rejected.
	maxLoginFailures = 5

	defaultIdleTimeout  = 60 * time.Second
	defaultLoginTimeout = 30 * time.Second
)

// Options configures the POP3 front end.
type Options struct {
	// Director picks the user's backend. Required.
	Director proxy.Director
	// Backend says how to reach backends (port, TLS, timeouts).
	Backend proxy.BackendOptions
	// IdleTimeout is the read deadline for each client command before login
	// and bounds the client's STLS handshake (default 60s).
	IdleTimeout time.Duration
}

// Server serves POP3 sessions; it implements proxy.Handler and is safe for
// concurrent use (it holds only its options).
type Server struct {
	o Options
	// maxLine caps a client line; tests lower it so short inputs reach the
	// overlong-line path.
	maxLine int
}

var _ proxy.Handler = (*Server)(nil)

// New returns a POP3 Server.
func New(o Options) *Server { return &Server{o: o, maxLine: wire.DefaultMaxLine} }

func (s *Server) idleTimeout() time.Duration {
	if s.o.IdleTimeout > 0 {
		return s.o.IdleTimeout
	}
	return defaultIdleTimeout
}

func (s *Server) loginTimeout() time.Duration {
	if s.o.Backend.LoginTimeout > 0 {
		return s.o.Backend.LoginTimeout
	}
	return defaultLoginTimeout
}

// client is one session in the AUTHORIZATION state.
type client struct {
	srv  *Server
	sess *proxy.Session
	r    *wire.Reader

	// unwatch stops the shutdown watcher before splicing; false means the
	// shutdown already closed the client connection.
	unwatch func() bool

	user     string // from USER, waiting for PASS
	hasUser  bool
	bad      int // consecutive bad commands
	commands int // commands so far
	failures int // logins the backend rejected
}

// Serve runs the session until the client quits, breaks a rule, or logs in
// and the spliced connection ends. It returns the reason for the session's
// log line.
func (s *Server) Serve(ctx context.Context, sess *proxy.Session) (reason string) {
	if sess.Log == nil {
		sess.Log = slog.New(slog.DiscardHandler)
	}
	c := &client{srv: s, sess: sess, r: wire.NewReader(sess.Conn, s.idleTimeout(), s.maxLine)}
	// A shutdown closes the client connection (and with it any TLS layered
	// on it later), which ends a pending read at once; a read deadline set
	// from here could be overwritten by the reader's next one.
	raw := sess.Conn
	c.unwatch = context.AfterFunc(ctx, func() { raw.Close() })
	defer c.unwatch()

	if err := c.reply(replyGreeting); err != nil {
		return c.writeFailed(ctx)
	}
	for {
		line, err := c.r.ReadLine()
		if err != nil {
			if errors.Is(err, wire.ErrLineTooLong) {
				// RFC 2449 section 4 caps commands at 255 octets; usher
				// allows up to the wire cap for long AUTH responses. The
				// line was consumed: answer and go on.
				sess.Log.Debug("line too long")
				if reason, end := c.badCommand(replyLineTooLong); end {
					return reason
				}
				continue
			}
			return c.readFailed(ctx, err)
		}
		if reason, end := c.handle(ctx, line); end {
			return reason
		}
	}
}

// handle runs one command line. end reports that the session is over.
func (c *client) handle(ctx context.Context, line []byte) (reason string, end bool) {
	c.commands++
	if c.commands > maxCommands {
		c.sess.Log.Info("too many commands without login")
		_ = c.reply(replyTooMany)
		return "too many commands", true
	}
	cmd, err := parseCommand(line)
	if err != nil {
		c.sess.Log.Debug("malformed command")
		return c.badCommand(replyUnknown)
	}
	switch cmd.name {
	case "CAPA", "USER", "PASS", "AUTH", "STLS", "QUIT":
		c.bad = 0 // the count is of bad commands in a row
	}
	switch cmd.name {
	case "CAPA":
		return c.done(c.reply(c.capabilities()...))
	case "USER":
		return c.cmdUser(cmd.args)
	case "PASS":
		return c.cmdPass(ctx, cmd.args)
	case "AUTH":
		return c.cmdAuth(ctx, cmd.args)
	case "STLS":
		return c.cmdSTLS(ctx)
	case "QUIT":
		// RFC 1939 section 4: QUIT in the AUTHORIZATION state ends the
		// session without entering the UPDATE state.
		_ = c.reply(replyLogout)
		return "logout", true
	default:
		// NOOP, STAT, RETR, ... are only valid in the TRANSACTION state
		// (RFC 1939 section 5); APOP is not offered (no timestamp in the
		// greeting).
		c.sess.Log.Debug("unknown command", "command", sanitize(cmd.name))
		return c.badCommand(replyUnknown)
	}
}

// capabilities is the CAPA reply (RFC 2449 section 5): only what usher offers
// before login. The backend's full list is available after login.
func (c *client) capabilities() []string {
	caps := []string{replyCapa}
	if c.sess.PlaintextAllowed() {
		caps = append(caps, "USER", "SASL PLAIN") // RFC 2449 sections 6.2, 6.3
	}
	if c.stlsOffered() {
		caps = append(caps, "STLS") // RFC 2595 section 4
	}
	// RFC 2449 section 6.4, RFC 3206 section 6, RFC 2449 section 6.9.
	return append(caps, "RESP-CODES", "AUTH-RESP-CODE", "IMPLEMENTATION usher", ".")
}

func (c *client) stlsOffered() bool {
	return c.sess.TLSMode == config.TLSStartTLS && c.sess.TLSConfig != nil && !c.sess.Secure
}

// cmdUser is RFC 1939 section 7 USER: the rest of the line is the name.
func (c *client) cmdUser(args string) (string, bool) {
	if !c.sess.PlaintextAllowed() {
		c.sess.Log.Debug("plaintext login refused", "user", sanitize(args))
		return c.done(c.reply(replyPlainDisallowed))
	}
	if args == "" {
		return c.badCommand(replyEmptyUser)
	}
	c.user, c.hasUser = args, true
	return c.done(c.reply(replyOK))
}

// cmdPass is RFC 1939 section 7 PASS: valid after USER; the rest of the line
// is the password.
func (c *client) cmdPass(ctx context.Context, args string) (string, bool) {
	if !c.sess.PlaintextAllowed() {
		return c.done(c.reply(replyPlainDisallowed))
	}
	if !c.hasUser {
		return c.done(c.reply(replyNoUser))
	}
	cr := &credentials{user: c.user, pass: args}
	c.user, c.hasUser = "", false // a failed PASS needs a new USER (as Dovecot)
	if args == "" {
		return c.done(c.reply(replyEmptyPass))
	}
	return c.login(ctx, cr)
}

// cmdAuth is RFC 5034 AUTH. Without arguments it lists the mechanisms (the
// pre-RFC discovery some clients still use); PLAIN takes an optional initial
// response, otherwise usher sends an empty challenge and reads one response
// line. "*" cancels (RFC 5034 section 4).
func (c *client) cmdAuth(ctx context.Context, args string) (string, bool) {
	mech, ir, hasIR := strings.Cut(args, " ")
	if mech == "" {
		lines := []string{replyMechs}
		if c.sess.PlaintextAllowed() {
			lines = append(lines, "PLAIN")
		}
		return c.done(c.reply(append(lines, ".")...))
	}
	if !strings.EqualFold(mech, "PLAIN") {
		return c.done(c.reply(replyNoMech))
	}
	if !c.sess.PlaintextAllowed() {
		return c.done(c.reply(replyPlainDisallowed))
	}
	c.user, c.hasUser = "", false
	if !hasIR {
		if err := c.reply(replyContinue); err != nil {
			return c.writeFailed(ctx), true
		}
		line, err := c.r.ReadLine()
		if errors.Is(err, wire.ErrLineTooLong) {
			return c.badCommand(replyLineTooLong)
		}
		if err != nil {
			return c.readFailed(ctx, err), true
		}
		ir = string(line)
		if ir == "*" {
			return c.done(c.reply(replyAuthAborted))
		}
		if ir == "" {
			// An empty line is an empty response, which PLAIN cannot be.
			return c.done(c.reply(replyBadPlain))
		}
	}
	msg, err := decodeSASLResponse(ir)
	if err != nil {
		return c.done(c.reply(replyBadBase64))
	}
	cr, err := parsePlain(msg)
	if err != nil {
		return c.done(c.reply(replyBadPlain))
	}
	return c.login(ctx, cr)
}

// cmdSTLS is RFC 2595 section 4 STLS.
func (c *client) cmdSTLS(ctx context.Context) (string, bool) {
	switch {
	case c.sess.Secure:
		return c.done(c.reply(replyTLSActive))
	case !c.stlsOffered():
		return c.done(c.reply(replyTLSUnavail))
	case c.r.Buffered() > 0:
		// Bytes after STLS were sent in plaintext but would be read as if
		// they came over TLS (the CVE-2011-0411 pattern).
		c.sess.Log.Warn("data pipelined after STLS, closing")
		_ = c.reply(replySTLSPipeline)
		return "starttls injection", true
	}
	if err := c.reply(replyBeginTLS); err != nil {
		return c.writeFailed(ctx), true
	}
	hctx, cancel := context.WithTimeout(ctx, c.srv.idleTimeout())
	defer cancel()
	tc := tls.Server(c.sess.Conn, c.sess.TLSConfig)
	if err := tc.HandshakeContext(hctx); err != nil {
		if ctx.Err() != nil {
			return "shutdown", true
		}
		c.sess.Log.Info("client TLS handshake failed", "error", err)
		return "tls handshake failed", true
	}
	c.sess.Conn, c.sess.Secure = tc, true
	c.r = wire.NewReader(tc, c.srv.idleTimeout(), c.srv.maxLine)
	// RFC 2595 section 4: the client discards what it knew; usher forgets a
	// USER given before.
	c.user, c.hasUser = "", false
	return "", false
}

// login acquires the user's backend, replays the login there and, on
// success, splices the connections until the session ends.
func (c *client) login(ctx context.Context, cr *credentials) (string, bool) {
	start := time.Now()
	log := c.sess.Log.With("user", cr.user)
	if c.srv.o.Director == nil {
		log.Error("pop3: no director configured")
		return c.done(c.reply(replyUnavailable))
	}
	lease, err := c.srv.o.Director.Acquire(ctx, cr.user)
	if err != nil {
		if ctx.Err() != nil {
			return "shutdown", true
		}
		return c.loginFailed(ctx, log, start, netip.Addr{}, err)
	}
	c.sess.User = cr.user
	c.sess.Backend = c.srv.o.Backend.Addr(lease.Backend)
	log = log.With("backend", c.sess.Backend)

	bconn, br, okLine, err := c.srv.backendLogin(ctx, c.sess, lease.Backend, cr)
	if err != nil {
		lease.Release()
		if ctx.Err() != nil {
			return "shutdown", true
		}
		return c.loginFailed(ctx, log, start, lease.Backend, err)
	}
	defer lease.Release()
	log.Info("login", "result", "ok", "elapsed", time.Since(start).Round(time.Millisecond))
	c.sess.LoginDone(proxy.LoginOK, lease.Backend, time.Since(start))
	if err := c.reply(okLine); err != nil {
		bconn.Close()
		return c.writeFailed(ctx), true
	}
	if !c.unwatch() {
		// The shutdown already closed the client connection.
		bconn.Close()
		return "shutdown", true
	}
	return proxy.Splice(ctx, c.sess, c.sess.Conn, c.r.Pending(), bconn, br.Pending(), lease), true
}

// loginFailed answers a failed login and logs it; the session goes on in the
// AUTHORIZATION state unless the client failed too often.
func (c *client) loginFailed(ctx context.Context, log *slog.Logger, start time.Time, backend netip.Addr, err error) (string, bool) {
	reply, level, result := loginFailure(err)
	log.Log(ctx, level, "login", "result", result, "elapsed", time.Since(start).Round(time.Millisecond), "error", err)
	metric := proxy.LoginUnavailable
	if result == "rejected" {
		metric = proxy.LoginFailed
	}
	c.sess.LoginDone(metric, backend, time.Since(start))
	if err := c.reply(reply); err != nil {
		return c.writeFailed(ctx), true
	}
	var rej *loginRejected
	if errors.As(err, &rej) {
		c.failures++
		if c.failures >= maxLoginFailures {
			log.Info("too many failed logins, closing")
			return "too many login failures", true
		}
	}
	return "", false
}

// badCommand answers an unknown or malformed command and closes the session
// after too many in a row.
func (c *client) badCommand(reply string) (string, bool) {
	c.bad++
	if c.bad >= maxBadCommands {
		c.sess.Log.Info("too many bad commands, closing")
		_ = c.reply(replyTooManyBad)
		return "too many bad commands", true
	}
	return c.done(c.reply(reply))
}

// done turns a reply's write error into the end of the session.
func (c *client) done(err error) (string, bool) {
	if err != nil {
		return "client write failed", true
	}
	return "", false
}

// reply writes lines, each ended by CRLF, in one write with a deadline.
func (c *client) reply(lines ...string) error {
	n := 0
	for _, l := range lines {
		n += len(l) + 2
	}
	buf := make([]byte, 0, n)
	for _, l := range lines {
		buf = append(buf, l...)
		buf = append(buf, '\r', '\n')
	}
	if err := c.sess.Conn.SetWriteDeadline(time.Now().Add(c.srv.idleTimeout())); err != nil {
		return err
	}
	_, err := c.sess.Conn.Write(buf)
	return err
}

// readFailed maps a client read error to the session's end.
func (c *client) readFailed(ctx context.Context, err error) string {
	switch {
	case ctx.Err() != nil:
		return "shutdown"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "client closed"
	case errors.Is(err, wire.ErrTooMuch):
		c.sess.Log.Info("client sent too much without a line end")
		_ = c.reply(replyLineTooLong)
		return "line too long"
	case errors.Is(err, os.ErrDeadlineExceeded):
		_ = c.reply(replyIdle)
		return "idle timeout"
	case errors.Is(err, net.ErrClosed):
		return "client closed"
	default:
		c.sess.Log.Debug("client read failed", "error", err)
		return "client read failed"
	}
}

func (c *client) writeFailed(ctx context.Context) string {
	if ctx.Err() != nil {
		return "shutdown"
	}
	return "client write failed"
}
