package director

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/state"
)

// A move kicks every session of the user, waits until they are all
// released, and only then pins the user to the new backend.
func TestMoveUserWaitsForSessions(t *testing.T) {
	e := newEnv(t, Options{})
	const user = "Alice@Example.com"
	l1, l2 := e.acquire(t, user), e.acquire(t, user)
	from := l1.Backend
	to := otherThan(from)
	other := e.acquire(t, "bob@example.com")
	t.Cleanup(other.Release)

	const delay = 100 * time.Millisecond
	var released atomic.Bool
	go func() {
		<-l1.Done
		<-l2.Done
		time.Sleep(delay)
		released.Store(true)
		l1.Release()
		l2.Release()
	}()
	start := time.Now()
	if err := e.d.MoveUser(context.Background(), user, to); err != nil {
		t.Fatalf("move: %v", err)
	}
	if !released.Load() {
		t.Fatal("MoveUser returned before the kicked sessions were released")
	}
	if el := time.Since(start); el < delay {
		t.Errorf("MoveUser took %v, less than the release delay %v", el, delay)
	}
	if !isClosed(l1.Done) || !isClosed(l2.Done) {
		t.Error("the user's leases were not kicked")
	}
	if isClosed(other.Done) {
		t.Error("another user's lease was kicked")
	}
	us := e.d.UserStatus(user)
	if us.Backend != to.String() || us.Sessions != 0 || us.Moving || us.Expires == nil {
		t.Errorf("after move: %+v, want pinned to %s with no session", us, to)
	}
	if l := e.acquire(t, user); l.Backend != to {
		t.Errorf("next login on %s, want %s", l.Backend, to)
	} else {
		l.Release()
	}
	moves, kicks, kicked, _ := e.obs.get()
	if moves["ok"] != 1 || len(moves) != 1 || kicks["move"] != 1 || kicked["move"] != 2 {
		t.Errorf("observer: moves %v kicks %v kicked %v; want 1 ok move kicking 2 sessions", moves, kicks, kicked)
	}

	// Moving a user to where it already is kicks nobody.
	l3 := e.acquire(t, user)
	t.Cleanup(l3.Release)
	if err := e.d.MoveUser(context.Background(), user, to); err != nil {
		t.Fatalf("move to the current backend: %v", err)
	}
	if isClosed(l3.Done) {
		t.Error("a move to the user's own backend kicked its session")
	}
}

// Logins during a move wait, and then get the new backend, never the old one.
func TestAcquireDuringMoveGetsNewBackend(t *testing.T) {
	e := newEnv(t, Options{})
	const user = "carol@example.com"
	l := e.acquire(t, user)
	from := l.Backend
	to := otherThan(from)
	moved := goMove(e, user, to)
	waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
	if !isClosed(l.Done) {
		t.Fatal("user marked moving but its session not kicked")
	}

	var waiting []<-chan acquired
	for range 5 {
		waiting = append(waiting, goAcquire(context.Background(), e, user))
	}
	time.Sleep(150 * time.Millisecond)
	for i, ch := range waiting {
		select {
		case a := <-ch:
			t.Fatalf("login %d returned during the move: %+v", i, a)
		default:
		}
	}
	releasedAt := time.Now()
	l.Release()
	for i, ch := range waiting {
		a := recv(t, "a waiting login", ch)
		if a.err != nil {
			t.Fatalf("login %d: %v", i, a.err)
		}
		if a.l.Backend != to {
			t.Errorf("login %d during the move went to %s, want the new backend %s (old %s)", i, a.l.Backend, to, from)
		}
		if a.at.Before(releasedAt) {
			t.Errorf("login %d returned before the old session was released", i)
		}
		t.Cleanup(a.l.Release)
	}
	if err := recv(t, "the move", moved); err != nil {
		t.Fatalf("move: %v", err)
	}
	if us := e.d.UserStatus(user); us.Backend != to.String() || us.Sessions != 5 {
		t.Errorf("after move: %+v, want 5 sessions on %s", us, to)
	}
}

// A move whose sessions never close ends after MoveWait; a login waiting
// for it then gets the new backend, and the late close of the old session
// does not count against the new record.
func TestMoveTimeout(t *testing.T) {
	const wait = 300 * time.Millisecond
	e := newEnv(t, Options{MoveWait: wait})
	const user = "dave@example.com"
	stuck := e.acquire(t, user)
	to := otherThan(stuck.Backend)

	start := time.Now()
	moved := goMove(e, user, to)
	waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
	// Logins from now on wait longer than the move does (the move keeps
	// the wait it started with), so this one outlasts the move and then
	// gets the new backend.
	if err := e.d.Reconfigure(15*time.Minute, nil, 10*wait); err != nil {
		t.Fatal(err)
	}
	login := goAcquire(context.Background(), e, user)

	if err := recv(t, "the move", moved); err != nil {
		t.Fatalf("move: %v", err)
	}
	if el := time.Since(start); el < wait || el >= 10*wait {
		t.Errorf("move ended after %v, want its MoveWait %v (a session stayed open)", el, wait)
	}
	if moves, _, _, _ := e.obs.get(); moves["timeout"] != 1 || moves["ok"] != 0 {
		t.Errorf("observer moves %v, want one timeout", moves)
	}
	a := recv(t, "the waiting login", login)
	if a.err != nil || a.l.Backend != to {
		t.Fatalf("login after the timed-out move: %+v, want %s", a, to)
	}
	defer a.l.Release()
	stuck.Release() // the old session finally closes
	if us := e.d.UserStatus(user); us.Backend != to.String() || us.Sessions != 1 {
		t.Errorf("after the old session closed: %+v, want 1 session on %s", us, to)
	}
}

// A login gives up with ErrUnavailable when its own MoveWait ends before
// the move does, and returns the context's error when that ends first.
func TestAcquireGivesUpDuringLongMove(t *testing.T) {
	const moveWait, loginWait = 800 * time.Millisecond, 150 * time.Millisecond
	e := newEnv(t, Options{MoveWait: moveWait})
	const user = "erin@example.com"
	stuck := e.acquire(t, user)
	t.Cleanup(stuck.Release)
	to := otherThan(stuck.Backend)
	moved := goMove(e, user, to) // waits moveWait for the stuck session
	waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
	// Logins from now on wait only loginWait.
	if err := e.d.Reconfigure(15*time.Minute, nil, loginWait); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	l, err := e.d.Acquire(context.Background(), user)
	el := time.Since(start)
	if !errors.Is(err, proxy.ErrUnavailable) {
		t.Fatalf("login during a long move: %v, %v; want ErrUnavailable", l, err)
	}
	if el < loginWait || el > moveWait {
		t.Errorf("login gave up after %v, want about %v", el, loginWait)
	}
	if !e.d.UserStatus(user).Moving {
		t.Error("the move ended before the login gave up; the test proves nothing")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := e.d.Acquire(ctx, user); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("login with a short context during a move: %v", err)
	}

	if err := recv(t, "the move", moved); err != nil {
		t.Fatalf("move: %v", err)
	}
	if l := e.acquire(t, user); l.Backend != to {
		t.Errorf("login after the move on %s, want %s", l.Backend, to)
	} else {
		l.Release()
	}
}

func TestMoveUserErrors(t *testing.T) {
	e := newEnv(t, Options{})
	ctx := context.Background()
	if err := e.d.MoveUser(ctx, "u@example.com", netip.MustParseAddr("10.9.9.9")); !errors.Is(err, ErrNotFound) {
		t.Errorf("move to unknown backend: %v", err)
	}
	if err := e.d.SetBackendUp(ctx, b3, false, "test"); err != nil {
		t.Fatal(err)
	}
	if err := e.d.MoveUser(ctx, "u@example.com", b3); !errors.Is(err, ErrBackendDown) {
		t.Errorf("move to down backend: %v", err)
	}
	if us := e.d.UserStatus("u@example.com"); us.Backend != "" {
		t.Errorf("failed moves created a record: %+v", us)
	}

	t.Run("no record: pinned", func(t *testing.T) {
		user := e.usersHashedTo(t, "pin", b1, 1)[0]
		if err := e.d.MoveUser(ctx, user, b2); err != nil {
			t.Fatal(err)
		}
		us := e.d.UserStatus(user)
		if us.Backend != b2.String() || us.Sessions != 0 || us.Moving || us.Expires == nil || us.HashBackend != b1.String() {
			t.Errorf("pinned user: %+v", us)
		}
		if l := e.acquire(t, user); l.Backend != b2 {
			t.Errorf("login of pinned user on %s, want %s", l.Backend, b2)
		} else {
			l.Release()
		}
	})

	t.Run("concurrent move busy", func(t *testing.T) {
		const user = "busy@example.com"
		l := e.acquire(t, user)
		to := otherThan(l.Backend, b3)
		moved := goMove(e, user, to)
		waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
		if err := e.d.MoveUser(ctx, user, l.Backend); !errors.Is(err, ErrBusy) {
			t.Errorf("second move: %v, want ErrBusy", err)
		}
		l.Release()
		if err := recv(t, "the first move", moved); err != nil {
			t.Fatal(err)
		}
		if us := e.d.UserStatus(user); us.Backend != to.String() {
			t.Errorf("after the moves: %+v, want %s", us, to)
		}
	})
}

func TestKickUser(t *testing.T) {
	e := newEnv(t, Options{})
	a1, a2 := e.acquire(t, "alice@example.com"), e.acquire(t, "alice@example.com")
	bob := e.acquire(t, "bob@example.com")
	defer bob.Release()
	if n := e.d.KickUser("ALICE@example.com"); n != 2 {
		t.Errorf("kicked %d sessions, want 2", n)
	}
	if !isClosed(a1.Done) || !isClosed(a2.Done) {
		t.Error("alice's leases not kicked")
	}
	if isClosed(bob.Done) {
		t.Error("bob's lease kicked")
	}
	// The record stays; the sessions count until the proxy releases them.
	if us := e.d.UserStatus("alice@example.com"); us.Backend != a1.Backend.String() || us.Sessions != 2 {
		t.Errorf("after kick: %+v", us)
	}
	a1.Release()
	a2.Release()
	if us := e.d.UserStatus("alice@example.com"); us.Backend != a1.Backend.String() || us.Sessions != 0 {
		t.Errorf("after release: %+v", us)
	}
	if l := e.acquire(t, "alice@example.com"); l.Backend != a1.Backend || isClosed(l.Done) {
		t.Errorf("login after kick: %s, done %v", l.Backend, isClosed(l.Done))
	} else {
		l.Release()
	}
	if n := e.d.KickUser("nobody@example.com"); n != 0 {
		t.Errorf("kicked %d sessions of a user without any", n)
	}
	_, kicks, kicked, _ := e.obs.get()
	if kicks["kick"] != 2 || kicked["kick"] != 2 {
		t.Errorf("observer kicks %v kicked %v", kicks, kicked)
	}
}

// Flush re-hashes a backend's users, at most maxParallel at a time; users
// that hashing still puts there are kept. Forget drops records only.
func TestFlushAndForget(t *testing.T) {
	e := newEnv(t, Options{})
	ctx := context.Background()
	rel := newReleaser(t)
	var mu sync.Mutex
	maxMoving := 0
	onKick := func() {
		n := e.movingCount()
		mu.Lock()
		maxMoving = max(maxMoving, n)
		mu.Unlock()
	}

	const n = 200
	users := make([]string, n)
	leases := map[string]*proxy.Lease{}
	for i := range n {
		users[i] = fmt.Sprintf("user%03d@example.com", i)
		l := e.acquire(t, users[i])
		if i%3 == 0 {
			leases[users[i]] = l
			rel.watch(l, 30*time.Millisecond, onKick)
		} else {
			l.Release() // the record lives on
		}
	}
	before := map[string]string{}
	for _, u := range users {
		before[u] = e.d.UserStatus(u).Backend
	}
	// Re-weighting moves nobody, but changes where hashing puts users.
	if err := e.d.UpdateBackend(b2, 20); err != nil {
		t.Fatal(err)
	}
	if err := e.d.UpdateBackend(b1, 300); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{} // where each user of b2 must be after the flush
	kept := 0
	for _, u := range users {
		us := e.d.UserStatus(u)
		if us.Backend != before[u] {
			t.Fatalf("re-weighting moved %s from %s to %s", u, before[u], us.Backend)
		}
		if us.Backend == b2.String() {
			want[u] = us.HashBackend
			if us.HashBackend == us.Backend {
				kept++
			}
		}
	}
	if kept == 0 || kept == len(want) {
		t.Fatalf("%d of %d users of %s would stay; the test needs both kinds", kept, len(want), b2)
	}

	res, err := e.d.Flush(ctx, b2, 2)
	if err != nil {
		t.Fatal(err)
	}
	if res != (FlushResult{Users: len(want), Moved: len(want) - kept, Kept: kept}) {
		t.Errorf("flush %s = %+v, want %d users, %d kept", b2, res, len(want), kept)
	}
	for _, u := range users {
		us := e.d.UserStatus(u)
		l := leases[u]
		w, onB2 := want[u]
		switch {
		case !onB2:
			if us.Backend != before[u] {
				t.Errorf("%s on %s was moved to %s by a flush of %s", u, before[u], us.Backend, b2)
			}
			if l != nil && isClosed(l.Done) {
				t.Errorf("%s on %s was kicked by a flush of %s", u, before[u], b2)
			}
		case w == b2.String():
			if us.Backend != w || (l != nil && isClosed(l.Done)) {
				t.Errorf("%s should have been kept on %s: %+v", u, b2, us)
			}
		default:
			if us.Backend != w || us.Moving || us.Sessions != 0 {
				t.Errorf("%s should have been moved to %s: %+v", u, w, us)
			}
			if l != nil && !isClosed(l.Done) {
				t.Errorf("%s moved without kicking its session", u)
			}
		}
	}
	moves, kicks, _, maxInflight := e.obs.get()
	mu.Lock()
	mm := maxMoving
	mu.Unlock()
	if maxInflight != 2 || mm > 2 {
		t.Errorf("flush with maxParallel 2: %d moves in flight at most (observer), %d users moving at once (state); want 2", maxInflight, mm)
	}
	if kicks["flush"] != res.Moved || moves["ok"] != res.Moved {
		t.Errorf("observer kicks %v moves %v, want %d flush kicks and ok moves", kicks, moves, res.Moved)
	}

	t.Run("all", func(t *testing.T) {
		live := len(e.d.Map(netip.Addr{}))
		res, err := e.d.Flush(ctx, netip.Addr{}, 0)
		if err != nil {
			t.Fatal(err)
		}
		if res.Users != live || res.Kept+res.Moved != live || res.Failed != 0 || res.Moved == 0 {
			t.Errorf("flush all = %+v with %d records", res, live)
		}
		for _, u := range users {
			if us := e.d.UserStatus(u); us.Backend != us.HashBackend {
				t.Errorf("after flush all %s is on %s, hashing says %s", u, us.Backend, us.HashBackend)
			}
		}
		if _, err := e.d.Flush(ctx, netip.MustParseAddr("10.9.9.9"), 1); !errors.Is(err, ErrNotFound) {
			t.Errorf("flush of an unknown backend: %v", err)
		}
	})

	t.Run("forget", func(t *testing.T) {
		onB1 := e.usersHashedTo(t, "forget", b1, 5)
		var open []*proxy.Lease
		for _, u := range onB1 {
			l := e.acquire(t, u)
			open = append(open, l)
			t.Cleanup(l.Release)
		}
		recs := len(e.d.Map(b1))
		others := len(e.d.Map(netip.Addr{})) - recs
		got, err := e.d.Forget(b1)
		if err != nil || got != recs {
			t.Fatalf("forget %s = %d, %v; want %d", b1, got, err, recs)
		}
		if m := e.d.Map(b1); len(m) != 0 {
			t.Errorf("records left on %s: %+v", b1, m)
		}
		if m := e.d.Map(netip.Addr{}); len(m) != others {
			t.Errorf("forget %s left %d records, want %d", b1, len(m), others)
		}
		for i, l := range open {
			if isClosed(l.Done) {
				t.Errorf("forget kicked a session of %s", onB1[i])
			}
			if us := e.d.UserStatus(onB1[i]); us.Backend != "" {
				t.Errorf("forgotten user still has a record: %+v", us)
			}
		}
		if _, err := e.d.Forget(netip.MustParseAddr("10.9.9.9")); !errors.Is(err, ErrNotFound) {
			t.Errorf("forget unknown backend: %v", err)
		}
		got, err = e.d.Forget(netip.Addr{})
		if err != nil || got != others {
			t.Errorf("forget all = %d, %v; want %d", got, err, others)
		}
		if m := e.d.Map(netip.Addr{}); len(m) != 0 {
			t.Errorf("records after forget all: %d", len(m))
		}
	})
}

// A backend going down: its users are kicked and their records dropped, so
// they log in elsewhere; other users are not touched.
func TestBackendDownEvacuates(t *testing.T) {
	e := newEnv(t, Options{})
	ctx := context.Background()
	rel := newReleaser(t)
	leases := map[string]*proxy.Lease{}
	for i := range 60 {
		u := fmt.Sprintf("user%02d@example.com", i)
		l := e.acquire(t, u)
		leases[u] = l
		rel.watch(l, 10*time.Millisecond, nil)
	}
	down := leases["user00@example.com"].Backend
	var onDown []string
	for u, l := range leases {
		if l.Backend == down {
			onDown = append(onDown, u)
		}
	}
	if err := e.d.SetBackendUp(ctx, down, false, "maintenance"); err != nil {
		t.Fatal(err)
	}
	for u, l := range leases {
		us := e.d.UserStatus(u)
		if l.Backend == down {
			if !isClosed(l.Done) || us.Backend != "" {
				t.Errorf("%s on the downed backend: kicked %v, record %+v", u, isClosed(l.Done), us)
			}
			continue
		}
		if isClosed(l.Done) || us.Backend != l.Backend.String() || us.Sessions != 1 {
			t.Errorf("%s on %s was touched: kicked %v, %+v", u, l.Backend, isClosed(l.Done), us)
		}
	}
	for _, u := range onDown {
		if l := e.acquire(t, u); l.Backend == down {
			t.Errorf("%s logged in on the downed backend", u)
		} else {
			l.Release()
		}
	}
	_, kicks, kicked, _ := e.obs.get()
	if kicks["backend-down"] != len(onDown) || kicked["backend-down"] != len(onDown) {
		t.Errorf("observer kicks %v kicked %v, want %d users", kicks, kicked, len(onDown))
	}
	st := e.d.Status()
	for _, b := range st.Backends {
		if b.Address == down.String() && (b.Up || b.Users != 0 || b.Cause == nil || b.Cause.Text != "maintenance") {
			t.Errorf("status of the downed backend: %+v (cause %+v)", b, b.Cause)
		}
	}

	isUp := func() bool { b, _ := e.d.Backend(down); return b.Up }
	// Health does not bring back what an admin took down; the admin does.
	if err := e.d.HealthVerdict(ctx, down, true, "probe ok"); err != nil || isUp() {
		t.Fatalf("health verdict up on an admin-downed backend: %v, up %v", err, isUp())
	}
	if err := e.d.SetBackendUp(ctx, down, true, "maintenance over"); err != nil || !isUp() {
		t.Fatalf("admin up: %v, up %v", err, isUp())
	}
	// Health may take it down and bring it back.
	if err := e.d.HealthVerdict(ctx, down, false, "connect refused"); err != nil || isUp() {
		t.Fatalf("health verdict down: %v, up %v", err, isUp())
	}
	for _, b := range e.d.Status().Backends {
		if b.Address == down.String() && (b.Cause == nil || b.Cause.Text != "health check: connect refused") {
			t.Errorf("cause after health down: %+v", b.Cause)
		}
	}
	if err := e.d.HealthVerdict(ctx, down, true, "probe ok"); err != nil || !isUp() {
		t.Fatalf("health verdict up after a health down: %v, up %v", err, isUp())
	}
	// Unknown backends: health is ignored, the admin gets ErrNotFound.
	unknown := netip.MustParseAddr("10.9.9.9")
	bs := e.d.Backends()
	if err := e.d.HealthVerdict(ctx, unknown, false, "x"); err != nil {
		t.Errorf("health verdict on unknown backend: %v", err)
	}
	if err := e.d.SetBackendUp(ctx, unknown, false, "x"); !errors.Is(err, ErrNotFound) {
		t.Errorf("admin down of unknown backend: %v", err)
	}
	if got := e.d.Backends(); fmt.Sprint(got) != fmt.Sprint(bs) {
		t.Errorf("backends changed by verdicts on an unknown backend: %+v", got)
	}
}

func TestRemoveBackendEvacuates(t *testing.T) {
	e := newEnv(t, Options{})
	ctx := context.Background()
	rel := newReleaser(t)
	var gone, stay []*proxy.Lease
	for i := range 30 {
		l := e.acquire(t, fmt.Sprintf("user%02d@example.com", i))
		rel.watch(l, 10*time.Millisecond, nil)
		if l.Backend == b2 {
			gone = append(gone, l)
		} else {
			stay = append(stay, l)
		}
	}
	if len(gone) == 0 {
		t.Fatal("no user on the backend to remove")
	}
	if err := e.d.RemoveBackend(ctx, b2); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.d.Backend(b2); ok {
		t.Error("backend still present")
	}
	for _, l := range gone {
		if !isClosed(l.Done) {
			t.Errorf("%s on the removed backend not kicked", l.User)
		}
		if nl := e.acquire(t, l.User); nl.Backend == b2 {
			t.Errorf("%s logged in on the removed backend", l.User)
		} else {
			nl.Release()
		}
	}
	for _, l := range stay {
		if isClosed(l.Done) || e.d.UserStatus(l.User).Backend != l.Backend.String() {
			t.Errorf("%s on %s touched by the removal", l.User, l.Backend)
		}
	}
	if _, kicks, _, _ := e.obs.get(); kicks["backend-removed"] != len(gone) {
		t.Errorf("observer kicks %v, want %d backend-removed", kicks, len(gone))
	}
	if err := e.d.RemoveBackend(ctx, b2); !errors.Is(err, ErrNotFound) {
		t.Errorf("second removal: %v", err)
	}
}

// Weight 0 drains: existing users stay, new users never arrive.
func TestWeightZeroDrains(t *testing.T) {
	e := newEnv(t, Options{})
	var onB1 []*proxy.Lease
	for i := range 60 {
		l := e.acquire(t, fmt.Sprintf("old%02d@example.com", i))
		if l.Backend == b1 {
			onB1 = append(onB1, l)
			t.Cleanup(l.Release)
		} else {
			l.Release()
		}
	}
	if len(onB1) == 0 {
		t.Fatal("no user on b1")
	}
	if err := e.d.UpdateBackend(b1, 0); err != nil {
		t.Fatal(err)
	}
	if b, _ := e.d.Backend(b1); b.Weight != 0 || !b.Up {
		t.Errorf("backend after drain: %+v", b)
	}
	for _, l := range onB1 {
		if isClosed(l.Done) {
			t.Errorf("draining kicked %s", l.User)
		}
		nl := e.acquire(t, l.User)
		if nl.Backend != b1 {
			t.Errorf("%s moved off the draining backend to %s", l.User, nl.Backend)
		}
		nl.Release()
	}
	for i := range 300 {
		l := e.acquire(t, fmt.Sprintf("new%03d@example.com", i))
		if l.Backend == b1 {
			t.Fatalf("new user %s assigned to the draining backend", l.User)
		}
		l.Release()
	}
	if _, kicks, _, _ := e.obs.get(); len(kicks) != 0 {
		t.Errorf("draining kicked: %v", kicks)
	}
	if err := e.d.UpdateBackend(netip.MustParseAddr("10.9.9.9"), 5); !errors.Is(err, ErrNotFound) {
		t.Errorf("update of unknown backend: %v", err)
	}
}

func TestTags(t *testing.T) {
	pools := map[string]string{"a.example": "pool-a", "b.example": "pool-b", "c.example": "pool-c"}
	tagFor := func(user string) string {
		for i := len(user) - 1; i >= 0; i-- {
			if user[i] == '@' {
				return pools[user[i+1:]]
			}
		}
		return ""
	}
	bA1, bA2 := netip.MustParseAddr("10.0.1.1"), netip.MustParseAddr("10.0.1.2")
	bB, bDef := netip.MustParseAddr("10.0.2.1"), netip.MustParseAddr("10.0.3.1")
	e := newEnv(t, Options{TagFor: tagFor, Backends: []state.Backend{
		{Addr: bA1, Weight: 100, Tag: "pool-a", Up: true},
		{Addr: bA2, Weight: 100, Tag: "pool-a", Up: true},
		{Addr: bB, Weight: 100, Tag: "pool-b", Up: true},
		{Addr: bDef, Weight: 100, Up: true},
	}})
	count := map[netip.Addr]int{}
	for i := range 100 {
		for dom, allowed := range map[string][]netip.Addr{"a.example": {bA1, bA2}, "b.example": {bB}, "other.example": {bDef}} {
			u := fmt.Sprintf("u%d@%s", i, dom)
			l := e.acquire(t, u)
			ok := false
			for _, a := range allowed {
				ok = ok || l.Backend == a
			}
			if !ok {
				t.Fatalf("%s (tag %q) landed on %s, want one of %v", u, tagFor(u), l.Backend, allowed)
			}
			count[l.Backend]++
			l.Release()
		}
	}
	if count[bA1] == 0 || count[bA2] == 0 {
		t.Errorf("pool-a not spread over its backends: %v", count)
	}
	if us := e.d.UserStatus("u1@a.example"); us.Tag != "pool-a" {
		t.Errorf("user status tag %q", us.Tag)
	}
	for _, r := range e.d.Map(netip.Addr{}) {
		if r.Tag != tagFor(r.User) {
			t.Errorf("record %+v has tag %q, want %q", r, r.Tag, tagFor(r.User))
		}
	}
	// A pin without a record keeps the user's pool.
	if err := e.d.MoveUser(context.Background(), "pinned@a.example", bA2); err != nil {
		t.Fatal(err)
	}
	for _, r := range e.d.Map(bA2) {
		if r.User == "pinned@a.example" && r.Tag != "pool-a" {
			t.Errorf("pinned record tag %q, want pool-a", r.Tag)
		}
	}
	// A pool without backends, and one whose backend is down.
	if _, err := e.d.Acquire(context.Background(), "x@c.example"); !errors.Is(err, proxy.ErrUnavailable) {
		t.Errorf("login into an empty pool: %v", err)
	}
	if err := e.d.SetBackendUp(context.Background(), bB, false, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.Acquire(context.Background(), "u1@b.example"); !errors.Is(err, proxy.ErrUnavailable) {
		t.Errorf("login into a pool whose only backend is down: %v", err)
	}
	// A flush keeps users in their pool.
	if err := e.d.AddBackend(state.Backend{Addr: netip.MustParseAddr("10.0.1.3"), Weight: 300, Tag: "pool-a", Up: true}); err != nil {
		t.Fatal(err)
	}
	res, err := e.d.Flush(context.Background(), netip.Addr{}, 4)
	if err != nil || res.Moved == 0 || res.Failed != 0 {
		t.Fatalf("flush all = %+v, %v", res, err)
	}
	tags := map[string]string{}
	for _, b := range e.d.Backends() {
		tags[b.Addr.String()] = b.Tag
	}
	for _, r := range e.d.Map(netip.Addr{}) {
		if tags[r.Backend] != r.Tag {
			t.Errorf("after flush %s (pool %q) is on %s (pool %q)", r.User, r.Tag, r.Backend, tags[r.Backend])
		}
	}
}

// BackendsChanged is called, without locks held, after every change of the
// backend set with the new set.
func TestBackendsChangedHook(t *testing.T) {
	var mu sync.Mutex
	var calls [][]state.Backend
	var d *Director
	e := newEnv(t, Options{BackendsChanged: func(bs []state.Backend) {
		_ = d.Status() // deadlocks if a lock is held
		mu.Lock()
		calls = append(calls, bs)
		mu.Unlock()
	}})
	d = e.d
	ctx := context.Background()
	b4 := netip.MustParseAddr("10.0.0.4")
	last := func(t *testing.T, n int) []state.Backend {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		if len(calls) != n {
			t.Fatalf("%d calls of the hook, want %d", len(calls), n)
		}
		if got, want := fmt.Sprint(calls[n-1]), fmt.Sprint(e.d.Backends()); got != want {
			t.Fatalf("hook got %s, backends are %s", got, want)
		}
		return calls[n-1]
	}
	// The hook calls into the director: if it were called with a lock
	// held, the operation would hang.
	watchdog := time.AfterFunc(10*time.Second, func() {
		panic("BackendsChanged hook deadlocked: called with a lock held?")
	})
	defer watchdog.Stop()
	if err := e.d.AddBackend(state.Backend{Addr: b4, Weight: 10, Up: true}); err != nil {
		t.Fatal(err)
	}
	if b := backendOf(t, last(t, 1), b4); b.Weight != 10 {
		t.Errorf("after add: %+v", b)
	}
	if err := e.d.UpdateBackend(b4, 7); err != nil {
		t.Fatal(err)
	}
	if b := backendOf(t, last(t, 2), b4); b.Weight != 7 {
		t.Errorf("after update: %+v", b)
	}
	if err := e.d.SetBackendUp(ctx, b4, false, "x"); err != nil {
		t.Fatal(err)
	}
	if b := backendOf(t, last(t, 3), b4); b.Up {
		t.Errorf("after down: %+v", b)
	}
	_ = e.d.HealthVerdict(ctx, netip.MustParseAddr("10.9.9.9"), true, "x") // ignored: no call
	if err := e.d.SetBackendUp(ctx, b4, true, "x"); err != nil {
		t.Fatal(err)
	}
	if b := backendOf(t, last(t, 4), b4); !b.Up {
		t.Errorf("after up: %+v", b)
	}
	if err := e.d.RemoveBackend(ctx, b4); err != nil {
		t.Fatal(err)
	}
	if bs := last(t, 5); len(bs) != 3 {
		t.Errorf("after remove: %+v", bs)
	}
}

// A move towards a backend that is removed before the move ends must not
// leave the user stuck: today the final MoveEnd fails (unknown backend),
// the record stays "moving" for ever (moving records never expire), and
// every later login of the user waits MoveWait and fails.
func TestMoveTargetRemovedDuringMove(t *testing.T) {
	e := newEnv(t, Options{MoveWait: 300 * time.Millisecond})
	const user = "frank@example.com"
	l := e.acquire(t, user)
	to := otherThan(l.Backend)
	moved := goMove(e, user, to)
	waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
	if err := e.d.RemoveBackend(context.Background(), to); err != nil {
		t.Fatal(err)
	}
	l.Release()
	err := recv(t, "the move", moved)
	t.Logf("move returned %v", err)
	if us := e.d.UserStatus(user); us.Moving {
		t.Errorf("user still marked moving after the move returned: %+v", us)
	}
	nl, err := e.d.Acquire(context.Background(), user)
	if err != nil {
		t.Fatalf("login after a move to a since-removed backend: %v", err)
	}
	defer nl.Release()
	if _, ok := e.d.Backend(nl.Backend); !ok {
		t.Errorf("login sent to %s, which is not a backend", nl.Backend)
	}
}

// Likewise a backend that goes down during a move towards it: its
// evacuation does not see the moving user (its record is still on the old
// backend), and the move then pins the user to the down backend.
func TestMoveTargetDownDuringMove(t *testing.T) {
	e := newEnv(t, Options{MoveWait: 2 * time.Second})
	const user = "grace@example.com"
	l := e.acquire(t, user)
	to := otherThan(l.Backend)
	moved := goMove(e, user, to)
	waitFor(t, "the move to start", func() bool { return e.d.UserStatus(user).Moving })
	if err := e.d.SetBackendUp(context.Background(), to, false, "maintenance"); err != nil {
		t.Fatal(err)
	}
	l.Release()
	if err := recv(t, "the move", moved); err != nil {
		t.Logf("move returned %v", err)
	}
	nl, err := e.d.Acquire(context.Background(), user)
	if err != nil {
		t.Fatalf("login after the move: %v", err)
	}
	defer nl.Release()
	if nl.Backend == to {
		t.Errorf("user sent to %s, which an admin took down during the move", to)
	}
}
