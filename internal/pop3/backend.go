package pop3

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/wire"
	"github.com/usher-mail/usher/internal/xclient"
)

const (
	// maxCommandLine is RFC 2449 section 4's limit on a command line
	// including CRLF; RFC 5034 section 4 says an AUTH whose initial response
	// would exceed it goes without one and answers the "+ " challenge.
	maxCommandLine = 255
	// maxCapaLines bounds a backend's CAPA listing.
	maxCapaLines = 256
)

var errProtocol = errors.New("unexpected reply")

// backend is the backend connection during login.
type backend struct {
	conn net.Conn
	tcp  net.Conn // the TCP connection under any TLS layer
	r    *wire.Reader
}

// send writes one command line. The connection's deadline covers it.
func (b *backend) send(line string) error {
	_, err := b.conn.Write([]byte(line + "\r\n"))
	return err
}

// readLine reads one reply line; the connection's absolute login deadline
// bounds the wait.
func (b *backend) readLine() (string, error) {
	line, err := b.r.ReadLine()
	if err != nil {
		return "", err
	}
	return string(line), nil
}

// cmd sends one command and returns the first line of the reply.
func (b *backend) cmd(line string) (string, error) {
	if err := b.send(line); err != nil {
		return "", err
	}
	return b.readLine()
}

// exchange sends lines in one write (pipelining) and returns the first
// line of each reply, in order. Only for commands with one-line replies.
func (b *backend) exchange(lines ...string) ([]string, error) {
	var out []byte
	for _, l := range lines {
		out = append(append(out, l...), "\r\n"...)
	}
	if _, err := b.conn.Write(out); err != nil {
		return nil, err
	}
	replies := make([]string, len(lines))
	for i := range replies {
		r, err := b.readLine()
		if err != nil {
			return nil, err
		}
		replies[i] = r
		if i < len(replies)-1 {
			// The next reply may come only after authentication; do not
			// let it wait for a delayed ACK of this one (see proxy.AckNow).
			proxy.AckNow(b.tcp)
		}
	}
	return replies, nil
}

// capa returns whether the backend lists XCLIENT and PIPELINING in its CAPA
// reply (RFC 2449 section 5). A backend without CAPA answers -ERR, which
// means no capabilities.
func (b *backend) capa() (xclient, pipelining bool, err error) {
	reply, err := b.cmd("CAPA")
	if err != nil {
		return false, false, err
	}
	if isERR(reply) {
		return false, false, nil
	}
	if !isOK(reply) {
		return false, false, fmt.Errorf("%w %q", errProtocol, sanitize(reply))
	}
	for n := 0; ; n++ {
		if n > maxCapaLines {
			return false, false, fmt.Errorf("more than %d capability lines", maxCapaLines)
		}
		line, err := b.readLine()
		if err != nil {
			return false, false, err
		}
		if line == "." { // RFC 1939 section 3: end of a multi-line response
			return xclient, pipelining, nil
		}
		if f := strings.Fields(line); len(f) > 0 {
			switch strings.ToUpper(f[0]) {
			case "XCLIENT":
				xclient = true
			case "PIPELINING": // RFC 2449 section 6.6
				pipelining = true
			}
		}
	}
}

func isOK(line string) bool  { return line == "+OK" || strings.HasPrefix(line, "+OK ") }
func isERR(line string) bool { return line == "-ERR" || strings.HasPrefix(line, "-ERR ") }

// greetingXCLIENT reports a Dovecot greeting "+OK [XCLIENT] ...": Dovecot's
// pop3-login announces XCLIENT there (not in CAPA) when the peer is in its
// login_trusted_networks, to save the CAPA round trip.
func greetingXCLIENT(greeting string) bool {
	const code = "[XCLIENT]"
	rest, ok := strings.CutPrefix(greeting, "+OK ")
	return ok && len(rest) >= len(code) && strings.EqualFold(rest[:len(code)], code)
}

// xclientLine builds Dovecot's XCLIENT command (pop3-login cmd_xclient: ADDR,
// PORT, SESSION, TTL, values as they are, a session ID of printable ASCII),
// so the backend logs and rate-limits the real client instead of the
// director, and ties its log lines to usher's session ID.
func xclientLine(sess *proxy.Session) string {
	a := xclient.For(sess.Remote, sess.ID, xclient.Printable)
	return xclient.Line([]xclient.Attr{a.Addr, a.Port, a.Session, a.TTL}, nil)
}

// backendLogin connects to the backend at ip and replays the client's login.
// On success it returns the connection, its reader (which may hold bytes
// the backend sent after its answer) and the backend's +OK line; the caller
// owns the connection. On failure the connection is closed; a
// *loginRejected error carries the backend's -ERR line for the client.
//
// The sequence follows Dovecot's own POP3 proxy: greeting, STLS when
// configured (RFC 2595 section 4), XCLIENT when advertised, then USER/PASS
// (RFC 1939 section 7) or AUTH PLAIN (RFC 5034).
func (s *Server) backendLogin(ctx context.Context, sess *proxy.Session, ip netip.Addr, cr *credentials) (
	_ net.Conn, _ *wire.Reader, okLine string, err error) {
	deadline := time.Now().Add(s.loginTimeout())
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	raw, err := s.o.Backend.DialFor(dctx, ip, sess)
	if err != nil {
		return nil, nil, "", err // Dial names the operation and address
	}
	// A shutdown during login closes the connection, which ends any read.
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()
	b := &backend{conn: raw, tcp: raw, r: wire.NewReader(raw, 0, wire.DefaultMaxLine)}
	defer func() {
		if err != nil {
			b.conn.Close()
		}
	}()
	// One absolute deadline for the whole login (reads and writes); the
	// reader sets none of its own (timeout 0).
	if err := raw.SetDeadline(deadline); err != nil {
		return nil, nil, "", fmt.Errorf("backend %s: set deadline: %w", ip, err)
	}

	greeting, err := b.readLine()
	if err != nil {
		return nil, nil, "", fmt.Errorf("backend greeting: %w", err)
	}
	if !isOK(greeting) {
		return nil, nil, "", fmt.Errorf("backend greeting: %w %q", errProtocol, sanitize(greeting))
	}
	xclient := greetingXCLIENT(greeting)

	if s.o.Backend.TLS == config.TLSStartTLS {
		reply, err := b.cmd("STLS")
		if err != nil {
			return nil, nil, "", fmt.Errorf("backend STLS: %w", err)
		}
		if !isOK(reply) {
			return nil, nil, "", fmt.Errorf("backend STLS: %w %q", errProtocol, sanitize(reply))
		}
		if b.r.Buffered() > 0 {
			// Bytes after the +OK would be taken as sent over TLS.
			return nil, nil, "", fmt.Errorf("backend STLS: %w: data after +OK", errProtocol)
		}
		tc := s.o.Backend.ClientTLS(raw, ip)
		if err := tc.HandshakeContext(dctx); err != nil {
			return nil, nil, "", fmt.Errorf("backend STLS handshake: %w", err)
		}
		b.conn, b.r = tc, wire.NewReader(tc, 0, wire.DefaultMaxLine)
	}

	// Dovecot, which announces XCLIENT in its greeting, takes pipelined
	// commands; others say so in CAPA.
	pipelining := xclient
	if !xclient {
		// Other servers may list XCLIENT in CAPA; a Dovecot that does not
		// trust usher announces nothing, and then the backend sees usher's
		// address as the client's.
		if xclient, pipelining, err = b.capa(); err != nil {
			return nil, nil, "", fmt.Errorf("backend CAPA: %w", err)
		}
	}
	var reply string
	if pipelining {
		reply, err = b.pipelinedLogin(sess, xclient, cr)
	} else {
		reply, err = b.lockstepLogin(sess, xclient, cr)
	}
	if err != nil {
		return nil, nil, "", err
	}
	return b.conn, b.r, reply, nil
}

// lockstepLogin sends XCLIENT (when announced) and the login one command at
// a time.
func (b *backend) lockstepLogin(sess *proxy.Session, xclient bool, cr *credentials) (string, error) {
	if xclient {
		reply, err := b.cmd(xclientLine(sess))
		if err != nil {
			return "", fmt.Errorf("backend XCLIENT: %w", err)
		}
		if err := xclientReply(reply); err != nil {
			return "", err
		}
	}
	var reply string
	var err error
	if cr.isPlain() {
		reply, err = b.authPlain(cr.plain)
	} else {
		reply, err = b.userPass(cr)
	}
	if err != nil {
		return "", fmt.Errorf("backend login: %w", err)
	}
	return reply, nil
}

// pipelinedLogin sends XCLIENT (when announced) and the login in one write
// (RFC 2449 section 6.6), which saves two round trips per login. An AUTH
// PLAIN whose initial response does not fit on a line needs the server's
// challenge and goes in lockstep after XCLIENT.
func (b *backend) pipelinedLogin(sess *proxy.Session, xclient bool, cr *credentials) (string, error) {
	var cmds []string
	if xclient {
		cmds = append(cmds, xclientLine(sess))
	}
	switch {
	case !cr.isPlain():
		cmds = append(cmds, "USER "+cr.user, "PASS "+cr.pass)
	default:
		if line := "AUTH PLAIN " + sasl.EncodeResponse(cr.plain); len(line)+2 <= maxCommandLine {
			cmds = append(cmds, line)
		} else if !xclient {
			return b.lockstepLogin(sess, false, cr)
		}
	}
	replies, err := b.exchange(cmds...)
	if err != nil {
		return "", fmt.Errorf("backend login: %w", err)
	}
	if xclient {
		if err := xclientReply(replies[0]); err != nil {
			return "", err
		}
		replies = replies[1:]
	}
	switch len(replies) {
	case 0: // a long AUTH PLAIN response: lockstep after XCLIENT
		return b.lockstepLogin(sess, false, cr)
	case 1: // AUTH PLAIN with its initial response
		return plainReply(replies[0])
	}
	if !isOK(replies[0]) {
		return finalReply(replies[0]) // an -ERR to USER is a rejection too
	}
	return finalReply(replies[1])
}

func xclientReply(reply string) error {
	if !isOK(reply) {
		return fmt.Errorf("backend XCLIENT: %w %q", errProtocol, sanitize(reply))
	}
	return nil
}

// finalReply classifies the backend's answer to the credentials.
func finalReply(reply string) (string, error) {
	switch {
	case isOK(reply):
		return reply, nil
	case isERR(reply):
		return "", &loginRejected{reply: reply}
	default:
		return "", fmt.Errorf("%w %q", errProtocol, sanitize(reply))
	}
}

// userPass replays USER and PASS (RFC 1939 section 7). Errors never contain
// the commands sent.
func (b *backend) userPass(cr *credentials) (string, error) {
	reply, err := b.cmd("USER " + cr.user)
	if err != nil {
		return "", err
	}
	if !isOK(reply) {
		return finalReply(reply) // an -ERR to USER is a rejection too
	}
	reply, err = b.cmd("PASS " + cr.pass)
	if err != nil {
		return "", err
	}
	return finalReply(reply)
}

// authPlain replays AUTH PLAIN (RFC 5034 section 4) with an initial
// response, unless that would make the line longer than 255 octets, in which
// case the response follows the server's empty challenge.
func (b *backend) authPlain(msg []byte) (string, error) {
	resp := sasl.EncodeResponse(msg)
	line := "AUTH PLAIN " + resp
	var reply string
	var err error
	if len(line)+2 <= maxCommandLine {
		reply, err = b.cmd(line)
	} else {
		reply, err = b.cmd("AUTH PLAIN")
		if err != nil {
			return "", err
		}
		if reply != "+" && !strings.HasPrefix(reply, "+ ") {
			return finalReply(reply)
		}
		reply, err = b.cmd(resp)
	}
	if err != nil {
		return "", err
	}
	return plainReply(reply)
}

// plainReply classifies the answer to a complete AUTH PLAIN response.
func plainReply(reply string) (string, error) {
	if reply == "+" || strings.HasPrefix(reply, "+ ") {
		// PLAIN is one message; a further challenge is a protocol error.
		return "", fmt.Errorf("%w: challenge after PLAIN response", errProtocol)
	}
	return finalReply(reply)
}
