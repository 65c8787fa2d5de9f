package test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// usherBuild builds the usher binary once per test run, on first use, so
// that the harness's own tests run even while cmd/usher does not build.
type usherBuild struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

func (b *usherBuild) get(t testing.TB) string {
	t.Helper()
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "usher-bin-")
		if b.err == nil {
			b.bin, b.err = BuildUsher(b.dir)
		}
	})
	if b.err != nil {
		t.Fatalf("usher binary: %v", b.err)
	}
	return b.bin
}

// logWait bounds waits for something to show up in a log or in usher's
// status; generous because CI machines can be loaded, and free on success.
const logWait = 10 * time.Second

// build is the test run's usher binary; TestMain removes it afterwards.
var build usherBuild

func TestMain(m *testing.M) {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	os.Exit(code)
}

// e2e is one test's world: Dovecot backends and a usher in front of them.
type e2e struct {
	b   *Backends
	u   *Usher
	cfg UsherConfig
}

// setup starts `started` Dovecot backends and a usher that knows the first
// `configured` of them, with IMAP and POP3 listeners on free ports of
// 127.0.0.1. mod may change the usher configuration before it is written.
func setup(t *testing.T, started, configured int, mod func(*Backends, *UsherConfig)) *e2e {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping end-to-end test in -short mode")
	}
	if err := DovecotAvailable(); err != nil {
		t.Skipf("skipping Dovecot end-to-end test: %v", err)
	}
	bin := build.get(t) // before the backends: a cold build can take a while
	b := NewBackends(t, started)
	ports, err := FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	cfg := UsherConfig{
		IMAPAddr:   fmt.Sprintf("127.0.0.1:%d", ports[0]),
		POP3Addr:   fmt.Sprintf("127.0.0.1:%d", ports[1]),
		Backends:   b.Addrs()[:configured],
		Socket:     filepath.Join(b.Dir(), "admin.sock"),
		UserExpire: "15m",
	}
	if mod != nil {
		mod(b, &cfg)
	}
	u := StartUsher(t, bin, cfg.TOML())
	return &e2e{b: b, u: u, cfg: cfg}
}

// url is "scheme://usher-listener" for curl.
func (e *e2e) url(scheme string) string {
	if scheme == "pop3" {
		return "pop3://" + e.u.POP3Addr()
	}
	return "imap://" + e.u.IMAPAddr()
}

// imapLogin logs user in over IMAP through usher from local IP from and logs out.
func (e *e2e) imapLogin(t *testing.T, from, user string) {
	t.Helper()
	c, err := DialIMAPFrom(from, e.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(user, e.b.Password()); err != nil {
		t.Fatalf("login %s through usher: %v", user, err)
	}
}

// holdIMAP logs user in over IMAP, selects INBOX and keeps the session open
// until the test ends.
func (e *e2e) holdIMAP(t *testing.T, user string) *IMAPClient {
	t.Helper()
	c, err := DialIMAP(e.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Login(user, e.b.Password()); err != nil {
		t.Fatalf("login %s through usher: %v", user, err)
	}
	if r, err := c.Cmd("SELECT INBOX"); err != nil || r.Status != "OK" {
		t.Fatalf("SELECT INBOX as %s: %+v %v", user, r, err)
	}
	return c
}

// status is `usher status --json USER`, failing the test on error.
func (e *e2e) status(t *testing.T, user string) *UserStatus {
	t.Helper()
	st, err := e.u.Status(user)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitStatus polls `usher status --json USER` until ok accepts it or logWait
// passes (usher updates session counts a moment after the client's view
// changed) and returns the last status.
func (e *e2e) waitStatus(t *testing.T, user string, ok func(*UserStatus) bool) *UserStatus {
	t.Helper()
	deadline := time.Now().Add(logWait)
	for {
		st := e.status(t, user)
		if ok(st) || time.Now().After(deadline) {
			return st
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// whoServed waits for user's login after mark and returns the backend index.
func (e *e2e) whoServed(t *testing.T, mark LoginMark, user string) int {
	t.Helper()
	who, err := e.b.WhoServed(mark, user)
	if err != nil {
		t.Fatal(err)
	}
	return who
}

// python runs test/scripts/mailclient.py and decodes its JSON answer; code
// is the exit status (0 ok, 1 refused).
func python(t *testing.T, args ...string) (map[string]any, int) {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, append([]string{filepath.Join("scripts", "mailclient.py")}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("mailclient.py %v: %v", args, err)
	}
	var res map[string]any
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("mailclient.py %v: exit %d, bad JSON %q: %v; stderr: %s", args, code, out, err, stderr.String())
	}
	return res, code
}

// curl runs curl with a timeout and returns its output and exit code.
func curl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed")
	}
	cmd := exec.Command("curl", append([]string{"-sS", "--max-time", "15"}, args...)...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("curl %v: %v", args, err)
	}
	return string(out), 0
}

func hostPort(addr string) (string, string) {
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

var lipRE = regexp.MustCompile(`\blip=([0-9a-fA-F.:]+)`)

// TestE2EIMAPBasics: LOGIN, LIST, SELECT, APPEND and FETCH through usher with
// Python's imaplib and curl; the message lands in the shared Maildir; the
// backend sees the real client address (usher forwards it with ID
// x-originating-ip, Dovecot trusts it because usher is in
// login_trusted_networks).
func TestE2EIMAPBasics(t *testing.T) {
	e := setup(t, 3, 3, nil)
	user, pass := "user1@example.com", e.b.Password()
	host, port := hostPort(e.u.IMAPAddr())

	mark := e.b.Mark()
	subject := fmt.Sprintf("usher e2e %d", time.Now().UnixNano())
	res, code := python(t, "imap-roundtrip", host, port, user, pass, subject)
	if code != 0 || res["ok"] != true || res["fetched_equal"] != true {
		t.Fatalf("imaplib round trip through usher: exit %d: %v", code, res)
	}
	if list := fmt.Sprint(res["list"]); !strings.Contains(list, "INBOX") {
		t.Errorf("imaplib LIST through usher has no INBOX: %s", list)
	}
	who := e.whoServed(t, mark, user)
	t.Logf("%s served by backend %d (%s)", user, who, e.b.Addr(who))

	// The message is a file in the user's Maildir on the shared storage.
	found := false
	for _, sub := range []string{"cur", "new"} {
		files, _ := filepath.Glob(filepath.Join(e.b.MaildirPath(user), sub, "*"))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err == nil && strings.Contains(string(data), "Subject: "+subject) {
				found = true
			}
		}
	}
	if !found {
		t.Errorf("appended message not found in %s", e.b.MaildirPath(user))
	}

	// curl: LIST and FETCH of the appended message (UID from imaplib).
	out, code := curl(t, e.url("imap")+"/", "-u", user+":"+pass)
	if code != 0 || !strings.Contains(out, "INBOX") {
		t.Errorf("curl LIST through usher: exit %d: %q", code, out)
	}
	uids, _ := res["uids"].([]any)
	if len(uids) == 1 {
		out, code = curl(t, fmt.Sprintf("%s/INBOX;UID=%v", e.url("imap"), uids[0]), "-u", user+":"+pass)
		if code != 0 || !strings.Contains(out, "Subject: "+subject) {
			t.Errorf("curl FETCH UID %v through usher: exit %d: %q", uids[0], code, out)
		}
	}
	// curl and imaplib went to the same backend.
	if counts := e.b.Logins(mark, user); counts[who] < 3 {
		t.Errorf("logins of %s per backend %v: want >= 3 on backend %d", user, counts, who)
	}

	// The Go client from 127.0.0.42: Dovecot logs rip=127.0.0.42.
	mark = e.b.Mark()
	e.imapLogin(t, "127.0.0.42", "user2@example.com")
	who2 := e.whoServed(t, mark, "user2@example.com")
	lines := e.b.LogLines(mark, who2, LoginNeedle("user2@example.com"))
	if len(lines) != 1 || !strings.Contains(lines[0], "rip=127.0.0.42,") {
		t.Errorf("backend login line does not carry the client address 127.0.0.42 (ID x-originating-ip not forwarded?): %q", lines)
	}
}

// TestE2ESameUserSameBackend: sequential logins of one user always reach the
// same backend, usher's record agrees, and users spread over the backends.
func TestE2ESameUserSameBackend(t *testing.T) {
	e := setup(t, 3, 3, nil)
	mark := e.b.Mark()
	const users, rounds = 12, 3
	served := map[int][]string{}
	for i := 1; i <= users; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		for range rounds {
			e.imapLogin(t, "", user)
		}
		counts, err := e.b.WaitLogins(mark, user, rounds, logWait)
		if err != nil {
			t.Fatal(err)
		}
		who := -1
		for j, c := range counts {
			if c == 0 {
				continue
			}
			if c != rounds || who >= 0 {
				t.Fatalf("%s: logins per backend %v, want all %d on one backend", user, counts, rounds)
			}
			who = j
		}
		served[who] = append(served[who], user)

		lines := e.b.LogLines(mark, who, LoginNeedle(user))
		if m := lipRE.FindStringSubmatch(lines[0]); m != nil {
			// lip is the backend's own address, or the usher listener's when usher sends x-connected-ip.
			if m[1] != e.b.Addr(who) && m[1] != "127.0.0.1" {
				t.Errorf("%s: backend %d (%s) logged lip=%s", user, who, e.b.Addr(who), m[1])
			}
		} else {
			t.Errorf("%s: no lip= in login line %q", user, lines[0])
		}

		st := e.waitStatus(t, user, func(st *UserStatus) bool { return st.Sessions == 0 })
		if st.Backend != e.b.Addr(who) {
			t.Errorf("%s: usher status backend %q, but backend %s served it", user, st.Backend, e.b.Addr(who))
		}
		if st.HashBackend != st.Backend {
			t.Errorf("%s: hash_backend %q != backend %q with an unchanged backend set", user, st.HashBackend, st.Backend)
		}
		if st.Sessions != 0 || st.Expires == nil {
			t.Errorf("%s: after logout want sessions 0 and an expiry, got %+v", user, st)
		}
	}
	t.Logf("users per backend: %v", served)
	if len(served) < 2 {
		t.Errorf("all %d users landed on one backend: %v", users, served)
	}

	bs, err := e.u.BackendsStatus()
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, s := range bs {
		i := e.b.Index(s.Address)
		if i < 0 || !s.Up || s.Weight != 100 {
			t.Errorf("usher status backend entry %+v: unknown address, down or weight != 100", s)
			continue
		}
		if s.Users != len(served[i]) {
			t.Errorf("usher status: backend %s has %d users, Dovecot logs show %d", s.Address, s.Users, len(served[i]))
		}
		total += s.Users
	}
	if len(bs) != 3 || total != users {
		t.Errorf("usher status: %d backends, %d users; want 3 and %d: %+v", len(bs), total, users, bs)
	}
}

// TestE2EConcurrentIMAPAndPOP3: an IMAP and a POP3 session of one user open
// at the same time are on the same backend; usher counts both.
func TestE2EConcurrentIMAPAndPOP3(t *testing.T) {
	e := setup(t, 3, 3, nil)
	for i := 1; i <= 4; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		mark := e.b.Mark()
		imapc := e.holdIMAP(t, user)
		pop, err := DialPOP3(e.u.POP3Addr())
		if err != nil {
			t.Fatal(err)
		}
		if err := pop.Login(user, e.b.Password()); err != nil {
			t.Fatalf("POP3 login %s while IMAP is open: %v", user, err)
		}
		if _, err := pop.Cmd("STAT"); err != nil {
			t.Fatal(err)
		}
		counts, err := e.b.WaitLogins(mark, user, 2, logWait)
		if err != nil {
			t.Fatal(err)
		}
		imapLines, popLines := 0, 0
		who := -1
		for j, c := range counts {
			if c > 0 {
				if who >= 0 {
					t.Fatalf("%s: concurrent IMAP and POP3 sessions on two backends: %v", user, counts)
				}
				who = j
				imapLines = len(e.b.LogLines(mark, j, "imap-login: ", LoginNeedle(user)))
				popLines = len(e.b.LogLines(mark, j, "pop3-login: ", LoginNeedle(user)))
			}
		}
		if imapLines != 1 || popLines != 1 {
			t.Errorf("%s on backend %d: %d imap-login and %d pop3-login lines, want 1 each", user, who, imapLines, popLines)
		}
		st := e.waitStatus(t, user, func(st *UserStatus) bool { return st.Sessions == 2 })
		if st.Backend != e.b.Addr(who) || st.Sessions != 2 || st.Expires != nil {
			t.Errorf("%s: usher status %+v; want backend %s, 2 sessions, no expiry", user, st, e.b.Addr(who))
		}
		// The IMAP session still works while POP3 is open.
		if r, err := imapc.Cmd("NOOP"); err != nil || r.Status != "OK" {
			t.Errorf("%s: IMAP NOOP alongside POP3: %+v %v", user, r, err)
		}
		pop.Close()
		imapc.Close()
		st = e.waitStatus(t, user, func(st *UserStatus) bool { return st.Sessions == 0 })
		if st.Sessions != 0 || st.Expires == nil || st.Backend != e.b.Addr(who) {
			t.Errorf("%s: after both logouts usher status %+v; want 0 sessions, an expiry, backend kept", user, st)
		}
	}
}

// TestE2EAddBackend: `usher backend add` moves no user with a live record:
// held users keep their backend for new sessions even where the hash now
// points at the new backend, while some new users land on the new backend.
func TestE2EAddBackend(t *testing.T) {
	e := setup(t, 4, 3, nil)
	newAddr := e.b.Addr(3)
	const held = 16
	old := map[string]int{}
	mark := e.b.Mark()
	for i := 1; i <= held; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		e.holdIMAP(t, user)
		who := e.whoServed(t, mark, user)
		if who == 3 {
			t.Fatalf("%s landed on %s before it was added", user, newAddr)
		}
		old[user] = who
	}

	if err := e.u.BackendAdd(newAddr, 100); err != nil {
		t.Fatal(err)
	}
	bs, err := e.u.BackendsStatus()
	if err != nil {
		t.Fatal(err)
	}
	added := false
	for _, s := range bs {
		if s.Address == newAddr {
			added = s.Up && s.Weight == 100 && s.Users == 0
		}
	}
	if len(bs) != 4 || !added {
		t.Fatalf("usher status after backend add: %+v; want 4 backends, %s up with weight 100 and no users", bs, newAddr)
	}

	// New sessions (IMAP and POP3) of the held users go to their old backend.
	mark = e.b.Mark()
	rehashed := 0
	for i := 1; i <= held; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		e.imapLogin(t, "", user)
		p, err := DialPOP3(e.u.POP3Addr())
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Login(user, e.b.Password()); err != nil {
			t.Fatalf("POP3 login %s: %v", user, err)
		}
		p.Close()
		counts, err := e.b.WaitLogins(mark, user, 2, logWait)
		if err != nil {
			t.Fatal(err)
		}
		if counts[old[user]] != 2 {
			t.Errorf("%s was on backend %d before the add; new logins per backend: %v", user, old[user], counts)
		}
		st := e.status(t, user)
		if st.Backend != e.b.Addr(old[user]) {
			t.Errorf("%s: usher status backend %q, want the old %s", user, st.Backend, e.b.Addr(old[user]))
		}
		if st.HashBackend == newAddr {
			rehashed++
		}
	}
	t.Logf("%d of %d held users now hash to the new backend but stayed put", rehashed, held)

	// New users: some land on the new backend, each where usher says it hashes.
	mark = e.b.Mark()
	onNew := 0
	for i := held + 1; i <= 50; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		e.imapLogin(t, "", user)
		who := e.whoServed(t, mark, user)
		if who == 3 {
			onNew++
		}
		st := e.status(t, user)
		if st.Backend != e.b.Addr(who) || st.HashBackend != st.Backend {
			t.Errorf("new user %s: served by %s, usher status %+v", user, e.b.Addr(who), st)
		}
	}
	t.Logf("%d of %d new users landed on the new backend", onNew, 50-held)
	if onNew == 0 {
		t.Errorf("no new user landed on the added backend %s", newAddr)
	}
}

// TestE2EWrongPassword: the backend refuses a wrong password; the client
// gets NO (IMAP) or -ERR (POP3) and Dovecot's auth logs the mismatch.
// Clients come from their own 127.0.0.x so Dovecot's per-IP auth penalty
// (anvil) does not slow down the other logins.
func TestE2EWrongPassword(t *testing.T) {
	e := setup(t, 3, 3, nil)

	mismatch := func(user string) {
		t.Helper()
		deadline := time.Now().Add(logWait)
		for {
			for i := range e.b.N() {
				if len(e.b.LogLines(nil, i, "passwd-file("+user+",", "Password mismatch")) > 0 {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Errorf("no backend logged a password mismatch for %s", user)
				return
			}
			time.Sleep(25 * time.Millisecond)
		}
	}

	t.Run("imap-go", func(t *testing.T) {
		c, err := DialIMAPFrom("127.0.0.61", e.u.IMAPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r, err := c.Cmd("LOGIN %s %s", Quote("user5@example.com"), Quote("wrong"))
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != "NO" {
			t.Fatalf("LOGIN with a wrong password through usher: %s %s; want NO", r.Status, r.Text)
		}
		t.Logf("client saw: NO %s", r.Text)
		mismatch("user5@example.com")
		if st := e.waitStatus(t, "user5@example.com", func(st *UserStatus) bool { return st.Sessions == 0 }); st.Sessions != 0 {
			t.Errorf("failed login left a session in usher: %+v", st)
		}
		// RFC 3501 §6.2.3: after NO the client may try again on the same connection.
		if err := c.Login("user5@example.com", e.b.Password()); err != nil {
			t.Errorf("LOGIN with the right password after a NO on the same connection: %v", err)
		}
	})

	t.Run("imap-curl", func(t *testing.T) {
		out, code := curl(t, "--interface", "127.0.0.62", e.url("imap")+"/", "-u", "user6@example.com:wrong")
		if code != 67 { // CURLE_LOGIN_DENIED
			t.Errorf("curl with a wrong password: exit %d (want 67, login denied): %q", code, out)
		}
		mismatch("user6@example.com")
	})

	t.Run("pop3-go", func(t *testing.T) {
		p, err := DialPOP3From("127.0.0.63", e.u.POP3Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		if _, err := p.Cmd("USER user7@example.com"); err != nil {
			t.Fatal(err)
		}
		line, err := p.Cmd("PASS wrong")
		if err == nil || !strings.HasPrefix(line, "-ERR") {
			t.Fatalf("PASS with a wrong password through usher: %q %v; want -ERR", line, err)
		}
		t.Logf("client saw: %s", line)
		mismatch("user7@example.com")
	})

	t.Run("pop3-python", func(t *testing.T) {
		host, port := hostPort(e.u.POP3Addr())
		res, code := python(t, "pop3", host, port, "user8@example.com", "wrong", "--source", "127.0.0.64")
		if code != 1 || res["ok"] != false || !strings.Contains(fmt.Sprint(res["error"]), "-ERR") {
			t.Errorf("poplib with a wrong password: exit %d %v; want exit 1 with -ERR", code, res)
		}
		mismatch("user8@example.com")
	})

	t.Run("imap-python", func(t *testing.T) {
		host, port := hostPort(e.u.IMAPAddr())
		res, code := python(t, "imap-login", host, port, "user9@example.com", "wrong", "--source", "127.0.0.65")
		if code != 1 || res["ok"] != false {
			t.Errorf("imaplib with a wrong password: exit %d %v; want exit 1", code, res)
		}
		mismatch("user9@example.com")
	})
}

// TestE2EStartTLS: STARTTLS/STLS on usher's listeners (harness certificate)
// and towards the backends (backend_tls = starttls, verified with the
// harness CA); Dovecot logs the backend login as TLS.
func TestE2EStartTLS(t *testing.T) {
	e := setup(t, 3, 3, func(b *Backends, c *UsherConfig) {
		c.ListenerTLS = "starttls"
		c.Cert, c.Key = b.Certs().CertFile, b.Certs().KeyFile
		c.BackendTLS = "starttls"
		c.BackendCA = b.Certs().CAFile
	})
	ca := e.b.Certs().CAFile
	tlsLogin := func(t *testing.T, mark LoginMark, user, proto string) {
		t.Helper()
		who := e.whoServed(t, mark, user)
		lines := e.b.LogLines(mark, who, proto+"-login: ", LoginNeedle(user))
		if len(lines) != 1 || !strings.Contains(lines[0], " TLS") {
			t.Errorf("%s: backend login line is not TLS (backend_tls=starttls): %q", user, lines)
		}
	}

	t.Run("imap-python", func(t *testing.T) {
		host, port := hostPort(e.u.IMAPAddr())
		mark := e.b.Mark()
		res, code := python(t, "imap-login", host, port, "user1@example.com", e.b.Password(), "--starttls", "--cafile", ca)
		if code != 0 || res["tls"] != true {
			t.Fatalf("imaplib starttls + login through usher: exit %d %v", code, res)
		}
		if caps := fmt.Sprint(res["capabilities"]); !strings.Contains(caps, "STARTTLS") {
			t.Errorf("usher's pre-TLS capabilities lack STARTTLS: %s", caps)
		}
		tlsLogin(t, mark, "user1@example.com", "imap")
	})

	t.Run("imap-go", func(t *testing.T) {
		mark := e.b.Mark()
		c, err := DialIMAP(e.u.IMAPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.StartTLS(&tls.Config{RootCAs: caPool(t, e.b), ServerName: "127.0.0.1"}); err != nil {
			t.Fatal(err)
		}
		if err := c.Login("user2@example.com", e.b.Password()); err != nil {
			t.Fatal(err)
		}
		if r, err := c.Cmd("SELECT INBOX"); err != nil || r.Status != "OK" {
			t.Fatalf("SELECT over TLS: %+v %v", r, err)
		}
		tlsLogin(t, mark, "user2@example.com", "imap")
	})

	t.Run("pop3-python", func(t *testing.T) {
		if _, err := e.b.Deliver("user3@example.com", testMessage("tls pop")); err != nil {
			t.Fatal(err)
		}
		host, port := hostPort(e.u.POP3Addr())
		mark := e.b.Mark()
		res, code := python(t, "pop3", host, port, "user3@example.com", e.b.Password(), "--stls", "--cafile", ca, "--retr", "1")
		if code != 0 || res["tls"] != true || res["count"] != float64(1) {
			t.Fatalf("poplib stls + login + RETR through usher: exit %d %v", code, res)
		}
		if !strings.Contains(fmt.Sprint(res["retr"]), "Subject: tls pop") {
			t.Errorf("RETR over TLS: %v", res["retr"])
		}
		tlsLogin(t, mark, "user3@example.com", "pop3")
	})
}

// TestE2EPOP3: POP3 through usher with curl, poplib and the Go client:
// login, STAT, LIST and RETR of messages dropped into the Maildir; the
// backend sees the client address (usher forwards it with XCLIENT).
func TestE2EPOP3(t *testing.T) {
	e := setup(t, 3, 3, nil)
	user, pass := "user20@example.com", e.b.Password()
	subjects := []string{"pop one", "pop two"}
	for _, s := range subjects {
		if _, err := e.b.Deliver(user, testMessage(s)); err != nil {
			t.Fatal(err)
		}
	}

	mark := e.b.Mark()
	out, code := curl(t, e.url("pop3")+"/", "-u", user+":"+pass)
	if code != 0 || len(strings.Fields(strings.TrimSpace(out))) != 4 {
		t.Errorf("curl POP3 LIST through usher: exit %d %q; want 2 messages", code, out)
	}
	var got []string
	for i := 1; i <= 2; i++ {
		out, code = curl(t, fmt.Sprintf("%s/%d", e.url("pop3"), i), "-u", user+":"+pass)
		if code != 0 {
			t.Fatalf("curl POP3 RETR %d: exit %d %q", i, code, out)
		}
		for _, s := range subjects {
			if strings.Contains(out, "Subject: "+s) {
				got = append(got, s)
			}
		}
	}
	if strings.Join(got, ",") != "pop one,pop two" && strings.Join(got, ",") != "pop two,pop one" {
		t.Errorf("curl RETR 1 and 2 returned subjects %v, want both of %v", got, subjects)
	}

	host, port := hostPort(e.u.POP3Addr())
	res, code := python(t, "pop3", host, port, user, pass, "--retr", "2")
	if code != 0 || res["count"] != float64(2) {
		t.Fatalf("poplib STAT through usher: exit %d %v; want 2 messages", code, res)
	}
	if r := fmt.Sprint(res["retr"]); !strings.Contains(r, "Subject: pop") {
		t.Errorf("poplib RETR 2: %s", r)
	}
	counts, err := e.b.WaitLogins(mark, user, 4, logWait)
	if err != nil {
		t.Fatal(err)
	}
	who := -1
	for i, c := range counts {
		if c == 4 {
			who = i
		}
	}
	if who < 0 {
		t.Fatalf("curl and poplib logins of %s per backend %v; want all 4 on one", user, counts)
	}

	// Go client from 127.0.0.77: Dovecot logs rip=127.0.0.77 (XCLIENT).
	mark = e.b.Mark()
	p, err := DialPOP3From("127.0.0.77", e.u.POP3Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Login(user, pass); err != nil {
		t.Fatal(err)
	}
	stat, err := p.Cmd("STAT")
	if err != nil || !strings.HasPrefix(stat, "+OK 2 ") {
		t.Errorf("STAT = %q %v; want +OK 2", stat, err)
	}
	lines, err := p.Multi("RETR 1")
	if err != nil || !strings.Contains(strings.Join(lines, "\n"), "Subject: pop") {
		t.Errorf("RETR 1: %v %q", err, lines)
	}
	if who2 := e.whoServed(t, mark, user); who2 != who {
		t.Errorf("%s: Go POP3 login on backend %d, earlier ones on %d", user, who2, who)
	} else if l := e.b.LogLines(mark, who, "pop3-login: ", LoginNeedle(user)); len(l) != 1 || !strings.Contains(l[0], "rip=127.0.0.77,") {
		t.Errorf("backend login line does not carry the client address 127.0.0.77 (XCLIENT not forwarded?): %q", l)
	}
}

// TestE2ELoginTimeout: a client that keeps a pre-login session busy (a NOOP
// every 300 ms, well inside pre_login_idle) is still disconnected when
// timeouts.login runs out, with an IMAP BYE saying why; a logged-in session
// outlives it.
func TestE2ELoginTimeout(t *testing.T) {
	e := setup(t, 1, 1, func(_ *Backends, c *UsherConfig) {
		c.Tables = "[timeouts]\nlogin = \"1500ms\"\n"
	})
	held, err := DialIMAP(e.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := held.Login("user1@example.com", e.b.Password()); err != nil {
		t.Fatal(err)
	}

	c, err := DialIMAP(e.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	var last *IMAPResponse
	for time.Since(start) < 10*time.Second {
		r, err := c.Cmd("NOOP")
		if err != nil {
			last = r
			break
		}
		if r.Status != "OK" {
			t.Fatalf("NOOP before login: %s %s", r.Status, r.Text)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if el := time.Since(start); el < 1200*time.Millisecond || el > 5*time.Second {
		t.Errorf("busy pre-login session ended after %v, want about the 1.5s login timeout", el)
	}
	if last == nil || len(last.Untagged) != 1 || last.Untagged[0] != "* BYE Login timed out" {
		t.Errorf("pre-login session ended with %+v, want one \"* BYE Login timed out\" before the close", last)
	}
	if _, err := e.u.WaitLog(0, 5*time.Second, `msg="session end"`, `reason="login timeout"`); err != nil {
		t.Error(err)
	}
	if _, err := e.u.WaitLog(0, time.Second, `msg="login timeout"`, "limit=1.5s"); err != nil {
		t.Error(err)
	}
	if r, err := held.Cmd("NOOP"); err != nil || r.Status != "OK" {
		t.Fatalf("logged-in session after the login timeout: %+v %v", r, err)
	}
}
