package test

// End-to-end tests of usher's operations features (issue 3) against real
// Dovecot backends: user moves, health checks, draining, tag pools, the
// admin API over TCP, configuration reload, metrics, the SIGTERM drain and
// the state file. Each test runs its own backends and usher.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Health checks run fast here so that state changes show within seconds.
const (
	opsInterval = 500 * time.Millisecond
	opsTimeout  = 400 * time.Millisecond
	opsFall     = 2
	opsRise     = 2
	// opsJitter is the health checker's ±10% jitter on the interval.
	opsJitter = 1.1
	// opsMargin covers the CLI polls and a loaded machine.
	opsMargin = 2 * time.Second
)

// opsTables is the [health] and [timeouts] configuration of the ops tests.
// shutdown_grace stays below the 5s the harness's Stop waits.
func opsTables(grace string) string {
	return fmt.Sprintf("[health]\ninterval = %q\ntimeout = %q\nfall = %d\nrise = %d\n\n[timeouts]\nmove_wait = \"5s\"\nshutdown_grace = %q\n",
		opsInterval, opsTimeout, opsFall, opsRise, grace)
}

// opsStart starts Dovecot backends with bopts and a usher that knows the
// first `configured` of them, IMAP and POP3 listeners on 127.0.0.1, fast
// health checks (opsTables). mod may change the configuration first.
func opsStart(t *testing.T, bopts BackendOptions, configured int, mod func(*Backends, *UsherConfig)) *e2e {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping end-to-end test in -short mode")
	}
	if err := DovecotAvailable(); err != nil {
		t.Skipf("skipping Dovecot end-to-end test: %v", err)
	}
	bin := build.get(t)
	b, err := StartBackends(bopts)
	if err != nil {
		t.Fatalf("start Dovecot backends: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i := range b.N() {
				if tail, err := b.LogTail(i, 25); err == nil {
					t.Logf("backend %d (%s) log tail:\n%s", i, b.Addr(i), tail)
				}
			}
		}
		if err := b.Close(); err != nil {
			t.Errorf("stop Dovecot backends: %v", err)
		}
	})
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
		Tables:     opsTables("2s"),
	}
	if mod != nil {
		mod(b, &cfg)
	}
	u := StartUsher(t, bin, cfg.TOML())
	return &e2e{b: b, u: u, cfg: cfg}
}

// opsCLI runs `usher WORDS... --socket S ARGS...` and fails the test on a
// non-zero exit.
func (e *e2e) opsCLI(t *testing.T, words []string, args ...string) string {
	t.Helper()
	out, err := e.u.CLI(words, args...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// opsBackends is `usher status --json`, failing the test on error.
func (e *e2e) opsBackends(t *testing.T) []BackendStatus {
	t.Helper()
	bs, err := e.u.BackendsStatus()
	if err != nil {
		t.Fatal(err)
	}
	return bs
}

// opsWaitBackends polls `usher status --json` until ok accepts it or
// timeout passes, and returns the last answer and how long it took.
func (e *e2e) opsWaitBackends(t *testing.T, timeout time.Duration, ok func([]BackendStatus) bool) ([]BackendStatus, time.Duration, bool) {
	t.Helper()
	start := time.Now()
	for {
		bs := e.opsBackends(t)
		if ok(bs) {
			return bs, time.Since(start), true
		}
		if time.Since(start) > timeout {
			return bs, time.Since(start), false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// opsHoldIMAPFrom logs user in from local IP from, selects INBOX and keeps
// the session until the test ends.
func (e *e2e) opsHoldIMAPFrom(t *testing.T, from, addr, user string) *IMAPClient {
	t.Helper()
	c, err := DialIMAPFrom(from, addr)
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

// opsPOP3Login logs user in over POP3 through usher, runs STAT and quits.
func (e *e2e) opsPOP3Login(t *testing.T, user string) {
	t.Helper()
	p, err := DialPOP3(e.u.POP3Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Login(user, e.b.Password()); err != nil {
		t.Fatalf("POP3 login %s through usher: %v", user, err)
	}
	if _, err := p.Cmd("STAT"); err != nil {
		t.Fatalf("POP3 STAT as %s: %v", user, err)
	}
}

// opsRestart stops usher with SIGTERM, checks it exits 0, and starts it
// again on the same configuration and state file.
func (e *e2e) opsRestart(t *testing.T) {
	t.Helper()
	if err := e.u.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := e.u.Wait(10 * time.Second); err != nil {
		t.Fatalf("usher after SIGTERM: %v", err)
	}
	if err := e.u.Start(10 * time.Second); err != nil {
		t.Fatalf("restart usher: %v", err)
	}
}

// opsHTTP runs curl with args and returns the HTTP status and body.
func opsHTTP(t *testing.T, args ...string) (int, string) {
	t.Helper()
	out, exit := curl(t, append(args, "-w", "\n%{http_code}")...)
	if exit != 0 {
		t.Fatalf("curl %q: exit %d: %s", args, exit, out)
	}
	i := strings.LastIndexByte(out, '\n')
	code, err := strconv.Atoi(strings.TrimSpace(out[i+1:]))
	if i < 0 || err != nil {
		t.Fatalf("curl %q: no status code in %q", args, out)
	}
	return code, out[:i]
}

// opsScrape fetches /metrics over the admin socket and parses the
// Prometheus text format.
func (e *e2e) opsScrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := opsHTTP(t, "--unix-socket", e.u.Socket(), "http://usher/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics over the admin socket: %d %q", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// opsMetric sums the samples of family name whose labels include every
// "key", "value" pair of labels: counter and gauge values, histogram sample
// counts. ok is false when no sample matched.
func opsMetric(fams map[string]*dto.MetricFamily, name string, labels ...string) (v float64, ok bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		ok = true
		switch {
		case m.Counter != nil:
			v += m.GetCounter().GetValue()
		case m.Gauge != nil:
			v += m.GetGauge().GetValue()
		case m.Histogram != nil:
			v += float64(m.GetHistogram().GetSampleCount())
		case m.Untyped != nil:
			v += m.GetUntyped().GetValue()
		}
	}
	return v, ok
}

// TestOpsMoveOpenSessions: `usher user move` closes the user's open IMAP
// and POP3 sessions, pins the user to the new backend, and the next logins
// land there.
func TestOpsMoveOpenSessions(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)
	user := "user1@example.com"
	mark := e.b.Mark()
	imapc := e.holdIMAP(t, user)
	pop, err := DialPOP3(e.u.POP3Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pop.Close() })
	if err := pop.Login(user, e.b.Password()); err != nil {
		t.Fatal(err)
	}
	if _, err := pop.Cmd("STAT"); err != nil {
		t.Fatal(err)
	}
	counts, err := e.b.WaitLogins(mark, user, 2, logWait)
	if err != nil {
		t.Fatal(err)
	}
	from := slices.Index(counts, 2)
	if from < 0 {
		t.Fatalf("IMAP and POP3 logins of %s per backend %v; want both on one", user, counts)
	}
	if st := e.waitStatus(t, user, func(st *UserStatus) bool { return st.Sessions == 2 }); st.Backend != e.b.Addr(from) || st.Sessions != 2 {
		t.Fatalf("before the move: usher status %+v; want backend %s with 2 sessions", st, e.b.Addr(from))
	}
	to := (from + 1) % e.b.N()

	type closed struct {
		what  string
		lines []string
		err   error
		after time.Duration
	}
	ch := make(chan closed, 2)
	start := time.Now()
	go func() {
		lines, err := imapc.WaitClosed(8 * time.Second)
		ch <- closed{"IMAP", lines, err, time.Since(start)}
	}()
	go func() {
		lines, err := pop.WaitClosed(8 * time.Second)
		ch <- closed{"POP3", lines, err, time.Since(start)}
	}()
	out, moveErr := e.u.CLI([]string{"user", "move"}, user, e.b.Addr(to))
	moveTook := time.Since(start)
	for range 2 {
		c := <-ch
		switch {
		case c.err != nil:
			t.Errorf("%s session of %s after `usher user move`: %v (server sent %q)", c.what, user, c.err, c.lines)
		case c.after > 4*time.Second:
			t.Errorf("%s session of %s closed %v after the move started; want within a few seconds", c.what, user, c.after)
		default:
			t.Logf("%s session closed by usher %v after the move started; server sent %q", c.what, c.after.Round(time.Millisecond), c.lines)
		}
	}
	if moveErr != nil {
		t.Fatalf("usher user move %s %s: %v", user, e.b.Addr(to), moveErr)
	}
	t.Logf("usher user move took %v: %s", moveTook.Round(time.Millisecond), bytes.TrimSpace(out))

	st := e.waitStatus(t, user, func(st *UserStatus) bool { return st.Sessions == 0 && !st.Moving })
	if st.Backend != e.b.Addr(to) || st.Sessions != 0 || st.Moving {
		t.Errorf("after the move: usher status %+v; want backend %s, no sessions, not moving", st, e.b.Addr(to))
	}

	mark = e.b.Mark()
	e.imapLogin(t, "", user)
	if who := e.whoServed(t, mark, user); who != to {
		t.Errorf("IMAP login of %s after the move served by backend %d (%s), want %d (%s)", user, who, e.b.Addr(who), to, e.b.Addr(to))
	}
	mark = e.b.Mark()
	e.opsPOP3Login(t, user)
	if who := e.whoServed(t, mark, user); who != to {
		t.Errorf("POP3 login of %s after the move served by backend %d, want %d", user, who, to)
	}

	// Moving to a backend usher does not know fails.
	if _, err := e.u.CLI([]string{"user", "move"}, user, "127.0.1.200"); err == nil {
		t.Errorf("usher user move %s to an unknown backend succeeded", user)
	}

	fams := e.opsScrape(t)
	if v, _ := opsMetric(fams, "usher_user_moves_total", "result", "ok"); v != 1 {
		t.Errorf(`usher_user_moves_total{result="ok"} = %v, want 1`, v)
	}
	if v, _ := opsMetric(fams, "usher_kicked_sessions_total", "reason", "move"); v != 2 {
		t.Errorf(`usher_kicked_sessions_total{reason="move"} = %v, want 2 (IMAP and POP3)`, v)
	}
}

// TestOpsHealthDownUp: a killed backend is marked down by the health
// checks within fall×interval+timeout, its users are re-hashed elsewhere,
// and once it runs again it is marked up within rise×interval.
func TestOpsHealthDownUp(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)
	const victim = 1
	vaddr := e.b.Addr(victim)

	// Every backend has been probed healthy.
	if bs, took, ok := e.opsWaitBackends(t, 5*time.Second, func(bs []BackendStatus) bool {
		for _, b := range bs {
			if !b.Up || b.Health == nil || b.Health.Checked == nil || !b.Health.Healthy {
				return false
			}
		}
		return len(bs) == 3
	}); !ok {
		t.Fatalf("backends not all probed healthy after %v: %s", took, opsJSON(bs))
	}

	// Users that land on the victim (they keep a record after logout).
	var onVictim []string
	for i := 1; i <= 40 && len(onVictim) < 3; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		if e.whoServed(t, mark, user) == victim {
			onVictim = append(onVictim, user)
		}
	}
	if len(onVictim) < 3 {
		t.Fatalf("only %v of 40 users landed on backend %s", onVictim, vaddr)
	}
	held := e.holdIMAP(t, onVictim[0])

	killed := time.Now()
	if err := e.b.Kill(victim); err != nil {
		t.Fatal(err)
	}
	killTook := time.Since(killed)
	downLimit := time.Duration(float64(opsFall)*float64(opsInterval)*opsJitter) + opsTimeout + opsMargin
	bs, _, ok := e.opsWaitBackends(t, downLimit+5*time.Second, func(bs []BackendStatus) bool {
		b := Backend(bs, vaddr)
		return b != nil && !b.Up
	})
	took := time.Since(killed)
	if !ok {
		t.Fatalf("backend %s still up %v after it was killed: %s", vaddr, took, opsJSON(bs))
	}
	t.Logf("killed backend %s marked down %v after SIGKILL (limit %v; the harness's Kill took %v)",
		vaddr, took.Round(time.Millisecond), downLimit, killTook.Round(time.Millisecond))
	if took > downLimit {
		t.Errorf("backend %s marked down after %v; want within fall×interval+timeout+margin = %v", vaddr, took, downLimit)
	}
	b := Backend(bs, vaddr)
	if b.LastChange == nil || !strings.Contains(strings.ToLower(b.LastChange.Cause), "health") {
		t.Errorf("down backend's last_change %+v; want a cause mentioning the health check", b.LastChange)
	}
	if b.Health == nil || b.Health.Healthy || b.Health.LastError == "" {
		t.Errorf("down backend's health %+v; want healthy false with a last_error", b.Health)
	}
	if lines, err := held.WaitClosed(5 * time.Second); err != nil {
		t.Errorf("session of %s on the killed backend: %v (%q)", onVictim[0], err, lines)
	}
	if bs, _, ok := e.opsWaitBackends(t, logWait, func(bs []BackendStatus) bool {
		b := Backend(bs, vaddr)
		return b != nil && b.Users == 0
	}); !ok {
		t.Errorf("down backend still has users: %s", opsJSON(Backend(bs, vaddr)))
	}
	if v, ok := opsMetric(e.opsScrape(t), "usher_backend_up", "backend", vaddr); !ok || v != 0 {
		t.Errorf("usher_backend_up{backend=%q} = %v (present %v), want 0", vaddr, v, ok)
	}

	// Its users log in again and land elsewhere.
	moved := map[string]string{}
	for _, user := range onVictim {
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		who := e.whoServed(t, mark, user)
		if who == victim {
			t.Errorf("%s logged in on the down backend %s", user, vaddr)
			continue
		}
		st := e.status(t, user)
		if st.Backend != e.b.Addr(who) {
			t.Errorf("%s served by %s, usher status says %+v", user, e.b.Addr(who), st)
		}
		moved[user] = e.b.Addr(who)
	}

	if err := e.b.Start(victim); err != nil { // returns once Dovecot listens
		t.Fatal(err)
	}
	upLimit := time.Duration(float64(opsRise)*float64(opsInterval)*opsJitter) + opsTimeout + opsMargin
	bs, took, ok = e.opsWaitBackends(t, upLimit+5*time.Second, func(bs []BackendStatus) bool {
		b := Backend(bs, vaddr)
		return b != nil && b.Up
	})
	if !ok {
		t.Fatalf("backend %s still down %v after it was restarted: %s", vaddr, took, opsJSON(bs))
	}
	t.Logf("restarted backend %s marked up after %v (limit %v)", vaddr, took.Round(time.Millisecond), upLimit)
	if took > upLimit {
		t.Errorf("backend %s marked up after %v; want within rise×interval+margin = %v", vaddr, took, upLimit)
	}
	if b := Backend(bs, vaddr); b.LastChange == nil || !strings.Contains(strings.ToLower(b.LastChange.Cause), "health") {
		t.Errorf("up again: last_change %+v; want a cause mentioning the health check", b.LastChange)
	}
	// Users re-hashed while it was down keep their new backend.
	for user, addr := range moved {
		if st := e.status(t, user); st.Backend != addr {
			t.Errorf("%s: backend %q after the victim came back, want %s (live record)", user, st.Backend, addr)
		}
	}
}

// TestOpsDrain: weight 0 takes no new users, but a user with a live record
// on the drained backend stays there.
func TestOpsDrain(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)
	const drained = 2
	daddr := e.b.Addr(drained)
	next := 1
	pinned := ""
	for ; next <= 30 && pinned == ""; next++ {
		user := fmt.Sprintf("user%d@example.com", next)
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		if e.whoServed(t, mark, user) == drained {
			pinned = user
		}
	}
	if pinned == "" {
		t.Fatalf("no user of 30 landed on backend %s", daddr)
	}

	e.opsCLI(t, []string{"backend", "update"}, daddr, "--weight", "0")
	bs := e.opsBackends(t)
	for _, b := range bs {
		want := 100
		if b.Address == daddr {
			want = 0
		}
		if b.Weight != want || !b.Up {
			t.Errorf("after `backend update %s --weight 0`: %+v; want weight %d, up", daddr, b, want)
		}
	}

	mark := e.b.Mark()
	e.imapLogin(t, "", pinned)
	if who := e.whoServed(t, mark, pinned); who != drained {
		t.Errorf("%s had a live record on the drained %s but logged in on backend %d", pinned, daddr, who)
	}
	if st := e.status(t, pinned); st.Backend != daddr {
		t.Errorf("%s: usher status %+v; want backend %s kept", pinned, st, daddr)
	}

	per := make([]int, e.b.N())
	for i := next; i < next+20; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		who := e.whoServed(t, mark, user)
		per[who]++
		if who == drained {
			t.Errorf("new user %s landed on the drained backend %s", user, daddr)
		}
		if st := e.status(t, user); st.HashBackend == daddr {
			t.Errorf("%s: hash_backend is the drained %s", user, daddr)
		}
	}
	t.Logf("20 new users per backend while %s drains: %v", daddr, per)
}

// TestOpsTags: [tags] sends example.org users to the backends tagged
// pool-b and example.com users to the untagged ones; a domain whose pool
// has no backend gets NO [UNAVAILABLE] without any backend being asked.
func TestOpsTags(t *testing.T) {
	extra := []string{"testuser", "testuser@example.com", "alice@example.org", "bob@example.org"}
	for i := 1; i <= 10; i++ {
		extra = append(extra, fmt.Sprintf("org%d@example.org", i))
	}
	e := opsStart(t, BackendOptions{N: 4, ExtraUsers: extra}, 0, func(b *Backends, c *UsherConfig) {
		c.BackendSpecs = []UsherBackend{
			{Address: b.Addr(0)}, {Address: b.Addr(1)},
			{Address: b.Addr(2), Tag: "pool-b"}, {Address: b.Addr(3), Tag: "pool-b"},
		}
		c.Tags = map[string]string{"example.org": "pool-b", "example.net": "pool-empty"}
	})
	bs := e.opsBackends(t)
	if len(bs) != 4 || Backend(bs, e.b.Addr(2)) == nil || Backend(bs, e.b.Addr(2)).Tag != "pool-b" || Backend(bs, e.b.Addr(0)).Tag != "" {
		t.Fatalf("usher status: %s; want 4 backends, .3 and .4 tagged pool-b", opsJSON(bs))
	}

	check := func(user, tag string, pool ...int) int {
		t.Helper()
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		// Dovecot logs the name lower-cased (auth_username_format %Lu).
		who := e.whoServed(t, mark, strings.ToLower(user))
		if !slices.Contains(pool, who) {
			t.Errorf("%s (tag %q) landed on backend %s, want one of %v", user, tag, e.b.Addr(who), pool)
		}
		if st := e.status(t, user); st.Tag != tag || st.Backend != e.b.Addr(who) {
			t.Errorf("%s: usher status %+v; want tag %q, backend %s", user, st, tag, e.b.Addr(who))
		}
		return who
	}
	per := make([]int, 4)
	for i := 1; i <= 10; i++ {
		per[check(fmt.Sprintf("user%d@example.com", i), "", 0, 1)]++
		per[check(fmt.Sprintf("org%d@example.org", i), "pool-b", 2, 3)]++
	}
	// The domain is matched case-insensitively.
	per[check("Alice@EXAMPLE.ORG", "pool-b", 2, 3)]++
	t.Logf("logins per backend: %v", per)
	// POP3 uses the same pools.
	mark := e.b.Mark()
	e.opsPOP3Login(t, "bob@example.org")
	if who := e.whoServed(t, mark, "bob@example.org"); who != 2 && who != 3 {
		t.Errorf("POP3 login of bob@example.org landed on backend %d, want pool-b", who)
	}

	c, err := DialIMAP(e.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := c.Cmd("LOGIN %s %s", Quote("nobody@example.net"), Quote(e.b.Password()))
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != "NO" || !strings.HasPrefix(r.Text, "[UNAVAILABLE]") {
		t.Errorf("login of a user whose pool has no backend: %s %s; want NO [UNAVAILABLE]", r.Status, r.Text)
	}
	for i := range e.b.N() {
		if lines := e.b.LogLines(nil, i, "nobody@example.net"); len(lines) > 0 {
			t.Errorf("backend %d was asked about nobody@example.net: %q", i, lines)
		}
	}
}

// TestOpsAdminTCP: the admin API on TCP wants the bearer token (401) and
// a client address in admin.allow (403); the CLI works with --address and
// USHER_TOKEN.
func TestOpsAdminTCP(t *testing.T) {
	const token = "e2e-admin-token-0123456789abcdef"
	ports, err := FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", ports[0])
	e := opsStart(t, BackendOptions{N: 3}, 3, func(b *Backends, c *UsherConfig) {
		c.AdminListen, c.AdminToken, c.AdminAllow = listen, token, []string{"127.0.0.1/32"}
	})
	base := "http://" + listen
	bearer := "Authorization: Bearer " + token

	wantError := func(what string, wantCode, code int, body string) {
		t.Helper()
		var answer struct {
			Error string `json:"error"`
		}
		if code != wantCode || json.Unmarshal([]byte(body), &answer) != nil || answer.Error == "" {
			t.Errorf("%s: %d %q; want %d with a JSON {\"error\"}", what, code, body, wantCode)
		}
	}
	code, body := opsHTTP(t, base+"/v1/status")
	wantError("GET /v1/status without a token", 401, code, body)
	code, body = opsHTTP(t, "-H", "Authorization: Bearer wrong-token-0123456789abcdef", base+"/v1/status")
	wantError("GET /v1/status with a wrong token", 401, code, body)
	code, body = opsHTTP(t, "-H", bearer, base+"/metrics")
	if code != 200 || !strings.Contains(body, "usher_sessions_total") {
		t.Errorf("GET /metrics with the token: %d, %d bytes; want 200 with usher_sessions_total", code, len(body))
	}
	code, body = opsHTTP(t, base+"/metrics")
	wantError("GET /metrics without a token", 401, code, body)
	code, body = opsHTTP(t, "-H", bearer, base+"/v1/status")
	var st struct {
		Backends []BackendStatus `json:"backends"`
	}
	if code != 200 || json.Unmarshal([]byte(body), &st) != nil || len(st.Backends) != 3 {
		t.Errorf("GET /v1/status with the token: %d %q; want 200 with 3 backends", code, body)
	}
	code, body = opsHTTP(t, "--interface", "127.0.0.2", "-H", bearer, base+"/v1/status")
	wantError("GET /v1/status with the token from 127.0.0.2 (not in admin.allow)", 403, code, body)

	// The CLI over TCP.
	env := []string{"USHER_SOCKET=", "USHER_TOKEN=" + token}
	stdout, stderr, exit, err := e.u.Exec(env, "status", "--json", "--address", base)
	if err != nil || exit != 0 {
		t.Fatalf("usher status --json --address %s with USHER_TOKEN: exit %d %v: %s", base, exit, err, stderr)
	}
	st.Backends = nil
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || len(st.Backends) != 3 {
		t.Errorf("usher status --json --address: %v %q; want 3 backends", err, stdout)
	}
	a0 := e.b.Addr(0)
	if _, stderr, exit, err := e.u.Exec(env, "backend", "update", a0, "--weight", "40", "--address", base); err != nil || exit != 0 {
		t.Errorf("usher backend update %s --weight 40 --address %s: exit %d %v: %s", a0, base, exit, err, stderr)
	} else if b := Backend(e.opsBackends(t), a0); b == nil || b.Weight != 40 {
		t.Errorf("after backend update over TCP: %+v; want weight 40", b)
	}
	if _, stderr, exit, err := e.u.Exec([]string{"USHER_SOCKET=", "USHER_TOKEN=wrong-token-0123456789abcdef"}, "status", "--address", base); err != nil || exit == 0 {
		t.Errorf("usher status --address with a wrong USHER_TOKEN: exit %d %v %q; want a failure", exit, err, stderr)
	} else if !strings.Contains(stderr, "401") && !strings.Contains(strings.ToLower(stderr), "unauthori") && !strings.Contains(strings.ToLower(stderr), "token") {
		t.Errorf("usher status with a wrong token: stderr %q does not say why (401/token)", stderr)
	}

	fams := e.opsScrape(t)
	for code, least := range map[string]float64{"401": 3, "403": 1, "200": 3} {
		if v, _ := opsMetric(fams, "usher_admin_requests_total", "code", code); v < least {
			t.Errorf(`usher_admin_requests_total{code=%q} = %v, want >= %v`, code, v, least)
		}
	}
}

// TestOpsReload: SIGHUP applies a changed configuration (a lower
// max_sessions_per_ip, a new listener) while an open session goes on; a
// broken configuration is refused and the running one stays.
func TestOpsReload(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)
	const ip = "127.0.0.71"
	s1 := e.opsHoldIMAPFrom(t, ip, e.u.IMAPAddr(), "user1@example.com")
	noop := func(c *IMAPClient, what string) {
		t.Helper()
		if r, err := c.Cmd("NOOP"); err != nil || r.Status != "OK" {
			t.Errorf("NOOP on the session opened before %s: %+v %v", what, r, err)
		}
	}
	refused := func(what string) {
		t.Helper()
		c, err := DialIMAPFrom(ip, e.u.IMAPAddr())
		if err == nil {
			c.Close()
			t.Errorf("%s: a third session from %s was admitted; want it refused (max_sessions_per_ip = 2)", what, ip)
		} else if !strings.Contains(err.Error(), "Too many connections") {
			t.Errorf("%s: third session from %s: %v; want * BYE [UNAVAILABLE] Too many connections", what, ip, err)
		}
	}
	ports, err := FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	extra := fmt.Sprintf("127.0.0.1:%d", ports[0])

	cfg := e.cfg
	cfg.MaxSessionsPerIP = 2
	cfg.ExtraIMAPAddrs = []string{extra}
	if err := e.u.WriteConfig(cfg.TOML()); err != nil {
		t.Fatal(err)
	}
	mark := e.u.LogSize()
	if err := e.u.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if _, err := e.u.WaitLog(mark, logWait, "configuration reloaded"); err != nil {
		t.Fatal(err)
	}
	noop(s1, "the reload")
	c, err := DialIMAP(extra)
	if err != nil {
		t.Fatalf("listener %s added by the reload: %v", extra, err)
	}
	if err := c.Login("user2@example.com", e.b.Password()); err != nil {
		t.Errorf("login on the new listener: %v", err)
	}
	c.Close()
	e.opsHoldIMAPFrom(t, ip, e.u.IMAPAddr(), "user3@example.com") // the second from ip
	refused("after the reload")

	bad := cfg
	bad.Extra = "no_such_key = true"
	if err := e.u.WriteConfig(bad.TOML()); err != nil {
		t.Fatal(err)
	}
	mark = e.u.LogSize()
	if err := e.u.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	line, err := e.u.WaitLog(mark, logWait, "configuration reload failed; keeping the running configuration")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(line, "no_such_key") {
		t.Errorf("reload refusal does not name the unknown key: %s", line)
	}
	if running, err := e.u.Running(); !running {
		t.Fatalf("usher exited after a broken reload: %v", err)
	}
	noop(s1, "both reloads")
	refused("after the refused reload")
	for _, addr := range []string{e.u.IMAPAddr(), extra} {
		c, err := DialIMAPFrom("127.0.0.72", addr)
		if err != nil {
			t.Errorf("after the refused reload, %s: %v", addr, err)
			continue
		}
		if err := c.Login("user4@example.com", e.b.Password()); err != nil {
			t.Errorf("after the refused reload, login on %s: %v", addr, err)
		}
		c.Close()
	}
}

// TestOpsMetrics: /metrics counts logins by protocol and result, sessions,
// and reports every backend up.
func TestOpsMetrics(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)
	// Counters are compared with a first scrape: the harness's readiness
	// check already opened one session per listener.
	base := e.opsScrape(t)
	const N, M, K = 5, 3, 4
	for i := 1; i <= N; i++ {
		e.imapLogin(t, "", fmt.Sprintf("user%d@example.com", i))
	}
	for i := 1; i <= M; i++ {
		// Each from its own address: Dovecot delays repeated failures per IP.
		c, err := DialIMAPFrom(fmt.Sprintf("127.0.0.%d", 80+i), e.u.IMAPAddr())
		if err != nil {
			t.Fatal(err)
		}
		r, err := c.Cmd("LOGIN %s %s", Quote(fmt.Sprintf("user%d@example.com", 30+i)), Quote("wrong"))
		c.Close()
		if err != nil || r.Status != "NO" {
			t.Fatalf("LOGIN with a wrong password: %+v %v; want NO", r, err)
		}
	}
	for i := 1; i <= K; i++ {
		e.opsPOP3Login(t, fmt.Sprintf("user%d@example.com", 10+i))
	}

	// Sessions end a moment after the client closed; wait for the gauge.
	var fams map[string]*dto.MetricFamily
	deadline := time.Now().Add(logWait)
	for {
		fams = e.opsScrape(t)
		open, _ := opsMetric(fams, "usher_sessions_open")
		total, _ := opsMetric(fams, "usher_sessions_total")
		total0, _ := opsMetric(base, "usher_sessions_total")
		if (open == 0 && total-total0 >= N+M+K) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Counters: the increase since the first scrape; gauges: the value.
	want := []struct {
		name   string
		labels []string
		value  float64
	}{
		{"usher_logins_total", []string{"proto", "imap", "result", "ok"}, N},
		{"usher_logins_total", []string{"proto", "imap", "result", "failed"}, M},
		{"usher_logins_total", []string{"proto", "pop3", "result", "ok"}, K},
		{"usher_logins_total", []string{"proto", "pop3", "result", "failed"}, 0},
		{"usher_logins_total", []string{"result", "unavailable"}, 0},
		{"usher_sessions_total", []string{"proto", "imap"}, N + M},
		{"usher_sessions_total", []string{"proto", "pop3"}, K},
		{"usher_backend_sessions_total", []string{"proto", "imap"}, N},
		{"usher_backend_sessions_total", []string{"proto", "pop3"}, K},
		{"usher_sessions_open", nil, 0},
		{"usher_login_duration_seconds", []string{"proto", "imap"}, N + M},
		{"usher_login_duration_seconds", []string{"proto", "pop3"}, K},
	}
	for _, w := range want {
		v, ok := opsMetric(fams, w.name, w.labels...)
		if fams[w.name].GetType() != dto.MetricType_GAUGE {
			v0, _ := opsMetric(base, w.name, w.labels...)
			v -= v0
		}
		// A zero may also be an absent series.
		if v != w.value || (!ok && w.value != 0) {
			t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, v, ok, w.value)
		}
	}
	for _, dir := range []string{"in", "out"} {
		if v, _ := opsMetric(fams, "usher_bytes_total", "proto", "imap", "direction", dir); v <= 0 {
			t.Errorf("usher_bytes_total{proto=imap,direction=%s} = %v, want > 0", dir, v)
		}
	}
	for _, addr := range e.b.Addrs() {
		if v, ok := opsMetric(fams, "usher_backend_up", "backend", addr); !ok || v != 1 {
			t.Errorf("usher_backend_up{backend=%q} = %v (present %v), want 1", addr, v, ok)
		}
		if v, _ := opsMetric(fams, "usher_backend_health_probe_seconds", "backend", addr, "proto", "imap"); v < 1 {
			t.Errorf("usher_backend_health_probe_seconds{backend=%q,proto=imap} has %v probes, want >= 1", addr, v)
		}
		if v, _ := opsMetric(fams, "usher_backend_probe_failures_total", "backend", addr); v != 0 {
			t.Errorf("usher_backend_probe_failures_total{backend=%q} = %v, want 0", addr, v)
		}
	}
	records, ok := opsMetric(fams, "usher_user_records")
	if !ok || records < N+K {
		t.Errorf("usher_user_records = %v (present %v), want >= %d", records, ok, N+K)
	}
	// `usher map` lists the same live records.
	var recs []map[string]any
	if out := e.opsCLI(t, []string{"map"}, "--json"); json.Unmarshal([]byte(out), &recs) != nil {
		var wrapped struct {
			Users []map[string]any `json:"users"`
		}
		if err := json.Unmarshal([]byte(out), &wrapped); err != nil {
			t.Errorf("usher map --json: %v in %q", err, out)
		}
		recs = wrapped.Users
	}
	if float64(len(recs)) != records {
		t.Errorf("usher map --json lists %d records, usher_user_records says %v", len(recs), records)
	}
}

// TestOpsSIGTERMDrain: SIGTERM stops accepting at once, lets an open
// session run for shutdown_grace, then closes it, saves the state file and
// exits 0; a restarted usher keeps the user records.
func TestOpsSIGTERMDrain(t *testing.T) {
	stateFile := filepath.Join(t.TempDir(), "state.json")
	e := opsStart(t, BackendOptions{N: 3}, 3, func(b *Backends, c *UsherConfig) {
		c.StateFile = stateFile
		c.Tables = opsTables("3s")
	})
	held, other := "user1@example.com", "user2@example.com"
	c := e.holdIMAP(t, held)
	e.imapLogin(t, "", other)
	stHeld := e.waitStatus(t, held, func(st *UserStatus) bool { return st.Sessions == 1 })
	stOther := e.waitStatus(t, other, func(st *UserStatus) bool { return st.Sessions == 0 })
	if stHeld.Backend == "" || stOther.Backend == "" {
		t.Fatalf("no records before SIGTERM: %+v %+v", stHeld, stOther)
	}

	mark := e.u.LogSize()
	start := time.Now()
	if err := e.u.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// New connections are refused at once.
	var refusedAfter time.Duration
	refused := false
	for !refused && time.Since(start) < 2*time.Second {
		conn, err := net.DialTimeout("tcp", e.u.IMAPAddr(), 200*time.Millisecond)
		if err != nil {
			// A connect racing the listener's close is reset from the backlog.
			if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("connect during the drain: %v; want connection refused", err)
			}
			refused, refusedAfter = true, time.Since(start)
			break
		}
		conn.Close()
		time.Sleep(10 * time.Millisecond)
	}
	if !refused || refusedAfter > time.Second {
		t.Errorf("new connections still accepted %v after SIGTERM", time.Since(start))
	}
	// The open session goes on during the grace.
	if r, err := c.Cmd("NOOP"); err != nil || r.Status != "OK" {
		t.Errorf("NOOP on the open session during the shutdown grace: %+v %v", r, err)
	}
	lines, err := c.WaitClosed(8 * time.Second)
	closedAfter := time.Since(start)
	if err != nil {
		t.Errorf("open session at SIGTERM: %v", err)
	} else if closedAfter < 2500*time.Millisecond || closedAfter > 5*time.Second {
		t.Errorf("open session closed %v after SIGTERM; want about the 3s shutdown_grace", closedAfter)
	}
	if err := e.u.Wait(10 * time.Second); err != nil {
		t.Fatalf("usher after SIGTERM: %v; want exit 0", err)
	}
	t.Logf("after SIGTERM: refused new connections after %v, closed the open session after %v (sent %q), exited after %v",
		refusedAfter.Round(time.Millisecond), closedAfter.Round(time.Millisecond), lines, time.Since(start).Round(time.Millisecond))
	if _, err := e.u.WaitLog(mark, time.Second, "usher stopped"); err != nil {
		t.Error(err)
	}
	data, err := os.ReadFile(stateFile)
	if err != nil {
		t.Fatalf("state file after SIGTERM: %v", err)
	}
	if !strings.Contains(string(data), held) || !strings.Contains(string(data), other) {
		t.Errorf("state file %s does not mention %s and %s:\n%s", stateFile, held, other, data)
	}

	if err := e.u.Start(10 * time.Second); err != nil {
		t.Fatalf("restart usher: %v", err)
	}
	for _, want := range []*UserStatus{stHeld, stOther} {
		st := e.status(t, want.User)
		if st.Backend != want.Backend || st.Sessions != 0 || st.Expires == nil {
			t.Errorf("after the restart: %+v; want backend %s kept, no sessions, an expiry", st, want.Backend)
		}
	}
	mark2 := e.b.Mark()
	e.imapLogin(t, "", held)
	if who := e.whoServed(t, mark2, held); e.b.Addr(who) != stHeld.Backend {
		t.Errorf("%s after the restart logged in on %s, want %s", held, e.b.Addr(who), stHeld.Backend)
	}
}

// TestOpsStatePersistence: backends added and removed at run time survive
// a restart (the state file wins over the [[backend]] list).
func TestOpsStatePersistence(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 4}, 3, nil)
	added, removed := e.b.Addr(3), e.b.Addr(0)
	e.opsCLI(t, []string{"backend", "add"}, added, "--weight", "50")
	e.opsCLI(t, []string{"backend", "remove"}, removed)
	check := func(when string) {
		t.Helper()
		bs := e.opsBackends(t)
		b := Backend(bs, added)
		if len(bs) != 3 || b == nil || b.Weight != 50 || Backend(bs, removed) != nil {
			t.Errorf("%s: usher status %s; want 3 backends: %s with weight 50 added, %s removed", when, opsJSON(bs), added, removed)
		}
	}
	check("before the restart")
	mark := e.u.LogSize()
	e.opsRestart(t)
	if _, err := e.u.WaitLog(mark, time.Second, "state loaded"); err != nil {
		t.Error(err)
	}
	check("after the restart")
	// Logins use the restored set: never the removed backend.
	m := e.b.Mark()
	for i := 1; i <= 6; i++ {
		e.imapLogin(t, "", fmt.Sprintf("user%d@example.com", i))
	}
	for i := 1; i <= 6; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		if who, err := e.b.WhoServed(m, user); err != nil || who == 0 {
			t.Errorf("%s after the restart: backend %d %v; want one of the restored set", user, who, err)
		}
	}
}

// TestOpsAdminCommands: `user kick` closes a user's sessions and keeps the
// record; `backend down` kicks and re-hashes the backend's users and health
// checks do not undo it, `backend up` does; `flush all` moves users whose
// hash points elsewhere; `flush --forget all` drops every record; `dump`
// prints the backend set.
func TestOpsAdminCommands(t *testing.T) {
	e := opsStart(t, BackendOptions{N: 3}, 3, nil)

	// user kick: the session closes, the record stays.
	kicked := "user1@example.com"
	mark := e.b.Mark()
	c := e.holdIMAP(t, kicked)
	home := e.whoServed(t, mark, kicked)
	var ka struct {
		Kicked int `json:"kicked"`
	}
	if out := e.opsCLI(t, []string{"user", "kick"}, kicked, "--json"); json.Unmarshal([]byte(out), &ka) != nil || ka.Kicked != 1 {
		t.Errorf("usher user kick %s --json: %q; want kicked 1", kicked, out)
	}
	if lines, err := c.WaitClosed(3 * time.Second); err != nil {
		t.Errorf("session of %s after `usher user kick`: %v (%q)", kicked, err, lines)
	}
	if st := e.waitStatus(t, kicked, func(st *UserStatus) bool { return st.Sessions == 0 }); st.Backend != e.b.Addr(home) || st.Sessions != 0 {
		t.Errorf("after the kick: %+v; want the record on %s kept, no sessions", st, e.b.Addr(home))
	}

	// backend down by an admin.
	served := map[string]int{}
	for i := 2; i <= 12; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		mark := e.b.Mark()
		e.imapLogin(t, "", user)
		served[user] = e.whoServed(t, mark, user)
	}
	victimUser := "user2@example.com"
	victim := served[victimUser]
	vaddr := e.b.Addr(victim)
	held := e.holdIMAP(t, victimUser)
	e.opsCLI(t, []string{"backend", "down"}, vaddr, "--cause", "e2e maintenance")
	if lines, err := held.WaitClosed(3 * time.Second); err != nil {
		t.Errorf("session of %s after `backend down %s`: %v (%q)", victimUser, vaddr, err, lines)
	}
	b := Backend(e.opsBackends(t), vaddr)
	if b == nil || b.Up || b.LastChange == nil || !strings.Contains(b.LastChange.Cause, "e2e maintenance") {
		t.Errorf("after `backend down %s --cause 'e2e maintenance'`: %s; want down with that cause", vaddr, opsJSON(b))
	}
	if dump := e.opsCLI(t, []string{"dump"}); !strings.Contains(dump, "usher backend down "+vaddr+"\n") {
		t.Errorf("usher dump while %s is down:\n%s", vaddr, dump)
	} else {
		for _, addr := range e.b.Addrs() {
			if !strings.Contains(dump, "usher backend add "+addr+" --weight 100") {
				t.Errorf("usher dump lacks backend %s:\n%s", addr, dump)
			}
		}
	}
	mark = e.b.Mark()
	e.imapLogin(t, "", victimUser)
	if who := e.whoServed(t, mark, victimUser); who == victim {
		t.Errorf("%s logged in on %s, which an admin marked down", victimUser, vaddr)
	}
	// Healthy probes do not bring it back up.
	time.Sleep(time.Duration(float64(opsRise)*float64(opsInterval)*opsJitter) + opsTimeout)
	if b := Backend(e.opsBackends(t), vaddr); b == nil || b.Up || b.Health == nil || !b.Health.Healthy {
		t.Errorf("backend %s marked down by an admin, probes fine: %s; want still down, healthy", vaddr, opsJSON(b))
	}
	e.opsCLI(t, []string{"backend", "up"}, vaddr)
	if b := Backend(e.opsBackends(t), vaddr); b == nil || !b.Up {
		t.Errorf("after `backend up %s`: %s; want up", vaddr, opsJSON(b))
	}

	// flush all: the user re-hashed while its backend was down hashes there
	// again and moves back; everyone ends where hashing puts them.
	if st := e.status(t, victimUser); st.HashBackend != vaddr || st.Backend == vaddr {
		t.Fatalf("before the flush: %+v; want hash_backend %s, backend elsewhere", st, vaddr)
	}
	var fr struct {
		Users, Moved, Kept, Failed int
	}
	if out := e.opsCLI(t, []string{"flush", "all"}, "--json"); json.Unmarshal([]byte(out), &fr) != nil || fr.Moved < 1 || fr.Failed != 0 || fr.Users != fr.Moved+fr.Kept {
		t.Errorf("usher flush all --json: %q; want >= 1 moved, none failed", out)
	}
	for i := 1; i <= 12; i++ {
		user := fmt.Sprintf("user%d@example.com", i)
		// Users evacuated from the down backend have no record until they log in.
		if st := e.status(t, user); st.Backend != "" && st.Backend != st.HashBackend {
			t.Errorf("after flush all: %+v; want backend == hash_backend", st)
		}
	}
	mark = e.b.Mark()
	e.imapLogin(t, "", victimUser)
	if who := e.whoServed(t, mark, victimUser); who != victim {
		t.Errorf("%s after the flush logged in on backend %d, want %d", victimUser, who, victim)
	}

	// flush --forget all: every record goes.
	records := 0
	for _, b := range e.opsBackends(t) {
		records += b.Users
	}
	var fa struct {
		Forgotten int `json:"forgotten"`
	}
	if out := e.opsCLI(t, []string{"flush"}, "--forget", "all", "--json"); json.Unmarshal([]byte(out), &fa) != nil || fa.Forgotten != records {
		t.Errorf("usher flush --forget all --json: %q; want the %d live records forgotten", out, records)
	}
	if st := e.status(t, kicked); st.Backend != "" {
		t.Errorf("after flush --forget all: %+v; want no record", st)
	}
	if v, ok := opsMetric(e.opsScrape(t), "usher_user_records"); !ok || v != 0 {
		t.Errorf("usher_user_records after flush --forget all = %v (present %v), want 0", v, ok)
	}
}

// opsJSON renders v for failure messages.
func opsJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
