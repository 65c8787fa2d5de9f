package imap

import (
	"context"
	"errors"
	"os"

	"github.com/usher-mail/usher/internal/prelogin"
	"github.com/usher-mail/usher/internal/wire"
)

// reply is the IMAP response to an error.
type reply struct {
	status string // "BAD", "NO", "BYE"; "" sends nothing
	code   string // response code (RFC 9051 section 7.1, RFC 5530), without brackets
	text   string
	close  bool   // end the session after replying
	reason string // the session's end reason when close is set
}

// replyFor maps an error of the pre-login state machine to its response. A
// BYE is always untagged; BAD without a known tag is untagged (RFC 9051
// section 7.1.3).
func replyFor(err error) reply {
	switch {
	case errors.Is(err, errBadTag):
		return reply{status: "BAD", text: "Missing or invalid tag"}
	case errors.Is(err, errNoName):
		return reply{status: "BAD", text: "Missing command"}
	case errors.Is(err, errSyntax), errors.Is(err, prelogin.ErrArgs):
		return reply{status: "BAD", text: "Invalid arguments"}
	case errors.Is(err, prelogin.ErrUnknownCommand):
		return reply{status: "BAD", text: "Unknown command"}
	case errors.Is(err, prelogin.ErrNeedAuth):
		// RFC 9051 section 6: a command in the wrong state is a protocol error.
		return reply{status: "BAD", text: "Command not allowed before login"}
	case errors.Is(err, errLitLimit):
		// RFC 7888 section 4 suggests TOOBIG for literals over a limit.
		return reply{status: "BAD", code: "TOOBIG", text: "Literal too big"}
	case errors.Is(err, errNonSyncLimit):
		return reply{status: "BYE", code: "TOOBIG", text: "Literal too big", close: true, reason: "literal too big"}
	case errors.Is(err, wire.ErrLineTooLong):
		return reply{status: "BAD", code: "TOOBIG", text: "Line too long"}
	case errors.Is(err, wire.ErrTooMuch):
		return reply{status: "BYE", code: "TOOBIG", text: "Line too long", close: true, reason: "line flood"}
	case errors.Is(err, prelogin.ErrPrivacy):
		// RFC 5530 section 3 / RFC 9051 section 6.2.3.
		return reply{status: "NO", code: "PRIVACYREQUIRED", text: "Plaintext authentication disallowed without TLS"}
	case errors.Is(err, prelogin.ErrMechanism):
		// RFC 9051 section 6.2.2: an unsupported mechanism gets a tagged NO.
		return reply{status: "NO", code: "CANNOT", text: "Unsupported authentication mechanism"}
	case errors.Is(err, prelogin.ErrCanceled):
		// RFC 9051 section 6.2.2: "*" cancels with a tagged BAD.
		return reply{status: "BAD", text: "Authentication canceled"}
	case errors.Is(err, prelogin.ErrBase64):
		// RFC 9051 section 6.2.2: invalid base64 gets a tagged BAD.
		return reply{status: "BAD", text: "Invalid base64 data"}
	case errors.Is(err, prelogin.ErrCredentials):
		return reply{status: "NO", code: "AUTHENTICATIONFAILED", text: "Authentication failed"}
	case errors.Is(err, prelogin.ErrTLSActive):
		return reply{status: "BAD", text: "TLS is already active"}
	case errors.Is(err, prelogin.ErrNoTLS):
		return reply{status: "BAD", text: "STARTTLS not available"}
	case errors.Is(err, prelogin.ErrTLSPipelined):
		// CVE-2011-0411 pattern: plaintext injected behind STARTTLS would be
		// taken as sent over TLS; refuse and disconnect.
		return reply{status: "BAD", text: "STARTTLS must be the last command sent before TLS", close: true, reason: "starttls pipelining"}
	case errors.Is(err, prelogin.ErrTLSHandshake):
		return reply{close: true, reason: "tls handshake failed"}
	case errors.Is(err, prelogin.ErrUnavailable):
		// RFC 5530 section 3: temporary failure, try again later.
		return reply{status: "NO", code: "UNAVAILABLE", text: "Backend unavailable, try again later"}
	case errors.Is(err, prelogin.ErrTooManyBad):
		return reply{status: "BYE", text: "Too many invalid commands", close: true, reason: "too many invalid commands"}
	case errors.Is(err, prelogin.ErrTooManyFails):
		return reply{status: "BYE", text: "Too many failed logins", close: true, reason: "too many failed logins"}
	case errors.Is(err, prelogin.ErrLoginTimeout):
		return reply{status: "BYE", text: "Login timed out", close: true, reason: "login timeout"}
	case errors.Is(err, prelogin.ErrShutdown), errors.Is(err, context.Canceled):
		return reply{status: "BYE", code: "UNAVAILABLE", text: "Server shutting down", close: true, reason: "shutdown"}
	case errors.Is(err, prelogin.ErrIdle), errors.Is(err, os.ErrDeadlineExceeded):
		// RFC 9051 section 7.1.5 (BYE) example text.
		return reply{status: "BYE", text: "Autologout; idle for too long", close: true, reason: "idle timeout"}
	}
	// The session ends without a reply: the client is gone, or a command
	// ended it.
	return reply{close: true, reason: prelogin.EndReason(err)}
}

// format renders r as one response line (without CRLF) for tag ("" when the
// command's tag is unknown).
func (r reply) format(tag string) string {
	if r.status == "BYE" || tag == "" {
		tag = "*"
	}
	s := tag + " " + r.status + " "
	if r.code != "" {
		s += "[" + r.code + "] "
	}
	return s + r.text
}
