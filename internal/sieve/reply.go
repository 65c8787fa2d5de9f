package sieve

import (
	"context"
	"errors"
	"os"

	"github.com/usher-mail/usher/internal/prelogin"
	"github.com/usher-mail/usher/internal/wire"
)

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
	case errors.Is(err, errSyntax), errors.Is(err, prelogin.ErrArgs):
		return reply{status: "NO", text: "Invalid command syntax", bad: true}
	case errors.Is(err, prelogin.ErrUnknownCommand):
		return reply{status: "NO", text: "Unknown command", bad: true}
	case errors.Is(err, prelogin.ErrNeedAuth):
		return reply{status: "NO", text: "Authenticate first", bad: true}
	case errors.Is(err, errLitLimit):
		// The octets of the literal are on their way (there is no
		// continuation in ManageSieve): the stream cannot be resynchronized.
		return reply{status: "BYE", text: "Literal too big", close: true, reason: "literal too big"}
	case errors.Is(err, wire.ErrLineTooLong):
		return reply{status: "NO", text: "Line too long", bad: true}
	case errors.Is(err, wire.ErrTooMuch):
		return reply{status: "BYE", text: "Line too long", close: true, reason: "line flood"}
	case errors.Is(err, prelogin.ErrPrivacy):
		// RFC 5804 section 1.3: ENCRYPT-NEEDED, "a SASL mechanism that
		// requires an encrypted connection".
		return reply{status: "NO", code: "ENCRYPT-NEEDED", text: "Plaintext authentication disallowed without TLS"}
	case errors.Is(err, prelogin.ErrMechanism):
		return reply{status: "NO", text: "Unsupported authentication mechanism"}
	case errors.Is(err, prelogin.ErrCanceled):
		// RFC 5804 section 2.1: a canceled exchange is answered with NO.
		return reply{status: "NO", text: "Authentication canceled"}
	case errors.Is(err, prelogin.ErrBase64):
		return reply{status: "NO", text: "Invalid base64 data", bad: true}
	case errors.Is(err, prelogin.ErrCredentials):
		return reply{status: "NO", text: "Authentication failed"}
	case errors.Is(err, prelogin.ErrTLSActive):
		return reply{status: "NO", text: "TLS is already active", bad: true}
	case errors.Is(err, prelogin.ErrNoTLS):
		return reply{status: "NO", text: "STARTTLS not available", bad: true}
	case errors.Is(err, prelogin.ErrTLSPipelined):
		// CVE-2011-0411 pattern: plaintext injected behind STARTTLS would be
		// taken as sent over TLS; refuse and disconnect.
		return reply{status: "BYE", text: "STARTTLS must be the last command sent before TLS", close: true, reason: "starttls pipelining"}
	case errors.Is(err, prelogin.ErrTLSHandshake):
		return reply{close: true, reason: "tls handshake failed"}
	case errors.Is(err, prelogin.ErrUnavailable):
		// RFC 5804 section 1.3: TRYLATER, a temporary failure.
		return reply{status: "NO", code: "TRYLATER", text: "Backend unavailable"}
	case errors.Is(err, prelogin.ErrTooManyBad):
		return reply{status: "BYE", text: "Too many invalid commands", close: true, reason: "too many invalid commands"}
	case errors.Is(err, prelogin.ErrTooManyFails):
		return reply{status: "BYE", text: "Too many failed logins", close: true, reason: "too many failed logins"}
	case errors.Is(err, prelogin.ErrLoginTimeout):
		return reply{status: "BYE", text: "Login timed out", close: true, reason: "login timeout"}
	case errors.Is(err, prelogin.ErrShutdown), errors.Is(err, context.Canceled):
		// Dovecot answers a shutdown with BYE (TRYLATER).
		return reply{status: "BYE", code: "TRYLATER", text: "Server shutting down", close: true, reason: "shutdown"}
	case errors.Is(err, prelogin.ErrIdle), errors.Is(err, os.ErrDeadlineExceeded):
		return reply{status: "BYE", text: "Disconnected for inactivity.", close: true, reason: "idle timeout"}
	}
	// The session ends without a reply: the client is gone, or a command
	// ended it.
	return reply{close: true, reason: prelogin.EndReason(err)}
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
