// Package lmtp is usher's LMTP front end (RFC 2033): the MTA (Postfix,
// Exim) delivers to usher over LMTP, and usher delivers each recipient
// through the backend its user is pinned to. The client side speaks LMTP
// with PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034, RFC 3463),
// 8BITMIME (RFC 6152), SIZE (RFC 1870), SMTPUTF8 (RFC 6531), CHUNKING
// (RFC 3030) and STARTTLS (RFC 3207). For every RCPT usher asks the Director
// for the recipient's backend and passes the RCPT on to that backend over
// an LMTP connection of the session's own (MAIL first, for the first
// recipient there); at the end of the client's pipelined group of commands
// it writes each backend's commands in one go (RFC 2920) and relays each
// backend's verdict on its recipient (250, a 550 for an unknown user, a 452
// for a full mailbox) as the reply to that RCPT, as Dovecot's own LMTP proxy
// does. It receives the message into the spool, then sends it to every
// backend with an accepted recipient, all in parallel, with one
// "BDAT <size> LAST" (RFC 3030) where the backend offers CHUNKING, else
// after DATA (sent at the client's DATA, so that the 354 is there when the
// message is), and relays each recipient's reply in RCPT order (RFC 2033
// section 4.2).
//
// Backend connections outlive the transaction (link.go): the next
// transaction of the same client session to the same backend goes over the
// same connection, with no new connect, greeting, LHLO or XCLIENT. A cached
// connection found closed by the backend is replaced once, transparently,
// before any octet of the message was sent on it (deliver.go), so that
// nothing is delivered twice.
//
// Invariants:
//   - Every client read has a deadline (IdleTimeout per command,
//     DataTimeout per read of message data or chunk piece) and a cap (8 KiB per
//     command line, 64 KiB per message line, MaxMessageSize per message);
//     every backend read and write has one too (LoginTimeout from connect to
//     the end of the handshake and per envelope reply — MAIL, RCPT, DATA's
//     354 — since the client waits for them at RCPT; DataTimeout per write
//     of the message and per reply after it),
//     and an unused backend connection is closed after linkIdle.
//   - A message is stored once, as delivered (not dot-stuffed, CRLF): in memory
//     up to 1 MiB, then in a 0600 temporary file in SpoolDir that is removed
//     when the transaction ends. Every backend reads its own stream from the
//     spool. Message content and command lines are never logged.
//   - A recipient gets 250 after DATA only when its backend answered 250 for
//     it after the message. A backend refusing the recipient at RCPT has its
//     reply relayed (4xx stays 4xx, 5xx stays 5xx); any other failure
//     (connect, timeout, refused MAIL, a dropped connection, a missing reply)
//     is answered 451 4.4.0 so that the MTA retries, at RCPT when it happens
//     before, after DATA when it happens after the client got 250 for the
//     recipient. Every accepted recipient gets exactly one reply after DATA.
//   - A backend connection whose state is in doubt (any error, a message
//     begun but not completed) is closed, never reused; a cached one is
//     reused only after a completed transaction (or with RSET first when a
//     transaction was left open without DATA).
//   - Each recipient holds a Director lease from RCPT until its backend
//     refuses it or the transaction ends (after the DATA replies, RSET, LHLO,
//     STARTTLS, QUIT or the end of the session), so a move of the user waits
//     for the delivery;
//     each lease is released exactly once. A lease's Done channel closing
//     mid-transaction (the user is kicked or moved) does not stop the
//     delivery: it is short, and the move is waiting for it to finish.
//   - Replies usher makes itself are defined in one place (reply.go);
//     backend replies pass through relayReply, which keeps their codes and
//     sanitizes their text.
//   - STARTTLS with bytes pipelined behind it is refused and the session
//     closed (the CVE-2011-0411 pattern); consecutive bad commands are
//     bounded.
package lmtp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// Defaults for zero Options fields.
const (
	// DefaultIdleTimeout matches Postfix's LMTP client timeouts (300s).
	DefaultIdleTimeout = 5 * time.Minute
	// DefaultDataTimeout matches Postfix's lmtp_data_done_timeout (600s).
	DefaultDataTimeout    = 10 * time.Minute
	DefaultLoginTimeout   = 30 * time.Second
	DefaultMaxMessageSize = 64 << 20
	DefaultMaxRecipients  = 1000
	DefaultPort           = 24 // RFC 2033 section 5 leaves the port open; 24 is customary
)

const (
	// maxDataLine caps one message line. RFC 5321 section 4.5.3.1.6 allows
	// 1000 octets; usher is tolerant of longer ones.
	maxDataLine = 64 << 10
	// maxBadCommands ends a session after that many bad commands in a row
	// (Dovecot's default max_bad_commands is 10).
	maxBadCommands = 10
	// chunkPiece is how much of a BDAT chunk is read at once.
	chunkPiece = 64 << 10
	// maxSizeDigits bounds SIZE and BDAT numbers (int64 has 19 digits).
	maxSizeDigits = 18
)

// Options configures the LMTP front end.
type Options struct {
	// Director picks each recipient's backend. Required.
	Director proxy.Director
	// Backend says how to reach backends; Port defaults to 24.
	Backend proxy.BackendOptions
	// Hostname names usher in the greeting and in LHLO (client and backend
	// side); default os.Hostname.
	Hostname string
	// IdleTimeout bounds each command read (default 5m).
	IdleTimeout time.Duration
	// DataTimeout bounds each read of message data, each write of it to a
	// backend and each backend reply to it (default 10m).
	DataTimeout time.Duration
	// MaxMessageSize caps a message in octets (default 64 MiB); advertised
	// in SIZE.
	MaxMessageSize int64
	// MaxRecipients caps the recipients of one transaction (default 1000).
	MaxRecipients int
	// RecipientDelimiter is a set of characters, each of which starts the
	// detail part of a local part: with "+", "user+tag@dom" is routed as
	// "user@dom" (as Postfix's and Dovecot's recipient_delimiter). The
	// backend still gets the address as the client gave it.
	RecipientDelimiter string
	// SpoolDir holds messages larger than 1 MiB while they are delivered
	// ("" = os.TempDir()).
	SpoolDir string
}

// Server serves LMTP sessions; it implements proxy.Handler and is safe for
// concurrent use (it holds only its options).
type Server struct {
	o Options
	// maxLine caps a command line; tests lower it.
	maxLine int
	// memSpool is how much of a message stays in memory and maxDataLine
	// caps a message line; tests lower them.
	memSpool    int
	maxDataLine int
	// dial connects to a backend; tests replace it.
	dial func(ctx context.Context, ip netip.Addr, sess *proxy.Session) (net.Conn, error)
	// linkIdle, linkMaxTxns and dataWaitMax bound the reuse of backend
	// connections (link.go, deliver.go); tests lower them.
	linkIdle    time.Duration
	linkMaxTxns int
	dataWaitMax time.Duration
}

var _ proxy.Handler = (*Server)(nil)

// New returns a Server; zero Options fields get their defaults.
func New(o Options) *Server {
	if o.Backend.Port == 0 {
		o.Backend.Port = DefaultPort
	}
	o.Hostname = hostname(o.Hostname)
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = DefaultIdleTimeout
	}
	if o.DataTimeout <= 0 {
		o.DataTimeout = DefaultDataTimeout
	}
	if o.MaxMessageSize <= 0 {
		o.MaxMessageSize = DefaultMaxMessageSize
	}
	if o.MaxRecipients <= 0 {
		o.MaxRecipients = DefaultMaxRecipients
	}
	s := &Server{o: o, maxLine: wire.DefaultMaxLine, memSpool: memSpool, maxDataLine: maxDataLine,
		linkIdle: linkIdle, linkMaxTxns: linkMaxTxns, dataWaitMax: dataWaitMax}
	s.dial = s.o.Backend.DialFor
	return s
}

// hostname returns name, or the system's host name, as one safe token.
func hostname(name string) string {
	if name == "" {
		name, _ = os.Hostname()
	}
	if h, ok := parseHelo(name); ok {
		return h
	}
	return "localhost"
}

func (s *Server) loginTimeout() time.Duration {
	if s.o.Backend.LoginTimeout > 0 {
		return s.o.Backend.LoginTimeout
	}
	return DefaultLoginTimeout
}

// txn is one mail transaction, from MAIL to the end of the message.
type txn struct {
	from     path
	size     int64  // the client's SIZE parameter (0 when absent)
	body     string // the client's BODY parameter, upper case ("" when absent)
	smtputf8 bool
	// rcpts are the recipients accepted so far, or whose backend's verdict
	// is still due; legs are their backends' parts of the transaction, in
	// the order the backends were first named.
	rcpts []*rcpt
	legs  []*leg

	spool   *spool
	msgSize int64 // message octets received (unstuffed, RFC 1870 section 4)
	// BDAT state (RFC 3030): chunks received, the normalizer of their line
	// ends, and whether a chunk failed (then only RSET helps).
	chunks      int
	norm        *normalizer
	chunkFailed bool
}

// rcpt is one recipient the Director placed.
type rcpt struct {
	path  path
	user  string // the routing user given to the Director
	lease *proxy.Lease
	leg   *leg // its backend's part of the transaction
	// The backend's verdict on RCPT: ok, or its refusal (relayed at RCPT
	// or, after a replay on a new connection, after DATA).
	ok      bool
	refusal *reply
	// gone: refused at RCPT, out of the transaction, lease released.
	gone bool
	// result is the reply after DATA; final when the backend gave it.
	result reply
	final  bool
}

// pendingReply is the place in session.out of an RCPT reply that waits for
// the backend's verdict.
type pendingReply struct {
	at int
	rc *rcpt
}

// session is one client connection.
type session struct {
	srv  *Server
	ctx  context.Context // the session's life (Serve's context)
	sess *proxy.Session
	raw  net.Conn  // the accepted connection, under any TLS layer
	in   *readConn // what r reads from: the connection, over any TLS layer
	r    *wire.Reader
	log  *slog.Logger
	out  []byte // replies not yet written (RFC 2920 section 3.2)
	// pend are RCPT replies to be placed into out once the backends have
	// answered (settle), which builds the new out in spare.
	pend  []pendingReply
	spare []byte
	// links are the backend connections cached between transactions.
	links map[netip.Addr]*link
	// spoolBuf is the memory of the last message's spool, kept for the
	// next one when small (spoolKeep).
	spoolBuf []byte

	helo string // the client's LHLO name; "" before LHLO
	bad  int    // bad commands in a row
	tx   *txn   // nil outside a transaction
}

// Serve runs one LMTP session and returns the reason it ended.
func (s *Server) Serve(ctx context.Context, sess *proxy.Session) string {
	log := sess.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &session{srv: s, ctx: ctx, sess: sess, raw: sess.Conn, log: log}
	c.in = &readConn{Conn: sess.Conn, ctx: ctx}
	c.r = wire.NewReaderContext(ctx, c.in, s.o.IdleTimeout, s.maxLine)
	// A shutdown makes a blocked read return at once; usher then says 421.
	stop := wire.WatchContext(ctx, c.raw)
	defer stop()
	defer func() {
		c.endTransaction()
		c.closeLinks()
	}()
	return c.run(ctx)
}

func (c *session) run(ctx context.Context) string {
	c.reply(reply{220, "", c.srv.o.Hostname + " usher LMTP ready"})
	for {
		// RFC 2920 section 3.2: replies to pipelined commands may be held
		// until the input is drained.
		if c.r.Buffered() == 0 {
			if err := c.flush(); err != nil {
				return c.writeFailed(ctx)
			}
		}
		line, err := c.r.ReadLine()
		if err != nil {
			if errors.Is(err, wire.ErrLineTooLong) {
				c.log.Debug("command line too long")
				if reason := c.answer(replyLineTooLong); reason != "" {
					return c.end(reason)
				}
				continue
			}
			return c.end(c.readFailed(ctx, err))
		}
		if reason := c.dispatch(ctx, line); reason != "" {
			return c.end(reason)
		}
	}
}

// dispatch runs one command; a non-empty result ends the session.
func (c *session) dispatch(ctx context.Context, line []byte) string {
	verb, arg, err := parseCommand(line)
	if err != nil {
		c.log.Debug("malformed command")
		return c.answer(replyUnknown)
	}
	if verb != "RCPT" {
		// Every other command sees the outcome of the RCPTs before it, and
		// its reply follows theirs.
		c.settle()
	}
	switch verb {
	case "LHLO":
		return c.cmdLHLO(arg)
	case "HELO", "EHLO":
		return c.answer(replyNoHELO)
	case "MAIL":
		return c.cmdMail(arg)
	case "RCPT":
		return c.cmdRcpt(ctx, arg)
	case "DATA":
		return c.cmdData(ctx, arg)
	case "BDAT":
		return c.cmdBDAT(ctx, arg)
	case "RSET":
		if arg != "" {
			return c.answer(replySyntax)
		}
		c.endTransaction()
		return c.answer(replyReset)
	case "NOOP":
		return c.answer(replyOK) // RFC 5321 section 4.1.1.9: the argument is ignored
	case "VRFY":
		return c.answer(replyVRFY)
	case "QUIT":
		c.reply(reply{221, "2.0.0", c.srv.o.Hostname + " closing connection"})
		return reasonQuit
	case "STARTTLS":
		return c.cmdStartTLS(ctx, arg)
	case "EXPN", "HELP", "ETRN", "TURN", "AUTH":
		return c.answer(replyNotImpl)
	}
	c.log.Debug("unknown command", "command", verb)
	return c.answer(replyUnknown)
}

// cmdLHLO is RFC 2033 section 4.1 LHLO: like EHLO (RFC 5321 section
// 4.1.1.1), it resets the transaction and lists the extensions.
func (c *session) cmdLHLO(arg string) string {
	name, ok := parseHelo(arg)
	if !ok {
		return c.answer(replyLHLOSyntax)
	}
	c.endTransaction()
	// The backend connections carry the old LHLO name (XCLIENT HELO).
	c.closeLinks()
	c.helo = name
	c.bad = 0
	ext := []string{
		c.srv.o.Hostname,
		"PIPELINING",          // RFC 2920
		"ENHANCEDSTATUSCODES", // RFC 2034
		"8BITMIME",            // RFC 6152
		"SIZE " + strconv.FormatInt(c.srv.o.MaxMessageSize, 10), // RFC 1870
		"SMTPUTF8", // RFC 6531
		"CHUNKING", // RFC 3030
	}
	if c.starttlsOffered() {
		ext = append(ext, "STARTTLS") // RFC 3207
	}
	for i, e := range ext {
		sep := "-"
		if i == len(ext)-1 {
			sep = " "
		}
		c.out = append(c.out, "250"+sep+e+"\r\n"...)
	}
	return ""
}

func (c *session) starttlsOffered() bool {
	return c.sess.TLSMode == config.TLSStartTLS && c.sess.TLSConfig != nil && !c.sess.Secure
}

// cmdMail is RFC 5321 section 4.1.1.2 MAIL with the SIZE (RFC 1870 section
// 6), BODY (RFC 6152 section 2) and SMTPUTF8 (RFC 6531 section 3.4)
// parameters.
func (c *session) cmdMail(arg string) string {
	if c.helo == "" {
		return c.answer(replyNeedLHLO)
	}
	if c.tx != nil {
		return c.answer(replyNestedMail)
	}
	from, params, err := parseMailArg(arg)
	if err != nil {
		if errors.Is(err, errPath) {
			return c.answer(replyBadSender)
		}
		return c.answer(replySyntax)
	}
	t := &txn{from: from}
	seen := make(map[string]bool, len(params))
	for _, p := range params {
		if seen[p.key] {
			return c.answer(replySyntax)
		}
		seen[p.key] = true
		switch p.key {
		case "SIZE":
			n, ok := parseSize(p.value)
			if !p.hasValue || !ok {
				return c.answer(replySyntax)
			}
			if n > c.srv.o.MaxMessageSize {
				return c.answer(replyTooBig)
			}
			t.size = n
		case "BODY":
			v := strings.ToUpper(p.value)
			if v != "7BIT" && v != "8BITMIME" {
				return c.answer(replyBadBody)
			}
			t.body = v
		case "SMTPUTF8":
			if p.hasValue {
				return c.answer(replySyntax)
			}
			t.smtputf8 = true
		default:
			return c.answer(replyUnknownParam)
		}
	}
	if from.utf8 && !t.smtputf8 {
		return c.answer(replyNeedUTF8)
	}
	c.tx = t
	return c.answer(replySenderOK)
}

// parseSize parses a SIZE or BDAT number: 1*DIGIT, bounded.
func parseSize(s string) (int64, bool) {
	if s == "" || len(s) > maxSizeDigits {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(s[i]-'0')
	}
	return n, true
}

// cmdRcpt is RFC 5321 section 4.1.1.3 RCPT: the Director places the user
// and the RCPT is queued for the user's backend; the reply, the backend's
// verdict, is placed by settle (see the package comment).
func (c *session) cmdRcpt(ctx context.Context, arg string) string {
	t := c.tx
	if t == nil {
		return c.answer(replyNeedMail)
	}
	if t.chunks > 0 {
		return c.answer(replyBadSequence)
	}
	to, params, err := parseRcptArg(arg)
	if err != nil {
		if errors.Is(err, errPath) {
			return c.answer(replyBadRcpt)
		}
		return c.answer(replySyntax)
	}
	if len(params) > 0 {
		// No RCPT parameters are advertised (no DSN, RFC 3461).
		return c.answer(replyUnknownParam)
	}
	if to.utf8 && !t.smtputf8 {
		return c.answer(replyNeedUTF8)
	}
	if len(t.rcpts) >= c.srv.o.MaxRecipients {
		return c.answer(replyTooManyRcpts)
	}
	user := to.routingUser(c.srv.o.RecipientDelimiter)
	if c.srv.o.Director == nil {
		c.log.Error("lmtp: no director configured", "user", user)
		return c.answer(replyUnavailable)
	}
	lease, err := c.srv.o.Director.Acquire(ctx, user)
	if err != nil {
		if ctx.Err() != nil {
			return reasonShutdown
		}
		c.log.Warn("recipient", "user", user, "result", replyUnavailable.code, "status", replyUnavailable.enh, "error", err)
		return c.answer(replyUnavailable)
	}
	rc := &rcpt{path: to, user: user, lease: lease}
	lg := c.legFor(lease.Backend)
	rc.leg = lg
	lg.rcpts = append(lg.rcpts, rc)
	lg.cmds = append(lg.cmds, legCmd{kind: cmdRCPT, rc: rc})
	t.rcpts = append(t.rcpts, rc)
	c.pend = append(c.pend, pendingReply{at: len(c.out), rc: rc})
	c.bad = 0
	return ""
}

// legFor returns the current transaction's leg to the backend at ip,
// starting it (with a cached connection when there is one, and MAIL) the
// first time.
func (c *session) legFor(ip netip.Addr) *leg {
	t := c.tx
	for _, lg := range t.legs {
		if lg.ip == ip {
			return lg
		}
	}
	lg := &leg{ip: ip, addr: c.srv.o.Backend.Addr(ip)}
	if l := c.checkout(ip); l != nil {
		l.txns++
		lg.link = l
		if l.dirty {
			// RFC 5321 section 4.1.1.5: RSET aborts the transaction left
			// open there; RFC 2920 section 3.1 lets it be pipelined.
			lg.cmds = append(lg.cmds, legCmd{kind: cmdRSET})
		}
	}
	lg.cmds = append(lg.cmds, legCmd{kind: cmdMAIL})
	t.legs = append(t.legs, lg)
	return lg
}

// settle sends the queued envelope commands to the backends, waits for
// their verdicts on the recipients whose RCPT replies are due and puts
// those replies in their places in c.out. New connections are made in
// parallel, and every backend gets its commands before usher waits for any
// of them. A recipient refused by its backend, or whose backend failed,
// leaves the transaction.
func (c *session) settle() {
	if len(c.pend) == 0 {
		return
	}
	t, s := c.tx, c.srv
	var wg sync.WaitGroup
	for _, lg := range t.legs {
		if lg.link == nil && lg.err == nil {
			wg.Go(func() {
				l, err := s.dialLink(c.ctx, c, lg.ip)
				if err != nil {
					lg.err = err
					return
				}
				l.txns = 1
				lg.link = l
			})
		}
	}
	wg.Wait()
	for _, lg := range t.legs {
		if lg.link != nil && lg.err == nil {
			_ = lg.push(s, t) // an error shows again in sync
		}
	}
	for _, lg := range t.legs {
		lg.sync(c.ctx, s, c, t)
	}

	out := c.spare[:0]
	prev := 0
	for _, p := range c.pend {
		out = append(out, c.out[prev:p.at]...)
		prev = p.at
		out = append(out, c.verdict(p.rc).String()...)
		out = append(out, '\r', '\n')
	}
	c.out, c.spare = append(out, c.out[prev:]...), c.out
	c.pend = c.pend[:0]
	gone := func(rc *rcpt) bool { return rc.gone }
	t.rcpts = slices.DeleteFunc(t.rcpts, gone)
	for _, lg := range t.legs {
		lg.rcpts = slices.DeleteFunc(lg.rcpts, gone)
	}
}

// verdict is the RCPT reply for rc once its backend has answered; a
// recipient not accepted leaves the transaction and its lease is released.
func (c *session) verdict(rc *rcpt) reply {
	var stage string
	var err error
	switch {
	case rc.refusal != nil:
		rc.result = *rc.refusal
	case rc.leg.err != nil:
		stage, err = failure(c.ctx, rc.leg.err)
		rc.result = backendFailed(detail(stage, err))
	case rc.ok:
		return replyRcptOK
	default:
		// Cannot happen: sync reads every reply or fails the leg.
		stage, err = failure(c.ctx, nil)
		rc.result = backendFailed(detail(stage, err))
	}
	c.logDelivery(c.ctx, rc, stage, err)
	rc.gone = true
	rc.lease.Release()
	return rc.result
}

// logDelivery logs the outcome for one recipient: its reply and, when a
// backend failed, the step and the error.
func (c *session) logDelivery(ctx context.Context, rc *rcpt, stage string, err error) {
	attrs := []any{"user", rc.user, "backend", rc.leg.addr, "result", rc.result.code, "status", rc.result.enh}
	level := slog.LevelInfo
	if stage != "" {
		level = slog.LevelWarn
		attrs = append(attrs, "failed", stage, "error", err)
	}
	c.log.Log(ctx, level, "delivery", attrs...)
}

// startData marks the legs that take the message (those whose backend
// accepted a recipient) and sends DATA to those whose backend has no
// CHUNKING, so that its 354 comes while the client sends the message
// (RFC 2920 section 3.1: DATA ends a pipelined group; the message waits
// for the 354). A CHUNKING backend gets BDAT with the message, later.
func (c *session) startData() {
	t := c.tx
	for _, lg := range t.legs {
		if lg.err != nil || lg.link == nil || !lg.anyOK() {
			continue
		}
		lg.msg = true
		if lg.link.b.has("CHUNKING") {
			continue
		}
		lg.data = true
		lg.cmds = append(lg.cmds, legCmd{kind: cmdDATA})
		_ = lg.push(c.srv, t) // an error shows when the 354 is read
	}
}

// cmdData is RFC 5321 section 4.1.1.4 DATA with RFC 2033 section 4.2's
// per-recipient replies.
func (c *session) cmdData(ctx context.Context, arg string) string {
	if arg != "" {
		return c.answer(replySyntax)
	}
	t := c.tx
	switch {
	case t == nil:
		return c.answer(replyNeedMail)
	case t.chunks > 0 || t.chunkFailed:
		// RFC 3030 section 2: DATA cannot follow BDAT.
		return c.answer(replyBadSequence)
	case len(t.rcpts) == 0:
		return c.answer(replyNoRcpts)
	}
	c.startData()
	c.reply(replyStartData)
	if err := c.flush(); err != nil {
		return c.writeFailed(ctx)
	}
	t.spool = c.newSpool()
	failure, err := c.readData(t)
	if err != nil {
		return c.readFailed(ctx, err)
	}
	c.finishMessage(ctx, failure)
	return ""
}

// readData reads the message after 354 up to the "." line (RFC 5321
// section 4.1.1.4) into the spool, undoing its dot-stuffing (section
// 4.5.2: the first '.' of a line that starts with one is removed). A
// message over MaxMessageSize, an overlong line or a spool error is
// consumed to its end and returned as the recipients' reply; a read error
// ends the session.
func (c *session) readData(t *txn) (*reply, error) {
	r := c.r
	// DataTimeout bounds every read from the connection (readConn) rather
	// than every line: most lines come out of the reader's buffer.
	r.MaxLine, r.Timeout, c.in.timeout = c.srv.maxDataLine, 0, c.srv.o.DataTimeout
	defer func() { r.MaxLine, r.Timeout, c.in.timeout = c.srv.maxLine, c.srv.o.IdleTimeout, 0 }()
	var fail *reply
	for {
		line, err := r.ReadLine()
		if errors.Is(err, wire.ErrLineTooLong) {
			if fail == nil {
				fail = &replyDataLineTooLong
				t.spool.close()
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		if len(line) == 1 && line[0] == '.' {
			return fail, nil
		}
		if len(line) > 0 && line[0] == '.' {
			line = line[1:] // RFC 1870 section 4: the size does not count stuffing either
		}
		t.msgSize += int64(len(line)) + 2
		if fail != nil {
			continue
		}
		if t.msgSize > c.srv.o.MaxMessageSize {
			fail = &replyTooBig
			t.spool.close()
			continue
		}
		if err := t.spool.writeLine(line); err != nil {
			c.log.Error("spool", "error", err)
			fail = &replySpoolFailed
			t.spool.close()
		}
	}
}

// cmdBDAT is RFC 3030 section 2 BDAT: "BDAT" SP chunk-size [SP "LAST"].
// The chunk's octets are always consumed, whatever the answer. After BDAT
// LAST the replies are per recipient (RFC 2033 section 4.3 as cited by
// Dovecot: none at all when no RCPT succeeded).
func (c *session) cmdBDAT(ctx context.Context, arg string) string {
	f := strings.Split(arg, " ")
	n, ok := int64(0), len(f) == 1 || len(f) == 2
	if ok {
		n, ok = parseSize(f[0])
	}
	last := len(f) == 2
	if ok && last && !strings.EqualFold(f[1], "LAST") {
		ok = false
	}
	if !ok {
		// The chunk's end is unknown: its octets would be read as
		// commands. Answer and hang up.
		c.reply(reply{501, "5.5.4", "Syntax: BDAT size [LAST]"})
		return reasonBDATSyntax
	}
	t := c.tx
	var refuse *reply
	switch {
	case t == nil:
		refuse = &replyNeedMail
	case t.chunkFailed:
		refuse = &replyChunkFailed
	case len(t.rcpts) == 0 && !last:
		refuse = &replyNoRcpts
	}
	if refuse != nil || len(t.rcpts) == 0 {
		if err := c.discard(n); err != nil {
			return c.readFailed(ctx, err)
		}
		if refuse == nil {
			c.endTransaction() // BDAT LAST without recipients: zero replies
			return ""
		}
		if t != nil {
			t.chunkFailed = true
		}
		return c.answer(*refuse)
	}
	if t.spool == nil {
		t.spool = c.newSpool()
		t.norm = &normalizer{sp: t.spool}
		c.startData()
	}
	t.chunks++
	failure, err := c.readChunk(t, n)
	if err != nil {
		return c.readFailed(ctx, err)
	}
	if !last {
		if failure != nil {
			// RFC 3030 section 2: a failed chunk fails the transaction.
			t.chunkFailed = true
			t.spool.close()
			return c.answer(*failure)
		}
		return c.answer(reply{250, "2.0.0", strconv.FormatInt(n, 10) + " octets received"})
	}
	if failure == nil {
		if err := t.norm.end(); err != nil {
			c.log.Error("spool", "error", err)
			failure = &replySpoolFailed
		}
	}
	c.finishMessage(ctx, failure)
	return ""
}

// readChunk reads n octets of a BDAT chunk into the spool.
func (c *session) readChunk(t *txn, n int64) (*reply, error) {
	var fail *reply
	t.msgSize += n
	if t.msgSize > c.srv.o.MaxMessageSize {
		fail = &replyTooBig
		t.spool.close()
	}
	r := c.r
	r.Timeout = c.srv.o.DataTimeout
	defer func() { r.Timeout = c.srv.o.IdleTimeout }()
	for n > 0 {
		k := min(n, chunkPiece)
		b, err := r.ReadLiteral(int(k))
		if err != nil {
			return nil, err
		}
		n -= k
		if fail != nil {
			continue
		}
		if err := t.norm.write(b); err != nil {
			c.log.Error("spool", "error", err)
			fail = &replySpoolFailed
			t.spool.close()
		}
	}
	return fail, nil
}

// discard consumes n octets of a refused chunk.
func (c *session) discard(n int64) error {
	r := c.r
	r.Timeout = c.srv.o.DataTimeout
	defer func() { r.Timeout = c.srv.o.IdleTimeout }()
	for n > 0 {
		k := min(n, chunkPiece)
		if _, err := r.ReadLiteral(int(k)); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// finishMessage delivers the received message (or answers failure for
// every recipient), queues one reply per recipient in RCPT order and ends
// the transaction.
func (c *session) finishMessage(ctx context.Context, failure *reply) {
	t := c.tx
	if failure == nil {
		if err := t.spool.finish(); err != nil {
			c.log.Error("spool", "error", err)
			failure = &replySpoolFailed
		}
	}
	if failure != nil {
		// The backends that got DATA are in the middle of a message that
		// will not come: endTransaction closes those connections.
		for _, rc := range t.rcpts {
			rc.result = *failure
			c.log.Info("delivery", "user", rc.user, "result", failure.code, "status", failure.enh,
				"size", t.msgSize)
		}
	} else {
		c.srv.deliverAll(ctx, c, t)
	}
	for _, rc := range t.rcpts {
		c.reply(rc.result)
	}
	c.endTransaction()
}

// cmdStartTLS is RFC 3207 STARTTLS on a starttls listener.
func (c *session) cmdStartTLS(ctx context.Context, arg string) string {
	switch {
	case arg != "":
		return c.answer(replySyntax)
	case c.sess.Secure:
		return c.answer(replyTLSActive)
	case !c.starttlsOffered():
		return c.answer(replyNoTLS)
	case c.r.Buffered() > 0:
		// Bytes after STARTTLS were sent in plaintext but would be taken
		// as sent over TLS (the CVE-2011-0411 pattern).
		c.log.Warn("data pipelined after STARTTLS, closing")
		c.reply(replyTLSPipelined)
		return reasonTLSInject
	}
	// RFC 3207 section 4.2: both sides forget the state before TLS; the
	// client must LHLO again.
	c.endTransaction()
	c.closeLinks()
	c.helo = ""
	c.reply(replyTLSReady)
	if err := c.flush(); err != nil {
		return c.writeFailed(ctx)
	}
	tc := tls.Server(c.raw, c.sess.TLSConfig)
	_ = c.raw.SetDeadline(time.Now().Add(c.srv.o.IdleTimeout))
	if err := tc.HandshakeContext(ctx); err != nil {
		if ctx.Err() != nil {
			return reasonShutdown
		}
		c.log.Info("client TLS handshake failed", "error", err)
		return reasonTLSFailed
	}
	c.sess.Conn, c.sess.Secure = tc, true
	c.in = &readConn{Conn: tc, ctx: ctx}
	c.r = wire.NewReaderContext(ctx, c.in, c.srv.o.IdleTimeout, c.srv.maxLine)
	return ""
}

// newSpool starts the spool of a message, in the memory the last one used.
func (c *session) newSpool() *spool {
	sp := newSpool(c.srv.o.SpoolDir, c.srv.memSpool)
	sp.buf, c.spoolBuf = c.spoolBuf, nil
	return sp
}

// endTransaction releases the transaction's leases and spool and puts its
// backend connections back into the cache, or closes those whose state is
// in doubt.
func (c *session) endTransaction() {
	t := c.tx
	if t == nil {
		return
	}
	c.tx = nil
	c.pend = c.pend[:0] // only at the end of the session: settle ran before any other command
	for _, rc := range t.rcpts {
		rc.lease.Release()
	}
	for _, lg := range t.legs {
		l := lg.link
		if l == nil {
			continue
		}
		lg.link = nil
		switch {
		case lg.done:
			l.dirty = false
		case lg.data || lg.sent || lg.written != lg.answered:
			// In the middle of a message (closing the connection aborts it
			// without delivery), or replies still due.
			l.close(false)
			continue
		case lg.written > 0:
			l.dirty = true // MAIL went out: RSET before the next MAIL
		}
		c.park(l)
	}
	if t.spool != nil {
		if b := t.spool.buf; cap(b) <= spoolKeep {
			c.spoolBuf = b[:0]
		}
		if err := t.spool.close(); err != nil {
			c.log.Error("spool", "error", err)
		}
	}
}

// answer queues a reply to a command and counts bad commands in a row;
// it returns a reason when there were too many.
func (c *session) answer(r reply) string {
	c.reply(r)
	switch r.code {
	case 500, 501, 502, 503, 555:
		c.bad++
		if c.bad >= maxBadCommands {
			c.log.Info("too many bad commands, closing")
			return reasonTooManyBad
		}
	default:
		if r.code/100 == 2 {
			c.bad = 0
		}
	}
	return ""
}

// reply queues one reply line.
func (c *session) reply(r reply) {
	c.out = append(c.out, r.String()...)
	c.out = append(c.out, '\r', '\n')
}

// flush writes the queued replies, after settling those still due, with a
// deadline.
func (c *session) flush() error {
	c.settle()
	if len(c.out) == 0 {
		return nil
	}
	b := c.out
	c.out = c.out[:0]
	conn := c.sess.Conn
	if err := conn.SetWriteDeadline(time.Now().Add(c.srv.o.IdleTimeout)); err != nil {
		return err
	}
	_, err := conn.Write(b)
	return err
}

// end sends the farewell for reason (if any) and what is still queued.
func (c *session) end(reason string) string {
	if r, ok := endReply(c.srv.o.Hostname, reason); ok {
		c.reply(r)
	}
	if reason != reasonWriteFailed && reason != reasonClosed {
		_ = c.flush()
	}
	return reason
}

// readFailed maps a client read error to the end of the session.
func (c *session) readFailed(ctx context.Context, err error) string {
	if errors.Is(err, wire.ErrTooMuch) {
		c.log.Info("client sent too much without a line end")
		return reasonLineFlood
	}
	reason := readEndReason(ctx.Err() != nil, err)
	if reason == reasonReadFailed {
		c.log.Debug("client read failed", "error", err)
	}
	return reason
}

func (c *session) writeFailed(ctx context.Context) string {
	if ctx.Err() != nil {
		return reasonShutdown
	}
	return reasonWriteFailed
}

// readConn is the client connection as the session's reader sees it. With
// a timeout it sets the read deadline itself before each read from the
// connection (while the reader's own per-line deadlines are off): during
// the message, where most lines come out of the reader's buffer, each
// read still has its deadline, at a fraction of the cost. Like the
// reader's guard (wire.NewReaderContext), it keeps the deadline in the
// past once the session's context has ended.
type readConn struct {
	net.Conn
	ctx     context.Context
	timeout time.Duration // 0: the reader sets the deadlines
}

func (r *readConn) Read(p []byte) (int, error) {
	if r.timeout > 0 {
		d := time.Now().Add(r.timeout)
		if r.ctx.Err() != nil {
			d = wire.PastDeadline()
		}
		if err := r.Conn.SetReadDeadline(d); err != nil {
			return 0, fmt.Errorf("set read deadline: %w", err)
		}
	}
	return r.Conn.Read(p)
}
