package bench

import (
	"bytes"
	"fmt"
	"strings"
	"time"
)

// messageBody returns a body of about size bytes: CRLF lines of printable
// ASCII, none starting with '.', so it needs no dot-stuffing (RFC 5321
// §4.5.2) and ends with CRLF as DATA requires before the final dot.
func messageBody(size int) []byte {
	const line = "The quick brown fox jumps over the lazy dog; usher bench filler text 0123456789\r\n"
	if size < len(line) {
		size = len(line)
	}
	var b bytes.Buffer
	b.Grow(size + len(line))
	for b.Len()+len(line) <= size {
		b.WriteString(line)
	}
	if rest := size - b.Len(); rest > 2 {
		b.WriteString(strings.Repeat("x", rest-2))
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// messageHeader returns an RFC 5322 header block (ending in the empty
// line) with a Message-ID unique to (run, seq).
func messageHeader(run string, seq uint64, to string) []byte {
	return fmt.Appendf(nil, "From: usher bench <bench@usher.invalid>\r\n"+
		"To: <%s>\r\n"+
		"Subject: usher bench message %d\r\n"+
		"Date: %s\r\n"+
		"Message-ID: <%s.%d@bench.usher.invalid>\r\n"+
		"MIME-Version: 1.0\r\n"+
		"Content-Type: text/plain; charset=us-ascii\r\n\r\n",
		to, seq, time.Now().Format(time.RFC1123Z), run, seq)
}

// message returns a whole message of about size bytes (header included).
func message(run string, seq uint64, to string, size int) []byte {
	h := messageHeader(run, seq, to)
	return append(h, messageBody(size-len(h))...)
}
