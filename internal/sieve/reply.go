package sieve

import (
	"context"
	"errors"
	"io"
	"net"
	"os"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// Errors of the pre-login state machine. Each is answered by replyFor, the
// one place that maps errors to ManageSieve responses.
var (
	errUnknownCommand = errors.New("unknown command")
	errNeedAuth       = errors.New("command not allowed before login")
	errArgs           = errors.New("invalid arguments")
	errPrivacy        = errors.New("plaintext authentication disallowed without TLS")
	errMechanism      = errors.New("unsupported authentication mechanism")
	errCanceled       = errors.New("authentication canceled by client")
	errBase64         = errors.New("invalid base64")
	errCredentials    = errors.New("malformed credentials")
	errTLSActive      = errors.New("TLS already active")
	errNoTLS          = errors.New("STARTTLS not available")
	errTLSPipelined   = errors.New("data pipelined after STARTTLS")
	errTLSHandshake   = errors.New("TLS handshake failed")
	errUnavailable    = errors.New("backend unavailable")
	errTooManyBad     = errors.New("too many invalid commands")
	errTooManyFails   = errors.New("too many failed logins")
	errIdle           = errors.New("idle timeout")
	errShutdown       = errors.New("server shutting down")
	errLoginTimeout   = errors.New("login timed out")
	errClientGone     = errors.New("client closed")
	errClientWrite    = errors.New("client write failed")
)

// sessionEnd is returned by a command handler whose command ended the
// session without an error reply (LOGOUT, or a login that was spliced).
type sessionEnd struct{ reason string }

func (e *sessionEnd) Error() string { return "session ended: " + e.reason }

// reply is the ManageSieve response to an error (RFC 5804 section 1.3:
// response-oknobye).
type reply struct {
	status string // "NO" or "BYE"; "" sends nothing
	code   string // response code without parentheses (RFC 5804 section 1.3)
	text   string
	bad    bool   // counts toward maxBadCommands
	close  bool   // end the session after replying
	reason string // the session's end reason when close is set
}

// replyFor maps an error of the pre-login state machine to its response.
// ManageSieve has no tags and no BAD: a failed command gets NO, and BYE
// precedes a close by the server (RFC 5804 section 1.3).
func replyFor(err error) reply {
	switch {
	case errors.Is(err, errNoName):
		return reply{status: "NO", text: "Missing command", bad: true}
	case errors.Is(err, errSyntax), errors.Is(err, errArgs):
		return reply{status: "NO", text: "Invalid command syntax", bad: true}
	case errors.Is(err, errUnknownCommand):
		return reply{status: "NO", text: "Unknown command", bad: true}
	case errors.Is(err, errNeedAuth):
		return reply{status: "NO", text: "Authenticate first", bad: true}
	case errors.Is(err, errLitLimit):
		// The octets of the literal are on their way (there is no
		// continuation in ManageSieve): the stream cannot be resynchronized.
		return reply{status: "BYE", text: "Literal too big", close: true, reason: "literal too big"}
	case errors.Is(err, wire.ErrLineTooLong):
		return reply{status: "NO", text: "Line too long", bad: true}
	case errors.Is(err, wire.ErrTooMuch):
		return reply{status: "BYE", text: "Line too long", close: true, reason: "line flood"}
	case errors.Is(err, errPrivacy):
		// RFC 5804 section 1.3: ENCRYPT-NEEDED, "a SASL mechanism that
		// requires an encrypted connection".
		return reply{status: "NO", code: "ENCRYPT-NEEDED", text: "Plaintext authentication disallowed without TLS"}
	case errors.Is(err, errMechanism):
		return reply{status: "NO", text: "Unsupported authentication mechanism"}
	case errors.Is(err, errCanceled):
		// RFC 5804 section 2.1: a canceled exchange is answered with NO.
		return reply{status: "NO", text: "Authentication canceled"}
	case errors.Is(err, errBase64):
		return reply{status: "NO", text: "Invalid base64 data", bad: true}
	case errors.Is(err, errCredentials):
		return reply{status: "NO", text: "Authentication failed"}
	case errors.Is(err, errTLSActive):
		return reply{status: "NO", text: "TLS is already active", bad: true}
	case errors.Is(err, errNoTLS):
		return reply{status: "NO", text: "STARTTLS not available", bad: true}
	case errors.Is(err, errTLSPipelined):
		// CVE-2011-0411 pattern: plaintext injected behind STARTTLS would be
		// taken as sent over TLS; refuse and disconnect.
		return reply{status: "BYE", text: "STARTTLS must be the last command sent before TLS", close: true, reason: "starttls pipelining"}
	case errors.Is(err, errTLSHandshake):
		return reply{close: true, reason: "tls handshake failed"}
	case errors.Is(err, errUnavailable):
		// RFC 5804 section 1.3: TRYLATER, a temporary failure.
		return reply{status: "NO", code: "TRYLATER", text: "Backend unavailable"}
	case errors.Is(err, errTooManyBad):
		return reply{status: "BYE", text: "Too many invalid commands", close: true, reason: "too many invalid commands"}
	case errors.Is(err, errTooManyFails):
		return reply{status: "BYE", text: "Too many failed logins", close: true, reason: "too many failed logins"}
	case errors.Is(err, errLoginTimeout):
		return reply{status: "BYE", text: "Login timed out", close: true, reason: "login timeout"}
	case errors.Is(err, errShutdown), errors.Is(err, context.Canceled):
		// Dovecot answers a shutdown with BYE (TRYLATER).
		return reply{status: "BYE", code: "TRYLATER", text: "Server shutting down", close: true, reason: "shutdown"}
	case errors.Is(err, errIdle), errors.Is(err, os.ErrDeadlineExceeded):
		return reply{status: "BYE", text: "Disconnected for inactivity.", close: true, reason: "idle timeout"}
	case errors.Is(err, errClientWrite):
		return reply{close: true, reason: "client write failed"}
	case errors.Is(err, errClientGone), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrClosedPipe):
		return reply{close: true, reason: "client closed"}
	}
	var end *sessionEnd
	if errors.As(err, &end) {
		return reply{close: true, reason: end.reason}
	}
	// A read error not listed above (connection reset, ...).
	return reply{close: true, reason: "client read failed"}
}

// format renders r as one response line, without CRLF (RFC 5804 section 4:
// response-oknobye = ("OK" / "NO" / "BYE") [SP "(" resp-code ")"] [SP string]).
func (r reply) format() string {
	b := []byte(r.status)
	if r.code != "" {
		b = append(b, " ("...)
		b = append(b, r.code...)
		b = append(b, ')')
	}
	b = append(b, ' ')
	return string(wire.AppendQuoted(b, r.text))
}

// shutdownErr is the error for a session whose context ended: the server
// shuts down, or the client did not log in in time.
func shutdownErr(ctx context.Context) error {
	if proxy.LoginTimedOut(ctx) {
		return errLoginTimeout
	}
	return errShutdown
}
