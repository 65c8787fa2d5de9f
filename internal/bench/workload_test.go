package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testOptions are Options for workload against targets, users
// user1..user10@example.com, 4 clients.
func testOptions(t *testing.T, workload string, targets ...string) Options {
	t.Helper()
	tg, err := NewTargets(targets, nil)
	if err != nil {
		t.Fatal(err)
	}
	u, err := ParseUsers("user%d@example.com", "1-10")
	if err != nil {
		t.Fatal(err)
	}
	return Options{
		Workload: workload, Targets: tg, Users: u, Password: "pass",
		Concurrency: 4, Timeout: 5 * time.Second,
	}
}

func mustRun(t *testing.T, o Options) *Result {
	t.Helper()
	res, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestLoginIMAP(t *testing.T) {
	f := startFake(t, "imap")
	o := testOptions(t, "login", f.addr())
	o.Count = 40
	var progress bytes.Buffer
	o.Progress = &progress
	res := mustRun(t, o)
	if res.Ops != 40 || res.ErrorsTotal != 0 {
		t.Fatalf("ops %d errors %v %v", res.Ops, res.Errors, res.ErrorSamples)
	}
	// Round robin over 10 users: 4 logins each, and every session logged out.
	f.mu.Lock()
	for i := 1; i <= 10; i++ {
		u := "user" + strconv.Itoa(i) + "@example.com"
		if f.logins[u] != 4 {
			t.Errorf("%s logged in %d times, want 4", u, f.logins[u])
		}
	}
	if f.logouts != 40 {
		t.Errorf("logouts %d", f.logouts)
	}
	f.mu.Unlock()
	if res.Latency.Count != 40 || res.Loop.Count != 40 || res.Latency.Max > res.Loop.Max || res.Latency.P50 <= 0 {
		t.Errorf("latency %+v loop %+v", res.Latency, res.Loop)
	}
	if res.LoginStats == nil || res.LoginsPerS != res.OpsPerS || res.OpsPerS <= 0 {
		t.Errorf("logins/s %+v ops/s %v", res.LoginStats, res.OpsPerS)
	}
	if !strings.Contains(progress.String(), "logins 40") {
		t.Errorf("final progress line missing: %q", progress.String())
	}
}

func TestLoginPOP3AndErrors(t *testing.T) {
	f := startFake(t, "pop3")
	f.reject = "user3@example.com"
	o := testOptions(t, "login", f.addr())
	o.Proto = "pop3"
	o.Count = 20
	res := mustRun(t, o)
	// 2 of the 20 loops are user3's, and they fail at PASS.
	if res.Ops != 18 || res.Errors["login:rejected"] != 2 || res.ErrorsTotal != 2 {
		t.Fatalf("ops %d errors %v", res.Ops, res.Errors)
	}
	if !strings.Contains(res.ErrorSamples["login:rejected"], "-ERR [AUTH]") {
		t.Errorf("sample %q", res.ErrorSamples["login:rejected"])
	}
	if f.totalLogins() != 18 || res.LatencyOf != "USER sent → +OK to PASS" {
		t.Errorf("server logins %d, latency_of %q", f.totalLogins(), res.LatencyOf)
	}
}

func TestLoginDirectAndMap(t *testing.T) {
	a, b := startFake(t, "imap"), startFake(t, "imap")
	o := testOptions(t, "login", a.addr(), b.addr())
	o.Count = 30
	res := mustRun(t, o)
	if res.Ops != 30 || res.Mode != "direct" || len(res.Targets) != 2 {
		t.Fatalf("ops %d mode %s targets %v errors %v", res.Ops, res.Mode, res.Targets, res.Errors)
	}
	for _, f := range []*fakeServer{a, b} {
		f.mu.Lock()
		for u, n := range f.logins {
			if tgt, _ := o.Targets.For(u); tgt != f.addr() {
				t.Errorf("%s logged in %d times at %s, maps to %s", u, n, f.addr(), tgt)
			}
		}
		f.mu.Unlock()
	}
	if a.totalLogins()+b.totalLogins() != 30 || a.totalLogins() == 0 || b.totalLogins() == 0 {
		t.Errorf("logins %d + %d", a.totalLogins(), b.totalLogins())
	}

	// A map sends everyone to b.
	m := map[string]string{}
	for i := range o.Users.Len() {
		m[o.Users.User(i)] = b.addr()
	}
	before := b.totalLogins()
	o.Targets, _ = NewTargets(nil, m)
	o.Count = 10
	res = mustRun(t, o)
	if res.Ops != 10 || res.Mode != "map" || b.totalLogins()-before != 10 {
		t.Errorf("map: ops %d mode %s b logins +%d", res.Ops, res.Mode, b.totalLogins()-before)
	}
}

func TestSources(t *testing.T) {
	f := startFake(t, "imap")
	o := testOptions(t, "login", f.addr())
	ips, err := ParseSources("127.0.0.2-3")
	if err != nil || len(ips) != 2 || !ips[1].Equal(net.IPv4(127, 0, 0, 3)) {
		t.Fatalf("ParseSources: %v %v", ips, err)
	}
	o.Sources = ips
	o.Count = 6
	res := mustRun(t, o)
	f.mu.Lock()
	defer f.mu.Unlock()
	if res.Ops != 6 || res.Sources != 2 || f.remotes["127.0.0.2"] != 3 || f.remotes["127.0.0.3"] != 3 {
		t.Errorf("ops %d, connections by source %v", res.Ops, f.remotes)
	}
	for _, bad := range []string{"x", "127.0.0.9-3", "127.0.0.1-256", "::1-5"} {
		if _, err := ParseSources(bad); err == nil {
			t.Errorf("ParseSources(%q): no error", bad)
		}
	}
}

func TestStartTLS(t *testing.T) {
	for _, proto := range []string{"imap", "pop3", "lmtp"} {
		t.Run(proto, func(t *testing.T) {
			f := startFake(t, proto)
			workload := "login"
			if proto == "lmtp" {
				workload = "lmtp"
			}
			o := testOptions(t, workload, f.addr())
			o.Proto = proto
			o.Count = 5
			o.StartTLS = true
			o.TLS = &tls.Config{InsecureSkipVerify: true}
			o.LMTP.Size = 1000
			res := mustRun(t, o)
			f.mu.Lock()
			tlsConns := f.tlsConns
			f.mu.Unlock()
			if res.Ops != 5 || res.TLS != "starttls" || tlsConns == 0 {
				t.Fatalf("ops %d tls %s server TLS connections %d errors %v", res.Ops, res.TLS, tlsConns, res.ErrorSamples)
			}
			// Verification against the system roots fails on a self-signed certificate.
			o.TLS = &tls.Config{}
			res = mustRun(t, o)
			if res.Ops != 0 || res.Errors["starttls:tls"] == 0 {
				t.Errorf("unverified certificate: ops %d errors %v", res.Ops, res.Errors)
			}
		})
	}
}

func TestLoginDurationAndInterrupt(t *testing.T) {
	f := startFake(t, "imap")
	o := testOptions(t, "login", f.addr())
	o.Duration = 300 * time.Millisecond
	res := mustRun(t, o)
	if res.Ops == 0 || res.ErrorsTotal != 0 || res.DurationS < 0.3 || res.DurationS > 2 {
		t.Fatalf("ops %d errors %v duration %v", res.Ops, res.Errors, res.DurationS)
	}
	if int(res.Ops) != f.totalLogins() {
		t.Errorf("ops %d, server logins %d", res.Ops, f.totalLogins())
	}

	// An interrupt ends a long run promptly, without counting errors.
	ctx, cancel := context.WithCancel(context.Background())
	o.Duration = time.Minute
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	res, err := Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > 5*time.Second || res.ErrorsTotal != 0 || res.Ops == 0 {
		t.Errorf("interrupted run: %v, ops %d, errors %v", time.Since(start), res.Ops, res.Errors)
	}
}

func TestIdle(t *testing.T) {
	for _, c := range []struct {
		proto   string
		useIdle bool
	}{{"imap", false}, {"imap", true}, {"pop3", false}} {
		useIdle := c.useIdle
		f := startFake(t, c.proto)
		o := testOptions(t, "idle", f.addr())
		o.Proto = c.proto
		o.Idle = IdleOptions{Sessions: 12, Hold: 300 * time.Millisecond, Keepalive: 50 * time.Millisecond, UseIDLE: useIdle,
			Settle: 10 * time.Millisecond, RSS: RSSOptions{PIDs: []int{os.Getpid()}}}
		var progress bytes.Buffer
		o.Progress, o.Interval = &progress, 100*time.Millisecond
		res := mustRun(t, o)
		st := res.IdleStats
		if st == nil || st.Established != 12 || res.Ops != 12 || res.ErrorsTotal != 0 || st.Lost != 0 {
			t.Fatalf("%+v: %+v errors %v", c, st, res.ErrorSamples)
		}
		f.mu.Lock()
		noops, idles, dones, logouts := f.noops, f.idles, f.dones, f.logouts
		f.mu.Unlock()
		if logouts != 12 || st.LogoutErrors != 0 {
			t.Errorf("%+v: logouts %d (errors %d)", c, logouts, st.LogoutErrors)
		}
		if st.Keepalives < 12 {
			t.Errorf("%+v: %d keepalives in 300 ms at 50 ms for 12 sessions", c, st.Keepalives)
		}
		if useIdle {
			// One IDLE per session plus one per renewal; each ended by DONE.
			if st.KeepaliveMode != "idle" || noops != 0 || int64(idles) != 12+st.Keepalives || dones != idles {
				t.Errorf("IDLE: mode %s noops %d idles %d dones %d keepalives %d", st.KeepaliveMode, noops, idles, dones, st.Keepalives)
			}
		} else if int64(noops) != st.Keepalives || idles != 0 {
			t.Errorf("%+v: noops %d keepalives %d idles %d", c, noops, st.Keepalives, idles)
		}
		if st.RSSStats == nil || st.BeforeKiB <= 0 || st.AfterKiB <= 0 || st.PIDsBefore != 1 || st.MeasuredSessions != 12 {
			t.Errorf("%+v: rss %+v", c, st.RSSStats)
		}
		if st.HoldS < 0.3 || res.SetupS <= 0 || res.Latency.Count != 12 {
			t.Errorf("%+v: hold %v setup %v latency %+v", c, st.HoldS, res.SetupS, res.Latency)
		}
		if !strings.Contains(progress.String(), "holding 12 sessions") {
			t.Errorf("%+v: progress %q", c, progress.String())
		}
	}
}

func TestFetch(t *testing.T) {
	f := startFake(t, "imap")
	o := testOptions(t, "fetch", f.addr())
	o.Concurrency = 3
	o.Count = 9
	o.Fetch = FetchOptions{Setup: true, SetupSize: 64 << 10, SetupCount: 3}
	res := mustRun(t, o)
	st := res.FetchStats
	if st == nil || res.Ops != 9 || res.ErrorsTotal != 0 {
		t.Fatalf("ops %d errors %v", res.Ops, res.ErrorSamples)
	}
	// Setup filled the mailboxes of the 3 clients' users (user1..3).
	f.mu.Lock()
	for i := 1; i <= 3; i++ {
		u := "user" + strconv.Itoa(i) + "@example.com"
		if len(f.mail[u]) != 3 || len(f.mail[u][0]) < 64<<10-100 || len(f.mail[u][0]) > 64<<10+100 {
			t.Errorf("%s: %d messages", u, len(f.mail[u]))
		}
	}
	if len(f.mail) != 3 {
		t.Errorf("mailboxes of %d users filled", len(f.mail))
	}
	f.mu.Unlock()
	if st.SetupAppended != 9 || st.Messages != 27 || st.Bytes < 27*(64<<10-100) || st.MBPerS <= 0 || res.SetupS <= 0 {
		t.Errorf("fetch stats %+v setup %v", st, res.SetupS)
	}
	// Each client opens its session once (a client may get no ticket at all).
	if res.Latency.Count != 9 || res.Loop.Count < 1 || res.Loop.Count > 3 {
		t.Errorf("latency %d loop %d", res.Latency.Count, res.Loop.Count)
	}
	// A second setup finds the mailboxes full.
	res = mustRun(t, o)
	if res.SetupAppended != 0 || res.Messages != 27 {
		t.Errorf("second run appended %d, fetched %d", res.SetupAppended, res.Messages)
	}

	// A mailbox other than INBOX is created by the setup.
	o.Fetch.Mailbox = "Bench"
	res = mustRun(t, o)
	f.mu.Lock()
	created := len(f.created)
	f.mu.Unlock()
	if res.ErrorsTotal != 0 || created != 3 || res.Mailbox != "Bench" {
		t.Errorf("setup of Bench: %d created, errors %v", created, res.ErrorSamples)
	}

	// Empty mailboxes fail early with a hint.
	empty := startFake(t, "imap")
	o = testOptions(t, "fetch", empty.addr())
	o.Count = 1
	if _, err := Run(context.Background(), o); err == nil || !strings.Contains(err.Error(), "--setup") {
		t.Errorf("empty mailbox: %v", err)
	}
}

func TestLMTP(t *testing.T) {
	f := startFake(t, "lmtp")
	o := testOptions(t, "lmtp", f.addr())
	o.Count = 20
	o.LMTP = LMTPOptions{Size: 10 << 10, Rcpts: 3}
	res := mustRun(t, o)
	st := res.LMTPStats
	if st == nil || res.Ops != 20 || st.Deliveries != 20 || st.Recipients != 60 || res.ErrorsTotal != 0 {
		t.Fatalf("lmtp %+v errors %v", st, res.ErrorSamples)
	}
	f.mu.Lock()
	for i := 1; i <= 10; i++ {
		if n := f.delivered["user"+strconv.Itoa(i)+"@example.com"]; n != 6 {
			t.Errorf("user%d got %d messages, want 6", i, n)
		}
	}
	for _, rc := range f.txRcpts {
		if len(rc) != 3 || rc[0] == rc[1] || rc[1] == rc[2] || rc[0] == rc[2] {
			t.Errorf("transaction recipients %v", rc)
		}
	}
	if f.dataBytes < 20*(10<<10)*98/100 || f.dataBytes > 20*(10<<10)*102/100 {
		t.Errorf("%d bytes of DATA for 20 messages of 10 KiB", f.dataBytes)
	}
	conns := f.logouts
	f.mu.Unlock()
	if conns != 4 { // one connection per client, QUIT at the end
		t.Errorf("%d QUITs, want 4", conns)
	}
	if st.MessageBytes < 10<<10*98/100 || st.MessageBytes > 10<<10*102/100 || res.Latency.Count != 20 || st.RecipientsPerS <= 0 {
		t.Errorf("message bytes %d latency %+v", st.MessageBytes, res.Latency)
	}

	// A rejected recipient fails its transactions but not the others.
	f.reject = "user2@example.com"
	o.LMTP.Rcpts = 1
	res = mustRun(t, o)
	if res.Ops != 18 || res.Errors["rcpt:rejected"] != 2 || res.RcptRejected != 2 {
		t.Errorf("reject: ops %d errors %v rejected %d", res.Ops, res.Errors, res.RcptRejected)
	}
}

func TestLMTPDirect(t *testing.T) {
	a, b := startFake(t, "lmtp"), startFake(t, "lmtp")
	o := testOptions(t, "lmtp", a.addr(), b.addr())
	o.Count = 20
	o.LMTP = LMTPOptions{Size: 2000, Rcpts: 2}
	res := mustRun(t, o)
	if res.Ops != 20 || res.ErrorsTotal != 0 {
		t.Fatalf("ops %d errors %v", res.Ops, res.ErrorSamples)
	}
	total := 0
	for _, f := range []*fakeServer{a, b} {
		f.mu.Lock()
		for _, rc := range f.txRcpts {
			total++
			for _, u := range rc {
				if tgt, _ := o.Targets.For(u); tgt != f.addr() {
					t.Errorf("%s delivered at %s, maps to %s", u, f.addr(), tgt)
				}
			}
		}
		f.mu.Unlock()
	}
	if total != 20 {
		t.Errorf("%d transactions", total)
	}
}

// TestBadServers checks that garbage, overlong lines and silence become
// counted errors of the right kind, not hangs.
func TestBadServers(t *testing.T) {
	serve := func(t *testing.T, reply string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		t.Cleanup(func() { ln.Close(); wg.Wait() })
		wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Go(func() {
					defer c.Close()
					_, _ = c.Write([]byte(reply))
					_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
					_, _ = c.Read(make([]byte, 100)) // then hang up
				})
			}
		})
		return ln.Addr().String()
	}
	for _, c := range []struct {
		name, reply, kind string
	}{
		{"garbage", "HTTP/1.1 400 Bad Request\r\n", "greeting:protocol"},
		{"bye", "* BYE too busy\r\n", "greeting:rejected"},
		{"overlong", strings.Repeat("x", maxReplyLine+10) + "\r\n", "greeting:protocol"},
		{"silent", "", "greeting:timeout"},
		{"hangup-after-greeting", "* OK hi\r\n", "login:closed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := testOptions(t, "login", serve(t, c.reply))
			o.Count, o.Concurrency, o.Timeout = 2, 2, 300*time.Millisecond
			res := mustRun(t, o)
			if res.Ops != 0 || res.Errors[c.kind] != 2 {
				t.Errorf("errors %v, want 2 %s (%v)", res.Errors, c.kind, res.ErrorSamples)
			}
		})
	}
	o := testOptions(t, "login", "127.0.0.1:1")
	o.Count = 1
	if res := mustRun(t, o); res.Errors["connect:refused"] != 1 {
		t.Errorf("refused: %v", res.Errors)
	}
}

func TestCommandJSON(t *testing.T) {
	f := startFake(t, "imap")
	var stdout, stderr bytes.Buffer
	err := Command(context.Background(), []string{"login", "--target", f.addr(), "--user-range", "1-5",
		"--count", "10", "--concurrency", "2", "--json"}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("%v; stderr %s", err, stderr.String())
	}
	var m map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &m); err != nil {
		t.Fatalf("%v: %s", err, stdout.String())
	}
	for _, k := range []string{"workload", "proto", "targets", "mode", "users", "concurrency", "tls", "duration_s",
		"setup_s", "ops", "ops_per_s", "errors_total", "errors", "error_samples", "latency_ms", "loop_ms", "logins_per_s"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, stdout.String())
		}
	}
	for _, k := range []string{"sessions", "mb_per_s", "deliveries_per_s", "rss_per_session_kib"} {
		if _, ok := m[k]; ok {
			t.Errorf("login JSON has %q", k)
		}
	}
	lat, _ := m["latency_ms"].(map[string]any)
	for _, k := range []string{"p50", "p90", "p99", "p999", "max", "min", "mean", "count"} {
		if _, ok := lat[k]; !ok {
			t.Errorf("latency_ms lacks %q", k)
		}
	}
	if m["workload"] != "login" || m["ops"] != float64(10) || m["users"] != float64(5) || lat["count"] != float64(10) {
		t.Errorf("values: %s", stdout.String())
	}
	if !strings.Contains(stderr.String(), "logins 10") {
		t.Errorf("progress on stderr: %q", stderr.String())
	}

	// Text summary, and the idle workload's JSON fields.
	stdout.Reset()
	err = Command(context.Background(), []string{"idle", "--target", f.addr(), "--sessions", "3", "--hold", "10ms",
		"--settle", "0s", "--pid", strconv.Itoa(os.Getpid()), "--progress=false"}, &stdout, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"workload     idle (imap, tls none)", "sessions     3 of 3 established", "KiB per session"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("text summary lacks %q:\n%s", want, stdout.String())
		}
	}
}

func TestParseArgsErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "one workload"},
		{[]string{"nope", "--target", "h:1"}, "unknown workload"},
		{[]string{"login"}, "--target"},
		{[]string{"login", "--target", "h:1", "--duration", "1s", "--count", "3"}, "not both"},
		{[]string{"idle", "--target", "h:1", "--count", "3"}, "do not apply"},
		{[]string{"login", "--target", "h:1", "--insecure"}, "need --starttls"},
		{[]string{"login", "--target", "h:1", "--proto", "smtp"}, "proto must be"},
		{[]string{"fetch", "--target", "h:1", "--proto", "pop3"}, "proto must be imap"},
		{[]string{"login", "--target", "h:1", "--users", "u%s"}, "verb"},
		{[]string{"idle", "--target", "h:1", "--pid", "abc"}, "not a process id"},
		{[]string{"idle", "--target", "h:1", "--pid-children"}, "needs --pid"},
		{[]string{"idle", "--target", "h:1", "--proto", "pop3", "--idle"}, "IMAP only"},
		{[]string{"lmtp", "--target", "h:1", "--size", "lots"}, "bad size"},
		{[]string{"login", "--target", "h:1", "--starttls", "--tls"}, "not both"},
		{[]string{"login", "--target", "h:1", "--bogus"}, "bogus"},
	} {
		_, _, err := parseArgs(c.args, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want %q", c.args, err, c.want)
		}
	}
	o, asJSON, err := parseArgs([]string{"--target", "127.0.0.1,127.0.0.2:10110", "login", "--proto", "pop3", "--tls", "--insecure",
		"--users", "fixed@example.com", "--json"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if !asJSON || strings.Join(o.Targets.All(), " ") != "127.0.0.1:995 127.0.0.2:10110" || o.Users.Len() != 1 ||
		o.Duration != 10*time.Second || !o.TLS.InsecureSkipVerify {
		t.Errorf("parsed %+v", o)
	}
	var out bytes.Buffer
	if err := Command(context.Background(), []string{"--help"}, &out, &bytes.Buffer{}); err == nil || !strings.Contains(out.String(), "usage: usher bench") {
		t.Errorf("help: %v %q", err, out.String())
	}
}
