package director

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"testing"

	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// tenBackends is 10 equal backends 10.0.0.1-10.
func tenBackends() []state.Backend { return backends(10) }

// liveCounts returns the live records per backend from Status.
func liveCounts(d *Director) map[string]int {
	m := map[string]int{}
	for _, b := range d.Status().Backends {
		m[b.Address] = b.Users
	}
	return m
}

// TestAcquireBalanced: with factor 1.02, 10,000 distinct users logging in
// and out over 10 backends never put a backend above its capacity; with
// factor 0 every user goes exactly where Pick says.
func TestAcquireBalanced(t *testing.T) {
	const users, n, factor = 10000, 10, 1.02
	ctx := context.Background()
	for _, f := range []float64{0, factor} {
		e := newEnv(t, Options{Backends: tenBackends(), BalanceFactor: f})
		counts := map[netip.Addr]int{}
		off := 0
		for i := range users {
			u := fmt.Sprintf("user%05d@example.org", i)
			l, err := e.d.Acquire(ctx, u)
			if err != nil {
				t.Fatal(err)
			}
			l.Release()
			first, _ := e.d.table.Pick(l.User, "")
			if f == 0 && l.Backend != first {
				t.Fatalf("factor 0: %s went to %s, Pick says %s", u, l.Backend, first)
			}
			if l.Backend != first {
				off++
			}
			counts[l.Backend]++
			if capa := math.Ceil(f * float64(i+1) / n); f != 0 && float64(counts[l.Backend]) > capa {
				t.Fatalf("user %d: %s holds %d records, capacity %v", i, l.Backend, counts[l.Backend], capa)
			}
		}
		mean := float64(users) / n
		hi, lo := math.Inf(-1), math.Inf(1)
		for a, c := range liveCounts(e.d) {
			if c != counts[netip.MustParseAddr(a)] {
				t.Errorf("factor %v: status says %s holds %d users, the leases %d", f, a, c, counts[netip.MustParseAddr(a)])
			}
			hi, lo = max(hi, float64(c)/mean-1), min(lo, float64(c)/mean-1)
		}
		t.Logf("factor %v: %d users on %d backends, deviation %+.2f%% .. %+.2f%%, %d not on their first choice",
			f, users, n, 100*lo, 100*hi, off)
		if f != 0 {
			if hi > factor-1+1e-9 {
				t.Errorf("factor %v: max deviation %+.2f%%", f, 100*hi)
			}
			if off == 0 {
				t.Errorf("factor %v: the bound never acted", f)
			}
		}
	}
}

// TestBalanceKeepsKnownUsers: a user with a live record stays on its
// backend however full that backend is.
func TestBalanceKeepsKnownUsers(t *testing.T) {
	e := newEnv(t, Options{BalanceFactor: 1})
	ctx := context.Background()
	var users []string
	for i := range 30 {
		u := fmt.Sprintf("pinned%02d@example.com", i)
		if err := e.d.MoveUser(ctx, u, b1); err != nil {
			t.Fatal(err)
		}
		users = append(users, u)
	}
	for _, u := range users {
		l := e.acquire(t, u)
		if l.Backend != b1 {
			t.Fatalf("%s has a record on %s but got %s", u, b1, l.Backend)
		}
		l.Release()
	}
	// A new user never lands on the overfull b1.
	for i := range 20 {
		l := e.acquire(t, fmt.Sprintf("new%02d@example.com", i))
		if l.Backend == b1 {
			t.Fatalf("new user placed on %s holding %d of %d records", b1, e.d.st.UsersOn(b1), len(e.d.st.Users()))
		}
		l.Release()
	}
}

// TestBalanceUserStatus: hash_backend is where Acquire puts a new user, and
// for a user with a record, where it would go without that record.
func TestBalanceUserStatus(t *testing.T) {
	e := newEnv(t, Options{BalanceFactor: 1})
	ctx := context.Background()
	// Fill b1 so that users whose first choice is b1 go elsewhere.
	for i := range 10 {
		if err := e.d.MoveUser(ctx, fmt.Sprintf("fill%d@example.com", i), b1); err != nil {
			t.Fatal(err)
		}
	}
	diverted := 0
	for i := range 30 {
		u := fmt.Sprintf("user%02d@example.com", i)
		st := e.d.UserStatus(u)
		first, _ := e.d.table.Pick(st.Key, "")
		if first.String() != st.HashBackend {
			diverted++
		}
		l := e.acquire(t, u)
		if l.Backend.String() != st.HashBackend {
			t.Fatalf("%s: status said %s, Acquire gave %s", u, st.HashBackend, l.Backend)
		}
		l.Release()
		// With its own record not counted, the answer stays the same.
		if again := e.d.UserStatus(u); again.HashBackend != st.HashBackend {
			t.Fatalf("%s: hash_backend %s before the login, %s after", u, st.HashBackend, again.HashBackend)
		}
	}
	if diverted == 0 {
		t.Error("no user was diverted from the full backend")
	}
	if s := e.d.Status(); s.BalanceFactor != 1 {
		t.Errorf("status balance factor %v, want 1", s.BalanceFactor)
	}
}

// TestFlushBalanced: a flush of all users re-balances an overfull backend
// to within the bound; without a factor it only follows Pick.
func TestFlushBalanced(t *testing.T) {
	const users, factor = 300, 1.05
	e := newEnv(t, Options{})
	ctx := context.Background()
	for i := range users {
		e.acquire(t, fmt.Sprintf("user%03d@example.com", i)).Release()
	}
	// Pile 100 of them on b1.
	moved := 0
	for i := 0; moved < 100; i++ {
		u := fmt.Sprintf("user%03d@example.com", i)
		if e.d.UserStatus(u).Backend != b1.String() {
			if err := e.d.MoveUser(ctx, u, b1); err != nil {
				t.Fatal(err)
			}
			moved++
		}
	}
	capa := int(math.Ceil(factor * users / 3))
	if c := liveCounts(e.d)[b1.String()]; c <= capa {
		t.Fatalf("setup: %s holds %d users, not above %d", b1, c, capa)
	}
	// Without a factor, a flush puts every user back where Pick says.
	plain := e.d.flushPlan(netip.Addr{})
	for _, p := range plain {
		want, _ := e.d.table.Pick(p.key, "")
		if p.target != want {
			t.Fatalf("factor 0: plan moves %s to %s, Pick says %s", p.key, p.target, want)
		}
	}
	if err := e.d.SetBalanceFactor(factor); err != nil {
		t.Fatal(err)
	}
	res, err := e.d.Flush(ctx, netip.Addr{}, 5)
	if err != nil {
		t.Fatal(err)
	}
	if res.Users != users || res.Moved+res.Kept != users || res.Moved < 100 || res.Failed != 0 {
		t.Errorf("flush result %+v", res)
	}
	total := 0
	for a, c := range liveCounts(e.d) {
		total += c
		if c > capa {
			t.Errorf("after the flush %s holds %d users, capacity %d", a, c, capa)
		}
	}
	if total != users {
		t.Errorf("%d users after the flush, want %d", total, users)
	}
	// The users are where a fresh login of them in key order puts them.
	fresh := map[netip.Addr]int{}
	for i := range users {
		u := fmt.Sprintf("user%03d@example.com", i)
		want, _ := e.d.table.PickBounded(u, "", factor, func(a netip.Addr) int { return fresh[a] })
		fresh[want]++
		if st := e.d.UserStatus(u); st.Backend != want.String() {
			t.Errorf("%s on %s after the flush, a fresh bounded placement gives %s", u, st.Backend, want)
		}
	}
}

func TestBalanceFactorValidation(t *testing.T) {
	for _, bad := range []float64{-1, 0.5, 0.999, math.NaN(), math.Inf(1)} {
		if _, err := New(Options{Algorithm: route.Rendezvous, BalanceFactor: bad, Backends: backends(2)}); !errors.Is(err, ErrBadBalanceFactor) {
			t.Errorf("New with factor %v: err = %v", bad, err)
		}
	}
	e := newEnv(t, Options{})
	for _, bad := range []float64{-1, 0.5, math.NaN()} {
		if err := e.d.SetBalanceFactor(bad); !errors.Is(err, ErrBadBalanceFactor) {
			t.Errorf("SetBalanceFactor(%v) = %v", bad, err)
		}
	}
	for _, ok := range []float64{1, 1.02, 10, 0} {
		if err := e.d.SetBalanceFactor(ok); err != nil {
			t.Errorf("SetBalanceFactor(%v) = %v", ok, err)
		}
		if got := e.d.Status().BalanceFactor; got != ok {
			t.Errorf("after SetBalanceFactor(%v) status says %v", ok, got)
		}
	}
}
