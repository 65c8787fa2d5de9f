package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/wire"
)

// The probes: usher as a minimal IMAP or POP3 client. Every failure is an
// error whose text is safe to log (server text is quoted and truncated, the
// password never appears in it).

const (
	// probeMaxLine caps one line from a backend; greetings and CAPABILITY
	// responses stay far below it.
	probeMaxLine = 16 << 10
	// probeMaxLiteral caps one literal in an untagged IMAP response.
	probeMaxLiteral = 64 << 10
	// probeMaxResponses caps the untagged responses before a tagged one.
	probeMaxResponses = 256
)

var (
	errProbe   = errors.New("unexpected answer")
	errTimeout = errors.New("timeout")
)

// short makes network errors readable in a cause: a timeout is "timeout",
// a failed socket operation its system error ("connection refused").
func short(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return errTimeout
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		err = op.Err
	}
	var sc *os.SyscallError
	if errors.As(err, &sc) && sc.Err != nil {
		err = sc.Err
	}
	return err
}

// probe runs one probe of service s on the backend at addr, within Timeout.
func (c *Checker) probe(ctx context.Context, s *Service, addr netip.Addr) error {
	ctx, cancel := context.WithTimeout(ctx, c.o.Timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	conn, err := s.Backend.Dial(ctx, addr)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("connect %s: %w", s.Backend.Addr(addr), short(op))
		}
		return fmt.Errorf("connect: %w", short(err))
	}
	defer conn.Close()
	// Stopping (ctx ends) interrupts any read or write at once.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(wire.PastDeadline()) })
	defer stop()
	if err := conn.SetDeadline(deadline); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	p := &prober{
		ctx:   ctx,
		c:     c,
		s:     s,
		addr:  addr,
		limit: deadline,
	}
	p.setConn(conn)
	switch s.Proto {
	case ProtoIMAP:
		return p.imap()
	case ProtoPOP3:
		return p.pop3()
	}
	return fmt.Errorf("unknown protocol %q", s.Proto)
}

// prober is one probe connection.
type prober struct {
	ctx   context.Context
	c     *Checker
	s     *Service
	addr  netip.Addr
	limit time.Time // the probe's deadline
	conn  net.Conn
	r     *wire.Reader
	tags  int // IMAP tags used: a, b, c, ...
}

func (p *prober) nextTag() string {
	p.tags++
	return string(rune('a' + p.tags - 1))
}

func (p *prober) setConn(conn net.Conn) {
	p.conn = conn
	p.r = wire.NewReader(clampConn{conn, p.ctx, p.limit}, p.c.o.Timeout, probeMaxLine)
}

// clampConn keeps the wire.Reader's per-read deadlines within the probe's
// deadline, and in the past once the probe's context ended.
type clampConn struct {
	net.Conn
	ctx   context.Context
	limit time.Time
}

func (c clampConn) SetReadDeadline(t time.Time) error {
	switch {
	case c.ctx.Err() != nil:
		t = wire.PastDeadline()
	case t.IsZero() || t.After(c.limit):
		t = c.limit
	}
	return c.Conn.SetReadDeadline(t)
}

func (p *prober) send(what, line string) error {
	if _, err := p.conn.Write([]byte(line + "\r\n")); err != nil {
		return fmt.Errorf("send %s: %w", what, short(err))
	}
	return nil
}

func (p *prober) readLine(what string) (string, error) {
	line, err := p.r.ReadLine()
	if err != nil {
		return "", fmt.Errorf("read %s: %w", what, short(err))
	}
	return string(line), nil
}

// startTLS upgrades the connection after the server agreed to STARTTLS or
// STLS. Bytes already buffered would be taken as sent over TLS: RFC 3207
// section 4.2 / RFC 2595 section 3.1 (the CVE-2011-0411 pattern), so they
// fail the probe.
func (p *prober) startTLS() error {
	if n := p.r.Buffered(); n > 0 {
		return fmt.Errorf("%w: %d bytes of plaintext after the TLS go-ahead", errProbe, n)
	}
	tc := p.s.Backend.ClientTLS(p.conn, p.addr)
	if err := tc.HandshakeContext(p.ctx); err != nil {
		return fmt.Errorf("tls handshake: %w", short(err))
	}
	p.setConn(tc)
	return nil
}

// quote renders server text for an error: the probe password hidden (a
// server may echo the command), quoted, control characters escaped,
// truncated.
func (p *prober) quote(s string) string {
	const max = 120
	if pass := p.c.o.LoginPassword; pass != "" {
		s = strings.ReplaceAll(s, pass, "<password hidden>")
		s = strings.ReplaceAll(s, quoteIMAP(pass), "<password hidden>")
	}
	if len(s) > max {
		return strconv.Quote(s[:max]) + "..."
	}
	return strconv.Quote(s)
}

// --- IMAP (RFC 9051) ---

func (p *prober) imap() error {
	// RFC 9051 section 7.1: the greeting is OK, PREAUTH or BYE; only OK
	// means the server is ready to authenticate users.
	g, err := p.readLine("greeting")
	if err != nil {
		return err
	}
	if !imapStatus(g, "*", "OK") {
		return fmt.Errorf("%w: greeting %s", errProbe, p.quote(g))
	}
	if p.s.Backend.TLS == config.TLSStartTLS {
		// RFC 9051 section 6.2.1: after the tagged OK the TLS negotiation
		// begins at once.
		if err := p.imapCommand(p.nextTag(), []string{"STARTTLS"}, nil); err != nil {
			return err
		}
		if err := p.startTLS(); err != nil {
			return err
		}
	}
	if u := p.c.o.LoginUser; u != "" {
		if err := p.imapLogin(p.nextTag(), u, p.c.o.LoginPassword); err != nil {
			return err
		}
	}
	// RFC 9051 section 6.1.3: LOGOUT gets an untagged BYE, then tagged OK.
	return p.imapCommand(p.nextTag(), []string{"LOGOUT"}, nil)
}

// imapStatus reports whether line is "<tag> <status>[ ...]" (status
// compared case-insensitively).
func imapStatus(line, tag, status string) bool {
	t, rest, ok := strings.Cut(line, " ")
	if !ok || t != tag {
		return false
	}
	word, _, _ := strings.Cut(rest, " ")
	return strings.EqualFold(word, status)
}

// imapCommand sends a command and requires a tagged OK. segs are the
// command's text around its synchronizing literals lits (len(segs) ==
// len(lits)+1): segs[0] goes after the tag, each literal after the server's
// continuation request (RFC 9051 section 4.3) followed by the next segment.
func (p *prober) imapCommand(tag string, segs, lits []string) error {
	name, _, _ := strings.Cut(segs[0], " ")
	if err := p.send(name, tag+" "+segs[0]); err != nil {
		return err
	}
	for i, lit := range lits {
		line, err := p.imapAwait(tag, name, true)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(line, "+") {
			return p.imapRefused(name, line)
		}
		if err := p.send(name, lit+segs[i+1]); err != nil {
			return err
		}
	}
	line, err := p.imapAwait(tag, name, false)
	if err != nil {
		return err
	}
	if !imapStatus(line, tag, "OK") {
		return p.imapRefused(name, line)
	}
	return nil
}

func (p *prober) imapRefused(name, line string) error {
	if name == "LOGIN" {
		// The answer to LOGIN is shown, never the command.
		return fmt.Errorf("%w: login refused: %s", errProbe, p.quote(line))
	}
	return fmt.Errorf("%w: %s answered %s", errProbe, name, p.quote(line))
}

// imapAwait reads responses up to the one tagged tag (or, with cont, a
// continuation request) and returns its first line. Untagged responses are
// skipped, their literals read within probeMaxLiteral; an untagged BYE fails
// the probe except in answer to LOGOUT.
func (p *prober) imapAwait(tag, name string, cont bool) (string, error) {
	what := "answer to " + name
	for i := 0; i < probeMaxResponses; i++ {
		line, err := p.readLine(what)
		if err != nil {
			return "", err
		}
		switch {
		case cont && strings.HasPrefix(line, "+"):
			return line, nil
		case strings.HasPrefix(line, tag+" "):
			return line, nil
		case strings.HasPrefix(line, "* "):
			if imapStatus(line, "*", "BYE") && name != "LOGOUT" {
				return "", fmt.Errorf("%w: %s answered %s", errProbe, name, p.quote(line))
			}
			if err := p.skipLiterals(line, what); err != nil {
				return "", err
			}
		default:
			return "", fmt.Errorf("%w: %s answered %s", errProbe, name, p.quote(line))
		}
	}
	return "", fmt.Errorf("%w: more than %d responses to %s", errProbe, probeMaxResponses, name)
}

// skipLiterals reads the literals of an untagged response whose first line
// is line (RFC 9051 section 4.3: a line ending in {n} or {n+} is followed
// by n bytes and the rest of the response).
func (p *prober) skipLiterals(line, what string) error {
	for {
		n, ok := literalSize(line)
		if !ok {
			return nil
		}
		if n > probeMaxLiteral {
			return fmt.Errorf("%w: literal of %d bytes in %s", errProbe, n, what)
		}
		if _, err := p.r.ReadLiteral(n); err != nil {
			return fmt.Errorf("read %s: %w", what, short(err))
		}
		var err error
		if line, err = p.readLine(what); err != nil {
			return err
		}
	}
}

// literalSize parses a literal marker at the end of line.
func literalSize(line string) (int, bool) {
	if !strings.HasSuffix(line, "}") {
		return 0, false
	}
	open := strings.LastIndexByte(line, '{')
	if open < 0 {
		return 0, false
	}
	digits := strings.TrimSuffix(line[open+1:len(line)-1], "+")
	if digits == "" || len(digits) > 10 {
		return 0, false
	}
	n, err := strconv.Atoi(digits)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// imapLogin sends LOGIN with user and password as quoted strings, or as
// literals when they hold characters a quoted string cannot carry (RFC 9051
// section 4.3, 9: quoted = DQUOTE *QUOTED-CHAR DQUOTE).
func (p *prober) imapLogin(tag, user, pass string) error {
	if strings.IndexByte(user, 0) >= 0 || strings.IndexByte(pass, 0) >= 0 {
		return errors.New("login: user or password contains NUL")
	}
	segs := []string{"LOGIN"}
	var lits []string
	for _, s := range []string{user, pass} {
		if quotable(s) {
			segs[len(segs)-1] += " " + quoteIMAP(s)
			continue
		}
		segs[len(segs)-1] += " {" + strconv.Itoa(len(s)) + "}"
		lits = append(lits, s)
		segs = append(segs, "")
	}
	return p.imapCommand(tag, segs, lits)
}

// quotable reports whether s can be an IMAP quoted string: 7-bit, no CR,
// LF or NUL.
func quotable(s string) bool {
	for i := 0; i < len(s); i++ {
		if b := s[i]; b == 0 || b == '\r' || b == '\n' || b >= 0x80 {
			return false
		}
	}
	return true
}

// quoteIMAP renders s as a quoted string, escaping DQUOTE and backslash.
func quoteIMAP(s string) string { return string(wire.AppendQuoted(nil, s)) }

// --- POP3 (RFC 1939, STLS from RFC 2595) ---

func (p *prober) pop3() error {
	// RFC 1939 section 4: the greeting is a positive response.
	g, err := p.readLine("greeting")
	if err != nil {
		return err
	}
	if !pop3OK(g) {
		return fmt.Errorf("%w: greeting %s", errProbe, p.quote(g))
	}
	if p.s.Backend.TLS == config.TLSStartTLS {
		// RFC 2595 section 4: after +OK to STLS, TLS negotiation begins.
		if err := p.pop3Command("STLS", "STLS"); err != nil {
			return err
		}
		if err := p.startTLS(); err != nil {
			return err
		}
	}
	if u := p.c.o.LoginUser; u != "" {
		// RFC 1939 section 7: USER and PASS; a line cannot carry CR or LF.
		pass := p.c.o.LoginPassword
		if strings.ContainsAny(u, "\r\n\x00") || strings.ContainsAny(pass, "\r\n\x00") {
			return errors.New("login: user or password contains CR, LF or NUL")
		}
		if err := p.pop3Command("USER", "USER "+u); err != nil {
			return err
		}
		if err := p.pop3Command("PASS", "PASS "+pass); err != nil {
			return err
		}
	}
	return p.pop3Command("QUIT", "QUIT")
}

func pop3OK(line string) bool { return line == "+OK" || strings.HasPrefix(line, "+OK ") }

// pop3Command sends line and requires +OK; errors name only the command.
func (p *prober) pop3Command(name, line string) error {
	if err := p.send(name, line); err != nil {
		return err
	}
	answer, err := p.readLine("answer to " + name)
	if err != nil {
		return err
	}
	if !pop3OK(answer) {
		if name == "USER" || name == "PASS" {
			return fmt.Errorf("%w: login refused: %s answered %s", errProbe, name, p.quote(answer))
		}
		return fmt.Errorf("%w: %s answered %s", errProbe, name, p.quote(answer))
	}
	return nil
}
