package bench

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
)

// stepError is a failed protocol step. Its kind, "STEP:CLASS", is what the
// result counts errors by, e.g. "login:rejected" or "connect:refused".
type stepError struct {
	step string // connect, greeting, starttls, login, select, ...
	err  error
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

// stepErr wraps err as a failure of step (nil stays nil; an error that
// already names its step keeps it).
func stepErr(step string, err error) error {
	if err == nil {
		return nil
	}
	var se *stepError
	if errors.As(err, &se) {
		return err
	}
	return &stepError{step: step, err: err}
}

// rejectedError is a negative server reply (IMAP NO/BAD, POP3 -ERR, LMTP
// 4xx/5xx); line is the reply, cut to maxSampleLen.
type rejectedError struct{ line string }

func (e *rejectedError) Error() string { return "server said " + e.line }

// protocolError is a reply the client cannot make sense of.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

const maxSampleLen = 200

func rejected(line []byte) error {
	return &rejectedError{line: clip(string(line))}
}

func protoErr(format string, args ...any) error {
	return &protocolError{msg: clip(fmt.Sprintf(format, args...))}
}

func clip(s string) string {
	if len(s) > maxSampleLen {
		return s[:maxSampleLen] + "..."
	}
	return s
}

// errorKind classifies err as "STEP:CLASS"; CLASS is one of rejected,
// protocol, timeout, refused, closed, tls or error.
func errorKind(err error) string {
	step := "other"
	var se *stepError
	if errors.As(err, &se) {
		step = se.step
	}
	var (
		rej   *rejectedError
		perr  *protocolError
		nerr  net.Error
		terr  *tlsError
		class string
	)
	switch {
	case errors.As(err, &rej):
		class = "rejected"
	case errors.As(err, &perr):
		class = "protocol"
	case errors.As(err, &terr):
		class = "tls"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &nerr) && nerr.Timeout():
		class = "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		class = "refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		class = "closed"
	default:
		class = "error"
	}
	return step + ":" + class
}

// tlsError is a failed TLS handshake.
type tlsError struct{ err error }

func (e *tlsError) Error() string { return "TLS handshake: " + e.err.Error() }
func (e *tlsError) Unwrap() error { return e.err }
