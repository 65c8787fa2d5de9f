// Package state holds the director's replicated state — the backend set and
// the user records that pin users to backends — and changes it only by
// applying commands.
//
// Invariants:
//   - Apply is pure and deterministic: the result depends only on the state
//     and the command. Time travels inside the command (Command.Time); nothing
//     here reads the clock, the network or randomness, so every director of a
//     cluster that applies the same log reaches the same state.
//   - A user with a live record (open sessions, or closed less than Expire
//     ago) stays on its backend: adding, removing or re-weighting other
//     backends never moves it.
//   - UsersOn(b) always equals the number of records (live or not yet swept,
//     moving ones included) whose Backend is b: records are only added,
//     replaced or dropped through setUser and deleteUser, which keep the
//     per-backend counts in step (CmdRestart, which re-pins records in
//     place, moves their counts itself), so reading a count costs one map
//     lookup.
//   - Command types are a public, append-only format (they are stored in the
//     state file and, later, the raft log): numbers are never reused and
//     fields are only added.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"time"
)

// CommandType identifies a command. Values are part of the log format: append only.
type CommandType uint16

// Command types. Never renumber; add new ones at the end.
const (
	CmdAddBackend    CommandType = 1 // Backend, Weight, Tag, Up
	CmdRemoveBackend CommandType = 2 // Backend
	CmdSetWeight     CommandType = 3 // Backend, Weight
	CmdSetUp         CommandType = 4 // Backend, Up, Admin
	CmdSessionOpen   CommandType = 5 // User, Backend (candidate for a new record), Tag, Time
	CmdSessionClose  CommandType = 6 // User, Backend (where the session was), Time
	CmdExpire        CommandType = 7 // Time
	CmdSetExpire     CommandType = 8 // Expire
	// CmdMoveStart marks a live record as moving to Backend (an invalid
	// Backend means "to wherever hashing puts it next"): its sessions are
	// being kicked and new sessions wait. Without a live record it is a no-op.
	CmdMoveStart CommandType = 9 // User, Backend, Time
	// CmdMoveEnd pins User to Backend with no sessions (creating the record
	// if needed), or drops the record when Backend is invalid.
	CmdMoveEnd CommandType = 10 // User, Backend, Tag, Time
	// CmdForget drops the records on Backend (all records when Backend is
	// invalid) that are not moving, whatever their sessions.
	CmdForget CommandType = 11 // Backend
	// CmdRestart is applied when a director starts from a saved state: no
	// session survived, so every record's sessions drop to 0 (its expiry
	// starting at Time) and unfinished moves complete.
	CmdRestart CommandType = 12 // Time
)

var cmdNames = map[CommandType]string{
	CmdAddBackend: "add-backend", CmdRemoveBackend: "remove-backend", CmdSetWeight: "set-weight",
	CmdSetUp: "set-up", CmdSessionOpen: "session-open", CmdSessionClose: "session-close",
	CmdExpire: "expire", CmdSetExpire: "set-expire", CmdMoveStart: "move-start", CmdMoveEnd: "move-end",
	CmdForget: "forget", CmdRestart: "restart",
}

func (t CommandType) String() string {
	if n, ok := cmdNames[t]; ok {
		return n
	}
	return fmt.Sprintf("command-%d", uint16(t))
}

// Command is one change to the state. Unused fields are left zero.
type Command struct {
	Type    CommandType   `json:"type"`
	Time    time.Time     `json:"time,omitzero"`
	User    string        `json:"user,omitempty"`
	Backend netip.Addr    `json:"backend,omitzero"`
	Weight  int           `json:"weight,omitempty"`
	Tag     string        `json:"tag,omitempty"`
	Up      bool          `json:"up,omitempty"`
	Expire  time.Duration `json:"expire,omitempty"`
	// Admin marks a CmdSetUp made by an administrator: an admin's down holds
	// until an admin's up; a health check's up does not lift it.
	Admin bool `json:"admin,omitempty"`
}

// Backend is one mail server in the state.
type Backend struct {
	Addr   netip.Addr `json:"address"`
	Weight int        `json:"weight"`
	Tag    string     `json:"tag,omitempty"`
	Up     bool       `json:"up"`
	// AdminDown is set while an administrator holds the backend down.
	AdminDown bool `json:"admin_down,omitempty"`
}

// User is a user record: the user is pinned to Backend while the record lives.
type User struct {
	Key      string     `json:"user"`
	Backend  netip.Addr `json:"backend"`
	Tag      string     `json:"tag,omitempty"` // the pool the user was hashed in
	Sessions int        `json:"sessions"`
	// Moving is set while the user's sessions are kicked before a move;
	// MoveTo is the destination (invalid: re-hash at the next login).
	Moving bool       `json:"moving,omitempty"`
	MoveTo netip.Addr `json:"move_to,omitzero"`
	// LastSeen is the time of the last session open or close; with no open
	// sessions the record expires at LastSeen + State.Expire.
	LastSeen time.Time `json:"last_seen"`
}

// Errors returned by Apply for commands that cannot apply.
var (
	ErrUnknownBackend = errors.New("unknown backend")
	ErrBackendExists  = errors.New("backend exists")
	ErrBadCommand     = errors.New("bad command")
	// ErrMoving is returned by CmdSessionOpen while the user is being moved.
	ErrMoving = errors.New("user is being moved")
)

// DefaultExpire is the record lifetime after the last session when none was set.
const DefaultExpire = 15 * time.Minute

// State is the director state. The zero value is not usable; call New.
// State is not safe for concurrent use; its owner serializes Apply.
type State struct {
	expire   time.Duration
	backends map[netip.Addr]*Backend
	users    map[string]*User
	// counts[b] is the number of records whose Backend is b; backends
	// without records have no entry. Derived from users: never serialized.
	counts map[netip.Addr]int
}

// New returns an empty state whose records expire after expire.
func New(expire time.Duration) *State {
	if expire <= 0 {
		expire = DefaultExpire
	}
	return &State{expire: expire, backends: map[netip.Addr]*Backend{}, users: map[string]*User{}, counts: map[netip.Addr]int{}}
}

// Result is what applying a command produced.
type Result struct {
	// Backend is the user's backend after a CmdSessionOpen.
	Backend netip.Addr
	// Created is true when CmdSessionOpen created the record.
	Created bool
	// Removed counts records dropped (CmdExpire, CmdRemoveBackend).
	Removed int
}

// Apply applies one command.
func (s *State) Apply(c Command) (Result, error) {
	// Only the wall clock travels in the log; a monotonic reading present on
	// the director that made the command would make it compare differently
	// there than on a director that decoded it.
	c.Time = c.Time.Round(0)
	if y := c.Time.Year(); y < 1 || y > 9999 {
		if !c.Time.IsZero() {
			return Result{}, fmt.Errorf("%s: time %v out of range: %w", c.Type, c.Time, ErrBadCommand)
		}
	}
	switch c.Type {
	case CmdAddBackend:
		if !c.Backend.IsValid() || c.Weight < 0 {
			return Result{}, fmt.Errorf("%s: %w", c.Type, ErrBadCommand)
		}
		// An IPv4 address and its IPv4-mapped IPv6 form are one backend.
		for a := range s.backends {
			if a.Unmap() == c.Backend.Unmap() {
				return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrBackendExists)
			}
		}
		s.backends[c.Backend] = &Backend{Addr: c.Backend, Weight: c.Weight, Tag: c.Tag, Up: c.Up}
		return Result{}, nil
	case CmdRemoveBackend:
		if _, ok := s.backends[c.Backend]; !ok {
			return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
		}
		delete(s.backends, c.Backend)
		// Records pointing at a removed backend are dropped: their users are
		// hashed afresh at their next login.
		n := 0
		for k, u := range s.users {
			if u.Backend == c.Backend {
				s.deleteUser(k)
				n++
				continue
			}
			if u.Moving && u.MoveTo == c.Backend {
				u.MoveTo = netip.Addr{} // the move ends in a re-hash instead
			}
		}
		return Result{Removed: n}, nil
	case CmdSetWeight:
		b, ok := s.backends[c.Backend]
		if !ok {
			return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
		}
		if c.Weight < 0 {
			return Result{}, fmt.Errorf("%s: negative weight: %w", c.Type, ErrBadCommand)
		}
		b.Weight = c.Weight
		return Result{}, nil
	case CmdSetUp:
		b, ok := s.backends[c.Backend]
		if !ok {
			return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
		}
		if c.Admin {
			b.AdminDown = !c.Up
		} else if c.Up && b.AdminDown {
			// Health checks never bring up a backend an admin took down.
			return Result{}, nil
		}
		b.Up = c.Up
		return Result{}, nil
	case CmdSessionOpen:
		return s.sessionOpen(c)
	case CmdSessionClose:
		u, ok := s.users[c.User]
		if !ok || u.Sessions == 0 || (c.Backend.IsValid() && c.Backend != u.Backend) {
			// The record is gone (backend removed, expired) or was replaced
			// by a newer one on another backend: this session was not
			// counted in the current record, so it must not uncount it.
			return Result{}, nil
		}
		u.Sessions--
		if c.Time.After(u.LastSeen) {
			u.LastSeen = c.Time
		}
		return Result{Backend: u.Backend}, nil
	case CmdExpire:
		n := 0
		for k, u := range s.users {
			if s.expired(u, c.Time) {
				s.deleteUser(k)
				n++
			}
		}
		return Result{Removed: n}, nil
	case CmdSetExpire:
		if c.Expire <= 0 {
			return Result{}, fmt.Errorf("%s: %w", c.Type, ErrBadCommand)
		}
		s.expire = c.Expire
		return Result{}, nil
	case CmdMoveStart:
		u, ok := s.users[c.User]
		if !ok || s.expired(u, c.Time) {
			return Result{}, nil
		}
		if c.Backend.IsValid() {
			if _, ok := s.backends[c.Backend]; !ok {
				return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
			}
		}
		u.Moving, u.MoveTo = true, c.Backend
		return Result{Backend: u.Backend}, nil
	case CmdMoveEnd:
		if c.User == "" {
			return Result{}, fmt.Errorf("%s: empty user: %w", c.Type, ErrBadCommand)
		}
		if !c.Backend.IsValid() {
			if _, ok := s.users[c.User]; ok {
				s.deleteUser(c.User)
				return Result{Removed: 1}, nil
			}
			return Result{}, nil
		}
		if _, ok := s.backends[c.Backend]; !ok {
			return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
		}
		tag := c.Tag
		if u, ok := s.users[c.User]; ok && tag == "" {
			tag = u.Tag
		}
		s.setUser(&User{Key: c.User, Backend: c.Backend, Tag: tag, LastSeen: c.Time})
		return Result{Backend: c.Backend, Created: true}, nil
	case CmdForget:
		n := 0
		for k, u := range s.users {
			if !u.Moving && (!c.Backend.IsValid() || u.Backend == c.Backend) {
				s.deleteUser(k)
				n++
			}
		}
		return Result{Removed: n}, nil
	case CmdRestart:
		for k, u := range s.users {
			if u.Moving {
				if !u.MoveTo.IsValid() {
					s.deleteUser(k)
					continue
				}
				s.uncount(u.Backend)
				s.counts[u.MoveTo]++
				u.Backend, u.Moving, u.MoveTo = u.MoveTo, false, netip.Addr{}
				if c.Time.After(u.LastSeen) {
					u.LastSeen = c.Time // the move completes now
				}
			}
			if u.Sessions > 0 {
				u.Sessions = 0
				if c.Time.After(u.LastSeen) {
					u.LastSeen = c.Time
				}
			}
		}
		return Result{}, nil
	}
	return Result{}, fmt.Errorf("apply %s: %w", c.Type, ErrBadCommand)
}

func (s *State) sessionOpen(c Command) (Result, error) {
	if c.User == "" {
		return Result{}, fmt.Errorf("%s: empty user: %w", c.Type, ErrBadCommand)
	}
	if u, ok := s.users[c.User]; ok && !s.expired(u, c.Time) {
		if u.Moving {
			return Result{Backend: u.Backend}, fmt.Errorf("%s %q: %w", c.Type, c.User, ErrMoving)
		}
		u.Sessions++
		u.LastSeen = c.Time
		return Result{Backend: u.Backend}, nil
	}
	if _, ok := s.backends[c.Backend]; !ok {
		return Result{}, fmt.Errorf("%s %s: %w", c.Type, c.Backend, ErrUnknownBackend)
	}
	s.setUser(&User{Key: c.User, Backend: c.Backend, Tag: c.Tag, Sessions: 1, LastSeen: c.Time})
	return Result{Backend: c.Backend, Created: true}, nil
}

// setUser stores u, replacing any record of the same key, and keeps the
// per-backend counts in step.
func (s *State) setUser(u *User) {
	if old, ok := s.users[u.Key]; ok {
		s.uncount(old.Backend)
	}
	s.users[u.Key] = u
	s.counts[u.Backend]++
}

// deleteUser drops key's record, if any, and keeps the counts in step.
func (s *State) deleteUser(key string) {
	if u, ok := s.users[key]; ok {
		s.uncount(u.Backend)
		delete(s.users, key)
	}
}

// uncount takes one record off backend a's count; a count that reaches 0 is
// removed, so that the map only holds backends with records.
func (s *State) uncount(a netip.Addr) {
	if n := s.counts[a] - 1; n > 0 {
		s.counts[a] = n
	} else {
		delete(s.counts, a)
	}
}

// UsersOn returns the number of user records whose backend is addr: live
// ones and expired ones not yet swept by CmdExpire, moving ones (counted on
// the backend they are moving away from) included. addr must be the address
// as the state knows it (see Backends); it does not allocate.
func (s *State) UsersOn(addr netip.Addr) int { return s.counts[addr] }

func (s *State) expired(u *User, now time.Time) bool {
	return u.Sessions == 0 && !u.Moving && !now.Before(u.LastSeen.Add(s.expire))
}

// Expire returns the record lifetime after the last session.
func (s *State) Expire() time.Duration { return s.expire }

// LiveUser returns the user's record if it is live at now.
func (s *State) LiveUser(key string, now time.Time) (User, bool) {
	u, ok := s.users[key]
	if !ok || s.expired(u, now) {
		return User{}, false
	}
	return *u, true
}

// ExpiresAt returns when u's record expires, or the zero time while it has sessions.
func (s *State) ExpiresAt(u User) time.Time {
	if u.Sessions > 0 || u.Moving {
		return time.Time{}
	}
	return u.LastSeen.Add(s.expire)
}

// Backends returns the backends sorted by address.
func (s *State) Backends() []Backend {
	out := make([]Backend, 0, len(s.backends))
	for _, b := range s.backends {
		out = append(out, *b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Less(out[j].Addr) })
	return out
}

// Backend returns one backend.
func (s *State) Backend(addr netip.Addr) (Backend, bool) {
	b, ok := s.backends[addr]
	if !ok {
		return Backend{}, false
	}
	return *b, true
}

// Users returns every record (live or not yet swept), sorted by key.
func (s *State) Users() []User {
	out := make([]User, 0, len(s.users))
	for _, u := range s.users {
		out = append(out, *u)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// snapshot is the serialized form of a State (version 1).
type snapshot struct {
	Version  int       `json:"version"`
	Expire   int64     `json:"expire_ns"`
	Backends []Backend `json:"backends"`
	Users    []User    `json:"users"`
}

// MarshalJSON writes a snapshot of the state, deterministic for equal states.
func (s *State) MarshalJSON() ([]byte, error) {
	return json.Marshal(snapshot{Version: 1, Expire: int64(s.expire), Backends: s.Backends(), Users: s.Users()})
}

// UnmarshalJSON replaces the state with a snapshot.
func (s *State) UnmarshalJSON(b []byte) error {
	var snap snapshot
	if err := json.Unmarshal(b, &snap); err != nil {
		return fmt.Errorf("restore state: %w", err)
	}
	if snap.Version != 1 {
		return fmt.Errorf("restore state: unsupported snapshot version %d", snap.Version)
	}
	n := New(time.Duration(snap.Expire))
	for _, b := range snap.Backends {
		b := b
		n.backends[b.Addr] = &b
	}
	for _, u := range snap.Users {
		u := u
		n.setUser(&u)
	}
	*s = *n
	return nil
}
