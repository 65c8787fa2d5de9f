package lmtp

import (
	"crypto/tls"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

// env is one usher session with fake backends and a fake director.
type env struct {
	t   *testing.T
	d   *proxytest.Director
	bs  []*fakeBackend
	srv *Server
	h   *proxytest.Session
	c   *testutil.Client
}

// setup starts n backends (configured by configure), a director routing
// alice and dave to backend 0, bob to backend 1 and carol to backend 2
// (when they exist), and a session.
func setup(t *testing.T, n int, configure func(i int, b *fakeBackend), opt func(o *Options), so sessionOpts) *env {
	t.Helper()
	return setupServer(t, n, configure, opt, nil, so)
}

// setupServer is setup with tune changing the Server before the session
// starts.
func setupServer(t *testing.T, n int, configure func(i int, b *fakeBackend), opt func(o *Options), tune func(s *Server), so sessionOpts) *env {
	t.Helper()
	bs, port := newBackends(t, n, configure)
	d := proxytest.NewDirector(bs[0].ip)
	for i, u := range []string{"alice", "bob", "carol"} {
		if i < n {
			d.Route(u+"@example.org", bs[i].ip)
		}
	}
	d.Route("dave@example.org", bs[0].ip)
	o := options(d, port)
	if opt != nil {
		opt(&o)
	}
	srv := New(o)
	if tune != nil {
		tune(srv)
	}
	h := startSession(t, srv, so)
	return &env{t: t, d: d, bs: bs, srv: srv, h: h, c: h.Client}
}

// transaction sends MAIL and the RCPTs, expecting each accepted.
func (e *env) transaction(from string, rcpts ...string) {
	e.t.Helper()
	e.c.Send("MAIL FROM:<" + from + ">")
	e.c.Expect("250 2.1.0 Sender OK")
	for _, r := range rcpts {
		e.c.Send("RCPT TO:<" + r + ">")
		e.c.Expect("250 2.1.5 Recipient OK")
	}
}

// data sends DATA and the message lines and returns n replies.
func (e *env) data(n int, lines ...string) []string {
	e.t.Helper()
	e.c.Send("DATA")
	e.c.ExpectPrefix("354 ")
	e.c.Write(stuff(lines...) + ".\r\n")
	out := make([]string, n)
	for i := range out {
		out[i] = e.c.Line()
	}
	return out
}

func saved(addr string) string { return "250 2.0.0 <" + addr + "> Saved" }

var testMessage = []string{
	"From: sender@example.net",
	"Subject: test",
	"",
	"Hello.",
	".leading dot",
	"..two dots",
	".",
	"end",
}

func TestDeliveryToThreeBackends(t *testing.T) {
	e := setup(t, 3, func(i int, b *fakeBackend) {
		if i == 2 {
			b.ext = append(b.ext, "SIZE 100000000", "SMTPUTF8")
		}
	}, nil, sessionOpts{})
	lhlo(e.h)
	e.c.Send("MAIL FROM:<sender@example.net> BODY=8BITMIME SIZE=120")
	e.c.Expect("250 2.1.0 Sender OK")
	for _, r := range []string{"alice", "bob", "dave", "carol"} {
		e.c.Send("RCPT TO:<" + r + "@example.org>")
		e.c.Expect("250 2.1.5 Recipient OK")
	}
	if h := e.d.Held(); h != 4 {
		t.Fatalf("%d leases held during the transaction, want 4", h)
	}
	got := e.data(4, testMessage...)
	want := []string{saved("alice@example.org"), saved("bob@example.org"), saved("dave@example.org"), saved("carol@example.org")}
	if !slices.Equal(got, want) {
		t.Fatalf("replies %q, want %q", got, want)
	}
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held after the transaction", h)
	}

	wantRcpts := [][]string{
		{"RCPT TO:<alice@example.org>", "RCPT TO:<dave@example.org>"},
		{"RCPT TO:<bob@example.org>"},
		{"RCPT TO:<carol@example.org>"},
	}
	wantMail := []string{
		"MAIL FROM:<sender@example.net> BODY=8BITMIME",
		"MAIL FROM:<sender@example.net> BODY=8BITMIME",
		"MAIL FROM:<sender@example.net> SIZE=120 BODY=8BITMIME", // backend 2 has SIZE
	}
	for i, b := range e.bs {
		recs := b.records()
		if len(recs) != 1 {
			t.Fatalf("backend %d: %d connections, want 1", i, len(recs))
		}
		rec := recs[0]
		if got := rcptsOf(rec); !slices.Equal(got, wantRcpts[i]) {
			t.Errorf("backend %d RCPTs %q, want %q", i, got, wantRcpts[i])
		}
		if string(rec.data) != stuff(testMessage...) {
			t.Errorf("backend %d got message %q, want %q", i, rec.data, stuff(testMessage...))
		}
	}
	logs := e.h.Logs.String()
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		if !strings.Contains(logs, "msg=delivery user="+u+"@example.org backend=") {
			t.Errorf("no delivery log line for %s:\n%s", u, logs)
		}
	}
	if strings.Contains(logs, "Hello.") || strings.Contains(logs, "Subject") {
		t.Errorf("message content in logs:\n%s", logs)
	}
	e.c.Send("QUIT")
	e.c.Expect("221 2.0.0 usher.test closing connection")
	e.c.ExpectClosed()
	if r := e.h.Wait(); r != "quit" {
		t.Errorf("reason %q", r)
	}
	// The backend connections stay open until the session ends (QUIT).
	for i, b := range e.bs {
		wantCmds := append(append([]string{"LHLO usher.test", wantMail[i]}, wantRcpts[i]...), "DATA", "QUIT")
		testutil.WaitFor(t, testTimeout, "QUIT", func() bool { return len(b.records()[0].cmds) == len(wantCmds) })
		if got := b.records()[0].cmds; !slices.Equal(got, wantCmds) {
			t.Errorf("backend %d commands %q, want %q", i, got, wantCmds)
		}
	}
}

func TestRecipientDelimiter(t *testing.T) {
	e := setup(t, 2, nil, func(o *Options) { o.RecipientDelimiter = "+-" }, sessionOpts{})
	e.d.Route("Alice@Example.org", e.bs[1].ip)
	e.d.Route("bob@example.org", e.bs[0].ip)
	lhlo(e.h)
	e.c.Send("MAIL FROM:<>")
	e.c.Expect("250 2.1.0 Sender OK")
	rcpts := []string{
		"Alice+news@Example.org",
		`"bob+x y"@example.org`,
		"+tag@example.org",
		"a-b+c@example.org",
		"postmaster",
		"@relay.example,@other.example:carol@example.org", // source route, dropped
	}
	for _, r := range rcpts {
		e.c.Send("RCPT TO:<" + r + ">")
		e.c.Expect("250 2.1.5 Recipient OK")
	}
	wantUsers := []string{"Alice@Example.org", "bob@example.org", "+tag@example.org", "a@example.org", "postmaster", "carol@example.org"}
	if got := e.d.Users(); !slices.Equal(got, wantUsers) {
		t.Fatalf("director got %q, want %q", got, wantUsers)
	}
	replies := e.data(len(rcpts), "x")
	for _, r := range replies {
		if !strings.HasPrefix(r, "250 ") {
			t.Errorf("reply %q", r)
		}
	}
	// The backend gets the address as given (without the source route).
	if got, want := rcptsOf(e.bs[1].records()[0]), []string{"RCPT TO:<Alice+news@Example.org>"}; !slices.Equal(got, want) {
		t.Errorf("backend 1 RCPTs %q, want %q", got, want)
	}
	want0 := []string{`RCPT TO:<"bob+x y"@example.org>`, "RCPT TO:<+tag@example.org>", "RCPT TO:<a-b+c@example.org>",
		"RCPT TO:<postmaster>", "RCPT TO:<carol@example.org>"}
	if got := rcptsOf(e.bs[0].records()[0]); !slices.Equal(got, want0) {
		t.Errorf("backend 0 RCPTs %q, want %q", got, want0)
	}
	if !strings.HasPrefix(e.bs[0].records()[0].cmds[1], "MAIL FROM:<>") {
		t.Errorf("null sender not forwarded: %q", e.bs[0].records()[0].cmds)
	}
}

func TestSizeLimit(t *testing.T) {
	e := setup(t, 2, nil, func(o *Options) { o.MaxMessageSize = 1000 }, sessionOpts{})
	if ext := lhlo(e.h); !hasExt(ext, "SIZE 1000") {
		t.Fatalf("LHLO %q does not advertise SIZE 1000", ext)
	}
	e.c.Send("MAIL FROM:<s@example.net> SIZE=1001")
	e.c.Expect("552 5.3.4 Message size exceeds fixed maximum message size")
	e.c.Send("MAIL FROM:<s@example.net> SIZE=1000")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Send("RCPT TO:<alice@example.org>", "RCPT TO:<bob@example.org>")
	e.c.Expect("250 2.1.5 Recipient OK")
	e.c.Expect("250 2.1.5 Recipient OK")
	line := strings.Repeat("x", 98) // 100 octets with CRLF
	var big []string
	for range 11 {
		big = append(big, line)
	}
	got := e.data(2, big...)
	for _, r := range got {
		if r != "552 5.3.4 Message size exceeds fixed maximum message size" {
			t.Errorf("reply %q", r)
		}
	}
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held", h)
	}
	// The backends got DATA with the RCPTs; the connections in the middle
	// of the message were closed, so nothing was delivered.
	for i, b := range e.bs {
		testutil.WaitFor(t, testTimeout, "backend "+strconv.Itoa(i)+" connection closed", func() bool { return b.live() == 0 })
		for _, rec := range b.records() {
			if len(rec.data) != 0 || !slices.Contains(rec.cmds, "DATA") {
				t.Errorf("backend %d: commands %q, message %q; want DATA and no message", i, rec.cmds, rec.data)
			}
		}
	}
	// Exactly at the limit (stuffing does not count, RFC 1870 section 4).
	e.transaction("s@example.net", "alice@example.org")
	exact := big[:10]
	exact[0] = "." + line[1:]
	if got := e.data(1, exact...); got[0] != saved("alice@example.org") {
		t.Errorf("message at the limit: %q", got)
	}
	e.c.Send("NOOP")
	e.c.Expect("250 2.0.0 OK")
}

func TestSequenceAndSyntaxErrors(t *testing.T) {
	e := setup(t, 1, nil, nil, sessionOpts{})
	c := e.c
	steps := []struct{ send, want string }{
		{"MAIL FROM:<a@example.org>", "503 5.5.1 Send LHLO first"},
		{"HELO client.example", "500 5.5.1 LMTP requires LHLO"},
		{"EHLO client.example", "500 5.5.1 LMTP requires LHLO"},
		{"LHLO", "501 5.5.4 Syntax: LHLO hostname"},
	}
	for _, s := range steps {
		c.Send(s.send)
		c.Expect(s.want)
	}
	lhlo(e.h)
	steps = []struct{ send, want string }{
		{"RCPT TO:<alice@example.org>", "503 5.5.1 MAIL needed first"},
		{"DATA", "503 5.5.1 MAIL needed first"},
		{"MAIL TO:<a@example.org>", "501 5.1.7 Bad sender address syntax"},
		{"MAIL FROM:a@example.org", "501 5.1.7 Bad sender address syntax"},
		{"MAIL FROM:<a@example.org> BODY=BINARYMIME", "501 5.5.4 Unsupported BODY value"},
		{"MAIL FROM:<a@example.org> SIZE=x", "501 5.5.4 Syntax error in parameters or arguments"},
		{"MAIL FROM:<a@example.org> RET=FULL", "555 5.5.4 Unsupported parameter"},
		{"MAIL FROM:<jörg@example.org>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"},
		{"MAIL FROM:<a@example.org>", "250 2.1.0 Sender OK"},
		{"MAIL FROM:<a@example.org>", "503 5.5.1 Sender already given"},
		{"DATA", "503 5.5.1 No valid recipients"},
		{"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"},
		{"RCPT TO:alice@example.org", "501 5.1.3 Bad recipient address syntax"},
		{"RCPT TO:<alice@example.org> NOTIFY=NEVER", "555 5.5.4 Unsupported parameter"},
		{"RCPT TO:<jörg@example.org>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"},
		{"DATA x", "501 5.5.4 Syntax error in parameters or arguments"},
		{"RSET x", "501 5.5.4 Syntax error in parameters or arguments"},
		{"RSET", "250 2.0.0 Reset OK"},
		{"VRFY alice", "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"},
		{"EXPN list", "502 5.5.1 Command not implemented"},
		{"XYZZY", "500 5.5.2 Command unrecognized"},
		{"12 34", "500 5.5.2 Command unrecognized"},
		{"BDAT 3 LAST", ""}, // consumes "abc", answers below
	}
	for _, s := range steps {
		c.Send(s.send)
		if s.want != "" {
			c.Expect(s.want)
		}
	}
	c.Write("abc")
	c.Expect("503 5.5.1 MAIL needed first")
	c.Send(strings.Repeat("A", 9000))
	c.Expect("500 5.5.2 Line too long")
	c.Send("NOOP")
	c.Expect("250 2.0.0 OK")
	// SMTPUTF8 allows non-ASCII addresses.
	c.Send("MAIL FROM:<jörg@example.org> SMTPUTF8")
	c.Expect("250 2.1.0 Sender OK")
	c.Send("QUIT")
	c.Expect("221 2.0.0 usher.test closing connection")
	if r := e.h.Wait(); r != "quit" {
		t.Errorf("reason %q", r)
	}
	if len(e.bs[0].records()) != 0 {
		t.Error("a backend was contacted")
	}
}

func TestTooManyBadCommands(t *testing.T) {
	e := setup(t, 1, nil, nil, sessionOpts{})
	for i := 0; i < maxBadCommands; i++ {
		e.c.Send("BOGUS")
		e.c.Expect("500 5.5.2 Command unrecognized")
	}
	e.c.Expect("421 4.7.0 usher.test Too many bad commands, closing connection")
	e.c.ExpectClosed()
	if r := e.h.Wait(); r != reasonTooManyBad {
		t.Errorf("reason %q", r)
	}
}

// A backend that does not answer RCPT holds the client for the backend
// login timeout, not for the (long) data timeout; the recipient gets a
// temporary failure and the other backends' recipients are unaffected.
func TestBackendHangsAtRCPT(t *testing.T) {
	e := setup(t, 2, func(i int, b *fakeBackend) {
		if i == 1 {
			b.rcptReply = map[string]string{"bob@example.org": ""}
		}
	}, func(o *Options) {
		o.Backend.LoginTimeout = 300 * time.Millisecond
		o.DataTimeout = time.Hour
	}, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	start := time.Now()
	e.c.Send("RCPT TO:<bob@example.org>")
	if got := e.c.Line(); !strings.HasPrefix(got, "451 ") {
		t.Fatalf("RCPT to a hung backend: %q, want 451", got)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("RCPT answered after %v, want about the 300ms login timeout", el)
	}
	if got := e.data(1, "hi"); !slices.Equal(got, []string{saved("alice@example.org")}) {
		t.Fatalf("replies %q, want alice's 250", got)
	}
}

func TestBackendRefusesRecipient(t *testing.T) {
	for _, pipelining := range []bool{true, false} {
		t.Run("pipelining="+strconv.FormatBool(pipelining), func(t *testing.T) {
			e := setup(t, 2, func(i int, b *fakeBackend) {
				if !pipelining {
					b.ext = []string{"ENHANCEDSTATUSCODES"}
				}
				switch i {
				case 0:
					b.rcptReply = map[string]string{"bob@example.org": "550 5.1.1 <bob@example.org> User unknown"}
				case 1:
					b.rcptReply = map[string]string{"carol@example.org": "450 4.2.1 try later"}
				}
			}, nil, sessionOpts{})
			e.d.Route("bob@example.org", e.bs[0].ip)
			e.d.Route("carol@example.org", e.bs[1].ip)
			lhlo(e.h)
			// The backend's verdict is the reply to RCPT.
			e.transaction("s@example.net", "alice@example.org")
			e.c.Send("RCPT TO:<bob@example.org>")
			e.c.Expect("550 5.1.1 <bob@example.org> User unknown")
			e.c.Send("RCPT TO:<carol@example.org>")
			e.c.Expect("450 4.2.1 try later")
			if h := e.d.Held(); h != 1 {
				t.Errorf("%d leases held after two refusals, want 1", h)
			}
			// One reply after DATA, for the one accepted recipient.
			got := e.data(1, "hi")
			if want := []string{saved("alice@example.org")}; !slices.Equal(got, want) {
				t.Fatalf("replies %q, want %q", got, want)
			}
			e.c.Send("NOOP")
			e.c.Expect("250 2.0.0 OK")
			logs := e.h.Logs.String()
			for _, want := range []string{"user=bob@example.org backend=" + e.srv.o.Backend.Addr(e.bs[0].ip) + " result=550 status=5.1.1",
				"user=carol@example.org backend=" + e.srv.o.Backend.Addr(e.bs[1].ip) + " result=450 status=4.2.1"} {
				if !strings.Contains(logs, "msg=delivery "+want) {
					t.Errorf("no log line %q:\n%s", want, logs)
				}
			}
			if d := e.bs[0].records()[0].data; string(d) != "hi\r\n" {
				t.Errorf("backend 0 got %q", d)
			}
			// Backend 1 refused its only recipient: no message was sent.
			rec := e.bs[1].records()[0]
			if len(rec.data) != 0 {
				t.Errorf("backend 1 got a message: %q", rec.data)
			}
			if slices.Contains(rec.cmds, "DATA") {
				t.Errorf("DATA sent without accepted recipients: %q", rec.cmds)
			}
			if h := e.d.Held(); h != 0 {
				t.Errorf("%d leases held", h)
			}
		})
	}
}

func TestBackendDown(t *testing.T) {
	e := setup(t, 1, nil, nil, sessionOpts{})
	e.d.Route("carol@example.org", netip.MustParseAddr("127.0.0.9")) // nothing listens there
	lhlo(e.h)
	e.c.Send("MAIL FROM:<s@example.net>")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Send("RCPT TO:<carol@example.org>")
	if got := e.c.Line(); !strings.HasPrefix(got, "451 4.4.0 Backend delivery failed (connect") {
		t.Errorf("RCPT reply for the down backend: %q", got)
	}
	e.c.Send("RCPT TO:<alice@example.org>")
	e.c.Expect("250 2.1.5 Recipient OK")
	if got := e.data(1, "hi"); got[0] != saved("alice@example.org") {
		t.Errorf("reply for the working backend: %q", got[0])
	}
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held", h)
	}
	if !strings.Contains(e.h.Logs.String(), "level=WARN msg=delivery user=carol@example.org backend=127.0.0.9:") {
		t.Errorf("no warning for the failed delivery:\n%s", e.h.Logs.String())
	}
}

func TestBackendFailsDuringData(t *testing.T) {
	cases := []struct {
		name   string
		config func(b *fakeBackend)
		want   string
	}{
		{"closes mid-DATA", func(b *fakeBackend) { b.closeMidData = true }, "451 4.4.0 "},
		{"times out", func(b *fakeBackend) { b.stall = true }, "451 4.4.0 Backend delivery failed (DATA reply: timed out)"},
		{"no replies after DATA", func(b *fakeBackend) {
			b.onData = nil
			b.dataReply = map[string]string{"bob@example.org": "garbage"}
		}, "451 4.4.0 Backend delivery failed (DATA reply)"},
	}
	for _, tc := range cases {
		for _, chunking := range []bool{false, true} {
			t.Run(tc.name+" chunking="+strconv.FormatBool(chunking), func(t *testing.T) {
				testBackendFailsDuringData(t, chunking, tc.config, tc.want)
			})
		}
	}
}

// testBackendFailsDuringData has backend 1 fail after the message began,
// as config says: only its recipient gets want, no retry.
func testBackendFailsDuringData(t *testing.T, chunking bool, config func(b *fakeBackend), want string) {
	e := setup(t, 2, func(i int, b *fakeBackend) {
		if chunking {
			b.ext = append(b.ext, "CHUNKING")
		}
		if i == 1 {
			config(b)
		}
	}, func(o *Options) { o.DataTimeout = 300 * time.Millisecond }, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org", "bob@example.org")
	start := time.Now()
	// Large enough not to fit in socket buffers at once.
	lines := make([]string, 2000)
	for i := range lines {
		lines[i] = strings.Repeat("y", 100)
	}
	got := e.data(2, lines...)
	if got[0] != saved("alice@example.org") {
		t.Errorf("working backend: %q", got[0])
	}
	if !strings.HasPrefix(got[1], want) {
		t.Errorf("failing backend: %q, want prefix %q", got[1], want)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("delivery took %v", d)
	}
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held", h)
	}
	e.c.Send("NOOP")
	e.c.Expect("250 2.0.0 OK")
	// The working backend's connection is reused.
	e.transaction("s@example.net", "alice@example.org")
	if got := e.data(1, "again"); got[0] != saved("alice@example.org") {
		t.Errorf("next transaction: %q", got)
	}
	if n := len(e.bs[0].records()); n != 1 {
		t.Errorf("working backend: %d connections, want 1", n)
	}
	// The failing backend's connection is not retried once the
	// message began.
	if n := len(e.bs[1].records()); n != 1 {
		t.Errorf("failing backend: %d connections, want 1", n)
	}
}

func TestBackendRefusesMAIL(t *testing.T) {
	e := setup(t, 2, func(i int, b *fakeBackend) {
		if i == 1 {
			b.mailReply = "550 5.7.1 sender refused"
		}
	}, nil, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	// The refused MAIL fails bob's RCPT, temporarily: the MTA retries him.
	e.c.Send("RCPT TO:<bob@example.org>")
	e.c.Expect("451 4.4.0 Backend delivery failed (MAIL), try again later")
	if got := e.data(1, "hi"); got[0] != saved("alice@example.org") {
		t.Errorf("reply %q", got)
	}
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held", h)
	}
	if !strings.Contains(e.h.Logs.String(), "level=WARN msg=delivery user=bob@example.org") {
		t.Errorf("no warning for bob:\n%s", e.h.Logs.String())
	}
}

func TestBackendReplyRelayed(t *testing.T) {
	e := setup(t, 1, func(i int, b *fakeBackend) {
		b.dataReply = map[string]string{
			"bob@example.org":   "452 4.2.2 <bob@example.org> Mailbox full",
			"carol@example.org": "550 no such user",
			"dave@example.org":  "250 5.0.0 odd enhanced code",
		}
	}, nil, sessionOpts{})
	e.d.Route("bob@example.org", e.bs[0].ip)
	e.d.Route("carol@example.org", e.bs[0].ip)
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org")
	got := e.data(4, "hi")
	want := []string{
		saved("alice@example.org"),
		"452 4.2.2 <bob@example.org> Mailbox full",
		"550 5.0.0 no such user",
		"250 2.0.0 odd enhanced code",
	}
	if !slices.Equal(got, want) {
		t.Errorf("replies %q, want %q", got, want)
	}
}

func TestDirectorUnavailable(t *testing.T) {
	e := setup(t, 3, nil, nil, sessionOpts{})
	e.d.FailUser("bob@example.org", proxy.ErrUnavailable)
	lhlo(e.h)
	e.c.Send("MAIL FROM:<s@example.net>")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Send("RCPT TO:<alice@example.org>")
	e.c.Expect("250 2.1.5 Recipient OK")
	e.c.Send("RCPT TO:<bob@example.org>")
	e.c.Expect("451 4.4.0 No backend available, try again later")
	e.c.Send("RCPT TO:<carol@example.org>")
	e.c.Expect("250 2.1.5 Recipient OK")
	got := e.data(2, "hi")
	if want := []string{saved("alice@example.org"), saved("carol@example.org")}; !slices.Equal(got, want) {
		t.Errorf("replies %q, want %q", got, want)
	}
	// Exactly one reply per accepted recipient: the next line answers NOOP.
	e.c.Send("NOOP")
	e.c.Expect("250 2.0.0 OK")
	if n := len(e.bs[1].records()); n != 0 {
		t.Errorf("bob's backend contacted %d times", n)
	}
	if !strings.Contains(e.h.Logs.String(), "msg=recipient user=bob@example.org result=451") {
		t.Errorf("no log line for the refused recipient:\n%s", e.h.Logs.String())
	}
	// Only refused recipients: DATA fails.
	e.c.Send("MAIL FROM:<s@example.net>", "RCPT TO:<bob@example.org>", "DATA")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Expect("451 4.4.0 No backend available, try again later")
	e.c.Expect("503 5.5.1 No valid recipients")
}

func TestPipelining(t *testing.T) {
	e := setup(t, 3, nil, nil, sessionOpts{})
	if ext := lhlo(e.h); !hasExt(ext, "PIPELINING") {
		t.Fatalf("PIPELINING not advertised: %q", ext)
	}
	e.c.Write("MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Expect("250 2.1.5 Recipient OK")
	e.c.Expect("250 2.1.5 Recipient OK")
	e.c.ExpectPrefix("354 ")
	e.c.Write(stuff(testMessage...) + ".\r\nRSET\r\nQUIT\r\n")
	e.c.Expect(saved("alice@example.org"))
	e.c.Expect(saved("carol@example.org"))
	e.c.Expect("250 2.0.0 Reset OK")
	e.c.Expect("221 2.0.0 usher.test closing connection")
	e.c.ExpectClosed()
	if string(e.bs[2].records()[0].data) != stuff(testMessage...) {
		t.Errorf("carol's backend got %q", e.bs[2].records()[0].data)
	}
}

func TestDotStuffingAndLineEnds(t *testing.T) {
	e := setup(t, 1, nil, nil, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	lines := []string{".", "..", "...", ".x", "a.", "", " .", "end"}
	if got := e.data(1, lines...); got[0] != saved("alice@example.org") {
		t.Fatalf("reply %q", got)
	}
	if got, want := string(e.bs[0].records()[0].data), stuff(lines...); got != want {
		t.Errorf("backend got %q, want %q", got, want)
	}
	// Bare LF line ends reach the backend as CRLF.
	e.transaction("s@example.net", "alice@example.org")
	e.c.Send("DATA")
	e.c.ExpectPrefix("354 ")
	e.c.Write("a\nb\r\n..c\n.\r\n")
	e.c.Expect(saved("alice@example.org"))
	recs := e.bs[0].records()
	if len(recs) != 1 {
		t.Fatalf("%d backend connections for two transactions, want 1", len(recs))
	}
	if got, want := string(recs[0].data), "a\r\nb\r\n..c\r\n"; got != want {
		t.Errorf("backend got %q, want %q", got, want)
	}
}

func TestLargeMessageSpool(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var seen [][]fs.FileInfo // spool files seen by each backend when the message arrived
	onData := func() {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Error(err)
		}
		var infos []fs.FileInfo
		for _, de := range entries {
			if fi, err := de.Info(); err == nil {
				infos = append(infos, fi)
			}
		}
		mu.Lock()
		seen = append(seen, infos)
		mu.Unlock()
	}
	e := setup(t, 3, func(i int, b *fakeBackend) { b.onData = onData },
		func(o *Options) { o.SpoolDir = dir; o.MaxMessageSize = 8 << 20 }, sessionOpts{})
	lhlo(e.h)

	// A small message stays in memory.
	e.transaction("s@example.net", "alice@example.org")
	e.data(1, "small")
	mu.Lock()
	if len(seen) != 1 || len(seen[0]) != 0 {
		t.Errorf("spool files for a small message: %v", seen)
	}
	seen = nil
	mu.Unlock()

	var lines []string
	size := 0
	for i := 0; size < 5<<20; i++ {
		l := fmt.Sprintf("line %07d %s", i, strings.Repeat("z", 60))
		if i%100 == 0 {
			l = "." + l
		}
		lines = append(lines, l)
		size += len(l) + 2
	}
	e.transaction("s@example.net", "alice@example.org", "bob@example.org", "carol@example.org")
	got := e.data(3, lines...)
	for _, r := range got {
		if !strings.HasPrefix(r, "250 2.0.0 ") {
			t.Errorf("reply %q", r)
		}
	}
	want := stuff(lines...)
	for i, b := range e.bs {
		recs := b.records()
		if d := recs[len(recs)-1].data; string(d) != want {
			t.Errorf("backend %d got %d bytes, want %d identical bytes", i, len(d), len(want))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 {
		t.Fatalf("onData ran %d times", len(seen))
	}
	for _, infos := range seen {
		if len(infos) != 1 {
			t.Fatalf("spool files during delivery: %d, want 1", len(infos))
		}
		fi := infos[0]
		if ok, _ := filepath.Match(spoolPattern, fi.Name()); !ok {
			t.Errorf("spool file name %q", fi.Name())
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("spool file mode %v", fi.Mode())
		}
		// The spool holds the message without dot-stuffing.
		if n := len(plain(lines...)); fi.Size() != int64(n) {
			t.Errorf("spool file size %d, want %d", fi.Size(), n)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("spool files left after the transaction: %v", entries)
	}
}

func TestXCLIENT(t *testing.T) {
	cases := []struct {
		name    string
		xclient string
		want    func(port string) string // "" for no XCLIENT
	}{
		{"with SESSION", "ADDR PORT PROTO HELO LOGIN TTL TIMEOUT SESSION", func(port string) string {
			return "XCLIENT HELO=client.example TTL=4 PORT=" + port + " SESSION=sid1 ADDR=127.0.0.1"
		}},
		{"dovecot 2.3", "ADDR PORT PROTO HELO LOGIN TTL TIMEOUT", func(port string) string {
			return "XCLIENT HELO=client.example TTL=4 PORT=" + port + " ADDR=127.0.0.1"
		}},
		{"not advertised", "", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := setup(t, 1, func(i int, b *fakeBackend) { b.xclient = tc.xclient }, nil, sessionOpts{})
			lhlo(e.h)
			// Two transactions on one connection: XCLIENT once.
			for range 2 {
				e.transaction("s@example.net", "alice@example.org")
				if got := e.data(1, "hi"); got[0] != saved("alice@example.org") {
					t.Fatalf("reply %q", got)
				}
			}
			e.c.Send("QUIT")
			e.c.Expect("221 2.0.0 usher.test closing connection")
			e.h.Wait()
			testutil.WaitFor(t, testTimeout, "QUIT", func() bool { return slices.Contains(e.bs[0].records()[0].cmds, "QUIT") })
			if n := len(e.bs[0].records()); n != 1 {
				t.Errorf("%d backend connections, want 1", n)
			}
			cmds := e.bs[0].records()[0].cmds
			var want []string
			if tc.want != nil {
				port := strconv.Itoa(int(e.h.Sess.Remote.Port()))
				want = []string{"LHLO usher.test", tc.want(port), "LHLO usher.test"}
			} else {
				want = []string{"LHLO usher.test"}
			}
			for range 2 {
				want = append(want, "MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>", "DATA")
			}
			want = append(want, "QUIT")
			if !slices.Equal(cmds, want) {
				t.Errorf("backend commands\n%q, want\n%q", cmds, want)
			}
		})
	}
}

func TestBackendSTARTTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, pool := pki.Server, pki.Pool
	e := setup(t, 2, func(i int, b *fakeBackend) {
		if i == 0 {
			b.tls = srvTLS
			b.xclient = "ADDR PORT HELO TTL"
		}
	}, func(o *Options) {
		o.Backend.TLS = config.TLSStartTLS
		o.Backend.TLSConfig = &tls.Config{RootCAs: pool}
	}, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	// Backend 1 does not offer STARTTLS: never deliver in plaintext.
	e.c.Send("RCPT TO:<bob@example.org>")
	if got := e.c.Line(); !strings.HasPrefix(got, "451 4.4.0 Backend delivery failed (STARTTLS)") {
		t.Errorf("backend without STARTTLS: %q", got)
	}
	if got := e.data(1, "secret"); got[0] != saved("alice@example.org") {
		t.Errorf("TLS backend: %q", got[0])
	}
	e.c.Send("QUIT")
	e.c.ExpectPrefix("221 ")
	testutil.WaitFor(t, testTimeout, "QUIT", func() bool { return slices.Contains(e.bs[0].records()[0].cmds, "+TLS QUIT") })
	cmds := e.bs[0].records()[0].cmds
	if len(cmds) < 4 || cmds[0] != "LHLO usher.test" || cmds[1] != "STARTTLS" || cmds[2] != "+TLS LHLO usher.test" ||
		!strings.HasPrefix(cmds[3], "+TLS XCLIENT HELO=client.example TTL=4 PORT=") {
		t.Errorf("backend commands %q", cmds)
	}
	for _, c := range cmds[2:] {
		if !strings.HasPrefix(c, "+TLS ") {
			t.Errorf("command %q after STARTTLS sent in plaintext", c)
		}
	}
	if string(e.bs[1].records()[0].data) != "" {
		t.Error("message sent to the plaintext backend")
	}
}

func TestClientSTARTTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	srvTLS, pool := pki.Server, pki.Pool
	so := sessionOpts{mode: config.TLSStartTLS, tls: srvTLS}

	t.Run("upgrade", func(t *testing.T) {
		e := setup(t, 1, nil, nil, so)
		if ext := lhlo(e.h); !hasExt(ext, "STARTTLS") {
			t.Fatalf("STARTTLS not offered: %q", ext)
		}
		e.transaction("s@example.net", "alice@example.org")
		e.c.Send("STARTTLS")
		e.c.Expect("220 2.0.0 Ready to start TLS")
		e.c.StartTLS(pool)
		if e.d.Held() != 0 {
			t.Error("STARTTLS did not end the transaction")
		}
		// RFC 3207 section 4.2: LHLO again.
		e.c.Send("MAIL FROM:<s@example.net>")
		e.c.Expect("503 5.5.1 Send LHLO first")
		if ext := lhlo(e.h); hasExt(ext, "STARTTLS") {
			t.Errorf("STARTTLS offered after TLS: %q", ext)
		}
		e.c.Send("STARTTLS")
		e.c.Expect("503 5.5.1 TLS already active")
		e.transaction("s@example.net", "alice@example.org")
		if got := e.data(1, "over tls"); got[0] != saved("alice@example.org") {
			t.Errorf("reply %q", got)
		}
		if !e.h.Sess.Secure {
			t.Error("session not marked secure")
		}
	})
	t.Run("injection", func(t *testing.T) {
		e := setup(t, 1, nil, nil, so)
		lhlo(e.h)
		e.c.Write("STARTTLS\r\nMAIL FROM:<evil@example.net>\r\n")
		e.c.Expect("554 5.5.1 STARTTLS must be the last command in a pipelined group")
		e.c.ExpectClosed()
		if r := e.h.Wait(); r != reasonTLSInject {
			t.Errorf("reason %q", r)
		}
	})
	t.Run("not offered", func(t *testing.T) {
		e := setup(t, 1, nil, nil, sessionOpts{})
		if ext := lhlo(e.h); hasExt(ext, "STARTTLS") {
			t.Errorf("STARTTLS offered without TLS: %q", ext)
		}
		e.c.Send("STARTTLS")
		e.c.Expect("502 5.5.1 STARTTLS not available")
	})
}

func TestLeasesReleased(t *testing.T) {
	t.Run("held during delivery", func(t *testing.T) {
		var during []int
		var mu sync.Mutex
		var d *proxytest.Director
		e := setup(t, 2, func(i int, b *fakeBackend) {
			b.onData = func() {
				mu.Lock()
				during = append(during, d.Held())
				mu.Unlock()
			}
		}, nil, sessionOpts{})
		mu.Lock()
		d = e.d
		mu.Unlock()
		lhlo(e.h)
		e.transaction("s@example.net", "alice@example.org", "bob@example.org")
		e.data(2, "x")
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(during, []int{2, 2}) {
			t.Errorf("leases held during delivery: %v, want [2 2]", during)
		}
		if e.d.Held() != 0 || e.d.Acquired() != 2 {
			t.Errorf("acquired %d, released %d", e.d.Acquired(), e.d.Released())
		}
	})
	t.Run("kicked during delivery", func(t *testing.T) {
		// A lease's Done closing (the user is moved or kicked) does not
		// stop a delivery under way: the move waits for it.
		kick := make(chan struct{})
		var once sync.Once
		e := setup(t, 1, func(i int, b *fakeBackend) {
			b.onData = func() { once.Do(func() { close(kick) }) }
		}, nil, sessionOpts{})
		e.d.SetDone(kick)
		lhlo(e.h)
		e.transaction("s@example.net", "alice@example.org", "dave@example.org")
		if got := e.data(2, "x"); got[0] != saved("alice@example.org") || got[1] != saved("dave@example.org") {
			t.Errorf("replies %q", got)
		}
		if e.d.Held() != 0 {
			t.Errorf("%d leases held", e.d.Held())
		}
		e.c.Send("NOOP")
		e.c.Expect("250 2.0.0 OK")
	})
	ends := []struct {
		name string
		end  func(e *env)
	}{
		{"RSET", func(e *env) { e.c.Send("RSET"); e.c.Expect("250 2.0.0 Reset OK") }},
		{"LHLO", func(e *env) { lhlo(e.h) }},
		{"QUIT", func(e *env) { e.c.Send("QUIT"); e.c.ExpectPrefix("221 "); e.h.Wait() }},
		{"disconnect", func(e *env) { e.c.Conn.Close(); e.h.Wait() }},
		{"shutdown", func(e *env) {
			e.h.Cancel()
			e.c.Expect("421 4.3.2 usher.test Server shutting down")
			if r := e.h.Wait(); r != "shutdown" {
				e.t.Errorf("reason %q", r)
			}
		}},
	}
	for _, tc := range ends {
		t.Run(tc.name, func(t *testing.T) {
			e := setup(t, 2, nil, nil, sessionOpts{})
			lhlo(e.h)
			e.transaction("s@example.net", "alice@example.org", "bob@example.org")
			if e.d.Held() != 2 {
				t.Fatalf("%d leases held", e.d.Held())
			}
			tc.end(e)
			testutil.WaitFor(t, testTimeout, "leases released", func() bool { return e.d.Held() == 0 })
			if e.d.Released() != 2 {
				t.Errorf("released %d", e.d.Released())
			}
		})
	}
}

func TestBDAT(t *testing.T) {
	e := setup(t, 3, nil, func(o *Options) { o.MaxMessageSize = 1000 }, sessionOpts{})
	e.d.FailUser("bob@example.org", proxy.ErrUnavailable)
	if ext := lhlo(e.h); !hasExt(ext, "CHUNKING") {
		t.Fatalf("CHUNKING not advertised: %q", ext)
	}
	e.transaction("s@example.net", "alice@example.org", "carol@example.org")
	// Chunk boundaries split a CRLF and precede a dot; bare LF and a
	// missing final line end are repaired.
	chunk1 := "Subject: x\r\n.dot\r"
	chunk2 := "\n.after split\nbare lf\r\nno final newline"
	e.c.Write(fmt.Sprintf("BDAT %d\r\n%s", len(chunk1), chunk1))
	e.c.Expect(fmt.Sprintf("250 2.0.0 %d octets received", len(chunk1)))
	e.c.Write(fmt.Sprintf("BDAT %d LAST\r\n%s", len(chunk2), chunk2))
	e.c.Expect(saved("alice@example.org"))
	e.c.Expect(saved("carol@example.org"))
	want := "Subject: x\r\n..dot\r\n..after split\r\nbare lf\r\nno final newline\r\n"
	for _, i := range []int{0, 2} {
		if got := string(e.bs[i].records()[0].data); got != want {
			t.Errorf("backend %d got %q, want %q", i, got, want)
		}
	}

	// DATA after BDAT is a bad sequence.
	e.transaction("s@example.net", "alice@example.org")
	e.c.Write("BDAT 2\r\nhi")
	e.c.Expect("250 2.0.0 2 octets received")
	e.c.Send("DATA")
	e.c.Expect("503 5.5.1 Bad sequence of commands")
	e.c.Send("RSET")
	e.c.Expect("250 2.0.0 Reset OK")

	// Too big: the chunk is consumed, the transaction fails until RSET.
	e.transaction("s@example.net", "alice@example.org")
	e.c.Write("BDAT 1001\r\n" + strings.Repeat("x", 1001))
	e.c.Expect("552 5.3.4 Message size exceeds fixed maximum message size")
	e.c.Write("BDAT 3 LAST\r\nabc")
	e.c.Expect("503 5.5.1 Previous data chunk failed, issue RSET first")
	e.c.Send("RSET")
	e.c.Expect("250 2.0.0 Reset OK")

	// BDAT LAST without a successful RCPT has no replies at all.
	e.c.Send("MAIL FROM:<s@example.net>", "RCPT TO:<bob@example.org>")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Expect("451 4.4.0 No backend available, try again later")
	e.c.Write("BDAT 5 LAST\r\nhello")
	e.c.Send("NOOP")
	e.c.Expect("250 2.0.0 OK")
	if e.d.Held() != 0 {
		t.Errorf("%d leases held", e.d.Held())
	}

	// A malformed BDAT cannot be skipped: 501 and close.
	e.c.Send("BDAT many")
	e.c.Expect("501 5.5.4 Syntax: BDAT size [LAST]")
	e.c.ExpectClosed()
}

func TestTimeouts(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		e := setup(t, 1, nil, func(o *Options) { o.IdleTimeout = 200 * time.Millisecond }, sessionOpts{})
		e.c.Expect("421 4.4.2 usher.test Timeout exceeded, closing connection")
		e.c.ExpectClosed()
		if r := e.h.Wait(); r != "idle timeout" {
			t.Errorf("reason %q", r)
		}
	})
	t.Run("data", func(t *testing.T) {
		e := setup(t, 1, nil, func(o *Options) { o.DataTimeout = 200 * time.Millisecond }, sessionOpts{})
		lhlo(e.h)
		e.transaction("s@example.net", "alice@example.org")
		e.c.Send("DATA")
		e.c.ExpectPrefix("354 ")
		e.c.Write("partial line")
		e.c.Expect("421 4.4.2 usher.test Timeout exceeded, closing connection")
		e.h.Wait()
		if e.d.Held() != 0 {
			t.Error("lease held after the timeout")
		}
		for _, rec := range e.bs[0].records() {
			if len(rec.data) != 0 {
				t.Errorf("incomplete message delivered: %q", rec.data)
			}
		}
		testutil.WaitFor(t, testTimeout, "backend connection closed", func() bool { return e.bs[0].live() == 0 })
	})
}

// A shutdown ends a session waiting in the middle of a message at once,
// although the per-read deadline is the data timeout.
func TestShutdownDuringData(t *testing.T) {
	e := setup(t, 1, func(i int, b *fakeBackend) { b.ext = append(b.ext, "CHUNKING") }, nil, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	e.c.Send("DATA")
	e.c.ExpectPrefix("354 ")
	e.c.Write("first line\r\npartial")
	time.Sleep(50 * time.Millisecond) // the session waits for the rest
	start := time.Now()
	e.h.Cancel()
	e.c.Expect("421 4.3.2 usher.test Server shutting down")
	if r := e.h.Wait(); r != "shutdown" {
		t.Errorf("reason %q", r)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	if n := len(e.bs[0].delivered()); n != 0 {
		t.Errorf("%d messages delivered", n)
	}
	if e.d.Held() != 0 {
		t.Error("lease held after the shutdown")
	}
}

func TestDefaults(t *testing.T) {
	s := New(Options{Hostname: "bad host\r\n"})
	if s.o.Backend.Port != 24 || s.o.IdleTimeout != 5*time.Minute || s.o.DataTimeout != 10*time.Minute ||
		s.o.MaxMessageSize != 64<<20 || s.o.MaxRecipients != 1000 {
		t.Errorf("defaults %+v", s.o)
	}
	if s.o.Hostname != "bad" {
		t.Errorf("hostname %q", s.o.Hostname)
	}
	if h := New(Options{}).o.Hostname; h == "" || strings.ContainsAny(h, " \r\n") {
		t.Errorf("default hostname %q", h)
	}
}

func TestMaxRecipients(t *testing.T) {
	e := setup(t, 1, nil, func(o *Options) { o.MaxRecipients = 2 }, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org", "dave@example.org")
	e.c.Send("RCPT TO:<alice@example.org>")
	e.c.Expect("452 4.5.3 Too many recipients")
	if got := e.data(2, "x"); got[1] != saved("dave@example.org") {
		t.Errorf("replies %q", got)
	}
}
