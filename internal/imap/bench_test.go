package imap

import (
	"bytes"
	"testing"

	"github.com/usher-mail/usher/internal/wire"
)

// BenchmarkParseLogin reads and parses the commands of a typical pre-login
// exchange: ID, a LOGIN with quoted strings, and one with a
// non-synchronizing literal.
func BenchmarkParseLogin(b *testing.B) {
	input := []byte("a1 ID (\"name\" \"Thunderbird\" \"version\" \"115.0\")\r\n" +
		"a2 LOGIN \"user42@example.org\" \"correct horse\"\r\n" +
		"a3 LOGIN user42@example.org {13+}\r\ncorrect horse\r\n")
	br := bytes.NewReader(input)
	b.SetBytes(int64(len(input)))
	b.ReportAllocs()
	for range b.N {
		br.Reset(input)
		r := wire.NewReaderFrom(br, 0)
		for range 3 {
			raw, err := readCommand(r, 1024, func() error { return nil })
			if err != nil {
				b.Fatal(err)
			}
			if _, err := parseCommand(raw); err != nil {
				b.Fatal(err)
			}
		}
	}
}
