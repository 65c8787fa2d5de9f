// Package prelogin holds what the pre-login state machines of IMAP and
// ManageSieve share: the errors a session can fail or end with before it is
// spliced, and the end reason of those that get no reply (EndReason). Each
// protocol maps them to its own responses in one place (its replyFor); this
// package says nothing about wire formats.
package prelogin

import (
	"context"
	"errors"
	"io"
	"net"

	"github.com/usher-mail/usher/internal/proxy"
)

// Errors of a pre-login state machine.
var (
	ErrUnknownCommand = errors.New("unknown command")
	ErrNeedAuth       = errors.New("command not allowed before login")
	ErrArgs           = errors.New("invalid arguments")
	ErrPrivacy        = errors.New("plaintext authentication disallowed without TLS")
	ErrMechanism      = errors.New("unsupported authentication mechanism")
	ErrCanceled       = errors.New("authentication canceled by client")
	ErrBase64         = errors.New("invalid base64")
	ErrCredentials    = errors.New("malformed credentials")
	ErrTLSActive      = errors.New("TLS already active")
	ErrNoTLS          = errors.New("STARTTLS not available")
	ErrTLSPipelined   = errors.New("data pipelined after STARTTLS")
	ErrTLSHandshake   = errors.New("TLS handshake failed")
	ErrUnavailable    = errors.New("backend unavailable")
	ErrTooManyBad     = errors.New("too many invalid commands")
	ErrTooManyFails   = errors.New("too many failed logins")
	ErrIdle           = errors.New("idle timeout")
	ErrShutdown       = errors.New("server shutting down")
	ErrLoginTimeout   = errors.New("login timed out")
	ErrClientGone     = errors.New("client closed")
	ErrClientWrite    = errors.New("client write failed")
)

// SessionEnd is returned by a command handler whose command ended the
// session without an error reply (LOGOUT, or a login that was spliced).
type SessionEnd struct{ Reason string }

func (e *SessionEnd) Error() string { return "session ended: " + e.Reason }

// ShutdownErr is the error for a session whose context ended: the server
// shuts down, or the client did not log in in time.
func ShutdownErr(ctx context.Context) error {
	if proxy.LoginTimedOut(ctx) {
		return ErrLoginTimeout
	}
	return ErrShutdown
}

// EndReason is the end reason of a session whose error gets no reply: the
// client went away (ErrClientGone, end of file, a closed connection), a
// write to it failed (ErrClientWrite), or a command ended the session
// (SessionEnd, whose Reason it is); any other error is a failed read
// (connection reset, ...). Each protocol's replyFor calls it after the errors
// it answers.
func EndReason(err error) string {
	var end *SessionEnd
	switch {
	case errors.Is(err, ErrClientWrite):
		return "client write failed"
	case errors.Is(err, ErrClientGone), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrClosedPipe):
		return "client closed"
	case errors.As(err, &end):
		return end.Reason
	}
	return "client read failed"
}
