package route

import (
	"fmt"
	"testing"
)

func benchKeys() []string {
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = userKey(i)
	}
	return keys
}

func BenchmarkPick(b *testing.B) {
	keys := benchKeys()
	for _, alg := range []Algorithm{Rendezvous, Dovecot} {
		for _, n := range []int{10, 100} {
			b.Run(fmt.Sprintf("%s/%d", alg, n), func(b *testing.B) {
				tab := mustTable(b, alg, backends(n, 100))
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					if _, ok := tab.Pick(keys[i&1023], ""); !ok {
						b.Fatal("no backend")
					}
					i++
				}
			})
		}
	}
	// Unequal weights take the logarithm path of rendezvous.
	b.Run("rendezvous-weighted/10", func(b *testing.B) {
		bs := backends(10, 100)
		bs[0].Weight = 150
		tab := mustTable(b, Rendezvous, bs)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, ok := tab.Pick(keys[i&1023], ""); !ok {
				b.Fatal("no backend")
			}
			i++
		}
	})
}

func BenchmarkUserHash(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		UserHash("someone.with.a.name@example.com")
	}
}

func BenchmarkExpandTemplate(b *testing.B) {
	for _, tmpl := range []string{"%Lu", "%Ln"} {
		b.Run(tmpl, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				ExpandTemplate(tmpl, "Someone@Example.COM")
			}
		})
	}
}
