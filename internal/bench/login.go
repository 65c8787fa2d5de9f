package bench

import (
	"context"
	"time"
)

// runLogin loops connect → (STARTTLS) → LOGIN → SELECT INBOX (POP3: USER,
// PASS, STAT) → LOGOUT (QUIT) on every worker over the user range.
func runLogin(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	r := e.runner("logins")
	out := r.Run(ctx, func(ctx context.Context, w *Worker) error {
		user := e.pick.pick()
		target, err := o.Targets.For(user)
		if err != nil {
			return stepErr("target", err)
		}
		t0 := time.Now()
		s, err := dialSession(ctx, o.Proto, e.dial, target)
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
		if err := s.Logout(); err != nil {
			return err
		}
		w.Loop.Record(time.Since(t0))
		return nil
	})
	res := e.result(out)
	res.LoginStats = &LoginStats{LoginsPerS: res.OpsPerS}
	if o.Proto == "pop3" {
		res.LatencyOf = "USER sent → +OK to PASS"
		res.LoopOf = "connect → QUIT answered (USER, PASS, STAT, QUIT)"
	} else {
		res.LatencyOf = "LOGIN sent → tagged OK"
		res.LoopOf = "connect → LOGOUT answered (LOGIN, SELECT INBOX, LOGOUT)"
	}
	return res, nil
}
