package director

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func backends(n int) []state.Backend {
	var bs []state.Backend
	for i := 1; i <= n; i++ {
		bs = append(bs, state.Backend{Addr: netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), Weight: 100, Up: true})
	}
	return bs
}

func newDirector(t *testing.T, alg route.Algorithm, n int) (*Director, *clock) {
	t.Helper()
	c := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	d, err := New(Options{Algorithm: alg, UserExpire: 15 * time.Minute, Backends: backends(n), Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	return d, c
}

func TestAcquireSticksAndExpires(t *testing.T) {
	for _, alg := range []route.Algorithm{route.Rendezvous, route.Dovecot} {
		t.Run(string(alg), func(t *testing.T) {
			d, c := newDirector(t, alg, 3)
			ctx := context.Background()
			l1, err := d.Acquire(ctx, "User1@Example.com")
			if err != nil {
				t.Fatal(err)
			}
			if l1.User != "user1@example.com" {
				t.Fatalf("key %q, want the %%Lu expansion", l1.User)
			}
			want, _ := d.table.Pick(l1.User, "")
			if l1.Backend != want {
				t.Fatalf("first login went to %s, hash says %s", l1.Backend, want)
			}
			l2, err := d.Acquire(ctx, "user1@example.com")
			if err != nil {
				t.Fatal(err)
			}
			if l2.Backend != l1.Backend {
				t.Fatalf("second session on %s, first on %s", l2.Backend, l1.Backend)
			}
			if us := d.UserStatus("user1@example.com"); us.Sessions != 2 || us.Expires != nil || us.Backend != l1.Backend.String() {
				t.Fatalf("status %+v", us)
			}
			l1.Release()
			l1.Release() // idempotent
			l2.Release()
			us := d.UserStatus("user1@example.com")
			if us.Sessions != 0 || us.Expires == nil || !us.Expires.Equal(c.now().Add(15*time.Minute)) {
				t.Fatalf("after release: %+v", us)
			}
			c.add(15*time.Minute - time.Second)
			if n := d.Expire(); n != 0 {
				t.Fatalf("expired %d records early", n)
			}
			c.add(time.Second)
			if n := d.Expire(); n != 1 {
				t.Fatalf("expired %d records, want 1", n)
			}
			if us := d.UserStatus("user1@example.com"); us.Backend != "" {
				t.Fatalf("record survived expiry: %+v", us)
			}
		})
	}
}

// Adding a backend moves no user with a live record, while new users do
// reach the new backend.
func TestAddBackendMovesNoLiveUser(t *testing.T) {
	d, _ := newDirector(t, route.Rendezvous, 3)
	ctx := context.Background()
	before := map[string]netip.Addr{}
	for i := range 300 {
		u := fmt.Sprintf("user%d@example.com", i)
		l, err := d.Acquire(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		before[u] = l.Backend
		if i%2 == 0 {
			l.Release() // half keep no session, but their record lives until expiry
		}
	}
	added := netip.MustParseAddr("10.0.0.4")
	if err := d.AddBackend(state.Backend{Addr: added, Weight: 100, Up: true}); err != nil {
		t.Fatal(err)
	}
	for u, b := range before {
		l, err := d.Acquire(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		if l.Backend != b {
			t.Fatalf("%s moved from %s to %s", u, b, l.Backend)
		}
	}
	onNew := 0
	for i := range 300 {
		l, err := d.Acquire(ctx, fmt.Sprintf("new%d@example.com", i))
		if err != nil {
			t.Fatal(err)
		}
		if l.Backend == added {
			onNew++
		}
	}
	if onNew < 40 {
		t.Fatalf("only %d of 300 new users on the added backend", onNew)
	}
	st := d.Status()
	if len(st.Backends) != 4 || st.Backends[3].Address != "10.0.0.4" || st.Backends[3].Users != onNew {
		t.Fatalf("status %+v, want 4 backends and %d users on 10.0.0.4", st, onNew)
	}
	if err := d.AddBackend(state.Backend{Addr: added, Weight: 100, Up: true}); !errors.Is(err, state.ErrBackendExists) {
		t.Fatalf("duplicate add: %v", err)
	}
}

func TestAcquireUnavailable(t *testing.T) {
	d, _ := newDirector(t, route.Rendezvous, 0)
	if _, err := d.Acquire(context.Background(), "u"); !errors.Is(err, proxy.ErrUnavailable) {
		t.Fatalf("no backends: %v", err)
	}
	d2, _ := newDirector(t, route.Rendezvous, 1)
	if _, err := d2.Acquire(context.Background(), ""); !errors.Is(err, proxy.ErrUnavailable) {
		t.Fatalf("empty user: %v", err)
	}
}

func TestNewRejectsBadTemplate(t *testing.T) {
	if _, err := New(Options{Algorithm: route.Rendezvous, HashTemplate: "%q"}); err == nil {
		t.Fatal("bad template accepted")
	}
}
