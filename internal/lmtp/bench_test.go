package lmtp

import "testing"

// BenchmarkParseEnvelope parses a MAIL and an RCPT command line and their
// paths, as every transaction does.
func BenchmarkParseEnvelope(b *testing.B) {
	mail := []byte("MAIL FROM:<sender@example.net> SIZE=10240 BODY=8BITMIME")
	rcpt := []byte("RCPT TO:<user42+lists@example.org>")
	b.ReportAllocs()
	for range b.N {
		_, arg, err := parseCommand(mail)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := parseMailArg(arg); err != nil {
			b.Fatal(err)
		}
		_, arg, err = parseCommand(rcpt)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := parseRcptArg(arg); err != nil {
			b.Fatal(err)
		}
	}
}
