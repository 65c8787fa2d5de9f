package state_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/state"
)

// benchState returns a state with 5 backends and 10,000 live records.
func benchState(b *testing.B) (*state.State, netip.Addr) {
	b.Helper()
	s := state.New(state.DefaultExpire)
	var first netip.Addr
	for i := range 5 {
		a := netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + i)})
		if i == 0 {
			first = a
		}
		if _, err := s.Apply(state.Command{Type: state.CmdAddBackend, Backend: a, Weight: 100, Up: true}); err != nil {
			b.Fatal(err)
		}
	}
	for i := range 10000 {
		if _, err := s.Apply(open(fmt.Sprintf("user%05d@example.org", i), first, t0)); err != nil {
			b.Fatal(err)
		}
	}
	return s, first
}

// BenchmarkApplySessionOpenExisting opens another session of a user with a
// live record (the common login path).
func BenchmarkApplySessionOpenExisting(b *testing.B) {
	s, be := benchState(b)
	c := open("user00042@example.org", be, t0.Add(time.Second))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if r, err := s.Apply(c); err != nil || r.Created {
			b.Fatalf("%+v %v", r, err)
		}
	}
}

// BenchmarkApplySessionOpenNew creates a record for a user without one (map
// growth included: every iteration adds a new key).
func BenchmarkApplySessionOpenNew(b *testing.B) {
	s, be := benchState(b)
	cmds := make([]state.Command, b.N)
	for i := range cmds {
		cmds[i] = open(fmt.Sprintf("new%09d@example.org", i), be, t0.Add(time.Second))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if r, err := s.Apply(cmds[i]); err != nil || !r.Created {
			b.Fatalf("%+v %v", r, err)
		}
	}
}

// BenchmarkApplySessionClose closes a session of a user with many open ones.
func BenchmarkApplySessionClose(b *testing.B) {
	s, be := benchState(b)
	const user = "user00042@example.org"
	for range b.N {
		if _, err := s.Apply(open(user, be, t0)); err != nil {
			b.Fatal(err)
		}
	}
	c := closeS(user, t0.Add(time.Second))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if r, err := s.Apply(c); err != nil || r.Backend != be {
			b.Fatalf("%+v %v", r, err)
		}
	}
}
