// Package wire reads line-oriented mail protocols (IMAP, POP3, LMTP,
// ManageSieve) from untrusted peers with hard bounds.
//
// Invariants: every read sets a deadline on the connection first (when the
// Reader has one); no read buffers more than MaxLine bytes of one line or more
// than the caller's cap of one literal; an overlong line is consumed and
// reported as ErrLineTooLong so the caller can answer with a protocol error
// and carry on, while a peer that keeps streaming without a line end gets
// ErrTooMuch and should be disconnected.
//
// Beyond lines and literals, wire holds what the line protocols share above
// them: the IMAP string syntax (frames of lines and literals, tokens, quoted
// strings) that IMAP and ManageSieve both use (imapstr.go), and the
// cancellation of blocked reads when a session is shut down (cancel.go).
// Invariants there: a frame never exceeds its FrameLimits, a literal over
// them is refused before a continuation request is sent, and once a
// session's context has ended no read deadline can be set in the future.
package wire

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// DefaultMaxLine is the longest line accepted before login: 8 KiB.
const DefaultMaxLine = 8192

var (
	// ErrLineTooLong reports a line longer than MaxLine; the line was consumed.
	ErrLineTooLong = errors.New("line too long")
	// ErrTooMuch reports a peer that sent far too many bytes without a line end.
	ErrTooMuch = errors.New("too much data without a line end")
)

// Reader reads bounded lines and literals from a connection.
type Reader struct {
	conn    net.Conn // for deadlines; nil disables them
	br      *bufio.Reader
	Timeout time.Duration // per read; 0 disables deadlines
	MaxLine int           // longest line, without CRLF
}

// NewReader returns a Reader on conn. Its buffer holds at most one line.
func NewReader(conn net.Conn, timeout time.Duration, maxLine int) *Reader {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	return &Reader{conn: conn, br: bufio.NewReaderSize(conn, 4096), Timeout: timeout, MaxLine: maxLine}
}

// NewReaderFrom returns a Reader over any io.Reader (tests, fuzzing); it sets no deadlines.
func NewReaderFrom(r io.Reader, maxLine int) *Reader {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	return &Reader{br: bufio.NewReaderSize(r, 4096), MaxLine: maxLine}
}

func (r *Reader) deadline() error {
	if r.conn == nil || r.Timeout <= 0 {
		return nil
	}
	return r.conn.SetReadDeadline(time.Now().Add(r.Timeout))
}

// Buffered reports how many bytes were read from the connection but not yet
// returned. After a STARTTLS command it must be 0, or the peer injected
// plaintext that would be taken as sent over TLS (CVE-2011-0411 pattern).
func (r *Reader) Buffered() int {
	if r.br == nil {
		return 0
	}
	return r.br.Buffered()
}

// Pending returns the bytes buffered but not yet returned, so they can be
// forwarded when the connection is spliced, and ends the Reader: its buffer
// is let go (an idle spliced session should not keep it), and later reads
// fail with ErrDetached.
func (r *Reader) Pending() []byte {
	if r.br == nil {
		return nil
	}
	n := r.br.Buffered()
	var b []byte
	if n > 0 {
		b = make([]byte, n)
		_, _ = io.ReadFull(r.br, b)
	}
	r.br = nil
	return b
}

// ErrDetached is returned by reads after Pending handed the connection over.
var ErrDetached = errors.New("reader detached: the connection was handed over")

// ReadLine returns the next line without its CRLF (a bare LF is accepted too).
// The returned slice is only valid until the next read.
func (r *Reader) ReadLine() ([]byte, error) {
	if r.br == nil {
		return nil, ErrDetached
	}
	var long []byte // only used when a line spans bufio's buffer
	total := 0      // bytes of this line so far, line end included
	prevCR := false // the previous chunk ended in CR
	for {
		if err := r.deadline(); err != nil {
			return nil, fmt.Errorf("set read deadline: %w", err)
		}
		chunk, err := r.br.ReadSlice('\n')
		total += len(chunk)
		if err == nil {
			eol := 1
			if (len(chunk) >= 2 && chunk[len(chunk)-2] == '\r') || (len(chunk) == 1 && prevCR) {
				eol = 2
			}
			if total-eol > r.MaxLine {
				return nil, ErrLineTooLong
			}
			if long != nil {
				chunk = append(long, chunk...)
			}
			return trimEOL(chunk), nil
		}
		if err != bufio.ErrBufferFull {
			if err == io.EOF && total > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		prevCR = chunk[len(chunk)-1] == '\r'
		if total > r.MaxLine+1 {
			// Keep discarding until the line ends, within a bound.
			if total > 64*r.MaxLine {
				return nil, ErrTooMuch
			}
			long = nil
			continue
		}
		long = append(long, chunk...)
	}
}

// ReadLiteral reads exactly n bytes (an IMAP or ManageSieve literal). The
// caller checks n against its own cap before calling. One deadline covers
// the whole literal, so a peer dripping bytes cannot stretch it.
func (r *Reader) ReadLiteral(n int) ([]byte, error) {
	if n < 0 {
		return nil, fmt.Errorf("read literal: negative length %d", n)
	}
	if r.br == nil {
		return nil, ErrDetached
	}
	if err := r.deadline(); err != nil {
		return nil, fmt.Errorf("set read deadline: %w", err)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r.br, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

func trimEOL(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
	}
	if n := len(b); n > 0 && b[n-1] == '\r' {
		b = b[:n-1]
	}
	return b
}
