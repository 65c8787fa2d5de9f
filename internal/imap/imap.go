// Package imap is usher's IMAP front end: the pre-authentication state of an
// IMAP server (RFC 9051 / RFC 3501) that learns the user's login name,
// followed by the replay of the login to the user's backend and the splice of
// the two connections.
//
// Invariants:
//   - every client read has a deadline (Options.IdleTimeout), every line is
//     capped by wire.DefaultMaxLine and every literal by Options.MaxLiteral;
//     every backend read falls under the login deadline
//     (BackendOptions.LoginTimeout) and a line cap;
//   - a password is sent only on a secure or trusted connection
//     (Session.PlaintextAllowed), is replayed to exactly one backend per
//     attempt and never reaches a log line; command lines are never logged;
//   - STARTTLS is refused when bytes were pipelined behind it, both from the
//     client and from the backend (CVE-2011-0411 pattern);
//   - a lease from the Director is released exactly once: right after a
//     failed login attempt, or when the spliced session ends;
//   - bad input gets a protocol-correct response; errors are mapped to
//     responses in one place (replyFor).
package imap

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
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
	// maxIDPairs, maxIDKey and maxIDValue are RFC 2971 section 3.3's limits
	// on ID parameters; parameters over them are dropped, not forwarded.
	maxIDPairs = 30
	maxIDKey   = 30
	maxIDValue = 1024
)

// Options configures the IMAP front end.
type Options struct {
	Director proxy.Director
	Backend  proxy.BackendOptions
	// IdleTimeout bounds each client read before login (default 60s).
	IdleTimeout time.Duration
	// MaxLiteral caps one literal before login, in bytes (default 8192).
	MaxLiteral int
}

// Server serves IMAP sessions; it implements proxy.Handler.
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

// Serve runs the pre-login state machine on sess and, after a successful
// login, splices client and backend. It returns the end reason.
func (s *Server) Serve(ctx context.Context, sess *proxy.Session) (reason string) {
	log := sess.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &client{srv: s, sess: sess, raw: sess.Conn, log: log}
	c.r = wire.NewReaderContext(ctx, sess.Conn, s.o.IdleTimeout, wire.DefaultMaxLine)
	// Make a blocked read return when ctx ends; the Reader keeps later
	// deadlines in the past (the lead's server may also close the conn).
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

	bad      int       // BAD responses so far
	failures int       // rejected logins so far
	clientID []idParam // the client's ID parameters (RFC 2971)
}

// idParam is one ID field/value pair; nil marks a NIL value.
type idParam struct {
	key   string
	value *string
}

func (c *client) run(ctx context.Context) string {
	if err := c.writeLine("* OK [CAPABILITY " + c.capabilities() + "] usher ready."); err != nil {
		return replyFor(err).reason
	}
	for {
		var err error
		tag := ""
		if ctx.Err() != nil {
			err = prelogin.ShutdownErr(ctx)
		} else {
			var raw *wire.Frame
			raw, err = readCommand(c.r, c.srv.o.MaxLiteral, c.continueLiteral)
			if raw != nil {
				tag, _, _ = parseTag(raw.Lines[0])
			}
			if err != nil {
				err = c.readErr(ctx, err)
			} else {
				var cmd *command
				cmd, err = parseCommand(raw)
				if err == nil {
					err = c.dispatch(ctx, cmd)
				}
			}
		}
		if err == nil {
			continue
		}
		if reason, stop := c.fail(tag, err); stop {
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

// fail answers err (tag is "" when unknown) and reports whether the session
// ends, with its reason.
func (c *client) fail(tag string, err error) (reason string, stop bool) {
	rp := replyFor(err)
	switch {
	case rp.close && rp.status == "":
		c.log.Debug("session ends", "reason", rp.reason, "err", err)
	case rp.status == "NO":
		c.log.Info("command refused", "err", err)
	default:
		c.log.Info("command rejected", "err", err)
	}
	if rp.status != "" {
		if werr := c.writeLine(rp.format(tag)); werr != nil {
			return replyFor(werr).reason, true
		}
	}
	if rp.close {
		return rp.reason, true
	}
	if rp.status == "BAD" {
		c.bad++
		if c.bad >= maxBadCommands {
			return c.fail("", prelogin.ErrTooManyBad)
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

// continueLiteral sends the continuation request for a synchronizing
// literal (RFC 9051 section 7.5).
func (c *client) continueLiteral() error { return c.writeLine("+ Ready for literal data") }

// capabilities lists what the pre-login state offers (RFC 9051 section
// 7.2.2). Without TLS and trust, LOGINDISABLED replaces AUTH=PLAIN (RFC 9051
// section 6.2.3); STARTTLS is offered only on starttls listeners before TLS.
func (c *client) capabilities() string {
	caps := []string{"IMAP4rev1", "SASL-IR", "LITERAL+", "ID"}
	if c.sess.TLSMode == config.TLSStartTLS && c.sess.TLSConfig != nil && !c.sess.Secure {
		caps = append(caps, "STARTTLS")
	}
	if c.sess.PlaintextAllowed() {
		caps = append(caps, "AUTH=PLAIN")
	} else {
		caps = append(caps, "LOGINDISABLED")
	}
	return strings.Join(caps, " ")
}

// dispatch runs one command; a nil error means the command completed and
// was answered.
func (c *client) dispatch(ctx context.Context, cmd *command) error {
	switch cmd.name {
	case "CAPABILITY":
		if len(cmd.args) != 0 {
			return prelogin.ErrArgs
		}
		return c.ok(cmd.tag, "Capability completed", "* CAPABILITY "+c.capabilities())
	case "NOOP":
		if len(cmd.args) != 0 {
			return prelogin.ErrArgs
		}
		return c.ok(cmd.tag, "NOOP completed")
	case "LOGOUT":
		if len(cmd.args) != 0 {
			return prelogin.ErrArgs
		}
		// RFC 9051 section 6.1.3: BYE, then the tagged OK.
		if err := c.ok(cmd.tag, "Logout completed", "* BYE Logging out"); err != nil {
			return err
		}
		return &prelogin.SessionEnd{Reason: "logout"}
	case "ID":
		return c.cmdID(cmd)
	case "STARTTLS":
		return c.cmdStartTLS(ctx, cmd)
	case "LOGIN":
		return c.cmdLogin(ctx, cmd)
	case "AUTHENTICATE":
		return c.cmdAuthenticate(ctx, cmd)
	}
	if needsAuth(cmd.name) {
		return prelogin.ErrNeedAuth
	}
	return prelogin.ErrUnknownCommand
}

// needsAuth reports whether name is a command of the authenticated or
// selected state (RFC 9051 sections 6.3, 6.4, and common extensions).
func needsAuth(name string) bool {
	switch name {
	case "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
		"LIST", "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "ENABLE", "CHECK",
		"CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID",
		"GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL", "DELETEACL",
		"LISTRIGHTS", "MYRIGHTS", "GETMETADATA", "SETMETADATA", "COMPRESS", "NOTIFY",
		"SORT", "THREAD", "UNAUTHENTICATE":
		return true
	}
	return false
}

// ok sends the untagged lines, then the tagged OK.
func (c *client) ok(tag, text string, untagged ...string) error {
	var b []byte
	for _, u := range untagged {
		b = append(b, u...)
		b = append(b, "\r\n"...)
	}
	b = append(b, tag+" OK "+text+"\r\n"...)
	return c.write(b)
}

// cmdID handles ID (RFC 2971 section 3.1): remember the client's parameters
// to pass them on to the backend, and answer with no information.
func (c *client) cmdID(cmd *command) error {
	if len(cmd.args) != 1 {
		return prelogin.ErrArgs
	}
	a := cmd.args[0]
	var params []idParam
	switch {
	case isNil(a):
	case a.Kind == wire.List:
		if len(a.List)%2 != 0 {
			return prelogin.ErrArgs
		}
		for i := 0; i < len(a.List); i += 2 {
			k, v := a.List[i], a.List[i+1]
			if !isAstring(k) || isNil(k) || !(isAstring(v) || isNil(v)) {
				return prelogin.ErrArgs
			}
			var val *string
			if !isNil(v) {
				val = &v.S
			}
			// Keys starting with "x-" are dropped: usher sets the
			// x-originating-* ones itself, and backends trusting usher
			// would honour client-supplied ones (Dovecot: x-forward-*).
			if len(params) >= maxIDPairs || len(k.S) > maxIDKey || (val != nil && len(*val) > maxIDValue) ||
				strings.HasPrefix(wire.UpperASCII(k.S), "X-") || !quotable(k.S) || (val != nil && !quotable(*val)) {
				continue
			}
			params = append(params, idParam{key: k.S, value: val})
		}
	default:
		return prelogin.ErrArgs
	}
	c.clientID = params
	return c.ok(cmd.tag, "ID completed", "* ID NIL")
}

// cmdStartTLS handles STARTTLS (RFC 9051 section 6.2.1).
func (c *client) cmdStartTLS(ctx context.Context, cmd *command) error {
	if len(cmd.args) != 0 {
		return prelogin.ErrArgs
	}
	if c.sess.Secure {
		return prelogin.ErrTLSActive
	}
	if c.sess.TLSMode != config.TLSStartTLS || c.sess.TLSConfig == nil {
		return prelogin.ErrNoTLS
	}
	if c.r.Buffered() > 0 {
		return prelogin.ErrTLSPipelined
	}
	if err := c.ok(cmd.tag, "Begin TLS negotiation now"); err != nil {
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
	return nil
}

// cmdLogin handles LOGIN (RFC 9051 section 6.2.3).
func (c *client) cmdLogin(ctx context.Context, cmd *command) error {
	if len(cmd.args) != 2 || !isAstring(cmd.args[0]) || !isAstring(cmd.args[1]) {
		return prelogin.ErrArgs
	}
	if !c.sess.PlaintextAllowed() {
		return prelogin.ErrPrivacy
	}
	cr := &sasl.Credentials{Mech: "LOGIN", Authcid: cmd.args[0].S, Password: cmd.args[1].S}
	if !cr.Valid() {
		return prelogin.ErrCredentials
	}
	return c.login(ctx, cmd.tag, cr)
}

// cmdAuthenticate handles AUTHENTICATE PLAIN (RFC 9051 section 6.2.2, RFC
// 4616), with an initial response (RFC 4959) or after a continuation.
func (c *client) cmdAuthenticate(ctx context.Context, cmd *command) error {
	if len(cmd.args) < 1 || len(cmd.args) > 2 || cmd.args[0].Kind != wire.Atom {
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
		ir := cmd.args[1]
		if !isAstring(ir) {
			return prelogin.ErrArgs
		}
		resp = ir.S
		if resp == "=" { // RFC 4959 section 3: an empty initial response
			resp = ""
		}
	} else {
		// RFC 9051 section 6.2.2: an empty challenge, then one line.
		if err := c.writeLine("+ "); err != nil {
			return err
		}
		line, err := c.r.ReadLine()
		if err != nil {
			return c.readErr(ctx, err)
		}
		if string(line) == "*" {
			return prelogin.ErrCanceled
		}
		resp = string(line)
	}
	msg, err := sasl.DecodeResponse(resp)
	if err != nil {
		return fmt.Errorf("%w: %w", prelogin.ErrBase64, err)
	}
	cr, err := sasl.PlainCredentials(msg)
	if err != nil {
		return fmt.Errorf("%w: %w", prelogin.ErrCredentials, err)
	}
	return c.login(ctx, cmd.tag, cr)
}

// login runs one login attempt: acquire the user's backend, replay the login
// there and relay the answer. On success it splices the connections and
// returns the prelogin.SessionEnd; on a rejected login it returns nil (the client may
// retry); an unusable backend yields prelogin.ErrUnavailable.
func (c *client) login(ctx context.Context, tag string, cr *sasl.Credentials) error {
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

	b, final, err := c.backendLogin(ctx, tag, lease, cr)
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
	// The backend's tagged answer goes to the client under the client's tag.
	answer := append(append([]byte(tag), final.rest...), "\r\n"...)
	if final.status != "OK" {
		// Back to the pre-login state: the client may try again.
		b.logout()
		release()
		c.sess.Backend = ""
		c.failures++
		log.Info("login", "result", "failed", "status", final.status, "elapsed", time.Since(start))
		c.sess.LoginDone(proxy.LoginFailed, lease.Backend, time.Since(start))
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
