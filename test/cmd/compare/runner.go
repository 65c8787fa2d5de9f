package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/usher-mail/usher/test"
)

// Target names, in the order of the table and the chart.
const (
	direct   = "direct"
	usher    = "usher"
	dovecotD = "director"
)

// targetLabel is how the report names a target.
func targetLabel(name string) string {
	if name == dovecotD {
		return "Dovecot director"
	}
	return name
}

// target is one setup the load tool is pointed at.
type target struct {
	name string
	// addrs are the host:port lists per protocol ("imap", "pop3", "lmtp").
	addrs map[string][]string
	// maps are --target-map files per protocol (direct only).
	maps map[string]string
	// route gives a user's address per protocol (direct only; nil: addrs[0]).
	route map[string]map[string]string
	// proxyRoots are the roots of the proxy's process tree (nil: no proxy).
	proxyRoots func() []int
	// restart gives the proxy fresh processes (before an idle run).
	restart func() error
	// pprofSocket is the admin socket serving Go's profiles ([admin]
	// profiling; usher only).
	pprofSocket string
}

// addrFor is where user's sessions of proto go.
func (t *target) addrFor(proto, user string) string {
	if t.route != nil {
		if a, ok := t.route[proto][user]; ok {
			return a
		}
	}
	return t.addrs[proto][0]
}

func hostPort(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }

// makeTargets describes direct, usher and the director, and writes direct's
// target maps.
func makeTargets(dir string, b *test.Backends, u *test.Usher, d *director, o options,
	users []string, backendOf map[string]string) ([]*target, error) {
	ports := map[string]int{"imap": test.PortIMAP, "pop3": test.PortPOP3, "lmtp": test.PortLMTP}
	dt := &target{name: direct, addrs: map[string][]string{}, maps: map[string]string{}, route: map[string]map[string]string{}}
	for proto, port := range ports {
		for i := range b.N() {
			dt.addrs[proto] = append(dt.addrs[proto], b.HostPort(i, port))
		}
		p := filepath.Join(dir, "direct-"+proto+".map")
		if err := writeTargetMap(p, users, backendOf, port); err != nil {
			return nil, err
		}
		dt.maps[proto] = p
		dt.route[proto] = map[string]string{}
		for _, user := range users {
			dt.route[proto][user] = hostPort(backendOf[user], port)
		}
	}
	ut := &target{
		name: usher,
		addrs: map[string][]string{
			"imap": {u.IMAPAddr()}, "pop3": {u.POP3Addr()}, "lmtp": u.Listeners("lmtp"),
		},
		proxyRoots:  func() []int { return []int{u.PID()} },
		pprofSocket: u.Socket(),
		restart: func() error {
			if err := u.Stop(); err != nil {
				return err
			}
			return u.Start(20 * time.Second)
		},
	}
	dd := &target{
		name:       dovecotD,
		addrs:      map[string][]string{},
		proxyRoots: func() []int { return []int{d.pid()} },
		restart:    d.restart,
	}
	for proto, port := range ports {
		dd.addrs[proto] = []string{hostPort(o.directorAddr, port)}
	}
	return []*target{dt, ut, dd}, nil
}

// workload is one kind of run of the load tool.
type workload struct {
	key, title string
	tool       string // login, fetch, lmtp, idle
	proto      string // imap, pop3, lmtp
	metricName string // the field of benchResult the table ranks by
	unit       string // of the metric
	// cpuPer names the unit CPU time is charged per ("1000 logins", "GB").
	cpuPer   string
	noDirect bool // runs only against the proxies
}

// cpuUnits is how many cpuPer units a run did: thousands of operations,
// or gigabytes (10^9 bytes) fetched.
func (w workload) cpuUnits(r benchResult) float64 {
	if w.tool == "fetch" {
		return float64(r.Bytes) / 1e9
	}
	if w.tool == "idle" {
		return float64(r.sessions()) / 1000
	}
	return float64(r.Ops) / 1000
}

func (w workload) runsOn(target string) bool { return !(w.noDirect && target == direct) }

// allWorkloads are the workloads in report order.
func allWorkloads() []workload {
	return []workload{
		{key: "imap-login", title: "IMAP login", tool: "login", proto: "imap", metricName: "ops_per_s", unit: "logins/s", cpuPer: "1000 logins"},
		{key: "pop3-login", title: "POP3 login", tool: "login", proto: "pop3", metricName: "ops_per_s", unit: "logins/s", cpuPer: "1000 logins"},
		{key: "fetch", title: "IMAP fetch", tool: "fetch", proto: "imap", metricName: "mb_per_s", unit: "MB/s", cpuPer: "GB"},
		{key: "lmtp", title: "LMTP delivery", tool: "lmtp", proto: "lmtp", metricName: "deliveries_per_s", unit: "deliveries/s", cpuPer: "1000 deliveries"},
		{key: "idle", title: "Idle sessions", tool: "idle", proto: "imap", metricName: "rss_per_session_kib", unit: "KiB/session", cpuPer: "1000 sessions", noDirect: true},
	}
}

// selectWorkloads picks the workloads named in list, in report order.
func selectWorkloads(list string) ([]workload, error) {
	want := map[string]bool{}
	for _, k := range strings.Split(list, ",") {
		if k = strings.TrimSpace(k); k != "" {
			want[k] = true
		}
	}
	var out []workload
	for _, w := range allWorkloads() {
		if want[w.key] {
			out = append(out, w)
			delete(want, w.key)
		}
	}
	for k := range want {
		return nil, fmt.Errorf("unknown workload %q (have imap-login, pop3-login, fetch, lmtp, idle)", k)
	}
	if len(out) == 0 {
		return nil, errors.New("no workloads selected")
	}
	return out, nil
}

// percentiles are the load tool's latency percentiles in ms.
type percentiles struct {
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
}

// benchResult is the part of the JSON `usher bench --json` prints that the
// comparison reads (internal/bench.Result).
type benchResult struct {
	Workload    string      `json:"workload"`
	Ops         int64       `json:"ops"`
	OpsPerS     float64     `json:"ops_per_s"`
	ErrorsTotal int64       `json:"errors_total"`
	LatencyOf   string      `json:"latency_of"`
	Latency     percentiles `json:"latency_ms"`
	Loop        percentiles `json:"loop_ms"`
	SetupS      float64     `json:"setup_s"`
	// idle
	Established      int     `json:"sessions_established"`
	Lost             int     `json:"sessions_lost"`
	RSSPerSessionKiB float64 `json:"rss_per_session_kib"`
	RSSSessions      int     `json:"rss_sessions"`
	// fetch
	MBPerS float64 `json:"mb_per_s"`
	Bytes  int64   `json:"bytes"`
	// lmtp
	DeliveriesPerS float64 `json:"deliveries_per_s"`
}

// sessions is how many sessions an idle run held (ops otherwise).
func (r benchResult) sessions() int64 {
	if r.Established > 0 {
		return int64(r.Established)
	}
	return r.Ops
}

// field returns the named metric.
func (r benchResult) field(name string) float64 {
	switch name {
	case "ops_per_s":
		return r.OpsPerS
	case "mb_per_s":
		return r.MBPerS
	case "deliveries_per_s":
		return r.DeliveriesPerS
	case "rss_per_session_kib":
		return r.RSSPerSessionKiB
	}
	return 0
}

// parseBenchJSON reads the JSON object the tool printed (the last one, if
// it printed several).
func parseBenchJSON(out []byte) (benchResult, json.RawMessage, error) {
	var (
		r    benchResult
		last json.RawMessage
	)
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return r, nil, fmt.Errorf("load tool JSON: %w in %q", err, truncate(out, 300))
		}
		last = raw
	}
	if len(last) == 0 || last[0] != '{' {
		return r, nil, fmt.Errorf("load tool printed no JSON object: %q", truncate(out, 300))
	}
	if err := json.Unmarshal(last, &r); err != nil {
		return r, nil, fmt.Errorf("load tool JSON: %w in %q", err, truncate(last, 300))
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, last); err != nil {
		return r, nil, fmt.Errorf("load tool JSON: %w", err)
	}
	return r, json.RawMessage(compact.Bytes()), nil
}

// Run is one run of the load tool against one target.
type Run struct {
	Round    int             `json:"round"`
	Workload string          `json:"workload"`
	Target   string          `json:"target"`
	Args     []string        `json:"args"`
	Seconds  float64         `json:"seconds"`
	Result   benchResult     `json:"-"`
	Raw      json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	// metric is the workload's ranking metric (RSS: see RSSPerSessionKiB).
	metric float64
	// CPU of the proxy (usher's process, the director instance's tree) and
	// of all backends during the run, in ms, and per the workload's cpuPer
	// unit (1000 logins, 1000 deliveries, GB fetched).
	ProxyCPUms      float64 `json:"proxy_cpu_ms"`
	BackendCPUms    float64 `json:"backend_cpu_ms"`
	CPUPer          string  `json:"cpu_per"`
	ProxyCPUPerUnit float64 `json:"proxy_cpu_ms_per_unit"`
	BackendCPUPer   float64 `json:"backend_cpu_ms_per_unit"`
	ProxyProcs      int     `json:"proxy_processes,omitempty"`
	// Idle runs: the proxy's resident memory before the sessions and at its
	// peak while they were held, sampled here (summed over the process
	// tree), and the resulting KiB per session; RSSPerSessionKiB is the
	// load tool's figure when it gave one, else this one.
	RSSBaseKiB        float64 `json:"rss_base_kib,omitempty"`
	RSSPeakKiB        float64 `json:"rss_peak_kib,omitempty"`
	OwnRSSPerSession  float64 `json:"own_rss_per_session_kib,omitempty"`
	ToolRSSPerSession float64 `json:"tool_rss_per_session_kib,omitempty"`
	RSSPerSessionKiB  float64 `json:"rss_per_session_kib,omitempty"`
}

// runner runs the load tool.
type runner struct {
	o        options
	log      *slog.Logger
	tool     []string
	backends *test.Backends
	users    []string
	password string
	outDir   string

	mu       sync.Mutex
	restarts []string // "HH:MM:SS target", for warnings.log
}

// restartLog lists the proxy restarts so far.
func (r *runner) restartLog() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.restarts...)
}

// userRange is the --user-range of a workload: the fetch users for fetch,
// the others for LMTP (so deliveries do not grow the fetch mailboxes), all
// users otherwise.
func (r *runner) userRange(w workload) string {
	switch w.tool {
	case "fetch":
		return fmt.Sprintf("1-%d", r.o.fetchUsers)
	case "lmtp":
		return fmt.Sprintf("%d-%d", r.o.fetchUsers+1, r.o.users)
	}
	return fmt.Sprintf("1-%d", r.o.users)
}

// args builds the load tool's arguments (after the tool prefix).
func (r *runner) args(w workload, t *target, dur time.Duration, pids []int) []string {
	a := []string{w.tool, "--target", strings.Join(t.addrs[w.proto], ",")}
	if m := t.maps[w.proto]; m != "" {
		a = append(a, "--target-map", m)
	}
	a = append(a, "--users", "user%d@example.com", "--user-range", r.userRange(w), "--password", r.password)
	switch w.tool {
	case "login":
		a = append(a, "--proto", w.proto, "--concurrency", strconv.Itoa(r.o.concurrency), "--duration", dur.String())
	case "fetch":
		a = append(a, "--concurrency", strconv.Itoa(r.o.concurrency), "--duration", dur.String())
	case "lmtp":
		a = append(a, "--concurrency", strconv.Itoa(r.o.concurrency), "--duration", dur.String(),
			"--size", r.o.lmtpSize, "--rcpts", strconv.Itoa(r.o.lmtpRcpts))
	case "idle":
		a = append(a, "--sessions", strconv.Itoa(r.o.idleSessions), "--concurrency", strconv.Itoa(r.o.idleConcurrency),
			"--hold", r.o.hold.String())
		for _, p := range pids {
			a = append(a, "--pid", strconv.Itoa(p))
		}
		if len(pids) > 0 {
			// The director instance is a process tree; its login
			// processes hold the proxied sessions.
			a = append(a, "--pid-children")
		}
	}
	return append(a, "--progress=false", "--json")
}

// backendRoots are the backends' master pids.
func (r *runner) backendRoots() []int {
	var roots []int
	for i := range r.backends.N() {
		if p := r.backends.MasterPID(i); p != 0 {
			roots = append(roots, p)
		}
	}
	return roots
}

// runOne runs workload w against t once (round 0: a warm-up).
func (r *runner) runOne(ctx context.Context, w workload, t *target, round int, dur time.Duration) (Run, error) {
	run := Run{Round: round, Workload: w.key, Target: t.name}
	if w.tool == "idle" && t.restart != nil {
		// Fresh proxy processes: memory a runtime kept from earlier runs
		// would hide what the sessions cost.
		r.mu.Lock()
		r.restarts = append(r.restarts, time.Now().Format("15:04:05")+" "+t.name)
		r.mu.Unlock()
		if err := t.restart(); err != nil {
			run.Error = err.Error()
			return run, fmt.Errorf("restart %s: %w", t.name, err)
		}
		for _, u := range r.users[:min(20, len(r.users))] {
			if err := imapLogin(t.addrFor("imap", u), u, r.password); err != nil {
				run.Error = err.Error()
				return run, fmt.Errorf("login after restart of %s: %w", t.name, err)
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	var proxyRoots []int
	if t.proxyRoots != nil {
		proxyRoots = t.proxyRoots()
	}
	before, err := readProcs("/proc")
	if err != nil {
		return run, err
	}
	args := r.args(w, t, dur, proxyRoots)
	run.Args = redact(args)
	proxyBefore, backBefore := before.treeUsage(proxyRoots...), before.treeUsage(r.backendRoots()...)

	var sampler *rssSampler
	if w.tool == "idle" && len(proxyRoots) > 0 {
		sampler = startRSSSampler(proxyRoots, 200*time.Millisecond)
	}
	timeout := dur + r.o.hold + 3*time.Minute
	start := time.Now()
	out, stderr, err := execTool(ctx, r.tool, args, timeout)
	run.Seconds = time.Since(start).Seconds()
	var peak usage
	if sampler != nil {
		peak = sampler.stop()
	}
	after, perr := readProcs("/proc")
	if err != nil {
		run.Error = err.Error()
		r.saveFailure(run, out, stderr)
		return run, err
	}
	if perr != nil {
		run.Error = perr.Error()
		return run, perr
	}
	res, raw, err := parseBenchJSON(out)
	if err != nil {
		run.Error = err.Error()
		r.saveFailure(run, out, stderr)
		return run, err
	}
	run.Result, run.Raw = res, raw
	run.metric = res.field(w.metricName)
	proxyAfter, backAfter := after.treeUsage(proxyRoots...), after.treeUsage(r.backendRoots()...)
	run.ProxyCPUms = cpuMillis(proxyAfter.ticks - proxyBefore.ticks)
	run.BackendCPUms = cpuMillis(backAfter.ticks - backBefore.ticks)
	run.ProxyProcs = proxyAfter.procs
	run.CPUPer = w.cpuPer
	if n := w.cpuUnits(res); n > 0 {
		run.ProxyCPUPerUnit = run.ProxyCPUms / n
		run.BackendCPUPer = run.BackendCPUms / n
	}
	if sampler != nil {
		run.RSSBaseKiB = rssKiB(proxyBefore.rssPages)
		run.RSSPeakKiB = rssKiB(peak.rssPages)
		if n := res.sessions(); n > 0 {
			run.OwnRSSPerSession = (run.RSSPeakKiB - run.RSSBaseKiB) / float64(n)
		}
		run.ToolRSSPerSession = res.RSSPerSessionKiB
		run.RSSPerSessionKiB = run.ToolRSSPerSession
		if run.RSSPerSessionKiB <= 0 {
			run.RSSPerSessionKiB = run.OwnRSSPerSession
		}
		run.metric = run.RSSPerSessionKiB
	}
	if res.Ops == 0 {
		run.Error = fmt.Sprintf("no successful operations (%d errors)", res.ErrorsTotal)
		r.saveFailure(run, out, stderr)
		return run, errors.New(run.Error)
	}
	return run, nil
}

// redact replaces the value of --password for the report and the logs.
func redact(args []string) []string {
	out := append([]string(nil), args...)
	for i := 0; i+1 < len(out); i++ {
		if out[i] == "--password" {
			out[i+1] = "(redacted)"
		}
	}
	return out
}

// saveFailure keeps the load tool's output of a failed run.
func (r *runner) saveFailure(run Run, stdout, stderr []byte) {
	p := filepath.Join(r.outDir, fmt.Sprintf("failed-r%d-%s-%s.log", run.Round, run.Workload, run.Target))
	text := fmt.Sprintf("args: %q\nerror: %s\n--- stdout\n%s\n--- stderr\n%s\n", run.Args, run.Error, stdout, stderr)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		r.log.Warn("save failed run", "err", err)
	}
}

// execTool runs the load tool in its own process group and returns its
// stdout and stderr; a non-zero exit is an error.
func execTool(ctx context.Context, tool, args []string, timeout time.Duration) ([]byte, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool[0], append(append([]string(nil), tool[1:]...), args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		tail := stderr.Bytes()
		if len(tail) > 600 {
			tail = tail[len(tail)-600:]
		}
		return stdout.Bytes(), stderr.Bytes(), fmt.Errorf("load tool %s: %w: %s", args[0], err, bytes.TrimSpace(tail))
	}
	return stdout.Bytes(), stderr.Bytes(), nil
}

// rssSampler records the peak resident memory of process trees.
type rssSampler struct {
	done chan struct{}
	wg   sync.WaitGroup
	mu   sync.Mutex
	peak usage
}

func startRSSSampler(roots []int, every time.Duration) *rssSampler {
	s := &rssSampler{done: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if snap, err := readProcs("/proc"); err == nil {
				u := snap.treeUsage(roots...)
				s.mu.Lock()
				if u.rssPages > s.peak.rssPages {
					s.peak = u
				}
				s.mu.Unlock()
			}
			select {
			case <-s.done:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *rssSampler) stop() usage {
	close(s.done)
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// Machine describes where the benchmark ran.
type Machine struct {
	CPU       string  `json:"cpu"`
	CPUs      int     `json:"cpus"`
	MemGiB    float64 `json:"mem_gib"`
	Kernel    string  `json:"kernel"`
	Dovecot   string  `json:"dovecot"`
	Go        string  `json:"go"`
	Usher     string  `json:"usher"`
	LoadStart string  `json:"load_start"`
	LoadEnd   string  `json:"load_end"`
}

func describeMachine(usherBin string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), LoadStart: loadAvg()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				kib, _ := strconv.ParseFloat(f[1], 64)
				m.MemGiB = kib / (1 << 20)
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if out, err := exec.Command("dovecot", "--version").Output(); err == nil {
		m.Dovecot = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command(usherBin, "version").Output(); err == nil {
		m.Usher = strings.TrimSpace(string(out))
	}
	return m
}

func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// profile runs w against t once more, unmeasured, while `perf record`
// samples the proxy's processes, and writes the hottest symbols, self and
// cumulative, to outDir/perf-TARGET-WORKLOAD.txt; for usher it then runs w
// once more for a Go CPU profile from its admin socket (goProfile).
// perf sees the kernel's share and the runtime's threads, pprof names the
// Go call paths.
func (r *runner) profile(ctx context.Context, w workload, t *target, dur time.Duration, tmp string) (string, error) {
	if t.proxyRoots == nil {
		return "", fmt.Errorf("profile %s: no proxy process", t.name)
	}
	snap, err := readProcs("/proc")
	if err != nil {
		return "", fmt.Errorf("profile %s: %w", t.name, err)
	}
	pids := snap.tree(t.proxyRoots()...)
	if len(pids) == 0 {
		return "", fmt.Errorf("profile %s: not running", t.name)
	}
	pidList := make([]string, len(pids))
	for i, p := range pids {
		pidList[i] = strconv.Itoa(p)
	}
	data := filepath.Join(tmp, fmt.Sprintf("perf-%s-%s.data", t.name, w.key))
	pctx, cancel := context.WithTimeout(ctx, dur+time.Minute)
	defer cancel()
	rec := exec.CommandContext(pctx, "perf", "record", "-q", "-F", "499", "-g", "-p", strings.Join(pidList, ","),
		"-o", data, "--", "sleep", strconv.Itoa(int(dur.Seconds())+1))
	var recOut bytes.Buffer
	rec.Stdout, rec.Stderr = &recOut, &recOut
	if err := rec.Start(); err != nil {
		return "", fmt.Errorf("profile %s: perf record: %w", t.name, err)
	}
	_, _, toolErr := execTool(ctx, r.tool, r.args(w, t, dur, nil), dur+3*time.Minute)
	if err := rec.Wait(); err != nil {
		return "", fmt.Errorf("profile %s: perf record: %w: %s", t.name, err, bytes.TrimSpace(recOut.Bytes()))
	}
	if toolErr != nil {
		return "", fmt.Errorf("profile %s: %w", t.name, toolErr)
	}
	var report bytes.Buffer
	fmt.Fprintf(&report, "perf profile of %s (pids %s) during `usher bench %s` for %v, %s\n",
		t.name, strings.Join(pidList, ","), strings.Join(redact(r.args(w, t, dur, nil)), " "), dur, time.Now().UTC().Format(time.RFC3339))
	for _, mode := range []struct{ title, flag string }{
		{"self time (--no-children)", "--no-children"},
		{"cumulative time (--children)", "--children"},
	} {
		out, err := exec.CommandContext(ctx, "perf", "report", "-i", data, "--stdio", mode.flag,
			"--sort", "symbol", "-g", "none", "--percent-limit", "0.7").CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("profile %s: perf report: %w: %s", t.name, err, truncate(out, 300))
		}
		fmt.Fprintf(&report, "\n== %s\n", mode.title)
		for _, l := range strings.Split(string(out), "\n") {
			// perf pads every line with empty columns ("-      -").
			if l = strings.TrimRight(l, " -"); l != "" && !strings.HasPrefix(l, "#") {
				report.WriteString(l + "\n")
			}
		}
	}
	p := filepath.Join(r.outDir, fmt.Sprintf("perf-%s-%s.txt", t.name, w.key))
	if err := os.WriteFile(p, report.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("profile %s: %w", t.name, err)
	}
	if t.pprofSocket != "" {
		// A run of its own: the Go profiler's signals would show in perf's.
		if gp, err := r.goProfile(ctx, w, t, dur, tmp); err != nil {
			r.log.Warn("no Go profile", "target", t.name, "workload", w.key, "err", err)
		} else {
			r.log.Info("profile written", "workload", w.key, "target", t.name, "file", gp)
		}
	}
	return p, nil
}

// goProfile runs w against t once more while taking a Go CPU profile from
// t's admin socket, and writes go tool pprof's top to
// outDir/pprof-TARGET-WORKLOAD.txt.
func (r *runner) goProfile(ctx context.Context, w workload, t *target, dur time.Duration, tmp string) (string, error) {
	file := filepath.Join(tmp, fmt.Sprintf("pprof-%s-%s.pb.gz", t.name, w.key))
	pctx, cancel := context.WithTimeout(ctx, dur+time.Minute)
	defer cancel()
	got := make(chan error, 1)
	go func() { got <- fetchCPUProfile(pctx, t.pprofSocket, dur, file) }()
	_, _, toolErr := execTool(ctx, r.tool, r.args(w, t, dur, nil), dur+3*time.Minute)
	if err := <-got; err != nil {
		return "", err
	}
	if toolErr != nil {
		return "", toolErr
	}
	return r.writeGoProfile(ctx, file, t, w)
}

// fetchCPUProfile takes a Go CPU profile of dur from the admin socket's
// /debug/pprof/profile ([admin] profiling) and writes it to out.
func fetchCPUProfile(ctx context.Context, socket string, dur time.Duration, out string) error {
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	url := fmt.Sprintf("http://usher/debug/pprof/profile?seconds=%d", max(int(dur.Seconds()), 1))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("CPU profile: %s: %s", resp.Status, truncate(body, 200))
	}
	return os.WriteFile(out, body, 0o644)
}

// writeGoProfile turns a Go CPU profile into outDir/pprof-TARGET-WORKLOAD.txt
// with `go tool pprof -top`, self and cumulative.
func (r *runner) writeGoProfile(ctx context.Context, prof string, t *target, w workload) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %w", err)
	}
	var report bytes.Buffer
	fmt.Fprintf(&report, "Go CPU profile of %s (its admin socket's /debug/pprof/profile) during `usher bench %s`, %s\n",
		t.name, w.key, time.Now().UTC().Format(time.RFC3339))
	for _, mode := range []struct{ title, flag string }{
		{"self time", "-top"},
		{"cumulative time", "-cum"},
	} {
		args := []string{"tool", "pprof", "-top", "-nodecount=40"}
		if mode.flag == "-cum" {
			args = append(args, "-cum")
		}
		out, err := exec.CommandContext(ctx, goBin, append(args, prof)...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("go tool pprof: %w: %s", err, truncate(out, 300))
		}
		fmt.Fprintf(&report, "\n== %s\n%s", mode.title, out)
	}
	p := filepath.Join(r.outDir, fmt.Sprintf("pprof-%s-%s.txt", t.name, w.key))
	if err := os.WriteFile(p, report.Bytes(), 0o644); err != nil {
		return "", err
	}
	return p, nil
}
