package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// runIdle opens Idle.Sessions sessions (Concurrency at a time), measures
// the setup time and, with Idle.RSS, the servers' memory per session,
// holds the sessions for Idle.Hold (NOOP, or IDLE renewed, every
// Idle.Keepalive) and logs them all out.
func runIdle(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	idle := o.Idle
	var rss *RSSStats
	if idle.RSS.Enabled() {
		before, pids, err := idle.RSS.Measure()
		if err != nil {
			return nil, fmt.Errorf("bench: idle: %w", err)
		}
		rss = &RSSStats{BeforeKiB: before, PIDsBefore: len(pids)}
	}

	// Sessions outlive the setup run and must survive an interrupt long
	// enough to log out; their I/O is bounded by the per-operation timeout.
	sessCtx := context.WithoutCancel(ctx)
	var (
		mu       sync.Mutex
		sessions []mailSession
	)
	r := e.runner("sessions")
	r.Duration, r.Count = 0, int64(idle.Sessions)
	out := r.Run(ctx, func(ctx context.Context, w *Worker) error {
		user := e.pick.pick()
		target, err := o.Targets.For(user)
		if err != nil {
			return stepErr("target", err)
		}
		t0 := time.Now()
		s, err := dialSession(sessCtx, o.Proto, e.dial, target)
		if err != nil {
			return err
		}
		t1 := time.Now()
		if err := s.Login(user, o.Password); err != nil {
			s.Close()
			return err
		}
		w.Latency.Record(time.Since(t1))
		if err := s.Open(); err != nil {
			s.Close()
			return err
		}
		w.Loop.Record(time.Since(t0))
		mu.Lock()
		sessions = append(sessions, s)
		mu.Unlock()
		return nil
	})
	res := e.result(out)
	res.SetupS = res.DurationS
	res.LatencyOf = "LOGIN sent → tagged OK"
	res.LoopOf = "connect → SELECT INBOX done (session setup)"
	if o.Proto == "pop3" {
		res.LatencyOf = "USER sent → +OK to PASS"
		res.LoopOf = "connect → STAT done (session setup)"
	}
	st := &IdleStats{
		Sessions:      idle.Sessions,
		Established:   len(sessions),
		SessionsPerS:  rate(int64(len(sessions)), out.Elapsed),
		KeepaliveMode: "noop",
		RSSStats:      rss,
	}
	if idle.UseIDLE {
		st.KeepaliveMode = "idle"
	}
	res.IdleStats = st

	if rss != nil && ctx.Err() == nil {
		if idle.Settle > 0 {
			sleepCtx(ctx, idle.Settle)
		}
		after, pids, err := idle.RSS.Measure()
		if err != nil {
			closeAll(sessions)
			return nil, fmt.Errorf("bench: idle: %w", err)
		}
		rss.AfterKiB, rss.PIDsAfter, rss.MeasuredSessions = after, len(pids), len(sessions)
		if len(sessions) > 0 {
			rss.PerSessionKiB = round3(float64(after-rss.BeforeKiB) / float64(len(sessions)))
		}
	}

	holdErrs := newTally()
	alive, keepalives, held := e.hold(ctx, sessions, holdErrs)
	st.HoldS = round3(held.Seconds())
	st.Keepalives = keepalives
	st.Lost = len(sessions) - len(alive)
	res.addErrors(holdErrs)

	logoutErrs := newTally()
	e.logoutAll(alive, logoutErrs)
	st.LogoutErrors = logoutErrs.total.Load()
	res.addErrors(logoutErrs)
	return res, nil
}

// hold keeps the sessions open until Idle.Hold has passed or ctx ends and
// returns the sessions still alive, the keepalives sent and how long it held.
func (e *env) hold(ctx context.Context, sessions []mailSession, errs *tally) ([]mailSession, int64, time.Duration) {
	idle := e.o.Idle
	start := time.Now()
	holdCtx, cancel := context.WithTimeout(ctx, idle.Hold)
	defer cancel()
	dead := make([]bool, len(sessions))
	var (
		wg         sync.WaitGroup
		lost       atomic.Int64
		keepalives atomic.Int64
	)
	for i, s := range sessions {
		wg.Go(func() {
			fail := func(err error) {
				errs.add(stepErr("hold", err))
				dead[i] = true
				lost.Add(1)
				s.Close()
			}
			m, useIdle := s.(*imapClient)
			useIdle = useIdle && idle.UseIDLE
			if useIdle {
				if err := m.Idle(); err != nil {
					fail(err)
					return
				}
			}
			t := time.NewTicker(idle.Keepalive)
			defer t.Stop()
			for {
				select {
				case <-holdCtx.Done():
					return
				case <-t.C:
				}
				var err error
				if useIdle {
					// RFC 2177 §3: re-issue IDLE at least every 29 minutes.
					if err = m.Done(); err == nil {
						err = m.Idle()
					}
				} else {
					err = s.Noop()
				}
				if err != nil {
					fail(err)
					return
				}
				keepalives.Add(1)
			}
		})
	}
	if e.o.Progress != nil {
		wg.Go(func() {
			every := e.o.Interval
			if every <= 0 {
				every = time.Second
			}
			t := time.NewTicker(every)
			defer t.Stop()
			line := func() string {
				return fmt.Sprintf("%7.1fs  holding %d sessions  lost %d  keepalives %d",
					time.Since(start).Seconds(), len(sessions)-int(lost.Load()), lost.Load(), keepalives.Load())
			}
			for {
				select {
				case <-holdCtx.Done():
					progressLine(e.o.Progress, e.o.ProgressCR, true, line())
					return
				case <-t.C:
					progressLine(e.o.Progress, e.o.ProgressCR, false, line())
				}
			}
		})
	}
	wg.Wait()
	held := time.Since(start)
	var alive []mailSession
	for i, s := range sessions {
		if !dead[i] {
			alive = append(alive, s)
		}
	}
	return alive, keepalives.Load(), held
}

// logoutAll logs the sessions out, Concurrency at a time.
func (e *env) logoutAll(sessions []mailSession, errs *tally) {
	sem := make(chan struct{}, e.o.Concurrency)
	var wg sync.WaitGroup
	for _, s := range sessions {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := s.Logout(); err != nil {
				errs.add(err)
			}
		})
	}
	wg.Wait()
}

func closeAll(sessions []mailSession) {
	for _, s := range sessions {
		s.Close()
	}
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
