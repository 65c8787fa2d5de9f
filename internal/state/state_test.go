package state_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/state"
)

// update rewrites testdata/commands.golden.json from goldenCommands:
//
//	go test ./internal/state/ -run TestCommandGolden -update
//
// Only do that for an intended, append-only change of the command format.
var update = flag.Bool("update", false, "rewrite testdata/commands.golden.json")

// Fixed test inputs. Never written after initialization.
var (
	t0  = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	bX  = netip.MustParseAddr("192.0.2.1")
	bY  = netip.MustParseAddr("192.0.2.2")
	bZ  = netip.MustParseAddr("2001:db8::3")
	bNo = netip.MustParseAddr("198.51.100.99") // never added
)

const exp = 10 * time.Minute

// apply applies c and fails the test on error.
func apply(t testing.TB, s *state.State, c state.Command) state.Result {
	t.Helper()
	r, err := s.Apply(c)
	if err != nil {
		t.Fatalf("Apply(%+v): %v", c, err)
	}
	return r
}

// applyErr applies c and checks that it fails with want and leaves the state unchanged.
func applyErr(t testing.TB, s *state.State, c state.Command, want error) {
	t.Helper()
	before := snap(t, s)
	r, err := s.Apply(c)
	if !errors.Is(err, want) {
		t.Errorf("Apply(%+v) error = %v, want %v", c, err, want)
	}
	if r != (state.Result{}) {
		t.Errorf("Apply(%+v) failed but returned result %+v", c, r)
	}
	if after := snap(t, s); !bytes.Equal(before, after) {
		t.Errorf("failed Apply(%+v) changed the state:\nbefore %s\nafter  %s", c, before, after)
	}
}

func snap(t testing.TB, s *state.State) []byte {
	t.Helper()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatalf("marshal state: %v", err)
	}
	return b
}

func restore(t testing.TB, b []byte) *state.State {
	t.Helper()
	var r state.State
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("restore state: %v", err)
	}
	return &r
}

func addB(a netip.Addr, w int) state.Command {
	return state.Command{Type: state.CmdAddBackend, Backend: a, Weight: w, Up: true}
}

func open(user string, cand netip.Addr, at time.Time) state.Command {
	return state.Command{Type: state.CmdSessionOpen, User: user, Backend: cand, Time: at}
}

func closeS(user string, at time.Time) state.Command {
	return state.Command{Type: state.CmdSessionClose, User: user, Time: at}
}

// newXY returns a state with expiry exp and backends bX and bY.
func newXY(t testing.TB) *state.State {
	t.Helper()
	s := state.New(exp)
	apply(t, s, addB(bX, 100))
	apply(t, s, addB(bY, 100))
	return s
}

func mustUser(t testing.TB, s *state.State, key string) state.User {
	t.Helper()
	for _, u := range s.Users() {
		if u.Key == key {
			return u
		}
	}
	t.Fatalf("no record for %q; records: %+v", key, s.Users())
	return state.User{}
}

func hasUser(s *state.State, key string) bool {
	for _, u := range s.Users() {
		if u.Key == key {
			return true
		}
	}
	return false
}

func TestCommandTypeString(t *testing.T) {
	want := map[state.CommandType]string{
		state.CmdAddBackend: "add-backend", state.CmdRemoveBackend: "remove-backend",
		state.CmdSetWeight: "set-weight", state.CmdSetUp: "set-up",
		state.CmdSessionOpen: "session-open", state.CmdSessionClose: "session-close",
		state.CmdExpire: "expire", state.CmdSetExpire: "set-expire",
		state.CmdMoveStart: "move-start", state.CmdMoveEnd: "move-end",
		state.CmdForget: "forget", state.CmdRestart: "restart",
		0: "command-0", 13: "command-13", 65535: "command-65535",
	}
	for ct, w := range want {
		if got := ct.String(); got != w {
			t.Errorf("CommandType(%d).String() = %q, want %q", uint16(ct), got, w)
		}
	}
	// The numbers are the log format: they must never change.
	nums := []state.CommandType{state.CmdAddBackend, state.CmdRemoveBackend, state.CmdSetWeight,
		state.CmdSetUp, state.CmdSessionOpen, state.CmdSessionClose, state.CmdExpire, state.CmdSetExpire,
		state.CmdMoveStart, state.CmdMoveEnd, state.CmdForget, state.CmdRestart}
	for i, ct := range nums {
		if uint16(ct) != uint16(i+1) {
			t.Errorf("%s = %d, want %d", ct, uint16(ct), i+1)
		}
	}
}

func TestNewDefaultExpire(t *testing.T) {
	for _, e := range []time.Duration{0, -time.Second} {
		if got := state.New(e).Expire(); got != state.DefaultExpire {
			t.Errorf("New(%v).Expire() = %v, want %v", e, got, state.DefaultExpire)
		}
	}
	if got := state.New(time.Hour).Expire(); got != time.Hour {
		t.Errorf("New(1h).Expire() = %v", got)
	}
	s := state.New(time.Hour)
	if len(s.Backends()) != 0 || len(s.Users()) != 0 {
		t.Errorf("new state not empty: %+v %+v", s.Backends(), s.Users())
	}
}

func TestAddBackend(t *testing.T) {
	s := state.New(exp)
	r := apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bX, Weight: 7, Tag: "rack-a", Up: true})
	if r != (state.Result{}) {
		t.Errorf("add result = %+v, want zero", r)
	}
	want := state.Backend{Addr: bX, Weight: 7, Tag: "rack-a", Up: true}
	if b, ok := s.Backend(bX); !ok || b != want {
		t.Errorf("Backend(%s) = %+v, %v; want %+v", bX, b, ok, want)
	}
	// Weight 0 and down are valid.
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bZ})
	if b, ok := s.Backend(bZ); !ok || b != (state.Backend{Addr: bZ}) {
		t.Errorf("Backend(%s) = %+v, %v", bZ, b, ok)
	}

	t.Run("duplicate", func(t *testing.T) {
		applyErr(t, s, state.Command{Type: state.CmdAddBackend, Backend: bX, Weight: 1}, state.ErrBackendExists)
		if b, _ := s.Backend(bX); b != want {
			t.Errorf("duplicate add changed backend to %+v", b)
		}
	})
	t.Run("invalid address", func(t *testing.T) {
		applyErr(t, s, state.Command{Type: state.CmdAddBackend, Weight: 1}, state.ErrBadCommand)
		if _, ok := s.Backend(netip.Addr{}); ok {
			t.Error("zero address was added")
		}
	})
	t.Run("negative weight", func(t *testing.T) {
		applyErr(t, s, state.Command{Type: state.CmdAddBackend, Backend: bY, Weight: -1}, state.ErrBadCommand)
		if _, ok := s.Backend(bY); ok {
			t.Error("backend with negative weight was added")
		}
	})
	if _, ok := s.Backend(bNo); ok {
		t.Error("Backend of an unknown address reports ok")
	}
}

func TestRemoveBackend(t *testing.T) {
	s := newXY(t)
	applyErr(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bNo}, state.ErrUnknownBackend)

	// On X: one user with an open session, one closed but live, one
	// expired but not swept. On Y: two users.
	apply(t, s, open("x-open", bX, t0))
	apply(t, s, open("x-closed", bX, t0))
	apply(t, s, closeS("x-closed", t0.Add(time.Minute)))
	apply(t, s, open("x-stale", bX, t0.Add(-time.Hour)))
	apply(t, s, closeS("x-stale", t0.Add(-time.Hour)))
	apply(t, s, open("y-open", bY, t0))
	apply(t, s, open("y-closed", bY, t0))
	apply(t, s, closeS("y-closed", t0))
	yBefore := []state.User{mustUser(t, s, "y-closed"), mustUser(t, s, "y-open")}

	r := apply(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bX})
	if r.Removed != 3 {
		t.Errorf("Removed = %d, want 3", r.Removed)
	}
	if _, ok := s.Backend(bX); ok {
		t.Error("removed backend still present")
	}
	if got := s.Backends(); len(got) != 1 || got[0].Addr != bY {
		t.Errorf("Backends() = %+v, want only %s", got, bY)
	}
	if got := s.Users(); !slices.Equal(got, yBefore) {
		t.Errorf("Users() after removal = %+v, want %+v", got, yBefore)
	}
	// A dropped user is hashed afresh: the next open takes the candidate.
	if r := apply(t, s, open("x-open", bY, t0.Add(2*time.Minute))); !r.Created || r.Backend != bY {
		t.Errorf("open after removal = %+v, want created on %s", r, bY)
	}
	// Removing twice fails.
	applyErr(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bX}, state.ErrUnknownBackend)
	// Removing a backend without records removes nothing.
	apply(t, s, addB(bZ, 1))
	if r := apply(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bZ}); r.Removed != 0 {
		t.Errorf("Removed = %d for an empty backend", r.Removed)
	}
}

func TestSetWeight(t *testing.T) {
	s := newXY(t)
	applyErr(t, s, state.Command{Type: state.CmdSetWeight, Backend: bNo, Weight: 5}, state.ErrUnknownBackend)
	applyErr(t, s, state.Command{Type: state.CmdSetWeight, Backend: bX, Weight: -5}, state.ErrBadCommand)
	if b, _ := s.Backend(bX); b.Weight != 100 {
		t.Errorf("weight after rejected set = %d, want 100", b.Weight)
	}
	apply(t, s, state.Command{Type: state.CmdSetWeight, Backend: bX, Weight: 3})
	if b, _ := s.Backend(bX); b.Weight != 3 || !b.Up {
		t.Errorf("backend after set-weight = %+v", b)
	}

	// A user with a live record stays on a weight-0 backend, with open
	// sessions and after they close (until expiry).
	apply(t, s, open("alice", bX, t0))
	apply(t, s, state.Command{Type: state.CmdSetWeight, Backend: bX, Weight: 0})
	if r := apply(t, s, open("alice", bY, t0.Add(time.Minute))); r.Backend != bX || r.Created {
		t.Errorf("open on weight-0 backend = %+v, want kept on %s", r, bX)
	}
	apply(t, s, closeS("alice", t0.Add(2*time.Minute)))
	apply(t, s, closeS("alice", t0.Add(2*time.Minute)))
	if r := apply(t, s, open("alice", bY, t0.Add(2*time.Minute+exp-1))); r.Backend != bX || r.Created {
		t.Errorf("open of a closed live record on weight-0 backend = %+v, want kept on %s", r, bX)
	}
}

func TestSetUp(t *testing.T) {
	s := newXY(t)
	applyErr(t, s, state.Command{Type: state.CmdSetUp, Backend: bNo, Up: true}, state.ErrUnknownBackend)
	apply(t, s, state.Command{Type: state.CmdSetUp, Backend: bX, Up: false})
	if b, _ := s.Backend(bX); b.Up || b.Weight != 100 {
		t.Errorf("backend after set-up false = %+v", b)
	}
	apply(t, s, state.Command{Type: state.CmdSetUp, Backend: bX, Up: true})
	if b, _ := s.Backend(bX); !b.Up {
		t.Errorf("backend after set-up true = %+v", b)
	}

	// A live record on a down backend is kept: the state does not move users.
	apply(t, s, open("alice", bX, t0))
	apply(t, s, state.Command{Type: state.CmdSetUp, Backend: bX, Up: false})
	if u, ok := s.LiveUser("alice", t0.Add(time.Hour)); !ok || u.Backend != bX || u.Sessions != 1 {
		t.Errorf("LiveUser after backend down = %+v, %v", u, ok)
	}
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(time.Hour)}); r.Removed != 0 {
		t.Errorf("expire removed %d records with an open session on a down backend", r.Removed)
	}
	if r := apply(t, s, open("alice", bY, t0.Add(time.Hour))); r.Backend != bX || r.Created {
		t.Errorf("open on down backend = %+v, want kept on %s", r, bX)
	}
}

func TestSessionOpen(t *testing.T) {
	s := newXY(t)
	r := apply(t, s, open("alice", bX, t0))
	if r != (state.Result{Backend: bX, Created: true}) {
		t.Errorf("first open = %+v", r)
	}
	if u := mustUser(t, s, "alice"); u != (state.User{Key: "alice", Backend: bX, Sessions: 1, LastSeen: t0}) {
		t.Errorf("record = %+v", u)
	}

	// Second open ignores the candidate, even an unknown one.
	t1 := t0.Add(time.Minute)
	if r := apply(t, s, open("alice", bY, t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("second open = %+v, want pinned %s", r, bX)
	}
	if r := apply(t, s, open("alice", bNo, t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("open with unknown candidate on a live record = %+v", r)
	}
	if r := apply(t, s, open("alice", netip.Addr{}, t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("open with no candidate on a live record = %+v", r)
	}
	if u := mustUser(t, s, "alice"); u.Sessions != 4 || u.LastSeen != t1 || u.Backend != bX {
		t.Errorf("record after 4 opens = %+v", u)
	}

	t.Run("unknown candidate on create", func(t *testing.T) {
		applyErr(t, s, open("bob", bNo, t0), state.ErrUnknownBackend)
		applyErr(t, s, open("bob", netip.Addr{}, t0), state.ErrUnknownBackend)
		if hasUser(s, "bob") {
			t.Error("failed open created a record")
		}
	})
	t.Run("empty user", func(t *testing.T) {
		applyErr(t, s, open("", bX, t0), state.ErrBadCommand)
	})

	t.Run("expired record is replaced", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("carol", bX, t0))
		apply(t, s, closeS("carol", t0))
		// One nanosecond before expiry the record is live.
		if r := apply(t, s, open("carol", bY, t0.Add(exp-1))); r != (state.Result{Backend: bX}) {
			t.Errorf("open 1ns before expiry = %+v, want pinned %s", r, bX)
		}
		t1 := t0.Add(exp - 1)
		apply(t, s, closeS("carol", t1))
		// Exactly at LastSeen+Expire it is expired: the candidate wins.
		if r := apply(t, s, open("carol", bY, t1.Add(exp))); r != (state.Result{Backend: bY, Created: true}) {
			t.Errorf("open at expiry = %+v, want created on %s", r, bY)
		}
		if u := mustUser(t, s, "carol"); u != (state.User{Key: "carol", Backend: bY, Sessions: 1, LastSeen: t1.Add(exp)}) {
			t.Errorf("replaced record = %+v", u)
		}
	})
	t.Run("expired record with unknown candidate", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("dave", bX, t0))
		apply(t, s, closeS("dave", t0))
		if _, err := s.Apply(open("dave", bNo, t0.Add(exp))); !errors.Is(err, state.ErrUnknownBackend) {
			t.Errorf("open of an expired record with unknown candidate: err = %v", err)
		}
		if _, ok := s.LiveUser("dave", t0.Add(exp)); ok {
			t.Error("failed open revived an expired record")
		}
	})
}

func TestSessionClose(t *testing.T) {
	s := newXY(t)
	apply(t, s, open("alice", bX, t0))
	apply(t, s, open("alice", bY, t0))
	t1 := t0.Add(3 * time.Minute)
	if r := apply(t, s, closeS("alice", t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("close result = %+v", r)
	}
	if u := mustUser(t, s, "alice"); u.Sessions != 1 || u.LastSeen != t1 {
		t.Errorf("after 1 close: %+v", u)
	}
	t2 := t1.Add(time.Minute)
	apply(t, s, closeS("alice", t2))
	if u := mustUser(t, s, "alice"); u.Sessions != 0 || u.LastSeen != t2 {
		t.Errorf("after 2 closes: %+v", u)
	}
	// Never below 0, and a stray close (no session counted) neither moves
	// LastSeen nor revives the record.
	t3 := t2.Add(time.Minute)
	apply(t, s, closeS("alice", t3))
	if u := mustUser(t, s, "alice"); u.Sessions != 0 || u.LastSeen != t2 {
		t.Errorf("after an extra close: %+v", u)
	}
	// Closing all sessions starts the expiry clock from the last close.
	if got := s.ExpiresAt(mustUser(t, s, "alice")); got != t2.Add(exp) {
		t.Errorf("ExpiresAt = %v, want %v", got, t2.Add(exp))
	}

	// Unknown user: a no-op that creates nothing.
	before := snap(t, s)
	r, err := s.Apply(closeS("nobody", t3))
	if err != nil || r != (state.Result{}) {
		t.Errorf("close of unknown user = %+v, %v", r, err)
	}
	if !bytes.Equal(before, snap(t, s)) {
		t.Error("close of unknown user changed the state")
	}
}

func TestExpire(t *testing.T) {
	s := newXY(t)
	// Open for ages: never expires.
	apply(t, s, open("ancient-open", bX, t0.Add(-1000*time.Hour)))
	// Closed at t0.
	apply(t, s, open("closed-t0", bX, t0))
	apply(t, s, closeS("closed-t0", t0))
	apply(t, s, open("closed-t0-y", bY, t0))
	apply(t, s, closeS("closed-t0-y", t0))
	// Closed one nanosecond later.
	apply(t, s, open("closed-later", bY, t0))
	apply(t, s, closeS("closed-later", t0.Add(1)))

	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(exp - 1)}); r.Removed != 0 {
		t.Errorf("expire 1ns early removed %d", r.Removed)
	}
	if len(s.Users()) != 4 {
		t.Fatalf("users = %+v", s.Users())
	}
	// Exactly at LastSeen+Expire: expired.
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(exp)}); r.Removed != 2 {
		t.Errorf("expire at boundary removed %d, want 2", r.Removed)
	}
	var keys []string
	for _, u := range s.Users() {
		keys = append(keys, u.Key)
	}
	if want := []string{"ancient-open", "closed-later"}; !slices.Equal(keys, want) {
		t.Errorf("after expiry: %v, want %v", keys, want)
	}
	// An open session never expires, however old.
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(100000 * time.Hour)}); r.Removed != 1 {
		t.Errorf("far expire removed %d, want 1", r.Removed)
	}
	if u := mustUser(t, s, "ancient-open"); u.Sessions != 1 || u.Backend != bX {
		t.Errorf("open record after far expire: %+v", u)
	}
	// Expire on an empty sweep removes nothing and keeps backends.
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(100000 * time.Hour)}); r.Removed != 0 {
		t.Errorf("second sweep removed %d", r.Removed)
	}
	if len(s.Backends()) != 2 {
		t.Errorf("expire touched backends: %+v", s.Backends())
	}
}

func TestSetExpire(t *testing.T) {
	s := newXY(t)
	for _, e := range []time.Duration{0, -time.Minute} {
		applyErr(t, s, state.Command{Type: state.CmdSetExpire, Expire: e}, state.ErrBadCommand)
	}
	if s.Expire() != exp {
		t.Errorf("Expire() = %v after rejected set", s.Expire())
	}
	apply(t, s, open("alice", bX, t0))
	apply(t, s, closeS("alice", t0))
	at := t0.Add(7 * time.Minute)
	if _, ok := s.LiveUser("alice", at); !ok {
		t.Fatal("record not live before set-expire")
	}
	// Shortening the expiry applies to existing records.
	apply(t, s, state.Command{Type: state.CmdSetExpire, Expire: 5 * time.Minute})
	if s.Expire() != 5*time.Minute {
		t.Errorf("Expire() = %v", s.Expire())
	}
	if _, ok := s.LiveUser("alice", at); ok {
		t.Error("record still live after shortening expiry")
	}
	if got := s.ExpiresAt(mustUser(t, s, "alice")); got != t0.Add(5*time.Minute) {
		t.Errorf("ExpiresAt = %v", got)
	}
	// Lengthening it applies as well (the record is not swept yet).
	apply(t, s, state.Command{Type: state.CmdSetExpire, Expire: time.Hour})
	if r := apply(t, s, open("alice", bY, at)); r != (state.Result{Backend: bX}) {
		t.Errorf("open after lengthening expiry = %+v", r)
	}
	// Shortened again and swept.
	apply(t, s, closeS("alice", at))
	apply(t, s, state.Command{Type: state.CmdSetExpire, Expire: time.Second})
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: at.Add(time.Second)}); r.Removed != 1 {
		t.Errorf("sweep after shortening removed %d", r.Removed)
	}
}

func TestUnknownCommandType(t *testing.T) {
	s := newXY(t)
	apply(t, s, open("alice", bX, t0))
	for _, ct := range []state.CommandType{0, 13, 1000, 65535} {
		applyErr(t, s, state.Command{Type: ct, User: "alice", Backend: bX, Time: t0, Expire: time.Second}, state.ErrBadCommand)
	}
	_, err := s.Apply(state.Command{Type: 42})
	if err == nil || !strings.Contains(err.Error(), "command-42") {
		t.Errorf("error %v does not name the command", err)
	}
}

func TestErrorsNameTheCommand(t *testing.T) {
	s := newXY(t)
	_, err := s.Apply(state.Command{Type: state.CmdRemoveBackend, Backend: bNo})
	if err == nil || !strings.Contains(err.Error(), "remove-backend") || !strings.Contains(err.Error(), bNo.String()) {
		t.Errorf("error %q does not name the command and backend", err)
	}
}

func TestLiveUserAndExpiresAt(t *testing.T) {
	s := newXY(t)
	if _, ok := s.LiveUser("alice", t0); ok {
		t.Error("unknown user is live")
	}
	apply(t, s, open("alice", bX, t0))
	u, ok := s.LiveUser("alice", t0.Add(1000*time.Hour))
	if !ok || u != (state.User{Key: "alice", Backend: bX, Sessions: 1, LastSeen: t0}) {
		t.Errorf("LiveUser with open session = %+v, %v", u, ok)
	}
	if got := s.ExpiresAt(u); !got.IsZero() {
		t.Errorf("ExpiresAt with open session = %v, want zero", got)
	}
	t1 := t0.Add(time.Minute)
	apply(t, s, closeS("alice", t1))
	u, ok = s.LiveUser("alice", t1)
	if !ok || u.Sessions != 0 {
		t.Fatalf("LiveUser after close = %+v, %v", u, ok)
	}
	end := s.ExpiresAt(u)
	if end != t1.Add(exp) {
		t.Errorf("ExpiresAt = %v, want %v", end, t1.Add(exp))
	}
	if _, ok := s.LiveUser("alice", end.Add(-1)); !ok {
		t.Error("not live 1ns before ExpiresAt")
	}
	if _, ok := s.LiveUser("alice", end); ok {
		t.Error("live at ExpiresAt")
	}
	// Not live but still listed until swept.
	if !hasUser(s, "alice") {
		t.Error("Users() dropped an unswept record")
	}
	// LiveUser returns a copy.
	u.Backend = bY
	if got := mustUser(t, s, "alice"); got.Backend != bX {
		t.Error("changing LiveUser's result changed the state")
	}
}

func TestBackendsAndUsersSorted(t *testing.T) {
	s := state.New(exp)
	addrs := []string{"2001:db8::1", "192.0.2.20", "10.0.0.1", "192.0.2.3", "::1", "2001:db8::", "10.0.0.0"}
	for _, a := range addrs {
		apply(t, s, addB(netip.MustParseAddr(a), 1))
	}
	var got []string
	for _, b := range s.Backends() {
		got = append(got, b.Addr.String())
	}
	want := []string{"10.0.0.0", "10.0.0.1", "192.0.2.3", "192.0.2.20", "::1", "2001:db8::", "2001:db8::1"}
	if !slices.Equal(got, want) {
		t.Errorf("Backends() order = %v, want %v", got, want)
	}

	users := []string{"zed", "Alice", "alice", "bob@example.org", "ä", "a", "bob"}
	for _, u := range users {
		apply(t, s, open(u, netip.MustParseAddr("::1"), t0))
	}
	var keys []string
	for _, u := range s.Users() {
		keys = append(keys, u.Key)
	}
	wantKeys := []string{"Alice", "a", "alice", "bob", "bob@example.org", "zed", "ä"}
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("Users() order = %v, want %v", keys, wantKeys)
	}
	// Results are copies.
	bs := s.Backends()
	bs[0].Weight = 99
	if b, _ := s.Backend(bs[0].Addr); b.Weight != 1 {
		t.Error("changing Backends()' result changed the state")
	}
}

// buildState returns a state with every kind of backend and record.
func buildState(t testing.TB) *state.State {
	t.Helper()
	s := state.New(exp)
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bX, Weight: 100, Tag: "rack-a", Up: true})
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bY, Weight: 0})
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bZ, Weight: 5, Up: true})
	apply(t, s, open("open2", bX, t0.Add(123456789)))
	apply(t, s, open("open2", bX, t0.Add(2*time.Second)))
	apply(t, s, open("closed", bZ, t0))
	apply(t, s, closeS("closed", t0.Add(time.Minute)))
	apply(t, s, open("stale", bY, t0.Add(-time.Hour)))
	apply(t, s, closeS("stale", t0.Add(-time.Hour)))
	apply(t, s, state.Command{Type: state.CmdSetExpire, Expire: 20 * time.Minute})
	return s
}

// tail is a command sequence that exercises every kind of record in buildState.
func tail() []state.Command {
	t1 := t0.Add(5 * time.Minute)
	return []state.Command{
		open("open2", bY, t1),
		open("closed", bX, t1),
		open("stale", bX, t1), // expired: replaced
		open("new", bY, t1),
		closeS("open2", t1), closeS("open2", t1), closeS("open2", t1),
		{Type: state.CmdRemoveBackend, Backend: bZ},
		{Type: state.CmdSetWeight, Backend: bX, Weight: -1},
		{Type: state.CmdExpire, Time: t1.Add(20 * time.Minute)},
		open("open2", bY, t1.Add(20*time.Minute)),
		{Type: state.CmdSetExpire, Expire: time.Minute},
		{Type: state.CmdExpire, Time: t1.Add(21 * time.Minute)},
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	s := buildState(t)
	b := snap(t, s)
	r := restore(t, b)

	if r.Expire() != s.Expire() {
		t.Errorf("Expire %v != %v", r.Expire(), s.Expire())
	}
	if !slices.Equal(r.Backends(), s.Backends()) {
		t.Errorf("Backends differ:\n%+v\n%+v", r.Backends(), s.Backends())
	}
	if !slices.Equal(r.Users(), s.Users()) {
		t.Errorf("Users differ:\n%+v\n%+v", r.Users(), s.Users())
	}
	if b2 := snap(t, r); !bytes.Equal(b, b2) {
		t.Errorf("re-marshalled snapshot differs:\n%s\n%s", b, b2)
	}

	// Equal future behaviour.
	for i, c := range tail() {
		r1, e1 := s.Apply(c)
		r2, e2 := r.Apply(c)
		if r1 != r2 || fmt.Sprint(e1) != fmt.Sprint(e2) {
			t.Errorf("tail[%d] %s: original %+v, %v; restored %+v, %v", i, c.Type, r1, e1, r2, e2)
		}
	}
	if b1, b2 := snap(t, s), snap(t, r); !bytes.Equal(b1, b2) {
		t.Errorf("snapshots after tail differ:\n%s\n%s", b1, b2)
	}

	// Restoring into a used state replaces it entirely.
	used := newXY(t)
	apply(t, used, open("other", bX, t0))
	if err := used.UnmarshalJSON(b); err != nil {
		t.Fatal(err)
	}
	if got := snap(t, used); !bytes.Equal(got, b) {
		t.Errorf("restore into used state:\n%s\nwant\n%s", got, b)
	}
}

func TestSnapshotRoundTripKeepsZone(t *testing.T) {
	zone := time.FixedZone("", 2*3600)
	s := newXY(t)
	at := t0.In(zone)
	apply(t, s, open("alice", bX, at))
	apply(t, s, closeS("alice", at))
	r := restore(t, snap(t, s))
	u := mustUser(t, r, "alice")
	if !u.LastSeen.Equal(at) {
		t.Errorf("LastSeen %v, want %v", u.LastSeen, at)
	}
	if _, off := u.LastSeen.Zone(); off != 2*3600 {
		t.Errorf("zone offset %d lost", off)
	}
	if !r.ExpiresAt(u).Equal(t0.Add(exp)) {
		t.Errorf("ExpiresAt %v", r.ExpiresAt(u))
	}
}

// TestSnapshotFormat pins the snapshot encoding: the state file stores it.
func TestSnapshotFormat(t *testing.T) {
	s := state.New(time.Minute)
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bX, Weight: 2, Tag: "t", Up: true})
	apply(t, s, state.Command{Type: state.CmdAddBackend, Backend: bY})
	apply(t, s, open("u", bX, t0))
	want := `{"version":1,"expire_ns":60000000000,` +
		`"backends":[{"address":"192.0.2.1","weight":2,"tag":"t","up":true},{"address":"192.0.2.2","weight":0,"up":false}],` +
		`"users":[{"user":"u","backend":"192.0.2.1","sessions":1,"last_seen":"2025-01-02T03:04:05Z"}]}`
	if got := string(snap(t, s)); got != want {
		t.Errorf("snapshot\n got %s\nwant %s", got, want)
	}
	if got := string(snap(t, state.New(time.Minute))); got != `{"version":1,"expire_ns":60000000000,"backends":[],"users":[]}` {
		t.Errorf("empty snapshot %s", got)
	}
}

func TestSnapshotIndependentOfInsertionOrder(t *testing.T) {
	a, b := state.New(exp), state.New(exp)
	for _, x := range []netip.Addr{bX, bY, bZ} {
		apply(t, a, addB(x, 1))
	}
	for _, x := range []netip.Addr{bZ, bX, bY} {
		apply(t, b, addB(x, 1))
	}
	for i := range 20 {
		apply(t, a, open(fmt.Sprintf("u%02d", i), bX, t0))
		apply(t, b, open(fmt.Sprintf("u%02d", 19-i), bX, t0))
	}
	if sa, sb := snap(t, a), snap(t, b); !bytes.Equal(sa, sb) {
		t.Errorf("snapshots differ:\n%s\n%s", sa, sb)
	}
}

func TestSnapshotErrors(t *testing.T) {
	s := buildState(t)
	before := snap(t, s)
	cases := map[string]string{
		"version 0":       `{"expire_ns":1,"backends":[],"users":[]}`,
		"version 2":       `{"version":2,"expire_ns":1,"backends":[],"users":[]}`,
		"null":            `null`,
		"garbage":         `not json`,
		"truncated":       string(before[:len(before)/2]),
		"wrong type":      `{"version":"1"}`,
		"bad address":     `{"version":1,"backends":[{"address":"300.1.1.1"}]}`,
		"bad time":        `{"version":1,"users":[{"user":"u","last_seen":"yesterday"}]}`,
		"array":           `[1,2,3]`,
		"sessions string": `{"version":1,"users":[{"user":"u","sessions":"1"}]}`,
	}
	for name, in := range cases {
		err := s.UnmarshalJSON([]byte(in))
		if err == nil {
			t.Errorf("%s: restore of %q succeeded", name, in)
			continue
		}
		if !strings.HasPrefix(err.Error(), "restore state: ") {
			t.Errorf("%s: error %q does not name the operation", name, err)
		}
		if after := snap(t, s); !bytes.Equal(before, after) {
			t.Errorf("%s: failed restore changed the state to %s", name, after)
		}
	}
	for _, v := range []int{0, 2} {
		err := s.UnmarshalJSON(fmt.Appendf(nil, `{"version":%d}`, v))
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("unsupported snapshot version %d", v)) {
			t.Errorf("version %d: error %v", v, err)
		}
	}
	var e *json.SyntaxError
	if err := s.UnmarshalJSON([]byte("{")); !errors.As(err, &e) {
		t.Errorf("garbage error %v does not wrap the JSON syntax error", err)
	}
}

// goldenCommands is one command of each type, in type order. Keep it in sync
// with testdata/commands.golden.json; extend both only by appending.
func goldenCommands() []state.Command {
	b := netip.MustParseAddr("192.0.2.10")
	return []state.Command{
		{Type: state.CmdAddBackend, Backend: b, Weight: 100, Tag: "rack-a", Up: true},
		{Type: state.CmdRemoveBackend, Backend: netip.MustParseAddr("2001:db8::20")},
		{Type: state.CmdSetWeight, Backend: b, Weight: 50},
		{Type: state.CmdSetUp, Backend: b, Up: false},
		{Type: state.CmdSessionOpen, Time: time.Date(2025, 1, 2, 3, 4, 5, 123456789, time.UTC), User: "alice@example.org", Backend: b},
		{Type: state.CmdSessionClose, Time: time.Date(2025, 1, 2, 3, 19, 5, 0, time.UTC), User: "alice@example.org"},
		{Type: state.CmdExpire, Time: time.Date(2025, 1, 2, 3, 34, 5, 0, time.UTC)},
		{Type: state.CmdSetExpire, Expire: 15 * time.Minute},
		{Type: state.CmdMoveStart, Time: time.Date(2025, 1, 2, 3, 40, 0, 0, time.UTC), User: "bob@example.org", Backend: b},
		{Type: state.CmdMoveEnd, Time: time.Date(2025, 1, 2, 3, 41, 0, 0, time.UTC), User: "bob@example.org", Backend: b, Tag: "rack-a"},
		{Type: state.CmdForget, Backend: b},
		{Type: state.CmdRestart, Time: time.Date(2025, 1, 2, 4, 0, 0, 0, time.UTC)},
	}
}

const goldenPath = "testdata/commands.golden.json"

// encodeGolden writes each command's compact encoding (the log form) on its
// own line of a JSON array.
func encodeGolden(t *testing.T, cmds []state.Command) []byte {
	t.Helper()
	var buf bytes.Buffer
	buf.WriteString("[\n")
	for i, c := range cmds {
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatalf("marshal %s: %v", c.Type, err)
		}
		buf.Write(b)
		if i < len(cmds)-1 {
			buf.WriteByte(',')
		}
		buf.WriteByte('\n')
	}
	buf.WriteString("]\n")
	return buf.Bytes()
}

func TestCommandGolden(t *testing.T) {
	cmds := goldenCommands()
	seen := map[state.CommandType]bool{}
	for _, c := range cmds {
		seen[c.Type] = true
	}
	for ct := state.CmdAddBackend; ct <= state.CmdRestart; ct++ {
		if !seen[ct] {
			t.Errorf("golden set lacks %s", ct)
		}
	}
	got := encodeGolden(t, cmds)
	path := filepath.FromSlash(goldenPath)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("rewrote %s", path)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (run with -update to create it): %v", err)
	}
	if !bytes.Equal(got, want) {
		gl, wl := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
		for i := 0; i < max(len(gl), len(wl)); i++ {
			var g, w string
			if i < len(gl) {
				g = gl[i]
			}
			if i < len(wl) {
				w = wl[i]
			}
			if g != w {
				t.Errorf("%s line %d:\n got %s\nwant %s", path, i+1, g, w)
			}
		}
		t.Error("command encoding changed; it is a public append-only format. " +
			"If the change is intended and compatible, rerun with -update.")
	}
}

func TestCommandGoldenDecode(t *testing.T) {
	raw, err := os.ReadFile(filepath.FromSlash(goldenPath))
	if err != nil {
		t.Fatal(err)
	}
	var got []state.Command
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatalf("decode golden file: %v", err)
	}
	want := goldenCommands()
	if len(got) != len(want) {
		t.Fatalf("decoded %d commands, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("command %d: decoded %+v, want %+v", i, got[i], want[i])
		}
	}
	// Decoded commands behave like the originals.
	a, b := state.New(exp), state.New(exp)
	apply(t, a, addB(netip.MustParseAddr("2001:db8::20"), 1))
	apply(t, b, addB(netip.MustParseAddr("2001:db8::20"), 1))
	for i := range want {
		r1, e1 := a.Apply(want[i])
		r2, e2 := b.Apply(got[i])
		if r1 != r2 || fmt.Sprint(e1) != fmt.Sprint(e2) {
			t.Errorf("command %d: %+v %v vs %+v %v", i, r1, e1, r2, e2)
		}
	}
	if sa, sb := snap(t, a), snap(t, b); !bytes.Equal(sa, sb) {
		t.Errorf("states differ:\n%s\n%s", sa, sb)
	}
}

// TestCommandDecodeForwardCompatible checks that a reader ignores fields
// appended by a newer writer, as the append-only format needs.
func TestCommandDecodeForwardCompatible(t *testing.T) {
	var c state.Command
	in := `{"type":5,"time":"2025-01-02T03:04:05Z","user":"u","backend":"192.0.2.1","future_field":{"x":[1]}}`
	if err := json.Unmarshal([]byte(in), &c); err != nil {
		t.Fatal(err)
	}
	want := open("u", bX, t0)
	if c != want {
		t.Errorf("decoded %+v, want %+v", c, want)
	}
	// And a minimal command decodes to zero fields.
	var e state.Command
	if err := json.Unmarshal([]byte(`{"type":7}`), &e); err != nil || e != (state.Command{Type: state.CmdExpire}) {
		t.Errorf("decoded %+v, %v", e, err)
	}
}

// TestSessionCloseOfOldSessionKeepsNewRecordCounted is a regression test for
// a session count bug: a session opened on backend X outlives the removal of
// X (the proxied connection stays up), the user's next login creates a new
// record on Y, and then the old session closes. The close must not count
// against the record on Y, or that record reaches 0 sessions while the
// session on Y is still open, expires, and the user is moved while still
// logged in on Y — breaking "a record with open sessions never expires".
//
// The close carries the backend its session was proxied to (Command.Backend)
// so the state can tell the sessions apart.
func TestSessionCloseOfOldSessionKeepsNewRecordCounted(t *testing.T) {
	s := newXY(t)
	apply(t, s, addB(bZ, 1))
	apply(t, s, open("alice", bX, t0)) // session A on X
	if r := apply(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bX}); r.Removed != 1 {
		t.Fatalf("Removed = %d", r.Removed)
	}
	if r := apply(t, s, open("alice", bY, t0.Add(time.Minute))); r != (state.Result{Backend: bY, Created: true}) {
		t.Fatalf("open B = %+v", r) // session B on Y
	}
	// Session A (on X) ends.
	apply(t, s, state.Command{Type: state.CmdSessionClose, User: "alice", Backend: bX, Time: t0.Add(2 * time.Minute)})

	if u := mustUser(t, s, "alice"); u.Sessions != 1 {
		t.Errorf("after closing the session on removed %s, record on %s has %d sessions, want 1 (session B is open)", bX, u.Backend, u.Sessions)
	}
	late := t0.Add(2*time.Minute + 10*exp)
	apply(t, s, state.Command{Type: state.CmdExpire, Time: late})
	if r, err := s.Apply(open("alice", bZ, late)); err != nil || r.Backend != bY {
		t.Errorf("open while session B is still open on %s = %+v, %v; user was moved", bY, r, err)
	}
}

// model is an independent reference of the documented semantics, used by
// TestRandomCommands.
type model struct {
	expire   time.Duration
	backends map[netip.Addr]state.Backend
	users    map[string]state.User
}

func (m *model) live(u state.User, now time.Time) bool {
	return u.Sessions > 0 || u.Moving || now.Before(u.LastSeen.Add(m.expire))
}

// apply returns the expected result and error (nil or one of the sentinels).
func (m *model) apply(c state.Command) (state.Result, error) {
	switch c.Type {
	case state.CmdAddBackend:
		if !c.Backend.IsValid() || c.Weight < 0 {
			return state.Result{}, state.ErrBadCommand
		}
		if _, ok := m.backends[c.Backend]; ok {
			return state.Result{}, state.ErrBackendExists
		}
		m.backends[c.Backend] = state.Backend{Addr: c.Backend, Weight: c.Weight, Tag: c.Tag, Up: c.Up}
	case state.CmdRemoveBackend:
		if _, ok := m.backends[c.Backend]; !ok {
			return state.Result{}, state.ErrUnknownBackend
		}
		delete(m.backends, c.Backend)
		n := 0
		for k, u := range m.users {
			if u.Backend == c.Backend {
				delete(m.users, k)
				n++
				continue
			}
			if u.Moving && u.MoveTo == c.Backend {
				u.MoveTo = netip.Addr{}
				m.users[k] = u
			}
		}
		return state.Result{Removed: n}, nil
	case state.CmdSetWeight, state.CmdSetUp:
		b, ok := m.backends[c.Backend]
		if !ok {
			return state.Result{}, state.ErrUnknownBackend
		}
		if c.Type == state.CmdSetUp {
			b.Up = c.Up
		} else if c.Weight < 0 {
			return state.Result{}, state.ErrBadCommand
		} else {
			b.Weight = c.Weight
		}
		m.backends[c.Backend] = b
	case state.CmdSessionOpen:
		if c.User == "" {
			return state.Result{}, state.ErrBadCommand
		}
		if u, ok := m.users[c.User]; ok && m.live(u, c.Time) {
			if u.Moving {
				return state.Result{Backend: u.Backend}, state.ErrMoving
			}
			u.Sessions++
			u.LastSeen = c.Time
			m.users[c.User] = u
			return state.Result{Backend: u.Backend}, nil
		}
		if _, ok := m.backends[c.Backend]; !ok {
			return state.Result{}, state.ErrUnknownBackend
		}
		m.users[c.User] = state.User{Key: c.User, Backend: c.Backend, Tag: c.Tag, Sessions: 1, LastSeen: c.Time}
		return state.Result{Backend: c.Backend, Created: true}, nil
	case state.CmdSessionClose:
		u, ok := m.users[c.User]
		if !ok || u.Sessions == 0 || (c.Backend.IsValid() && c.Backend != u.Backend) {
			return state.Result{}, nil // not counted in this record
		}
		u.Sessions--
		if c.Time.After(u.LastSeen) {
			u.LastSeen = c.Time
		}
		m.users[c.User] = u
		return state.Result{Backend: u.Backend}, nil
	case state.CmdExpire:
		n := 0
		for k, u := range m.users {
			if !m.live(u, c.Time) {
				delete(m.users, k)
				n++
			}
		}
		return state.Result{Removed: n}, nil
	case state.CmdSetExpire:
		if c.Expire <= 0 {
			return state.Result{}, state.ErrBadCommand
		}
		m.expire = c.Expire
	case state.CmdMoveStart:
		u, ok := m.users[c.User]
		if !ok || !m.live(u, c.Time) {
			return state.Result{}, nil
		}
		if _, known := m.backends[c.Backend]; c.Backend.IsValid() && !known {
			return state.Result{}, state.ErrUnknownBackend
		}
		u.Moving, u.MoveTo = true, c.Backend
		m.users[c.User] = u
		return state.Result{Backend: u.Backend}, nil
	case state.CmdMoveEnd:
		if c.User == "" {
			return state.Result{}, state.ErrBadCommand
		}
		old, had := m.users[c.User]
		if !c.Backend.IsValid() {
			if !had {
				return state.Result{}, nil
			}
			delete(m.users, c.User)
			return state.Result{Removed: 1}, nil
		}
		if _, ok := m.backends[c.Backend]; !ok {
			return state.Result{}, state.ErrUnknownBackend
		}
		tag := c.Tag
		if tag == "" {
			tag = old.Tag // "" when there was no record
		}
		m.users[c.User] = state.User{Key: c.User, Backend: c.Backend, Tag: tag, LastSeen: c.Time}
		return state.Result{Backend: c.Backend, Created: true}, nil
	case state.CmdForget:
		n := 0
		for k, u := range m.users {
			if !u.Moving && (!c.Backend.IsValid() || u.Backend == c.Backend) {
				delete(m.users, k)
				n++
			}
		}
		return state.Result{Removed: n}, nil
	case state.CmdRestart:
		for k, u := range m.users {
			if u.Moving {
				if !u.MoveTo.IsValid() {
					delete(m.users, k)
					continue
				}
				u.Backend, u.Moving, u.MoveTo = u.MoveTo, false, netip.Addr{}
				if c.Time.After(u.LastSeen) {
					u.LastSeen = c.Time
				}
			}
			if u.Sessions > 0 {
				u.Sessions = 0
				if c.Time.After(u.LastSeen) {
					u.LastSeen = c.Time
				}
			}
			m.users[k] = u
		}
	default:
		return state.Result{}, state.ErrBadCommand
	}
	return state.Result{}, nil
}

func (m *model) check(t *testing.T, s *state.State, step int, c state.Command) {
	t.Helper()
	if s.Expire() != m.expire {
		t.Fatalf("step %d %+v: Expire %v, model %v", step, c, s.Expire(), m.expire)
	}
	bs := s.Backends()
	if len(bs) != len(m.backends) {
		t.Fatalf("step %d %+v: %d backends, model %d", step, c, len(bs), len(m.backends))
	}
	for _, b := range bs {
		if b != m.backends[b.Addr] {
			t.Fatalf("step %d %+v: backend %+v, model %+v", step, c, b, m.backends[b.Addr])
		}
	}
	us := s.Users()
	if len(us) != len(m.users) {
		t.Fatalf("step %d %+v: %d users, model %d", step, c, len(us), len(m.users))
	}
	for _, u := range us {
		if u != m.users[u.Key] {
			t.Fatalf("step %d %+v: user %+v, model %+v", step, c, u, m.users[u.Key])
		}
	}
}

// randomCommands returns n commands mixing every type (and bad ones) over 5
// backends and 50 users, with a clock that moves forward in whole seconds so
// that expiry boundaries are hit exactly.
func randomCommands(seed int64, n int) []state.Command {
	rng := rand.New(rand.NewSource(seed))
	var pool []netip.Addr
	for i := range 4 {
		pool = append(pool, netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}))
	}
	pool = append(pool, netip.MustParseAddr("2001:db8::10"))
	user := func() string { return fmt.Sprintf("user%02d@example.org", rng.Intn(50)) }
	backend := func() netip.Addr {
		if rng.Intn(40) == 0 {
			return netip.Addr{} // invalid
		}
		return pool[rng.Intn(len(pool))]
	}
	now := t0
	out := make([]state.Command, 0, n)
	for range n {
		now = now.Add(time.Duration(rng.Intn(90)) * time.Second)
		var c state.Command
		// maybeInvalid returns the invalid address with probability 1/n.
		maybeInvalid := func(n int) netip.Addr {
			if rng.Intn(n) == 0 {
				return netip.Addr{}
			}
			return backend()
		}
		switch p := rng.Intn(100); {
		case p < 33:
			c = open(user(), backend(), now)
			if rng.Intn(100) == 0 {
				c.User = ""
			}
			if rng.Intn(3) == 0 {
				c.Tag = fmt.Sprintf("t%d", rng.Intn(3))
			}
		case p < 59:
			c = closeS(user(), now)
			if rng.Intn(4) == 0 { // the backend the session was on
				c.Backend = backend()
			}
		case p < 62:
			c = state.Command{Type: state.CmdExpire, Time: now}
		case p < 71:
			c = state.Command{Type: state.CmdAddBackend, Backend: backend(), Weight: rng.Intn(5) - 1,
				Tag: fmt.Sprintf("t%d", rng.Intn(3)), Up: rng.Intn(2) == 0}
		case p < 73:
			c = state.Command{Type: state.CmdRemoveBackend, Backend: backend()}
		case p < 80:
			c = state.Command{Type: state.CmdSetWeight, Backend: backend(), Weight: rng.Intn(5) - 1}
		case p < 86:
			c = state.Command{Type: state.CmdSetUp, Backend: backend(), Up: rng.Intn(2) == 0}
		case p < 88:
			c = state.Command{Type: state.CmdSetExpire, Expire: time.Duration(rng.Intn(25)-2) * time.Minute}
		case p < 92:
			c = state.Command{Type: state.CmdMoveStart, User: user(), Backend: maybeInvalid(3), Time: now}
		case p < 96:
			c = state.Command{Type: state.CmdMoveEnd, User: user(), Backend: maybeInvalid(4), Time: now}
			if rng.Intn(2) == 0 {
				c.Tag = fmt.Sprintf("t%d", rng.Intn(3))
			}
			if rng.Intn(100) == 0 {
				c.User = ""
			}
		case p < 97:
			c = state.Command{Type: state.CmdForget, Backend: maybeInvalid(5)}
		case p < 98:
			c = state.Command{Type: state.CmdRestart, Time: now}
		default:
			c = state.Command{Type: state.CommandType(rng.Intn(3) * 13), User: user(), Backend: backend(), Time: now}
		}
		out = append(out, c)
	}
	return out
}

// TestRandomCommands applies a random log to two fresh states (and, from the
// middle, to a state restored from a snapshot) and checks that they agree
// with each other and with the reference model, and that after each
// SessionOpen a user with a live record kept its backend unless that backend
// was removed.
func TestRandomCommands(t *testing.T) {
	const seed, n = 20250102, 4000
	cmds := randomCommands(seed, n)
	a, b := state.New(exp), state.New(exp)
	m := &model{expire: exp, backends: map[netip.Addr]state.Backend{}, users: map[string]state.User{}}
	var c3 *state.State // restored from a's snapshot at n/2

	// pin is the backend each user was last given, tracked from results
	// only; a removal of that backend unpins its users.
	pin := map[string]netip.Addr{}
	lastSeen := map[string]time.Time{}
	sessions := map[string]int{}
	moving := map[string]bool{}
	moveTo := map[string]netip.Addr{}
	expire := exp
	counts := map[string]int{}
	unpin := func(k string) { delete(pin, k); delete(moving, k); delete(moveTo, k) }
	// liveT is liveness from the tracked results alone.
	liveT := func(k string, now time.Time) bool {
		_, pinned := pin[k]
		return pinned && (sessions[k] > 0 || moving[k] || now.Before(lastSeen[k].Add(expire)))
	}

	for i, c := range cmds {
		if i == n/2 {
			c3 = restore(t, snap(t, a))
		}
		wantR, wantErr := m.apply(c)
		ra, ea := a.Apply(c)
		rb, eb := b.Apply(c)
		if ra != rb || fmt.Sprint(ea) != fmt.Sprint(eb) {
			t.Fatalf("seed %d step %d %+v: states disagree: %+v %v vs %+v %v", seed, i, c, ra, ea, rb, eb)
		}
		if c3 != nil {
			if r3, e3 := c3.Apply(c); r3 != ra || fmt.Sprint(e3) != fmt.Sprint(ea) {
				t.Fatalf("seed %d step %d %+v: restored state disagrees: %+v %v vs %+v %v", seed, i, c, r3, e3, ra, ea)
			}
		}
		if ra != wantR || !errors.Is(ea, wantErr) || (wantErr == nil) != (ea == nil) {
			t.Fatalf("seed %d step %d %+v: got %+v %v, model %+v %v", seed, i, c, ra, ea, wantR, wantErr)
		}
		m.check(t, a, i, c)
		if c.Type == state.CmdSessionOpen && c.User != "" {
			if refused := errors.Is(ea, state.ErrMoving); refused != (liveT(c.User, c.Time) && moving[c.User]) {
				t.Fatalf("seed %d step %d %+v: refused=%v (%v) but tracked live=%v moving=%v",
					seed, i, c, refused, ea, liveT(c.User, c.Time), moving[c.User])
			} else if refused {
				counts["open-refused-moving"]++
			}
		}
		if ea != nil {
			counts["error"]++
			continue
		}

		switch c.Type {
		case state.CmdRemoveBackend:
			for k, p := range pin {
				if p == c.Backend {
					unpin(k)
				}
			}
		case state.CmdSetExpire:
			expire = c.Expire
		case state.CmdExpire:
			for k := range pin {
				if !liveT(k, c.Time) {
					unpin(k)
				}
			}
		case state.CmdSessionClose:
			if ra.Backend.IsValid() { // the close was counted in the record
				sessions[c.User]--
				if c.Time.After(lastSeen[c.User]) {
					lastSeen[c.User] = c.Time
				}
			}
		case state.CmdSessionOpen:
			p, pinned := pin[c.User]
			live := pinned && (sessions[c.User] > 0 || c.Time.Before(lastSeen[c.User].Add(expire)))
			switch {
			case live && (ra.Backend != p || ra.Created):
				t.Fatalf("seed %d step %d %+v: live user pinned to %s got %+v", seed, i, c, p, ra)
			case live:
				counts["kept"]++
				if c.Backend != p {
					counts["kept-despite-other-candidate"]++
				}
				sessions[c.User]++
			case !ra.Created || ra.Backend != c.Backend:
				t.Fatalf("seed %d step %d %+v: user without a live record got %+v, want created on candidate", seed, i, c, ra)
			default:
				counts["created"]++
				if pinned {
					counts["replaced-expired"]++
				}
				sessions[c.User] = 1
				delete(moving, c.User)
				delete(moveTo, c.User)
			}
			pin[c.User] = ra.Backend
			lastSeen[c.User] = c.Time
		case state.CmdMoveStart:
			live := liveT(c.User, c.Time)
			switch {
			case live && ra.Backend != pin[c.User]:
				t.Fatalf("seed %d step %d %+v: move-start of a user live on %s got %+v", seed, i, c, pin[c.User], ra)
			case !live && ra != (state.Result{}):
				t.Fatalf("seed %d step %d %+v: move-start without live record got %+v, want no-op", seed, i, c, ra)
			case live:
				counts["move-start-live"]++
				moving[c.User], moveTo[c.User] = true, c.Backend
			}
		case state.CmdMoveEnd:
			if !c.Backend.IsValid() {
				if _, ok := pin[c.User]; ok != (ra.Removed == 1) {
					t.Fatalf("seed %d step %d %+v: drop of a record (tracked %v) got %+v", seed, i, c, ok, ra)
				}
				counts["move-end-drop"]++
				unpin(c.User)
				break
			}
			if ra != (state.Result{Backend: c.Backend, Created: true}) {
				t.Fatalf("seed %d step %d %+v: move-end got %+v", seed, i, c, ra)
			}
			pin[c.User], sessions[c.User], lastSeen[c.User] = c.Backend, 0, c.Time
			delete(moving, c.User)
			delete(moveTo, c.User)
		case state.CmdForget:
			n := 0
			for k, p := range pin {
				if !moving[k] && (!c.Backend.IsValid() || p == c.Backend) {
					unpin(k)
					n++
				}
			}
			if ra.Removed != n {
				t.Fatalf("seed %d step %d %+v: forget removed %d, tracked %d", seed, i, c, ra.Removed, n)
			}
			if n > 0 {
				counts["forget-removed"] += n
			}
		case state.CmdRestart:
			for k := range pin {
				if moving[k] {
					counts["restart-completed-move"]++
					if !moveTo[k].IsValid() {
						unpin(k)
						continue
					}
					pin[k] = moveTo[k]
					delete(moving, k)
					delete(moveTo, k)
					if c.Time.After(lastSeen[k]) {
						lastSeen[k] = c.Time
					}
				}
				if sessions[k] > 0 {
					sessions[k] = 0
					if c.Time.After(lastSeen[k]) {
						lastSeen[k] = c.Time
					}
				}
			}
		}
		counts[c.Type.String()]++
		if c.Type == state.CmdExpire && ra.Removed > 0 {
			counts["expire-removed"] += ra.Removed
		}
		if c.Type == state.CmdRemoveBackend && ra.Removed > 0 {
			counts["remove-dropped"] += ra.Removed
		}
	}
	sa, sb, s3 := snap(t, a), snap(t, b), snap(t, c3)
	if !bytes.Equal(sa, sb) {
		t.Fatalf("snapshots of two states fed the same log differ:\n%s\n%s", sa, sb)
	}
	if !bytes.Equal(sa, s3) {
		t.Fatalf("snapshot of the restored state differs:\n%s\n%s", sa, s3)
	}
	// The sequence must actually exercise the interesting paths.
	for _, k := range []string{"kept-despite-other-candidate", "created", "replaced-expired", "expire-removed",
		"remove-dropped", "error", "set-expire", "set-up", "set-weight", "add-backend",
		"move-start-live", "move-end", "move-end-drop", "forget-removed", "restart", "restart-completed-move",
		"open-refused-moving"} {
		if counts[k] < 5 {
			t.Errorf("random log exercised %q only %d times: %v", k, counts[k], counts)
		}
	}
	t.Logf("counts: %v; final users %d backends %d", counts, len(a.Users()), len(a.Backends()))
}

// moveStart, moveEnd are the move commands; an invalid to means "re-hash".
func moveStart(user string, to netip.Addr, at time.Time) state.Command {
	return state.Command{Type: state.CmdMoveStart, User: user, Backend: to, Time: at}
}

func moveEnd(user string, to netip.Addr, tag string, at time.Time) state.Command {
	return state.Command{Type: state.CmdMoveEnd, User: user, Backend: to, Tag: tag, Time: at}
}

// noop applies c, expecting success, a zero result and no state change.
func noop(t testing.TB, s *state.State, c state.Command) {
	t.Helper()
	before := snap(t, s)
	if r := apply(t, s, c); r != (state.Result{}) {
		t.Errorf("Apply(%+v) = %+v, want zero result", c, r)
	}
	if after := snap(t, s); !bytes.Equal(before, after) {
		t.Errorf("Apply(%+v) changed the state:\nbefore %s\nafter  %s", c, before, after)
	}
}

func TestMoveStart(t *testing.T) {
	s := newXY(t)
	apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "alice", Backend: bX, Tag: "t1", Time: t0})
	apply(t, s, open("alice", bX, t0.Add(time.Second)))
	t1 := t0.Add(time.Minute)
	if r := apply(t, s, moveStart("alice", bY, t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("move-start result = %+v, want the current backend %s", r, bX)
	}
	// Only the move flags change: sessions, backend, tag and LastSeen stay.
	want := state.User{Key: "alice", Backend: bX, Tag: "t1", Sessions: 2, Moving: true, MoveTo: bY, LastSeen: t0.Add(time.Second)}
	if u := mustUser(t, s, "alice"); u != want {
		t.Errorf("record = %+v, want %+v", u, want)
	}

	t.Run("to re-hash", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("bob", bX, t0))
		apply(t, s, closeS("bob", t0)) // no session, still live
		if r := apply(t, s, moveStart("bob", netip.Addr{}, t0.Add(exp-1))); r != (state.Result{Backend: bX}) {
			t.Errorf("move-start = %+v", r)
		}
		if u := mustUser(t, s, "bob"); !u.Moving || u.MoveTo.IsValid() || u.Backend != bX {
			t.Errorf("record = %+v, want moving with no target", u)
		}
	})
	t.Run("absent user", func(t *testing.T) {
		s := newXY(t)
		noop(t, s, moveStart("nobody", bY, t0))
		noop(t, s, moveStart("nobody", bNo, t0)) // no record: the target is not even looked at
		if hasUser(s, "nobody") {
			t.Error("move-start created a record")
		}
	})
	t.Run("expired record", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("carol", bX, t0))
		apply(t, s, closeS("carol", t0))
		noop(t, s, moveStart("carol", bY, t0.Add(exp)))
		if u := mustUser(t, s, "carol"); u.Moving {
			t.Errorf("expired record marked moving: %+v", u)
		}
	})
	t.Run("unknown target", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("dave", bX, t0))
		applyErr(t, s, moveStart("dave", bNo, t0), state.ErrUnknownBackend)
		if u := mustUser(t, s, "dave"); u.Moving {
			t.Errorf("failed move-start marked the record moving: %+v", u)
		}
	})
}

// A moving record refuses new sessions (state unchanged), still counts
// closes, and never expires however old.
func TestMovingRecordRefusesSessionsAndNeverExpires(t *testing.T) {
	s := newXY(t)
	apply(t, s, open("alice", bX, t0))
	apply(t, s, open("bob", bX, t0))
	apply(t, s, moveStart("alice", bY, t0))

	before := snap(t, s)
	for _, cand := range []netip.Addr{bX, bY, bNo, {}} {
		_, err := s.Apply(open("alice", cand, t0.Add(time.Minute)))
		if !errors.Is(err, state.ErrMoving) {
			t.Errorf("open of a moving user (candidate %v): err = %v, want ErrMoving", cand, err)
		}
		if err != nil && !strings.Contains(err.Error(), `"alice"`) {
			t.Errorf("error %q does not name the user", err)
		}
	}
	if after := snap(t, s); !bytes.Equal(before, after) {
		t.Errorf("refused opens changed the state:\nbefore %s\nafter  %s", before, after)
	}
	// Other users are not affected.
	if r := apply(t, s, open("bob", bY, t0.Add(time.Minute))); r != (state.Result{Backend: bX}) {
		t.Errorf("open of another user = %+v", r)
	}
	// The kicked session's close counts.
	t1 := t0.Add(2 * time.Minute)
	if r := apply(t, s, closeS("alice", t1)); r != (state.Result{Backend: bX}) {
		t.Errorf("close of a moving user's session = %+v", r)
	}
	if u := mustUser(t, s, "alice"); u.Sessions != 0 || !u.Moving || u.LastSeen != t1 {
		t.Errorf("after close: %+v", u)
	}
	far := t1.Add(1000 * exp)
	if _, ok := s.LiveUser("alice", far); !ok {
		t.Error("moving record with no session is not live long after its expiry")
	}
	if r := apply(t, s, state.Command{Type: state.CmdExpire, Time: far}); r.Removed != 0 {
		t.Errorf("expire removed %d records; the moving record must stay", r.Removed)
	}
	if u := mustUser(t, s, "alice"); !u.Moving {
		t.Errorf("record after expire: %+v", u)
	}
	// Refused even long after.
	if _, err := s.Apply(open("alice", bY, far)); !errors.Is(err, state.ErrMoving) {
		t.Errorf("open long after: %v", err)
	}
}

func TestMoveEnd(t *testing.T) {
	t1 := t0.Add(time.Minute)
	t.Run("pin keeps tag", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "alice", Backend: bX, Tag: "t1", Time: t0})
		apply(t, s, moveStart("alice", bY, t0))
		apply(t, s, closeS("alice", t0))
		if r := apply(t, s, moveEnd("alice", bY, "", t1)); r != (state.Result{Backend: bY, Created: true}) {
			t.Errorf("move-end = %+v", r)
		}
		want := state.User{Key: "alice", Backend: bY, Tag: "t1", LastSeen: t1}
		if u := mustUser(t, s, "alice"); u != want {
			t.Errorf("record = %+v, want %+v", u, want)
		}
		// The new pin holds and its expiry counts from the move's end.
		if r := apply(t, s, open("alice", bX, t1.Add(exp-1))); r != (state.Result{Backend: bY}) {
			t.Errorf("open after move = %+v, want pinned %s", r, bY)
		}
	})
	t.Run("tag given wins", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "alice", Backend: bX, Tag: "t1", Time: t0})
		apply(t, s, moveEnd("alice", bY, "t2", t1))
		if u := mustUser(t, s, "alice"); u.Tag != "t2" || u.Backend != bY {
			t.Errorf("record = %+v", u)
		}
	})
	t.Run("sessions still open", func(t *testing.T) {
		// A move that timed out: the record is replaced with no session;
		// the old session's close (on bX) does not count against it.
		s := newXY(t)
		apply(t, s, open("alice", bX, t0))
		apply(t, s, moveStart("alice", bY, t0))
		apply(t, s, moveEnd("alice", bY, "", t1))
		apply(t, s, open("alice", bX, t1)) // new session on bY
		apply(t, s, state.Command{Type: state.CmdSessionClose, User: "alice", Backend: bX, Time: t1.Add(time.Minute)})
		if u := mustUser(t, s, "alice"); u.Sessions != 1 || u.Backend != bY || u.LastSeen != t1 {
			t.Errorf("record = %+v, want 1 session on %s", u, bY)
		}
	})
	t.Run("create", func(t *testing.T) {
		s := newXY(t)
		if r := apply(t, s, moveEnd("bob", bX, "t3", t1)); r != (state.Result{Backend: bX, Created: true}) {
			t.Errorf("move-end = %+v", r)
		}
		if u := mustUser(t, s, "bob"); u != (state.User{Key: "bob", Backend: bX, Tag: "t3", LastSeen: t1}) {
			t.Errorf("record = %+v", u)
		}
		if _, ok := s.LiveUser("bob", t1.Add(exp)); ok {
			t.Error("pinned record with no session outlived its expiry")
		}
	})
	t.Run("drop", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("carol", bX, t0))
		apply(t, s, moveStart("carol", netip.Addr{}, t0))
		if r := apply(t, s, moveEnd("carol", netip.Addr{}, "", t1)); r != (state.Result{Removed: 1}) {
			t.Errorf("drop = %+v", r)
		}
		if hasUser(s, "carol") {
			t.Error("record not dropped")
		}
		noop(t, s, moveEnd("carol", netip.Addr{}, "", t1))
		// Re-hashed at the next open.
		if r := apply(t, s, open("carol", bY, t1)); r != (state.Result{Backend: bY, Created: true}) {
			t.Errorf("open after drop = %+v", r)
		}
	})
	t.Run("unknown backend", func(t *testing.T) {
		s := newXY(t)
		apply(t, s, open("dave", bX, t0))
		apply(t, s, moveStart("dave", bY, t0))
		applyErr(t, s, moveEnd("dave", bNo, "", t1), state.ErrUnknownBackend)
		if u := mustUser(t, s, "dave"); !u.Moving || u.Backend != bX {
			t.Errorf("record after failed move-end = %+v", u)
		}
	})
	t.Run("empty user", func(t *testing.T) {
		s := newXY(t)
		applyErr(t, s, moveEnd("", bX, "", t1), state.ErrBadCommand)
		applyErr(t, s, moveEnd("", netip.Addr{}, "", t1), state.ErrBadCommand)
	})
}

func TestForget(t *testing.T) {
	s := newXY(t)
	apply(t, s, open("x-open", bX, t0))
	apply(t, s, open("x-closed", bX, t0))
	apply(t, s, closeS("x-closed", t0))
	apply(t, s, open("x-moving", bX, t0))
	apply(t, s, moveStart("x-moving", bY, t0))
	apply(t, s, open("y-open", bY, t0))
	apply(t, s, open("y-moving", bY, t0))
	apply(t, s, moveStart("y-moving", netip.Addr{}, t0))

	if r := apply(t, s, state.Command{Type: state.CmdForget, Backend: bX}); r != (state.Result{Removed: 2}) {
		t.Errorf("forget %s = %+v, want 2 removed", bX, r)
	}
	var keys []string
	for _, u := range s.Users() {
		keys = append(keys, u.Key)
	}
	if want := []string{"x-moving", "y-moving", "y-open"}; !slices.Equal(keys, want) {
		t.Errorf("records after forget %s: %v, want %v", bX, keys, want)
	}
	// A forgotten session's close does not revive the record.
	noop(t, s, state.Command{Type: state.CmdSessionClose, User: "x-open", Backend: bX, Time: t0.Add(time.Minute)})
	// A backend without records, and one that does not exist: nothing.
	noop(t, s, state.Command{Type: state.CmdForget, Backend: bNo})

	if r := apply(t, s, state.Command{Type: state.CmdForget}); r != (state.Result{Removed: 1}) {
		t.Errorf("forget all = %+v, want 1 removed", r)
	}
	keys = keys[:0]
	for _, u := range s.Users() {
		keys = append(keys, u.Key)
	}
	if want := []string{"x-moving", "y-moving"}; !slices.Equal(keys, want) {
		t.Errorf("records after forget all: %v, want the moving ones %v", keys, want)
	}
	if len(s.Backends()) != 2 {
		t.Errorf("forget touched backends: %+v", s.Backends())
	}
}

func TestRestart(t *testing.T) {
	s := newXY(t)
	tr := t0.Add(time.Hour) // restart time
	apply(t, s, open("open2", bX, t0))
	apply(t, s, open("open2", bX, t0))
	apply(t, s, open("closed", bY, t0))
	apply(t, s, closeS("closed", t0.Add(time.Minute)))
	apply(t, s, open("future", bX, tr.Add(time.Minute))) // LastSeen after the restart time: kept
	apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "to-y", Backend: bX, Tag: "t1", Time: t0})
	apply(t, s, moveStart("to-y", bY, t0))
	apply(t, s, open("to-y-closed", bX, t0))
	apply(t, s, moveStart("to-y-closed", bY, t0))
	apply(t, s, closeS("to-y-closed", t0.Add(2*time.Minute)))
	apply(t, s, open("rehash", bX, t0))
	apply(t, s, moveStart("rehash", netip.Addr{}, t0))

	if r := apply(t, s, state.Command{Type: state.CmdRestart, Time: tr}); r != (state.Result{}) {
		t.Errorf("restart result = %+v", r)
	}
	want := []state.User{
		{Key: "closed", Backend: bY, LastSeen: t0.Add(time.Minute)},
		{Key: "future", Backend: bX, LastSeen: tr.Add(time.Minute)},
		{Key: "open2", Backend: bX, LastSeen: tr},
		{Key: "to-y", Backend: bY, Tag: "t1", LastSeen: tr},
		{Key: "to-y-closed", Backend: bY, LastSeen: tr}, // the move completed at the restart
	}
	if got := s.Users(); !slices.Equal(got, want) {
		t.Errorf("records after restart:\n got %+v\nwant %+v", got, want)
	}
	// Expiry of the records that had sessions counts from the restart.
	if _, ok := s.LiveUser("open2", tr.Add(exp-1)); !ok {
		t.Error("open2 not live 1ns before restart+expire")
	}
	if _, ok := s.LiveUser("open2", tr.Add(exp)); ok {
		t.Error("open2 live at restart+expire")
	}
	// Completed moves take sessions again, on their new backend.
	if r := apply(t, s, open("to-y", bX, tr)); r != (state.Result{Backend: bY}) {
		t.Errorf("open after restart = %+v", r)
	}
	// A second restart at the same time only resets sessions again.
	b1 := snap(t, s)
	apply(t, s, state.Command{Type: state.CmdRestart, Time: tr})
	apply(t, s, open("to-y", bX, tr))
	if b2 := snap(t, s); !bytes.Equal(b1, b2) {
		t.Errorf("restart not idempotent:\n%s\n%s", b1, b2)
	}
}

// A move towards a backend that is removed before the move ends must not
// leave the user pinned to the removed backend: after a restart, the user
// would be sent to an address that is no longer a backend. (Records on a
// removed backend are dropped; a record on its way there should be too, or
// at least turn into a re-hash.)
func TestRestartDoesNotPinToRemovedBackend(t *testing.T) {
	s := newXY(t)
	apply(t, s, open("alice", bX, t0))
	apply(t, s, moveStart("alice", bY, t0))
	apply(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bY})
	apply(t, s, state.Command{Type: state.CmdRestart, Time: t0.Add(time.Minute)})
	if u, ok := s.LiveUser("alice", t0.Add(time.Minute)); ok {
		if _, known := s.Backend(u.Backend); !known {
			t.Errorf("after restart alice is pinned to %s, which was removed: %+v", u.Backend, u)
		}
	}
}

func TestSnapshotRoundTripMoving(t *testing.T) {
	s := newXY(t)
	apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "to-y", Backend: bX, Tag: "t1", Time: t0})
	apply(t, s, moveStart("to-y", bY, t0))
	apply(t, s, open("rehash", bX, t0))
	apply(t, s, moveStart("rehash", netip.Addr{}, t0))
	apply(t, s, state.Command{Type: state.CmdSessionOpen, User: "tagged", Backend: bY, Tag: "t2", Time: t0})
	b := snap(t, s)
	for _, frag := range []string{
		`{"user":"to-y","backend":"192.0.2.1","tag":"t1","sessions":1,"moving":true,"move_to":"192.0.2.2","last_seen":"2025-01-02T03:04:05Z"}`,
		`{"user":"rehash","backend":"192.0.2.1","sessions":1,"moving":true,"last_seen":"2025-01-02T03:04:05Z"}`,
		`{"user":"tagged","backend":"192.0.2.2","tag":"t2","sessions":1,"last_seen":"2025-01-02T03:04:05Z"}`,
	} {
		if !bytes.Contains(b, []byte(frag)) {
			t.Errorf("snapshot lacks %s:\n%s", frag, b)
		}
	}
	r := restore(t, b)
	if !slices.Equal(r.Users(), s.Users()) {
		t.Errorf("users differ:\n%+v\n%+v", r.Users(), s.Users())
	}
	if _, err := r.Apply(open("to-y", bX, t0)); !errors.Is(err, state.ErrMoving) {
		t.Errorf("restored moving record accepts sessions: %v", err)
	}
	for _, c := range []state.Command{
		{Type: state.CmdExpire, Time: t0.Add(100 * exp)},
		{Type: state.CmdForget, Backend: bY}, // drops "tagged", not the moving ones
		{Type: state.CmdRestart, Time: t0.Add(time.Hour)},
	} {
		r1, e1 := s.Apply(c)
		r2, e2 := r.Apply(c)
		if r1 != r2 || fmt.Sprint(e1) != fmt.Sprint(e2) {
			t.Errorf("%s: original %+v %v, restored %+v %v", c.Type, r1, e1, r2, e2)
		}
	}
	if b1, b2 := snap(t, s), snap(t, r); !bytes.Equal(b1, b2) {
		t.Errorf("after the same commands:\n%s\n%s", b1, b2)
	}
	if hasUser(r, "rehash") || hasUser(r, "tagged") || mustUser(t, r, "to-y").Backend != bY {
		t.Errorf("restart did not complete the restored moves: %+v", r.Users())
	}
}
