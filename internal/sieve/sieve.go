// Package sieve is usher's ManageSieve front end (RFC 5804): the
// unauthenticated state of a ManageSieve server that learns the user's login
// name from AUTHENTICATE PLAIN, followed by the replay of the login to the
// user's backend and the splice of the two connections.
//
// Invariants:
//   - every client read has a deadline (Options.IdleTimeout), every line is
//     capped by wire.DefaultMaxLine and every literal by Options.MaxLiteral;
//     every backend read falls under the login deadline
//     (BackendOptions.LoginTimeout) and line and response caps;
//   - a password is sent only on a secure or trusted connection
//     (Session.PlaintextAllowed), is replayed to exactly one backend per
//     attempt and never reaches a log line; command lines are never logged;
//   - STARTTLS is refused when bytes were pipelined behind it, both from the
//     client and from the backend (CVE-2011-0411 pattern);
//   - a lease from the Director is released exactly once: right after a
//     failed login attempt, or when the spliced session ends;
//   - bad input gets a protocol-correct response; errors are mapped to
//     responses in one place (replyFor).
//
// Capabilities before login: usher cannot know the Sieve extensions of the
// user's backend before it knows the user, yet RFC 5804 section 1.7 says the
// SIEVE capability "MUST always be returned" and clients such as
// sieve-connect give up without it. usher therefore advertises an empty
// list, `"SIEVE" ""`, which sieve-connect explicitly accepts. After login,
// every command, CAPABILITY included, reaches the backend through the splice,
// so a client asking again gets the backend's real list (Net_Sieve, used by
// Roundcube, and Horde ask right after AUTHENTICATE). usher never adds
// capabilities after AUTHENTICATE itself: RFC 5804 section 4
// (response-authenticate) says they MUST be omitted unless a SASL security
// layer was negotiated, which PLAIN never does, and the Thunderbird Sieve
// add-on gives up when they come.
package sieve

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/prelogin"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/wire"
)

// Defaults for zero Options fields.
const (
	DefaultIdleTimeout  = 60 * time.Second
	DefaultMaxLiteral   = 8192
	DefaultLoginTimeout = 30 * time.Second
)

const (
	// maxBadCommands ends a session that keeps sending invalid commands.
	maxBadCommands = 10
	// maxLoginFailures ends a session after that many rejected logins; each
	// attempt costs a backend connection, so a client must not loop forever.
	maxLoginFailures = 5
	// maxLiterals bounds the literals of one client command before login;
	// AUTHENTICATE needs two at most.
	maxLiterals = 8
	// implementation is the IMPLEMENTATION capability (RFC 5804 section 1.7).
	implementation = "usher"
)

// Options configures the ManageSieve front end.
type Options struct {
	Director proxy.Director
	Backend  proxy.BackendOptions // Port is usually 4190
	// IdleTimeout bounds each client read before login (default 60s).
	IdleTimeout time.Duration
	// MaxLiteral caps one literal before login, in bytes (default 8192).
	MaxLiteral int
}

// Server serves ManageSieve sessions; it implements proxy.Handler.
type Server struct {
	o Options
}

// New returns a Server; zero Options fields get their defaults.
func New(o Options) *Server {
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = DefaultIdleTimeout
	}
	if o.MaxLiteral <= 0 {
		o.MaxLiteral = DefaultMaxLiteral
	}
	if o.Backend.LoginTimeout <= 0 {
		o.Backend.LoginTimeout = DefaultLoginTimeout
	}
	return &Server{o: o}
}

var _ proxy.Handler = (*Server)(nil)

// Serve runs the unauthenticated state on sess and, after a successful
// login, splices client and backend. It returns the end reason.
func (s *Server) Serve(ctx context.Context, sess *proxy.Session) (reason string) {
	log := sess.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &client{srv: s, sess: sess, raw: sess.Conn, log: log}
	c.r = wire.NewReaderContext(ctx, sess.Conn, s.o.IdleTimeout, wire.DefaultMaxLine)
	// Make a blocked read return when ctx ends; the Reader keeps later
	// deadlines in the past.
	stop := wire.WatchContext(ctx, c.raw)
	c.stopWatch = stop
	defer stop()
	return c.run(ctx)
}

// client is the state of one session before login.
type client struct {
	srv       *Server
	sess      *proxy.Session
	raw       net.Conn // the accepted connection, under any TLS layer
	r         *wire.Reader
	log       *slog.Logger
	stopWatch func() bool

	bad      int // invalid commands so far
	failures int // rejected logins so far
}

// limits bound one client command before login.
func (c *client) limits() wire.FrameLimits {
	return wire.FrameLimits{
		Literal:  c.srv.o.MaxLiteral,
		Literals: maxLiterals,
		Total:    maxLiterals*c.srv.o.MaxLiteral + (maxLiterals+1)*wire.DefaultMaxLine,
	}
}

func (c *client) run(ctx context.Context) string {
	if err := c.write(c.capabilities("usher ManageSieve ready.")); err != nil {
		return replyFor(err).reason
	}
	for {
		var err error
		if ctx.Err() != nil {
			err = prelogin.ShutdownErr(ctx)
		} else {
			var f *wire.Frame
			f, err = c.r.ReadFrame(c.limits(), nil)
			if err != nil {
				err = c.readErr(ctx, err)
			} else {
				var cmd *command
				cmd, err = parseCommand(f)
				if err == nil {
					err = c.dispatch(ctx, cmd)
				}
			}
		}
		if err == nil {
			continue
		}
		if reason, stop := c.fail(err); stop {
			return reason
		}
	}
}

// readErr classifies a client read error.
func (c *client) readErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return prelogin.ShutdownErr(ctx)
	}
	return err
}

// fail answers err and reports whether the session ends, with its reason.
func (c *client) fail(err error) (reason string, stop bool) {
	rp := replyFor(err)
	switch {
	case rp.close && rp.status == "":
		c.log.Debug("session ends", "reason", rp.reason, "err", err)
	case rp.bad || rp.close:
		c.log.Info("command rejected", "err", err)
	default:
		c.log.Info("command refused", "err", err)
	}
	if rp.status != "" {
		if werr := c.writeLine(rp.format()); werr != nil {
			return replyFor(werr).reason, true
		}
	}
	if rp.close {
		return rp.reason, true
	}
	if rp.bad {
		c.bad++
		if c.bad >= maxBadCommands {
			return c.fail(prelogin.ErrTooManyBad)
		}
	}
	return "", false
}

// writeLine sends one line and its CRLF to the client, with a deadline.
func (c *client) writeLine(s string) error {
	return c.write([]byte(s + "\r\n"))
}

func (c *client) write(b []byte) error {
	conn := c.sess.Conn
	if err := conn.SetWriteDeadline(time.Now().Add(c.srv.o.IdleTimeout)); err != nil {
		return fmt.Errorf("%w: set write deadline: %w", prelogin.ErrClientWrite, err)
	}
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("%w: %w", prelogin.ErrClientWrite, err)
	}
	return nil
}

// ok renders an OK response with an optional response code.
func ok(code, text string) []byte {
	b := []byte("OK")
	if code != "" {
		b = append(b, " ("...)
		b = append(b, code...)
		b = append(b, ')')
	}
	b = append(b, ' ')
	b = wire.AppendQuoted(b, text)
	return append(b, "\r\n"...)
}

// capabilities renders the capability response followed by OK text (RFC
// 5804 section 1.7): sent as the greeting, after STARTTLS and for
// CAPABILITY. PLAIN is listed only where a password may be sent; the list
// is empty otherwise, which RFC 5804 allows when STARTTLS is offered.
// STARTTLS is offered only on starttls listeners before TLS. SIEVE is empty:
// see the package documentation.
func (c *client) capabilities(text string) []byte {
	b := []byte(`"IMPLEMENTATION" "` + implementation + "\"\r\n")
	b = append(b, `"SIEVE" ""`+"\r\n"...)
	if c.sess.PlaintextAllowed() {
		b = append(b, `"SASL" "PLAIN"`+"\r\n"...)
	} else {
		b = append(b, `"SASL" ""`+"\r\n"...)
	}
	if c.startTLSOffered() {
		b = append(b, `"STARTTLS"`+"\r\n"...)
	}
	b = append(b, `"VERSION" "1.0"`+"\r\n"...)
	return append(b, ok("", text)...)
}

func (c *client) startTLSOffered() bool {
	return c.sess.TLSMode == config.TLSStartTLS && c.sess.TLSConfig != nil && !c.sess.Secure
}

// dispatch runs one command; a nil error means the command completed and
// was answered.
func (c *client) dispatch(ctx context.Context, cmd *command) error {
	switch cmd.name {
	case "CAPABILITY":
		if len(cmd.args) != 0 {
			return prelogin.ErrArgs
		}
		return c.write(c.capabilities("Capability completed."))
	case "NOOP":
		return c.cmdNoop(cmd)
	case "LOGOUT":
		if len(cmd.args) != 0 {
			return prelogin.ErrArgs
		}
		// RFC 5804 section 2.3: OK, then the server closes.
		if err := c.write(ok("", "Logout completed.")); err != nil {
			return err
		}
		return &prelogin.SessionEnd{Reason: "logout"}
	case "STARTTLS":
		return c.cmdStartTLS(ctx, cmd)
	case "AUTHENTICATE":
		return c.cmdAuthenticate(ctx, cmd)
	}
	if needsAuth(cmd.name) {
		return prelogin.ErrNeedAuth
	}
	return prelogin.ErrUnknownCommand
}

// needsAuth reports whether name is a command of the authenticated state
// (RFC 5804 sections 2.5 to 2.12, and UNAUTHENTICATE of section 2.14.1).
func needsAuth(name string) bool {
	switch name {
	case "HAVESPACE", "PUTSCRIPT", "LISTSCRIPTS", "SETACTIVE", "GETSCRIPT", "DELETESCRIPT",
		"RENAMESCRIPT", "CHECKSCRIPT", "UNAUTHENTICATE":
		return true
	}
	return false
}

// cmdNoop handles NOOP (RFC 5804 section 2.13): with a string argument, the
// OK carries it back in a TAG response code.
func (c *client) cmdNoop(cmd *command) error {
	switch {
	case len(cmd.args) == 0:
		return c.write(ok("", "NOOP completed."))
	case len(cmd.args) == 1 && cmd.args[0].IsString():
		code := appendString([]byte("TAG "), cmd.args[0].S, false)
		return c.write(ok(string(code), "Done"))
	}
	return prelogin.ErrArgs
}

// cmdStartTLS handles STARTTLS (RFC 5804 section 2.2).
func (c *client) cmdStartTLS(ctx context.Context, cmd *command) error {
	if len(cmd.args) != 0 {
		return prelogin.ErrArgs
	}
	if c.sess.Secure {
		return prelogin.ErrTLSActive
	}
	if !c.startTLSOffered() {
		return prelogin.ErrNoTLS
	}
	if c.r.Buffered() > 0 {
		return prelogin.ErrTLSPipelined
	}
	if err := c.write(ok("", "Begin TLS negotiation now.")); err != nil {
		return err
	}
	tc := tls.Server(c.raw, c.sess.TLSConfig)
	_ = c.raw.SetDeadline(time.Now().Add(c.srv.o.IdleTimeout))
	if err := tc.HandshakeContext(ctx); err != nil {
		c.log.Info("tls handshake failed", "err", err)
		return fmt.Errorf("%w: %w", prelogin.ErrTLSHandshake, err)
	}
	c.sess.Conn, c.sess.Secure = tc, true
	c.r = wire.NewReaderContext(ctx, tc, c.srv.o.IdleTimeout, wire.DefaultMaxLine)
	c.log.Debug("starttls done", "tls_version", tls.VersionName(tc.ConnectionState().Version))
	// RFC 5804 section 2.2: after the handshake the server re-issues the
	// capabilities, followed by OK, without being asked.
	return c.write(c.capabilities("TLS negotiation successful."))
}

// cmdAuthenticate handles AUTHENTICATE "PLAIN" (RFC 5804 section 2.1, RFC
// 4616), with an initial response or after an empty challenge.
func (c *client) cmdAuthenticate(ctx context.Context, cmd *command) error {
	// auth-type is a string (RFC 5804 section 4); Dovecot refuses an atom.
	if len(cmd.args) < 1 || len(cmd.args) > 2 || !cmd.args[0].IsString() {
		return prelogin.ErrArgs
	}
	if wire.UpperASCII(cmd.args[0].S) != "PLAIN" {
		return prelogin.ErrMechanism
	}
	if !c.sess.PlaintextAllowed() {
		return prelogin.ErrPrivacy
	}
	var resp string
	if len(cmd.args) == 2 {
		if !cmd.args[1].IsString() {
			return prelogin.ErrArgs
		}
		resp = cmd.args[1].S
	} else {
		// RFC 5804 section 2.1: the server challenge is a string (empty for
		// PLAIN); the client answers with a string on a line of its own.
		if err := c.writeLine(`""`); err != nil {
			return err
		}
		f, err := c.r.ReadFrame(c.limits(), nil)
		if err != nil {
			return c.readErr(ctx, err)
		}
		args, err := parseArgs(f)
		if err != nil {
			return err
		}
		if len(args) != 1 || !(args[0].IsString() || args[0].S == "*") {
			return prelogin.ErrArgs
		}
		resp = args[0].S
	}
	// RFC 5804 section 2.1: "*" cancels the exchange. A bare * is taken
	// too, as IMAP clients send it.
	if resp == "*" {
		return prelogin.ErrCanceled
	}
	msg, err := sasl.DecodeResponse(resp)
	if err != nil {
		return fmt.Errorf("%w: %w", prelogin.ErrBase64, err)
	}
	cr, err := sasl.PlainCredentials(msg)
	if err != nil {
		return fmt.Errorf("%w: %w", prelogin.ErrCredentials, err)
	}
	return c.login(ctx, cr)
}

// login runs one login attempt: acquire the user's backend, replay the login
// there and relay the answer. On success it splices the connections and
// returns the prelogin.SessionEnd; on a rejected login it returns nil (the client may
// retry); an unusable backend yields prelogin.ErrUnavailable.
func (c *client) login(ctx context.Context, cr *sasl.Credentials) error {
	start := time.Now()
	user := cr.User()
	c.sess.User = user
	log := c.log.With("user", user)
	lease, err := c.srv.o.Director.Acquire(ctx, user)
	if err != nil {
		log.Warn("login", "result", "unavailable", "err", err, "elapsed", time.Since(start))
		c.sess.LoginDone(proxy.LoginUnavailable, netip.Addr{}, time.Since(start))
		return fmt.Errorf("%w: acquire: %w", prelogin.ErrUnavailable, err)
	}
	released := false
	release := func() {
		if !released {
			released = true
			lease.Release()
		}
	}
	defer release()
	addr := c.srv.o.Backend.Addr(lease.Backend)
	c.sess.Backend = addr
	log = log.With("backend", addr)

	b, final, err := c.backendLogin(ctx, lease, cr)
	if err != nil {
		c.sess.Backend = ""
		if ctx.Err() != nil {
			return prelogin.ShutdownErr(ctx)
		}
		if errors.Is(err, prelogin.ErrClientWrite) {
			return err
		}
		log.Warn("login", "result", "unavailable", "err", err, "elapsed", time.Since(start))
		c.sess.LoginDone(proxy.LoginUnavailable, lease.Backend, time.Since(start))
		return fmt.Errorf("%w: %w", prelogin.ErrUnavailable, err)
	}
	// The backend's answer goes to the client as it is, literals included.
	answer := final.frame.Bytes()
	if final.status != "OK" {
		// Back to the unauthenticated state: the client may try again.
		b.logout()
		release()
		c.sess.Backend = ""
		result := proxy.LoginFailed
		if final.tryLater() {
			// A temporary failure of the backend is not the client's.
			result = proxy.LoginUnavailable
		} else {
			c.failures++
		}
		log.Info("login", "result", result, "status", final.status, "code", final.code, "elapsed", time.Since(start))
		c.sess.LoginDone(result, lease.Backend, time.Since(start))
		if err := c.write(answer); err != nil {
			return err
		}
		if c.failures >= maxLoginFailures {
			return prelogin.ErrTooManyFails
		}
		return nil
	}
	if err := c.write(answer); err != nil {
		b.close()
		return err
	}
	log.Info("login", "result", "ok", "elapsed", time.Since(start))
	c.sess.LoginDone(proxy.LoginOK, lease.Backend, time.Since(start))
	c.stopWatch()
	reason := proxy.Splice(ctx, c.sess, c.sess.Conn, c.r.Pending(), b.conn, b.r.Pending(), lease)
	return &prelogin.SessionEnd{Reason: reason}
}
