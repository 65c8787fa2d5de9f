package test

// End-to-end tests of usher's delivery-side services (issue 4) against real
// Dovecot backends: LMTP over TCP and over a UNIX socket (swaks and Python's
// smtplib.LMTP as clients), per-recipient replies when a backend is down,
// the recipient delimiter, Sieve scripts uploaded through usher's
// ManageSieve front end and run by Dovecot's LMTP, allow lists, and the
// PROXY protocol on both sides (from a load balancer to usher, from usher to
// Dovecot). Each test runs its own backends and usher.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// delivery is one test's world: backends, usher with IMAP, LMTP (TCP and a
// UNIX socket) and ManageSieve listeners.
type delivery struct {
	*e2e
	lmtp     string // LMTP TCP listener, host:port
	lmtpSock string // LMTP UNIX listener, the socket's path
	sieve    string // ManageSieve listener, host:port
}

// deliverySockMode is the mode the tests give the LMTP UNIX socket.
const deliverySockMode = 0o640

// deliverySetup starts Dovecot backends with bopts (3 by default) and a usher
// in front of all of them with an IMAP listener, LMTP on TCP and on a UNIX
// socket, and ManageSieve. mod may change the configuration first.
func deliverySetup(t *testing.T, bopts BackendOptions, mod func(*Backends, *UsherConfig)) *delivery {
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
	ports, err := FreePorts(3)
	if err != nil {
		t.Fatal(err)
	}
	d := &delivery{
		lmtp:     fmt.Sprintf("127.0.0.1:%d", ports[1]),
		lmtpSock: filepath.Join(b.Dir(), "lmtp.sock"),
		sieve:    fmt.Sprintf("127.0.0.1:%d", ports[2]),
	}
	cfg := UsherConfig{
		IMAPAddr:   fmt.Sprintf("127.0.0.1:%d", ports[0]),
		Backends:   b.Addrs(),
		Socket:     filepath.Join(b.Dir(), "admin.sock"),
		UserExpire: "15m",
		Services: []UsherService{
			{Name: "lmtp", Listeners: []UsherListener{
				{Address: d.lmtp},
				{Address: "unix:" + d.lmtpSock, Mode: fmt.Sprintf("%04o", deliverySockMode)},
			}},
			{Name: "managesieve", Listeners: []UsherListener{{Address: d.sieve}}},
		},
		// Below the 5s the harness's Stop waits for usher.
		Tables: "[timeouts]\nshutdown_grace = \"2s\"\n",
	}
	if mod != nil {
		mod(b, &cfg)
	}
	d.e2e = &e2e{b: b, u: StartUsher(t, bin, cfg.TOML()), cfg: cfg}
	return d
}

// pickUsers returns one user per backend: users[i] hashes to backend i
// (usher's hash_backend, for users without a record).
func (e *e2e) pickUsers(t *testing.T) []string {
	t.Helper()
	users := make([]string, e.b.N())
	found := 0
	for _, u := range e.b.Users() {
		st := e.status(t, u)
		i := e.b.Index(st.HashBackend)
		if i < 0 {
			t.Fatalf("usher status %s: hash_backend %q is no backend", u, st.HashBackend)
		}
		if users[i] == "" && st.Backend == "" {
			users[i] = u
			if found++; found == len(users) {
				return users
			}
		}
	}
	t.Fatalf("no user for every backend among %d users: %q", len(e.b.Users()), users)
	return nil
}

// newMsgID returns a unique Message-ID (without angle brackets).
func newMsgID(tag string) string {
	return fmt.Sprintf("%s.%d@e2e.example", tag, time.Now().UnixNano())
}

// deliveryMessage is a small message with Message-ID <id> and subject.
func deliveryMessage(id, subject string) []byte {
	return []byte(fmt.Sprintf("From: <sender@example.net>\r\nTo: <undisclosed@example.com>\r\nSubject: %s\r\nMessage-ID: <%s>\r\n\r\nBody of %s.\r\n.leading dot\r\n",
		subject, id, id))
}

// mailFiles returns the files of user's mailbox folder ("" for INBOX, else a
// Maildir++ folder like "Sorted") whose content names Message-ID <id>.
func (e *e2e) mailFiles(user, folder, id string) []string {
	dir := e.b.MaildirPath(user)
	if folder != "" {
		dir = filepath.Join(dir, "."+folder)
	}
	var out []string
	for _, sub := range []string{"new", "cur"} {
		files, _ := filepath.Glob(filepath.Join(dir, sub, "*"))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err == nil && strings.Contains(strings.ToLower(string(data)), "message-id: <"+strings.ToLower(id)+">") {
				out = append(out, f)
			}
		}
	}
	return out
}

// expectDelivered checks that Dovecot on backend who delivered the message
// <id> to user into mailbox (its LMTP log says so, no other backend logged
// the message for user) and that user's folder holds exactly one copy,
// in new/, containing want.
func (e *e2e) expectDelivered(t *testing.T, who int, user, id, folder, want string) {
	t.Helper()
	needle := "saved mail to INBOX"
	if folder != "" {
		needle = "stored mail into mailbox '" + folder + "'"
	}
	ctx, cancel := context.WithTimeout(context.Background(), logWait)
	defer cancel()
	if _, err := e.b.WaitLog(ctx, nil, who, "lmtp("+user+")", "msgid=<"+id+">", needle); err != nil {
		t.Errorf("%s: Dovecot backend %d (%s) did not log the delivery of <%s>: %v", user, who, e.b.Addr(who), id, err)
	}
	for i := range e.b.N() {
		if i != who {
			if lines := e.b.LogLines(nil, i, "lmtp("+user+")", "msgid=<"+id+">"); len(lines) > 0 {
				t.Errorf("%s: backend %d (%s) also handled <%s>, it belongs on backend %d: %q", user, i, e.b.Addr(i), id, who, lines)
			}
		}
	}
	files := e.mailFiles(user, folder, id)
	if len(files) != 1 {
		t.Errorf("%s: %d copies of <%s> in folder %q, want exactly 1: %q", user, len(files), id, folder, files)
		return
	}
	if filepath.Base(filepath.Dir(files[0])) != "new" {
		t.Errorf("%s: <%s> is in %s, want a new/ file", user, id, files[0])
	}
	data, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), want) {
		t.Errorf("%s: delivered file %s lacks %q:\n%s", user, files[0], want, data)
	}
}

// usherDelivery waits for usher's log line of the delivery to user through
// backend index who (LMTP's backend port 24, never :0) with result code.
func (e *e2e) usherDelivery(t *testing.T, from int64, user string, who, code int) string {
	t.Helper()
	line, err := e.u.WaitLog(from, logWait, "msg=delivery", "user="+user+" ", "backend="+e.b.HostPort(who, PortLMTP)+" ", "result="+strconv.Itoa(code))
	if err != nil {
		t.Errorf("usher log: %v", err)
	}
	return line
}

var sessionRE = regexp.MustCompile(`\bsession=(\S+)`)

// expectSessionForwarded checks that Dovecot on backend who logged the
// delivery of <id> to user under the session ID of usher's log line (usher
// passes it on with XCLIENT SESSION=), so the two logs can be joined.
func (e *e2e) expectSessionForwarded(t *testing.T, who int, user, id, usherLine string) {
	t.Helper()
	m := sessionRE.FindStringSubmatch(usherLine)
	if m == nil {
		t.Errorf("no session= in usher's line %q", usherLine)
		return
	}
	if lines := e.b.LogLines(nil, who, "lmtp("+user+")<", "><"+m[1]+">", "msgid=<"+id+">"); len(lines) != 1 {
		t.Errorf("%s: Dovecot on backend %d did not log <%s> under usher's session %s: %q", user, who, id, m[1],
			e.b.LogLines(nil, who, "lmtp("+user+")", "msgid=<"+id+">"))
	}
}

// runScript runs python3 test/scripts/NAME ARGS and decodes its JSON answer.
func runScript(t *testing.T, name string, args ...string) (map[string]any, int) {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, append([]string{filepath.Join("scripts", name)}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %v: %v", name, args, err)
	}
	var res map[string]any
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%s %v: exit %d, bad JSON %q: %v; stderr: %s", name, args, code, out, err, stderr.String())
	}
	return res, code
}

// pyCodes extracts {addr: code} from lmtpclient.py's "rcpt" or "data" map.
func pyCodes(res map[string]any, key string) map[string]int {
	out := map[string]int{}
	m, _ := res[key].(map[string]any)
	for addr, v := range m {
		if pair, ok := v.([]any); ok && len(pair) == 2 {
			if c, ok := pair[0].(float64); ok {
				out[addr] = int(c)
			}
		}
	}
	return out
}

// swaksReplyRE matches a server reply line in swaks' transcript: "<-  250 …"
// for good replies, "<** 451 …" for failures ("<~ " and "<~* " under TLS).
var swaksReplyRE = regexp.MustCompile(`^\s*<(?:-|~|\*\*|~\*)\s+(\d{3})([ -])(.*)$`)

// swaks runs swaks with args and returns its transcript and exit status.
func swaks(t *testing.T, args ...string) (string, int) {
	t.Helper()
	bin, err := exec.LookPath("swaks")
	if err != nil {
		t.Skip("swaks not installed (test/scripts/install-deps.sh)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, append([]string{"--timeout", "15"}, args...)...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("swaks %v: %v", args, err)
	}
	return string(out), 0
}

// swaksAfterData returns the codes of the final replies swaks read after it
// sent the message (the lines after " -> ." up to QUIT): with LMTP one per
// accepted recipient.
func swaksAfterData(out string) []int {
	var codes []int
	after := false
	for _, line := range strings.Split(out, "\n") {
		trim := strings.TrimSpace(line)
		switch {
		case trim == "-> ." || trim == "~> .":
			after = true
		case strings.HasPrefix(trim, "-> QUIT") || strings.HasPrefix(trim, "~> QUIT"):
			after = false
		case after:
			if m := swaksReplyRE.FindStringSubmatch(line); m != nil && m[2] == " " {
				c, _ := strconv.Atoi(m[1])
				codes = append(codes, c)
			}
		}
	}
	return codes
}

// TestDeliveryLMTP: one message to three users whose hashes point at three
// different backends, through usher's LMTP listener over TCP (swaks, then
// Python's smtplib.LMTP) and over the UNIX socket (smtplib.LMTP with a path):
// each recipient gets its own 250 after DATA, each message lands once in
// each Maildir, delivered by Dovecot on the user's own backend, and usher's
// log names each backend with LMTP's port 24 (a UNIX listener still reaches
// the backend's TCP port).
func TestDeliveryLMTP(t *testing.T) {
	d := deliverySetup(t, BackendOptions{}, nil)
	users := d.pickUsers(t)
	t.Logf("users per backend: %q", users)
	host, port := hostPort(d.lmtp)

	// The UNIX socket has the configured mode.
	if st, err := os.Stat(d.lmtpSock); err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != deliverySockMode {
		t.Errorf("LMTP socket %s: %v, %v; want a socket with mode %04o", d.lmtpSock, st.Mode(), err, deliverySockMode)
	}

	// swaks over TCP.
	mark := d.u.LogSize()
	id := newMsgID("swaks")
	out, code := swaks(t, "--protocol", "LMTP", "--server", host, "--port", port,
		"--from", "sender@example.net", "--to", strings.Join(users, ","),
		"--header", "Subject: swaks "+id, "--header", "Message-Id: <"+id+">")
	if codes := swaksAfterData(out); code != 0 || len(codes) != 3 || codes[0] != 250 || codes[1] != 250 || codes[2] != 250 {
		t.Fatalf("swaks LMTP to %q through usher: exit %d, replies after data %v, want 3 × 250:\n%s", users, code, codes, out)
	}
	for i, u := range users {
		d.expectDelivered(t, i, u, id, "", "Subject: swaks "+id)
		d.expectSessionForwarded(t, i, u, id, d.usherDelivery(t, mark, u, i, 250))
	}

	// smtplib.LMTP over TCP and over the UNIX socket.
	for _, via := range []struct{ name, host, port string }{
		{"tcp", host, port},
		{"unix", d.lmtpSock, "0"},
	} {
		mark := d.u.LogSize()
		id := newMsgID("smtplib-" + via.name)
		res, code := runScript(t, "lmtpclient.py", "send", via.host, via.port, "--from", "sender@example.net",
			"--to", strings.Join(users, ","), "--subject", "smtplib "+id, "--msgid", id)
		rcpt, data := pyCodes(res, "rcpt"), pyCodes(res, "data")
		if code != 0 || res["ok"] != true {
			t.Fatalf("smtplib.LMTP via %s through usher: exit %d: %v", via.name, code, res)
		}
		for i, u := range users {
			if rcpt[u] != 250 || data[u] != 250 {
				t.Errorf("smtplib.LMTP via %s: %s got RCPT %d, after DATA %d; want 250, 250", via.name, u, rcpt[u], data[u])
			}
			// smtplib dot-stuffs ".leading dot line"; Dovecot must store it unstuffed.
			d.expectDelivered(t, i, u, id, "", "\n.leading dot line")
			line := d.usherDelivery(t, mark, u, i, 250)
			d.expectSessionForwarded(t, i, u, id, line)
			if via.name == "unix" && !strings.Contains(line, "remote="+d.lmtpSock) && !strings.Contains(line, "remote=unix:"+d.lmtpSock) {
				t.Errorf("usher delivery log line of a UNIX-socket session does not name the socket as remote: %s", line)
			}
		}
	}

	// Every delivery usher logged went to a backend's LMTP port.
	n := 0
	for _, line := range strings.Split(d.u.Log(), "\n") {
		if !strings.Contains(line, "msg=delivery") {
			continue
		}
		n++
		ok := false
		for i := range d.b.N() {
			ok = ok || strings.Contains(line, "backend="+d.b.HostPort(i, PortLMTP)+" ")
		}
		if !ok || strings.Contains(line, ":0 ") {
			t.Errorf("usher delivery line without a backend's port 24: %s", line)
		}
	}
	if n != 9 {
		t.Errorf("usher logged %d deliveries, want 9 (3 messages × 3 recipients)", n)
	}
}

// deliveryOutcome is a recipient's final answer: the reply after DATA, or
// the RCPT reply when the recipient was refused at RCPT.
func deliveryOutcome(res *LMTPResult, i int) SMTPReply {
	if res.RCPT[i].Code/100 != 2 {
		return res.RCPT[i]
	}
	return res.Final[i]
}

// TestDeliveryBackendDown: nothing is lost when a backend is down. After a
// first delivery pinned three users to three backends, one backend is killed;
// a message to all three gets 250 for the users on live backends and a 4xx
// for the user on the dead one, and exactly the 250s are in the Maildirs.
// After the backend is back, the MTA's retry to the failed recipient gets 250
// and every mailbox holds exactly one copy.
func TestDeliveryBackendDown(t *testing.T) {
	d := deliverySetup(t, BackendOptions{}, nil)
	users := d.pickUsers(t)
	id1 := newMsgID("before")
	res, err := LMTPTransaction(d.lmtp, "sender@example.net", users, deliveryMessage(id1, "before the crash"))
	if err != nil {
		t.Fatal(err)
	}
	for i, u := range users {
		if r := deliveryOutcome(res, i); r.Code != 250 {
			t.Fatalf("first delivery to %s: %s, want 250", u, r)
		}
		d.expectDelivered(t, i, u, id1, "", "Subject: before the crash")
		if st := d.status(t, u); st.Backend != d.b.Addr(i) {
			t.Fatalf("%s after delivery: usher status backend %q, want %s (pinned by the delivery)", u, st.Backend, d.b.Addr(i))
		}
	}

	const victim = 1
	if err := d.b.Kill(victim); err != nil {
		t.Fatal(err)
	}
	mark := d.u.LogSize()
	id2 := newMsgID("during")
	res, err = LMTPTransaction(d.lmtp, "sender@example.net", users, deliveryMessage(id2, "while a backend is down"))
	if err != nil {
		t.Fatal(err)
	}
	ok250 := 0
	for i, u := range users {
		r := deliveryOutcome(res, i)
		switch {
		case i == victim && r.Code/100 != 4:
			t.Errorf("%s on the dead backend %s: %s, want a temporary failure (4xx)", u, d.b.Addr(i), r)
		case i != victim && r.Code != 250:
			t.Errorf("%s on the live backend %s: %s, want 250", u, d.b.Addr(i), r)
		}
		if r.Code == 250 {
			ok250++
		}
	}
	t.Logf("replies while backend %d is down: %s / %s / %s", victim, deliveryOutcome(res, 0), deliveryOutcome(res, 1), deliveryOutcome(res, 2))
	if _, err := d.u.WaitLog(mark, logWait, "msg=delivery", "user="+users[victim]+" ", "backend="+d.b.HostPort(victim, PortLMTP)+" ", "result=451"); err != nil {
		t.Errorf("usher did not log the failed delivery: %v", err)
	}
	for i, u := range users {
		if i != victim {
			d.expectDelivered(t, i, u, id2, "", "while a backend is down")
		}
	}
	files := 0
	for _, u := range users {
		files += len(d.mailFiles(u, "", id2))
	}
	if files != ok250 {
		t.Errorf("%d copies of <%s> in the Maildirs, but %d recipients got 250", files, id2, ok250)
	}

	// The MTA retries the failed recipient once the backend is back.
	if err := d.b.Start(victim); err != nil {
		t.Fatal(err)
	}
	retry := []string{users[victim]}
	res, err = LMTPTransaction(d.lmtp, "sender@example.net", retry, deliveryMessage(id2, "while a backend is down"))
	if err != nil {
		t.Fatal(err)
	}
	if r := deliveryOutcome(res, 0); r.Code != 250 {
		t.Fatalf("retry to %s after the backend's restart: %s, want 250", users[victim], r)
	}
	for i, u := range users {
		d.expectDelivered(t, i, u, id2, "", "while a backend is down")
		if n := len(d.mailFiles(u, "", id1)); n != 1 {
			t.Errorf("%s holds %d copies of the first message, want 1", u, n)
		}
	}
}

// TestDeliveryRecipientDelimiter: with recipient_delimiter = "+", a
// recipient user+detail@domain is routed like user@domain, although the
// whole address hashes to another backend, and Dovecot (whose own
// recipient_delimiter is "+", lmtp_save_to_detail_mailbox = no) delivers it
// to user's INBOX.
func TestDeliveryRecipientDelimiter(t *testing.T) {
	d := deliverySetup(t, BackendOptions{}, func(b *Backends, c *UsherConfig) {
		c.Services[0].RecipientDelimiter = "+"
	})
	var user, detailed string
	who := -1
	for _, u := range d.b.Users() {
		name, domain, ok := strings.Cut(u, "@")
		if !ok {
			continue
		}
		plain, full := d.status(t, u), d.status(t, name+"+news@"+domain)
		if plain.HashBackend != full.HashBackend {
			user, detailed, who = u, name+"+news@"+domain, d.b.Index(plain.HashBackend)
			break
		}
	}
	if who < 0 {
		t.Fatal("no user whose +news address hashes to another backend")
	}
	t.Logf("%s hashes to backend %d; %s would hash elsewhere", user, who, detailed)
	mark := d.u.LogSize()
	id := newMsgID("delimiter")
	res, err := LMTPTransaction(d.lmtp, "sender@example.net", []string{detailed}, deliveryMessage(id, "detail"))
	if err != nil {
		t.Fatal(err)
	}
	if r := deliveryOutcome(res, 0); r.Code != 250 {
		t.Fatalf("delivery to %s: %s, want 250", detailed, r)
	}
	d.expectDelivered(t, who, user, id, "", "Subject: detail")
	d.usherDelivery(t, mark, user, who, 250)
	if st := d.status(t, user); st.Backend != d.b.Addr(who) {
		t.Errorf("usher status %s: backend %q, want %s", user, st.Backend, d.b.Addr(who))
	}
	if st := d.status(t, detailed); st.Backend != "" {
		t.Errorf("usher keeps a record for %s (backend %s); the delimiter should have been stripped", detailed, st.Backend)
	}
}

// deliverySieveScript files messages whose subject contains "[sorted]" into
// the folder Sorted, which it creates (RFC 5490 :create).
const deliverySieveScript = `require ["fileinto", "mailbox"];
if header :contains "subject" "[sorted]" {
  fileinto :create "Sorted";
}
`

// TestDeliverySieve: a Sieve script uploaded through usher's ManageSieve
// listener (sieve-connect over STARTTLS when installed, else the Go client)
// is active on the user's backend; a message delivered through usher's LMTP is filed by
// it into "Sorted", where IMAP through usher finds it.
func TestDeliverySieve(t *testing.T) {
	d := deliverySetup(t, BackendOptions{}, func(b *Backends, c *UsherConfig) {
		l := &c.Services[1].Listeners[0]
		l.TLS, l.Cert, l.Key = "starttls", b.Certs().CertFile, b.Certs().KeyFile
	})
	user, pass := d.pickUsers(t)[2], d.b.Password()
	mark := d.b.Mark()

	if _, err := exec.LookPath("sieve-connect"); err == nil {
		script := filepath.Join(t.TempDir(), "sorted.sieve")
		if err := os.WriteFile(script, []byte(deliverySieveScript), 0o644); err != nil {
			t.Fatal(err)
		}
		host, port := hostPort(d.sieve)
		for _, action := range [][]string{
			{"--upload", "--localsieve", script, "--remotesieve", "sorted"},
			{"--activate", "--remotesieve", "sorted", "--dumptlsinfo"},
		} {
			out, err := sieveConnect(t, host, port, user, pass, append([]string{"--tlscafile", d.b.Certs().CAFile}, action...)...)
			if err != nil {
				t.Fatalf("sieve-connect %v through usher: %v\n%s", action, err, out)
			}
			// --dumptlsinfo: the session ran over usher's STARTTLS, with
			// the harness certificate (sieve-connect also refuses to send
			// a password without TLS unless told --clearchan).
			if slicesContain(action, "--dumptlsinfo") && !strings.Contains(out, "/CN=usher e2e test CA") {
				t.Errorf("sieve-connect %v: no TLS session with usher's certificate:\n%s", action, out)
			}
		}
	} else {
		t.Log("sieve-connect not installed; uploading with the Go ManageSieve client")
		c, err := DialSieve(d.sieve)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Authenticate(user, pass); err != nil {
			t.Fatal(err)
		}
		if r, err := c.PutScript("sorted", deliverySieveScript); err != nil || r.Status != "OK" {
			t.Fatalf("PUTSCRIPT through usher: %+v %v", r, err)
		}
		if r, err := c.Cmd(`SETACTIVE "sorted"`); err != nil || r.Status != "OK" {
			t.Fatalf("SETACTIVE through usher: %+v %v", r, err)
		}
		c.Close()
	}

	// The Go client, from 127.0.0.66, sees the script active and reads it back.
	umark := d.u.LogSize()
	c, err := DialSieveFrom("127.0.0.66", d.sieve)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(c.Capabilities, "\n"), `"SASL" "PLAIN`) {
		t.Errorf("ManageSieve capabilities through usher lack SASL PLAIN: %q", c.Capabilities)
	}
	if err := c.Authenticate(user, pass); err != nil {
		t.Fatal(err)
	}
	r, err := c.Cmd("LISTSCRIPTS")
	if err != nil || r.Status != "OK" || len(r.Lines) != 1 || r.Lines[0] != `"sorted" ACTIVE` {
		t.Errorf("LISTSCRIPTS through usher: %+v %v; want one line \"sorted\" ACTIVE", r, err)
	}
	r, err = c.Cmd(`GETSCRIPT "sorted"`)
	if err != nil || r.Status != "OK" || !strings.Contains(strings.Join(r.Lines, "\n"), `fileinto :create "Sorted";`) {
		t.Errorf("GETSCRIPT through usher: %+v %v", r, err)
	}
	c.Close()

	// The ManageSieve sessions landed on the user's backend.
	who := d.whoServed(t, mark, user)
	if lines := d.b.LogLines(mark, who, "managesieve-login: ", LoginNeedle(user)); len(lines) < 2 {
		t.Errorf("backend %d logged %d managesieve logins of %s, want >= 2: %q", who, len(lines), user, lines)
	}
	if st := d.status(t, user); st.Backend != d.b.Addr(who) {
		t.Errorf("usher status %s: backend %q, but backend %s served ManageSieve", user, st.Backend, d.b.Addr(who))
	}
	// usher passed the client's address and its session ID on (XCLIENT).
	if line, err := d.u.WaitLog(umark, logWait, "msg=login", "proto=managesieve", "remote=127.0.0.66:", "backend="+d.b.HostPort(who, PortManageSieve)+" "); err != nil {
		t.Error(err)
	} else if m := sessionRE.FindStringSubmatch(line); m != nil {
		if lines := d.b.LogLines(mark, who, "managesieve-login: ", LoginNeedle(user), "rip=127.0.0.66,", "session=<"+m[1]+">"); len(lines) != 1 {
			t.Errorf("Dovecot's managesieve login of the client 127.0.0.66 (usher session %s): %q", m[1], d.b.LogLines(mark, who, "managesieve-login: ", LoginNeedle(user)))
		}
	}

	// Deliver through usher: the script files the message into Sorted.
	id := newMsgID("sieve")
	subject := "[sorted] filed by sieve " + id
	res, err := LMTPTransaction(d.lmtp, "sender@example.net", []string{user}, deliveryMessage(id, subject))
	if err != nil {
		t.Fatal(err)
	}
	if r := deliveryOutcome(res, 0); r.Code != 250 {
		t.Fatalf("delivery to %s: %s, want 250", user, r)
	}
	d.expectDelivered(t, who, user, id, "Sorted", "Subject: "+subject)
	if n := len(d.mailFiles(user, "", id)); n != 0 {
		t.Errorf("%d copies of the sorted message in INBOX too", n)
	}

	// IMAP through usher finds it in Sorted.
	mark = d.b.Mark()
	ic, err := DialIMAP(d.u.IMAPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer ic.Close()
	if err := ic.Login(user, pass); err != nil {
		t.Fatal(err)
	}
	if r, err := ic.Cmd("SELECT Sorted"); err != nil || r.Status != "OK" || !slicesContain(r.Untagged, "* 1 EXISTS") {
		t.Fatalf("SELECT Sorted through usher: %+v %v; want 1 EXISTS", r, err)
	}
	r2, err := ic.Cmd("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)])")
	if err != nil || r2.Status != "OK" || !strings.Contains(strings.Join(r2.Untagged, "\n"), "Subject: "+subject) {
		t.Errorf("FETCH in Sorted through usher: %+v %v", r2, err)
	}
	if got := d.whoServed(t, mark, user); got != who {
		t.Errorf("IMAP login of %s on backend %d, ManageSieve on %d", user, got, who)
	}
}

func slicesContain(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// sieveConnect runs sieve-connect against usher with the password on a pipe
// (--passwordfd 3), non-interactively.
func sieveConnect(t *testing.T, host, port, user, pass string, args ...string) (string, error) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	if _, err := pw.WriteString(pass + "\n"); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sieve-connect", append([]string{"--server", host, "--port", port,
		"--user", user, "--passwordfd", "3", "--authmech", "PLAIN"}, args...)...)
	cmd.ExtraFiles = []*os.File{pr}
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestDeliveryAllowList: an LMTP service with allow = ["127.0.0.1/32"]
// closes a connection from 127.0.0.9 without a greeting and logs the
// refusal, and serves 127.0.0.1. A second usher without allow (LMTP's
// default: loopback only) serves 127.0.0.9, which is loopback, and, behind
// its PROXY-protocol listener, refuses a client the load balancer reports as
// 192.0.2.44 (not loopback) while serving one reported as 127.0.0.77.
func TestDeliveryAllowList(t *testing.T) {
	d := deliverySetup(t, BackendOptions{}, func(b *Backends, c *UsherConfig) {
		c.Services[0].Allow = []string{"127.0.0.1/32"}
	})
	user := d.pickUsers(t)[0]

	mark := d.u.LogSize()
	conn, err := dialFrom("127.0.0.9", d.lmtp)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := WaitClosedConn(conn, 5*time.Second)
	conn.Close()
	if err != nil || len(lines) != 0 {
		t.Errorf("LMTP from 127.0.0.9 with allow 127.0.0.1/32: got %q, %v; want the connection closed without a greeting", lines, err)
	}
	if _, err := d.u.WaitLog(mark, logWait, "connection refused", "proto=lmtp", "remote=127.0.0.9:", "client address not in allow list"); err != nil {
		t.Errorf("usher did not log the refusal: %v", err)
	}
	id := newMsgID("allowed")
	res, err := LMTPTransaction(d.lmtp, "sender@example.net", []string{user}, deliveryMessage(id, "allowed"))
	if err != nil {
		t.Fatalf("LMTP from 127.0.0.1 with allow 127.0.0.1/32: %v", err)
	}
	if r := deliveryOutcome(res, 0); r.Code != 250 {
		t.Errorf("LMTP from 127.0.0.1: %s, want 250", r)
	}
	d.expectDelivered(t, 0, user, id, "", "Subject: allowed")
	// The UNIX socket has no client address; its file mode is the access control.
	if res, err := LMTPTransaction("unix:"+d.lmtpSock, "sender@example.net", []string{user}, deliveryMessage(newMsgID("sock"), "sock")); err != nil || deliveryOutcome(res, 0).Code != 250 {
		t.Errorf("LMTP over the UNIX socket with allow 127.0.0.1/32: %v %v", res, err)
	}

	// A second usher on the same backends with LMTP's default allow list.
	ports, err := FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	plain, proxied := fmt.Sprintf("127.0.0.1:%d", ports[0]), fmt.Sprintf("127.0.0.1:%d", ports[1])
	cfg := UsherConfig{
		Backends: d.b.Addrs(),
		Socket:   filepath.Join(d.b.Dir(), "admin2.sock"),
		Services: []UsherService{{Name: "lmtp", ProxyTrusted: []string{"127.0.0.5/32"}, Listeners: []UsherListener{
			{Address: plain}, {Address: proxied, ProxyProtocol: true},
		}}},
		Tables: "[timeouts]\nshutdown_grace = \"2s\"\n",
	}
	u2 := StartUsher(t, build.get(t), cfg.TOML())
	c, err := DialLMTPFrom("127.0.0.9", plain)
	if err != nil {
		t.Errorf("LMTP from 127.0.0.9 (loopback) with the default allow list: %v", err)
	} else {
		c.Close()
	}
	dst := netip.MustParseAddrPort(proxied)
	mark = u2.LogSize()
	conn, err = DialProxied("127.0.0.5", proxied, 2, netip.MustParseAddrPort("192.0.2.44:40000"), dst)
	if err != nil {
		t.Fatal(err)
	}
	lines, err = WaitClosedConn(conn, 5*time.Second)
	conn.Close()
	if err != nil || len(lines) != 0 {
		t.Errorf("LMTP client 192.0.2.44 (PROXY header) with the default allow list: got %q, %v; want closed without a greeting", lines, err)
	}
	if _, err := u2.WaitLog(mark, logWait, "connection refused", "proto=lmtp", "remote=192.0.2.44:40000", "client address not in allow list"); err != nil {
		t.Errorf("usher did not log the refusal of 192.0.2.44: %v", err)
	}
	conn, err = DialProxied("127.0.0.5", proxied, 2, netip.MustParseAddrPort("127.0.0.77:40001"), dst)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "220 ") {
		t.Errorf("LMTP client 127.0.0.77 (PROXY header) with the default allow list: %q %v; want a 220 greeting", buf[:n], err)
	}
}

// TestDeliveryProxyProtocol: an IMAP listener with proxy_protocol = true
// takes the client address from a PROXY v2 (and v1) header of a proxy_trusted
// load balancer: usher logs it as remote, judges it (not in
// trusted_networks: no plaintext login before STARTTLS) and forwards it (IMAP
// ID x-originating-ip), so Dovecot logs rip=192.0.2.44; a header from an
// untrusted peer is refused.
func TestDeliveryProxyProtocol(t *testing.T) {
	ports, err := FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	proxied := fmt.Sprintf("127.0.0.1:%d", ports[0])
	d := deliverySetup(t, BackendOptions{}, func(b *Backends, c *UsherConfig) {
		c.Services = append(c.Services, UsherService{Name: "imap", ProxyTrusted: []string{"127.0.0.5/32"},
			Listeners: []UsherListener{{Address: proxied, ProxyProtocol: true,
				TLS: "starttls", Cert: b.Certs().CertFile, Key: b.Certs().KeyFile}}})
		c.IMAPAddr = ""
	})
	user, pass := d.pickUsers(t)[0], d.b.Password()
	dst := netip.MustParseAddrPort(proxied)

	for _, v := range []struct {
		version byte
		client  string
	}{{2, "192.0.2.44:40044"}, {1, "198.51.100.7:40007"}} {
		src := netip.MustParseAddrPort(v.client)
		mark, umark := d.b.Mark(), d.u.LogSize()
		conn, err := DialProxied("127.0.0.5", proxied, v.version, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		c, err := NewIMAPClient(conn)
		if err != nil {
			t.Fatalf("IMAP through a PROXY v%d header from 127.0.0.5: %v", v.version, err)
		}
		// The client is 192.0.2.44, outside trusted_networks (127.0.0.0/8,
		// where the load balancer is): no plaintext password without TLS.
		if r, err := c.Cmd("LOGIN %s %s", Quote(user), Quote(pass)); err != nil || r.Status != "NO" || !strings.Contains(r.Text, "[PRIVACYREQUIRED]") {
			t.Errorf("plaintext LOGIN of client %s (PROXY v%d) without TLS: %+v %v; want NO [PRIVACYREQUIRED]", src, v.version, r, err)
		}
		if err := c.StartTLS(&tls.Config{RootCAs: caPool(t, d.b), ServerName: "127.0.0.1"}); err != nil {
			t.Fatalf("STARTTLS through a PROXY v%d header: %v", v.version, err)
		}
		if err := c.Login(user, pass); err != nil {
			t.Fatalf("login through a PROXY v%d header: %v", v.version, err)
		}
		c.Close()
		who := d.whoServed(t, mark, user)
		lines := d.b.LogLines(mark, who, LoginNeedle(user))
		if len(lines) != 1 || !strings.Contains(lines[0], "rip="+src.Addr().String()+",") {
			t.Errorf("PROXY v%d: Dovecot login line %q does not carry rip=%s", v.version, lines, src.Addr())
		}
		if _, err := d.u.WaitLog(umark, logWait, "session start", "proto=imap", "remote="+src.String()+" "); err != nil {
			t.Errorf("PROXY v%d: usher's session log does not name the client: %v", v.version, err)
		}
	}

	// An untrusted peer's header is refused.
	umark := d.u.LogSize()
	conn, err := DialProxied("127.0.0.6", proxied, 2, netip.MustParseAddrPort("192.0.2.44:40045"), dst)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := WaitClosedConn(conn, 5*time.Second)
	conn.Close()
	if err != nil || len(lines) != 0 {
		t.Errorf("PROXY header from untrusted 127.0.0.6: got %q, %v; want closed without a greeting", lines, err)
	}
	if _, err := d.u.WaitLog(umark, logWait, "connection refused", "proto=imap", "remote=127.0.0.6:", "proxy"); err != nil {
		t.Errorf("usher did not log the refusal of 127.0.0.6: %v", err)
	}
}

// TestDeliveryBackendProxy: with backend_proxy, usher sends Dovecot a PROXY
// header itself (IMAP "v1", LMTP "v2"), to listeners with haproxy = yes that
// refuse connections without one: an IMAP login and an LMTP delivery work
// there, Dovecot takes the client's address from the header, and usher's
// health probes of those ports pass too.
func TestDeliveryBackendProxy(t *testing.T) {
	ports, err := FreePorts(3)
	if err != nil {
		t.Fatal(err)
	}
	haIMAP, haLMTP := ports[0], ports[1]
	imapAddr := fmt.Sprintf("127.0.0.1:%d", ports[2])
	d := deliverySetup(t, BackendOptions{HAProxyIMAPPort: haIMAP, HAProxyLMTPPort: haLMTP}, func(b *Backends, c *UsherConfig) {
		c.IMAPAddr = ""
		c.Services[0].BackendProxy, c.Services[0].BackendPort = "v2", haLMTP
		c.Services = append(c.Services, UsherService{Name: "imap", BackendProxy: "v1", BackendPort: haIMAP,
			Listeners: []UsherListener{{Address: imapAddr}}})
		// Health probes go to the haproxy port too; fall = 3 keeps the
		// backends up for the login below even if probes fail.
		c.Tables = "[health]\ninterval = \"1s\"\ntimeout = \"500ms\"\nfall = 3\n\n[timeouts]\nshutdown_grace = \"2s\"\n"
	})
	user, pass := d.pickUsers(t)[1], d.b.Password()

	// Dovecot's haproxy listener refuses a client that starts without a
	// PROXY header, so a login there proves usher sent one.
	conn, err := dialFrom("127.0.0.1", d.b.HostPort(0, haIMAP))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("a CAPABILITY\r\n")); err != nil {
		t.Fatal(err)
	}
	if lines, err := WaitClosedConn(conn, 5*time.Second); err != nil || len(lines) != 0 {
		t.Errorf("Dovecot's haproxy listener answered a client without a PROXY header: %q %v", lines, err)
	}
	conn.Close()

	mark := d.b.Mark()
	c, err := DialIMAPFrom("127.0.0.78", imapAddr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Login(user, pass); err != nil {
		t.Fatalf("login through usher with backend_proxy v1: %v", err)
	}
	c.Close()
	who := d.whoServed(t, mark, user)
	lines := d.b.LogLines(mark, who, LoginNeedle(user))
	if len(lines) != 1 || !strings.Contains(lines[0], "rip=127.0.0.78,") || !strings.Contains(lines[0], "lip=127.0.0.1,") {
		t.Errorf("backend_proxy v1: Dovecot login line %q; want rip=127.0.0.78 and lip=127.0.0.1 (usher's listener) from the PROXY header", lines)
	}

	// LMTP: the delivery works through the haproxy listener, and Dovecot
	// sees the client's address from the header.
	mark = d.b.Mark()
	lc, err := DialLMTPFrom("127.0.0.79", d.lmtp)
	if err != nil {
		t.Fatal(err)
	}
	id := newMsgID("haproxy")
	res, err := lc.Send("e2e.example", "sender@example.net", []string{user}, deliveryMessage(id, "via haproxy"))
	lc.Close()
	if err != nil {
		t.Fatal(err)
	}
	if r := deliveryOutcome(res, 0); r.Code != 250 {
		t.Errorf("LMTP with backend_proxy v2 to Dovecot's haproxy listener: %s, want 250", r)
	} else {
		d.expectDelivered(t, who, user, id, "", "Subject: via haproxy")
		if lines := d.b.LogLines(mark, who, "lmtp(", "Connect from 127.0.0.79"); len(lines) != 1 {
			t.Errorf("LMTP with backend_proxy v2: Dovecot did not log the client 127.0.0.79 from the PROXY header: %q", d.b.LogLines(mark, who, "Connect from"))
		}
	}

	// usher's health probes reach the same haproxy listener: they must
	// send a PROXY header too (a LOCAL one), or every backend goes down.
	deadline := time.Now().Add(logWait)
	for {
		bs := d.opsBackends(t)
		checked := 0
		for _, b := range bs {
			if b.Health != nil && b.Health.Checked != nil {
				checked++
			}
		}
		if checked == len(bs) {
			for _, b := range bs {
				if !b.Health.Healthy || !b.Up || b.Health.LastError != "" {
					t.Errorf("backend_proxy: health probe of %s on the haproxy port failed: up=%v, last error %q", b.Address, b.Up, b.Health.LastError)
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend_proxy: not every backend probed after %v: %s", logWait, opsJSON(bs))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
