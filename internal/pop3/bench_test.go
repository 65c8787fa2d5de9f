package pop3

import "testing"

// BenchmarkParseCommand parses the commands of a USER/PASS login.
func BenchmarkParseCommand(b *testing.B) {
	lines := [][]byte{[]byte("CAPA"), []byte("USER user42@example.org"), []byte("PASS correct horse")}
	b.ReportAllocs()
	for range b.N {
		for _, l := range lines {
			if _, err := parseCommand(l); err != nil {
				b.Fatal(err)
			}
		}
	}
}
