package proxy

import (
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestPlaintextAllowed(t *testing.T) {
	for _, tc := range []struct{ secure, trusted, want bool }{
		{false, false, false},
		{true, false, true},
		{false, true, true},
		{true, true, true},
	} {
		s := &Session{Secure: tc.secure, Trusted: tc.trusted}
		if got := s.PlaintextAllowed(); got != tc.want {
			t.Errorf("Secure=%v Trusted=%v: PlaintextAllowed() = %v, want %v", tc.secure, tc.trusted, got, tc.want)
		}
	}
}

func TestLeaseRelease(t *testing.T) {
	var calls atomic.Int32
	done := make(chan struct{})
	ip := netip.MustParseAddr("10.0.0.1")
	l := NewLease("alice", ip, done, func() { calls.Add(1) })
	if l.User != "alice" || l.Backend != ip || l.Done != (<-chan struct{})(done) {
		t.Errorf("NewLease fields = %q %v %v", l.User, l.Backend, l.Done)
	}

	var wg sync.WaitGroup
	for range 50 {
		wg.Go(l.Release)
	}
	wg.Wait()
	l.Release()
	if n := calls.Load(); n != 1 {
		t.Errorf("release called %d times after 51 Release calls, want 1", n)
	}

	// Nil lease and nil release func must not panic.
	var nl *Lease
	nl.Release()
	NewLease("bob", ip, nil, nil).Release()
}
