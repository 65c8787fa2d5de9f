// Package health runs usher's built-in backend health checks. The Dovecot
// director left this to external scripts (poolmon); usher probes every
// backend itself, once per Interval, by speaking each configured protocol:
// connect, read the greeting, optionally STARTTLS and log in, and log out.
//
// Invariants:
//   - one goroutine per backend, so at most one probe round is in flight per
//     backend; a round probes every Service in turn and fails if any fails;
//   - every probe is bounded by Timeout (connect, TLS, every read and write);
//     every line read is capped;
//   - a backend starts healthy (unknown counts as up, as in the director); it
//     is reported down after Fall consecutive failed rounds and up again after
//     Rise consecutive successful rounds, unless damping holds it down;
//   - Report and Observe are called without any of the Checker's locks held,
//     and Report never concurrently with itself for the same backend (a
//     backend removed and added again waits for its old loop to end);
//   - Run returns only after every per-backend goroutine has ended;
//   - the probe password is never logged nor put in a cause or error text.
package health

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
)

// Protocols a Service can probe.
const (
	ProtoIMAP = "imap"
	ProtoPOP3 = "pop3"
)

// Service is one protocol probed on every backend.
type Service struct {
	Proto   string               // "imap" or "pop3"
	Backend proxy.BackendOptions // port, TLS (none|starttls|implicit), TLS config
}

// Options configures a Checker. Zero Interval, Timeout, Fall and Rise take
// the config package defaults. Damping is off when FlapWindow, FlapMax or
// HoldDown is not positive.
type Options struct {
	Services []Service
	Interval time.Duration // between the starts of two rounds of one backend (±10% jitter)
	Timeout  time.Duration // one probe of one service, connect to logout
	Fall     int           // consecutive failed rounds to report a backend down
	Rise     int           // consecutive successful rounds to report it up again
	// A backend whose state would change more than FlapMax times within
	// FlapWindow is held down for HoldDown.
	FlapWindow time.Duration
	FlapMax    int
	HoldDown   time.Duration
	// LoginUser and LoginPassword, when LoginUser is set, make every probe
	// log in too. The password is never logged.
	LoginUser, LoginPassword string
	// Report is called when a backend's health verdict changes (never
	// concurrently with itself for the same backend, never with the
	// Checker's locks held). cause is a short human text. A report may
	// still arrive for a backend SetBackends removed a moment before.
	Report func(addr netip.Addr, up bool, cause string)
	// Observe, optional, is called after every probe (for metrics).
	Observe func(addr netip.Addr, proto string, ok bool, latency time.Duration)
	// Initial, optional, gives the verdict a backend starts with when it
	// joins the set (the director's current view, so that a backend that is
	// down when checking starts is reported up once it recovers). Nil: up.
	Initial func(addr netip.Addr) bool
	Logger  *slog.Logger
	Now     func() time.Time // optional clock for timestamps and damping (tests)
}

// Result is the health status of one backend.
type Result struct {
	Healthy   bool          // the verdict last reported; true initially (unknown counts as up)
	Checked   time.Time     // time of the last probe round (zero if none yet)
	LastOK    bool          // the last round succeeded
	LastError string        // "" when the last round succeeded
	Latency   time.Duration // duration of the last round (all services)
	Failures  int           // consecutive failed rounds
	Successes int           // consecutive successful rounds
	HeldDown  bool          // damping holds the backend down
	HeldUntil time.Time     // end of the hold-down (zero unless HeldDown)
	Flaps     int           // state changes within FlapWindow
}

// Checker probes a set of backends. Create it with New.
type Checker struct {
	o   Options
	log *slog.Logger
	now func() time.Time

	mu       sync.Mutex
	backends map[netip.Addr]*backend
	// exited holds the done channels of removed backends whose loops may
	// still be running, so a re-added backend's loop waits for them.
	exited map[netip.Addr]chan struct{}
	runCtx context.Context // non-nil while Run runs
	wg     sync.WaitGroup
}

// backend is one probed backend.
type backend struct {
	addr   netip.Addr
	cancel context.CancelFunc // nil while no loop runs
	done   chan struct{}      // closed when the loop ended
	st     state              // guarded by Checker.mu
}

type state struct {
	Result
	changes []time.Time // times of verdict changes within FlapWindow, oldest first
}

// maxChanges bounds the remembered state changes of one backend.
const maxChanges = 256

// New returns a Checker for o. It panics on a Service with an unknown
// protocol (a programming error: the configuration only has imap and pop3).
func New(o Options) *Checker {
	for _, s := range o.Services {
		if s.Proto != ProtoIMAP && s.Proto != ProtoPOP3 {
			panic(fmt.Sprintf("health: unknown protocol %q", s.Proto))
		}
	}
	if o.Interval <= 0 {
		o.Interval = config.DefaultHealthInterval
	}
	if o.Timeout <= 0 {
		o.Timeout = config.DefaultHealthTimeout
	}
	if o.Fall <= 0 {
		o.Fall = config.DefaultHealthFall
	}
	if o.Rise <= 0 {
		o.Rise = config.DefaultHealthRise
	}
	c := &Checker{
		o:        o,
		log:      o.Logger,
		now:      o.Now,
		backends: map[netip.Addr]*backend{},
		exited:   map[netip.Addr]chan struct{}{},
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c
}

func (c *Checker) damping() bool {
	return c.o.FlapWindow > 0 && c.o.FlapMax > 0 && c.o.HoldDown > 0
}

// Run probes the backends until ctx ends, starting and stopping per-backend
// loops as SetBackends changes the set. It returns after all of them ended.
// Run must not be called again before it returned.
func (c *Checker) Run(ctx context.Context) {
	c.mu.Lock()
	if c.runCtx != nil {
		c.mu.Unlock()
		panic("health: Run called while running")
	}
	c.runCtx = ctx
	for _, b := range c.backends {
		c.startLocked(b)
	}
	c.mu.Unlock()

	<-ctx.Done()

	c.mu.Lock()
	c.runCtx = nil
	for _, b := range c.backends {
		if b.cancel != nil {
			b.cancel()
			b.cancel = nil
		}
	}
	c.mu.Unlock()
	c.wg.Wait()
	c.mu.Lock()
	clear(c.exited) // every loop has ended
	c.mu.Unlock()
}

// SetBackends sets the backends to probe. Added ones start probing at once
// (their first round comes within a tenth of Interval); removed ones stop
// and their status is dropped. Invalid addresses are ignored.
func (c *Checker) SetBackends(addrs []netip.Addr) {
	want := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if a.IsValid() {
			want[a] = true
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for a, done := range c.exited {
		select {
		case <-done:
			delete(c.exited, a)
		default:
		}
	}
	for a, b := range c.backends {
		if want[a] {
			continue
		}
		delete(c.backends, a)
		if b.cancel != nil {
			b.cancel()
			b.cancel = nil
			c.exited[a] = b.done
		}
	}
	for a := range want {
		if _, ok := c.backends[a]; ok {
			continue
		}
		healthy := true
		if c.o.Initial != nil {
			healthy = c.o.Initial(a)
		}
		b := &backend{addr: a, st: state{Result: Result{Healthy: healthy}}}
		c.backends[a] = b
		if c.runCtx != nil {
			c.startLocked(b)
		}
	}
}

// startLocked starts b's loop; c.mu is held and Run is running.
func (c *Checker) startLocked(b *backend) {
	ctx, cancel := context.WithCancel(c.runCtx)
	prev := c.exited[b.addr]
	delete(c.exited, b.addr)
	b.cancel = cancel
	b.done = make(chan struct{})
	c.wg.Add(1)
	go c.loop(ctx, b, b.done, prev)
}

// Status returns the status of the backend at addr, if it is in the set.
func (c *Checker) Status(addr netip.Addr) (Result, bool) {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.backends[addr]
	if !ok {
		return Result{}, false
	}
	return b.st.snapshot(now, c.o.FlapWindow), true
}

// Statuses returns the status of every backend in the set.
func (c *Checker) Statuses() map[netip.Addr]Result {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[netip.Addr]Result, len(c.backends))
	for a, b := range c.backends {
		m[a] = b.st.snapshot(now, c.o.FlapWindow)
	}
	return m
}

func (s *state) snapshot(now time.Time, window time.Duration) Result {
	r := s.Result
	r.HeldDown = now.Before(s.HeldUntil)
	if !r.HeldDown {
		r.HeldUntil = time.Time{}
	}
	r.Flaps = 0
	for _, t := range s.changes {
		if now.Sub(t) < window {
			r.Flaps++
		}
	}
	return r
}

// loop runs the probe rounds of one backend until ctx ends. prev, when not
// nil, is the loop of an earlier incarnation of the same backend: waiting
// for it keeps Report calls for one address sequential.
func (c *Checker) loop(ctx context.Context, b *backend, done chan struct{}, prev <-chan struct{}) {
	defer c.wg.Done()
	defer close(done)
	if prev != nil {
		select {
		case <-prev:
		case <-ctx.Done():
			return
		}
	}
	// The first round comes soon, spread over a tenth of Interval so that
	// backends added together are not probed in lockstep.
	t := time.NewTimer(rand.N(c.o.Interval/10 + 1))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		res := c.round(ctx, b.addr)
		if ctx.Err() != nil {
			return // stopped mid-round: the round says nothing about the backend
		}
		c.apply(b, res)
		t.Reset(c.nextDelay(time.Since(start)))
	}
}

// nextDelay is the wait after a round that took elapsed: Interval ±10%
// between round starts, but at least a tenth of Interval between rounds.
func (c *Checker) nextDelay(elapsed time.Duration) time.Duration {
	iv := c.o.Interval
	jitter := rand.N(iv/5+1) - iv/10
	return max(iv+jitter-elapsed, iv/10)
}

// roundResult is the outcome of one probe round of one backend.
type roundResult struct {
	ok      bool
	err     string // failures, "proto: error" joined by "; "
	proto   string // the first failing protocol
	latency time.Duration
}

// round probes every service of addr in turn.
func (c *Checker) round(ctx context.Context, addr netip.Addr) roundResult {
	res := roundResult{ok: true}
	var errs []string
	for i := range c.o.Services {
		s := &c.o.Services[i]
		start := time.Now()
		err := c.probe(ctx, s, addr)
		lat := time.Since(start)
		if ctx.Err() != nil {
			return res
		}
		res.latency += lat
		if c.o.Observe != nil {
			c.o.Observe(addr, s.Proto, err == nil, lat)
		}
		if err != nil {
			msg := c.redact(s.Proto + ": " + err.Error())
			c.log.Debug("health probe failed", "backend", addr.String(), "proto", s.Proto, "cause", msg)
			if res.ok {
				res.ok, res.proto = false, s.Proto
			}
			errs = append(errs, msg)
		}
	}
	res.err = strings.Join(errs, "; ")
	return res
}

// redact removes the probe password from s (a server could echo it).
func (c *Checker) redact(s string) string {
	if c.o.LoginPassword == "" {
		return s
	}
	return strings.ReplaceAll(s, c.o.LoginPassword, "<password hidden>")
}

// event is a verdict change (or a hold-down) to log and report after the
// lock is released.
type event struct {
	report bool // call Report
	up     bool
	held   bool // damping holds the backend down
	until  time.Time
	proto  string
	cause  string
}

// apply folds a round's result into b's state and reports a change.
func (c *Checker) apply(b *backend, res roundResult) {
	now := c.now()
	c.mu.Lock()
	if c.backends[b.addr] != b {
		c.mu.Unlock()
		return // removed meanwhile
	}
	ev := c.transition(&b.st, res, now)
	c.mu.Unlock()
	if ev == nil {
		return
	}
	addr := b.addr.String()
	switch {
	case ev.held && ev.report:
		c.log.Warn("backend down, flapping, held down until "+ev.until.Format(time.RFC3339), "backend", addr, "proto", ev.proto, "cause", ev.cause)
	case ev.held:
		c.log.Warn("backend flapping, held down until "+ev.until.Format(time.RFC3339), "backend", addr, "proto", ev.proto, "cause", ev.cause)
	case ev.up:
		c.log.Info("backend up", "backend", addr, "proto", ev.proto, "cause", ev.cause)
	default:
		c.log.Warn("backend down", "backend", addr, "proto", ev.proto, "cause", ev.cause)
	}
	if ev.report && c.o.Report != nil {
		c.o.Report(b.addr, ev.up, ev.cause)
	}
}

// transition updates st for one round and returns the event it causes, if
// any. Going down is never delayed; going up may be refused by damping.
func (c *Checker) transition(st *state, res roundResult, now time.Time) *event {
	st.Checked = now
	st.LastOK = res.ok
	st.LastError = res.err
	st.Latency = res.latency
	st.pruneChanges(now, c.o.FlapWindow)
	if res.ok {
		st.Successes++
		st.Failures = 0
		if st.Healthy || st.Successes < c.o.Rise || now.Before(st.HeldUntil) {
			return nil
		}
		protos := c.protos()
		if c.damping() && st.recentChanges(now, c.o.FlapWindow)+1 > c.o.FlapMax {
			st.HeldUntil = now.Add(c.o.HoldDown)
			return &event{held: true, until: st.HeldUntil, proto: protos,
				cause: fmt.Sprintf("more than %d state changes within %s", c.o.FlapMax, c.o.FlapWindow)}
		}
		st.Healthy = true
		st.addChange(now)
		return &event{report: true, up: true, proto: protos,
			cause: fmt.Sprintf("%s ok (%d successes)", protos, st.Successes)}
	}
	st.Successes = 0
	st.Failures++
	if !st.Healthy || st.Failures < c.o.Fall {
		return nil
	}
	st.Healthy = false
	st.addChange(now)
	ev := &event{report: true, proto: res.proto, cause: fmt.Sprintf("%s (%d failures)", res.err, st.Failures)}
	if c.damping() && st.recentChanges(now, c.o.FlapWindow) > c.o.FlapMax {
		st.HeldUntil = now.Add(c.o.HoldDown)
		ev.held, ev.until = true, st.HeldUntil
		ev.cause += "; flapping, held down until " + st.HeldUntil.Format(time.RFC3339)
	}
	return ev
}

// protos names the probed protocols ("imap,pop3").
func (c *Checker) protos() string {
	names := make([]string, len(c.o.Services))
	for i, s := range c.o.Services {
		names[i] = s.Proto
	}
	return strings.Join(names, ",")
}

func (st *state) addChange(now time.Time) {
	if len(st.changes) >= maxChanges {
		st.changes = st.changes[1:]
	}
	st.changes = append(st.changes, now)
}

// pruneChanges forgets changes older than window.
func (st *state) pruneChanges(now time.Time, window time.Duration) {
	i := 0
	for i < len(st.changes) && now.Sub(st.changes[i]) >= window {
		i++
	}
	st.changes = st.changes[i:]
}

// recentChanges counts the changes that count for damping: those within
// window and not before the end of the last hold-down, so that a backend
// leaves a hold-down with a clean slate.
func (st *state) recentChanges(now time.Time, window time.Duration) int {
	n := 0
	for _, t := range st.changes {
		if now.Sub(t) < window && !t.Before(st.HeldUntil) {
			n++
		}
	}
	return n
}
