// Package bench is usher's load generator (`usher bench`): it speaks IMAP,
// POP3 and LMTP as a client to any server — usher, the Dovecot director or
// a Dovecot backend — and measures login rates, latency percentiles,
// per-session memory, fetch throughput and delivery rates.
//
// Workloads: login (connect, LOGIN, SELECT INBOX or STAT, LOGOUT in a loop),
// idle (open and hold many sessions, measure setup time and the server's
// RSS per session), fetch (FETCH every message's body in a loop, MB/s) and
// lmtp (deliveries/s to one or more recipients per message).
//
// Invariants: every client read and write has a deadline (the per-operation
// timeout), every reply line and literal has a cap (maxReplyLine,
// maxLiteral); literals are discarded as they stream in, never buffered;
// each worker records latencies into its own Histogram, merged at the end,
// so the hot path takes no locks; passwords are never logged or printed;
// an interrupt stops the run early and the summary still reports every
// operation that completed.
package bench

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strings"
	"time"
)

// Options configure a run. Options.Run checks them.
type Options struct {
	Workload    string // login, idle, fetch or lmtp
	Proto       string // imap or pop3 for login and idle; fetch is imap, lmtp is lmtp
	Targets     *Targets
	Users       UserSet
	Random      bool // pick users at random instead of round robin
	Password    string
	Concurrency int
	Duration    time.Duration // login, fetch, lmtp: how long to run
	Count       int64         // login, fetch, lmtp: how many operations instead
	Timeout     time.Duration // per operation (dial, each command and its reply)
	StartTLS    bool          // STARTTLS (IMAP, LMTP) or STLS (POP3) after the greeting
	ImplicitTLS bool          // TLS from the first byte
	TLS         *tls.Config   // for either; nil verifies against the system roots
	ErrorPause  time.Duration // a worker waits this long after a failure
	Sources     []net.IP      // local addresses to connect from, round robin

	Progress   io.Writer // progress lines; nil = none
	ProgressCR bool      // progress overwrites one terminal line
	Interval   time.Duration
	Logger     *slog.Logger // failed operations at debug level; nil = none

	Idle  IdleOptions
	Fetch FetchOptions
	LMTP  LMTPOptions
}

// IdleOptions configure the idle workload.
type IdleOptions struct {
	Sessions  int           // how many sessions to open
	Hold      time.Duration // how long to hold them
	Keepalive time.Duration // NOOP (or IDLE renewal) interval while holding
	UseIDLE   bool          // hold in IDLE (RFC 2177) instead of sending NOOPs
	Settle    time.Duration // wait after setup before reading RSS again
	RSS       RSSOptions    // whose memory to measure; empty = none
}

// FetchOptions configure the fetch workload.
type FetchOptions struct {
	Mailbox    string // default INBOX
	Setup      bool   // first APPEND messages until each user's mailbox holds SetupCount
	SetupSize  int    // bytes per appended message
	SetupCount int
}

// LMTPOptions configure the lmtp workload.
type LMTPOptions struct {
	Size  int    // message size in bytes
	Rcpts int    // recipients per message
	From  string // envelope sender
	Helo  string // LHLO name
}

// Result is a run's summary; it marshals to the stable JSON that
// `usher bench --json` prints. Workload-specific fields appear only for
// their workload (nil embedded structs are left out).
type Result struct {
	Workload     string            `json:"workload"`
	Proto        string            `json:"proto"`
	Targets      []string          `json:"targets"`
	Mode         string            `json:"mode"` // single, direct or map (see Targets)
	Users        int               `json:"users"`
	Concurrency  int               `json:"concurrency"`
	Sources      int               `json:"sources"` // local addresses connected from (0: default)
	TLS          string            `json:"tls"`     // none, starttls or implicit
	DurationS    float64           `json:"duration_s"`
	SetupS       float64           `json:"setup_s"`
	Ops          int64             `json:"ops"`
	OpsPerS      float64           `json:"ops_per_s"`
	ErrorsTotal  int64             `json:"errors_total"`
	Errors       map[string]int64  `json:"errors"`
	ErrorSamples map[string]string `json:"error_samples"`
	LatencyOf    string            `json:"latency_of"`
	Latency      Percentiles       `json:"latency_ms"`
	LoopOf       string            `json:"loop_of"`
	Loop         Percentiles       `json:"loop_ms"`
	*LoginStats
	*IdleStats
	*FetchStats
	*LMTPStats
}

// LoginStats are the login workload's extra numbers.
type LoginStats struct {
	LoginsPerS float64 `json:"logins_per_s"` // completed loops per second
}

// IdleStats are the idle workload's extra numbers.
type IdleStats struct {
	Sessions      int     `json:"sessions"`
	Established   int     `json:"sessions_established"`
	SessionsPerS  float64 `json:"sessions_per_s"`
	HoldS         float64 `json:"hold_s"`
	Lost          int     `json:"sessions_lost"` // failed while held
	Keepalives    int64   `json:"keepalives"`
	LogoutErrors  int64   `json:"logout_errors"`
	KeepaliveMode string  `json:"keepalive_mode"` // noop or idle
	*RSSStats
}

// RSSStats is the measured memory of the processes given with --pid/--pid-cmd.
type RSSStats struct {
	PIDsBefore       int     `json:"rss_processes_before"`
	PIDsAfter        int     `json:"rss_processes_after"`
	BeforeKiB        int64   `json:"rss_before_kib"`
	AfterKiB         int64   `json:"rss_after_kib"`
	PerSessionKiB    float64 `json:"rss_per_session_kib"`
	MeasuredSessions int     `json:"rss_sessions"`
}

// FetchStats are the fetch workload's extra numbers.
type FetchStats struct {
	Mailbox       string  `json:"mailbox"`
	SetupAppended int64   `json:"setup_appended"`
	Bytes         int64   `json:"bytes"`
	Messages      int64   `json:"messages"`
	MBPerS        float64 `json:"mb_per_s"` // 10^6 bytes per second
	MessagesPerS  float64 `json:"messages_per_s"`
}

// LMTPStats are the lmtp workload's extra numbers.
type LMTPStats struct {
	MessageBytes    int     `json:"message_bytes"`
	RcptsPerMessage int     `json:"rcpts_per_message"`
	Deliveries      int64   `json:"deliveries"` // transactions with every recipient delivered
	DeliveriesPerS  float64 `json:"deliveries_per_s"`
	Recipients      int64   `json:"recipients"` // per-recipient 2xx replies after DATA
	RecipientsPerS  float64 `json:"recipients_per_s"`
	RcptRejected    int64   `json:"rcpt_rejected"`
	DataFailed      int64   `json:"data_failed"`
}

// workloadNames lists the workloads, for messages.
const workloadNames = "login, idle, fetch, lmtp"

// check validates o and fills in defaults.
func (o *Options) check() error {
	switch o.Workload {
	case "login", "idle":
		if o.Proto == "" {
			o.Proto = "imap"
		}
		if o.Proto != "imap" && o.Proto != "pop3" {
			return fmt.Errorf("%s workload: proto must be imap or pop3, not %q", o.Workload, o.Proto)
		}
	case "fetch":
		if o.Proto != "" && o.Proto != "imap" {
			return fmt.Errorf("fetch workload: proto must be imap, not %q", o.Proto)
		}
		o.Proto = "imap"
	case "lmtp":
		if o.Proto != "" && o.Proto != "lmtp" {
			return fmt.Errorf("lmtp workload: proto must be lmtp, not %q", o.Proto)
		}
		o.Proto = "lmtp"
	default:
		return fmt.Errorf("unknown workload %q (want one of %s)", o.Workload, workloadNames)
	}
	if o.Targets == nil {
		return errors.New("no target")
	}
	if o.Users.Len() == 0 {
		return errors.New("no users")
	}
	if o.Workload != "lmtp" && strings.ContainsAny(o.Password, "\r\n\x00") {
		return errors.New("the password must not contain CR, LF or NUL")
	}
	if o.Proto == "pop3" && strings.ContainsAny(o.Users.User(0)+o.Password, " ") {
		return errors.New("POP3 USER/PASS cannot carry spaces in the user name or password")
	}
	if o.StartTLS && o.ImplicitTLS {
		return errors.New("give --starttls or --tls, not both")
	}
	o.Concurrency = max(o.Concurrency, 1)
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Duration < 0 || o.Count < 0 {
		return errors.New("duration and count must not be negative")
	}
	if o.Duration == 0 && o.Count == 0 && o.Workload != "idle" {
		o.Duration = 10 * time.Second
	}
	if err := o.Targets.covers(o.Users); err != nil {
		return err
	}
	switch o.Workload {
	case "idle":
		if o.Idle.Sessions <= 0 {
			return errors.New("idle workload: sessions must be positive")
		}
		if o.Idle.UseIDLE && o.Proto != "imap" {
			return errors.New("idle workload: IDLE is IMAP only")
		}
		if o.Idle.Keepalive <= 0 {
			o.Idle.Keepalive = 4 * time.Minute
		}
	case "fetch":
		if o.Fetch.Mailbox == "" {
			o.Fetch.Mailbox = "INBOX"
		}
		if strings.ContainsAny(o.Fetch.Mailbox, "\r\n\x00") {
			return errors.New("fetch workload: bad mailbox name")
		}
		if o.Fetch.Setup && (o.Fetch.SetupCount <= 0 || o.Fetch.SetupSize <= 0 || o.Fetch.SetupSize > maxLiteral) {
			return fmt.Errorf("fetch workload: setup needs a positive count and a size up to %d bytes", maxLiteral)
		}
	case "lmtp":
		if o.LMTP.Size <= 0 || o.LMTP.Size > maxLiteral {
			return fmt.Errorf("lmtp workload: size must be 1..%d bytes", maxLiteral)
		}
		o.LMTP.Rcpts = max(o.LMTP.Rcpts, 1)
		if o.LMTP.From == "" {
			o.LMTP.From = "bench@usher.invalid"
		}
		if o.LMTP.Helo == "" {
			o.LMTP.Helo = "bench.usher.invalid"
		}
		if strings.ContainsAny(o.LMTP.From+o.LMTP.Helo, "\r\n\x00<> ") {
			return errors.New("lmtp workload: bad sender or LHLO name")
		}
	}
	return nil
}

// covers checks that every user has a target (only a map without a
// --target list can miss some).
func (t *Targets) covers(u UserSet) error {
	if len(t.list) > 0 {
		return nil
	}
	for i := range u.Len() {
		if _, err := t.For(u.User(i)); err != nil {
			return err
		}
	}
	return nil
}

// env is what every workload shares.
type env struct {
	o     *Options
	dial  *dialConfig
	pick  *userPicker
	runID string // makes Message-IDs unique across runs
}

// Run checks o and runs its workload until it ends or ctx is cancelled.
func Run(ctx context.Context, o Options) (*Result, error) {
	if err := o.check(); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	var id [6]byte
	_, _ = rand.Read(id[:])
	e := &env{
		o: &o,
		dial: &dialConfig{
			Timeout:     o.Timeout,
			TLS:         o.TLS,
			ImplicitTLS: o.ImplicitTLS,
			StartTLS:    o.StartTLS,
			Sources:     o.Sources,
		},
		pick:  &userPicker{users: o.Users, random: o.Random},
		runID: hex.EncodeToString(id[:]),
	}
	switch o.Workload {
	case "login":
		return runLogin(ctx, e)
	case "idle":
		return runIdle(ctx, e)
	case "fetch":
		return runFetch(ctx, e)
	default:
		return runLMTP(ctx, e)
	}
}

// runner returns a Runner with the common options.
func (e *env) runner(label string) *Runner {
	return &Runner{
		Concurrency: e.o.Concurrency,
		Duration:    e.o.Duration,
		Count:       e.o.Count,
		Progress:    e.o.Progress,
		ProgressCR:  e.o.ProgressCR,
		Interval:    e.o.Interval,
		ErrorPause:  e.o.ErrorPause,
		Label:       label,
		Logger:      e.logger(),
	}
}

func (e *env) logger() *slog.Logger {
	if e.o.Logger == nil {
		return nil
	}
	return e.o.Logger.With("proto", e.o.Proto, "workload", e.o.Workload)
}

// result fills the common fields from a run's outcome.
func (e *env) result(out *Outcome) *Result {
	o := e.o
	tlsMode := "none"
	switch {
	case o.StartTLS:
		tlsMode = "starttls"
	case o.ImplicitTLS:
		tlsMode = "implicit"
	}
	return &Result{
		Workload:     o.Workload,
		Proto:        o.Proto,
		Targets:      o.Targets.All(),
		Mode:         o.Targets.Mode(),
		Users:        o.Users.Len(),
		Concurrency:  o.Concurrency,
		Sources:      len(o.Sources),
		TLS:          tlsMode,
		DurationS:    round3(out.Elapsed.Seconds()),
		Ops:          out.Ops,
		OpsPerS:      rate(out.Ops, out.Elapsed),
		ErrorsTotal:  out.ErrorCount(),
		Errors:       out.Errors,
		ErrorSamples: out.Samples,
		Latency:      out.Latency.Summary(),
		Loop:         out.Loop.Summary(),
	}
}

// rate is n per second over d, rounded to 0.001.
func rate(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return round3(float64(n) / d.Seconds())
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// addErrors merges a phase's error counts into r.
func (r *Result) addErrors(t *tally) {
	errs, samples := t.snapshot()
	for k, v := range errs {
		r.Errors[k] += v
		r.ErrorsTotal += v
	}
	for k, v := range samples {
		if _, ok := r.ErrorSamples[k]; !ok {
			r.ErrorSamples[k] = v
		}
	}
}
