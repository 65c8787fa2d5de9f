package admin_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/state"
)

const testToken = "s3cret-Token_0123456789"

// answer is one raw answer.
type answer struct {
	code int
	hdr  http.Header
	body map[string]any
	raw  string
}

// send sends a request over hc to base+path with optional headers.
func send(t *testing.T, hc *http.Client, base, method, path, body string, hdr map[string]string) answer {
	t.Helper()
	a, err := trySend(hc, base, method, path, body, hdr)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return a
}

// trySend is send for other goroutines.
func trySend(hc *http.Client, base, method, path, body string, hdr map[string]string) (answer, error) {
	req, err := http.NewRequest(method, base+path, strings.NewReader(body))
	if err != nil {
		return answer{}, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	a := answer{code: resp.StatusCode, hdr: resp.Header, raw: string(data)}
	_ = json.Unmarshal(data, &a.body)
	return a, nil
}

// moveAsync starts a move in a goroutine; the answer (code -1 on a
// transport error) arrives on the channel.
func (f *fixture) moveAsync(user, to string) <-chan answer {
	ch := make(chan answer, 1)
	hc := rawClient(f.path)
	hc.Timeout = time.Minute
	go func() {
		a, err := trySend(hc, "http://usher", http.MethodPost, admin.UserPath(user)+"/move", fmt.Sprintf(`{"backend":%q}`, to), nil)
		if err != nil {
			a = answer{code: -1, raw: err.Error()}
		}
		ch <- a
	}()
	return ch
}

// unix sends over the fixture's socket.
func (f *fixture) unix(t *testing.T, method, path, body string) answer {
	t.Helper()
	return send(t, f.raw, "http://usher", method, path, body, nil)
}

// tcpAs sends over the fixture's TCP listener with an Authorization header
// ("" for none).
func (f *fixture) tcpAs(t *testing.T, authz, method, path, body string) answer {
	t.Helper()
	hdr := map[string]string{}
	if authz != "" {
		hdr["Authorization"] = authz
	}
	return send(t, &http.Client{Timeout: 5 * time.Second}, f.tcp, method, path, body, hdr)
}

// want checks an answer's status and, for errors, the JSON error text.
func want(t *testing.T, what string, a answer, code int, inError string) {
	t.Helper()
	if a.code != code {
		t.Errorf("%s: %d %s, want %d", what, a.code, a.raw, code)
		return
	}
	if ct := a.hdr.Get("Content-Type"); ct != "application/json" && !strings.HasPrefix(a.hdr.Get("Content-Type"), "text/plain") {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
	if code/100 != 2 {
		msg, _ := a.body["error"].(string)
		if msg == "" || !strings.Contains(msg, inError) {
			t.Errorf("%s: error %q, want one mentioning %q (answer %s)", what, msg, inError, a.raw)
		}
	}
}

func (f *fixture) backend(t *testing.T, addr string) director.BackendStatus {
	t.Helper()
	for _, b := range f.status(t).Backends {
		if b.Address == addr {
			return b
		}
	}
	t.Fatalf("backend %s not in status", addr)
	return director.BackendStatus{}
}

func (f *fixture) userStatus(t *testing.T, user string) director.UserStatus {
	t.Helper()
	var us director.UserStatus
	if err := f.c.Do(http.MethodGet, admin.UserPath(user), nil, &us); err != nil {
		t.Fatal(err)
	}
	return us
}

func (f *fixture) acquire(t *testing.T, user string) *proxy.Lease {
	t.Helper()
	l, err := f.d.Acquire(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Release)
	return l
}

// eventually polls cond for up to 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// other returns a backend of the fixture that is not addr.
func other(addr string) string {
	for _, a := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		if a != addr {
			return a
		}
	}
	panic("unreachable")
}

func TestMethodNotAllowedNamesAllowed(t *testing.T) {
	f := start(t)
	a := f.unix(t, http.MethodGet, "/v1/flush", "")
	want(t, "GET /v1/flush", a, http.StatusMethodNotAllowed, "not allowed")
	if got := a.hdr.Get("Allow"); got != "POST" {
		t.Errorf("Allow %q, want POST", got)
	}
	a = f.unix(t, http.MethodPut, "/v1/backends/10.0.0.1", `{}`)
	want(t, "PUT /v1/backends/10.0.0.1", a, http.StatusMethodNotAllowed, "not allowed")
	if got := a.hdr.Get("Allow"); !strings.Contains(got, "PATCH") || !strings.Contains(got, "DELETE") {
		t.Errorf("Allow %q, want PATCH and DELETE", got)
	}
	want(t, "unknown sub-path", f.unix(t, http.MethodPost, "/v1/backends/10.0.0.1/sideways", ""), http.StatusNotFound, "no API endpoint")
}

func TestUpdateBackend(t *testing.T) {
	f := start(t)
	a := f.unix(t, http.MethodPatch, admin.BackendPath("10.0.0.2"), `{"weight":0}`)
	want(t, "PATCH weight 0", a, http.StatusOK, "")
	if a.body["address"] != "10.0.0.2" || a.body["weight"] != float64(0) {
		t.Errorf("answer %v, want the backend with weight 0", a.body)
	}
	if b := f.backend(t, "10.0.0.2"); b.Weight != 0 || !b.Up {
		t.Errorf("after PATCH: %+v", b)
	}
	// An IPv4-mapped address in the path means the same backend.
	want(t, "PATCH mapped", f.unix(t, http.MethodPatch, admin.BackendPath("::ffff:10.0.0.2"), `{"weight":1000}`), http.StatusOK, "")
	if b := f.backend(t, "10.0.0.2"); b.Weight != 1000 {
		t.Errorf("after PATCH mapped: %+v", b)
	}
	for _, c := range []struct {
		name, addr, body string
		code             int
		inError          string
	}{
		{"unknown backend", "10.0.0.9", `{"weight":5}`, 404, "not found"},
		{"bad address", "mail.example.com", `{"weight":5}`, 400, "not an IP address"},
		{"unspecified address", "0.0.0.0", `{"weight":5}`, 400, "unicast"},
		{"no weight", "10.0.0.1", `{}`, 400, "weight is required"},
		{"weight too high", "10.0.0.1", `{"weight":1001}`, 400, "out of range"},
		{"negative weight", "10.0.0.1", `{"weight":-1}`, 400, "out of range"},
		{"tag is not patchable", "10.0.0.1", `{"weight":5,"tag":"x"}`, 400, "unknown field"},
		{"empty body", "10.0.0.1", ``, 400, "decode"},
	} {
		want(t, c.name, f.unix(t, http.MethodPatch, admin.BackendPath(c.addr), c.body), c.code, c.inError)
	}
	if b := f.backend(t, "10.0.0.1"); b.Weight != 100 {
		t.Errorf("rejected PATCHes changed 10.0.0.1: %+v", b)
	}
}

func TestRemoveBackend(t *testing.T) {
	f := start(t)
	// A user with an open session on the backend is kicked and its record
	// dropped; the backend is gone afterwards.
	l := f.acquire(t, "alice@example.com")
	victim := l.Backend.String()
	go func() { <-l.Done; l.Release() }()
	a := f.unix(t, http.MethodDelete, admin.BackendPath(victim), "")
	want(t, "DELETE", a, http.StatusOK, "")
	if a.body["removed"] != victim {
		t.Errorf("answer %v", a.body)
	}
	if !closed(l.Done) {
		t.Error("the session on the removed backend was not kicked")
	}
	if got := addresses(f.status(t)); len(got) != 2 || slices.Contains(got, victim) {
		t.Errorf("backends after remove: %v", got)
	}
	if us := f.userStatus(t, "alice@example.com"); us.Backend != "" {
		t.Errorf("record still on %q after its backend was removed", us.Backend)
	}
	want(t, "DELETE again", f.unix(t, http.MethodDelete, admin.BackendPath(victim), ""), http.StatusNotFound, "not found")
	want(t, "DELETE bad address", f.unix(t, http.MethodDelete, admin.BackendPath("224.0.0.1"), ""), http.StatusBadRequest, "unicast")
	want(t, "DELETE with a body", f.unix(t, http.MethodDelete, admin.BackendPath(other(victim)), `{"force":true}`), http.StatusBadRequest, "unknown field")
	if n := len(f.status(t).Backends); n != 2 {
		t.Errorf("%d backends, want 2", n)
	}
}

func TestBackendUpDown(t *testing.T) {
	f := start(t)
	l := f.acquire(t, "bob@example.com")
	b := l.Backend.String()
	go func() { <-l.Done; l.Release() }()

	a := f.unix(t, http.MethodPost, admin.BackendPath(b)+"/down", `{"cause":"disk replacement"}`)
	want(t, "down", a, http.StatusOK, "")
	if a.body["up"] != false {
		t.Errorf("answer %v, want up false", a.body)
	}
	bs := f.backend(t, b)
	if bs.Up || bs.Cause == nil || bs.Cause.Text != "disk replacement" || bs.Cause.Time.IsZero() {
		t.Errorf("after down: %+v (cause %+v)", bs, bs.Cause)
	}
	if !closed(l.Done) {
		t.Error("the session on the backend marked down was not kicked")
	}
	// Down again changes nothing, and is no error.
	want(t, "down again", f.unix(t, http.MethodPost, admin.BackendPath(b)+"/down", ""), http.StatusOK, "")
	if c := f.backend(t, b).Cause; c == nil || c.Text != "disk replacement" {
		t.Errorf("a down of a down backend replaced the cause: %+v", c)
	}
	// Up without a body: the cause is "admin".
	want(t, "up", f.unix(t, http.MethodPost, admin.BackendPath(b)+"/up", ""), http.StatusOK, "")
	if bs := f.backend(t, b); !bs.Up || bs.Cause == nil || bs.Cause.Text != "admin" {
		t.Errorf("after up: %+v (cause %+v)", bs, bs.Cause)
	}
	want(t, "up with {}", f.unix(t, http.MethodPost, admin.BackendPath(b)+"/up", "{}"), http.StatusOK, "")

	for _, c := range []struct {
		name, path, body string
		code             int
		inError          string
	}{
		{"unknown backend", admin.BackendPath("10.0.0.9") + "/down", "", 404, "not found"},
		{"zone", admin.BackendPath("fe80::1%eth0") + "/down", "", 400, "zone"},
		{"control character", admin.BackendPath(b) + "/down", `{"cause":"a\nb"}`, 400, "control"},
		{"long cause", admin.BackendPath(b) + "/down", `{"cause":"` + strings.Repeat("c", admin.MaxCauseLen+1) + `"}`, 400, "longer"},
		{"unknown field", admin.BackendPath(b) + "/down", `{"reason":"x"}`, 400, "unknown field"},
		{"not an object", admin.BackendPath(b) + "/up", `"x"`, 400, "decode"},
	} {
		want(t, c.name, f.unix(t, http.MethodPost, c.path, c.body), c.code, c.inError)
	}
	if bs := f.backend(t, b); !bs.Up {
		t.Errorf("rejected requests changed the backend: %+v", bs)
	}
}

func TestMoveUser(t *testing.T) {
	f := start(t)
	const user = "Carol@Example.com"
	// Without a record the user is just pinned.
	a := f.unix(t, http.MethodPost, admin.UserPath(user)+"/move", `{"backend":"10.0.0.3"}`)
	want(t, "move without record", a, http.StatusOK, "")
	if a.body["backend"] != "10.0.0.3" || a.body["key"] != "carol@example.com" {
		t.Errorf("answer %v, want the user's status on 10.0.0.3", a.body)
	}
	// With an open session: the session is kicked, the record moves once
	// it closed.
	l := f.acquire(t, user)
	if l.Backend.String() != "10.0.0.3" {
		t.Fatalf("login went to %s, want the pinned 10.0.0.3", l.Backend)
	}
	go func() { <-l.Done; l.Release() }()
	a = f.unix(t, http.MethodPost, admin.UserPath(user)+"/move", `{"backend":"::ffff:10.0.0.1"}`)
	want(t, "move with session", a, http.StatusOK, "")
	if us := f.userStatus(t, user); us.Backend != "10.0.0.1" || us.Sessions != 0 || us.Moving {
		t.Errorf("after move: %+v", us)
	}
	if !closed(l.Done) {
		t.Error("the user's session was not kicked")
	}

	want(t, "down target setup", f.unix(t, http.MethodPost, admin.BackendPath("10.0.0.2")+"/down", ""), http.StatusOK, "")
	for _, c := range []struct {
		name, user, body string
		code             int
		inError          string
	}{
		{"target down", user, `{"backend":"10.0.0.2"}`, 503, "down"},
		{"unknown target", user, `{"backend":"10.0.0.9"}`, 404, "not found"},
		{"bad target", user, `{"backend":"10.0.0.1:143"}`, 400, "has a port"},
		{"no target", user, `{}`, 400, "must not be empty"},
		{"user too long", strings.Repeat("u", admin.MaxUserLen+1), `{"backend":"10.0.0.3"}`, 400, "longer"},
	} {
		want(t, c.name, f.unix(t, http.MethodPost, admin.UserPath(c.user)+"/move", c.body), c.code, c.inError)
	}
	if us := f.userStatus(t, user); us.Backend != "10.0.0.1" {
		t.Errorf("rejected moves changed the record: %+v", us)
	}
}

// TestMoveBusy: a second move of a user whose move waits for its sessions
// is refused with 409.
func TestMoveBusy(t *testing.T) {
	f := startWith(t, options{moveWait: 10 * time.Second})
	const user = "dave@example.com"
	l := f.acquire(t, user)
	to := other(l.Backend.String())
	first := f.moveAsync(user, to)
	eventually(t, "the move to start", func() bool { return f.d.UserStatus(user).Moving })
	want(t, "second move", f.unix(t, http.MethodPost, admin.UserPath(user)+"/move", fmt.Sprintf(`{"backend":%q}`, to)), http.StatusConflict, "already being moved")
	l.Release() // the kicked session closes: the first move completes
	want(t, "first move", <-first, http.StatusOK, "")
	if us := f.userStatus(t, user); us.Backend != to || us.Moving {
		t.Errorf("after the move: %+v", us)
	}
}

// TestMoveSurvivesClientDisconnect: a client that gives up does not abort
// the move half-way: it goes on waiting for the kicked session, then pins.
func TestMoveSurvivesClientDisconnect(t *testing.T) {
	f := startWith(t, options{moveWait: 10 * time.Second})
	const user = "erin@example.com"
	l := f.acquire(t, user)
	to := other(l.Backend.String())
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := f.c.DoContext(ctx, http.MethodPost, admin.UserPath(user)+"/move", admin.MoveRequest{Backend: to}, nil)
	if err == nil {
		t.Fatal("the move answered although the session is still open")
	}
	time.Sleep(200 * time.Millisecond) // the server noticed the disconnect by now
	if us := f.userStatus(t, user); !us.Moving || us.Backend != l.Backend.String() {
		t.Fatalf("after the client went away: %+v; want the move still waiting for the session", us)
	}
	if !closed(l.Done) {
		t.Fatal("session not kicked")
	}
	l.Release()
	eventually(t, "the move to complete", func() bool {
		us := f.d.UserStatus(user)
		return !us.Moving && us.Backend == to
	})
}

// TestOpTimeout: the server bounds long operations; the director still
// completes the move (pins the user) when the bound cuts its wait.
func TestOpTimeout(t *testing.T) {
	f := startWith(t, options{moveWait: 30 * time.Second, opTimeout: 200 * time.Millisecond})
	const user = "frank@example.com"
	l := f.acquire(t, user)
	to := other(l.Backend.String())
	start := time.Now()
	want(t, "move", f.unix(t, http.MethodPost, admin.UserPath(user)+"/move", fmt.Sprintf(`{"backend":%q}`, to)), http.StatusOK, "")
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("move took %v with a 200ms operation timeout", el)
	}
	if us := f.userStatus(t, user); us.Backend != to || us.Moving {
		t.Errorf("after the bounded move: %+v", us)
	}
}

// TestShutdownCutsLongOperations: Shutdown does not wait minutes for a move
// whose session never closes.
func TestShutdownCutsLongOperations(t *testing.T) {
	f := startWith(t, options{moveWait: time.Minute})
	const user = "gina@example.com"
	l := f.acquire(t, user)
	to := other(l.Backend.String())
	res := f.moveAsync(user, to)
	eventually(t, "the move to start", func() bool { return f.d.UserStatus(user).Moving })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := f.srv.Shutdown(ctx)
	if err == nil {
		t.Error("Shutdown with a request still running returned nil, want the context's error")
	}
	select {
	case a := <-res:
		want(t, "the cut move", a, http.StatusOK, "")
	case <-time.After(5 * time.Second):
		t.Fatal("the move still runs 5s after Shutdown")
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("Shutdown took %v", el)
	}
	if us := f.d.UserStatus(user); us.Backend != to || us.Moving {
		t.Errorf("after the cut move: %+v", us)
	}
}

func TestKickUser(t *testing.T) {
	f := start(t)
	const user = "hank@example.com"
	l1, l2 := f.acquire(t, user), f.acquire(t, "HANK@example.com")
	a := f.unix(t, http.MethodPost, admin.UserPath(user)+"/kick", "")
	want(t, "kick", a, http.StatusOK, "")
	if a.body["kicked"] != float64(2) {
		t.Errorf("answer %v, want kicked 2", a.body)
	}
	if !closed(l1.Done) || !closed(l2.Done) {
		t.Error("sessions not kicked")
	}
	// The record stays (kick is not move).
	if us := f.userStatus(t, user); us.Backend != l1.Backend.String() {
		t.Errorf("after kick: %+v", us)
	}
	var ka admin.KickAnswer
	if err := f.c.Do(http.MethodPost, admin.UserPath("nobody@example.com")+"/kick", nil, &ka); err != nil || ka.Kicked != 0 {
		t.Errorf("kick of a user without sessions: %+v, %v", ka, err)
	}
	want(t, "kick with a body", f.unix(t, http.MethodPost, admin.UserPath(user)+"/kick", `{"all":true}`), http.StatusBadRequest, "unknown field")
	want(t, "kick GET", f.unix(t, http.MethodGet, admin.UserPath(user)+"/kick", ""), http.StatusMethodNotAllowed, "not allowed")
}

func TestMap(t *testing.T) {
	f := start(t)
	var ma admin.MapAnswer
	if err := f.c.Do(http.MethodGet, "/v1/map", nil, &ma); err != nil || ma.Users == nil || len(ma.Users) != 0 {
		t.Fatalf("empty map: %+v (nil: %v), %v", ma, ma.Users == nil, err)
	}
	users := []string{"zed@example.com", "amy@example.com", "kim@example.com", "bo@example.com"}
	on := map[string]string{}
	for i, u := range users {
		if i%2 == 0 {
			l := f.acquire(t, u)
			on[u] = l.Backend.String()
		} else {
			want(t, "pin", f.unix(t, http.MethodPost, admin.UserPath(u)+"/move", `{"backend":"10.0.0.2"}`), http.StatusOK, "")
			on[u] = "10.0.0.2"
		}
	}
	if err := f.c.Do(http.MethodGet, "/v1/map", nil, &ma); err != nil {
		t.Fatal(err)
	}
	sorted := slices.Sorted(slices.Values(users))
	var got []string
	for _, r := range ma.Users {
		got = append(got, r.User)
		if r.Backend != on[r.User] {
			t.Errorf("%s on %s, want %s", r.User, r.Backend, on[r.User])
		}
		open := r.User == "zed@example.com" || r.User == "kim@example.com"
		if open && (r.Sessions != 1 || r.Expires != nil) || !open && (r.Sessions != 0 || r.Expires == nil) {
			t.Errorf("record %+v", r)
		}
	}
	if !slices.Equal(got, sorted) {
		t.Errorf("map users %v, want sorted %v", got, sorted)
	}
	if err := f.c.Do(http.MethodGet, "/v1/map?backend=10.0.0.2", nil, &ma); err != nil {
		t.Fatal(err)
	}
	for _, r := range ma.Users {
		if r.Backend != "10.0.0.2" {
			t.Errorf("map of 10.0.0.2 lists %+v", r)
		}
	}
	wantN := 0
	for _, b := range on {
		if b == "10.0.0.2" {
			wantN++
		}
	}
	if len(ma.Users) != wantN {
		t.Errorf("map of 10.0.0.2: %d users, want %d", len(ma.Users), wantN)
	}
	want(t, "unknown backend", f.unix(t, http.MethodGet, "/v1/map?backend=10.0.0.9", ""), http.StatusNotFound, "not found")
	want(t, "bad backend", f.unix(t, http.MethodGet, "/v1/map?backend=ten", ""), http.StatusBadRequest, "not an IP address")
	want(t, "unknown parameter", f.unix(t, http.MethodGet, "/v1/map?user=x", ""), http.StatusBadRequest, "only one parameter")
	want(t, "repeated parameter", f.unix(t, http.MethodGet, "/v1/map?backend=10.0.0.1&backend=10.0.0.2", ""), http.StatusBadRequest, "only one parameter")
	want(t, "bad query", f.unix(t, http.MethodGet, "/v1/map?backend=%zz", ""), http.StatusBadRequest, "query")
}

func TestFlush(t *testing.T) {
	f := start(t)
	// Pin users to 10.0.0.1 whatever hashing says; a flush moves those that
	// hashing puts elsewhere and keeps the others.
	var users []string
	moved := 0
	for i := range 12 {
		u := fmt.Sprintf("user%d@example.com", i)
		users = append(users, u)
		if err := f.c.Do(http.MethodPost, admin.UserPath(u)+"/move", admin.MoveRequest{Backend: "10.0.0.1"}, nil); err != nil {
			t.Fatal(err)
		}
		if f.userStatus(t, u).HashBackend != "10.0.0.1" {
			moved++
		}
	}
	if moved == 0 || moved == len(users) {
		t.Fatalf("test needs users both kept and moved, got %d of %d moved", moved, len(users))
	}
	for _, c := range []struct {
		name, body string
		code       int
		inError    string
	}{
		{"unknown backend", `{"backend":"10.0.0.9"}`, 404, "not found"},
		{"no backend", `{}`, 400, "or \"all\""},
		{"bad backend", `{"backend":"everything"}`, 400, "not an IP address"},
		{"max_parallel 0", `{"backend":"all","max_parallel":0}`, 400, "out of range"},
		{"max_parallel huge", `{"backend":"all","max_parallel":100000}`, 400, "out of range"},
		{"forget with max_parallel", `{"backend":"all","forget":true,"max_parallel":2}`, 400, "no meaning"},
		{"unknown field", `{"backend":"all","dry_run":true}`, 400, "unknown field"},
	} {
		want(t, c.name, f.unix(t, http.MethodPost, "/v1/flush", c.body), c.code, c.inError)
	}
	// Nothing moved yet.
	for _, u := range users {
		if us := f.userStatus(t, u); us.Backend != "10.0.0.1" {
			t.Fatalf("rejected flushes moved %s to %s", u, us.Backend)
		}
	}
	var res director.FlushResult
	if err := f.c.Do(http.MethodPost, "/v1/flush", admin.FlushRequest{Backend: "10.0.0.1", MaxParallel: new(3)}, &res); err != nil {
		t.Fatal(err)
	}
	if res != (director.FlushResult{Users: len(users), Moved: moved, Kept: len(users) - moved}) {
		t.Errorf("flush result %+v, want %d users, %d moved", res, len(users), moved)
	}
	for _, u := range users {
		if us := f.userStatus(t, u); us.Backend != us.HashBackend {
			t.Errorf("after flush %s on %s, hashing says %s", u, us.Backend, us.HashBackend)
		}
	}
	// Flushing all again moves nobody.
	if err := f.c.Do(http.MethodPost, "/v1/flush", admin.FlushRequest{Backend: "all"}, &res); err != nil || res.Moved != 0 || res.Kept != len(users) {
		t.Errorf("second flush: %+v, %v", res, err)
	}
	// Forget drops the records.
	var fa admin.ForgetAnswer
	if err := f.c.Do(http.MethodPost, "/v1/flush", admin.FlushRequest{Backend: "all", Forget: true}, &fa); err != nil || fa.Forgotten != len(users) {
		t.Errorf("forget: %+v, %v; want %d forgotten", fa, err, len(users))
	}
	if us := f.userStatus(t, users[0]); us.Backend != "" {
		t.Errorf("record left after forget: %+v", us)
	}
	want(t, "forget unknown", f.unix(t, http.MethodPost, "/v1/flush", `{"backend":"10.0.0.9","forget":true}`), http.StatusNotFound, "not found")
}

func TestDump(t *testing.T) {
	f := start(t)
	if err := f.c.Do(http.MethodPost, "/v1/backends", admin.AddBackendRequest{Address: "2001:db8::7", Weight: new(0), Tag: "ssd"}, nil); err != nil {
		t.Fatal(err)
	}
	want(t, "down", f.unix(t, http.MethodPost, admin.BackendPath("10.0.0.2")+"/down", ""), http.StatusOK, "")
	a := f.unix(t, http.MethodGet, "/v1/dump", "")
	want(t, "dump", a, http.StatusOK, "")
	var da admin.DumpAnswer
	if err := json.Unmarshal([]byte(a.raw), &da); err != nil {
		t.Fatal(err)
	}
	wantCmds := []state.Command{
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("10.0.0.1"), Weight: 100, Up: true},
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("10.0.0.2"), Weight: 100},
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("10.0.0.3"), Weight: 100, Up: true},
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("2001:db8::7"), Tag: "ssd", Up: true},
	}
	if !slices.Equal(da.Commands, wantCmds) {
		t.Errorf("dump %+v\nwant %+v", da.Commands, wantCmds)
	}
}

func TestMetricsEndpoint(t *testing.T) {
	m := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintln(w, "usher_test_metric 1")
	})
	f := startWith(t, options{metrics: m})
	a := f.unix(t, http.MethodGet, "/metrics", "")
	if a.code != 200 || a.raw != "usher_test_metric 1\n" {
		t.Errorf("GET /metrics: %d %q", a.code, a.raw)
	}
	want(t, "POST /metrics", f.unix(t, http.MethodPost, "/metrics", ""), http.StatusMethodNotAllowed, "not allowed")
	// Without a metrics handler: a JSON 404.
	g := start(t)
	want(t, "no metrics", g.unix(t, http.MethodGet, "/metrics", ""), http.StatusNotFound, "not served")
}

func TestTCPAuth(t *testing.T) {
	m := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "usher_test_metric 1") })
	f := startWith(t, options{tcp: true, token: testToken, allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, metrics: m})
	bearer := "Bearer " + testToken
	for _, c := range []struct {
		name, authz, method, path string
		code                      int
	}{
		{"no token", "", "GET", "/v1/status", 401},
		{"wrong token", "Bearer " + testToken + "x", "GET", "/v1/status", 401},
		{"token prefix", "Bearer " + testToken[:10], "GET", "/v1/status", 401},
		{"empty bearer", "Bearer ", "GET", "/v1/status", 401},
		{"basic scheme", "Basic " + testToken, "GET", "/v1/status", 401},
		{"token without scheme", testToken, "GET", "/v1/status", 401},
		{"right token", bearer, "GET", "/v1/status", 200},
		{"scheme case-insensitive", "bearer " + testToken, "GET", "/v1/status", 200},
		{"metrics without token", "", "GET", "/metrics", 401},
		{"metrics with token", bearer, "GET", "/metrics", 200},
		{"unknown path without token", "", "GET", "/v1/nothing", 401},
		{"unknown path with token", bearer, "GET", "/v1/nothing", 404},
		{"change without token", "", "POST", "/v1/backends", 401},
	} {
		a := f.tcpAs(t, c.authz, c.method, c.path, `{"address":"10.0.0.8"}`)
		if a.code != c.code {
			t.Errorf("%s: %d %s, want %d", c.name, a.code, a.raw, c.code)
			continue
		}
		if c.code == 401 {
			if a.body["error"] != "missing or bad bearer token" {
				t.Errorf("%s: answer %s", c.name, a.raw)
			}
			if got := a.hdr.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer") {
				t.Errorf("%s: WWW-Authenticate %q", c.name, got)
			}
		}
	}
	if n := len(f.status(t).Backends); n != 3 {
		t.Errorf("an unauthorized POST added a backend: %d backends", n)
	}
	// With the token, changes work over TCP too.
	a := f.tcpAs(t, bearer, "POST", "/v1/backends", `{"address":"10.0.0.8"}`)
	want(t, "POST with token", a, http.StatusCreated, "")
	// The client sends the token.
	c, err := admin.NewTCPClient(f.tcp, testToken)
	if err != nil {
		t.Fatal(err)
	}
	if st := (director.Status{}); c.Do(http.MethodGet, "/v1/status", nil, &st) != nil || len(st.Backends) != 4 {
		t.Errorf("TCP client status: %+v", st)
	}
	c, _ = admin.NewTCPClient(f.tcp, "wrong-token-0123456789")
	if err := c.Do(http.MethodGet, "/v1/status", nil, nil); !admin.IsStatus(err, 401) {
		t.Errorf("TCP client with a wrong token: %v", err)
	}
	// The UNIX socket needs no token.
	want(t, "unix without token", f.unix(t, http.MethodGet, "/v1/status", ""), http.StatusOK, "")
	// Refusals are logged with the remote address, never with the token.
	logs := f.log.String()
	if !strings.Contains(logs, `msg="admin request refused: no bearer token" remote=127.0.0.1:`) ||
		!strings.Contains(logs, `msg="admin request refused: bad token" remote=127.0.0.1:`) {
		t.Errorf("refusals not logged with the remote address:\n%s", logs)
	}
	if strings.Contains(logs, testToken[:10]) {
		t.Errorf("the token leaked into the log:\n%s", logs)
	}
}

func TestTCPAllowList(t *testing.T) {
	// 127.0.0.1 (where the test dials from) is not allowed.
	f := startWith(t, options{tcp: true, token: testToken, allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32"), netip.MustParsePrefix("::1/128")}})
	for _, authz := range []string{"", "Bearer " + testToken, "Bearer nope"} {
		a := f.tcpAs(t, authz, "GET", "/v1/status", "")
		want(t, "not allowed, authz "+authz, a, http.StatusForbidden, "127.0.0.1 may not use the admin API")
	}
	if !strings.Contains(f.log.String(), `msg="admin request refused: address not allowed" remote=127.0.0.1:`) {
		t.Errorf("refusal not logged:\n%s", f.log.String())
	}
	// An empty allow list allows nobody.
	g := startWith(t, options{tcp: true, token: testToken})
	want(t, "empty allow list", g.tcpAs(t, "Bearer "+testToken, "GET", "/v1/status", ""), http.StatusForbidden, "may not")
}

func TestSetAuth(t *testing.T) {
	loop := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	f := startWith(t, options{tcp: true, token: testToken, allow: loop})
	const next = "next-Token-9876543210"
	want(t, "old token", f.tcpAs(t, "Bearer "+testToken, "GET", "/v1/status", ""), 200, "")
	f.srv.SetAuth(next, loop)
	want(t, "old token after swap", f.tcpAs(t, "Bearer "+testToken, "GET", "/v1/status", ""), 401, "bearer")
	want(t, "new token", f.tcpAs(t, "Bearer "+next, "GET", "/v1/status", ""), 200, "")
	f.srv.SetAuth(next, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")})
	want(t, "allow list swapped", f.tcpAs(t, "Bearer "+next, "GET", "/v1/status", ""), 403, "may not")
	f.srv.SetAuth("", loop)
	want(t, "empty token", f.tcpAs(t, "Bearer ", "GET", "/v1/status", ""), 401, "bearer")

	// Swaps under load: every answer is 200 or 401 for the token of the
	// moment, never a crash or a mix (run with -race).
	f.srv.SetAuth(testToken, loop)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f.srv.SetAuth([]string{testToken, next}[i%2], loop)
		}
	}()
	hc := &http.Client{Timeout: 5 * time.Second}
	for range 50 {
		req, _ := http.NewRequest("GET", f.tcp+"/v1/status", nil)
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 && resp.StatusCode != 401 {
			t.Errorf("status %d during swaps", resp.StatusCode)
		}
	}
	close(stop)
	wg.Wait()
}

func TestListenTCPNeedsToken(t *testing.T) {
	srv := newServer(t, newDirector(t, 0))
	defer srv.Shutdown(context.Background())
	if err := srv.ListenTCP("127.0.0.1:0"); err == nil || !strings.Contains(err.Error(), "no admin token") {
		t.Errorf("ListenTCP without a token: %v", err)
	}
	if srv.TCPAddr() != nil {
		t.Errorf("TCPAddr %v without a TCP listener", srv.TCPAddr())
	}
}

func TestListenAfterServe(t *testing.T) {
	f := start(t)
	if err := f.srv.ListenUnix(f.path + "2"); err == nil {
		t.Error("ListenUnix after Serve succeeded")
	}
}

func TestOnRequest(t *testing.T) {
	f := startWith(t, options{tcp: true, token: testToken, allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	f.unix(t, http.MethodGet, "/v1/status", "")
	f.unix(t, http.MethodGet, "/v1/nothing", "")
	f.unix(t, http.MethodDelete, "/v1/status", "")
	f.unix(t, http.MethodPost, "/v1/backends", "junk")
	f.unix(t, http.MethodPost, "/v1/backends", `{"address":"10.0.0.9"}`)
	f.unix(t, http.MethodPost, "/v1/backends", `{"address":"10.0.0.9"}`)
	f.unix(t, http.MethodPost, "/v1/backends", `{"address":"10.0.0.10","tag":"`+strings.Repeat("a", 70<<10)+`"}`)
	f.tcpAs(t, "", http.MethodGet, "/v1/status", "")
	f.srv.SetAuth(testToken, nil)
	f.tcpAs(t, "Bearer "+testToken, http.MethodGet, "/v1/status", "")
	wantCodes := []int{200, 404, 405, 400, 201, 409, 413, 401, 403}
	var got []int
	eventually(t, "OnRequest for every request", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		got = slices.Clone(f.codes)
		return len(got) >= len(wantCodes)
	})
	if !slices.Equal(got, wantCodes) {
		t.Errorf("OnRequest saw %v, want %v", got, wantCodes)
	}
}

// panicky is a Director whose Status panics.
type panicky struct{ admin.Director }

func (panicky) Status() director.Status { panic("boom") }

func TestHandlerPanicIsJSON500(t *testing.T) {
	d := newDirector(t, 0)
	path := t.TempDir() + "/p.sock"
	var codes []int
	var mu sync.Mutex
	srv, err := admin.New(admin.Options{Director: panicky{d}, Logger: discard(), OnRequest: func(c int) { mu.Lock(); codes = append(codes, c); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.ListenUnix(path); err != nil {
		t.Fatal(err)
	}
	srv.Serve()
	defer srv.Shutdown(context.Background())
	a := send(t, rawClient(path), "http://usher", http.MethodGet, "/v1/status", "", nil)
	want(t, "panic", a, http.StatusInternalServerError, "internal error")
	// The server still answers.
	want(t, "after panic", send(t, rawClient(path), "http://usher", http.MethodGet, admin.UserPath("x"), "", nil), 200, "")
	mu.Lock()
	defer mu.Unlock()
	if len(codes) < 1 || codes[0] != 500 {
		t.Errorf("OnRequest saw %v, want 500 first", codes)
	}
}

func TestNewClientRejectsBadAddress(t *testing.T) {
	for _, u := range []string{"https://127.0.0.1:8080", "127.0.0.1:8080", "http://", "http://h:1/path", "http://u:p@h:1", "http://h:1?x=1"} {
		if _, err := admin.NewTCPClient(u, testToken); err == nil {
			t.Errorf("NewTCPClient(%q) succeeded", u)
		}
	}
	if _, err := admin.NewTCPClient("http://127.0.0.1:8080/", testToken); err != nil {
		t.Errorf("NewTCPClient with a trailing slash: %v", err)
	}
}

func TestProfiling(t *testing.T) {
	f := startWith(t, options{profiling: true, tcp: true, token: testToken, allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
	a := f.unix(t, http.MethodGet, "/debug/pprof/", "")
	if a.code != 200 || !strings.Contains(a.raw, "goroutine") || !strings.Contains(a.raw, "heap") {
		t.Errorf("GET /debug/pprof/: %d %.200q", a.code, a.raw)
	}
	// A named profile, in text: this very test's goroutine is in it.
	a = f.unix(t, http.MethodGet, "/debug/pprof/goroutine?debug=1", "")
	if a.code != 200 || !strings.Contains(a.raw, "goroutine profile:") || !strings.Contains(a.raw, "TestProfiling") {
		t.Errorf("GET goroutine profile: %d %.200q", a.code, a.raw)
	}
	// A CPU profile is a gzipped protocol buffer.
	a = f.unix(t, http.MethodGet, "/debug/pprof/profile?seconds=1", "")
	if a.code != 200 || !strings.HasPrefix(a.raw, "\x1f\x8b") {
		t.Errorf("GET CPU profile: %d, %d bytes starting %.8q", a.code, len(a.raw), a.raw)
	}
	// The TCP listener wants its token here too.
	if a := f.tcpAs(t, "", http.MethodGet, "/debug/pprof/heap", ""); a.code != 401 {
		t.Errorf("profile over TCP without a token: %d", a.code)
	}
	if a := f.tcpAs(t, "Bearer "+testToken, http.MethodGet, "/debug/pprof/heap?debug=1", ""); a.code != 200 || !strings.Contains(a.raw, "heap profile") {
		t.Errorf("profile over TCP with the token: %d %.100q", a.code, a.raw)
	}
	// Off by default: a JSON 404.
	want(t, "profiling off", start(t).unix(t, http.MethodGet, "/debug/pprof/", ""), http.StatusNotFound, "")
}
