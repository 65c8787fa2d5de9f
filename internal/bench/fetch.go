package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// runFetch logs in Concurrency clients (client i as user i of the range)
// and has each FETCH BODY.PEEK[] of every message of the mailbox in a
// loop, measuring the bytes received. With Fetch.Setup it first APPENDs
// messages until each of those users' mailbox holds Fetch.SetupCount.
func runFetch(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	nUsers := min(o.Concurrency, o.Users.Len())
	var (
		setupTime time.Duration
		appended  atomic.Int64
		setupErrs *tally
	)
	if o.Fetch.Setup {
		r := e.runner("users set up")
		r.Duration, r.Count = 0, int64(nUsers)
		var next atomic.Int64
		out := r.Run(ctx, func(ctx context.Context, w *Worker) error {
			user := o.Users.User(int(next.Add(1) - 1))
			n, err := e.setupUser(ctx, user)
			appended.Add(n)
			return err
		})
		setupTime = out.Elapsed
		setupErrs = newTally()
		for k, v := range out.Errors {
			setupErrs.errors["setup:"+k] += v
			setupErrs.samples["setup:"+k] = out.Samples[k]
		}
		if out.Ops == 0 {
			return nil, fmt.Errorf("bench: fetch setup failed for every user: %v", out.Samples)
		}
	}
	if err := e.checkNotEmpty(ctx); err != nil {
		return nil, err
	}

	var (
		bytesRead atomic.Int64
		messages  atomic.Int64
		sessions  = make([]*imapClient, o.Concurrency)
	)
	r := e.runner("fetches")
	r.Extra = func(elapsed time.Duration) string {
		return fmt.Sprintf("%.1f MB/s", float64(bytesRead.Load())/1e6/max(elapsed.Seconds(), 1e-9))
	}
	out := r.Run(ctx, func(ctx context.Context, w *Worker) error {
		m := sessions[w.ID]
		if m == nil {
			t0 := time.Now()
			var err error
			if m, err = e.openMailbox(ctx, o.Users.User(w.ID%nUsers)); err != nil {
				return err
			}
			if m.exists == 0 {
				m.Close()
				return stepErr("fetch", errEmpty)
			}
			w.Loop.Record(time.Since(t0))
			sessions[w.ID] = m
		}
		t0 := time.Now()
		msgs, n, err := m.FetchAll()
		bytesRead.Add(n)
		messages.Add(int64(msgs))
		if err != nil {
			m.Close()
			sessions[w.ID] = nil
			return err
		}
		w.Latency.Record(time.Since(t0))
		return nil
	})
	res := e.result(out)
	res.SetupS = round3(setupTime.Seconds())
	res.LatencyOf = "FETCH 1:* (BODY.PEEK[]) sent → tagged OK"
	res.LoopOf = "connect → SELECT done (once per client)"
	res.FetchStats = &FetchStats{
		Mailbox:       o.Fetch.Mailbox,
		SetupAppended: appended.Load(),
		Bytes:         bytesRead.Load(),
		Messages:      messages.Load(),
		MBPerS:        round3(float64(bytesRead.Load()) / 1e6 / max(out.Elapsed.Seconds(), 1e-9)),
		MessagesPerS:  rate(messages.Load(), out.Elapsed),
	}
	if setupErrs != nil {
		res.addErrors(setupErrs)
	}
	var wg sync.WaitGroup
	for _, m := range sessions {
		if m == nil {
			continue
		}
		if ctx.Err() != nil {
			m.Close()
			continue
		}
		wg.Go(func() { _ = m.Logout() })
	}
	wg.Wait()
	return res, nil
}

// openMailbox connects as user and selects the fetch mailbox.
func (e *env) openMailbox(ctx context.Context, user string) (*imapClient, error) {
	target, err := e.o.Targets.For(user)
	if err != nil {
		return nil, stepErr("target", err)
	}
	m, err := dialIMAP(ctx, e.dial, target)
	if err != nil {
		return nil, err
	}
	if err := m.Login(user, e.o.Password); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.selectMailbox(e.o.Fetch.Mailbox); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// setupUser appends messages until user's mailbox holds SetupCount; it
// creates a mailbox other than INBOX if SELECT fails. It returns how many
// messages it appended.
func (e *env) setupUser(ctx context.Context, user string) (int64, error) {
	f := e.o.Fetch
	m, err := e.openMailbox(ctx, user)
	var rej *rejectedError
	if err != nil && f.Mailbox != "INBOX" && errors.As(err, &rej) {
		// The mailbox may not exist yet: create it (RFC 3501 §6.3.3) and retry.
		target, _ := e.o.Targets.For(user)
		if m, err = dialIMAP(ctx, e.dial, target); err != nil {
			return 0, err
		}
		if err = m.Login(user, e.o.Password); err == nil {
			if err = stepErr("create", m.simple("CREATE "+quote(f.Mailbox))); err == nil {
				err = m.selectMailbox(f.Mailbox)
			}
		}
		if err != nil {
			m.Close()
			return 0, err
		}
	} else if err != nil {
		return 0, err
	}
	var n int64
	for m.exists+int(n) < f.SetupCount {
		seq := fnv1a64(user) + uint64(m.exists) + uint64(n)
		if err := m.Append(f.Mailbox, message(e.runID, seq, user, f.SetupSize)); err != nil {
			m.Close()
			return n, err
		}
		n++
	}
	return n, m.Logout()
}

// checkNotEmpty fails early, with a hint, when the first user's mailbox
// has nothing to fetch.
func (e *env) checkNotEmpty(ctx context.Context) error {
	user := e.o.Users.User(0)
	m, err := e.openMailbox(ctx, user)
	if err != nil {
		return fmt.Errorf("bench: fetch: open %s of %s: %w", e.o.Fetch.Mailbox, user, err)
	}
	empty := m.exists == 0
	_ = m.Logout()
	if empty {
		return fmt.Errorf("bench: fetch: %s of %s: %w", e.o.Fetch.Mailbox, user, errEmpty)
	}
	return nil
}
