package route

import (
	"fmt"
	"net/netip"
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

// BenchmarkPickBounded is BenchmarkPick with bounded loads (factor 1.02)
// over a balanced pool whose load function is a map lookup, as the director's
// is; "full" makes every key's first choice full half of the time.
func BenchmarkPickBounded(b *testing.B) {
	keys := benchKeys()
	for _, c := range []struct {
		name     string
		n        int
		weighted bool
		full     bool
	}{{"rendezvous/10", 10, false, false}, {"rendezvous/100", 100, false, false},
		{"rendezvous-weighted/10", 10, true, false}, {"rendezvous-full/10", 10, false, true}} {
		b.Run(c.name, func(b *testing.B) {
			bs := backends(c.n, 100)
			if c.weighted {
				bs[0].Weight = 150
			}
			tab := mustTable(b, Rendezvous, bs)
			loads := make(map[netip.Addr]int, c.n)
			for i, be := range bs {
				loads[be.Addr] = 1000 * be.Weight / 100
				if c.full && i%2 == 0 {
					loads[be.Addr] += 100 // above 1.02 × the share
				}
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := tab.PickBounded(keys[i&1023], "", 1.02, func(a netip.Addr) int { return loads[a] }); !ok {
					b.Fatal("no backend")
				}
				i++
			}
		})
	}
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
