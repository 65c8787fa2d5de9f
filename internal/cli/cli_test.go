package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/director"
)

// main runs Main and returns its exit code and output.
func runMain(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

// noEnv makes sure $USHER_SOCKET does not leak into a test.
func noEnv(t *testing.T) { t.Setenv("USHER_SOCKET", "") }

func TestNoArgs(t *testing.T) {
	code, out, errs := runMain()
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	if out != "" || !strings.HasPrefix(errs, "usage: usher") || !strings.Contains(errs, "backend add") {
		t.Errorf("stdout %q, stderr %q; want usage on stderr only", out, errs)
	}
}

func TestUnknownCommand(t *testing.T) {
	code, out, errs := runMain("frobnicate")
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	if out != "" || !strings.Contains(errs, `unknown command "frobnicate"`) || !strings.Contains(errs, "usage: usher") {
		t.Errorf("stdout %q, stderr %q", out, errs)
	}
}

func TestVersionAndHelp(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		code, out, errs := runMain(arg)
		if code != 0 || out != "usher "+Version+"\n" || errs != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", arg, code, out, errs)
		}
	}
	for _, arg := range []string{"help", "-h", "--help"} {
		code, out, errs := runMain(arg)
		if code != 0 || !strings.HasPrefix(out, "usage: usher") || errs != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", arg, code, out, errs)
		}
	}
}

// TestSubcommandHelp: `usher status --help` is a request for help, not a
// mistake: exit 0 with the usage on stdout (Main has a flag.ErrHelp case
// for exactly this).
func TestSubcommandHelp(t *testing.T) {
	noEnv(t)
	for _, args := range [][]string{
		{"status", "--help"}, {"backend", "add", "-h"}, {"serve", "--help"}, {"backend", "--help"},
		{"backend", "down", "10.0.0.1", "--help"}, {"user", "-h"}, {"user", "move", "--help"},
		{"map", "-help"}, {"flush", "--help"}, {"dump", "-h"},
	} {
		code, out, errs := runMain(args...)
		if code != 0 || !strings.Contains(out, "usage: usher") {
			first, _, _ := strings.Cut(errs, "\n")
			t.Errorf("%v: exit %d, stdout %d bytes, stderr %q...; want 0 and the usage on stdout", args, code, len(out), first)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	noEnv(t)
	for _, args := range [][]string{
		{"status", "a@b", "c@d"},
		{"status", "--nope"},
		{"backend"},
		{"backend", "frob", "10.0.0.1"},
		{"backend", "remove"},
		{"backend", "remove", "10.0.0.1", "10.0.0.2"},
		{"backend", "update", "10.0.0.1"},
		{"backend", "down", "10.0.0.1", "--weight", "5"},
		{"backend", "add"},
		{"backend", "add", "10.0.0.1", "10.0.0.2"},
		{"backend", "add", "10.0.0.1", "--weight", "lots"},
		{"user"},
		{"user", "move", "a@b"},
		{"user", "kick"},
		{"user", "delete", "a@b"},
		{"map", "10.0.0.1"},
		{"dump", "all"},
		{"flush"},
		{"flush", "10.0.0.1", "10.0.0.2"},
		{"flush", "--forget", "--max-parallel", "2", "all"},
		{"flush", "all", "--max-parallel", "many"},
		{"status", "--socket", "/tmp/x.sock", "--address", "http://127.0.0.1:1"},
		{"status", "--address", "https://127.0.0.1:1"},
		{"status", "--address", "127.0.0.1:1"},
		{"serve", "--log-level", "loud"},
		{"serve", "--log-format", "xml"},
	} {
		code, out, errs := runMain(args...)
		if code != 2 || out != "" || !strings.HasPrefix(errs, "usher: usage") || !strings.Contains(errs, "usage: usher") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 2 and a usage error", args, code, out, errs)
		}
	}
}

func TestStatusMissingSocket(t *testing.T) {
	noEnv(t)
	sock := filepath.Join(t.TempDir(), "nothing.sock")
	code, out, errs := runMain("status", "--socket", sock)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if out != "" || !strings.HasPrefix(errs, "usher: admin api") || !strings.Contains(errs, sock) || !strings.Contains(errs, "no such file") {
		t.Errorf("stdout %q, stderr %q; want an error naming the socket", out, errs)
	}
	if strings.Contains(errs, "usage:") {
		t.Errorf("a failure is not a usage error: %q", errs)
	}
}

func TestClientMissingConfig(t *testing.T) {
	noEnv(t)
	cfg := filepath.Join(t.TempDir(), "usher.toml")
	code, _, errs := runMain("status", "--config", cfg)
	if code != 1 || !strings.Contains(errs, "find admin socket") || !strings.Contains(errs, cfg) || !strings.Contains(errs, "--socket") {
		t.Errorf("exit %d, stderr %q; want 1 and a hint naming the config and --socket", code, errs)
	}
}

func TestServeUnknownKey(t *testing.T) {
	noEnv(t)
	dir := t.TempDir()
	path := writeConfig(t, dir, testConfig{imap: "127.0.0.1:1143", socket: filepath.Join(dir, "a.sock"), extra: "bogus_key = 1\n"})
	line := 1 + strings.Count(strings.Split(mustRead(t, path), "bogus_key")[0], "\n")
	code, out, errs := runMain("serve", "--config", path)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	want := fmt.Sprintf("%s:%d", path, line)
	if out != "" || !strings.Contains(errs, "bogus_key") || !strings.Contains(errs, want) {
		t.Errorf("stderr %q; want the key and %s", errs, want)
	}
	if _, err := os.Stat(filepath.Join(dir, "a.sock")); err == nil {
		t.Error("serve created the admin socket despite the bad config")
	}
}

func TestServeInvalidConfig(t *testing.T) {
	noEnv(t)
	dir := t.TempDir()
	path := writeConfig(t, dir, testConfig{imap: "127.0.0.1:1143", socket: filepath.Join(dir, "a.sock"), backends: []string{"mail.example.com"}})
	code, _, errs := runMain("serve", "--config", path)
	if code != 1 || !strings.Contains(errs, "invalid configuration") || !strings.Contains(errs, "backend[0].address") {
		t.Errorf("exit %d, stderr %q; want 1 naming backend[0].address", code, errs)
	}
	code, _, errs = runMain("serve", "--config", filepath.Join(dir, "missing.toml"))
	if code != 1 || !strings.Contains(errs, "missing.toml") {
		t.Errorf("missing config: exit %d, stderr %q", code, errs)
	}
}

type testConfig struct {
	imap, pop3 string // listener addresses; "" leaves the service off
	socket     string
	backends   []string
	extra      string // top-level keys
	admin      string // more [admin] keys
	sections   string // more sections, at the end
}

func writeConfig(t *testing.T, dir string, c testConfig) string {
	t.Helper()
	if c.backends == nil {
		c.backends = []string{"127.0.1.1", "127.0.1.2"}
	}
	var b strings.Builder
	b.WriteString("# usher test configuration\nuser_expire = \"15m\"\n")
	b.WriteString(c.extra)
	fmt.Fprintf(&b, "\n[admin]\nsocket = %q\n%s", c.socket, c.admin)
	b.WriteString("\n[timeouts]\npre_login_idle = \"10s\"\n")
	if c.imap != "" {
		fmt.Fprintf(&b, "\n[[imap.listener]]\naddress = %q\n", c.imap)
	}
	if c.pop3 != "" {
		fmt.Fprintf(&b, "\n[[pop3.listener]]\naddress = %q\n", c.pop3)
	}
	for _, a := range c.backends {
		fmt.Fprintf(&b, "\n[[backend]]\naddress = %q\n", a)
	}
	b.WriteString(c.sections)
	path := filepath.Join(dir, "usher.toml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// freeAddrs returns n distinct 127.0.0.1 addresses whose ports were free
// just now (the config validator refuses port 0). The listeners are held
// until all are picked, so the ports differ.
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs
}

// freeAddr is one address of freeAddrs.
func freeAddr(t *testing.T) string { return freeAddrs(t, 1)[0] }

// shortTempDir is a temp dir whose paths fit a UNIX socket (107 bytes),
// which t.TempDir under a long test name might not.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "usher")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

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

// greeting dials addr and returns the server's first line.
func greeting(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("greeting from %s: %q, %v", addr, line, err)
	}
	return line
}

// columns splits a table line at runs of two or more spaces (cells may
// contain single spaces).
var columns = regexp.MustCompile(`  +`)

// table parses a table with the given header into rows of cells, keyed by
// the first cell.
func table(t *testing.T, out string, header ...string) map[string][]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) == 0 || !slices.Equal(columns.Split(strings.TrimSpace(lines[0]), -1), header) {
		t.Fatalf("table has not the header %q:\n%s", header, out)
	}
	rows := map[string][]string{}
	for _, l := range lines[1:] {
		f := columns.Split(strings.TrimSpace(l), -1)
		if len(f) != len(header) {
			t.Fatalf("row %q has %d cells, want %d", l, len(f), len(header))
		}
		rows[f[0]] = f
	}
	return rows
}

// tableRows parses the `usher status` table into rows of cells by address.
func tableRows(t *testing.T, out string) map[string][]string {
	t.Helper()
	return table(t, out, "BACKEND", "WEIGHT", "TAG", "STATE", "USERS", "SESSIONS", "HEALTH", "CHECKED", "LAST CHANGE")
}

func TestEndToEnd(t *testing.T) {
	noEnv(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "admin.sock")
	addrs := freeAddrs(t, 3)
	imapAddr, pop3Addr, adminAddr := addrs[0], addrs[1], addrs[2]
	// Health checks off: the backends 127.0.1.x do not exist, and probes
	// would mark them down. The TCP API allows loopback by default.
	tc := testConfig{imap: imapAddr, pop3: pop3Addr, socket: sock,
		admin:    fmt.Sprintf("listen = %q\ntoken = %q\nprofiling = true\n", adminAddr, e2eToken),
		sections: "\n[health]\nenabled = false\n"}
	cfgPath := writeConfig(t, dir, tc)
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}

	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	reload := make(chan struct{}, 1)
	go func() { runErr <- run(ctx, cfg, log, reload) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			select {
			case <-runErr:
			case <-time.After(10 * time.Second):
				t.Error("run did not return after cancel")
			}
		}
		if t.Failed() {
			t.Logf("usher log:\n%s", logs.String())
		}
	}()

	// Wait for the admin socket to answer.
	c := admin.NewClient(sock)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if err := c.Do(http.MethodGet, "/v1/status", nil, nil); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("admin socket never answered: %v", err)
		}
		select {
		case err := <-runErr:
			stopped = true
			t.Fatalf("run returned early: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket: %v %v", fi.Mode(), err)
	}

	// The protocol listeners are up.
	if g := greeting(t, imapAddr); !strings.HasPrefix(g, "* OK") {
		t.Errorf("IMAP greeting %q, want \"* OK ...\"", g)
	}
	if g := greeting(t, pop3Addr); !strings.HasPrefix(g, "+OK") {
		t.Errorf("POP3 greeting %q, want \"+OK ...\"", g)
	}

	// status: a table with both backends.
	code, out, errs := runMain("status", "--socket", sock)
	if code != 0 || errs != "" {
		t.Fatalf("status: exit %d, stderr %q", code, errs)
	}
	rows := tableRows(t, out)
	for _, a := range []string{"127.0.1.1", "127.0.1.2"} {
		if got := strings.Join(rows[a], " "); got != a+" 100 - up 0 0 - - -" {
			t.Errorf("status row of %s: %q", a, got)
		}
	}
	if len(rows) != 2 {
		t.Errorf("status lists %d backends, want 2:\n%s", len(rows), out)
	}

	// status --json parses as director.Status; the flag may follow or precede.
	for _, args := range [][]string{{"status", "--json", "--socket", sock}, {"status", "--socket", sock, "--json"}} {
		code, out, errs = runMain(args...)
		var st director.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
		if st.Algorithm != "rendezvous" || len(st.Backends) != 2 || st.Backends[0].Address != "127.0.1.1" || st.Backends[1].Address != "127.0.1.2" {
			t.Errorf("%v: %+v", args, st)
		}
	}

	// status --json USER: no record yet, but where hashing would put the user.
	for _, args := range [][]string{{"status", "--json", "user1@example.com", "--socket", sock}, {"status", "user1@example.com", "--socket", sock, "--json"}} {
		code, out, errs = runMain(args...)
		var us director.UserStatus
		if code != 0 {
			t.Fatalf("%v: exit %d, stderr %q", args, code, errs)
		}
		dec := json.NewDecoder(strings.NewReader(out))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&us); err != nil {
			t.Fatalf("%v: %v in %q", args, err, out)
		}
		if us.User != "user1@example.com" || us.Key != "user1@example.com" || us.Backend != "" || us.Sessions != 0 || us.Expires != nil {
			t.Errorf("%v: %+v", args, us)
		}
		if us.HashBackend != "127.0.1.1" && us.HashBackend != "127.0.1.2" {
			t.Errorf("%v: hash_backend %q, want one of the backends", args, us.HashBackend)
		}
	}
	code, out, _ = runMain("status", "user1@example.com", "--socket", sock)
	if code != 0 || !strings.Contains(out, "(no record)") || !strings.Contains(out, "user:          user1@example.com\n") {
		t.Errorf("status USER: exit %d, stdout %q", code, out)
	}

	// The socket is also found through $USHER_SOCKET and through --config.
	t.Setenv("USHER_SOCKET", sock)
	if code, out, errs := runMain("status"); code != 0 || len(tableRows(t, out)) != 2 {
		t.Errorf("status with $USHER_SOCKET: exit %d, stderr %q", code, errs)
	}
	noEnv(t)
	if code, out, errs := runMain("status", "--config", cfgPath); code != 0 || len(tableRows(t, out)) != 2 {
		t.Errorf("status --config: exit %d, stderr %q", code, errs)
	}

	// backend add.
	code, out, errs = runMain("backend", "add", "127.0.1.3", "--weight", "50", "--socket", sock)
	if code != 0 || out != "backend 127.0.1.3 added (weight 50)\n" || errs != "" {
		t.Fatalf("backend add: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	code, out, _ = runMain("status", "--socket", sock)
	if got := strings.Join(tableRows(t, out)["127.0.1.3"], " "); code != 0 || got != "127.0.1.3 50 - up 0 0 - - -" {
		t.Errorf("status after backend add: exit %d, row %q\n%s", code, got, out)
	}
	code, _, errs = runMain("backend", "add", "--tag", "ssd", "--socket", sock, "127.0.1.4")
	if code != 0 {
		t.Errorf("backend add with flags first: exit %d, stderr %q", code, errs)
	}

	// A duplicate fails with the API's error text.
	code, out, errs = runMain("backend", "add", "127.0.1.3", "--socket", sock)
	if code != 1 || out != "" || !strings.Contains(errs, "backend exists") || !strings.Contains(errs, "409") {
		t.Errorf("duplicate backend add: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	// So does a weight the API refuses.
	code, _, errs = runMain("backend", "add", "127.0.1.9", "--weight", "5000", "--socket", sock)
	if code != 1 || !strings.Contains(errs, "out of range") {
		t.Errorf("backend add --weight 5000: exit %d, stderr %q", code, errs)
	}
	if n := len(tableRows(t, func() string { _, o, _ := runMain("status", "--socket", sock); return o }())); n != 4 {
		t.Errorf("%d backends at the end, want 4", n)
	}

	// Every other client command, against the real director.
	testClientCommands(t, sock)
	// The TCP API: token and allow list, also after a reload.
	testTCPAPI(t, sock, adminAddr, logs, func(admin string) {
		tc.admin = admin + "profiling = true\n"
		writeConfig(t, dir, tc)
		reload <- struct{}{}
	})

	// [admin] profiling serves Go's profiles on the socket; turning it off
	// needs a restart, so a reload that tries is refused and changes nothing.
	pprofGet := func() (int, string) {
		t.Helper()
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}
		resp, err := hc.Get("http://usher/debug/pprof/goroutine?debug=1")
		if err != nil {
			t.Fatalf("GET /debug/pprof/goroutine: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := pprofGet(); code != 200 || !strings.Contains(body, "goroutine profile:") {
		t.Errorf("goroutine profile with profiling = true: %d %.100q", code, body)
	}
	tc.admin = strings.Replace(tc.admin, "profiling = true", "profiling = false", 1)
	writeConfig(t, dir, tc)
	reload <- struct{}{}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "admin.profiling changed"); {
		if time.Now().After(deadline) {
			t.Fatal("no log line refusing the profiling change")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, _ := pprofGet(); code != 200 {
		t.Errorf("profiles no longer served after a refused reload: %d", code)
	}

	// A second usher on the same socket is refused and leaves the first alone.
	cfg2 := *cfg
	cfg2.IMAP.Listeners = []config.Listener{{Address: freeAddr(t), TLS: config.TLSNone}}
	cfg2.POP3.Listeners = nil
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := run(ctx2, &cfg2, log, nil); err == nil || !strings.Contains(err.Error(), "another usher is listening") {
		t.Errorf("second run on the same socket: %v", err)
	}
	if code, _, errs := runMain("status", "--socket", sock); code != 0 {
		t.Errorf("first usher lost its socket to the second: %q", errs)
	}

	// Stop: run returns nil, the socket is gone, the listeners are closed.
	cancel()
	stopped = true
	select {
	case err := <-runErr:
		if err != nil {
			t.Errorf("run returned %v after cancel, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after cancel")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("admin socket still there after stop: %v", err)
	}
	if c, err := net.DialTimeout("tcp", imapAddr, time.Second); err == nil {
		c.Close()
		t.Errorf("IMAP listener %s still accepts after stop", imapAddr)
	}
	if !strings.Contains(logs.String(), "usher stopped") {
		t.Errorf("no \"usher stopped\" log line")
	}
}

// TestRunListenerBusy: a listener address in use makes run fail at once,
// naming the address, and leaves no admin socket behind.
func TestRunListenerBusy(t *testing.T) {
	dir := shortTempDir(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	sock := filepath.Join(dir, "admin.sock")
	cfgPath := writeConfig(t, dir, testConfig{imap: freeAddr(t), pop3: busy.Addr().String(), socket: sock})
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, slog.New(slog.NewTextHandler(&syncBuffer{}, nil)), nil) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), busy.Addr().String()) {
			t.Errorf("run with a busy listener address: %v, want an error naming %s", err, busy.Addr())
		}
	case <-time.After(5 * time.Second):
		cancel()
		<-done
		t.Fatal("run with a busy listener address did not fail")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("admin socket left behind: %v", err)
	}
}

// TestRunWithoutTCPAdmin: a config without admin.listen needs no admin
// token (the UNIX socket's permissions are its access control), so run
// must start.
func TestRunWithoutTCPAdmin(t *testing.T) {
	noEnv(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "admin.sock")
	cfgPath := writeConfig(t, dir, testConfig{imap: freeAddr(t), socket: sock, sections: "\n[health]\nenabled = false\n"})
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, slog.New(slog.NewTextHandler(&syncBuffer{}, nil)), nil) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("run did not return after cancel")
		}
	}()
	c := admin.NewClient(sock)
	for deadline := time.Now().Add(5 * time.Second); ; {
		err := c.Do(http.MethodGet, "/v1/status", nil, nil)
		if err == nil {
			break
		}
		select {
		case rerr := <-done:
			done <- rerr
			t.Fatalf("run without admin.listen and without a token failed: %v", rerr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin socket never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
