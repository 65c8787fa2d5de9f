package director

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// canonicalAddr is canonical under the lock.
func (d *Director) canonicalAddr(addr netip.Addr) netip.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.canonical(addr)
}

// Errors of admin operations; the admin API maps them to HTTP statuses.
var (
	ErrNotFound    = errors.New("not found")
	ErrBackendDown = errors.New("backend is down")
	ErrBusy        = errors.New("user is already being moved")
)

// AddBackend adds a backend; users with live records stay where they are.
func (d *Director) AddBackend(b state.Backend) error {
	d.mu.Lock()
	_, err := d.apply(state.Command{Type: state.CmdAddBackend, Backend: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up})
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("add backend: %w", err)
	}
	d.log.Info("backend added", "backend", b.Addr.String(), "weight", b.Weight, "tag", b.Tag, "cause", "admin")
	d.backendsChanged()
	return d.Save()
}

// UpdateBackend changes a backend's weight. No user with a live record
// moves: weight 0 drains (no new users), others only change new hashing.
func (d *Director) UpdateBackend(addr netip.Addr, weight int) error {
	addr = d.canonicalAddr(addr)
	d.mu.Lock()
	old, ok := d.st.Backend(addr)
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("update backend %s: %w", addr, ErrNotFound)
	}
	_, err := d.apply(state.Command{Type: state.CmdSetWeight, Backend: addr, Weight: weight})
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("update backend %s: %w", addr, err)
	}
	d.log.Info("backend weight changed", "backend", addr.String(), "from", old.Weight, "to", weight, "cause", "admin")
	d.backendsChanged()
	return d.Save()
}

// HealthVerdict applies the health checker's verdict on a backend. A backend
// an admin took down stays down until an admin brings it up (the state
// machine enforces it); verdicts on unknown backends are ignored.
func (d *Director) HealthVerdict(ctx context.Context, addr netip.Addr, up bool, cause string) error {
	if _, known := d.Backend(addr); !known {
		return nil
	}
	return d.setUp(ctx, addr, up, false, "health check: "+cause)
}

// SetBackendUp is the admin's `backend up|down`. An admin's down holds
// against health checks until an admin's up.
func (d *Director) SetBackendUp(ctx context.Context, addr netip.Addr, up bool, cause string) error {
	return d.setUp(ctx, addr, up, true, cause)
}

// setUp marks a backend up or down. Down stops new assignments; its users'
// sessions are kicked and their records dropped, so their next login is
// hashed afresh (after the kicked sessions closed).
func (d *Director) setUp(ctx context.Context, addr netip.Addr, up, admin bool, cause string) error {
	addr = d.canonicalAddr(addr)
	d.mu.Lock()
	before, ok := d.st.Backend(addr)
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("set backend %s: %w", addr, ErrNotFound)
	}
	if _, err := d.apply(state.Command{Type: state.CmdSetUp, Backend: addr, Up: up, Admin: admin}); err != nil {
		d.mu.Unlock()
		return fmt.Errorf("set backend %s: %w", addr, err)
	}
	after, _ := d.st.Backend(addr)
	changed := before.Up != after.Up
	if changed {
		d.causes[addr] = Cause{Text: cause, Time: d.now()}
	}
	d.mu.Unlock()
	switch {
	case changed:
		d.log.Warn("backend state changed", "backend", addr.String(), "up", after.Up, "cause", cause)
	case up && !after.Up:
		d.log.Info("backend healthy but kept down by an admin", "backend", addr.String(), "cause", cause)
	}
	if !after.Up {
		d.evacuate(ctx, addr, "backend-down")
	}
	d.backendsChanged()
	return d.Save()
}

// RemoveBackend evacuates a backend's users, then removes it.
func (d *Director) RemoveBackend(ctx context.Context, addr netip.Addr) error {
	addr = d.canonicalAddr(addr)
	d.mu.Lock()
	_, ok := d.st.Backend(addr)
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("remove backend %s: %w", addr, ErrNotFound)
	}
	d.evacuate(ctx, addr, "backend-removed")
	d.mu.Lock()
	_, err := d.apply(state.Command{Type: state.CmdRemoveBackend, Backend: addr})
	delete(d.causes, addr)
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("remove backend %s: %w", addr, err)
	}
	d.log.Info("backend removed", "backend", addr.String(), "cause", "admin")
	d.backendsChanged()
	return d.Save()
}

// evacuate moves every user of a backend off it (to be re-hashed at their
// next login), all at once.
func (d *Director) evacuate(ctx context.Context, addr netip.Addr, reason string) {
	keys := d.usersOn(addr)
	var wg sync.WaitGroup
	for _, k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.move(ctx, k, netip.Addr{}, reason); err != nil && !errors.Is(err, ErrBusy) {
				d.log.Warn("evacuate user", "user", k, "backend", addr.String(), "err", err)
			}
		}()
	}
	wg.Wait()
	if len(keys) > 0 {
		d.log.Info("backend evacuated", "backend", addr.String(), "users", len(keys), "reason", reason)
	}
}

// usersOn lists the keys of live records on addr (all backends if invalid).
func (d *Director) usersOn(addr netip.Addr) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	var keys []string
	for _, u := range d.st.Users() {
		if _, live := d.st.LiveUser(u.Key, now); live && (!addr.IsValid() || u.Backend == addr) {
			keys = append(keys, u.Key)
		}
	}
	return keys
}

// MoveUser pins user to backend to, after kicking its sessions everywhere.
func (d *Director) MoveUser(ctx context.Context, user string, to netip.Addr) error {
	to = d.canonicalAddr(to)
	d.mu.Lock()
	b, ok := d.st.Backend(to)
	d.mu.Unlock()
	switch {
	case !ok:
		return fmt.Errorf("move %q: backend %s: %w", user, to, ErrNotFound)
	case !b.Up:
		return fmt.Errorf("move %q: backend %s: %w", user, to, ErrBackendDown)
	}
	return d.move(ctx, d.Key(user), to, "move")
}

// move implements every user move: mark moving, kick, wait for the
// sessions to close (at most MoveWait), pin to `to` (or drop the record
// when `to` is invalid). A user without a live record is just pinned.
func (d *Director) move(ctx context.Context, key string, to netip.Addr, reason string) error {
	start := time.Now()
	d.mu.Lock()
	u, live := d.st.LiveUser(key, d.now())
	if !live {
		var err error
		if to.IsValid() {
			_, err = d.apply(state.Command{Type: state.CmdMoveEnd, User: key, Backend: to, Tag: d.tagFor(key)})
		}
		d.mu.Unlock()
		if err == nil && to.IsValid() {
			d.log.Info("user pinned", "user", key, "backend", to.String(), "reason", reason)
		}
		return err
	}
	if u.Moving {
		d.mu.Unlock()
		return fmt.Errorf("move %q: %w", key, ErrBusy)
	}
	if to.IsValid() && u.Backend == to {
		d.mu.Unlock()
		return nil
	}
	if _, err := d.apply(state.Command{Type: state.CmdMoveStart, User: key, Backend: to}); err != nil {
		d.mu.Unlock()
		return fmt.Errorf("move %q: %w", key, err)
	}
	kicked := d.kickLocked(key)
	wait := d.moveWait
	d.mu.Unlock()
	d.obs.Kick(reason, kicked)

	closed := d.waitNoSessions(ctx, key, wait)

	d.mu.Lock()
	if to.IsValid() {
		// The target may have gone down or away while the sessions closed:
		// then the user is re-hashed at the next login instead.
		if b, ok := d.st.Backend(to); !ok || !b.Up {
			d.log.Warn("move target no longer available; user will be re-hashed", "user", key, "backend", to.String())
			to = netip.Addr{}
		}
	}
	_, err := d.apply(state.Command{Type: state.CmdMoveEnd, User: key, Backend: to})
	if err != nil {
		// Never leave a record moving: drop it so the next login re-hashes.
		_, _ = d.apply(state.Command{Type: state.CmdMoveEnd, User: key})
	}
	d.mu.Unlock()
	result := "ok"
	switch {
	case err != nil:
		result = "error"
	case !closed:
		result = "timeout"
	}
	d.obs.Move(result)
	dest := "rehash"
	if to.IsValid() {
		dest = to.String()
	}
	attrs := []any{"user", key, "from", u.Backend.String(), "to", dest, "kicked", kicked, "reason", reason,
		"elapsed", time.Since(start).Round(time.Millisecond).String()}
	switch result {
	case "ok":
		d.log.Info("user moved", attrs...)
	case "timeout":
		d.log.Warn("user moved before all its sessions closed", attrs...)
	default:
		d.log.Error("user move failed", append(attrs, "err", err)...)
		return fmt.Errorf("move %q: %w", key, err)
	}
	return nil
}

// waitNoSessions waits until key's record counts no open session, ctx ends
// or wait passes. It reports whether the sessions closed.
func (d *Director) waitNoSessions(ctx context.Context, key string, wait time.Duration) bool {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		d.mu.Lock()
		u, live := d.st.LiveUser(key, d.now())
		ch := d.changed
		d.mu.Unlock()
		if !live || u.Sessions == 0 {
			return true
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		case <-timer.C:
			return false
		}
	}
}

// KickUser closes every session of user (the record stays); it returns how
// many sessions were kicked.
func (d *Director) KickUser(user string) int {
	key := d.Key(user)
	d.mu.Lock()
	n := d.kickLocked(key)
	d.mu.Unlock()
	d.obs.Kick("kick", n)
	d.log.Info("user kicked", "user", key, "sessions", n, "cause", "admin")
	return n
}

// FlushResult counts what a flush did.
type FlushResult struct {
	Users  int `json:"users"`  // records looked at
	Moved  int `json:"moved"`  // moved to another backend (or dropped for re-hashing)
	Kept   int `json:"kept"`   // hashing still picks their backend
	Failed int `json:"failed"` // moves that failed
}

// Flush re-hashes the users of backend (all users when backend is invalid),
// moving at most maxParallel at a time (0 = 10).
func (d *Director) Flush(ctx context.Context, backend netip.Addr, maxParallel int) (FlushResult, error) {
	backend = d.canonicalAddr(backend)
	if backend.IsValid() {
		d.mu.Lock()
		_, ok := d.st.Backend(backend)
		d.mu.Unlock()
		if !ok {
			return FlushResult{}, fmt.Errorf("flush %s: %w", backend, ErrNotFound)
		}
	}
	if maxParallel <= 0 {
		maxParallel = 10
	}
	plan := d.flushPlan(backend)
	res := FlushResult{Users: len(plan)}
	var mu sync.Mutex
	sem := make(chan struct{}, maxParallel)
	var wg sync.WaitGroup
	for _, p := range plan {
		if p.kept {
			res.Kept++
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			err := d.move(ctx, p.key, p.target, "flush")
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				res.Failed++
				return
			}
			res.Moved++
		}()
	}
	wg.Wait()
	d.log.Info("flush done", "backend", addrOrAll(backend), "users", res.Users, "moved", res.Moved, "kept", res.Kept, "failed", res.Failed)
	return res, d.Save()
}

// flushMove is one user of a flush: its new backend (invalid: no backend
// in its pool now, re-hash at the next login), or kept where it is.
type flushMove struct {
	key    string
	target netip.Addr
	kept   bool
}

// flushPlan decides, under one lock, where each user with a live record on
// backend (every backend when invalid) goes: where hashing puts it as if
// all these records were dropped and the users logged in again one after
// another in key order. Without a balance factor that is Pick for each;
// with one, the loads start without the flushed users and count each user
// of the plan on its new backend as it is placed, so the result is the
// bounded placement a fresh login of them would give: a flush of everyone
// re-balances within the bound.
func (d *Director) flushPlan(backend netip.Addr) []flushMove {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	var us []state.User
	for _, u := range d.st.Users() {
		if _, live := d.st.LiveUser(u.Key, now); live && (!backend.IsValid() || u.Backend == backend) {
			us = append(us, u)
		}
	}
	var adj map[netip.Addr]int
	if d.factor != 0 {
		adj = make(map[netip.Addr]int)
		for _, u := range us {
			adj[u.Backend]--
		}
	}
	plan := make([]flushMove, 0, len(us))
	for _, u := range us {
		target, ok := d.pickLocked(u.Key, u.Tag, netip.Addr{}, adj)
		if !ok {
			target = netip.Addr{}
		}
		if adj != nil && ok {
			adj[target]++
		}
		plan = append(plan, flushMove{key: u.Key, target: target, kept: ok && target == u.Backend})
	}
	return plan
}

// Forget drops the records of backend's users (all when invalid) without
// touching their sessions; it returns how many records were dropped.
func (d *Director) Forget(backend netip.Addr) (int, error) {
	backend = d.canonicalAddr(backend)
	d.mu.Lock()
	if backend.IsValid() {
		if _, ok := d.st.Backend(backend); !ok {
			d.mu.Unlock()
			return 0, fmt.Errorf("forget %s: %w", backend, ErrNotFound)
		}
	}
	res, err := d.apply(state.Command{Type: state.CmdForget, Backend: backend})
	d.mu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("forget: %w", err)
	}
	d.log.Info("user records forgotten", "backend", addrOrAll(backend), "count", res.Removed, "cause", "admin")
	return res.Removed, d.Save()
}

func addrOrAll(a netip.Addr) string {
	if !a.IsValid() {
		return "all"
	}
	return a.String()
}

// Dump returns the commands that rebuild today's backend set.
func (d *Director) Dump() []state.Command {
	d.mu.Lock()
	defer d.mu.Unlock()
	var cmds []state.Command
	for _, b := range d.st.Backends() {
		cmds = append(cmds, state.Command{Type: state.CmdAddBackend, Backend: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up})
	}
	return cmds
}

// BackendStatus is one backend as shown by `usher status`.
type BackendStatus struct {
	Address  string `json:"address"`
	Weight   int    `json:"weight"`
	Tag      string `json:"tag"`
	Up       bool   `json:"up"`
	Users    int    `json:"users"`
	Sessions int    `json:"sessions"`
	// Cause is why the backend last changed state (nil if it never did).
	Cause *Cause `json:"last_change,omitempty"`
	// Health is the health checker's last result (nil when checks are off).
	Health *HealthInfo `json:"health,omitempty"`
}

// Status is the answer to `usher status`.
type Status struct {
	Algorithm string `json:"algorithm"`
	// BalanceFactor is the bound on rendezvous loads (0: pure hashing).
	BalanceFactor float64         `json:"balance_factor,omitempty"`
	Backends      []BackendStatus `json:"backends"`
}

// Status returns every backend with its live users and open sessions.
func (d *Director) Status() Status {
	st := d.status()
	// Asked without d.mu held: the checker may call into the director.
	if d.healthFn != nil {
		for i, b := range st.Backends {
			if h, ok := d.healthFn(netip.MustParseAddr(b.Address)); ok {
				st.Backends[i].Health = &h
			}
		}
	}
	return st
}

func (d *Director) status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	idx := map[netip.Addr]int{}
	st := Status{Algorithm: string(d.alg), BalanceFactor: d.factor}
	for _, b := range d.st.Backends() {
		idx[b.Addr] = len(st.Backends)
		bs := BackendStatus{Address: b.Addr.String(), Weight: b.Weight, Tag: b.Tag, Up: b.Up}
		if c, ok := d.causes[b.Addr]; ok {
			bs.Cause = &c
		}
		st.Backends = append(st.Backends, bs)
	}
	for _, u := range d.st.Users() {
		if _, live := d.st.LiveUser(u.Key, now); !live {
			continue
		}
		if i, ok := idx[u.Backend]; ok {
			st.Backends[i].Users++
			st.Backends[i].Sessions += u.Sessions
		}
	}
	return st
}

// UserStatus is the answer to `usher status USER`.
type UserStatus struct {
	User     string     `json:"user"`
	Key      string     `json:"key"`
	Tag      string     `json:"tag"`
	Hash     uint32     `json:"hash"`
	Backend  string     `json:"backend"`  // "" when the user has no live record
	Sessions int        `json:"sessions"` // open sessions, all protocols
	Moving   bool       `json:"moving"`   // a move is in progress
	Expires  *time.Time `json:"expires"`  // nil while sessions are open or without record
	// HashBackend is where hashing would put the user now (with a balance
	// factor: if its record were dropped and it logged in again).
	HashBackend string `json:"hash_backend"`
}

// UserStatus returns the user's record and the backend hashing picks now.
func (d *Director) UserStatus(user string) UserStatus {
	key := d.Key(user)
	d.mu.Lock()
	defer d.mu.Unlock()
	us := UserStatus{User: user, Key: key, Tag: d.tagFor(user), Hash: route.UserHash(key)}
	var own netip.Addr // the record's backend, not counted in the loads
	if u, ok := d.st.LiveUser(key, d.now()); ok {
		us.Backend = u.Backend.String()
		us.Sessions = u.Sessions
		us.Moving = u.Moving
		if exp := d.st.ExpiresAt(u); !exp.IsZero() {
			us.Expires = &exp
		}
		own = u.Backend
	}
	if b, ok := d.pickLocked(key, us.Tag, own, nil); ok {
		us.HashBackend = b.String()
	}
	return us
}

// UserRecord is one line of `usher map`.
type UserRecord struct {
	User     string     `json:"user"`
	Hash     uint32     `json:"hash"`
	Backend  string     `json:"backend"`
	Tag      string     `json:"tag,omitempty"`
	Sessions int        `json:"sessions"`
	Moving   bool       `json:"moving,omitempty"`
	Expires  *time.Time `json:"expires"` // nil while sessions are open
}

// Map returns every live user record, on backend only when it is valid.
func (d *Director) Map(backend netip.Addr) []UserRecord {
	backend = d.canonicalAddr(backend)
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	out := []UserRecord{}
	for _, u := range d.st.Users() {
		if _, live := d.st.LiveUser(u.Key, now); !live || (backend.IsValid() && u.Backend != backend) {
			continue
		}
		r := UserRecord{User: u.Key, Hash: route.UserHash(u.Key), Backend: u.Backend.String(), Tag: u.Tag, Sessions: u.Sessions, Moving: u.Moving}
		if exp := d.st.ExpiresAt(u); !exp.IsZero() {
			r.Expires = &exp
		}
		out = append(out, r)
	}
	return out
}
