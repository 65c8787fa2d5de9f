package director

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// Shared helpers of the operation tests (ops_test.go, persist_test.go).

var (
	b1 = netip.MustParseAddr("10.0.0.1")
	b2 = netip.MustParseAddr("10.0.0.2")
	b3 = netip.MustParseAddr("10.0.0.3")
)

// recObserver records what the director reports to its Observer. It also
// tracks the moves in flight: a move reports Kick (right after marking the
// user moving) and then Move (after pinning it), so between the two the
// move is in progress.
type recObserver struct {
	mu          sync.Mutex
	moves       map[string]int // by result
	kicks       map[string]int // kick operations by reason
	kicked      map[string]int // kicked sessions by reason
	inflight    int
	maxInflight int
}

func newRecObserver() *recObserver {
	return &recObserver{moves: map[string]int{}, kicks: map[string]int{}, kicked: map[string]int{}}
}

func (o *recObserver) Move(result string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.moves[result]++
	o.inflight--
}

func (o *recObserver) Kick(reason string, sessions int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.kicks[reason]++
	o.kicked[reason] += sessions
	if reason != "kick" { // KickUser is not part of a move
		o.inflight++
		o.maxInflight = max(o.maxInflight, o.inflight)
	}
}

// get returns a copy of the counters.
func (o *recObserver) get() (moves, kicks, kicked map[string]int, maxInflight int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	cp := func(m map[string]int) map[string]int {
		out := map[string]int{}
		for k, v := range m {
			out[k] = v
		}
		return out
	}
	return cp(o.moves), cp(o.kicks), cp(o.kicked), o.maxInflight
}

// env is a director under test with a fake clock (the state's timestamps)
// and a recording observer. Waits (MoveWait) run on real time.
type env struct {
	d   *Director
	c   *clock
	obs *recObserver
}

// newEnv builds a director; zero fields of o get test defaults: rendezvous,
// 15 minutes expiry, backends 10.0.0.1-3 with weight 100, MoveWait 5s, the
// fake clock, a recording observer and a discarding logger.
func newEnv(t *testing.T, o Options) *env {
	t.Helper()
	e := &env{c: &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}, obs: newRecObserver()}
	if o.Algorithm == "" {
		o.Algorithm = route.Rendezvous
	}
	if o.UserExpire == 0 {
		o.UserExpire = 15 * time.Minute
	}
	if o.Backends == nil {
		o.Backends = backends(3)
	}
	if o.MoveWait == 0 {
		o.MoveWait = 5 * time.Second
	}
	if o.Now == nil {
		o.Now = e.c.now
	}
	if o.Observer == nil {
		o.Observer = e.obs
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	d, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
	return e
}

func (e *env) acquire(t *testing.T, user string) *proxy.Lease {
	t.Helper()
	l, err := e.d.Acquire(context.Background(), user)
	if err != nil {
		t.Fatalf("acquire %q: %v", user, err)
	}
	return l
}

// usersHashedTo returns n login names whose hash picks b now (default pool).
func (e *env) usersHashedTo(t *testing.T, prefix string, b netip.Addr, n int) []string {
	t.Helper()
	var out []string
	for i := 0; len(out) < n; i++ {
		if i > 100000 {
			t.Fatalf("no %d users hash to %s", n, b)
		}
		u := fmt.Sprintf("%s%d@example.com", prefix, i)
		if e.d.UserStatus(u).HashBackend == b.String() {
			out = append(out, u)
		}
	}
	return out
}

// movingCount returns how many live records are moving now.
func (e *env) movingCount() int {
	n := 0
	for _, r := range e.d.Map(netip.Addr{}) {
		if r.Moving {
			n++
		}
	}
	return n
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// waitFor polls cond for up to 5 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// releaser plays the proxy's part for leases: when a lease's Done closes
// (kick, move) it releases the lease after a delay. At cleanup every
// watched lease is released and the goroutines are waited for.
type releaser struct {
	stop chan struct{}
	wg   sync.WaitGroup
}

func newReleaser(t *testing.T) *releaser {
	r := &releaser{stop: make(chan struct{})}
	t.Cleanup(func() { close(r.stop); r.wg.Wait() })
	return r
}

// watch releases l delay after its Done closed; onKick, if set, runs as
// soon as Done closed.
func (r *releaser) watch(l *proxy.Lease, delay time.Duration, onKick func()) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer l.Release()
		select {
		case <-l.Done:
			if onKick != nil {
				onKick()
			}
			select {
			case <-time.After(delay):
			case <-r.stop:
			}
		case <-r.stop:
		}
	}()
}

// goMove runs MoveUser in a goroutine; the returned channel yields its error.
func goMove(e *env, user string, to netip.Addr) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- e.d.MoveUser(context.Background(), user, to) }()
	return ch
}

// recv waits up to 5 seconds for a value.
func recv[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

type acquired struct {
	l   *proxy.Lease
	err error
	at  time.Time
}

// goAcquire runs Acquire in a goroutine.
func goAcquire(ctx context.Context, e *env, user string) <-chan acquired {
	ch := make(chan acquired, 1)
	go func() {
		l, err := e.d.Acquire(ctx, user)
		ch <- acquired{l, err, time.Now()}
	}()
	return ch
}

// otherThan returns the first of 10.0.0.1-3 not in not.
func otherThan(not ...netip.Addr) netip.Addr {
	for _, b := range []netip.Addr{b1, b2, b3} {
		found := false
		for _, n := range not {
			found = found || n == b
		}
		if !found {
			return b
		}
	}
	panic("no other backend")
}

func backendOf(t *testing.T, bs []state.Backend, a netip.Addr) state.Backend {
	t.Helper()
	for _, b := range bs {
		if b.Addr == a {
			return b
		}
	}
	t.Fatalf("backend %s not in %+v", a, bs)
	return state.Backend{}
}

// mustAddr parses an address; "" is the invalid address (meaning "all").
func mustAddr(s string) netip.Addr {
	if s == "" {
		return netip.Addr{}
	}
	return netip.MustParseAddr(s)
}
