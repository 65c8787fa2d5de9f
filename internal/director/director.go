// Package director decides which backend serves a user and keeps that
// decision: it owns the state machine (internal/state), the routing table
// (internal/route) built from the state's backends, the clock that stamps
// every command, and the registry of this process's open sessions so that
// users can be kicked and moved.
//
// Invariants:
//   - every change to the state goes through apply, under one mutex, so the
//     command log is the complete history; the routing table is rebuilt
//     whenever the backend set changes;
//   - a user with a live record is never re-hashed (see internal/state);
//   - a user without one gets the backend Table.Pick gives its key or, with
//     a balance factor, Table.PickBounded with the user records on each
//     backend (state.UsersOn) as the load; Acquire, Flush and UserStatus
//     all decide through pickLocked, so they agree;
//   - a user is never on two backends: a move (also a flush, a backend going
//     down or being removed) first marks the record moving, kicks every
//     session of the user, waits until the record counts no session, and
//     only then pins the user elsewhere; logins that arrive meanwhile wait
//     (bounded by MoveWait) and never go to either backend early.
//
// Protocol packages see only the small proxy.Director interface.
package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// Observer receives counts for metrics; metrics.Metrics implements it.
type Observer interface {
	Move(result string)
	Kick(reason string, sessions int)
}

// Options configures a Director.
type Options struct {
	Algorithm route.Algorithm
	// BalanceFactor, when not 0, bounds the load of rendezvous routing: a
	// user without a record goes to the first backend in its rendezvous
	// order that holds fewer user records than
	// ceil(BalanceFactor × (N+1) × weight / total weight), N being the
	// records on the pool's eligible backends (route.Table.PickBounded).
	// 0 (default) is pure hashing; otherwise it must be at least 1. Dovecot
	// routing ignores it.
	BalanceFactor float64
	HashTemplate  string
	UserExpire    time.Duration
	Backends      []state.Backend // the initial backend set when no state file exists
	// TagFor returns the pool of a login name ("" = default pool).
	TagFor func(user string) string
	// MoveWait bounds how long a login waits for a move of its user, and how
	// long a move waits for the kicked sessions to close (default 30s).
	MoveWait time.Duration
	// StateFile, when set, keeps backends and user records across restarts.
	StateFile string
	Observer  Observer
	// BackendsChanged, optional, is called (without locks held) after the
	// backend set or a backend's weight or state changed.
	BackendsChanged func(backends []state.Backend)
	// Health, optional, returns the health checker's view of a backend for
	// `usher status`.
	Health func(addr netip.Addr) (HealthInfo, bool)
	Logger *slog.Logger
	Now    func() time.Time // clock; time.Now when nil
}

// Director implements proxy.Director over a local state.
type Director struct {
	alg       route.Algorithm
	tmpl      string
	log       *slog.Logger
	now       func() time.Time
	obs       Observer
	stateFile string
	changedFn func([]state.Backend)
	healthFn  func(netip.Addr) (HealthInfo, bool)

	mu       sync.Mutex
	st       *state.State
	table    *route.Table
	tagFor   func(string) string
	moveWait time.Duration
	factor   float64 // balance factor; 0 = pure hashing
	// changed is closed and replaced whenever a user record changes, so
	// waiters (logins during a move, moves waiting for sessions) wake up.
	changed chan struct{}
	// sessions holds this process's open sessions per user key.
	sessions map[string]map[*localSession]struct{}
	// causes records why each backend last changed state.
	causes map[netip.Addr]Cause
	dirty  bool // user records changed since the last save

	saveMu sync.Mutex // orders state file writes
}

// Cause says why and when a backend last changed state.
type Cause struct {
	Text string    `json:"cause"`
	Time time.Time `json:"time"`
}

// localSession is one open session of this process; cancelling ctx kicks it.
type localSession struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func (l *localSession) kick() { l.cancel() }

type nopObserver struct{}

func (nopObserver) Move(string)      {}
func (nopObserver) Kick(string, int) {}

// New builds a Director. With a state file that exists, the saved state wins
// over Options.Backends.
func New(o Options) (*Director, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.HashTemplate == "" {
		o.HashTemplate = route.DefaultTemplate
	}
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	if err := route.ValidateTemplate(o.HashTemplate); err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	if err := checkBalanceFactor(o.BalanceFactor); err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	d := &Director{
		alg: o.Algorithm, tmpl: o.HashTemplate, log: o.Logger, now: o.Now, obs: o.Observer,
		changedFn: o.BackendsChanged, healthFn: o.Health,
		stateFile: o.StateFile, st: state.New(o.UserExpire),
		changed: make(chan struct{}), sessions: map[string]map[*localSession]struct{}{},
		causes: map[netip.Addr]Cause{}, factor: o.BalanceFactor,
	}
	d.setRuntime(o.TagFor, o.MoveWait)
	loaded, err := d.load(o.UserExpire)
	if err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	if !loaded {
		for _, b := range o.Backends {
			if _, err := d.st.Apply(state.Command{Type: state.CmdAddBackend, Backend: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up}); err != nil {
				return nil, fmt.Errorf("new director: %w", err)
			}
		}
	}
	if err := d.rebuild(); err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	return d, nil
}

func (d *Director) setRuntime(tagFor func(string) string, moveWait time.Duration) {
	if tagFor == nil {
		tagFor = func(string) string { return "" }
	}
	if moveWait <= 0 {
		moveWait = 30 * time.Second
	}
	d.tagFor, d.moveWait = tagFor, moveWait
}

// HealthInfo is the health checker's view of a backend.
type HealthInfo struct {
	Healthy   bool          `json:"healthy"`
	Checked   *time.Time    `json:"checked,omitempty"` // last probe round
	LastError string        `json:"last_error,omitempty"`
	Latency   time.Duration `json:"latency_ns"`
	HeldDown  bool          `json:"held_down,omitempty"` // flapping: damped
	HeldUntil *time.Time    `json:"held_until,omitempty"`
}

// Backends returns the current backend set.
func (d *Director) Backends() []state.Backend {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.Backends()
}

// Backend returns one backend.
func (d *Director) Backend(addr netip.Addr) (state.Backend, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.Backend(d.canonical(addr))
}

// canonical returns the backend address as the state knows it: an IPv4
// address and its IPv4-mapped form name the same backend (the state keeps
// the form it was added with, which the Dovecot ring hashes). Caller holds mu.
func (d *Director) canonical(addr netip.Addr) netip.Addr {
	if _, ok := d.st.Backend(addr); ok || !addr.IsValid() {
		return addr
	}
	for _, b := range d.st.Backends() {
		if b.Addr.Unmap() == addr.Unmap() {
			return b.Addr
		}
	}
	return addr
}

// backendsChanged tells the BackendsChanged hook. Call without mu held.
func (d *Director) backendsChanged() {
	if d.changedFn != nil {
		d.changedFn(d.Backends())
	}
}

// Reconfigure applies the settings a config reload may change.
func (d *Director) Reconfigure(userExpire time.Duration, tagFor func(string) string, moveWait time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.setRuntime(tagFor, moveWait)
	if userExpire != d.st.Expire() {
		if _, err := d.apply(state.Command{Type: state.CmdSetExpire, Expire: userExpire}); err != nil {
			return fmt.Errorf("reconfigure: %w", err)
		}
	}
	return nil
}

// ErrBadBalanceFactor is returned for a balance factor that is neither 0
// nor a finite number >= 1.
var ErrBadBalanceFactor = errors.New("balance factor must be 0 (off) or a finite number >= 1")

func checkBalanceFactor(f float64) error {
	if f == 0 || (f >= 1 && !math.IsInf(f, 1)) {
		return nil
	}
	return fmt.Errorf("balance factor %v: %w", f, ErrBadBalanceFactor)
}

// SetBalanceFactor changes the balance factor (see Options.BalanceFactor)
// for the users placed from now on; records are not touched. A config
// reload calls it next to Reconfigure.
func (d *Director) SetBalanceFactor(factor float64) error {
	if err := checkBalanceFactor(factor); err != nil {
		return fmt.Errorf("set balance factor: %w", err)
	}
	d.mu.Lock()
	old := d.factor
	d.factor = factor
	d.mu.Unlock()
	if old != factor {
		d.log.Info("balance factor changed", "from", old, "to", factor)
	}
	return nil
}

// pickLocked returns the backend a user without a record gets now: the
// table's Pick, or with a balance factor its PickBounded with the records on
// each backend as the load. own, when valid, is the backend of key's own
// record, which is not counted (the question is then where the user would
// go if its record were dropped), and adj, when not nil, adds planned
// changes to the loads. Caller holds mu.
func (d *Director) pickLocked(key, tag string, own netip.Addr, adj map[netip.Addr]int) (netip.Addr, bool) {
	if d.factor == 0 {
		return d.table.Pick(key, tag)
	}
	return d.table.PickBounded(key, tag, d.factor, func(a netip.Addr) int {
		n := d.st.UsersOn(a)
		if a == own {
			n--
		}
		if adj != nil {
			n += adj[a]
		}
		return n
	})
}

// apply stamps c with the time, applies it and wakes waiters. Caller holds mu.
func (d *Director) apply(c state.Command) (state.Result, error) {
	if c.Time.IsZero() {
		c.Time = d.now()
	}
	res, err := d.st.Apply(c)
	if err != nil {
		return res, err
	}
	switch c.Type {
	case state.CmdAddBackend, state.CmdRemoveBackend, state.CmdSetWeight, state.CmdSetUp:
		if err := d.rebuild(); err != nil {
			return res, err
		}
	}
	d.dirty = true
	close(d.changed)
	d.changed = make(chan struct{})
	return res, nil
}

// rebuild makes the routing table from the state's backends. Caller holds mu
// (or owns d exclusively).
func (d *Director) rebuild() error {
	bs := d.st.Backends()
	rb := make([]route.Backend, len(bs))
	for i, b := range bs {
		rb[i] = route.Backend{Addr: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up}
	}
	t, err := route.NewTable(d.alg, rb)
	if err != nil {
		return err
	}
	d.table = t
	return nil
}

// Key returns the user key (the hash template expanded) for a login name.
func (d *Director) Key(user string) string { return route.ExpandTemplate(d.tmpl, user) }

// errMoving is wrapped in ErrUnavailable when a login waited too long for a move.
var errMoving = errors.New("user is being moved")

// Acquire implements proxy.Director: it returns the user's pinned backend,
// or hashes the user into its pool when there is no live record. While the
// user is being moved it waits, at most MoveWait.
func (d *Director) Acquire(ctx context.Context, user string) (*proxy.Lease, error) {
	key := d.Key(user)
	if key == "" {
		return nil, fmt.Errorf("acquire: empty user key: %w", proxy.ErrUnavailable)
	}
	d.mu.Lock()
	tag := d.tagFor(user)
	var waited <-chan time.Time // the MoveWait bound, from the first wait on
	for {
		now := d.now()
		u, live := d.st.LiveUser(key, now)
		if live && u.Moving {
			ch := d.changed
			if waited == nil {
				timer := time.NewTimer(d.moveWait)
				defer timer.Stop()
				waited = timer.C
			}
			d.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return nil, fmt.Errorf("acquire %q: %w", key, ctx.Err())
			case <-waited:
				d.log.Warn("login waited too long for a move", "user", key)
				return nil, fmt.Errorf("acquire %q: %w: %w", key, errMoving, proxy.ErrUnavailable)
			}
			d.mu.Lock()
			continue
		}
		cmd := state.Command{Type: state.CmdSessionOpen, Time: now, User: key, Tag: tag}
		if live {
			cmd.Backend = u.Backend
		} else {
			b, ok := d.pickLocked(key, tag, netip.Addr{}, nil)
			if !ok {
				d.mu.Unlock()
				d.log.Warn("no backend available in pool", "user", key, "tag", tag)
				return nil, fmt.Errorf("acquire %q: pool %q: %w", key, tag, proxy.ErrUnavailable)
			}
			cmd.Backend = b
		}
		res, err := d.apply(cmd)
		if err != nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("acquire %q: %w", key, err)
		}
		kctx, kcancel := context.WithCancel(context.Background())
		ls := &localSession{ctx: kctx, cancel: kcancel}
		set := d.sessions[key]
		if set == nil {
			set = map[*localSession]struct{}{}
			d.sessions[key] = set
		}
		set[ls] = struct{}{}
		d.mu.Unlock()
		if res.Created {
			d.log.Info("user assigned", "user", key, "backend", res.Backend.String(), "tag", tag)
		}
		backend := res.Backend
		return proxy.NewKickableLease(key, backend, kctx, func() { d.release(key, backend, ls) }), nil
	}
}

func (d *Director) release(key string, backend netip.Addr, ls *localSession) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ls.cancel() // frees the context; the session is over
	if set := d.sessions[key]; set != nil {
		delete(set, ls)
		if len(set) == 0 {
			delete(d.sessions, key)
		}
	}
	if _, err := d.apply(state.Command{Type: state.CmdSessionClose, User: key, Backend: backend}); err != nil {
		d.log.Error("release session", "user", key, "err", err)
	}
}

// kickLocked closes every local session of key. Caller holds mu.
func (d *Director) kickLocked(key string) int {
	n := 0
	for ls := range d.sessions[key] {
		ls.kick()
		n++
	}
	return n
}

// Expire drops records that expired; call it periodically.
func (d *Director) Expire() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	res, _ := d.apply(state.Command{Type: state.CmdExpire})
	return res.Removed
}

// Run expires records every interval and saves the state when it changed,
// until ctx ends; then it saves once more.
func (d *Director) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := d.Save(); err != nil {
				d.log.Error("save state", "err", err)
			}
			return
		case <-t.C:
			if n := d.Expire(); n > 0 {
				d.log.Debug("user records expired", "count", n)
			}
			if err := d.saveIfDirty(); err != nil {
				d.log.Error("save state", "err", err)
			}
		}
	}
}

// UserRecords returns the number of live user records.
func (d *Director) UserRecords() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	n := 0
	for _, u := range d.st.Users() {
		if _, live := d.st.LiveUser(u.Key, now); live {
			n++
		}
	}
	return n
}
