// Command compare is usher's side-by-side benchmark (`make bench`,
// bench/compare.sh): it runs the same workloads against three setups in
// front of the same real Dovecot 2.3 backends and reports them together:
//
//   - direct: the load tool connects to the backends itself, each user to
//     the backend usher pinned it to (a --target-map file), so that direct
//     spreads users exactly as usher does;
//   - usher: `usher serve` with IMAP, POP3 and LMTP listeners;
//   - director: a Dovecot 2.3 director instance in proxy mode with its login
//     services in high-performance mode.
//
// The load comes from `usher bench` (or --bench-cmd). Each workload runs
// against the three setups in turn, in a rotated order each round, for
// --rounds rounds. Around every run the command reads /proc to charge the
// CPU time of the proxy (usher's process, or every process of the director
// instance, found through its master's process tree) and of the backends,
// and during idle runs it samples their resident memory. It prints and
// writes the medians, the ratios usher/direct and usher/director and a
// PASS/MISS verdict for each of usher's targets, as JSON, as a Markdown
// table (optionally spliced into docs/BENCHMARKS.md) and as a PNG chart.
//
// Invariants: every process it starts (backends, usher, the director, the
// load tool) runs in its own process group with a parent-death signal and
// is stopped on return, on error and on SIGINT/SIGTERM; a failed run is
// recorded and left out of the medians, never silently averaged in; the
// backends, their limits and their users are the same for all setups.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/usher-mail/usher/test"
)

// options are the command-line flags.
type options struct {
	rounds          int
	duration        time.Duration
	warmup          time.Duration
	usherBin        string
	benchCmd        string
	outDir          string
	chart           string
	markdown        string
	doc             string
	backends, users int
	concurrency     int
	idleSessions    int
	idleConcurrency int
	hold            time.Duration
	fetchUsers      int
	fetchCount      int
	fetchSize       string
	lmtpSize        string
	lmtpRcpts       int
	workloads       string
	usherHost       string
	directorAddr    string
	cores           int
	strict          bool
	serve           bool
	profile         string
	lockWait        time.Duration
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal the run stops cleanly; a second one kills.
		<-ctx.Done()
		stop()
	}()
	rep, err := run(ctx, o, log)
	stop()
	if err != nil {
		log.Error("benchmark failed", "err", err)
		os.Exit(1)
	}
	if o.strict && rep != nil && rep.missed() {
		os.Exit(3)
	}
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("compare", flag.ContinueOnError)
	fs.IntVar(&o.rounds, "rounds", 3, "rounds; each runs every workload against every setup once")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "length of one measured run")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "length of the unmeasured warm-up run per workload and setup (0: none)")
	fs.StringVar(&o.usherBin, "usher", "", "usher binary (default: build ./cmd/usher)")
	fs.StringVar(&o.benchCmd, "bench-cmd", "", "load tool command, split at spaces (default: \"USHER bench\")")
	fs.StringVar(&o.outDir, "out", "bench/results", "directory for results.json, results.md and the logs of failed runs")
	fs.StringVar(&o.chart, "chart", "docs/benchmark.png", "PNG chart to write (\"\": none)")
	fs.StringVar(&o.markdown, "markdown", "", "also write the Markdown results here")
	fs.StringVar(&o.doc, "doc", "", "Markdown file whose section between <!-- results:begin --> and <!-- results:end --> is replaced by the results")
	fs.IntVar(&o.backends, "backends", 3, "Dovecot backends")
	fs.IntVar(&o.users, "users", 500, "users user1@example.com … userN@example.com")
	fs.IntVar(&o.concurrency, "concurrency", 16, "concurrent clients of the login, fetch and LMTP runs")
	fs.IntVar(&o.idleSessions, "idle-sessions", 2000, "sessions the idle runs hold open")
	fs.IntVar(&o.idleConcurrency, "idle-concurrency", 50, "sessions the idle runs open at a time")
	fs.DurationVar(&o.hold, "hold", 5*time.Second, "how long the idle runs hold their sessions")
	fs.IntVar(&o.fetchUsers, "fetch-users", 20, "users 1..N get the fetch mailboxes (the LMTP runs deliver to the others)")
	fs.IntVar(&o.fetchCount, "fetch-count", 10, "messages per fetch mailbox")
	fs.StringVar(&o.fetchSize, "fetch-size", "1MiB", "size of each fetch message")
	fs.StringVar(&o.lmtpSize, "lmtp-size", "10KiB", "size of each LMTP message")
	fs.IntVar(&o.lmtpRcpts, "lmtp-rcpts", 1, "recipients per LMTP transaction")
	fs.StringVar(&o.workloads, "workloads", "imap-login,pop3-login,fetch,lmtp,idle", "workloads to run, comma-separated")
	fs.StringVar(&o.usherHost, "usher-host", "127.0.0.1", "address of usher's listeners (ports 143, 110, 24 when free)")
	fs.StringVar(&o.directorAddr, "director-addr", "127.0.2.1", "address of the Dovecot director's listeners (ports 143, 110, 24)")
	fs.IntVar(&o.cores, "login-processes", runtime.NumCPU(), "process_min_avail of the Dovecot login services (default: one per core)")
	fs.BoolVar(&o.strict, "strict", false, "exit 3 when a target is missed")
	fs.BoolVar(&o.serve, "serve", false, "set everything up (backends, usher, director, warm-up), print the addresses, and keep it running until interrupted instead of measuring")
	fs.StringVar(&o.profile, "profile", "", "after the rounds, run these workloads (comma-separated) against usher and the director once more under `perf record` and write the hottest symbols to OUT/perf-*.txt")
	fs.DurationVar(&o.lockWait, "lock-wait", 15*time.Minute, "how long to wait for other users of the backend ports (e2e tests, make demo)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case o.rounds < 1:
		return o, fmt.Errorf("--rounds %d: need at least 1", o.rounds)
	case o.duration < time.Second:
		return o, fmt.Errorf("--duration %v: need at least 1s", o.duration)
	case o.concurrency < 1 || o.idleSessions < 1 || o.idleConcurrency < 1 || o.cores < 1:
		return o, errors.New("--concurrency, --idle-sessions, --idle-concurrency and --login-processes must be at least 1")
	case o.fetchUsers < 1 || o.fetchUsers >= o.users:
		return o, fmt.Errorf("--fetch-users %d: must be 1..%d (below --users)", o.fetchUsers, o.users-1)
	case o.lmtpRcpts < 1 || o.lmtpRcpts > o.users-o.fetchUsers:
		return o, fmt.Errorf("--lmtp-rcpts %d: must be 1..%d", o.lmtpRcpts, o.users-o.fetchUsers)
	}
	if _, err := parseSize(o.fetchSize); err != nil {
		return o, fmt.Errorf("--fetch-size: %w", err)
	}
	if _, err := selectWorkloads(o.workloads); err != nil {
		return o, err
	}
	if o.profile != "" {
		if _, err := selectWorkloads(o.profile); err != nil {
			return o, fmt.Errorf("--profile: %w", err)
		}
		if _, err := exec.LookPath("perf"); err != nil {
			return o, fmt.Errorf("--profile needs perf (Debian: linux-perf): %w", err)
		}
	}
	return o, nil
}

// parseSize reads "10KiB", "1MiB", "512" (bytes).
func parseSize(s string) (int, error) {
	mult := 1
	num := s
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"K", 1 << 10}, {"M", 1 << 20}, {"B", 1}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			num, mult = n, u.mult
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(num))
	if err != nil || n < 1 || n > (64<<20)/mult {
		return 0, fmt.Errorf("size %q: want 1B..64MiB, e.g. 10KiB", s)
	}
	return n * mult, nil
}

// raiseFileLimit raises RLIMIT_NOFILE as far as it may (the hard limit up
// to fs.nr_open when the process may raise it, else the soft limit to the
// hard one), so that the processes started here, which inherit it, can
// hold thousands of sessions. It returns the soft limit now in force.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("raise file limit: %w", err)
	}
	want := uint64(1 << 17)
	if data, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64); err == nil && n < want {
			want = n
		}
	}
	if lim.Max < want {
		raised := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err == nil {
			return want, nil
		}
	}
	// Setting it explicitly also stops Go from restoring the original soft
	// limit in the children it starts.
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("raise file limit to %d: %w", lim.Cur, err)
	}
	return lim.Cur, nil
}

// benchTool is the load tool's command line prefix.
func benchTool(o options, usherBin string) []string {
	if o.benchCmd != "" {
		return strings.Fields(o.benchCmd)
	}
	return []string{usherBin, "bench"}
}

// checkBenchTool fails unless `TOOL --help` runs.
func checkBenchTool(ctx context.Context, tool []string) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool[0], append(append([]string(nil), tool[1:]...), "--help")...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("load tool %q does not run (%w): %s (usher bench may not be built in yet; pass --bench-cmd)",
			strings.Join(tool, " "), err, strings.TrimSpace(string(truncate(out, 400))))
	}
	return nil
}

// run sets everything up, runs the rounds and writes the report.
func run(ctx context.Context, o options, log *slog.Logger) (_ *report, err error) {
	if err := test.DovecotAvailable(); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	if _, err := os.Stat("/usr/lib/dovecot/director"); err != nil {
		return nil, fmt.Errorf("compare: the Dovecot 2.3 director is missing: %w", err)
	}
	nofile, err := raiseFileLimit()
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	if need := uint64(3*o.idleSessions + 1000); nofile < need {
		log.Warn("file limit may be too low for the idle runs", "limit", nofile, "need", need)
	}
	wls, _ := selectWorkloads(o.workloads)
	if err := os.MkdirAll(o.outDir, 0o755); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	tmp, err := os.MkdirTemp("", "usher-bench-")
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}

	usherBin := o.usherBin
	if usherBin == "" {
		log.Info("building usher")
		if usherBin, err = test.BuildUsher(tmp); err != nil {
			return nil, fmt.Errorf("compare: %w", err)
		}
	}
	if usherBin, err = filepath.Abs(usherBin); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	tool := benchTool(o, usherBin)
	if err := checkBenchTool(ctx, tool); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	machine := describeMachine(usherBin)
	log.Info("machine", "cpu", machine.CPU, "cpus", machine.CPUs, "mem_gib", machine.MemGiB, "load", machine.LoadStart)

	log.Info("starting Dovecot backends", "n", o.backends, "users", o.users)
	b, err := test.StartBackends(test.BackendOptions{N: o.backends, Users: o.users, LockWait: o.lockWait})
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	defer func() {
		if cerr := b.Close(); cerr != nil {
			log.Error("stop backends", "err", cerr)
		}
	}()
	if err := tuneBackends(b, o.cores); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	users := make([]string, o.users)
	for i := range users {
		users[i] = fmt.Sprintf("user%d@example.com", i+1)
	}
	if err := fillFetchMailboxes(b, users[:o.fetchUsers], o.fetchCount, o.fetchSize); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}

	// usher, in its own directory so that a restart keeps its state file.
	uDir := filepath.Join(tmp, "usher")
	if err := os.Mkdir(uDir, 0o755); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	var uPorts [3]int
	for i, p := range []int{test.PortIMAP, test.PortPOP3, test.PortLMTP} {
		if uPorts[i], err = pickPort(o.usherHost, p); err != nil {
			return nil, fmt.Errorf("compare: %w", err)
		}
	}
	u, err := test.LaunchUsher(test.UsherOptions{
		Bin: usherBin, Dir: uDir, StartTimeout: 20 * time.Second,
		Config: usherConfig(o.usherHost, uPorts[0], uPorts[1], uPorts[2], uDir, b.Addrs()),
	})
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	defer func() {
		if serr := u.Stop(); serr != nil {
			log.Error("stop usher", "err", serr)
		}
	}()
	log.Info("usher started", "pid", u.PID(), "imap", u.IMAPAddr(), "pop3", u.POP3Addr(), "lmtp", u.Listeners("lmtp"))

	d, err := startDirector(directorOptions{
		Addr: o.directorAddr, IMAPPort: test.PortIMAP, POP3Port: test.PortPOP3, LMTPPort: test.PortLMTP,
		MailServers: b.Addrs(), Cores: o.cores, CheckUser: users[0], CheckPassword: b.Password(),
		StartTimeout: 30 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	defer func() {
		if cerr := d.close(); cerr != nil {
			log.Error("stop director", "err", cerr)
		}
	}()
	log.Info("Dovecot director started", "pid", d.pid(), "addr", o.directorAddr)
	var r *runner
	defer func() { // runs before the stops above
		restarts := func() []string { return nil }
		if r != nil {
			restarts = r.restartLog
		}
		saveWarnings(log, o.outDir, b, u, d, restarts)
	}()

	// Pin every user in usher, then give direct the same spread.
	log.Info("warm-up: one login per user through usher and through the director", "users", len(users))
	if err := warmUsers(ctx, u.IMAPAddr(), users, b.Password(), 8); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	if err := warmUsers(ctx, hostPort(o.directorAddr, test.PortIMAP), users, b.Password(), 8); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	backendOf, err := pinnedBackends(u, users)
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	log.Info("users pinned by usher", "spread", spread(backendOf))
	logDirectorSpread(log, d)

	targets, err := makeTargets(tmp, b, u, d, o, users, backendOf)
	if err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}
	if err := sanityCheck(targets, users, b.Password(), o.fetchUsers); err != nil {
		return nil, fmt.Errorf("compare: %w", err)
	}

	if o.serve {
		for _, t := range targets {
			log.Info("serving", "target", t.name, "imap", t.addrs["imap"], "pop3", t.addrs["pop3"], "lmtp", t.addrs["lmtp"], "maps", t.maps)
		}
		log.Info("serving until interrupted", "usher_pid", u.PID(), "director_pid", d.pid(), "users", fmt.Sprintf("user1..%d@example.com", len(users)), "password", b.Password())
		<-ctx.Done()
		return nil, nil
	}
	r = &runner{o: o, log: log, tool: tool, backends: b, users: users, password: b.Password(), outDir: o.outDir}
	rep := &report{Started: time.Now().UTC(), Machine: machine, Options: o.summary(), Pinned: spread(backendOf)}
	if o.warmup > 0 {
		for _, w := range wls {
			if w.tool == "idle" {
				continue
			}
			for _, t := range targets {
				if !w.runsOn(t.name) {
					continue
				}
				log.Info("warm-up run", "workload", w.key, "target", t.name)
				if _, err := r.runOne(ctx, w, t, 0, o.warmup); err != nil && ctx.Err() != nil {
					return nil, fmt.Errorf("compare: %w", ctx.Err())
				}
			}
		}
	}
	for round := 1; round <= o.rounds; round++ {
		for _, w := range wls {
			for i := range targets {
				// Rotate the order each round so that drift (a neighbour's
				// load, growing mailboxes) does not favour one setup.
				t := targets[(i+round-1)%len(targets)]
				if !w.runsOn(t.name) {
					continue
				}
				run, err := r.runOne(ctx, w, t, round, o.duration)
				if ctx.Err() != nil {
					return nil, fmt.Errorf("compare: interrupted: %w", ctx.Err())
				}
				if err != nil {
					log.Error("run failed", "round", round, "workload", w.key, "target", t.name, "err", err)
				} else {
					log.Info("run", "round", round, "workload", w.key, "target", t.name,
						w.metricName, fmt.Sprintf("%.1f", run.metric), "p99_ms", run.Result.Latency.P99,
						"errors", run.Result.ErrorsTotal, "proxy_cpu_ms_per", fmt.Sprintf("%.1f/%s", run.ProxyCPUPerUnit, w.cpuPer))
				}
				rep.Runs = append(rep.Runs, run)
			}
		}
	}
	if o.profile != "" {
		pws, _ := selectWorkloads(o.profile)
		for _, w := range pws {
			for _, t := range targets[1:] { // usher, director
				p, err := r.profile(ctx, w, t, o.duration, tmp)
				if ctx.Err() != nil {
					return nil, fmt.Errorf("compare: interrupted: %w", ctx.Err())
				}
				if err != nil {
					log.Error("profile", "workload", w.key, "target", t.name, "err", err)
					continue
				}
				log.Info("profile written", "workload", w.key, "target", t.name, "file", p)
				rep.Profiles = append(rep.Profiles, p)
			}
		}
	}
	rep.Finished = time.Now().UTC()
	rep.Machine.LoadEnd = loadAvg()
	rep.summarize(wls)
	if err := rep.write(o, wls, log); err != nil {
		return rep, fmt.Errorf("compare: %w", err)
	}
	fmt.Print(rep.markdown(wls))
	return rep, nil
}

// fillFetchMailboxes drops count messages of size into each user's INBOX.
func fillFetchMailboxes(b *test.Backends, users []string, count int, size string) error {
	n, err := parseSize(size)
	if err != nil {
		return fmt.Errorf("fill fetch mailboxes: %w", err)
	}
	const line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
	for _, u := range users {
		for i := range count {
			head := fmt.Sprintf("From: bench <bench@example.com>\r\nTo: %s\r\nSubject: fetch %d\r\nMessage-ID: <fetch-%d-%s>\r\n\r\n", u, i, i, u)
			body := strings.Repeat(line, max(1, (n-len(head))/len(line)))
			if _, err := b.Deliver(u, []byte(head+body)); err != nil {
				return fmt.Errorf("fill fetch mailboxes: %w", err)
			}
		}
	}
	return nil
}

// sanityCheck logs in over IMAP and POP3 and delivers one LMTP message
// through every setup, so that a broken setup fails before the rounds.
func sanityCheck(targets []*target, users []string, pass string, fetchUsers int) error {
	u := users[fetchUsers] // not a fetch user: the LMTP message lands here
	msg := []byte("From: bench <bench@example.com>\r\nSubject: sanity\r\n\r\nhello\r\n")
	for _, t := range targets {
		imapAddr, pop3Addr, lmtpAddr := t.addrFor("imap", u), t.addrFor("pop3", u), t.addrFor("lmtp", u)
		if err := imapLogin(imapAddr, u, pass); err != nil {
			return fmt.Errorf("sanity check of %s: imap login at %s: %w", t.name, imapAddr, err)
		}
		if err := pop3Login(pop3Addr, u, pass); err != nil {
			return fmt.Errorf("sanity check of %s: pop3 login at %s: %w", t.name, pop3Addr, err)
		}
		if err := test.LMTPDeliver(lmtpAddr, "bench@example.com", []string{u}, msg); err != nil {
			return fmt.Errorf("sanity check of %s: lmtp at %s: %w", t.name, lmtpAddr, err)
		}
	}
	return nil
}
