package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

// syncBuffer collects log output from server goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type fixture struct {
	path string
	d    *director.Director
	srv  *admin.Server
	c    *admin.Client
	raw  *http.Client
	log  *syncBuffer
	tcp  string // base URL of the TCP listener, if any

	mu    sync.Mutex
	codes []int // seen by OnRequest
}

// options tunes a fixture.
type options struct {
	moveWait  time.Duration
	opTimeout time.Duration
	token     string
	allow     []netip.Prefix
	tcp       bool // also listen on 127.0.0.1:0
	metrics   http.Handler
	profiling bool
}

func newDirector(t *testing.T, moveWait time.Duration) *director.Director {
	t.Helper()
	var bs []state.Backend
	for i := 1; i <= 3; i++ {
		bs = append(bs, state.Backend{Addr: netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), Weight: 100, Up: true})
	}
	d, err := director.New(director.Options{
		Algorithm: route.Rendezvous, UserExpire: 15 * time.Minute, Backends: bs, MoveWait: moveWait,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func rawClient(path string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newServer is admin.New for tests that need no fixture.
func newServer(t *testing.T, d admin.Director) *admin.Server {
	t.Helper()
	srv, err := admin.New(admin.Options{Director: d, Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// start serves the admin API of a fresh director on a socket in a temp dir.
func start(t *testing.T) *fixture {
	t.Helper()
	return startWith(t, options{})
}

func startWith(t *testing.T, o options) *fixture {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admin.sock")
	return startAt(t, path, newDirector(t, o.moveWait), o)
}

func startAt(t *testing.T, path string, d *director.Director, o options) *fixture {
	t.Helper()
	logs := &syncBuffer{}
	f := &fixture{path: path, d: d, c: admin.NewClient(path), raw: rawClient(path), log: logs}
	srv, err := admin.New(admin.Options{
		Director: d, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Token: o.token, Allow: o.allow, Metrics: o.metrics, OpTimeout: o.opTimeout, Profiling: o.profiling,
		OnRequest: func(code int) {
			f.mu.Lock()
			f.codes = append(f.codes, code)
			f.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := srv.ListenUnix(path); err != nil {
		t.Fatalf("ListenUnix: %v", err)
	}
	if o.tcp {
		if err := srv.ListenTCP("127.0.0.1:0"); err != nil {
			t.Fatalf("ListenTCP: %v", err)
		}
		f.tcp = "http://" + srv.TCPAddr().String()
	}
	f.srv = srv
	srv.Serve()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	return f
}

// do sends a raw request and returns the status and the decoded JSON body.
func (f *fixture) do(t *testing.T, method, path, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, "http://usher"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.raw.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Errorf("%s %s: %s answer is not a JSON object: %q", method, path, resp.Status, data)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q, want application/json", method, path, ct)
	}
	return resp.StatusCode, m
}

func (f *fixture) status(t *testing.T) director.Status {
	t.Helper()
	var st director.Status
	if err := f.c.Do(http.MethodGet, "/v1/status", nil, &st); err != nil {
		t.Fatalf("GET status: %v", err)
	}
	return st
}

func addresses(st director.Status) []string {
	var out []string
	for _, b := range st.Backends {
		out = append(out, b.Address)
	}
	return out
}

func TestSocketMode(t *testing.T) {
	before := syscall.Umask(0o022)
	syscall.Umask(before)
	f := start(t)
	fi, err := os.Stat(f.path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is %v, not a socket", f.path, fi.Mode())
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Fatalf("socket mode %#o, want 0600", perm)
	}
	after := syscall.Umask(before)
	if after != before {
		t.Errorf("Listen left the process umask at %#o, was %#o", after, before)
	}
}

func TestStatus(t *testing.T) {
	f := start(t)
	st := f.status(t)
	if st.Algorithm != "rendezvous" {
		t.Errorf("algorithm %q", st.Algorithm)
	}
	want := []director.BackendStatus{
		{Address: "10.0.0.1", Weight: 100, Up: true},
		{Address: "10.0.0.2", Weight: 100, Up: true},
		{Address: "10.0.0.3", Weight: 100, Up: true},
	}
	if fmt.Sprint(st.Backends) != fmt.Sprint(want) {
		t.Fatalf("backends %+v, want %+v", st.Backends, want)
	}
	code, body := f.do(t, http.MethodGet, "/v1/status", "")
	if code != http.StatusOK || body["algorithm"] != "rendezvous" {
		t.Fatalf("raw GET status: %d %v", code, body)
	}
}

func TestUser(t *testing.T) {
	f := start(t)
	const user = "User1@Example.com"
	var us director.UserStatus
	if err := f.c.Do(http.MethodGet, admin.UserPath(user), nil, &us); err != nil {
		t.Fatal(err)
	}
	if us.User != user || us.Key != "user1@example.com" {
		t.Errorf("user %q key %q", us.User, us.Key)
	}
	if us.Backend != "" || us.Sessions != 0 || us.Expires != nil {
		t.Errorf("user without record: %+v", us)
	}
	if !strings.HasPrefix(us.HashBackend, "10.0.0.") {
		t.Errorf("hash_backend %q, want one of the backends", us.HashBackend)
	}

	lease, err := f.d.Acquire(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.c.Do(http.MethodGet, admin.UserPath(user), nil, &us); err != nil {
		t.Fatal(err)
	}
	if us.Backend != lease.Backend.String() || us.Sessions != 1 || us.Expires != nil {
		t.Errorf("user with one session on %s: %+v", lease.Backend, us)
	}
	if us.HashBackend != us.Backend {
		t.Errorf("hash_backend %q differs from the backend hashing just picked %q", us.HashBackend, us.Backend)
	}
	for _, b := range f.status(t).Backends {
		want := 0
		if b.Address == lease.Backend.String() {
			want = 1
		}
		if b.Users != want || b.Sessions != want {
			t.Errorf("status of %s: users %d sessions %d, want %d", b.Address, b.Users, b.Sessions, want)
		}
	}

	lease.Release()
	if err := f.c.Do(http.MethodGet, admin.UserPath(user), nil, &us); err != nil {
		t.Fatal(err)
	}
	if us.Backend != lease.Backend.String() || us.Sessions != 0 || us.Expires == nil {
		t.Errorf("user after last session closed: %+v, want record with expiry", us)
	}
}

func TestUserNamesNeedingEscapes(t *testing.T) {
	f := start(t)
	for _, user := range []string{"a/b@example.com", "x y", "100%@example.com", "?q=1#frag", "ü@例え.jp"} {
		var us director.UserStatus
		if err := f.c.Do(http.MethodGet, admin.UserPath(user), nil, &us); err != nil {
			t.Errorf("user %q: %v", user, err)
			continue
		}
		if us.User != user {
			t.Errorf("asked for %q, got the record of %q", user, us.User)
		}
	}
}

func TestAddBackend(t *testing.T) {
	f := start(t)
	w := 50
	if err := f.c.Do(http.MethodPost, "/v1/backends", admin.AddBackendRequest{Address: "10.0.0.4", Weight: &w, Tag: "ssd"}, nil); err != nil {
		t.Fatalf("add 10.0.0.4: %v", err)
	}
	code, body := f.do(t, http.MethodPost, "/v1/backends", `{"address":"10.0.0.5"}`)
	if code != http.StatusCreated {
		t.Fatalf("add 10.0.0.5: %d %v, want 201", code, body)
	}
	if body["address"] != "10.0.0.5" || body["weight"] != float64(100) {
		t.Errorf("answer %v, want address 10.0.0.5 with the default weight 100", body)
	}
	// Weight 0 (drained) is allowed; an IPv4-mapped IPv6 address is stored as
	// written (the Dovecot ring hashes its text) and sorts after IPv4.
	if code, body := f.do(t, http.MethodPost, "/v1/backends", `{"address":"::ffff:10.0.0.6","weight":0}`); code != http.StatusCreated {
		t.Fatalf("add ::ffff:10.0.0.6 weight 0: %d %v", code, body)
	}
	st := f.status(t)
	if got, want := strings.Join(addresses(st), " "), "10.0.0.1 10.0.0.2 10.0.0.3 10.0.0.4 10.0.0.5 ::ffff:10.0.0.6"; got != want {
		t.Fatalf("backends %s, want %s", got, want)
	}
	if b := st.Backends[3]; b.Weight != 50 || b.Tag != "ssd" || !b.Up {
		t.Errorf("10.0.0.4: %+v", b)
	}
	if b := st.Backends[5]; b.Weight != 0 {
		t.Errorf("10.0.0.6: %+v", b)
	}
	// Changes are audited at level info.
	if !strings.Contains(f.log.String(), `level=INFO msg="admin request" method=POST path=/v1/backends status=201 remote=unix`) {
		t.Errorf("no audit log line for the added backend:\n%s", f.log.String())
	}
}

func TestAddBackendDuplicate(t *testing.T) {
	f := start(t)
	for _, addr := range []string{"10.0.0.2", "::ffff:10.0.0.2"} {
		code, body := f.do(t, http.MethodPost, "/v1/backends", fmt.Sprintf(`{"address":%q}`, addr))
		if code != http.StatusConflict {
			t.Errorf("duplicate %s: %d %v, want 409", addr, code, body)
		}
		if msg, _ := body["error"].(string); !strings.Contains(msg, "exists") {
			t.Errorf("duplicate %s: error %q", addr, msg)
		}
	}
	err := f.c.Do(http.MethodPost, "/v1/backends", admin.AddBackendRequest{Address: "10.0.0.2"}, nil)
	if err == nil || !strings.Contains(err.Error(), "backend exists") || !strings.Contains(err.Error(), "409") {
		t.Errorf("client error for duplicate: %v", err)
	}
	if !strings.Contains(f.log.String(), "admin request failed") {
		t.Errorf("no log line for the failed request:\n%s", f.log.String())
	}
	if n := len(f.status(t).Backends); n != 3 {
		t.Errorf("%d backends after duplicates, want 3", n)
	}
}

func TestAddBackendRejects(t *testing.T) {
	f := start(t)
	cases := []struct {
		name, body, inError string
	}{
		{"host name", `{"address":"mail.example.com"}`, "not an IP address"},
		{"with port", `{"address":"10.0.0.9:143"}`, "has a port"},
		{"empty address", `{"address":""}`, "must not be empty"},
		{"no address", `{}`, "must not be empty"},
		{"unknown field", `{"address":"10.0.0.9","wieght":5}`, "wieght"},
		{"weight too high", `{"address":"10.0.0.9","weight":1001}`, "out of range"},
		{"weight negative", `{"address":"10.0.0.9","weight":-1}`, "out of range"},
		{"weight not a number", `{"address":"10.0.0.9","weight":"5"}`, "decode"},
		{"not json", `address=10.0.0.9`, "decode"},
		{"empty body", ``, "decode"},
		{"array", `[{"address":"10.0.0.9"}]`, "decode"},
		{"trailing junk", `{"address":"10.0.0.9"} x`, "after the JSON object"},
		{"two objects", `{"address":"10.0.0.9"}{"address":"10.0.0.10"}`, "after the JSON object"},
		{"null", `null`, "must not be empty"},
	}
	for _, c := range cases {
		code, body := f.do(t, http.MethodPost, "/v1/backends", c.body)
		if code != http.StatusBadRequest {
			t.Errorf("%s: %d %v, want 400", c.name, code, body)
			continue
		}
		if msg, _ := body["error"].(string); !strings.Contains(msg, c.inError) {
			t.Errorf("%s: error %q does not mention %q", c.name, msg, c.inError)
		}
	}
	if got := strings.Join(addresses(f.status(t)), " "); got != "10.0.0.1 10.0.0.2 10.0.0.3" {
		t.Errorf("backends changed by rejected requests: %s", got)
	}
}

// TestAddBackendRejectsWhatConfigRejects: a backend added at run time must
// pass the same checks as one in the config file (config.checkBackendAddress,
// config.checkTag), or `usher backend add 0.0.0.0` routes users to this host
// and a tag the config could never contain enters the routing table.
func TestAddBackendRejectsWhatConfigRejects(t *testing.T) {
	f := start(t)
	for _, body := range []string{
		`{"address":"0.0.0.0"}`,
		`{"address":"::"}`,
		`{"address":"224.0.0.1"}`,
		`{"address":"ff02::1"}`,
		`{"address":"fe80::1%eth0"}`,
		`{"address":"10.0.0.9","tag":"no spaces"}`,
		`{"address":"10.0.0.10","tag":"` + strings.Repeat("t", 65) + `"}`,
	} {
		if code, resp := f.do(t, http.MethodPost, "/v1/backends", body); code != http.StatusBadRequest {
			t.Errorf("POST %s: %d %v, want 400", body, code, resp)
		}
	}
}

func TestAddBackendBodyTooLarge(t *testing.T) {
	f := start(t)
	body := `{"address":"10.0.0.9","tag":"` + strings.Repeat("a", 70<<10) + `"}`
	code, resp := f.do(t, http.MethodPost, "/v1/backends", body)
	if code != http.StatusRequestEntityTooLarge {
		t.Errorf("70 KiB body: %d %v, want 413", code, resp)
	}
	if _, ok := resp["error"]; !ok {
		t.Errorf("70 KiB body: no error in %v", resp)
	}
}

// TestErrorsAreJSON: the package promises every error as {"error": ...},
// including unknown paths and wrong methods.
func TestErrorsAreJSON(t *testing.T) {
	f := start(t)
	for _, c := range []struct {
		method, path string
		code         int
	}{
		{http.MethodGet, "/v1/nothing", http.StatusNotFound},
		{http.MethodGet, "/", http.StatusNotFound},
		{http.MethodGet, "/v1/backends", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/v1/status", http.StatusMethodNotAllowed},
	} {
		code, body := f.do(t, c.method, c.path, "")
		if code != c.code {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, code, c.code)
		}
		if code == http.StatusMethodNotAllowed && !strings.Contains(body["error"].(string), "allowed: ") {
			t.Errorf("%s %s: error %q does not name the allowed methods", c.method, c.path, body["error"])
		}
		if msg, _ := body["error"].(string); msg == "" {
			t.Errorf("%s %s: no \"error\" in the answer", c.method, c.path)
		}
	}
	// The client turns any non-2xx answer into an error naming the status.
	err := f.c.Do(http.MethodGet, "/v1/nothing", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("client on unknown path: %v", err)
	}
}

func TestConcurrentRequests(t *testing.T) {
	f := start(t)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := 0; i < 20; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			var st director.Status
			errs <- f.c.Do(http.MethodGet, "/v1/status", nil, &st)
		}()
		go func() {
			defer wg.Done()
			errs <- f.c.Do(http.MethodPost, "/v1/backends", admin.AddBackendRequest{Address: fmt.Sprintf("10.1.0.%d", i)}, nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := len(f.status(t).Backends); n != 23 {
		t.Errorf("%d backends, want 23", n)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	// A socket file left behind by a process that died: nobody accepts on it.
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	f := startAt(t, path, newDirector(t, 0), options{})
	if n := len(f.status(t).Backends); n != 3 {
		t.Fatalf("status over the replaced socket: %d backends", n)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("replaced socket: %v, %v", fi.Mode(), err)
	}
}

func TestLiveSocketRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	srv := newServer(t, newDirector(t, 0))
	defer srv.Shutdown(context.Background())
	err = srv.ListenUnix(path)
	if err == nil {
		t.Fatal("ListenUnix took over the socket of a live server")
	}
	if !strings.Contains(err.Error(), "another usher is listening") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q should name the path and say another usher is listening", err)
	}
	// The live server keeps its socket.
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		t.Fatalf("live socket no longer answers: %v", err)
	}
	c.Close()
}

func TestRegularFileNotRemoved(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := newServer(t, newDirector(t, 0))
	defer srv.Shutdown(context.Background())
	if err := srv.ListenUnix(path); err == nil {
		t.Fatal("ListenUnix replaced a regular file")
	}
	if data, err := os.ReadFile(path); err != nil || string(data) != "precious" {
		t.Fatalf("regular file at the socket path was changed: %q, %v", data, err)
	}
}

func TestListenBadDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", "admin.sock")
	srv := newServer(t, newDirector(t, 0))
	defer srv.Shutdown(context.Background())
	err := srv.ListenUnix(path)
	if err == nil || !strings.Contains(err.Error(), "admin socket") {
		t.Fatalf("ListenUnix in a missing directory: %v", err)
	}
}

func TestShutdownRemovesSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	srv := newServer(t, newDirector(t, 0))
	if err := srv.ListenUnix(path); err != nil {
		t.Fatal(err)
	}
	srv.Serve()
	c := admin.NewClient(path)
	if err := c.Do(http.MethodGet, "/v1/status", nil, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after Shutdown: %v", err)
	}
	err := admin.NewClient(path).Do(http.MethodGet, "/v1/status", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "admin api") {
		t.Errorf("request after Shutdown: %v", err)
	}
	// A new server can take the path right away.
	srv2 := newServer(t, newDirector(t, 0))
	if err := srv2.ListenUnix(path); err != nil {
		t.Fatalf("ListenUnix after Shutdown: %v", err)
	}
	srv2.Shutdown(ctx)
}
