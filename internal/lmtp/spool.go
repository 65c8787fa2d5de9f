package lmtp

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
)

// Spool sizes.
const (
	// memSpool is how much of a message is kept in memory; a longer
	// message moves to a temporary file.
	memSpool = 1 << 20
	// fileBuffer is the write buffer in front of a spool file.
	fileBuffer = 64 << 10
	// spoolPattern names spool files (os.CreateTemp: mode 0600).
	spoolPattern = "usher-lmtp-*.msg"
	// spoolKeep is the largest spool memory a session keeps for its next
	// message.
	spoolKeep = 64 << 10
)

// spool holds one message as delivered: without dot-stuffing (RFC 5321
// section 4.5.2 undone), every line ended by CRLF, the last one too. So it
// goes to a backend after "BDAT <size> LAST" (RFC 3030) as it is, and after
// DATA through a dotStuffer. It lives in memory up to memMax bytes and then
// in a temporary file in dir, which close removes. The message is stored
// once; every backend reads it through its own reader.
type spool struct {
	dir    string
	memMax int

	buf  []byte
	f    *os.File
	w    *bufio.Writer
	size int64 // bytes stored
	err  error // the first write error; later writes are dropped
}

func newSpool(dir string, memMax int) *spool {
	return &spool{dir: dir, memMax: memMax}
}

// write appends p; after an error it keeps returning that error.
func (s *spool) write(p []byte) error {
	if s.err != nil {
		return s.err
	}
	if s.f == nil && len(s.buf)+len(p) <= s.memMax {
		s.buf = append(s.buf, p...)
		s.size += int64(len(p))
		return nil
	}
	if s.f == nil {
		if err := s.toFile(); err != nil {
			s.err = err
			return err
		}
	}
	if _, err := s.w.Write(p); err != nil {
		s.err = fmt.Errorf("write spool file: %w", err)
		return s.err
	}
	s.size += int64(len(p))
	return nil
}

// writeLine appends one line and its CRLF.
func (s *spool) writeLine(line []byte) error {
	if s.err == nil && s.f == nil && len(s.buf)+len(line)+2 <= s.memMax {
		s.buf = append(append(s.buf, line...), '\r', '\n')
		s.size += int64(len(line)) + 2
		return nil
	}
	if err := s.write(line); err != nil {
		return err
	}
	return s.write(crlf)
}

var crlf = []byte("\r\n")

// toFile moves the in-memory part to a new temporary file.
func (s *spool) toFile() error {
	f, err := os.CreateTemp(s.dir, spoolPattern)
	if err != nil {
		return fmt.Errorf("create spool file: %w", err)
	}
	s.f, s.w = f, bufio.NewWriterSize(f, fileBuffer)
	if _, err := s.w.Write(s.buf); err != nil {
		return fmt.Errorf("write spool file: %w", err)
	}
	s.buf = nil
	return nil
}

// finish flushes the file buffer; the spool is then ready to be read.
func (s *spool) finish() error {
	if s.err != nil {
		return s.err
	}
	if s.w != nil {
		if err := s.w.Flush(); err != nil {
			s.err = fmt.Errorf("flush spool file: %w", err)
			return s.err
		}
	}
	return nil
}

// reader returns an independent reader over the stored message; several
// may be used at once (ReadAt on the file is safe for concurrent use).
func (s *spool) reader() io.Reader {
	if s.f != nil {
		return io.NewSectionReader(s.f, 0, s.size)
	}
	return bytes.NewReader(s.buf)
}

// close drops the message and removes the spool file.
func (s *spool) close() error {
	s.buf = nil
	if s.f == nil {
		return nil
	}
	name := s.f.Name()
	err := s.f.Close()
	if rerr := os.Remove(name); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	s.f, s.w = nil, nil
	if err != nil {
		return fmt.Errorf("remove spool file: %w", err)
	}
	return nil
}

// normalizer turns raw message octets (BDAT chunks, RFC 3030) into the
// spool's form: a bare LF becomes CRLF (RFC 5321 section 2.3.8), and end
// completes the last line, so that the message can also be sent after DATA,
// where it must end with CRLF before the final ".".
type normalizer struct {
	sp     *spool
	midway bool // inside a line (not at its start)
	cr     bool // the last octet written was CR
}

func (st *normalizer) write(p []byte) error {
	start := 0
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '\n':
			if !st.cr {
				if err := st.sp.write(p[start:i]); err != nil {
					return err
				}
				if err := st.sp.write([]byte{'\r'}); err != nil {
					return err
				}
				start = i
			}
			st.midway = false
		default:
			st.midway = true
		}
		st.cr = c == '\r'
	}
	return st.sp.write(p[start:])
}

// end completes the last line, so that the terminating "." of DATA
// starts a line of its own.
func (st *normalizer) end() error {
	if !st.midway {
		return nil
	}
	st.midway, st.cr = false, false
	return st.sp.write(crlf)
}

// dotStuffer writes a message in DATA's wire form (RFC 5321 section
// 4.5.2): a '.' that starts a line is doubled. The message must consist
// of complete lines, as in the spool.
type dotStuffer struct {
	w   io.Writer
	mid bool // inside a line
}

func (d *dotStuffer) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		if !d.mid && p[0] == '.' {
			if _, err := d.w.Write(dot); err != nil {
				return n, err
			}
		}
		end := len(p)
		if i := bytes.IndexByte(p, '\n'); i >= 0 {
			end = i + 1
		}
		k, err := d.w.Write(p[:end])
		n += k
		if err != nil {
			return n, err
		}
		d.mid = p[end-1] != '\n'
		p = p[end:]
	}
	return n, nil
}

var dot = []byte{'.'}
