package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"
)

// Runner runs an operation in a loop on Concurrency workers until Duration
// has passed or Count operations have been started, and prints a progress
// line every Interval.
//
// Invariants: an operation that has started runs to its end (its own
// timeouts bound it), so the operations counted are exactly the ones that
// completed, and a stopped run still reports every completed one; when the
// parent context is cancelled (an interrupt), running operations fail and
// those failures are not counted as errors.
type Runner struct {
	Concurrency int
	Duration    time.Duration // stop starting operations after this; 0 = no limit
	Count       int64         // start at most this many operations; 0 = no limit
	Progress    io.Writer     // progress lines; nil = none
	ProgressCR  bool          // overwrite one line with \r (a terminal) instead of one line per tick
	Interval    time.Duration // progress interval; default 1 s
	ErrorPause  time.Duration // a worker pauses this long after a failed operation
	Label       string        // what an operation is called in the progress line; default "ops"
	// Extra, if set, is appended to each progress line.
	Extra  func(elapsed time.Duration) string
	Logger *slog.Logger // failed operations at debug level; nil = none
}

// Worker is one worker's state; an operation only runs on its own worker,
// so its fields need no locking.
type Worker struct {
	ID      int
	Latency Histogram // the workload's main step (LOGIN, FETCH, DATA)
	Loop    Histogram // the whole operation
}

// Outcome is what a run measured.
type Outcome struct {
	Elapsed time.Duration
	Ops     int64
	Errors  map[string]int64  // by errorKind
	Samples map[string]string // the first error message of each kind
	Latency Histogram
	Loop    Histogram
}

// ErrorCount is the total number of errors.
func (o *Outcome) ErrorCount() int64 {
	var n int64
	for _, c := range o.Errors {
		n += c
	}
	return n
}

// Op is one operation; ctx is the parent context (for I/O), not the
// run's deadline.
type Op func(ctx context.Context, w *Worker) error

// tally counts errors by kind and keeps the first message of each kind.
type tally struct {
	total   atomic.Int64
	mu      sync.Mutex
	errors  map[string]int64
	samples map[string]string
}

func newTally() *tally {
	return &tally{errors: map[string]int64{}, samples: map[string]string{}}
}

// add counts err and returns its kind.
func (t *tally) add(err error) string {
	kind := errorKind(err)
	t.total.Add(1)
	t.mu.Lock()
	t.errors[kind]++
	if _, ok := t.samples[kind]; !ok {
		t.samples[kind] = clip(err.Error())
	}
	t.mu.Unlock()
	return kind
}

func (t *tally) snapshot() (map[string]int64, map[string]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.errors), maps.Clone(t.samples)
}

// runState is the shared state of one Run.
type runState struct {
	r       *Runner
	start   time.Time
	ops     atomic.Int64
	started atomic.Int64
	errs    *tally
}

func (s *runState) fail(err error) {
	kind := s.errs.add(err)
	if s.r.Logger != nil {
		s.r.Logger.Debug("operation failed", "kind", kind, "err", err)
	}
}

// Run runs op until the run ends and returns what it measured.
func (r *Runner) Run(ctx context.Context, op Op) *Outcome {
	conc := max(r.Concurrency, 1)
	st := &runState{r: r, start: time.Now(), errs: newTally()}
	// stopCtx ends the starting of new operations; ctx ends running ones.
	stopCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if r.Duration > 0 {
		var c2 context.CancelFunc
		stopCtx, c2 = context.WithTimeout(stopCtx, r.Duration)
		defer c2()
	}

	progressDone := make(chan struct{})
	stopProgress := make(chan struct{})
	go func() {
		defer close(progressDone)
		r.progress(st, stopProgress)
	}()

	workers := make([]*Worker, conc)
	var wg sync.WaitGroup
	for i := range workers {
		w := &Worker{ID: i}
		workers[i] = w
		wg.Go(func() { r.work(ctx, stopCtx, st, w, op) })
	}
	wg.Wait()
	elapsed := time.Since(st.start)
	close(stopProgress)
	<-progressDone

	out := &Outcome{Elapsed: elapsed, Ops: st.ops.Load()}
	out.Errors, out.Samples = st.errs.snapshot()
	for _, w := range workers {
		out.Latency.Merge(&w.Latency)
		out.Loop.Merge(&w.Loop)
	}
	return out
}

func (r *Runner) work(ctx, stopCtx context.Context, st *runState, w *Worker, op Op) {
	for stopCtx.Err() == nil {
		if r.Count > 0 && st.started.Add(1) > r.Count {
			return
		}
		err := op(ctx, w)
		switch {
		case err == nil:
			st.ops.Add(1)
		case ctx.Err() != nil:
			return // interrupted: not the server's fault
		default:
			st.fail(err)
			if r.ErrorPause > 0 {
				select {
				case <-stopCtx.Done():
				case <-time.After(r.ErrorPause):
				}
			}
		}
	}
}

// progress prints a line per Interval until stop is closed, then a last one.
func (r *Runner) progress(st *runState, stop <-chan struct{}) {
	if r.Progress == nil {
		<-stop
		return
	}
	every := r.Interval
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	lastOps, lastAt := int64(0), st.start
	print := func(final bool) {
		now := time.Now()
		ops := st.ops.Load()
		elapsed := now.Sub(st.start)
		rate := float64(ops) / max(elapsed.Seconds(), 1e-9)
		recent := float64(ops-lastOps) / max(now.Sub(lastAt).Seconds(), 1e-9)
		lastOps, lastAt = ops, now
		label := r.Label
		if label == "" {
			label = "ops"
		}
		line := fmt.Sprintf("%7.1fs  %s %d  %.1f/s (now %.1f/s)  errors %d",
			elapsed.Seconds(), label, ops, rate, recent, st.errs.total.Load())
		if r.Extra != nil {
			line += "  " + r.Extra(elapsed)
		}
		progressLine(r.Progress, r.ProgressCR, final, line)
	}
	for {
		select {
		case <-stop:
			print(true)
			return
		case <-t.C:
			print(false)
		}
	}
}

// progressLine prints one progress line: on a terminal (cr) it overwrites
// the previous one and only the final one ends the line.
func progressLine(w io.Writer, cr, final bool, line string) {
	switch {
	case cr && final:
		fmt.Fprintf(w, "\r%s\x1b[K\n", line)
	case cr:
		fmt.Fprintf(w, "\r%s\x1b[K", line)
	default:
		fmt.Fprintln(w, line)
	}
}
