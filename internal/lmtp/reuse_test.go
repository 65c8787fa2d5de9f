package lmtp

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/testutil"
)

// Tests of backend connection reuse (link.go) and of the envelope sent at
// RCPT time (deliver.go).

// cmdsOf returns the commands of a backend's connection i.
func cmdsOf(b *fakeBackend, i int) []string {
	recs := b.records()
	if i >= len(recs) {
		return nil
	}
	return recs[i].cmds
}

// waitQuit waits until backend connection i got QUIT.
func waitQuit(t *testing.T, b *fakeBackend, i int) {
	t.Helper()
	testutil.WaitFor(t, testTimeout, "QUIT on backend connection "+strconv.Itoa(i), func() bool {
		return slices.Contains(cmdsOf(b, i), "QUIT")
	})
}

func TestBackendConnectionReuse(t *testing.T) {
	e := setup(t, 3, func(i int, b *fakeBackend) {
		if i == 0 {
			b.xclient = "ADDR PORT HELO TTL"
		}
	}, nil, sessionOpts{})
	lhlo(e.h)
	txns := [][]string{
		{"alice@example.org", "bob@example.org"},
		{"dave@example.org", "bob@example.org"},
		{"alice@example.org"},
	}
	for n, rcpts := range txns {
		e.transaction("s@example.net", rcpts...)
		got := e.data(len(rcpts), "message "+strconv.Itoa(n))
		for i, r := range rcpts {
			if got[i] != saved(r) {
				t.Fatalf("transaction %d: reply %q for %s", n, got[i], r)
			}
		}
	}
	// One connection per backend for all three transactions; XCLIENT and
	// LHLO once; no QUIT while the session goes on.
	for i, want := range []int{1, 1, 0} {
		if n := len(e.bs[i].records()); n != want {
			t.Errorf("backend %d: %d connections, want %d", i, n, want)
		}
	}
	cmds := cmdsOf(e.bs[0], 0)
	if len(cmds) < 3 || cmds[0] != "LHLO usher.test" || !strings.HasPrefix(cmds[1], "XCLIENT ") || cmds[2] != "LHLO usher.test" {
		t.Fatalf("backend 0 handshake %q", cmds)
	}
	want := []string{
		"MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>", "DATA",
		"MAIL FROM:<s@example.net>", "RCPT TO:<dave@example.org>", "DATA",
		"MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>", "DATA",
	}
	if !slices.Equal(cmds[3:], want) {
		t.Errorf("backend 0 commands after the handshake\n%q, want\n%q", cmds[3:], want)
	}
	msgs := e.bs[0].delivered()
	if len(msgs) != 3 || string(msgs[0]) != "message 0\r\n" || string(msgs[1]) != "message 1\r\n" || string(msgs[2]) != "message 2\r\n" {
		t.Errorf("backend 0 got messages %q", msgs)
	}
	if n := len(e.bs[1].delivered()); n != 2 {
		t.Errorf("backend 1 got %d messages, want 2", n)
	}

	// A new LHLO ends the cached connections (XCLIENT carries the old
	// LHLO name); the next transaction opens a new one.
	lhlo(e.h)
	waitQuit(t, e.bs[0], 0)
	waitQuit(t, e.bs[1], 0)
	e.transaction("s@example.net", "alice@example.org")
	if got := e.data(1, "after LHLO"); got[0] != saved("alice@example.org") {
		t.Fatalf("reply %q", got)
	}
	if n := len(e.bs[0].records()); n != 2 {
		t.Errorf("backend 0: %d connections after LHLO, want 2", n)
	}
	e.c.Send("QUIT")
	e.c.Expect("221 2.0.0 usher.test closing connection")
	e.h.Wait()
	waitQuit(t, e.bs[0], 1)
	testutil.WaitFor(t, testTimeout, "backend connections closed", func() bool { return e.bs[0].live()+e.bs[1].live() == 0 })
}

// A cached connection the backend closed while it was idle (Dovecot's idle
// timeout says 421 and closes) is replaced before the message is sent: the
// client sees nothing of it and the message is delivered exactly once.
func TestCachedConnectionClosedByBackend(t *testing.T) {
	for _, tc := range []struct {
		name       string
		pipelining bool
		chunking   bool
		kick       string
	}{
		{"421 pipelining", true, false, "421 4.4.2 fake Disconnected client for inactivity"},
		{"close pipelining", true, false, ""},
		{"421 one by one", false, false, "421 4.4.2 fake Disconnected client for inactivity"},
		{"close one by one", false, false, ""},
		{"421 chunking", true, true, "421 4.4.2 fake Disconnected client for inactivity"},
		{"close chunking", true, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := setup(t, 1, func(i int, b *fakeBackend) {
				if !tc.pipelining {
					b.ext = []string{"ENHANCEDSTATUSCODES"}
				}
				if tc.chunking {
					b.ext = append(b.ext, "CHUNKING")
				}
			}, nil, sessionOpts{})
			lhlo(e.h)
			e.transaction("s@example.net", "alice@example.org")
			if got := e.data(1, "first"); got[0] != saved("alice@example.org") {
				t.Fatalf("first transaction: %q", got)
			}
			b := e.bs[0]
			b.kick(tc.kick)
			testutil.WaitFor(t, testTimeout, "backend connection closed", func() bool { return b.live() == 0 })

			e.transaction("s@example.net", "alice@example.org", "dave@example.org")
			got := e.data(2, "second")
			if got[0] != saved("alice@example.org") || got[1] != saved("dave@example.org") {
				t.Fatalf("second transaction: %q", got)
			}
			msgs := b.delivered()
			if len(msgs) != 2 || string(msgs[0]) != "first\r\n" || string(msgs[1]) != "second\r\n" {
				t.Errorf("backend got messages %q, want each once", msgs)
			}
			recs := b.records()
			if len(recs) != 2 {
				t.Fatalf("%d backend connections, want 2", len(recs))
			}
			want := []string{"LHLO usher.test", "MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>",
				"RCPT TO:<dave@example.org>", "DATA"}
			if tc.chunking {
				want[4] = "BDAT 8 LAST"
			}
			if !slices.Equal(recs[1].cmds, want) {
				t.Errorf("new connection's commands %q, want %q", recs[1].cmds, want)
			}
			if !strings.Contains(e.h.Logs.String(), "backend connection lost, retrying on a new one") {
				t.Errorf("no log line for the retry:\n%s", e.h.Logs.String())
			}
			if h := e.d.Held(); h != 0 {
				t.Errorf("%d leases held", h)
			}
		})
	}
}

// When the replacement cannot be made either, the recipient gets a
// temporary failure at RCPT; nothing hangs.
func TestCachedConnectionBackendGone(t *testing.T) {
	e := setup(t, 1, nil, nil, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	if got := e.data(1, "first"); got[0] != saved("alice@example.org") {
		t.Fatalf("first transaction: %q", got)
	}
	b := e.bs[0]
	b.ln.Close()
	b.kick("")
	testutil.WaitFor(t, testTimeout, "backend connection closed", func() bool { return b.live() == 0 })
	e.c.Send("MAIL FROM:<s@example.net>")
	e.c.Expect("250 2.1.0 Sender OK")
	e.c.Send("RCPT TO:<alice@example.org>")
	if got := e.c.Line(); !strings.HasPrefix(got, "451 4.4.0 Backend delivery failed (connect") {
		t.Errorf("RCPT reply %q", got)
	}
	e.c.Send("DATA")
	e.c.Expect("503 5.5.1 No valid recipients")
	if h := e.d.Held(); h != 0 {
		t.Errorf("%d leases held", h)
	}
	if n := len(b.delivered()); n != 1 {
		t.Errorf("%d messages delivered, want 1", n)
	}
}

// A reused connection that fails after the message began is not retried:
// the backend may have the message. The recipient gets 451, the MTA
// retries later.
func TestCachedConnectionFailsDuringMessage(t *testing.T) {
	e := setup(t, 2, nil, nil, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org", "bob@example.org")
	if got := e.data(2, "first"); got[0] != saved("alice@example.org") || got[1] != saved("bob@example.org") {
		t.Fatalf("first transaction: %q", got)
	}
	e.bs[1].setFailData()
	e.transaction("s@example.net", "alice@example.org", "bob@example.org")
	got := e.data(2, "second", "more")
	if got[0] != saved("alice@example.org") {
		t.Errorf("working backend: %q", got[0])
	}
	if !strings.HasPrefix(got[1], "451 4.4.0 Backend delivery failed (") {
		t.Errorf("failing backend: %q", got[1])
	}
	if n := len(e.bs[1].records()); n != 1 {
		t.Errorf("failing backend: %d connections, want 1 (no retry after the message began)", n)
	}
	if n := len(e.bs[1].delivered()); n != 1 {
		t.Errorf("failing backend: %d messages, want 1", n)
	}
	if n := len(e.bs[0].records()); n != 1 {
		t.Errorf("working backend: %d connections, want 1", n)
	}
}

func TestLinkIdleAndMaxTransactions(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		e := setupServer(t, 1, nil, nil, func(s *Server) { s.linkIdle = 50 * time.Millisecond }, sessionOpts{})
		lhlo(e.h)
		e.transaction("s@example.net", "alice@example.org")
		e.data(1, "x")
		// usher ends the unused connection with QUIT.
		waitQuit(t, e.bs[0], 0)
		testutil.WaitFor(t, testTimeout, "backend connection closed", func() bool { return e.bs[0].live() == 0 })
		e.transaction("s@example.net", "alice@example.org")
		if got := e.data(1, "y"); got[0] != saved("alice@example.org") {
			t.Errorf("reply %q", got)
		}
		if n := len(e.bs[0].records()); n != 2 {
			t.Errorf("%d connections, want 2", n)
		}
		if strings.Contains(e.h.Logs.String(), "retrying") {
			t.Errorf("a retry after an idle close by usher:\n%s", e.h.Logs.String())
		}
	})
	t.Run("max transactions", func(t *testing.T) {
		e := setupServer(t, 1, nil, nil, func(s *Server) { s.linkMaxTxns = 2 }, sessionOpts{})
		lhlo(e.h)
		for i := range 5 {
			e.transaction("s@example.net", "alice@example.org")
			if got := e.data(1, "x"); got[0] != saved("alice@example.org") {
				t.Fatalf("transaction %d: %q", i, got)
			}
		}
		recs := e.bs[0].records()
		if len(recs) != 3 {
			t.Fatalf("%d connections for 5 transactions with at most 2 each, want 3", len(recs))
		}
		waitQuit(t, e.bs[0], 0)
		if n := len(e.bs[0].delivered()); n != 5 {
			t.Errorf("%d messages, want 5", n)
		}
	})
}

// After DATA the backend waits for the message; when the client takes
// longer than dataWaitMax, usher replays the envelope on a new connection
// rather than risk the backend's idle timeout, and delivers once.
func TestSlowMessageReplayed(t *testing.T) {
	e := setupServer(t, 1, nil, nil, func(s *Server) { s.dataWaitMax = 50 * time.Millisecond }, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org", "dave@example.org")
	e.c.Send("DATA")
	e.c.ExpectPrefix("354 ")
	time.Sleep(150 * time.Millisecond)
	e.c.Write("slow\r\n.\r\n")
	e.c.Expect(saved("alice@example.org"))
	e.c.Expect(saved("dave@example.org"))
	recs := e.bs[0].records()
	if len(recs) != 2 {
		t.Fatalf("%d connections, want 2", len(recs))
	}
	if !slices.Contains(recs[0].cmds, "DATA") || len(recs[0].data) != 0 {
		t.Errorf("first connection: commands %q, message %q; want DATA and no message", recs[0].cmds, recs[0].data)
	}
	if msgs := e.bs[0].delivered(); len(msgs) != 1 || string(msgs[0]) != "slow\r\n" {
		t.Errorf("messages %q", msgs)
	}
	if rcpts := rcptsOf(recs[1]); len(rcpts) != 2 {
		t.Errorf("replayed RCPTs %q", rcpts)
	}
}

// With PIPELINING the client's whole group goes to the backends before
// usher waits for them, and the RCPT replies come in order, each the
// backend's verdict.
func TestRcptRelayedPipelined(t *testing.T) {
	e := setup(t, 3, func(i int, b *fakeBackend) {
		if i == 1 {
			b.rcptReply = map[string]string{"bob@example.org": "550 5.1.1 <bob@example.org> User unknown"}
		}
	}, nil, sessionOpts{})
	lhlo(e.h)
	e.c.Write("MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n" +
		"RCPT TO:<x y>\r\nRCPT TO:<carol@example.org>\r\nRCPT TO:<dave@example.org>\r\nDATA\r\n")
	for _, want := range []string{
		"250 2.1.0 Sender OK",
		"250 2.1.5 Recipient OK",
		"550 5.1.1 <bob@example.org> User unknown",
		"501 5.1.3 Bad recipient address syntax",
		"250 2.1.5 Recipient OK",
		"250 2.1.5 Recipient OK",
	} {
		e.c.Expect(want)
	}
	e.c.ExpectPrefix("354 ")
	e.c.Write("hi\r\n.\r\nNOOP\r\n")
	for _, want := range []string{saved("alice@example.org"), saved("carol@example.org"), saved("dave@example.org"), "250 2.0.0 OK"} {
		e.c.Expect(want)
	}
	if got, want := rcptsOf(e.bs[0].records()[0]), []string{"RCPT TO:<alice@example.org>", "RCPT TO:<dave@example.org>"}; !slices.Equal(got, want) {
		t.Errorf("backend 0 RCPTs %q, want %q", got, want)
	}
	if slices.Contains(cmdsOf(e.bs[1], 0), "DATA") {
		t.Errorf("DATA sent to the backend that refused its only recipient: %q", cmdsOf(e.bs[1], 0))
	}
	if a, r := e.d.Acquired(), e.d.Released(); a != 4 || r != 4 {
		t.Errorf("leases acquired %d, released %d; want 4, 4", a, r)
	}
}

// A transaction left open on a backend (every recipient refused there, or
// the client's RSET) is ended with RSET, pipelined before the next MAIL on
// the same connection.
func TestCachedConnectionRSET(t *testing.T) {
	e := setup(t, 2, func(i int, b *fakeBackend) {
		if i == 1 {
			b.rcptReply = map[string]string{"bob@example.org": "550 5.1.1 <bob@example.org> User unknown"}
		}
	}, nil, sessionOpts{})
	e.d.Route("erin@example.org", e.bs[1].ip)
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	e.c.Send("RCPT TO:<bob@example.org>")
	e.c.Expect("550 5.1.1 <bob@example.org> User unknown")
	e.data(1, "x")
	e.transaction("s@example.net", "erin@example.org")
	if got := e.data(1, "y"); got[0] != saved("erin@example.org") {
		t.Fatalf("reply %q", got)
	}
	want := []string{"LHLO usher.test", "MAIL FROM:<s@example.net>", "RCPT TO:<bob@example.org>",
		"RSET", "MAIL FROM:<s@example.net>", "RCPT TO:<erin@example.org>", "DATA"}
	if got := cmdsOf(e.bs[1], 0); !slices.Equal(got, want) {
		t.Errorf("backend 1 commands\n%q, want\n%q", got, want)
	}

	// The client's RSET after an RCPT leaves MAIL open on backend 0.
	e.transaction("s@example.net", "alice@example.org")
	e.c.Send("RSET")
	e.c.Expect("250 2.0.0 Reset OK")
	e.transaction("s@example.net", "alice@example.org")
	if got := e.data(1, "z"); got[0] != saved("alice@example.org") {
		t.Fatalf("reply %q", got)
	}
	cmds := cmdsOf(e.bs[0], 0)
	if n := len(cmds); n < 4 || !slices.Equal(cmds[n-4:], []string{"RSET", "MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>", "DATA"}) {
		t.Errorf("backend 0 commands %q", cmds)
	}
	if n := len(e.bs[0].records()) + len(e.bs[1].records()); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

// A backend with CHUNKING (RFC 3030) gets the message with one
// "BDAT <size> LAST", not dot-stuffed, and no DATA; one without gets DATA
// and the dot-stuffed message. Whether the client used DATA or BDAT, every
// backend stores the same message.
func TestBackendCHUNKING(t *testing.T) {
	e := setup(t, 3, func(i int, b *fakeBackend) {
		if i != 1 {
			b.ext = append(b.ext, "CHUNKING")
		}
		if i == 0 {
			b.dataReply = map[string]string{"dave@example.org": "452 4.2.2 <dave@example.org> Mailbox full"}
		}
	}, nil, sessionOpts{})
	lhlo(e.h)
	rcpts := []string{"alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org"}
	e.transaction("s@example.net", rcpts...)
	got := e.data(4, testMessage...)
	want := []string{saved(rcpts[0]), saved(rcpts[1]), saved(rcpts[2]), "452 4.2.2 <dave@example.org> Mailbox full"}
	if !slices.Equal(got, want) {
		t.Fatalf("replies %q, want %q", got, want)
	}
	msg := plain(testMessage...)
	for i, b := range e.bs {
		if m := b.delivered(); len(m) != 1 || string(m[0]) != msg {
			t.Errorf("backend %d stored %q, want %q", i, m, msg)
		}
	}
	bdat := "BDAT " + strconv.Itoa(len(msg)) + " LAST"
	if got, want := cmdsOf(e.bs[0], 0), []string{"LHLO usher.test", "MAIL FROM:<s@example.net>",
		"RCPT TO:<alice@example.org>", "RCPT TO:<dave@example.org>", bdat}; !slices.Equal(got, want) {
		t.Errorf("CHUNKING backend commands\n%q, want\n%q", got, want)
	}
	if got := cmdsOf(e.bs[1], 0); !slices.Contains(got, "DATA") || string(e.bs[1].records()[0].data) != stuff(testMessage...) {
		t.Errorf("backend without CHUNKING: commands %q, data %q", got, e.bs[1].records()[0].data)
	}

	// The client's BDAT, with a bare LF and no final line end.
	e.transaction("s@example.net", "alice@example.org", "bob@example.org")
	chunk := ".dot\nlast"
	e.c.Write("BDAT " + strconv.Itoa(len(chunk)) + " LAST\r\n" + chunk)
	e.c.Expect(saved("alice@example.org"))
	e.c.Expect(saved("bob@example.org"))
	for i := range 2 {
		if m := e.bs[i].delivered(); len(m) != 2 || string(m[1]) != ".dot\r\nlast\r\n" {
			t.Errorf("backend %d stored %q", i, m)
		}
	}
	if n := len(e.bs[0].records()) + len(e.bs[1].records()); n != 2 {
		t.Errorf("%d connections to backends 0 and 1, want 2", n)
	}
}

// With CHUNKING nothing is sent between the RCPTs and the message; a
// connection that sat idle longer than dataWaitMax meanwhile is replaced
// (and the envelope replayed) before the message goes out.
func TestCHUNKINGSlowMessageReplayed(t *testing.T) {
	e := setupServer(t, 1, func(i int, b *fakeBackend) { b.ext = append(b.ext, "CHUNKING") }, nil,
		func(s *Server) { s.dataWaitMax = 50 * time.Millisecond }, sessionOpts{})
	lhlo(e.h)
	e.transaction("s@example.net", "alice@example.org")
	time.Sleep(150 * time.Millisecond)
	if got := e.data(1, "late"); got[0] != saved("alice@example.org") {
		t.Fatalf("reply %q", got)
	}
	recs := e.bs[0].records()
	if len(recs) != 2 {
		t.Fatalf("%d connections, want 2", len(recs))
	}
	if want := []string{"LHLO usher.test", "MAIL FROM:<s@example.net>", "RCPT TO:<alice@example.org>"}; !slices.Equal(recs[0].cmds, want) {
		t.Errorf("first connection %q, want %q", recs[0].cmds, want)
	}
	if m := e.bs[0].delivered(); len(m) != 1 || string(m[0]) != "late\r\n" {
		t.Errorf("stored %q", m)
	}
}
