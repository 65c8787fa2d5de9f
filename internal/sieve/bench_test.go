package sieve

import (
	"bytes"
	"testing"

	"github.com/usher-mail/usher/internal/wire"
)

// BenchmarkParseAuthenticate reads and parses an AUTHENTICATE PLAIN with
// its initial response, as a quoted string and as a literal.
func BenchmarkParseAuthenticate(b *testing.B) {
	input := []byte("AUTHENTICATE \"PLAIN\" \"AHVzZXI0MkBleGFtcGxlLm9yZwBjb3JyZWN0IGhvcnNl\"\r\n" +
		"AUTHENTICATE \"PLAIN\" {44+}\r\nAHVzZXI0MkBleGFtcGxlLm9yZwBjb3JyZWN0IGhvcnNl\r\n")
	lim := wire.FrameLimits{Literal: 1024, Literals: 4, Total: 8192}
	br := bytes.NewReader(input)
	b.SetBytes(int64(len(input)))
	b.ReportAllocs()
	for range b.N {
		br.Reset(input)
		r := wire.NewReaderFrom(br, 0)
		for range 2 {
			f, err := r.ReadFrame(lim, nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := parseCommand(f); err != nil {
				b.Fatal(err)
			}
		}
	}
}
