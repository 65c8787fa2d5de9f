package lmtp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
	"github.com/usher-mail/usher/internal/xclient"
)

// Backend-side bounds.
const (
	// maxReplyLines bounds one backend reply (an LHLO answer lists a
	// dozen extensions).
	maxReplyLines = 100
	// maxReplyLine caps one backend reply line; RFC 5321 section 4.5.3.1.5
	// says 512 octets, Dovecot allows 4 KiB for a whole reply.
	maxReplyLine = 4096
	// maxCommandLine is RFC 5321 section 4.5.3.1.4's limit on a command
	// line including CRLF; XCLIENT must fit (Postfix XCLIENT_README).
	maxCommandLine = 512
	// quitWait bounds the wait for the backend's answer to QUIT.
	quitWait = 2 * time.Second
	// copyBuffer is the write buffer towards a backend.
	copyBuffer = 32 << 10
)

// smtpReply is one reply read from a backend: its code and the text of each
// line (after "NNN-" or "NNN ").
type smtpReply struct {
	code  int
	lines []string
}

func (r smtpReply) String() string {
	return strconv.Itoa(r.code) + " " + sanitize(strings.Join(r.lines, " / "), maxRelayText)
}

// stageError is a backend failure at one step of the delivery: the
// recipients get a temporary failure naming the step.
type stageError struct {
	stage string
	err   error
}

func (e *stageError) Error() string { return "backend " + e.stage + ": " + e.err.Error() }
func (e *stageError) Unwrap() error { return e.err }

var errUnexpected = errors.New("unexpected reply")

// unexpected wraps a backend reply that does not fit the protocol.
func unexpected(r smtpReply) error {
	return fmt.Errorf("%w %s", errUnexpected, r)
}

// detail names the kind of failure for the client's reply text.
func detail(stage string, err error) string {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return stage + ": timed out"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return stage + ": connection lost"
	}
	return stage
}

// deadlineWriter sets a write deadline before every write, so a backend
// that stops reading cannot block usher for longer than timeout per write.
type deadlineWriter struct {
	c       net.Conn
	timeout *time.Duration
}

func (w deadlineWriter) Write(p []byte) (int, error) {
	if err := w.c.SetWriteDeadline(time.Now().Add(*w.timeout)); err != nil {
		return 0, err
	}
	return w.c.Write(p)
}

// backendConn is one LMTP connection to a backend.
type backendConn struct {
	conn    net.Conn
	r       *wire.Reader
	w       *bufio.Writer
	timeout time.Duration     // per read and write; changed between phases
	caps    map[string]string // LHLO extensions: keyword -> parameters
}

func newBackendConn(c net.Conn, timeout time.Duration) *backendConn {
	b := &backendConn{conn: c, timeout: timeout}
	b.attach(c)
	return b
}

// attach puts reader and writer on c (again after STARTTLS).
func (b *backendConn) attach(c net.Conn) {
	b.conn = c
	b.r = wire.NewReader(c, b.timeout, maxReplyLine)
	b.w = bufio.NewWriterSize(deadlineWriter{c: c, timeout: &b.timeout}, copyBuffer)
}

// setTimeout changes the per-read and per-write deadline.
func (b *backendConn) setTimeout(d time.Duration) {
	b.timeout = d
	b.r.Timeout = d
}

// readReply reads one possibly multi-line reply (RFC 5321 section 4.2.1:
// "NNN-text" lines, then "NNN text").
func (b *backendConn) readReply() (smtpReply, error) {
	var r smtpReply
	for n := 0; ; n++ {
		if n == maxReplyLines {
			return smtpReply{}, fmt.Errorf("reply longer than %d lines", maxReplyLines)
		}
		line, err := b.r.ReadLine()
		if err != nil {
			return smtpReply{}, err
		}
		if len(line) < 3 || (len(line) > 3 && line[3] != ' ' && line[3] != '-') {
			return smtpReply{}, fmt.Errorf("%w %q", errUnexpected, sanitize(string(line), 80))
		}
		code := 0
		for _, c := range line[:3] {
			if c < '0' || c > '9' {
				return smtpReply{}, fmt.Errorf("%w %q", errUnexpected, sanitize(string(line), 80))
			}
			code = code*10 + int(c-'0')
		}
		if n > 0 && code != r.code {
			return smtpReply{}, fmt.Errorf("%w: code changed within a reply", errUnexpected)
		}
		r.code = code
		text := ""
		if len(line) > 4 {
			text = string(line[4:])
		}
		r.lines = append(r.lines, text)
		if len(line) == 3 || line[3] == ' ' {
			return r, nil
		}
	}
}

// send queues one command line; flush sends what is queued.
func (b *backendConn) send(line string) error {
	_, err := b.w.WriteString(line + "\r\n")
	return err
}

func (b *backendConn) flush() error { return b.w.Flush() }

// cmd sends one command and reads its reply.
func (b *backendConn) cmd(line string) (smtpReply, error) {
	if err := b.send(line); err != nil {
		return smtpReply{}, err
	}
	if err := b.flush(); err != nil {
		return smtpReply{}, err
	}
	return b.readReply()
}

// lhlo sends LHLO and records the extensions (RFC 2033 section 4.1, RFC 5321
// section 4.1.1.1: the first line is the greeting, each further line one
// keyword and its parameters).
func (b *backendConn) lhlo(host string) error {
	r, err := b.cmd("LHLO " + host)
	if err != nil {
		return err
	}
	if r.code != 250 {
		return unexpected(r)
	}
	b.caps = make(map[string]string, len(r.lines))
	for _, l := range r.lines[1:] {
		k, v, _ := strings.Cut(l, " ")
		b.caps[strings.ToUpper(k)] = v
	}
	return nil
}

func (b *backendConn) has(ext string) bool {
	_, ok := b.caps[ext]
	return ok
}

// quit ends the session politely: QUIT and a short wait for its 221.
func (b *backendConn) quit() {
	b.setTimeout(quitWait)
	if b.send("QUIT") == nil && b.flush() == nil {
		_, _ = b.readReply()
	}
	b.conn.Close()
}

// backendOutcome is what one backend did with one recipient.
type backendOutcome struct {
	reply reply
	// failed is the step that failed ("" when the backend answered for the
	// recipient itself); for the log line.
	failed string
	err    error
}

// deliverAll delivers the transaction's message to every recipient's
// backend, one connection per backend, all backends in parallel, and
// stores each recipient's reply in t.rcpts[i].result.
func (s *Server) deliverAll(ctx context.Context, c *session, t *txn) {
	groups := make(map[netip.Addr][]int)
	var order []netip.Addr
	for i, rc := range t.rcpts {
		ip := rc.lease.Backend
		if _, ok := groups[ip]; !ok {
			order = append(order, ip)
		}
		groups[ip] = append(groups[ip], i)
	}
	var wg sync.WaitGroup
	for _, ip := range order {
		idx := groups[ip]
		wg.Go(func() {
			out := s.deliverTo(ctx, c, t, ip, idx)
			addr := s.o.Backend.Addr(ip)
			for k, i := range idx {
				rc := t.rcpts[i]
				rc.result = out[k].reply
				level := slog.LevelInfo
				attrs := []any{"user", rc.user, "backend", addr, "result", rc.result.code, "status", rc.result.enh}
				if out[k].failed != "" {
					level = slog.LevelWarn
					attrs = append(attrs, "failed", out[k].failed, "error", out[k].err)
				}
				c.log.Log(ctx, level, "delivery", attrs...)
			}
		})
	}
	wg.Wait()
}

// deliverTo runs one LMTP transaction with the backend at ip for the
// recipients t.rcpts[idx...] and returns their outcomes in that order.
func (s *Server) deliverTo(ctx context.Context, c *session, t *txn, ip netip.Addr, idx []int) []backendOutcome {
	out := make([]backendOutcome, len(idx))
	fail := func(err error) []backendOutcome {
		stage := "connection"
		var se *stageError
		if errors.As(err, &se) {
			stage = se.stage
		}
		if ctx.Err() != nil {
			stage = "shutdown"
		}
		for k := range out {
			if out[k].reply.code == 0 {
				out[k] = backendOutcome{reply: backendFailed(detail(stage, err)), failed: stage, err: err}
			}
		}
		return out
	}

	b, err := s.connect(ctx, c, ip)
	if err != nil {
		return fail(err)
	}
	stop := context.AfterFunc(ctx, func() { b.conn.Close() })
	defer stop()
	// QUIT after a completed exchange; after a failure the state of the
	// connection is unknown and it is just closed.
	clean := false
	defer func() {
		if clean {
			b.quit()
		} else {
			b.conn.Close()
		}
	}()
	b.setTimeout(s.o.DataTimeout)

	// RFC 2920: with PIPELINING, MAIL, the RCPTs and DATA go out in one
	// write and the replies are read in order; without it, one by one.
	pipelining := b.has("PIPELINING")
	if err := b.send(s.mailCommand(b, t)); err != nil {
		return fail(&stageError{"MAIL", err})
	}
	readOne := func(stage string) (smtpReply, error) {
		if !pipelining {
			if err := b.flush(); err != nil {
				return smtpReply{}, &stageError{stage, err}
			}
		}
		r, err := b.readReply()
		if err != nil {
			return smtpReply{}, &stageError{stage, err}
		}
		return r, nil
	}
	if pipelining {
		for _, i := range idx {
			_ = b.send("RCPT TO:<" + t.rcpts[i].path.raw + ">")
		}
		_ = b.send("DATA")
		if err := b.flush(); err != nil {
			return fail(&stageError{"MAIL", err})
		}
	}
	mail, err := readOne("MAIL")
	if err != nil {
		return fail(err)
	}
	if mail.code/100 != 2 {
		// The RCPT replies that follow are consequences (503); every
		// recipient is retried later.
		return fail(&stageError{"MAIL", unexpected(mail)})
	}
	accepted := make([]int, 0, len(idx)) // positions in out accepted by the backend
	for k, i := range idx {
		if !pipelining {
			if err := b.send("RCPT TO:<" + t.rcpts[i].path.raw + ">"); err != nil {
				return fail(&stageError{"RCPT", err})
			}
		}
		r, err := readOne("RCPT")
		if err != nil {
			return fail(err)
		}
		switch r.code / 100 {
		case 2:
			accepted = append(accepted, k)
		case 4, 5:
			// The backend's own verdict on the recipient, relayed after
			// DATA (4xx stays 4xx, 5xx stays 5xx).
			rep, _ := relayReply(r)
			out[k] = backendOutcome{reply: rep}
		default:
			return fail(&stageError{"RCPT", unexpected(r)})
		}
	}
	if len(accepted) == 0 && !pipelining {
		clean = true
		return out // nothing to send
	}
	if !pipelining {
		if err := b.send("DATA"); err != nil {
			return fail(&stageError{"DATA", err})
		}
	}
	data, err := readOne("DATA")
	if err != nil {
		return fail(err)
	}
	if len(accepted) == 0 {
		// RFC 2033 section 4.2: DATA without recipients fails with 503.
		// A backend answering 354 anyway cannot be talked to sensibly.
		clean = data.code != 354
		return out
	}
	if data.code != 354 {
		return fail(&stageError{"DATA", unexpected(data)})
	}
	if err := s.sendMessage(b, t.spool); err != nil {
		return fail(&stageError{"message", err})
	}
	// RFC 2033 section 4.2: one reply per recipient the backend accepted,
	// in RCPT order.
	for _, k := range accepted {
		r, err := b.readReply()
		if err != nil {
			return fail(&stageError{"DATA reply", err})
		}
		rep, ok := relayReply(r)
		if !ok {
			return fail(&stageError{"DATA reply", unexpected(r)})
		}
		out[k] = backendOutcome{reply: rep}
	}
	clean = true
	return out
}

// sendMessage streams the spooled message and the terminating "." line
// (RFC 5321 section 4.1.1.4); the spool holds it dot-stuffed already.
func (s *Server) sendMessage(b *backendConn, sp *spool) error {
	if _, err := io.Copy(b.w, sp.reader()); err != nil {
		return err
	}
	if _, err := b.w.WriteString(".\r\n"); err != nil {
		return err
	}
	return b.flush()
}

// mailCommand builds MAIL FROM for a backend: the sender as the client gave
// it, and the client's SIZE (RFC 1870), BODY (RFC 6152) and SMTPUTF8
// (RFC 6531) parameters when the backend advertises the extension.
func (s *Server) mailCommand(b *backendConn, t *txn) string {
	var sb strings.Builder
	sb.WriteString("MAIL FROM:<")
	sb.WriteString(t.from.raw)
	sb.WriteByte('>')
	if t.size > 0 && b.has("SIZE") {
		sb.WriteString(" SIZE=")
		sb.WriteString(strconv.FormatInt(t.size, 10))
	}
	if t.body != "" && b.has("8BITMIME") {
		sb.WriteString(" BODY=")
		sb.WriteString(t.body)
	}
	if t.smtputf8 && b.has("SMTPUTF8") {
		sb.WriteString(" SMTPUTF8")
	}
	return sb.String()
}

// connect dials the backend at ip and runs the handshake: greeting, LHLO,
// STARTTLS when configured (RFC 3207), XCLIENT when advertised. Every step
// is bounded by the login timeout. On error the connection is closed.
func (s *Server) connect(ctx context.Context, c *session, ip netip.Addr) (_ *backendConn, err error) {
	hctx, cancel := context.WithTimeout(ctx, s.loginTimeout())
	defer cancel()
	raw, err := s.dial(hctx, ip, c.sess)
	if err != nil {
		return nil, &stageError{"connect", err}
	}
	b := newBackendConn(raw, s.loginTimeout())
	stop := context.AfterFunc(hctx, func() { raw.Close() })
	defer stop()
	defer func() {
		if err != nil {
			b.conn.Close()
		}
	}()

	greeting, err := b.readReply()
	if err != nil {
		return nil, &stageError{"greeting", err}
	}
	if greeting.code != 220 {
		return nil, &stageError{"greeting", unexpected(greeting)}
	}
	if err := b.lhlo(s.o.Hostname); err != nil {
		return nil, &stageError{"LHLO", err}
	}
	if s.o.Backend.TLS == config.TLSStartTLS {
		if !b.has("STARTTLS") {
			return nil, &stageError{"STARTTLS", errors.New("not offered by the backend")}
		}
		r, err := b.cmd("STARTTLS")
		if err != nil {
			return nil, &stageError{"STARTTLS", err}
		}
		if r.code != 220 {
			return nil, &stageError{"STARTTLS", unexpected(r)}
		}
		if b.r.Buffered() > 0 {
			// Bytes after the 220 would be taken as sent over TLS.
			return nil, &stageError{"STARTTLS", errors.New("data after the 220 reply")}
		}
		tc := s.o.Backend.ClientTLS(raw, ip)
		if err := tc.HandshakeContext(hctx); err != nil {
			return nil, &stageError{"STARTTLS", err}
		}
		b.attach(tc)
		// RFC 3207 section 4.2: forget what was learnt before TLS.
		if err := b.lhlo(s.o.Hostname); err != nil {
			return nil, &stageError{"LHLO", err}
		}
	}
	if args, ok := b.caps["XCLIENT"]; ok {
		if line := xclientLine(args, c.sess, c.helo); line != "" {
			r, err := b.cmd(line)
			if err != nil {
				return nil, &stageError{"XCLIENT", err}
			}
			switch {
			case r.code/100 == 2:
				// Postfix XCLIENT_README and Dovecot's
				// smtp-server-cmd-xclient.c: success is a new 220
				// greeting and the session starts over; LHLO again.
				if err := b.lhlo(s.o.Hostname); err != nil {
					return nil, &stageError{"LHLO", err}
				}
			case r.code == 421:
				return nil, &stageError{"XCLIENT", unexpected(r)}
			default:
				// Not trusted (Dovecot: 550 5.7.14): deliver anyway, the
				// backend sees usher as the client.
				c.log.Warn("backend refused XCLIENT", "backend", s.o.Backend.Addr(ip), "reply", r.String())
			}
		}
	}
	return b, nil
}

// xclientLine builds the XCLIENT command (Postfix XCLIENT_README) with the
// attributes the backend lists in its XCLIENT extension, as Dovecot's own
// SMTP client does: HELO (the client's LHLO name), TTL, PORT, SESSION
// (a Dovecot extension attribute, sent only when listed) and ADDR last,
// because after ADDR a server may stop trusting XCLIENT. Dovecot 2.3's LMTP
// lists "ADDR PORT PROTO HELO LOGIN TTL TIMEOUT". Values are xtext; an IPv6
// ADDR goes without the "IPV6:" prefix, which older Dovecot LMTP servers
// reject. It returns "" when there is nothing to send.
func xclientLine(args string, sess *proxy.Session, helo string) string {
	offered := make(map[string]bool)
	for _, a := range strings.Fields(args) {
		offered[strings.ToUpper(a)] = true
	}
	a := xclient.For(sess.Remote, sess.ID, xclient.Printable)
	var attrs []xclient.Attr
	for _, at := range []xclient.Attr{{Name: "HELO", Value: helo}, a.TTL, a.Port, a.Session, a.Addr} {
		if offered[at.Name] {
			attrs = append(attrs, at)
		}
	}
	line := xclient.Line(attrs, xclient.Xtext)
	if len(line)+2 > maxCommandLine && offered["HELO"] && helo != "" {
		// Only a long HELO name can make it too long; drop it.
		return xclientLine(args, sess, "")
	}
	return line
}
