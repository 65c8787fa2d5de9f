// Package lmtp is usher's LMTP front end (RFC 2033): the MTA (Postfix,
// Exim) delivers to usher over LMTP, and usher delivers each recipient
// through the backend its user is pinned to. The client side speaks LMTP
// with PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034, RFC 3463),
// 8BITMIME (RFC 6152), SIZE (RFC 1870), SMTPUTF8 (RFC 6531), CHUNKING
// (RFC 3030) and STARTTLS (RFC 3207). For every RCPT usher asks the Director
// for the recipient's backend; after DATA it opens one LMTP connection per
// backend involved (all in parallel), replays the envelope with the
// backend's recipients, streams the message and relays each recipient's
// answer in RCPT order.
//
// Replies to RCPT come before the backends are contacted. RFC 2033 only
// gives per-recipient replies after DATA, but the RCPT reply is due first:
// usher answers RCPT with 250 once the Director has placed the user, and the
// backend's own verdict on the recipient (a 550 for an unknown user, a 452
// for a full mailbox) is that recipient's reply after DATA. An MTA handles
// both the same way (bounce or retry that recipient), so nothing is lost;
// only the rejection comes one step later than from Dovecot itself.
//
// Invariants:
//   - Every client read has a deadline (IdleTimeout per command,
//     DataTimeout per message line or chunk piece) and a cap (8 KiB per
//     command line, 64 KiB per message line, MaxMessageSize per message);
//     every backend read and write has one too (LoginTimeout from connect to
//     the end of the handshake, DataTimeout per answer and write after it).
//   - A message is stored once, in wire form (dot-stuffed, CRLF): in memory
//     up to 1 MiB, then in a 0600 temporary file in SpoolDir that is removed
//     when the transaction ends. Every backend reads its own stream from the
//     spool. Message content and command lines are never logged.
//   - A recipient gets 250 after DATA only when its backend answered 250 for
//     it. A backend refusing the recipient at RCPT has its reply relayed
//     (4xx stays 4xx, 5xx stays 5xx); any other failure (connect, timeout,
//     refused MAIL, a dropped connection, a missing reply) is answered
//     451 4.4.0 so that the MTA retries. Every accepted recipient gets
//     exactly one reply.
//   - Each accepted recipient holds a Director lease from RCPT until the
//     transaction ends (after the DATA replies, RSET, LHLO, STARTTLS, QUIT or
//     the end of the session), so a move of the user waits for the delivery;
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
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
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
	// DataTimeout bounds each read of message data and each backend answer
	// after the handshake (default 10m).
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
	s := &Server{o: o, maxLine: wire.DefaultMaxLine, memSpool: memSpool, maxDataLine: maxDataLine}
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
	rcpts    []*rcpt

	spool   *spool
	msgSize int64 // message octets received (unstuffed, RFC 1870 section 4)
	// BDAT state (RFC 3030): chunks received, the stuffer turning them into
	// wire form, and whether a chunk failed (then only RSET helps).
	chunks      int
	stuff       *stuffer
	chunkFailed bool
}

// rcpt is one accepted recipient.
type rcpt struct {
	path   path
	user   string // the routing user given to the Director
	lease  *proxy.Lease
	result reply // the reply after DATA
}

// session is one client connection.
type session struct {
	srv  *Server
	sess *proxy.Session
	raw  net.Conn // the accepted connection, under any TLS layer
	r    *wire.Reader
	log  *slog.Logger
	out  []byte // replies not yet written (RFC 2920 section 3.2)

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
	c := &session{srv: s, sess: sess, raw: sess.Conn, log: log}
	c.r = wire.NewReaderContext(ctx, sess.Conn, s.o.IdleTimeout, s.maxLine)
	// A shutdown makes a blocked read return at once; usher then says 421.
	stop := wire.WatchContext(ctx, c.raw)
	defer stop()
	defer c.endTransaction()
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

// cmdRcpt is RFC 5321 section 4.1.1.3 RCPT: the Director places the user;
// the backend's verdict comes after DATA (see the package comment).
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
	t.rcpts = append(t.rcpts, &rcpt{path: to, user: user, lease: lease})
	return c.answer(replyRcptOK)
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
	c.reply(replyStartData)
	if err := c.flush(); err != nil {
		return c.writeFailed(ctx)
	}
	t.spool = newSpool(c.srv.o.SpoolDir, c.srv.memSpool)
	failure, err := c.readData(t)
	if err != nil {
		return c.readFailed(ctx, err)
	}
	c.finishMessage(ctx, failure)
	return ""
}

// readData reads the message after 354 up to the "." line (RFC 5321
// section 4.1.1.4) into the spool, keeping its dot-stuffing (section
// 4.5.2). A message over MaxMessageSize, an overlong line or a spool error
// is consumed to its end and returned as the recipients' reply; a read
// error ends the session.
func (c *session) readData(t *txn) (*reply, error) {
	r := c.r
	r.MaxLine, r.Timeout = c.srv.maxDataLine, c.srv.o.DataTimeout
	defer func() { r.MaxLine, r.Timeout = c.srv.maxLine, c.srv.o.IdleTimeout }()
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
		n := int64(len(line)) + 2
		if len(line) > 0 && line[0] == '.' {
			n-- // RFC 1870 section 4: the size does not count stuffing
		}
		t.msgSize += n
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
		t.spool = newSpool(c.srv.o.SpoolDir, c.srv.memSpool)
		t.stuff = &stuffer{sp: t.spool}
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
		if err := t.stuff.end(); err != nil {
			c.log.Error("spool", "error", err)
			failure = &replySpoolFailed
		}
	}
	c.finishMessage(ctx, failure)
	return ""
}

// readChunk reads n octets of a BDAT chunk into the spool, in wire form.
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
		if err := t.stuff.write(b); err != nil {
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
	c.r = wire.NewReaderContext(ctx, tc, c.srv.o.IdleTimeout, c.srv.maxLine)
	return ""
}

// endTransaction releases the transaction's leases and spool.
func (c *session) endTransaction() {
	t := c.tx
	if t == nil {
		return
	}
	c.tx = nil
	for _, rc := range t.rcpts {
		rc.lease.Release()
	}
	if t.spool != nil {
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

// flush writes the queued replies with a deadline.
func (c *session) flush() error {
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
