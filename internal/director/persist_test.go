package director

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/state"
)

// dirNames lists dir's entries.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// The state file keeps backends and user records across restarts; the
// restart drops the sessions (expiry counting from the restart) and the
// saved state wins over Options.Backends.
func TestStateFileRestart(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "state.json")
	e := newEnv(t, Options{StateFile: file})
	ctx := context.Background()
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("state file written before any change: %v", err)
	}
	b4 := state.Backend{Addr: mustAddr("10.0.0.4"), Weight: 50, Tag: "rack-b", Up: true}
	if err := e.d.AddBackend(b4); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatalf("no state file after AddBackend: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
	}
	if err := e.d.UpdateBackend(b2, 7); err != nil {
		t.Fatal(err)
	}
	if err := e.d.SetBackendUp(ctx, b3, false, "maintenance"); err != nil {
		t.Fatal(err)
	}
	open := e.acquire(t, "open@example.com")
	t.Cleanup(open.Release)
	closed := e.acquire(t, "closed@example.com")
	e.c.add(time.Minute)
	closed.Release()
	if err := e.d.MoveUser(ctx, "pinned@example.com", b2); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Save(); err != nil {
		t.Fatal(err)
	}
	wantBackends := e.d.Backends()
	before := e.d.Map(mustAddr(""))
	if len(before) != 3 {
		t.Fatalf("records before restart: %+v", before)
	}

	e.c.add(10 * time.Minute)
	restart := e.c.now()
	e2 := newEnv(t, Options{StateFile: file, Backends: backends(1), Now: e.c.now})
	if got := e2.d.Backends(); !slices.Equal(got, wantBackends) {
		t.Errorf("backends after restart:\n got %+v\nwant %+v", got, wantBackends)
	}
	after := e2.d.Map(mustAddr(""))
	if len(after) != len(before) {
		t.Fatalf("records after restart: %+v, before %+v", after, before)
	}
	for i, r := range after {
		b := before[i]
		if r.User != b.User || r.Backend != b.Backend || r.Tag != b.Tag || r.Sessions != 0 || r.Expires == nil {
			t.Errorf("record after restart %+v, before %+v", r, b)
			continue
		}
		switch r.User {
		case "open@example.com": // had a session: expiry counts from the restart
			if want := restart.Add(15 * time.Minute); !r.Expires.Equal(want) {
				t.Errorf("%s expires %v, want %v", r.User, r.Expires, want)
			}
		default: // no session: expiry unchanged
			if !r.Expires.Equal(*b.Expires) {
				t.Errorf("%s expires %v, before the restart %v", r.User, r.Expires, b.Expires)
			}
		}
	}
	if l := e2.acquire(t, "open@example.com"); l.Backend != open.Backend {
		t.Errorf("after restart open@ on %s, before on %s", l.Backend, open.Backend)
	} else {
		l.Release()
	}
	if got := dirNames(t, dir); !slices.Equal(got, []string{"state.json"}) {
		t.Errorf("files in the state directory: %v, want only state.json", got)
	}

	// A changed user expiry applies to the loaded records.
	e3 := newEnv(t, Options{StateFile: file, UserExpire: 5 * time.Minute, Now: e.c.now})
	for _, r := range e3.d.Map(mustAddr("")) {
		if r.User == "open@example.com" && !r.Expires.Equal(restart.Add(5*time.Minute)) {
			t.Errorf("with a 5m expiry %s expires %v", r.User, r.Expires)
		}
	}
}

// Moves that were under way when the state was saved complete at load: to
// their target, or by dropping the record when the user was to be re-hashed.
func TestStateFileCompletesMoves(t *testing.T) {
	file := filepath.Join(t.TempDir(), "state.json")
	e := newEnv(t, Options{StateFile: file})
	ctx := context.Background()
	alice := e.usersHashedTo(t, "alice", b1, 1)[0]
	bob := e.usersHashedTo(t, "bob", b3, 1)[0]
	la, lb := e.acquire(t, alice), e.acquire(t, bob)
	moved := goMove(e, alice, b2)
	downed := make(chan error, 1)
	go func() { downed <- e.d.SetBackendUp(ctx, b3, false, "maintenance") }()
	waitFor(t, "both moves to start", func() bool {
		return e.d.UserStatus(alice).Moving && e.d.UserStatus(bob).Moving
	})
	if err := e.d.Save(); err != nil {
		t.Fatal(err)
	}

	e2 := newEnv(t, Options{StateFile: file, Now: e.c.now})
	if us := e2.d.UserStatus(alice); us.Backend != b2.String() || us.Moving || us.Sessions != 0 {
		t.Errorf("alice, moving to %s when saved: %+v", b2, us)
	}
	if us := e2.d.UserStatus(bob); us.Backend != "" {
		t.Errorf("bob, evacuated when saved: %+v, want no record", us)
	}
	la.Release()
	lb.Release()
	if err := recv(t, "the move", moved); err != nil {
		t.Error(err)
	}
	if err := recv(t, "the evacuation", downed); err != nil {
		t.Error(err)
	}
}

func TestStateFileCorrupt(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"garbage":     "{not json",
		"truncated":   `{"version":1,"expire_ns":900000000000,"backends":[{"address":"10.0.0.1"`,
		"version":     `{"version":99}`,
		"bad address": `{"version":1,"backends":[{"address":"10.0.0.300","weight":1,"up":true}],"users":[]}`,
	} {
		file := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
		if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		d, err := New(Options{StateFile: file, Backends: backends(3)})
		if err == nil {
			t.Errorf("%s: New succeeded with %d backends", name, len(d.Backends()))
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, "load state") || !strings.Contains(msg, file) {
			t.Errorf("%s: error %q does not name the operation and the file", name, msg)
		}
		if got, _ := os.ReadFile(file); string(got) != content {
			t.Errorf("%s: the corrupt file was overwritten", name)
		}
	}
	// An unreadable path (a directory) fails too.
	if _, err := New(Options{StateFile: dir}); err == nil || !strings.Contains(err.Error(), "load state") {
		t.Errorf("directory as state file: %v", err)
	}
}

func TestSaveWithoutStateFile(t *testing.T) {
	e := newEnv(t, Options{})
	if err := e.d.Save(); err != nil {
		t.Errorf("save without a state file: %v", err)
	}
}

// Run saves the state when it changed and once more when it stops.
func TestRunSaves(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "state.json")
	e := newEnv(t, Options{StateFile: file})
	l := e.acquire(t, "run@example.com") // changes records; Acquire does not save
	defer l.Release()
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("state file present before Run: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { e.d.Run(ctx, 10*time.Millisecond); close(stopped) }()
	waitFor(t, "Run to save the state", func() bool { _, err := os.Stat(file); return err == nil })
	cancel()
	recv(t, "Run to stop", stopped)
	data, err := os.ReadFile(file)
	if err != nil || !strings.Contains(string(data), `"run@example.com"`) {
		t.Errorf("saved state %s, %v", data, err)
	}
	if got := dirNames(t, dir); !slices.Equal(got, []string{"state.json"}) {
		t.Errorf("files in the state directory: %v", got)
	}
}

// An admin's "down" must survive a restart: after loading the state, the
// health checker must not bring back a backend that an admin took down.
// Today adminDown lives only in memory, so the first healthy probe after a
// restart undoes the admin's decision.
func TestAdminDownSurvivesRestart(t *testing.T) {
	file := filepath.Join(t.TempDir(), "state.json")
	e := newEnv(t, Options{StateFile: file})
	ctx := context.Background()
	if err := e.d.SetBackendUp(ctx, b2, false, "maintenance"); err != nil {
		t.Fatal(err)
	}
	e2 := newEnv(t, Options{StateFile: file, Now: e.c.now})
	if err := e2.d.HealthVerdict(ctx, b2, true, "probe ok"); err != nil {
		t.Fatal(err)
	}
	if b, _ := e2.d.Backend(b2); b.Up {
		t.Errorf("after a restart a health check brought up %s, which an admin took down", b2)
	}
}
