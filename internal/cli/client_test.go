package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/state"
)

// Tokens of the end-to-end test's TCP API.
const (
	e2eToken  = "e2e-Token_0123456789abcdef"
	e2eToken2 = "e2e-Token_second-0123456789"
)

// testClientCommands runs every client command but status against the
// usher of TestEndToEnd, which has the backends 127.0.1.1, 127.0.1.2,
// 127.0.1.3 (weight 50) and 127.0.1.4 (tag ssd), no user records and
// health checks off.
func testClientCommands(t *testing.T, sock string) {
	t.Helper()
	cli := func(args ...string) (int, string, string) {
		return runMain(append(args, "--socket", sock)...)
	}
	mustCLI := func(args ...string) string {
		t.Helper()
		code, out, errs := cli(args...)
		if code != 0 || errs != "" {
			t.Fatalf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
		return out
	}
	// failCLI runs a command that must fail with the API's error.
	failCLI := func(args []string, inErr ...string) {
		t.Helper()
		code, out, errs := cli(args...)
		if code != 1 || out != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 1 and no output", args, code, out, errs)
		}
		for _, s := range inErr {
			if !strings.Contains(errs, s) {
				t.Errorf("%v: stderr %q does not contain %q", args, errs, s)
			}
		}
	}
	userStatus := func(user string) director.UserStatus {
		t.Helper()
		var us director.UserStatus
		if err := json.Unmarshal([]byte(mustCLI("status", "--json", user)), &us); err != nil {
			t.Fatal(err)
		}
		return us
	}

	// backend update.
	if out := mustCLI("backend", "update", "127.0.1.3", "--weight", "0"); out != "backend 127.0.1.3: weight 0\n" {
		t.Errorf("backend update: %q", out)
	}
	failCLI([]string{"backend", "update", "127.0.1.9", "--weight", "5"}, "not found", "404")
	failCLI([]string{"backend", "update", "127.0.1.3", "--weight", "1001"}, "out of range", "400")
	// backend add refuses what the config refuses.
	failCLI([]string{"backend", "add", "0.0.0.0"}, "unicast", "400")
	failCLI([]string{"backend", "add", "127.0.1.8", "--tag", "no spaces"}, "backend tag", "400")

	// backend down with a cause: shown by status.
	if out := mustCLI("backend", "down", "127.0.1.2", "--cause", "disk swap"); out != "backend 127.0.1.2 is down (cause: disk swap)\n" {
		t.Errorf("backend down: %q", out)
	}
	rows := tableRows(t, mustCLI("status"))
	if r := rows["127.0.1.2"]; strings.Join(r[:8], " ") != "127.0.1.2 100 - down 0 0 - -" || !strings.HasPrefix(r[8], "disk swap (") || !strings.HasSuffix(r[8], "s ago)") {
		t.Errorf("status row of the backend marked down: %q", r)
	}
	if r := rows["127.0.1.3"]; r[1] != "0" || r[8] != "-" {
		t.Errorf("status row of 127.0.1.3: %q", r)
	}
	failCLI([]string{"backend", "down", "127.0.1.9"}, "404")

	// user move: pins; a down or unknown target is refused.
	if out := mustCLI("user", "move", "Alice@Example.com", "127.0.1.1"); out != "user alice@example.com moved to 127.0.1.1\n" {
		t.Errorf("user move: %q", out)
	}
	failCLI([]string{"user", "move", "bob@example.com", "127.0.1.2"}, "down", "503")
	failCLI([]string{"user", "move", "bob@example.com", "127.0.1.9"}, "not found", "404")

	// map: one record, expiring in user_expire (15m).
	alice := userStatus("alice@example.com")
	mrows := table(t, mustCLI("map"), "USER", "HASH", "BACKEND", "TAG", "SESSIONS", "EXPIRES")
	r := mrows["alice@example.com"]
	if len(mrows) != 1 || r == nil || strings.Join(r[:5], " ") != fmt.Sprintf("alice@example.com %d 127.0.1.1 - 0", alice.Hash) {
		t.Errorf("map rows %q", mrows)
	} else if exp, err := time.Parse(time.RFC3339, r[5]); err != nil || time.Until(exp) < 14*time.Minute || time.Until(exp) > 16*time.Minute {
		t.Errorf("map EXPIRES %q: %v", r[5], err)
	}
	var ma admin.MapAnswer
	if err := json.Unmarshal([]byte(mustCLI("map", "--backend", "127.0.1.1", "--json")), &ma); err != nil || len(ma.Users) != 1 || ma.Users[0].User != "alice@example.com" {
		t.Errorf("map --backend 127.0.1.1 --json: %+v, %v", ma, err)
	}
	if rows := table(t, mustCLI("map", "--backend", "127.0.1.2"), "USER", "HASH", "BACKEND", "TAG", "SESSIONS", "EXPIRES"); len(rows) != 0 {
		t.Errorf("map of a backend without users: %q", rows)
	}
	failCLI([]string{"map", "--backend", "127.0.1.9"}, "404")

	// user kick (no sessions here: the backends do not exist).
	if out := mustCLI("user", "kick", "alice@example.com"); out != "kicked 0 session(s) of alice@example.com\n" {
		t.Errorf("user kick: %q", out)
	}
	if out := mustCLI("user", "kick", "alice@example.com", "--json"); strings.Join(strings.Fields(out), "") != `{"kicked":0}` {
		t.Errorf("user kick --json: %q", out)
	}

	// dump: shell lines; a down backend is marked down right after its add.
	dumped := mustCLI("dump")
	wantDump := "usher backend add 127.0.1.1 --weight 100\n" +
		"usher backend add 127.0.1.2 --weight 100\n" +
		"usher backend down 127.0.1.2\n" +
		"usher backend add 127.0.1.3 --weight 0\n" +
		"usher backend add 127.0.1.4 --weight 100 --tag ssd\n"
	if dumped != wantDump {
		t.Errorf("dump:\n%s\nwant:\n%s", dumped, wantDump)
	}
	var da admin.DumpAnswer
	if err := json.Unmarshal([]byte(mustCLI("dump", "--json")), &da); err != nil || len(da.Commands) != 4 ||
		da.Commands[1] != (state.Command{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("127.0.1.2"), Weight: 100}) {
		t.Errorf("dump --json: %+v, %v", da, err)
	}

	// backend remove, then replaying the dump brings the backends back.
	before := tableRows(t, mustCLI("status"))
	if out := mustCLI("backend", "remove", "127.0.1.3"); out != "backend 127.0.1.3 removed\n" {
		t.Errorf("backend remove: %q", out)
	}
	mustCLI("backend", "remove", "127.0.1.4")
	failCLI([]string{"backend", "remove", "127.0.1.3"}, "not found", "404")
	if n := len(tableRows(t, mustCLI("status"))); n != 2 {
		t.Errorf("%d backends after two removes, want 2", n)
	}
	for _, line := range strings.Split(strings.TrimSpace(dumped), "\n") {
		args := strings.Fields(line)
		if args[0] != "usher" {
			t.Fatalf("dump line %q", line)
		}
		code, _, errs := cli(args[1:]...)
		exists := strings.HasPrefix(line, "usher backend add 127.0.1.1 ") || strings.HasPrefix(line, "usher backend add 127.0.1.2 ")
		if exists && (code != 1 || !strings.Contains(errs, "409")) || !exists && code != 0 {
			t.Errorf("replaying %q: exit %d, stderr %q", line, code, errs)
		}
	}
	after := tableRows(t, mustCLI("status"))
	for _, a := range []string{"127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"} {
		if strings.Join(before[a][:8], " ") != strings.Join(after[a][:8], " ") {
			t.Errorf("after replaying the dump, %s is %q, was %q", a, after[a], before[a])
		}
	}

	// flush: a user on the drained 127.0.1.3 moves to where hashing puts
	// it now (127.0.1.1: .2 is down, .3 has weight 0, .4 is another pool).
	mustCLI("user", "move", "alice@example.com", "127.0.1.3")
	if out := mustCLI("flush", "127.0.1.3", "--max-parallel", "2"); out != "flush 127.0.1.3: 1 user(s): 1 moved, 0 kept, 0 failed\n" {
		t.Errorf("flush: %q", out)
	}
	if us := userStatus("alice@example.com"); us.Backend != "127.0.1.1" {
		t.Errorf("after flush alice is on %q, want 127.0.1.1", us.Backend)
	}
	var fr director.FlushResult
	if err := json.Unmarshal([]byte(mustCLI("flush", "all", "--json")), &fr); err != nil || fr != (director.FlushResult{Users: 1, Kept: 1}) {
		t.Errorf("flush all --json: %+v, %v", fr, err)
	}
	failCLI([]string{"flush", "127.0.1.9"}, "404")
	failCLI([]string{"flush", "everything"}, "400")
	if out := mustCLI("flush", "--forget", "all"); out != "forgot 1 user record(s) of all\n" {
		t.Errorf("flush --forget: %q", out)
	}
	if us := userStatus("alice@example.com"); us.Backend != "" {
		t.Errorf("record left after flush --forget: %+v", us)
	}

	// backend up: the cause is "admin".
	if out := mustCLI("backend", "up", "127.0.1.2"); out != "backend 127.0.1.2 is up (cause: admin)\n" {
		t.Errorf("backend up: %q", out)
	}
	if r := tableRows(t, mustCLI("status"))["127.0.1.2"]; r[3] != "up" || !strings.HasPrefix(r[8], "admin (") {
		t.Errorf("status row after backend up: %q", r)
	}
	failCLI([]string{"backend", "up", "127.0.1.9"}, "404")
}

// testTCPAPI checks the TCP API of TestEndToEnd (listening on adminAddr
// with e2eToken, loopback allowed); reconfigure rewrites the [admin] keys
// of the config file and reloads.
func testTCPAPI(t *testing.T, sock, adminAddr string, logs *syncBuffer, reconfigure func(adminKeys string)) {
	t.Helper()
	base := "http://" + adminAddr
	hc := &http.Client{Timeout: 5 * time.Second}
	get := func(path, token string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, base+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/v1/status", ""); code != 401 || !strings.Contains(body, "missing or bad bearer token") {
		t.Errorf("TCP without token: %d %q", code, body)
	}
	if code, _ := get("/v1/status", "wrong-token-0123456789"); code != 401 {
		t.Errorf("TCP with a wrong token: %d", code)
	}
	var st director.Status
	if code, body := get("/v1/status", e2eToken); code != 200 || json.Unmarshal([]byte(body), &st) != nil || len(st.Backends) != 4 {
		t.Errorf("TCP with the token: %d %q", code, body)
	}
	if code, _ := get("/metrics", ""); code != 401 {
		t.Errorf("TCP /metrics without token: %d", code)
	}
	if code, body := get("/metrics", e2eToken); code != 200 || !strings.Contains(body, `usher_admin_requests_total{code="401"}`) {
		t.Errorf("TCP /metrics with the token: %d, no 401s counted in:\n%s", code, body)
	}

	// The CLI over TCP, token from $USHER_TOKEN.
	t.Setenv("USHER_TOKEN", e2eToken)
	if code, out, errs := runMain("status", "--address", base); code != 0 || len(tableRows(t, out)) != 4 {
		t.Errorf("status --address: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	if code, out, errs := runMain("backend", "update", "127.0.1.1", "--weight", "100", "--address", base+"/"); code != 0 || out != "backend 127.0.1.1: weight 100\n" {
		t.Errorf("backend update --address: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	for _, tok := range []string{"", "wrong-token-0123456789"} {
		t.Setenv("USHER_TOKEN", tok)
		if code, _, errs := runMain("status", "--address", base); code != 1 || !strings.Contains(errs, "401") {
			t.Errorf("status --address with token %q: exit %d, stderr %q", tok, code, errs)
		}
	}

	// Reload: a new token and an allow list without 127.0.0.1 (the test
	// dials from there): 403, whatever the token.
	reconfigure(fmt.Sprintf("listen = %q\ntoken = %q\nallow = [\"127.0.0.2/32\"]\n", adminAddr, e2eToken2))
	waitFor(t, "the reload to take the allow list", func() bool { code, _ := get("/v1/status", e2eToken2); return code == 403 })
	for _, tok := range []string{"", e2eToken, e2eToken2} {
		if code, body := get("/v1/status", tok); code != 403 || !strings.Contains(body, "127.0.0.1 may not use the admin API") {
			t.Errorf("not allowed, token %q: %d %q", tok, code, body)
		}
	}
	t.Setenv("USHER_TOKEN", e2eToken2)
	if code, _, errs := runMain("status", "--address", base); code != 1 || !strings.Contains(errs, "403") {
		t.Errorf("status --address from a refused address: exit %d, stderr %q", code, errs)
	}
	if !strings.Contains(logs.String(), `msg="admin request refused: address not allowed" remote=127.0.0.1:`) {
		t.Errorf("no log line for the refused address")
	}
	// The socket needs no token and no allow list.
	if code, _, errs := runMain("status", "--socket", sock); code != 0 {
		t.Errorf("status over the socket: %q", errs)
	}

	// Reload: loopback again, the new token only.
	reconfigure(fmt.Sprintf("listen = %q\ntoken = %q\n", adminAddr, e2eToken2))
	waitFor(t, "the reload to take the new token", func() bool { code, _ := get("/v1/status", e2eToken2); return code == 200 })
	if code, _ := get("/v1/status", e2eToken); code != 401 {
		t.Errorf("the old token after the reload: %d, want 401", code)
	}
	if code, out, errs := runMain("status", "--address", base); code != 0 || len(tableRows(t, out)) != 4 {
		t.Errorf("status --address with the new token: exit %d, stderr %q", code, errs)
	}
	t.Setenv("USHER_TOKEN", "")
}

// waitFor polls cond for up to 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStatusTableHealth: the HEALTH, CHECKED and LAST CHANGE cells for each
// state of the health checker (the end-to-end test runs without checks).
func TestStatusTableHealth(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.Local)
	at := func(d time.Duration) *time.Time { x := now.Add(-d); return &x }
	held := now.Add(90 * time.Second)
	st := director.Status{Algorithm: "rendezvous", Backends: []director.BackendStatus{
		{Address: "10.0.0.1", Weight: 100, Up: true, Users: 3, Sessions: 5, Health: &director.HealthInfo{Healthy: true, Checked: at(4 * time.Second)}},
		{Address: "10.0.0.2", Weight: 100, Tag: "ssd", Health: &director.HealthInfo{Checked: at(2 * time.Second), LastError: "imap: dial tcp 10.0.0.2:143:\nconnection refused"},
			Cause: &director.Cause{Text: "health check: 3 failures", Time: *at(65 * time.Second)}},
		{Address: "10.0.0.3", Weight: 0, Health: &director.HealthInfo{Checked: at(time.Second), HeldDown: true, HeldUntil: &held}},
		{Address: "10.0.0.4", Weight: 100, Up: true, Health: &director.HealthInfo{Healthy: true}},
		{Address: "10.0.0.5", Weight: 100, Up: true},
	}}
	var b strings.Builder
	if err := printStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	rows := tableRows(t, b.String())
	want := map[string]string{
		"10.0.0.1": "10.0.0.1|100|-|up|3|5|ok|4s ago|-",
		"10.0.0.2": "10.0.0.2|100|ssd|down|0|0|failing: imap: dial tcp 10.0.0.2:143: connection refused|2s ago|health check: 3 failures (1m5s ago)",
		"10.0.0.3": "10.0.0.3|0|-|down|0|0|held down until " + held.Format(time.DateTime) + "|1s ago|-",
		"10.0.0.4": "10.0.0.4|100|-|up|0|0|pending|-|-",
		"10.0.0.5": "10.0.0.5|100|-|up|0|0|-|-|-",
	}
	for addr, w := range want {
		if got := strings.Join(rows[addr], "|"); got != w {
			t.Errorf("row %s:\n got %s\nwant %s", addr, got, w)
		}
	}
}

func TestDumpLines(t *testing.T) {
	lines, err := dumpLines([]state.Command{
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("2001:db8::1"), Weight: 0, Tag: "a.b-c_d", Up: true},
		{Type: state.CmdAddBackend, Backend: netip.MustParseAddr("10.0.0.2"), Weight: 7},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "usher backend add 2001:db8::1 --weight 0 --tag a.b-c_d\nusher backend add 10.0.0.2 --weight 7\nusher backend down 10.0.0.2\n"
	if got := strings.Join(lines, ""); got != want {
		t.Errorf("dump lines:\n%s\nwant\n%s", got, want)
	}
	if _, err := dumpLines([]state.Command{{Type: state.CmdForget}}); err == nil || !strings.Contains(err.Error(), "forget") {
		t.Errorf("an unexpected command: %v", err)
	}
	for in, want := range map[string]string{"ssd": "ssd", "": "''", "a b": "'a b'", "it's": `'it'\''s'`, "$(x)": "'$(x)'"} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}
