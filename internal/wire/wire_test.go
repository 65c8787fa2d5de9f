package wire_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/usher-mail/usher/internal/wire"
)

// countingReader counts the bytes handed to the wire.Reader.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// endless is an io.Reader that never sends a line end.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

func readLine(t *testing.T, r *wire.Reader) string {
	t.Helper()
	line, err := r.ReadLine()
	if err != nil {
		t.Fatalf("ReadLine: %v", err)
	}
	return string(line)
}

func wantErr(t *testing.T, r *wire.Reader, want error) {
	t.Helper()
	line, err := r.ReadLine()
	if !errors.Is(err, want) {
		t.Fatalf("ReadLine = %q (%d bytes), %v; want error %v", trunc(line), len(line), err, want)
	}
	if line != nil {
		t.Errorf("ReadLine returned %d bytes together with error %v", len(line), err)
	}
}

func trunc(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}

// readers gives the same input once as one block and once a byte at a time,
// so tests cover both bufio filling its buffer in one go and piece by piece.
func readers(input string) map[string]func() io.Reader {
	return map[string]func() io.Reader{
		"block":   func() io.Reader { return strings.NewReader(input) },
		"onebyte": func() io.Reader { return iotest.OneByteReader(strings.NewReader(input)) },
	}
}

func TestReadLineEOLs(t *testing.T) {
	in := "a1 LOGIN x y\r\nUSER bob\n\r\n\nlast\r\n"
	for name, mk := range readers(in) {
		t.Run(name, func(t *testing.T) {
			r := wire.NewReaderFrom(mk(), 64)
			for _, want := range []string{"a1 LOGIN x y", "USER bob", "", "", "last"} {
				if got := readLine(t, r); got != want {
					t.Fatalf("line = %q, want %q", got, want)
				}
			}
			wantErr(t, r, io.EOF)
			// EOF is sticky: asking again does not hang or invent data.
			wantErr(t, r, io.EOF)
		})
	}
}

func TestReadLineKeepsInnerCR(t *testing.T) {
	// Only the line end is stripped: a CR inside the line (or a second CR
	// before the CRLF) is data the protocol parser must see.
	r := wire.NewReaderFrom(strings.NewReader("a\rb\r\r\n"), 64)
	if got := readLine(t, r); got != "a\rb\r" {
		t.Fatalf("line = %q, want %q", got, "a\rb\r")
	}
}

func TestReadLineExactlyMaxLine(t *testing.T) {
	// 4095 and 4096 put the CR or the LF of the longest line right at the
	// end of bufio's 4 KiB buffer, so the line end arrives in a later chunk.
	for _, max := range []int{100, 4094, 4095, 4096, wire.DefaultMaxLine} {
		for _, eol := range []string{"\r\n", "\n"} {
			line := strings.Repeat("m", max)
			in := line + eol + line + "M" + eol + "next" + eol
			for name, mk := range readers(in) {
				r := wire.NewReaderFrom(mk(), max)
				if got := readLine(t, r); got != line {
					t.Fatalf("max %d eol %q %s: got %d bytes, want the %d-byte line", max, eol, name, len(got), max)
				}
				over, err := r.ReadLine()
				if !errors.Is(err, wire.ErrLineTooLong) {
					t.Fatalf("max %d eol %q %s: line of MaxLine+1 bytes: got %d bytes, err %v; want ErrLineTooLong", max, eol, name, len(over), err)
				}
				if got := readLine(t, r); got != "next" {
					t.Fatalf("max %d eol %q %s: following line = %q", max, eol, name, trunc([]byte(got)))
				}
				wantErr(t, r, io.EOF)
			}
		}
	}
}

func TestReadLineTooLongIsConsumed(t *testing.T) {
	for _, max := range []int{10, 100, 4094, 4095, 4096, 4097, wire.DefaultMaxLine} {
		long := strings.Repeat("L", max+1) + "\r\n"
		// Longer still, spanning buffers when max allows, but short of the
		// 64×MaxLine that makes it ErrTooMuch.
		longer := strings.Repeat("L", min(3*max+5000, 60*max)) + "\r\n"
		for name, mk := range readers(long + "a1 NOOP\r\n" + longer + "a2 NOOP\r\n") {
			r := wire.NewReaderFrom(mk(), max)
			wantErr(t, r, wire.ErrLineTooLong)
			if got := readLine(t, r); got != "a1 NOOP" {
				t.Fatalf("max %d %s: line after overlong one = %q, want %q", max, name, trunc([]byte(got)), "a1 NOOP")
			}
			wantErr(t, r, wire.ErrLineTooLong)
			if got := readLine(t, r); got != "a2 NOOP" {
				t.Fatalf("max %d %s: line after very long one = %q, want %q", max, name, trunc([]byte(got)), "a2 NOOP")
			}
			wantErr(t, r, io.EOF)
		}
	}
}

// TestReadLineBareLFOverlong: MaxLine is the longest line "without CRLF".
// With a bare LF the CR allowance must not be granted, or a line of
// MaxLine+1 bytes gets through.
func TestReadLineBareLFOverlong(t *testing.T) {
	const max = 64
	r := wire.NewReaderFrom(strings.NewReader(strings.Repeat("b", max+1)+"\nok\n"), max)
	line, err := r.ReadLine()
	if !errors.Is(err, wire.ErrLineTooLong) {
		t.Errorf("line of MaxLine+1 bytes ending in bare LF: got %d bytes, err %v; want ErrLineTooLong", len(line), err)
	}
	if err == nil {
		return
	}
	if got := readLine(t, r); got != "ok" {
		t.Fatalf("next line = %q", got)
	}
}

func TestReadLineSpansBuffer(t *testing.T) {
	// bufio's buffer is 4 KiB; lines up to MaxLine (8 KiB) must come back
	// whole whatever their alignment with it.
	var in strings.Builder
	var want []string
	for i, n := range []int{6000, 10, 4095, 4096, 4097, 8191, 8192, 0, 7000} {
		line := make([]byte, n)
		for j := range line {
			line[j] = byte('a' + (i+j)%26)
		}
		want = append(want, string(line))
		in.Write(line)
		in.WriteString("\r\n")
	}
	for name, mk := range readers(in.String()) {
		t.Run(name, func(t *testing.T) {
			r := wire.NewReaderFrom(mk(), wire.DefaultMaxLine)
			for i, w := range want {
				got := readLine(t, r)
				if got != w {
					t.Fatalf("line %d: got %d bytes %q, want %d bytes %q", i, len(got), trunc([]byte(got)), len(w), trunc([]byte(w)))
				}
			}
			wantErr(t, r, io.EOF)
		})
	}
}

func TestReadLineTooMuchIsBounded(t *testing.T) {
	for _, max := range []int{64, 1000, wire.DefaultMaxLine} {
		cr := &countingReader{r: endless{}}
		r := wire.NewReaderFrom(cr, max)
		done := make(chan error, 1)
		go func() {
			_, err := r.ReadLine()
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, wire.ErrTooMuch) {
				t.Fatalf("max %d: err = %v, want ErrTooMuch", max, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("max %d: ReadLine did not give up on endless input", max)
		}
		// It must have read more than a line's worth before giving up (a
		// long line is discarded, not an error) but not much more than
		// 64 lines' worth.
		if cr.n <= max+1 {
			t.Errorf("max %d: gave up after %d bytes, want more than MaxLine+1", max, cr.n)
		}
		if limit := 64*max + 2*4096; cr.n > limit {
			t.Errorf("max %d: consumed %d bytes before ErrTooMuch, want at most %d", max, cr.n, limit)
		}
	}
}

func TestReadLineEOFMidLine(t *testing.T) {
	for _, in := range []string{"partial", "a\r\npartial\r", strings.Repeat("p", 5000), strings.Repeat("p", 4096)} {
		for name, mk := range readers(in) {
			r := wire.NewReaderFrom(mk(), wire.DefaultMaxLine)
			if strings.HasPrefix(in, "a\r\n") {
				readLine(t, r)
			}
			line, err := r.ReadLine()
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("%s %q: ReadLine = %q, %v; want io.ErrUnexpectedEOF", name, trunc([]byte(in)), trunc(line), err)
			}
		}
	}
	// Nothing at all is a clean EOF.
	wantErr(t, wire.NewReaderFrom(strings.NewReader(""), 10), io.EOF)
}

func TestReadLiteral(t *testing.T) {
	lit := "pass\r\nword {5}\r\n\x00\xff"
	in := "{" + "}" + lit + " rest\r\n"
	for name, mk := range readers(in) {
		t.Run(name, func(t *testing.T) {
			r := wire.NewReaderFrom(mk(), 64)
			head, err := r.ReadLiteral(2)
			if err != nil || string(head) != "{}" {
				t.Fatalf("ReadLiteral(2) = %q, %v", head, err)
			}
			got, err := r.ReadLiteral(len(lit))
			if err != nil {
				t.Fatalf("ReadLiteral: %v", err)
			}
			if string(got) != lit {
				t.Fatalf("literal = %q, want %q", got, lit)
			}
			if got := readLine(t, r); got != " rest" {
				t.Fatalf("line after literal = %q, want %q", got, " rest")
			}
			empty, err := r.ReadLiteral(0)
			if err != nil || len(empty) != 0 {
				t.Fatalf("ReadLiteral(0) = %q, %v", empty, err)
			}
		})
	}
}

func TestReadLiteralLargerThanBuffer(t *testing.T) {
	lit := bytes.Repeat([]byte("0123456789abcdef"), 1000) // 16000 bytes > 4 KiB buffer
	r := wire.NewReaderFrom(iotest.HalfReader(bytes.NewReader(append(lit, "\r\n"...))), 64)
	got, err := r.ReadLiteral(len(lit))
	if err != nil || !bytes.Equal(got, lit) {
		t.Fatalf("ReadLiteral(%d) = %d bytes, %v", len(lit), len(got), err)
	}
	wantLine := ""
	if got := readLine(t, r); got != wantLine {
		t.Fatalf("line after literal = %q", got)
	}
}

func TestReadLiteralShort(t *testing.T) {
	for name, mk := range readers("abc") {
		r := wire.NewReaderFrom(mk(), 64)
		b, err := r.ReadLiteral(4)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%s: ReadLiteral(4) of 3 bytes = %q, %v; want io.ErrUnexpectedEOF", name, b, err)
		}
	}
	r := wire.NewReaderFrom(strings.NewReader(""), 64)
	if _, err := r.ReadLiteral(1); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("ReadLiteral(1) at EOF: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestPending(t *testing.T) {
	r := wire.NewReaderFrom(strings.NewReader("a1 STARTTLS\r\ninjected\r\n"), 64)
	if r.Buffered() != 0 {
		t.Fatalf("Buffered before any read = %d", r.Buffered())
	}
	if got := readLine(t, r); got != "a1 STARTTLS" {
		t.Fatalf("line = %q", got)
	}
	if n := r.Buffered(); n != len("injected\r\n") {
		t.Fatalf("Buffered = %d, want %d", n, len("injected\r\n"))
	}
	if p := r.Pending(); string(p) != "injected\r\n" {
		t.Fatalf("Pending = %q", p)
	}
	if n := r.Buffered(); n != 0 {
		t.Fatalf("Buffered after Pending = %d, want 0", n)
	}
	if p := r.Pending(); p != nil {
		t.Fatalf("second Pending = %q, want nil", p)
	}
	// Pending hands the connection over: the Reader lets its buffer go.
	wantErr(t, r, wire.ErrDetached)
	if _, err := r.ReadLiteral(1); !errors.Is(err, wire.ErrDetached) {
		t.Fatalf("ReadLiteral after Pending: %v, want ErrDetached", err)
	}
}

func TestPendingWithNothingBuffered(t *testing.T) {
	r := wire.NewReaderFrom(strings.NewReader("x\r\n"), 64)
	if p := r.Pending(); p != nil {
		t.Fatalf("Pending before any read = %q, want nil", p)
	}
	wantErr(t, r, wire.ErrDetached)
}

// tcpPair returns both ends of a real 127.0.0.1 TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		client.Close()
		t.Fatal(r.err)
	}
	t.Cleanup(func() { client.Close(); r.c.Close() })
	return client, r.c
}

// within runs f, failing the test (and closing conn to unblock f) if it has
// not returned after a second: a missing deadline must fail, not hang.
func within(t *testing.T, conn net.Conn, f func() error) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return time.Since(start), err
	case <-time.After(time.Second):
		conn.Close()
		<-done
		t.Fatalf("read still blocked after %v: no deadline", time.Since(start))
		return 0, nil
	}
}

func TestReadLineDeadline(t *testing.T) {
	const timeout = 100 * time.Millisecond
	t.Run("silent", func(t *testing.T) {
		peer, conn := tcpPair(t)
		_ = peer
		r := wire.NewReader(conn, timeout, 0)
		var line []byte
		el, err := within(t, conn, func() (err error) { line, err = r.ReadLine(); return err })
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadLine from silent peer = %q, %v; want os.ErrDeadlineExceeded", line, err)
		}
		if el < timeout/2 || el > time.Second {
			t.Errorf("timed out after %v, want about %v", el, timeout)
		}
	})
	t.Run("after a good line", func(t *testing.T) {
		peer, conn := tcpPair(t)
		r := wire.NewReader(conn, timeout, 0)
		// The deadline is renewed for each read: a peer answering within
		// the timeout is not cut off however long the session is.
		for i := 0; i < 3; i++ {
			time.Sleep(timeout / 2)
			if _, err := peer.Write([]byte("a NOOP\r\n")); err != nil {
				t.Fatal(err)
			}
			if got := readLine(t, r); got != "a NOOP" {
				t.Fatalf("line = %q", got)
			}
		}
		_, err := within(t, conn, func() error { _, err := r.ReadLine(); return err })
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("err = %v, want os.ErrDeadlineExceeded", err)
		}
	})
	t.Run("trickle", func(t *testing.T) {
		// A peer dripping bytes without a line end must not keep the read
		// alive: the deadline covers the line, not each byte.
		peer, conn := tcpPair(t)
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			tk := time.NewTicker(timeout / 5)
			defer tk.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tk.C:
					if _, err := peer.Write([]byte("x")); err != nil {
						return
					}
				}
			}
		}()
		r := wire.NewReader(conn, timeout, 0)
		_, err := within(t, conn, func() error { _, err := r.ReadLine(); return err })
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("trickling peer: err = %v, want os.ErrDeadlineExceeded", err)
		}
	})
	t.Run("literal", func(t *testing.T) {
		peer, conn := tcpPair(t)
		if _, err := peer.Write([]byte("ab")); err != nil {
			t.Fatal(err)
		}
		r := wire.NewReader(conn, timeout, 0)
		_, err := within(t, conn, func() error { _, err := r.ReadLiteral(10); return err })
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadLiteral short of data: %v, want os.ErrDeadlineExceeded", err)
		}
	})
	t.Run("no timeout", func(t *testing.T) {
		// Timeout 0 sets no deadline: the read waits for the peer.
		peer, conn := tcpPair(t)
		r := wire.NewReader(conn, 0, 0)
		go func() {
			time.Sleep(2 * timeout)
			peer.Write([]byte("late\r\n"))
		}()
		if got := readLine(t, r); got != "late" {
			t.Fatalf("line = %q", got)
		}
	})
}

func TestNewReaderDefaultsMaxLine(t *testing.T) {
	for _, max := range []int{0, -1} {
		r := wire.NewReaderFrom(strings.NewReader(""), max)
		if r.MaxLine != wire.DefaultMaxLine {
			t.Errorf("NewReaderFrom(_, %d).MaxLine = %d, want %d", max, r.MaxLine, wire.DefaultMaxLine)
		}
		if r := wire.NewReader(nil, 0, max); r.MaxLine != wire.DefaultMaxLine {
			t.Errorf("NewReader(_, _, %d).MaxLine = %d, want %d", max, r.MaxLine, wire.DefaultMaxLine)
		}
	}
}
