package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// recipientPlan picks the recipients of each message: the next user of the
// range and the users after it that go to the same target, so one LMTP
// transaction never mixes targets.
type recipientPlan struct {
	users   UserSet
	pick    *userPicker
	rcpts   int
	target  []string // target of user i ("" until needed in single mode)
	single  string   // the only target, in single mode
	byTgt   map[string][]int
	posInTg []int32 // index of user i in byTgt[target of i]
}

func newRecipientPlan(o *Options, pick *userPicker) (*recipientPlan, error) {
	p := &recipientPlan{users: o.Users, pick: pick, rcpts: o.LMTP.Rcpts}
	if o.Targets.Mode() == "single" {
		t, err := o.Targets.For(o.Users.User(0))
		if err != nil {
			return nil, err
		}
		p.single = t
		p.rcpts = min(p.rcpts, o.Users.Len())
		return p, nil
	}
	n := o.Users.Len()
	p.target = make([]string, n)
	p.posInTg = make([]int32, n)
	p.byTgt = map[string][]int{}
	for i := range n {
		t, err := o.Targets.For(o.Users.User(i))
		if err != nil {
			return nil, err
		}
		p.target[i] = t
		p.posInTg[i] = int32(len(p.byTgt[t]))
		p.byTgt[t] = append(p.byTgt[t], i)
	}
	return p, nil
}

// next returns a target and the distinct recipients of one message (fewer
// than rcpts when the target has fewer users).
func (p *recipientPlan) next() (string, []string) {
	first := p.pick.index()
	if p.single != "" {
		out := make([]string, p.rcpts)
		for k := range out {
			out[k] = p.users.User(first + k)
		}
		return p.single, out
	}
	t := p.target[first]
	list := p.byTgt[t]
	n := min(p.rcpts, len(list))
	out := make([]string, n)
	pos := int(p.posInTg[first])
	for k := range out {
		out[k] = p.users.User(list[(pos+k)%len(list)])
	}
	return t, out
}

// runLMTP has each client deliver messages of LMTP.Size bytes to LMTP.Rcpts
// recipients in a loop, one connection per target, kept open between
// transactions and closed with QUIT at the end.
func runLMTP(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	plan, err := newRecipientPlan(o, e.pick)
	if err != nil {
		return nil, fmt.Errorf("bench: lmtp: %w", err)
	}
	hdrLen := len(messageHeader(e.runID, 1000, o.Users.User(0))) // typical
	body := messageBody(o.LMTP.Size - hdrLen)
	var (
		seq                                 atomic.Uint64
		recipients, rcptRejected, dataFails atomic.Int64
		conns                               = make([]map[string]*lmtpClient, o.Concurrency)
	)
	r := e.runner("deliveries")
	r.Extra = func(elapsed time.Duration) string {
		return fmt.Sprintf("rcpts %d (%.1f/s)", recipients.Load(), float64(recipients.Load())/max(elapsed.Seconds(), 1e-9))
	}
	out := r.Run(ctx, func(ctx context.Context, w *Worker) error {
		target, rcpts := plan.next()
		if conns[w.ID] == nil {
			conns[w.ID] = map[string]*lmtpClient{}
		}
		c := conns[w.ID][target]
		if c == nil {
			var err error
			if c, err = dialLMTP(ctx, e.dial, target, o.LMTP.Helo); err != nil {
				return err
			}
			conns[w.ID][target] = c
		}
		t0 := time.Now()
		hdr := messageHeader(e.runID, seq.Add(1), rcpts[0])
		d, err := c.Deliver(o.LMTP.From, rcpts, hdr, body)
		recipients.Add(int64(d.delivered))
		rcptRejected.Add(int64(d.rejected))
		dataFails.Add(int64(d.failed))
		if d.dataTime > 0 {
			w.Latency.Record(d.dataTime)
		}
		if err != nil {
			// After a negative reply the session is still in step; after
			// anything else (timeout, garbage, close) it is not.
			var rej *rejectedError
			if !errors.As(err, &rej) {
				c.Close()
				delete(conns[w.ID], target)
			}
			return err
		}
		w.Loop.Record(time.Since(t0))
		return nil
	})
	res := e.result(out)
	res.LatencyOf = "DATA sent → last per-recipient reply"
	res.LoopOf = "MAIL FROM sent → last per-recipient reply (one transaction)"
	res.LMTPStats = &LMTPStats{
		MessageBytes:    hdrLen + len(body),
		RcptsPerMessage: plan.rcpts,
		Deliveries:      out.Ops,
		DeliveriesPerS:  res.OpsPerS,
		Recipients:      recipients.Load(),
		RecipientsPerS:  rate(recipients.Load(), out.Elapsed),
		RcptRejected:    rcptRejected.Load(),
		DataFailed:      dataFails.Load(),
	}
	var wg sync.WaitGroup
	for _, m := range conns {
		for _, c := range m {
			if ctx.Err() != nil {
				c.Close()
				continue
			}
			wg.Go(func() { _ = c.Quit() })
		}
	}
	wg.Wait()
	return res, nil
}
