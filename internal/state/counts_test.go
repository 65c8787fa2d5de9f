package state_test

import (
	"net/netip"
	"testing"

	"github.com/usher-mail/usher/internal/state"
)

// checkCounts fails unless UsersOn agrees with a recount from Users() for
// every address in addrs, and addrs hold every record.
func checkCounts(t *testing.T, s *state.State, addrs []netip.Addr, what string) {
	t.Helper()
	recount := map[netip.Addr]int{}
	for _, u := range s.Users() {
		recount[u.Backend]++
	}
	total := 0
	for _, a := range addrs {
		if got := s.UsersOn(a); got != recount[a] {
			t.Fatalf("%s: UsersOn(%s) = %d, recount %d (records %+v)", what, a, got, recount[a], s.Users())
		}
		total += recount[a]
	}
	if total != len(s.Users()) {
		t.Fatalf("%s: %d of %d records on the checked addresses %v", what, total, len(s.Users()), addrs)
	}
}

// TestUsersOnRandomCommands: after every command of random logs (every
// command type, failing ones included), and in states restored from
// snapshots along the way, the per-backend counts equal a recount.
func TestUsersOnRandomCommands(t *testing.T) {
	for _, seed := range []int64{20250102, 1, 2, 3, 4} {
		cmds := randomCommands(seed, 3000)
		addrs := []netip.Addr{{}} // invalid: never holds a record
		seen := map[netip.Addr]bool{}
		for _, c := range cmds {
			if c.Backend.IsValid() && !seen[c.Backend] {
				seen[c.Backend] = true
				addrs = append(addrs, c.Backend)
			}
		}
		s := state.New(exp)
		var restored *state.State
		nonzero := 0
		for i, c := range cmds {
			_, _ = s.Apply(c)
			checkCounts(t, s, addrs, c.Type.String())
			if restored != nil {
				_, _ = restored.Apply(c)
				checkCounts(t, restored, addrs, "restored: "+c.Type.String())
			}
			if i%500 == 250 {
				restored = restore(t, snap(t, s))
				checkCounts(t, restored, addrs, "just restored")
			}
			for _, a := range addrs[1:] {
				if s.UsersOn(a) > 0 {
					nonzero++
				}
			}
		}
		if nonzero == 0 {
			t.Errorf("seed %d: no backend ever held a record", seed)
		}
	}
}

// TestUsersOnEachCommand walks every command that creates, replaces,
// moves or drops records and checks the counts by hand.
func TestUsersOnEachCommand(t *testing.T) {
	s := newXY(t)
	apply(t, s, addB(bZ, 100))
	all := []netip.Addr{bX, bY, bZ}
	want := func(what string, x, y, z int) {
		t.Helper()
		if gx, gy, gz := s.UsersOn(bX), s.UsersOn(bY), s.UsersOn(bZ); gx != x || gy != y || gz != z {
			t.Fatalf("%s: counts X=%d Y=%d Z=%d, want %d %d %d", what, gx, gy, gz, x, y, z)
		}
		checkCounts(t, s, all, what)
	}
	want("empty", 0, 0, 0)
	apply(t, s, open("a", bX, t0))
	apply(t, s, open("b", bX, t0))
	apply(t, s, open("c", bY, t0))
	apply(t, s, open("a", bY, t0)) // live: stays on X
	want("opens", 2, 1, 0)
	apply(t, s, closeS("a", t0))
	apply(t, s, closeS("a", t0))
	apply(t, s, open("a", bZ, t0.Add(exp))) // expired, not swept: replaced on Z
	want("expired record replaced", 1, 1, 1)
	apply(t, s, closeS("b", t0))
	apply(t, s, state.Command{Type: state.CmdExpire, Time: t0.Add(exp)}) // sweeps b
	want("expire", 0, 1, 1)
	apply(t, s, moveStart("c", bX, t0.Add(exp)))
	want("move start counts on the old backend", 0, 1, 1)
	apply(t, s, moveEnd("c", bX, "", t0.Add(exp)))
	want("move end", 1, 0, 1)
	apply(t, s, moveEnd("new", bY, "", t0.Add(exp))) // pins a user without record
	want("move end creates", 1, 1, 1)
	apply(t, s, moveEnd("new", netip.Addr{}, "", t0.Add(exp)))
	want("move end drops", 1, 0, 1)
	apply(t, s, open("d", bY, t0.Add(exp)))
	apply(t, s, moveStart("d", bZ, t0.Add(exp)))
	apply(t, s, open("e", bY, t0.Add(exp)))
	apply(t, s, moveStart("e", netip.Addr{}, t0.Add(exp)))
	want("two moving", 1, 2, 1)
	b := snap(t, s)
	apply(t, s, state.Command{Type: state.CmdRestart, Time: t0.Add(exp)})
	want("restart completes d to Z, drops e", 1, 0, 2)
	r := restore(t, b)
	if r.UsersOn(bY) != 2 || r.UsersOn(bX) != 1 || r.UsersOn(bZ) != 1 {
		t.Fatalf("restored counts X=%d Y=%d Z=%d, want 1 2 1", r.UsersOn(bX), r.UsersOn(bY), r.UsersOn(bZ))
	}
	apply(t, s, state.Command{Type: state.CmdForget, Backend: bZ})
	want("forget Z", 1, 0, 0)
	apply(t, s, open("f", bY, t0.Add(exp)))
	apply(t, s, open("g", bY, t0.Add(exp)))
	apply(t, s, state.Command{Type: state.CmdRemoveBackend, Backend: bY})
	want("remove Y", 1, 0, 0)
	apply(t, s, state.Command{Type: state.CmdForget})
	want("forget all", 0, 0, 0)
	if n := testing.AllocsPerRun(100, func() { s.UsersOn(bX) }); n != 0 {
		t.Errorf("UsersOn allocates %v times", n)
	}
}

// TestUsersOnSnapshotDuplicateUser: a snapshot that lists a key twice keeps
// the last record and counts it once.
func TestUsersOnSnapshotDuplicateUser(t *testing.T) {
	doc := `{"version":1,"expire_ns":60000000000,"backends":[` +
		`{"address":"192.0.2.1","weight":1,"up":true},{"address":"192.0.2.2","weight":1,"up":true}],"users":[` +
		`{"user":"u","backend":"192.0.2.1","sessions":0,"last_seen":"2025-01-02T03:04:05Z"},` +
		`{"user":"u","backend":"192.0.2.2","sessions":0,"last_seen":"2025-01-02T03:04:05Z"}]}`
	r := restore(t, []byte(doc))
	if r.UsersOn(bX) != 0 || r.UsersOn(bY) != 1 {
		t.Errorf("counts X=%d Y=%d, want 0 1 (records %+v)", r.UsersOn(bX), r.UsersOn(bY), r.Users())
	}
}
