package director

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/route"
)

func benchDirector(b *testing.B, alg route.Algorithm, n int) *Director {
	return benchDirectorFactor(b, alg, n, 0)
}

func benchDirectorFactor(b *testing.B, alg route.Algorithm, n int, factor float64) *Director {
	b.Helper()
	d, err := New(Options{Algorithm: alg, UserExpire: 15 * time.Minute, Backends: backends(n),
		BalanceFactor: factor, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkAcquire measures a login's whole routing step, Acquire and the
// Release at the session's end: template expansion, the lookup or the hash,
// the state command, the lease and its kick context. "known" users have a
// live record (10,000 of them, each held by an open session); "new" users
// are hashed afresh (every iteration uses a name not seen before, whose
// record then stays until it expires).
func BenchmarkAcquire(b *testing.B) {
	for _, alg := range []route.Algorithm{route.Rendezvous, route.Dovecot} {
		for _, n := range []int{10, 100} {
			b.Run(fmt.Sprintf("known/%s/%d", alg, n), func(b *testing.B) { benchKnown(b, benchDirector(b, alg, n)) })
			b.Run(fmt.Sprintf("new/%s/%d", alg, n), func(b *testing.B) { benchNew(b, benchDirector(b, alg, n)) })
		}
	}
}

// BenchmarkAcquireBalanced is BenchmarkAcquire's rendezvous cases with
// balance factor 1.02: "new" users take the bounded pick (a load lookup per
// backend), "known" ones must cost what they cost without the factor.
func BenchmarkAcquireBalanced(b *testing.B) {
	for _, n := range []int{10, 100} {
		b.Run(fmt.Sprintf("known/%d", n), func(b *testing.B) {
			benchKnown(b, benchDirectorFactor(b, route.Rendezvous, n, 1.02))
		})
		b.Run(fmt.Sprintf("new/%d", n), func(b *testing.B) {
			benchNew(b, benchDirectorFactor(b, route.Rendezvous, n, 1.02))
		})
	}
}

// benchKnown times Acquire and Release of a user with a live record, among
// 10,000 users each held by an open session.
func benchKnown(b *testing.B, d *Director) {
	ctx := context.Background()
	for i := range 10000 {
		if _, err := d.Acquire(ctx, fmt.Sprintf("user%d@example.org", i)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		l, err := d.Acquire(ctx, "user4242@example.org")
		if err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
}

// benchNew times Acquire and Release of users never seen before.
func benchNew(b *testing.B, d *Director) {
	ctx := context.Background()
	names := make([]string, b.N)
	for i := range names {
		names[i] = fmt.Sprintf("new%d@example.org", i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for _, u := range names {
		l, err := d.Acquire(ctx, u)
		if err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
}
