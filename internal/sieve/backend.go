package sieve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/wire"
	"github.com/usher-mail/usher/internal/xclient"
)

// The backend side of a login: usher acts as a ManageSieve client toward the
// user's backend, from its capability greeting to the answer to
// AUTHENTICATE. The sequence follows Dovecot's own managesieve proxy:
// capabilities, STARTTLS when configured (then the capabilities again),
// XCLIENT when advertised, AUTHENTICATE "PLAIN" with an initial response.

const (
	// backendMaxLine caps one backend line before login; a SIEVE
	// capability line listing many extensions stays far below it.
	backendMaxLine = 64 << 10
	// backendMaxResponse caps one backend response with its literals.
	backendMaxResponse = 256 << 10
	// backendMaxLiterals caps the literals of one backend response.
	backendMaxLiterals = 16
	// maxCapabilities bounds the lines of one capability response.
	maxCapabilities = 256
)

var errBackendProtocol = errors.New("backend protocol error")

var backendLimits = wire.FrameLimits{Literal: backendMaxResponse, Literals: backendMaxLiterals, Total: backendMaxResponse}

// backend is usher's client connection to one backend during login.
type backend struct {
	conn net.Conn
	r    *wire.Reader
	caps map[string]string // upper-cased capability name -> value
}

// response is one backend response: OK, NO or BYE (RFC 5804 section 1.3).
type response struct {
	status string // "OK", "NO" or "BYE"
	code   string // upper-cased response code without its arguments ("TRYLATER/NORETRY"), or ""
	text   string // the human-readable string, or ""
	frame  *wire.Frame
}

// tryLater reports a temporary failure (RFC 5804 section 1.3, TRYLATER, with
// any sub-code).
func (r *response) tryLater() bool {
	return r.code == "TRYLATER" || strings.HasPrefix(r.code, "TRYLATER/")
}

func (b *backend) close() { b.conn.Close() }

// logout ends a connection whose login was refused, politely but without
// waiting for the answer.
func (b *backend) logout() {
	_, _ = b.conn.Write([]byte("LOGOUT\r\n"))
	b.conn.Close()
}

func (b *backend) send(p []byte) error {
	if _, err := b.conn.Write(p); err != nil {
		return fmt.Errorf("write to backend: %w", err)
	}
	return nil
}

// readFrame reads and tokenizes one backend line with its literals.
func (b *backend) readFrame() (*wire.Frame, []arg, error) {
	f, err := b.r.ReadFrame(backendLimits, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("read from backend: %w", err)
	}
	args, err := parseArgs(f)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w: %s", errBackendProtocol, err, truncate(f.Lines[0], 200))
	}
	return f, args, nil
}

// toResponse interprets a tokenized line as OK/NO/BYE; ok is false for
// anything else (a capability line, a SASL challenge).
func toResponse(f *wire.Frame, args []arg) (r *response, ok bool) {
	if len(args) == 0 || args[0].Kind != wire.Atom {
		return nil, false
	}
	st := wire.UpperASCII(args[0].S)
	if st != "OK" && st != "NO" && st != "BYE" {
		return nil, false
	}
	r = &response{status: st, frame: f}
	rest := args[1:]
	if len(rest) > 0 && rest[0].Kind == wire.List {
		if l := rest[0].List; len(l) > 0 && l[0].Kind == wire.Atom {
			r.code = wire.UpperASCII(l[0].S)
		}
		rest = rest[1:]
	}
	if len(rest) > 0 && rest[0].IsString() {
		r.text = rest[0].S
	}
	return r, true
}

// readCapabilities reads a capability response up to its OK (RFC 5804
// section 1.7): lines of one or two strings, name and value.
func (b *backend) readCapabilities() error {
	b.caps = map[string]string{}
	for range maxCapabilities {
		f, args, err := b.readFrame()
		if err != nil {
			return err
		}
		if r, ok := toResponse(f, args); ok {
			if r.status != "OK" {
				return fmt.Errorf("%w: %s instead of capabilities: %.200q", errBackendProtocol, r.status, r.text)
			}
			return nil
		}
		if len(args) == 0 || len(args) > 2 || !args[0].IsString() || (len(args) == 2 && !args[1].IsString()) {
			return fmt.Errorf("%w: invalid capability line %s", errBackendProtocol, truncate(f.Lines[0], 200))
		}
		v := ""
		if len(args) == 2 {
			v = args[1].S
		}
		b.caps[wire.UpperASCII(args[0].S)] = v
	}
	return fmt.Errorf("%w: more than %d capability lines", errBackendProtocol, maxCapabilities)
}

// readResponse reads the answer to a command. A SASL challenge (a string)
// is a protocol error: usher only sends PLAIN with an initial response.
func (b *backend) readResponse() (*response, error) {
	f, args, err := b.readFrame()
	if err != nil {
		return nil, err
	}
	r, ok := toResponse(f, args)
	if !ok {
		return nil, fmt.Errorf("%w: unexpected line %s", errBackendProtocol, truncate(f.Lines[0], 200))
	}
	return r, nil
}

// simple runs a command that must succeed.
func (b *backend) simple(cmd string) error {
	if err := b.send([]byte(cmd + "\r\n")); err != nil {
		return err
	}
	r, err := b.readResponse()
	if err != nil {
		return err
	}
	if r.status != "OK" {
		return fmt.Errorf("%w: %s answered %s: %.200q", errBackendProtocol, strings.Fields(cmd)[0], r.status, r.text)
	}
	return nil
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return strings.ToValidUTF8(string(b), "?")
}

// hasPlain reports whether the backend offers SASL PLAIN.
func (b *backend) hasPlain() bool {
	for _, m := range strings.Fields(b.caps["SASL"]) {
		if wire.UpperASCII(m) == "PLAIN" {
			return true
		}
	}
	return false
}

// backendLogin connects to the lease's backend and replays the login there.
// It returns the backend's final answer (OK or NO); an error means the
// backend could not be used (unreachable, timeout, protocol error, BYE).
func (c *client) backendLogin(ctx context.Context, lease *proxy.Lease, cr *sasl.Credentials) (*backend, *response, error) {
	o := &c.srv.o.Backend
	conn, err := o.DialFor(ctx, lease.Backend, c.sess)
	if err != nil {
		return nil, nil, err
	}
	b := &backend{conn: conn}
	done := false
	defer func() {
		if !done {
			b.close()
		}
	}()
	// One deadline for the whole exchange, from greeting to the answer to
	// AUTHENTICATE; it also covers the writes and the TLS layer.
	if err := conn.SetDeadline(time.Now().Add(o.LoginTimeout)); err != nil {
		return nil, nil, fmt.Errorf("set backend deadline: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(wire.PastDeadline()) })
	defer stop()
	b.r = wire.NewReader(conn, 0, backendMaxLine)

	if err := b.readCapabilities(); err != nil {
		return nil, nil, fmt.Errorf("backend greeting: %w", err)
	}
	if o.TLS == config.TLSStartTLS {
		if err := b.simple("STARTTLS"); err != nil {
			return nil, nil, fmt.Errorf("backend STARTTLS: %w", err)
		}
		// The backend must not have sent anything behind its OK: it would
		// be taken as sent over TLS (CVE-2011-0411 pattern, reversed).
		if b.r.Buffered() > 0 {
			return nil, nil, fmt.Errorf("%w: data after STARTTLS answer", errBackendProtocol)
		}
		tc := o.ClientTLS(conn, lease.Backend)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, nil, fmt.Errorf("backend TLS handshake: %w", err)
		}
		b.conn = tc
		b.r = wire.NewReader(tc, 0, backendMaxLine)
		// RFC 5804 section 2.2: the server re-issues its capabilities
		// after the handshake; those from before TLS are forgotten.
		if err := b.readCapabilities(); err != nil {
			return nil, nil, fmt.Errorf("backend capabilities after STARTTLS: %w", err)
		}
	}
	if !b.hasPlain() {
		// Configuration problem: the backend wants TLS (or trust in
		// usher's address) before plaintext logins, or lacks PLAIN.
		return nil, nil, fmt.Errorf("%w: backend does not offer SASL PLAIN (SASL %.100q)", errBackendProtocol, b.caps["SASL"])
	}
	if _, ok := b.caps["XCLIENT"]; ok {
		// Dovecot's managesieve-login advertises XCLIENT to peers in its
		// login_trusted_networks; it makes the backend log and rate-limit
		// the real client instead of usher.
		if err := b.simple(xclientLine(c.sess)); err != nil {
			return nil, nil, fmt.Errorf("backend XCLIENT: %w", err)
		}
	}
	if err := b.send(authCommand(cr)); err != nil {
		return nil, nil, err
	}
	final, err := b.readResponse()
	if err != nil {
		return nil, nil, fmt.Errorf("backend AUTHENTICATE: %w", err)
	}
	if final.status == "BYE" {
		return nil, nil, fmt.Errorf("%w: AUTHENTICATE answered BYE: %.200q", errBackendProtocol, final.text)
	}
	// The caller splices the connection (OK) or logs out politely (NO).
	done = true
	return b, final, nil
}

// authCommand encodes AUTHENTICATE "PLAIN" with the initial response (RFC
// 5804 section 2.1): a quoted string, or a literal-c2s when the base64 text
// is longer than a quoted string may be.
func authCommand(cr *sasl.Credentials) []byte {
	enc := sasl.EncodeResponse(sasl.EncodePlain(cr.Authzid, cr.Authcid, cr.Password))
	b := appendString([]byte(`AUTHENTICATE "PLAIN" `), enc, true)
	return append(b, "\r\n"...)
}

// xclientLine builds Dovecot's XCLIENT command (managesieve-login
// cmd_xclient: ADDR, PORT, SESSION, TTL; Dovecot 2.3 ignores other keys, but
// usher sends only those), so the backend logs and rate-limits the real
// client and ties its log lines to usher's session ID. managesieve-login
// reads the arguments as atoms, so a session ID must be one.
func xclientLine(sess *proxy.Session) string {
	a := xclient.For(sess.Remote, sess.ID, isAtomChar)
	return xclient.Line([]xclient.Attr{a.Addr, a.Port, a.Session, a.TTL}, nil)
}
