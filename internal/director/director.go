// Package director decides which backend serves a user and keeps that
// decision: it owns the state machine (internal/state), the routing table
// (internal/route) built from the state's backends, and the clock that
// stamps every command.
//
// Invariants: every change to the state goes through apply, under one mutex,
// so the command log is the complete history; the routing table is rebuilt
// whenever the backend set changes; a user with a live record is never
// re-hashed (see internal/state). Protocol packages see only the small
// proxy.Director interface.
package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// Options configures a Director.
type Options struct {
	Algorithm    route.Algorithm
	HashTemplate string
	UserExpire   time.Duration
	Backends     []state.Backend // the initial backend set
	Logger       *slog.Logger
	Now          func() time.Time // clock; time.Now when nil
}

// Director implements proxy.Director over a local state.
type Director struct {
	alg  route.Algorithm
	tmpl string
	log  *slog.Logger
	now  func() time.Time

	mu    sync.Mutex
	st    *state.State
	table *route.Table
}

// New builds a Director with the given backends.
func New(o Options) (*Director, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.HashTemplate == "" {
		o.HashTemplate = "%Lu"
	}
	if err := route.ValidateTemplate(o.HashTemplate); err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	d := &Director{alg: o.Algorithm, tmpl: o.HashTemplate, log: o.Logger, now: o.Now, st: state.New(o.UserExpire)}
	for _, b := range o.Backends {
		if _, err := d.st.Apply(state.Command{Type: state.CmdAddBackend, Backend: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up}); err != nil {
			return nil, fmt.Errorf("new director: %w", err)
		}
	}
	if err := d.rebuild(); err != nil {
		return nil, fmt.Errorf("new director: %w", err)
	}
	return d, nil
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

// Acquire implements proxy.Director.
func (d *Director) Acquire(ctx context.Context, user string) (*proxy.Lease, error) {
	key := d.Key(user)
	if key == "" {
		return nil, fmt.Errorf("acquire: empty user key: %w", proxy.ErrUnavailable)
	}
	d.mu.Lock()
	now := d.now()
	cmd := state.Command{Type: state.CmdSessionOpen, Time: now, User: key}
	if u, ok := d.st.LiveUser(key, now); ok {
		cmd.Backend = u.Backend
	} else {
		b, ok := d.table.Pick(key, "")
		if !ok {
			d.mu.Unlock()
			return nil, fmt.Errorf("acquire %q: %w", key, proxy.ErrUnavailable)
		}
		cmd.Backend = b
	}
	res, err := d.st.Apply(cmd)
	d.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("acquire %q: %w", key, err)
	}
	if res.Created {
		d.log.Info("user assigned", "user", key, "backend", res.Backend.String())
	}
	return proxy.NewLease(key, res.Backend, nil, func() { d.release(key, res.Backend) }), nil
}

func (d *Director) release(key string, backend netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, err := d.st.Apply(state.Command{Type: state.CmdSessionClose, Time: d.now(), User: key, Backend: backend}); err != nil {
		d.log.Error("release session", "user", key, "err", err)
	}
}

// Expire drops records that expired; call it periodically.
func (d *Director) Expire() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	res, _ := d.st.Apply(state.Command{Type: state.CmdExpire, Time: d.now()})
	return res.Removed
}

// RunExpiry calls Expire every interval until ctx ends.
func (d *Director) RunExpiry(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if n := d.Expire(); n > 0 {
				d.log.Debug("user records expired", "count", n)
			}
		}
	}
}

// ErrNotFound is returned for an unknown backend.
var ErrNotFound = errors.New("not found")

// AddBackend adds a backend; users with live records stay where they are.
func (d *Director) AddBackend(b state.Backend) error {
	return d.applyBackend(state.Command{Type: state.CmdAddBackend, Backend: b.Addr, Weight: b.Weight, Tag: b.Tag, Up: b.Up})
}

func (d *Director) applyBackend(c state.Command) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	c.Time = d.now()
	if _, err := d.st.Apply(c); err != nil {
		return err
	}
	if err := d.rebuild(); err != nil {
		return err
	}
	d.log.Info("backend changed", "op", c.Type.String(), "backend", c.Backend.String(), "weight", c.Weight, "tag", c.Tag)
	return nil
}

// BackendStatus is one backend as shown by `usher status`.
type BackendStatus struct {
	Address  string `json:"address"`
	Weight   int    `json:"weight"`
	Tag      string `json:"tag"`
	Up       bool   `json:"up"`
	Users    int    `json:"users"`
	Sessions int    `json:"sessions"`
}

// Status is the answer to `usher status`.
type Status struct {
	Algorithm string          `json:"algorithm"`
	Backends  []BackendStatus `json:"backends"`
}

// Status returns every backend with its live users and open sessions.
func (d *Director) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	idx := map[netip.Addr]int{}
	st := Status{Algorithm: string(d.alg)}
	for _, b := range d.st.Backends() {
		idx[b.Addr] = len(st.Backends)
		st.Backends = append(st.Backends, BackendStatus{Address: b.Addr.String(), Weight: b.Weight, Tag: b.Tag, Up: b.Up})
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
	User        string     `json:"user"`
	Key         string     `json:"key"`
	Hash        uint32     `json:"hash"`
	Backend     string     `json:"backend"`      // "" when the user has no live record
	Sessions    int        `json:"sessions"`     // open sessions, all protocols
	Expires     *time.Time `json:"expires"`      // nil while sessions are open or without record
	HashBackend string     `json:"hash_backend"` // where hashing would put the user now
}

// UserStatus returns the user's record and the backend hashing picks now.
func (d *Director) UserStatus(user string) UserStatus {
	key := d.Key(user)
	d.mu.Lock()
	defer d.mu.Unlock()
	us := UserStatus{User: user, Key: key, Hash: route.UserHash(key)}
	if u, ok := d.st.LiveUser(key, d.now()); ok {
		us.Backend = u.Backend.String()
		us.Sessions = u.Sessions
		if exp := d.st.ExpiresAt(u); !exp.IsZero() {
			us.Expires = &exp
		}
	}
	if b, ok := d.table.Pick(key, ""); ok {
		us.HashBackend = b.String()
	}
	return us
}
