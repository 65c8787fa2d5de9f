package health

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/testutil"
)

func TestHealthyBackendStaysUp(t *testing.T) {
	srv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{}.serve(c) })
	h := start(t, fastOptions(imapService(srv.port)), localhost)
	testutil.WaitFor(t, 3*time.Second, "5 probes", func() bool { return srv.conns.Load() >= 5 })
	st, ok := h.c.Status(localhost)
	if !ok {
		t.Fatal("Status: backend unknown")
	}
	if !st.Healthy || !st.LastOK || st.LastError != "" || st.Checked.IsZero() || st.Latency <= 0 || st.Successes < 3 || st.Failures != 0 {
		t.Fatalf("status of a healthy backend: %+v", st)
	}
	if r := h.rec.reports(); len(r) != 0 {
		t.Fatalf("reports for a healthy backend: %+v", r)
	}
	if all := h.c.Statuses(); len(all) != 1 || !all[localhost].Healthy {
		t.Fatalf("Statuses = %+v", all)
	}
	if _, ok := h.c.Status(netip.MustParseAddr("127.0.0.9")); ok {
		t.Fatal("Status of an unknown backend reported ok")
	}
}

// TestFallAndRise: a failing backend is reported down after exactly Fall
// failed rounds and up after exactly Rise successful ones.
func TestFallAndRise(t *testing.T) {
	tests := []struct {
		name string
		bad  func(c net.Conn)
		want string // in the down cause
	}{
		{"bye", func(c net.Conn) { fakeIMAP{greeting: "* BYE maintenance"}.serve(c) }, `imap: unexpected answer: greeting "* BYE maintenance" (3 failures)`},
		{"close", func(c net.Conn) {}, "imap: read greeting: EOF (3 failures)"},
		{"silent", func(c net.Conn) { _, _ = c.Read(make([]byte, 1)) }, "imap: read greeting: timeout (3 failures)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var good atomic.Bool
			srv := newFake(t, nil, func(c net.Conn, _ int) {
				if good.Load() {
					fakeIMAP{}.serve(c)
				} else {
					tt.bad(c)
				}
			})
			o := fastOptions(imapService(srv.port))
			o.Timeout = 100 * time.Millisecond
			h := start(t, o, localhost)
			testutil.WaitFor(t, 5*time.Second, "down report", func() bool { return len(h.rec.reports()) >= 1 })
			ev := h.rec.snapshot()
			i := slices.IndexFunc(ev, func(e recEvent) bool { return e.report })
			if ev[i].up {
				t.Fatalf("first report is up: %+v", ev[i])
			}
			if i != o.Fall || slices.ContainsFunc(ev[:i], func(e recEvent) bool { return e.ok }) {
				t.Fatalf("down reported after %d probes (%+v), want exactly %d failed ones", i, ev[:i], o.Fall)
			}
			if ev[i].cause != tt.want {
				t.Fatalf("cause %q, want %q", ev[i].cause, tt.want)
			}
			if st, _ := h.c.Status(localhost); st.Healthy || st.LastOK || !strings.Contains(st.LastError, "imap: ") || st.Failures < o.Fall {
				t.Fatalf("status after down: %+v", st)
			}
			if !strings.Contains(h.logs.String(), "backend down") {
				t.Errorf("no log line for the state change:\n%s", h.logs)
			}

			good.Store(true)
			testutil.WaitFor(t, 5*time.Second, "up report", func() bool { return len(h.rec.reports()) >= 2 })
			ev = h.rec.snapshot()
			j := i + 1 + slices.IndexFunc(ev[i+1:], func(e recEvent) bool { return e.report })
			if !ev[j].up {
				t.Fatalf("second report is not up: %+v", ev[j])
			}
			okRun := 0
			for k := j - 1; k > i && ev[k].ok; k-- {
				okRun++
			}
			if okRun != o.Rise {
				t.Fatalf("up reported after %d successful probes, want %d", okRun, o.Rise)
			}
			if !strings.Contains(ev[j].cause, "imap ok (2 successes)") {
				t.Errorf("up cause %q", ev[j].cause)
			}
			if st, _ := h.c.Status(localhost); !st.Healthy {
				t.Fatalf("status after up: %+v", st)
			}
		})
	}
}

// TestRoundProbesEveryService: the round fails if any service fails, every
// service is observed, and the cause names the failing one.
func TestRoundProbesEveryService(t *testing.T) {
	imapSrv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{}.serve(c) })
	pop3Srv := newFake(t, nil, func(c net.Conn, _ int) { fakePOP3{greeting: "-ERR broken"}.serve(c) })
	o := fastOptions(imapService(imapSrv.port), pop3Service(pop3Srv.port))
	o.Fall = 1
	h := start(t, o, localhost)
	testutil.WaitFor(t, 3*time.Second, "down report", func() bool { return len(h.rec.reports()) >= 1 })
	r := h.rec.reports()[0]
	if r.up || r.cause != `pop3: unexpected answer: greeting "-ERR broken" (1 failures)` {
		t.Fatalf("report %+v", r)
	}
	ev := h.rec.snapshot()
	if len(ev) < 3 || ev[0].proto != ProtoIMAP || !ev[0].ok || ev[1].proto != ProtoPOP3 || ev[1].ok {
		t.Fatalf("observed %+v, want imap ok then pop3 failed", ev)
	}
	if !strings.Contains(h.logs.String(), "proto=pop3") {
		t.Errorf("log does not name the failing protocol:\n%s", h.logs)
	}
}

// TestLoginProbe: correct credentials keep the backend up, wrong ones take
// it down, and the password appears in no log line nor cause, even when the
// server echoes it.
func TestLoginProbe(t *testing.T) {
	const user, pass = "healthcheck", `Pa55"w\rd`
	newSrv := func() *fakeServer {
		return newFake(t, nil, func(c net.Conn, _ int) {
			fakeIMAP{login: func(line string) bool { return line == `a LOGIN "healthcheck" "Pa55\"w\\rd"` }}.serve(c)
		})
	}
	t.Run("correct", func(t *testing.T) {
		srv := newSrv()
		o := fastOptions(imapService(srv.port))
		o.LoginUser, o.LoginPassword = user, pass
		h := start(t, o, localhost)
		testutil.WaitFor(t, 3*time.Second, "4 rounds", func() bool { st, _ := h.c.Status(localhost); return st.Successes >= 4 })
		if r := h.rec.reports(); len(r) != 0 {
			t.Fatalf("reports: %+v", r)
		}
	})
	t.Run("wrong", func(t *testing.T) {
		srv := newSrv()
		wrong := `Wr0ng"pass\`
		o := fastOptions(imapService(srv.port))
		o.LoginUser, o.LoginPassword = user, wrong
		h := start(t, o, localhost)
		testutil.WaitFor(t, 3*time.Second, "down report", func() bool { return len(h.rec.reports()) >= 1 })
		h.stop()
		r := h.rec.reports()[0]
		if r.up || !strings.HasPrefix(r.cause, "imap: unexpected answer: login refused: ") {
			t.Fatalf("report %+v", r)
		}
		logs := h.logs.String()
		if !strings.Contains(logs, "login refused") {
			t.Fatalf("logs do not show the failure:\n%s", logs)
		}
		for _, secret := range []string{wrong, `Wr0ng\"pass\\`, "Wr0ng"} {
			if strings.Contains(logs, secret) || strings.Contains(r.cause, secret) {
				t.Fatalf("password form %q in logs or cause:\n%s\ncause: %s", secret, logs, r.cause)
			}
		}
	})
}

// TestOneProbeInFlight: a slow backend never sees two probes at once.
func TestOneProbeInFlight(t *testing.T) {
	srv := newFake(t, nil, func(c net.Conn, _ int) {
		time.Sleep(60 * time.Millisecond) // three Intervals
		fakeIMAP{}.serve(c)
	})
	h := start(t, fastOptions(imapService(srv.port)), localhost)
	testutil.WaitFor(t, 5*time.Second, "6 probes", func() bool { return srv.conns.Load() >= 6 })
	h.stop()
	if m := srv.maxActive.Load(); m != 1 {
		t.Fatalf("%d probe connections at once, want 1", m)
	}
	if st, _ := h.c.Status(localhost); !st.LastOK || st.Latency < 60*time.Millisecond {
		t.Fatalf("status of a slow healthy backend: %+v", st)
	}
}

// TestFlappingHeldDown: a backend alternating between good and bad is held
// down, and reported up only once HoldDown has passed.
func TestFlappingHeldDown(t *testing.T) {
	srv := newFake(t, nil, func(c net.Conn, n int) {
		if n%2 == 0 {
			fakeIMAP{}.serve(c)
		} else {
			fakeIMAP{greeting: "* BYE flap"}.serve(c)
		}
	})
	o := fastOptions(imapService(srv.port))
	o.Fall, o.Rise = 1, 1
	o.FlapWindow, o.FlapMax, o.HoldDown = 10*time.Second, 2, 300*time.Millisecond
	h := start(t, o, localhost)
	testutil.WaitFor(t, 5*time.Second, "4 reports", func() bool { return len(h.rec.reports()) >= 4 })
	r := h.rec.reports()
	// Rounds: ok, bad → down, ok → up, bad → down and held (third change
	// within the window, FlapMax 2), then up only after the hold-down.
	if r[0].up || !r[1].up || r[2].up || !r[3].up {
		t.Fatalf("reports %+v, want down, up, down, up", r)
	}
	if strings.Contains(r[0].cause, "held down") || !strings.Contains(r[2].cause, "flapping, held down until") {
		t.Fatalf("causes %q, %q: only the second down is held", r[0].cause, r[2].cause)
	}
	if r[2].held.IsZero() {
		t.Fatal("Status during the hold-down has no HeldUntil")
	}
	if r[3].at.Before(r[2].held) || r[3].at.Sub(r[2].at) < o.HoldDown-10*time.Millisecond {
		t.Fatalf("up reported at %v, %v after the hold began (held until %v)", r[3].at, r[3].at.Sub(r[2].at), r[2].held)
	}
	// During the hold, good rounds happened and were not reported.
	okDuringHold := 0
	for _, e := range h.rec.snapshot() {
		if !e.report && e.ok && e.at.After(r[2].at) && e.at.Before(r[2].held) {
			okDuringHold++
		}
	}
	if okDuringHold < 2 {
		t.Fatalf("%d good rounds during the 300ms hold-down; the test did not exercise it", okDuringHold)
	}
	if !strings.Contains(h.logs.String(), "held down until") {
		t.Errorf("no hold-down log line:\n%s", h.logs)
	}
}

// TestTransition drives the state machine with a fake clock.
func TestTransition(t *testing.T) {
	base := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	c := New(Options{Services: []Service{imapService(143)}, Fall: 2, Rise: 2,
		FlapWindow: time.Minute, FlapMax: 2, HoldDown: 30 * time.Second})
	st := &state{Result: Result{Healthy: true}}
	ok := roundResult{ok: true}
	bad := roundResult{err: "imap: boom", proto: ProtoIMAP}
	type step struct {
		at     time.Duration
		res    roundResult
		report string // "", "up", "down", "held" (down and held), "hold" (up refused)
	}
	steps := []step{
		{0, bad, ""},
		{1 * time.Second, bad, "down"}, // change 1
		{2 * time.Second, ok, ""},
		{3 * time.Second, ok, "up"}, // change 2
		{4 * time.Second, bad, ""},
		{5 * time.Second, bad, "held"}, // change 3 > FlapMax: held until 35s
		{6 * time.Second, ok, ""},
		{7 * time.Second, ok, ""}, // Rise reached but held
		{34 * time.Second, ok, ""},
		{35 * time.Second, ok, "up"}, // hold over: clean slate, change 1
		{36 * time.Second, bad, ""},
		{37 * time.Second, bad, "down"}, // change 2
		{38 * time.Second, ok, ""},
		{39 * time.Second, ok, "hold"}, // change 3 would exceed: up refused, held until 69s
		{68 * time.Second, ok, ""},
		{69 * time.Second, ok, "up"},
	}
	for i, s := range steps {
		now := base.Add(s.at)
		ev := c.transition(st, s.res, now)
		got := ""
		switch {
		case ev == nil:
		case ev.held && ev.report:
			got = "held"
		case ev.held:
			got = "hold"
		case ev.up:
			got = "up"
		default:
			got = "down"
		}
		if got != s.report {
			t.Fatalf("step %d (t=%v): event %q (%+v), want %q; state %+v", i, s.at, got, ev, s.report, st)
		}
		snap := st.snapshot(now, c.o.FlapWindow)
		if got == "held" || got == "hold" {
			if !snap.HeldDown || !snap.HeldUntil.Equal(now.Add(30*time.Second)) || snap.Healthy {
				t.Fatalf("step %d: status %+v, want held down for 30s", i, snap)
			}
		}
		if got == "down" && !strings.Contains(ev.cause, "imap: boom (2 failures)") {
			t.Fatalf("step %d: cause %q", i, ev.cause)
		}
	}
	// Within the minute before 69s: changes at 35s, 37s and 69s.
	if snap := st.snapshot(base.Add(69*time.Second), c.o.FlapWindow); snap.Flaps != 3 || snap.HeldDown || !snap.Healthy {
		t.Fatalf("final status %+v, want 3 flaps, healthy, not held", snap)
	}
}

// TestNoDamping: with FlapMax 0 every change is reported.
func TestNoDamping(t *testing.T) {
	c := New(Options{Services: []Service{imapService(143)}, Fall: 1, Rise: 1})
	st := &state{Result: Result{Healthy: true}}
	now := time.Now()
	for i := range 20 {
		ev := c.transition(st, roundResult{ok: i%2 == 1, err: "imap: x", proto: ProtoIMAP}, now.Add(time.Duration(i)*time.Second))
		if ev == nil || !ev.report || ev.held || ev.up != (i%2 == 1) {
			t.Fatalf("round %d: event %+v", i, ev)
		}
	}
}

// TestSetBackends: added backends are probed soon (not after a full
// Interval), removed ones stop and lose their status.
func TestSetBackends(t *testing.T) {
	srv := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{}.serve(c) })
	o := fastOptions(imapService(srv.port))
	o.Interval = 500 * time.Millisecond
	h := start(t, o)
	if len(h.c.Statuses()) != 0 {
		t.Fatal("statuses before any backend")
	}
	other := netip.MustParseAddr("127.0.0.2") // nothing listens there: refused
	added := time.Now()
	h.c.SetBackends([]netip.Addr{localhost, other, {}})
	if got := h.c.Statuses(); len(got) != 2 || !got[localhost].Healthy || !got[other].Healthy || !got[other].Checked.IsZero() {
		t.Fatalf("statuses right after SetBackends: %+v", got)
	}
	testutil.WaitFor(t, time.Second, "first rounds", func() bool {
		a, _ := h.c.Status(localhost)
		b, _ := h.c.Status(other)
		return !a.Checked.IsZero() && !b.Checked.IsZero()
	})
	if d := time.Since(added); d >= o.Interval/2 {
		t.Fatalf("first round after %v with Interval %v", d, o.Interval)
	}
	if st, _ := h.c.Status(other); st.LastOK || !strings.Contains(st.LastError, "connection refused") {
		t.Fatalf("status of 127.0.0.2: %+v", st)
	}

	h.c.SetBackends([]netip.Addr{localhost})
	if _, ok := h.c.Status(other); ok {
		t.Fatal("removed backend still has a status")
	}
	observed := func(a netip.Addr) int {
		n := 0
		for _, e := range h.rec.snapshot() {
			if !e.report && e.addr == a {
				n++
			}
		}
		return n
	}
	before := observed(other)
	time.Sleep(o.Interval + 300*time.Millisecond)
	if after := observed(other); after != before {
		t.Fatalf("removed backend probed %d more times", after-before)
	}
	if observed(localhost) < 2 {
		t.Fatal("remaining backend not probed every Interval")
	}

	// Added again: a fresh status and probing again.
	h.c.SetBackends([]netip.Addr{localhost, other})
	if st, ok := h.c.Status(other); !ok || !st.Checked.IsZero() {
		t.Fatalf("re-added backend: %+v, %v", st, ok)
	}
	testutil.WaitFor(t, time.Second, "re-added backend probed", func() bool { return observed(other) > before })
}

// TestRunStops: Run returns promptly after cancel, even with a probe
// waiting on a silent server, and leaves no goroutine behind.
func TestRunStops(t *testing.T) {
	silent := newFake(t, nil, func(c net.Conn, _ int) { _, _ = c.Read(make([]byte, 1)) })
	healthy := newFake(t, nil, func(c net.Conn, _ int) { fakeIMAP{}.serve(c) })
	before := runtime.NumGoroutine()

	c := New(Options{
		Services: []Service{imapService(healthy.port)},
		Interval: 10 * time.Millisecond, Timeout: 10 * time.Second,
	})
	slow := New(Options{
		Services: []Service{imapService(silent.port)},
		Interval: 10 * time.Millisecond, Timeout: 10 * time.Second,
	})
	addrs := []netip.Addr{localhost, netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.4")}
	c.SetBackends(addrs)
	slow.SetBackends(addrs[:1])
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { c.Run(ctx); done <- struct{}{} }()
	go func() { slow.Run(ctx); done <- struct{}{} }()
	testutil.WaitFor(t, 3*time.Second, "probes under way", func() bool {
		st, _ := c.Status(localhost)
		return st.Successes >= 2 && silent.active.Load() == 1
	})
	// Churn the set while running.
	c.SetBackends(addrs[:1])
	c.SetBackends(addrs)
	cancel()
	stopped := time.Now()
	for range 2 {
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			t.Fatal("Run did not return within 2s of cancel (probe timeout 10s)")
		}
	}
	if d := time.Since(stopped); d > time.Second {
		t.Errorf("Run took %v to return", d)
	}
	testutil.WaitFor(t, 2*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })

	// Run again after it returned: probing resumes.
	n := healthy.conns.Load()
	ctx2, cancel2 := context.WithCancel(context.Background())
	go func() { c.Run(ctx2); done <- struct{}{} }()
	testutil.WaitFor(t, 2*time.Second, "probes after a second Run", func() bool { return healthy.conns.Load() > n+1 })
	cancel2()
	<-done
	testutil.WaitFor(t, 2*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func TestNewDefaultsAndPanics(t *testing.T) {
	c := New(Options{})
	if c.o.Interval != 5*time.Second || c.o.Timeout != 3*time.Second || c.o.Fall != 3 || c.o.Rise != 2 || c.damping() {
		t.Fatalf("defaults: %+v", c.o)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("New accepted protocol lmtp")
		}
	}()
	New(Options{Services: []Service{{Proto: "lmtp"}}})
}
