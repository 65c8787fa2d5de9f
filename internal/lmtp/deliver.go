package lmtp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// Delivery to the backends. Every recipient's backend gets the envelope
// as soon as the recipient is known: at the end of the client's pipelined
// group of commands that named it (RFC 2920 section 3.2 lets usher hold
// its replies until then), usher writes MAIL and the RCPTs to every backend
// involved in one write each (RFC 2920 section 3.1, when the backend
// advertises PIPELINING; one command at a time otherwise) and relays each
// backend's verdict on its recipient as the reply to that RCPT. After the
// message, a backend that advertises CHUNKING (RFC 3030; Dovecot's LMTP
// does) gets "BDAT <size> LAST" and the message in one write, and sends
// its replies (one per accepted recipient, RFC 2033 section 4.2, as for
// DATA). Any other backend gets DATA at the client's DATA (or first BDAT
// chunk), so that its 354 arrives while the client sends the message, and
// the dot-stuffed message after it. Either way only the transfer and the
// replies remain after the client's final ".". The envelope of one backend,
// its recipients and its connection make a leg.

// cmdKind is one command of a leg's envelope.
type cmdKind uint8

const (
	cmdRSET cmdKind = iota // ends a transaction left open on a cached link
	cmdMAIL
	cmdRCPT
	cmdDATA
)

// stage names the command for failure replies and logs.
func (k cmdKind) stage() string {
	switch k {
	case cmdRSET:
		return "RSET"
	case cmdMAIL:
		return "MAIL"
	case cmdRCPT:
		return "RCPT"
	}
	return "DATA"
}

// legCmd is one command of a leg: its kind and, for RCPT, the recipient.
type legCmd struct {
	kind cmdKind
	rc   *rcpt
}

// leg is the part of a transaction that goes to one backend. Only the
// session's goroutine uses it, except in deliverAll, where each leg is
// used by one goroutine of its own.
type leg struct {
	ip   netip.Addr
	addr string // ip and port, for logs
	link *link  // nil before the connection is made and after a failure

	// cmds is the envelope sent (or to be sent) on link: replies come in
	// this order (RFC 2920 section 3.1); written and answered count the
	// commands written and the replies read.
	cmds              []legCmd
	written, answered int

	rcpts []*rcpt // the transaction's recipients on this backend, RCPT order

	retried bool      // a lost connection was replaced (once per leg)
	redone  bool      // the envelope was replayed because the link sat idle too long
	msg     bool      // the leg takes the message (it has an accepted recipient)
	data    bool      // DATA is part of the envelope (no CHUNKING)
	lastIO  time.Time // when commands were last written
	sent    bool      // message octets were written: never retry after that
	done    bool      // the message was delivered and every reply read
	err     error     // the failure (a *stageError); link is then closed
}

// errClosing is a 421 reply (RFC 5321 section 3.8: the server closes the
// channel), as Dovecot sends on shutdown and after its idle timeout.
var errClosing = errors.New("backend closing the connection")

// errAfter354 reports octets after a 354 reply, which must be followed by
// nothing until usher sends the message: the session is out of step.
var errAfter354 = errors.New("data after the 354 reply")

// anyOK reports whether the backend accepted one of the leg's recipients.
func (lg *leg) anyOK() bool {
	for _, rc := range lg.rcpts {
		if rc.ok {
			return true
		}
	}
	return false
}

// push writes the commands that may go out now and flushes them in one
// write: all of them with PIPELINING (RFC 2920 section 3.1; DATA is always
// last), else the next one once every reply is in. Errors stick to the
// writer, so a caller may ignore them: the next step returns them again.
func (lg *leg) push(s *Server, t *txn) error {
	b := lg.link.b
	pipelining := b.has("PIPELINING")
	first := lg.written
	for lg.written < len(lg.cmds) && (pipelining || lg.written == lg.answered) {
		cmd := lg.cmds[lg.written]
		switch cmd.kind {
		case cmdRSET:
			_, _ = b.w.WriteString("RSET")
		case cmdMAIL:
			_, _ = b.w.WriteString(s.mailCommand(b, t))
		case cmdRCPT:
			_, _ = b.w.WriteString("RCPT TO:<")
			_, _ = b.w.WriteString(cmd.rc.path.raw)
			_ = b.w.WriteByte('>')
		case cmdDATA:
			_, _ = b.w.WriteString("DATA")
		}
		_, _ = b.w.WriteString("\r\n")
		lg.written++
	}
	if lg.written == first {
		return nil
	}
	lg.lastIO = time.Now()
	if err := b.flush(); err != nil {
		return &stageError{lg.cmds[first].kind.stage(), err}
	}
	return nil
}

// step writes what may be written and reads and applies the next reply.
func (lg *leg) step(s *Server, t *txn) error {
	if err := lg.push(s, t); err != nil {
		return err
	}
	cmd := lg.cmds[lg.answered]
	r, err := lg.link.b.readReply()
	if err != nil {
		return &stageError{cmd.kind.stage(), err}
	}
	lg.answered++
	return lg.apply(cmd, r)
}

// apply takes in the backend's reply to cmd.
func (lg *leg) apply(cmd legCmd, r smtpReply) error {
	stage := cmd.kind.stage()
	if r.code == 421 {
		return &stageError{stage, fmt.Errorf("%w: %s", errClosing, r)}
	}
	switch cmd.kind {
	case cmdRSET, cmdMAIL:
		if r.code/100 != 2 {
			// After a refused MAIL the RCPT replies are consequences (503);
			// every recipient is retried later.
			return &stageError{stage, unexpected(r)}
		}
	case cmdRCPT:
		switch r.code / 100 {
		case 2:
			cmd.rc.ok = true
		case 4, 5:
			// The backend's own verdict on the recipient (4xx stays 4xx,
			// 5xx stays 5xx).
			rep, _ := relayReply(r)
			cmd.rc.refusal = &rep
		default:
			return &stageError{stage, unexpected(r)}
		}
	case cmdDATA:
		switch {
		case r.code == 354:
			// RFC 5321 section 4.1.1.4: after 354 the server waits for the
			// message; anything it sent beyond is out of step.
			if lg.link.b.r.Buffered() > 0 {
				return &stageError{stage, errAfter354}
			}
		case !lg.anyOK() && (r.code/100 == 4 || r.code/100 == 5):
			// RFC 2033 section 4.2: DATA without a valid recipient fails
			// (503); possible after a replay in which the backend refused
			// every recipient. Nothing to send.
			lg.data = false
		default:
			return &stageError{stage, unexpected(r)}
		}
	}
	return nil
}

// sync writes the leg's envelope and reads every reply due, replacing a
// connection found lost on the way once (see retry).
func (lg *leg) sync(ctx context.Context, s *Server, c *session, t *txn) {
	if lg.link != nil {
		// Envelope replies come at once from a healthy backend; the client
		// waits for them (RCPT), so a hung backend must not hold it long.
		lg.link.b.setTimeout(s.loginTimeout())
	}
	for lg.err == nil && lg.link != nil && lg.answered < len(lg.cmds) {
		err := lg.step(s, t)
		if err == nil {
			continue
		}
		if !lg.retried && !lg.sent && ctx.Err() == nil && connLost(err) {
			c.log.Info("backend connection lost, retrying on a new one", "backend", lg.addr, "error", err)
			lg.retried = true
			if err = lg.reconnect(ctx, s, c); err == nil {
				continue
			}
		}
		lg.fail(err)
	}
}

// connLost reports an error that means the connection is gone, as when a
// backend closed a cached connection while it was idle.
func connLost(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, errClosing) || errors.Is(err, errAfter354)
}

// reconnect replaces the leg's connection with a new one and replays the
// envelope there: MAIL, an RCPT for every recipient still in the
// transaction, and DATA when it was part of it and the new connection does
// not offer CHUNKING. It is only used before any
// octet of the message went to the backend: without the message's final
// "." the backend cannot have delivered it, so nothing is delivered twice.
// The replayed RCPTs get new verdicts: a recipient refused now, though the
// client already got 250 for it, gets the refusal after DATA.
func (lg *leg) reconnect(ctx context.Context, s *Server, c *session) error {
	lg.closeLink()
	l, err := s.dialLink(ctx, c, lg.ip)
	if err != nil {
		return err
	}
	l.txns = 1
	lg.link = l
	lg.cmds = append(lg.cmds[:0], legCmd{kind: cmdMAIL})
	for _, rc := range lg.rcpts {
		rc.ok, rc.refusal = false, nil
		lg.cmds = append(lg.cmds, legCmd{kind: cmdRCPT, rc: rc})
	}
	lg.data = lg.data && !l.b.has("CHUNKING")
	if lg.data {
		lg.cmds = append(lg.cmds, legCmd{kind: cmdDATA})
	}
	lg.written, lg.answered = 0, 0
	return nil
}

// fail records the leg's failure and closes its connection, whose state is
// unknown.
func (lg *leg) fail(err error) {
	lg.err = err
	lg.closeLink()
}

func (lg *leg) closeLink() {
	if lg.link != nil {
		lg.link.close(false)
		lg.link = nil
	}
}

// deliver completes the leg after the message was received: with DATA it
// reads the backend's 354 and sends the message dot-stuffed and the final
// "." (RFC 5321 section 4.1.1.4), else it sends "BDAT <size> LAST" and the
// message (RFC 3030 section 2); then it reads one reply per recipient the
// backend accepted (RFC 2033 section 4.2), in RCPT order, into rc.result.
func (lg *leg) deliver(ctx context.Context, s *Server, c *session, t *txn) {
	if lg.err != nil || !lg.msg {
		return
	}
	if !lg.redone && time.Since(lg.lastIO) > s.dataWaitMax {
		// The backend has heard nothing since the RCPTs or DATA for longer
		// than its idle timeout may allow (Dovecot: 5 minutes): sending
		// the message into a connection it may be closing would fail after
		// the first octet, when a retry is no longer safe. Replay the
		// envelope on a new connection first.
		lg.redone = true
		if err := lg.reconnect(ctx, s, c); err != nil {
			lg.fail(err)
			return
		}
	}
	if !lg.data && !lg.link.b.has("CHUNKING") {
		// Only after a reconnect: the new connection has no CHUNKING.
		lg.data = true
		lg.cmds = append(lg.cmds, legCmd{kind: cmdDATA})
	}
	lg.sync(ctx, s, c, t) // the 354; after a replay the RCPT replies too
	if lg.err != nil || !lg.anyOK() {
		return // failed, or a replay in which the backend refused everyone
	}
	b := lg.link.b
	lg.sent = true
	b.setTimeout(s.o.DataTimeout) // the message and the replies to it
	if err := s.sendMessage(b, t.spool, lg.data); err != nil {
		lg.fail(&stageError{"message", err})
		return
	}
	for _, rc := range lg.rcpts {
		if !rc.ok {
			continue
		}
		r, err := b.readReply()
		if err == nil && r.code == 421 {
			// The backend closes the connection (RFC 5321 section 3.8):
			// not a verdict on this recipient; retried by the MTA.
			err = fmt.Errorf("%w: %s", errClosing, r)
		}
		if err != nil {
			lg.fail(&stageError{"DATA reply", err})
			return
		}
		rep, ok := relayReply(r)
		if !ok {
			lg.fail(&stageError{"DATA reply", unexpected(r)})
			return
		}
		rc.result, rc.final = rep, true
	}
	lg.done = true
}

// deliverAll completes every leg that takes the message, all backends in parallel,
// and sets each recipient's reply: the backend's own after DATA, its
// refusal of the recipient, or a temporary failure (451) when the backend
// failed at some step.
func (s *Server) deliverAll(ctx context.Context, c *session, t *txn) {
	var active []*leg
	for _, lg := range t.legs {
		if lg.err == nil && lg.msg {
			active = append(active, lg)
		}
	}
	if len(active) == 1 {
		active[0].deliver(ctx, s, c, t)
	} else {
		var wg sync.WaitGroup
		for _, lg := range active {
			wg.Go(func() { lg.deliver(ctx, s, c, t) })
		}
		wg.Wait()
	}
	for _, rc := range t.rcpts {
		var stage string
		var err error
		switch {
		case rc.final:
		case rc.refusal != nil:
			rc.result = *rc.refusal
		default:
			stage, err = failure(ctx, rc.leg.err)
			rc.result = backendFailed(detail(stage, err))
		}
		c.logDelivery(ctx, rc, stage, err)
	}
}

// failure names the step of a leg's failure and its error.
func failure(ctx context.Context, err error) (string, error) {
	if err == nil {
		// Cannot happen: a recipient without a reply is on a failed leg.
		err = errors.New("no reply from the backend")
	}
	stage := "connection"
	var se *stageError
	if errors.As(err, &se) {
		stage = se.stage
	}
	if ctx.Err() != nil {
		stage = "shutdown"
	}
	return stage, err
}

// sendMessage sends the spooled message: after DATA's 354 dot-stuffed
// (RFC 5321 section 4.5.2) and ended by the "." line (section 4.1.1.4),
// else as "BDAT <size> LAST" and the message as it is (RFC 3030 section 2:
// the size counts the octets that follow, no stuffing). One flush: a small
// message goes out in one write with its command.
func (s *Server) sendMessage(b *backendConn, sp *spool, data bool) error {
	if data {
		if _, err := io.Copy(&dotStuffer{w: b.w}, sp.reader()); err != nil {
			return err
		}
		if _, err := b.w.WriteString(".\r\n"); err != nil {
			return err
		}
		return b.flush()
	}
	_, _ = b.w.WriteString("BDAT ")
	_, _ = b.w.WriteString(strconv.FormatInt(sp.size, 10))
	_, _ = b.w.WriteString(" LAST\r\n")
	if _, err := io.Copy(b.w, sp.reader()); err != nil {
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
