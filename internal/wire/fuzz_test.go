package wire_test

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/usher-mail/usher/internal/wire"
)

const fuzzMaxLine = 64

// FuzzReadLine checks ReadLine against a model of line splitting: every line
// comes back exactly (minus its LF and one CR), overlong lines are reported
// and skipped, a peer streaming far more than a line without LF gets
// ErrTooMuch, and every call makes progress, so reading terminates.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("a1 LOGIN bob secret\r\na2 LOGOUT\r\n"))
	f.Add([]byte("USER x\nPASS y\n\n\r\n"))
	f.Add(bytes.Repeat([]byte("y"), fuzzMaxLine+1))
	f.Add(append(bytes.Repeat([]byte("z"), fuzzMaxLine), "\r\nnext\r\n"...))
	f.Add(append(bytes.Repeat([]byte("z"), fuzzMaxLine+1), "\r\nnext\r\n"...))
	f.Fuzz(func(t *testing.T, data []byte) {
		for name, r := range map[string]io.Reader{
			"block":   bytes.NewReader(data),
			"onebyte": iotest.OneByteReader(bytes.NewReader(data)),
		} {
			checkModel(t, name, wire.NewReaderFrom(r, fuzzMaxLine), data)
		}
	})
}

func checkModel(t *testing.T, name string, r *wire.Reader, data []byte) {
	const max = fuzzMaxLine
	rest := data
	for calls := 0; ; calls++ {
		if calls > len(data)+1 {
			t.Fatalf("%s: %d ReadLine calls on %d bytes: no progress", name, calls, len(data))
		}
		off := len(data) - len(rest)
		line, err := r.ReadLine()
		if len(line) > max {
			t.Fatalf("%s: line of %d bytes with MaxLine %d", name, len(line), max)
		}
		if len(rest) == 0 {
			if err != io.EOF || line != nil {
				t.Fatalf("%s: at end of input: %q, %v; want io.EOF", name, line, err)
			}
			return
		}
		seg, tail, terminated := bytes.Cut(rest, []byte{'\n'})
		trimmed := bytes.TrimSuffix(seg, []byte{'\r'})
		switch {
		case errors.Is(err, wire.ErrTooMuch):
			// Only once far more than a line came without a line end.
			if len(seg) <= 64*max {
				t.Fatalf("%s: ErrTooMuch at offset %d on a %d-byte line", name, off, len(seg))
			}
			return // the caller disconnects
		case !terminated:
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("%s: unterminated %d-byte tail at offset %d: %q, %v; want io.ErrUnexpectedEOF", name, len(seg), off, line, err)
			}
			return
		case errors.Is(err, wire.ErrLineTooLong):
			if len(trimmed) <= max {
				t.Fatalf("%s: ErrLineTooLong for a %d-byte line (MaxLine %d) at offset %d", name, len(trimmed), max, off)
			}
		case err != nil:
			t.Fatalf("%s: offset %d: unexpected error %v", name, off, err)
		default:
			if len(trimmed) > max {
				t.Fatalf("%s: accepted a %d-byte line (MaxLine %d) at offset %d", name, len(trimmed), max, off)
			}
			if !bytes.Equal(line, trimmed) {
				t.Fatalf("%s: offset %d: line %q, want %q", name, off, line, trimmed)
			}
		}
		rest = tail
	}
}
