package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Usage is the help text of `usher bench`.
const Usage = `usage: usher bench WORKLOAD [flags]

Load generator for IMAP, POP3 and LMTP servers (usher, the Dovecot director,
a Dovecot backend). Progress goes to stderr once a second, the summary to
stdout (text, or JSON with --json).

workloads:
  login   each client loops connect, (STARTTLS), LOGIN, SELECT INBOX, LOGOUT
          (--proto pop3: USER, PASS, STAT, QUIT); reports logins/s and the
          p50/p90/p99/p99.9/max of the LOGIN step and of the whole loop
  idle    opens --sessions sessions (--concurrency at a time), holds them for
          --hold (NOOP every --keepalive, or IDLE with --idle), logs them out;
          reports the setup time and, with --pid/--pid-cmd, the servers' RSS
          per session: (VmRSS after setup - before) / sessions
  fetch   each client logs in as one user and FETCHes BODY.PEEK[] of every
          message of --mailbox in a loop; reports MB/s. --setup first APPENDs
          messages until each such user's mailbox holds --setup-count
  lmtp    each client delivers --size messages to --rcpts recipients of the
          user range per transaction (MAIL, RCPT x R, DATA, one reply per
          recipient); reports deliveries/s, recipients/s and DATA latency

common flags:
  --target HOST:PORT   server; repeatable or a comma list. Several targets is
                       "direct" mode: user U goes to target FNV-1a(U) mod N,
                       spreading users like a director would (not to the
                       same backend usher picks). A UNIX socket is /path or
                       unix:/path. Without a port: 143/110/24 (993/995 --tls)
  --target-map FILE    lines "USER TARGET": exact targets per user (others
                       fall back to the --target hash), for a harness that
                       wants to pass usher's own mapping
  --users TEMPLATE     user names; one %d or %0Nd (default user%d@example.com)
  --user-range LO-HI   numbers for %d (default 1-50)
  --random             pick users at random (default: round robin)
  --password PASS      (default pass; never printed)
  --proto imap|pop3    login and idle (default imap)
  --concurrency N      parallel clients (default 10)
  --source ADDRS       connect from these local addresses, round robin (a
                       list, or a last-octet range 127.0.2.1-200): servers
                       limit connections per client address (usher's
                       max_sessions_per_ip is 50 by default)
  --duration D         run time (default 10s) ... or
  --count N            ... this many operations
  --timeout D          per operation: dial, each command and reply (10s)
  --starttls           STARTTLS (IMAP, LMTP) or STLS (POP3) after the greeting
  --tls                TLS from the first byte (imaps, pop3s)
  --insecure           do not verify the server certificate
  --cacert FILE        verify against these PEM CAs instead of the system's
  --json               print the result as JSON
  --progress=false     no progress lines
  --verbose            log every failed operation to stderr

idle:   --sessions N (100) --hold D (10s) --keepalive D (4m) --idle
        --settle D (1s: wait before reading RSS after setup)
        --pid PID (repeatable or comma list) --pid-children (and their
        descendants) --pid-cmd NAME (every process whose comm is NAME, a glob
        works too: 'imap*'; repeatable)
fetch:  --mailbox NAME (INBOX) --setup --setup-size SIZE (1MiB)
        --setup-count N (20)
lmtp:   --size SIZE (10KiB) --rcpts R (1) --from ADDR --lhlo NAME

SIZE is bytes with an optional k/KiB/M/MiB/KB/MB suffix.

Comparing a proxy with direct access: through a proxy the LOGIN step also
covers the proxy's connection to the backend (which a direct client pays at
connect time), so compare loop_ms and logins/s; latency_ms shows where the
time goes.

Exit status: 0 done (even with errors), 1 nothing succeeded or a setup
failure, 2 usage error.
`

// ErrUsage marks command-line mistakes.
var ErrUsage = errors.New("usage")

// ErrNothingSucceeded is returned (after the summary) when every operation failed.
var ErrNothingSucceeded = errors.New("no operation succeeded")

// listFlag is a repeatable flag whose values may also be comma lists.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// sizeFlag is a byte count with an optional unit.
type sizeFlag int

func (s *sizeFlag) String() string { return strconv.Itoa(int(*s)) }
func (s *sizeFlag) Set(v string) error {
	n, err := ParseSize(v)
	*s = sizeFlag(n)
	return err
}

// ParseSize parses "512", "10k", "10KiB", "1MiB", "1MB", "1G" (k, KiB,
// KB = 1024; M, MiB, MB = 1024²; G, GiB, GB = 1024³).
func ParseSize(v string) (int, error) {
	s := strings.TrimSpace(v)
	mult := 1
	lower := strings.ToLower(s)
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"kib", 1 << 10}, {"kb", 1 << 10}, {"k", 1 << 10}, {"mib", 1 << 20}, {"mb", 1 << 20}, {"m", 1 << 20},
		{"gib", 1 << 30}, {"gb", 1 << 30}, {"g", 1 << 30}, {"b", 1}} {
		if strings.HasSuffix(lower, u.suffix) {
			s, mult = strings.TrimSpace(s[:len(s)-len(u.suffix)]), u.mult
			break
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > (1<<31)/mult {
		return 0, fmt.Errorf("bad size %q", v)
	}
	return n * mult, nil
}

// Command runs `usher bench ARGS`: it parses the flags, runs the workload,
// prints progress to stderr and the summary to stdout. -h prints Usage and
// returns flag.ErrHelp; command-line mistakes wrap ErrUsage.
func Command(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, asJSON, err := parseArgs(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			_, _ = io.WriteString(stdout, Usage)
		}
		return err
	}
	res, err := Run(ctx, o)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return fmt.Errorf("bench: write result: %w", err)
		}
	} else {
		WriteText(stdout, res)
	}
	if res.Ops == 0 && res.ErrorsTotal > 0 {
		return ErrNothingSucceeded
	}
	return nil
}

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: bench: %s", ErrUsage, fmt.Sprintf(format, args...))
}

// parseArgs turns the command line into Options.
func parseArgs(args []string, stderr io.Writer) (o Options, asJSON bool, err error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var (
		targets, pids, comms, sources              listFlag
		targetMap, users, userRange, cacert, proto string
		insecure, progress, verbose                bool
		setupSize, size                            = sizeFlag(1 << 20), sizeFlag(10 << 10)
	)
	fs.Var(&targets, "target", "")
	fs.StringVar(&targetMap, "target-map", "", "")
	fs.StringVar(&users, "users", "user%d@example.com", "")
	fs.StringVar(&userRange, "user-range", "1-50", "")
	fs.BoolVar(&o.Random, "random", false, "")
	fs.StringVar(&o.Password, "password", "pass", "")
	fs.StringVar(&proto, "proto", "", "")
	fs.IntVar(&o.Concurrency, "concurrency", 10, "")
	fs.Var(&sources, "source", "")
	fs.DurationVar(&o.Duration, "duration", 0, "")
	fs.Int64Var(&o.Count, "count", 0, "")
	fs.DurationVar(&o.Timeout, "timeout", 10*time.Second, "")
	fs.BoolVar(&o.StartTLS, "starttls", false, "")
	fs.BoolVar(&o.ImplicitTLS, "tls", false, "")
	fs.BoolVar(&insecure, "insecure", false, "")
	fs.StringVar(&cacert, "cacert", "", "")
	fs.BoolVar(&asJSON, "json", false, "")
	fs.BoolVar(&progress, "progress", true, "")
	fs.BoolVar(&verbose, "verbose", false, "")
	fs.IntVar(&o.Idle.Sessions, "sessions", 100, "")
	fs.DurationVar(&o.Idle.Hold, "hold", 10*time.Second, "")
	fs.DurationVar(&o.Idle.Keepalive, "keepalive", 4*time.Minute, "")
	fs.BoolVar(&o.Idle.UseIDLE, "idle", false, "")
	fs.DurationVar(&o.Idle.Settle, "settle", time.Second, "")
	fs.Var(&pids, "pid", "")
	fs.Var(&comms, "pid-cmd", "")
	fs.BoolVar(&o.Idle.RSS.Children, "pid-children", false, "")
	fs.StringVar(&o.Fetch.Mailbox, "mailbox", "INBOX", "")
	fs.BoolVar(&o.Fetch.Setup, "setup", false, "")
	fs.Var(&setupSize, "setup-size", "")
	fs.IntVar(&o.Fetch.SetupCount, "setup-count", 20, "")
	fs.Var(&size, "size", "")
	fs.IntVar(&o.LMTP.Rcpts, "rcpts", 1, "")
	fs.StringVar(&o.LMTP.From, "from", "bench@usher.invalid", "")
	fs.StringVar(&o.LMTP.Helo, "lhlo", "bench.usher.invalid", "")

	// Flags may come before or after the workload.
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return o, false, err
			}
			return o, false, usageErr("%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) != 1 {
		return o, false, usageErr("give one workload (%s)", workloadNames)
	}
	o.Workload = pos[0]
	switch o.Workload {
	case "login", "idle", "fetch", "lmtp":
	default:
		return o, false, usageErr("unknown workload %q (want one of %s)", o.Workload, workloadNames)
	}
	o.Proto = proto
	if o.Duration > 0 && o.Count > 0 {
		return o, false, usageErr("give --duration or --count, not both")
	}
	if o.Workload == "idle" && (o.Duration > 0 || o.Count > 0) {
		return o, false, usageErr("idle runs --sessions for --hold; --duration and --count do not apply")
	}
	o.Fetch.SetupSize, o.LMTP.Size = int(setupSize), int(size)

	port := defaultPort(o.Workload, proto, o.ImplicitTLS)
	for i, t := range targets {
		targets[i] = withDefaultPort(t, port)
	}
	var m map[string]string
	if targetMap != "" {
		f, err := os.Open(targetMap)
		if err != nil {
			return o, false, fmt.Errorf("bench: %w", err)
		}
		m, err = ParseTargetMap(f)
		f.Close()
		if err != nil {
			return o, false, fmt.Errorf("bench: %s: %w", targetMap, err)
		}
	}
	if o.Targets, err = NewTargets(targets, m); err != nil {
		return o, false, usageErr("%v", err)
	}
	rng := userRange
	if !strings.Contains(users, "%") {
		rng = "" // a fixed user name
	}
	if o.Users, err = ParseUsers(users, rng); err != nil {
		return o, false, usageErr("%v", err)
	}

	for _, src := range sources {
		ips, err := ParseSources(src)
		if err != nil {
			return o, false, usageErr("%v", err)
		}
		o.Sources = append(o.Sources, ips...)
		if len(o.Sources) > maxSources {
			return o, false, usageErr("more than %d --source addresses", maxSources)
		}
	}
	for _, p := range pids {
		n, err := strconv.Atoi(p)
		if err != nil || n <= 0 {
			return o, false, usageErr("--pid %q is not a process id", p)
		}
		o.Idle.RSS.PIDs = append(o.Idle.RSS.PIDs, n)
	}
	o.Idle.RSS.Comms = comms
	if o.Idle.RSS.Children && len(o.Idle.RSS.PIDs) == 0 {
		return o, false, usageErr("--pid-children needs --pid")
	}

	if o.StartTLS || o.ImplicitTLS {
		o.TLS = &tls.Config{InsecureSkipVerify: insecure}
		if cacert != "" {
			pem, err := os.ReadFile(cacert)
			if err != nil {
				return o, false, fmt.Errorf("bench: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return o, false, fmt.Errorf("bench: %s: no PEM certificate", cacert)
			}
			o.TLS.RootCAs = pool
		}
	} else if insecure || cacert != "" {
		return o, false, usageErr("--insecure and --cacert need --starttls or --tls")
	}

	o.ErrorPause = 10 * time.Millisecond
	if progress {
		o.Progress = stderr
		if f, ok := stderr.(*os.File); ok {
			if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
				o.ProgressCR = true
			}
		}
	}
	if verbose {
		o.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if err := o.check(); err != nil {
		return o, false, usageErr("%v", err)
	}
	return o, asJSON, nil
}

// maxSources bounds --source.
const maxSources = 65536

// ParseSources parses one --source value: an IP address, or an IPv4 range
// of the last octet, "127.0.2.1-200".
func ParseSources(v string) ([]net.IP, error) {
	first, last, isRange := strings.Cut(v, "-")
	ip := net.ParseIP(strings.TrimSpace(first))
	if ip == nil {
		return nil, fmt.Errorf("--source %q: not an IP address", v)
	}
	if !isRange {
		return []net.IP{ip}, nil
	}
	v4 := ip.To4()
	hi, err := strconv.Atoi(strings.TrimSpace(last))
	if v4 == nil || err != nil || hi < int(v4[3]) || hi > 255 {
		return nil, fmt.Errorf("--source %q: want an IPv4 range like 127.0.2.1-200", v)
	}
	var out []net.IP
	for n := int(v4[3]); n <= hi; n++ {
		out = append(out, net.IPv4(v4[0], v4[1], v4[2], byte(n)))
	}
	return out, nil
}

func defaultPort(workload, proto string, implicitTLS bool) string {
	switch {
	case workload == "lmtp":
		return "24"
	case proto == "pop3" && implicitTLS:
		return "995"
	case proto == "pop3":
		return "110"
	case implicitTLS:
		return "993"
	default:
		return "143"
	}
}

// withDefaultPort adds port to a target that has none.
func withDefaultPort(t, port string) string {
	if isUnixTarget(t) {
		return t
	}
	if _, _, err := net.SplitHostPort(t); err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) && strings.Contains(ae.Err, "missing port") {
			return net.JoinHostPort(strings.Trim(t, "[]"), port)
		}
	}
	return t
}

// WriteText prints a human-readable summary of r.
func WriteText(w io.Writer, r *Result) {
	fmt.Fprintf(w, "workload     %s (%s, tls %s)\n", r.Workload, r.Proto, r.TLS)
	fmt.Fprintf(w, "targets      %s (%s)\n", strings.Join(r.Targets, " "), r.Mode)
	fmt.Fprintf(w, "users        %d, concurrency %d\n", r.Users, r.Concurrency)
	if r.SetupS > 0 {
		fmt.Fprintf(w, "setup        %.3f s\n", r.SetupS)
	}
	fmt.Fprintf(w, "duration     %.3f s\n", r.DurationS)
	fmt.Fprintf(w, "ops          %d (%.1f/s)\n", r.Ops, r.OpsPerS)
	fmt.Fprintf(w, "errors       %d\n", r.ErrorsTotal)
	kinds := make([]string, 0, len(r.Errors))
	for k := range r.Errors {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	for _, k := range kinds {
		fmt.Fprintf(w, "  %-22s %d  e.g. %s\n", k, r.Errors[k], r.ErrorSamples[k])
	}
	pct := func(name, of string, p Percentiles) {
		if p.Count == 0 {
			return
		}
		fmt.Fprintf(w, "%-12s p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f ms  (n=%d; %s)\n",
			name, p.P50, p.P90, p.P99, p.P999, p.Max, p.Count, of)
	}
	pct("latency", r.LatencyOf, r.Latency)
	pct("loop", r.LoopOf, r.Loop)
	if s := r.LoginStats; s != nil {
		fmt.Fprintf(w, "logins/s     %.1f\n", s.LoginsPerS)
	}
	if s := r.IdleStats; s != nil {
		fmt.Fprintf(w, "sessions     %d of %d established (%.1f/s), held %.1f s (%s), lost %d, keepalives %d, logout errors %d\n",
			s.Established, s.Sessions, s.SessionsPerS, s.HoldS, s.KeepaliveMode, s.Lost, s.Keepalives, s.LogoutErrors)
		if m := s.RSSStats; m != nil {
			fmt.Fprintf(w, "rss          before %d KiB (%d processes), after %d KiB (%d processes): %.1f KiB per session\n",
				m.BeforeKiB, m.PIDsBefore, m.AfterKiB, m.PIDsAfter, m.PerSessionKiB)
		}
	}
	if s := r.FetchStats; s != nil {
		if s.SetupAppended > 0 {
			fmt.Fprintf(w, "appended     %d messages (setup)\n", s.SetupAppended)
		}
		fmt.Fprintf(w, "fetched      %d messages, %d bytes: %.1f MB/s, %.1f messages/s (%s)\n",
			s.Messages, s.Bytes, s.MBPerS, s.MessagesPerS, s.Mailbox)
	}
	if s := r.LMTPStats; s != nil {
		fmt.Fprintf(w, "deliveries   %d (%.1f/s) of %d bytes, %d rcpts each\n", s.Deliveries, s.DeliveriesPerS, s.MessageBytes, s.RcptsPerMessage)
		fmt.Fprintf(w, "recipients   %d delivered (%.1f/s), %d rejected at RCPT, %d failed after DATA\n",
			s.Recipients, s.RecipientsPerS, s.RcptRejected, s.DataFailed)
	}
}
