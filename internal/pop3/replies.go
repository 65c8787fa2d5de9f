package pop3

import (
	"errors"
	"log/slog"

	"github.com/usher-mail/usher/internal/proxy"
)

// Replies usher itself sends before login. Response codes in brackets are
// RFC 2449 section 8 extended response codes; SYS/TEMP and AUTH are
// RFC 3206: SYS/TEMP says the failure is temporary and the client should try
// again later without blaming the user's credentials, AUTH says the
// credentials (or the way they were offered) are the problem.
const (
	replyGreeting     = "+OK usher ready."
	replyOK           = "+OK"
	replyLogout       = "+OK Logging out."
	replyBeginTLS     = "+OK Begin TLS negotiation now."
	replyCapa         = "+OK Capability list follows"
	replyMechs        = "+OK Supported mechanisms follow"
	replyContinue     = "+ " // RFC 5034 section 4: empty server challenge
	replyUnknown      = "-ERR Unknown command."
	replyTooManyBad   = "-ERR Too many bad commands."
	replyTooMany      = "-ERR Too many commands without login."
	replyLineTooLong  = "-ERR Line too long."
	replyIdle         = "-ERR Disconnected for inactivity."
	replyNoUser       = "-ERR No user name given."
	replyEmptyUser    = "-ERR Empty user name."
	replyEmptyPass    = "-ERR Empty password."
	replyNoMech       = "-ERR Unsupported authentication mechanism."
	replyAuthAborted  = "-ERR Authentication aborted."
	replyBadBase64    = "-ERR Invalid base64 data."
	replyBadPlain     = "-ERR [AUTH] Invalid PLAIN authentication data."
	replyTLSActive    = "-ERR TLS is already active."
	replyTLSUnavail   = "-ERR TLS support isn't enabled."
	replySTLSPipeline = "-ERR Unexpected data after STLS."
	// RFC 2595 section 4 / RFC 3206 section 5: the credentials may not be sent
	// over this connection; the client has to STLS first.
	replyPlainDisallowed = "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
	replyUnavailable     = "-ERR [SYS/TEMP] No backend available, try again later."
	replyBackendFailed   = "-ERR [SYS/TEMP] Backend unavailable, try again later."
)

// loginRejected is a backend's negative answer to the credentials. Its line
// is relayed to the client as it is (it carries the backend's own response
// code, usually [AUTH] or [SYS/TEMP]), and the session stays in the
// AUTHORIZATION state.
type loginRejected struct{ reply string }

func (e *loginRejected) Error() string {
	return "backend rejected login: " + sanitize(e.reply)
}

// loginFailure maps an error of a login attempt to the client's reply, the
// log level and the result word for the log line. It is the only place where
// login errors become protocol replies.
func loginFailure(err error) (reply string, level slog.Level, result string) {
	var rej *loginRejected
	switch {
	case errors.As(err, &rej):
		return rej.reply, slog.LevelInfo, "rejected"
	case errors.Is(err, proxy.ErrUnavailable):
		return replyUnavailable, slog.LevelWarn, "unavailable"
	default:
		// Director errors other than ErrUnavailable, connect failures,
		// timeouts, TLS failures and protocol violations of the backend are
		// all temporary from the client's point of view.
		return replyBackendFailed, slog.LevelWarn, "backend failed"
	}
}

// sanitize makes a peer's line safe and short for an error or log message.
func sanitize(s string) string {
	const max = 160
	b := make([]byte, 0, min(len(s), max))
	for i := 0; i < len(s) && len(b) < max; i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f {
			c = '?'
		}
		b = append(b, c)
	}
	if len(s) > max {
		return string(b) + "..."
	}
	return string(b)
}
