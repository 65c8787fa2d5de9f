package main

import (
	"bytes"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

func TestParseStat(t *testing.T) {
	// Field 2 may hold spaces and parentheses; fields count from the last ')'.
	line := "4242 (imap-login (x) y) S 17 4242 4242 0 -1 4194560 100 0 0 0 " +
		"120 30 5 7 20 0 1 0 500 12345678 900 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
	p, err := parseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if p.pid != 4242 || p.ppid != 17 || p.ticks != 120+30+5+7 || p.rssPages != 900 {
		t.Errorf("parseStat = %+v, want pid 4242 ppid 17 ticks 162 rss 900", p)
	}
	for _, bad := range []string{"", "12 noparen S 1", "12 (x) S 1 2 3", "x (y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) succeeded", bad)
		}
	}
}

func TestTreeUsage(t *testing.T) {
	s := procSnapshot{
		1:  {pid: 1, ppid: 0, ticks: 1000, rssPages: 1},
		10: {pid: 10, ppid: 1, ticks: 5, rssPages: 2},
		11: {pid: 11, ppid: 10, ticks: 7, rssPages: 3},
		12: {pid: 12, ppid: 11, ticks: 11, rssPages: 4},
		20: {pid: 20, ppid: 1, ticks: 100, rssPages: 50},
	}
	u := s.treeUsage(10)
	if u.ticks != 23 || u.rssPages != 9 || u.procs != 3 {
		t.Errorf("treeUsage(10) = %+v, want 23 ticks, 9 pages, 3 processes", u)
	}
	// Two roots, one inside the other's tree: nothing is counted twice; a
	// root that is gone counts nothing.
	if u := s.treeUsage(10, 11, 999); u.ticks != 23 || u.procs != 3 {
		t.Errorf("treeUsage(10, 11, 999) = %+v, want 23 ticks in 3 processes", u)
	}
	if got := s.tree(); len(got) != 0 {
		t.Errorf("tree() = %v, want nothing", got)
	}
	if cpuMillis(123) != 1230 {
		t.Errorf("cpuMillis(123) = %v, want 1230", cpuMillis(123))
	}
}

func TestReadProcsFindsChild(t *testing.T) {
	cmd := exec.Command("sleep", "5")
	if err := cmd.Start(); err != nil {
		t.Skipf("no sleep: %v", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	snap, err := readProcs("/proc")
	if err != nil {
		t.Fatal(err)
	}
	me, ok := snap[os.Getpid()]
	if !ok || me.ppid != os.Getppid() || me.rssPages <= 0 {
		t.Fatalf("own process %d: %+v (found %v), want ppid %d and some RSS", os.Getpid(), me, ok, os.Getppid())
	}
	if !slices.Contains(snap.tree(os.Getpid()), cmd.Process.Pid) {
		t.Errorf("tree of %d lacks child %d", os.Getpid(), cmd.Process.Pid)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		in := slices.Clone(c.in)
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("median reordered its input to %v", c.in)
		}
	}
}

// toolJSON is what `usher bench login --json` prints (indented, errors by kind).
const toolJSON = `{
  "workload": "login",
  "proto": "imap",
  "ops": 1200,
  "ops_per_s": 400.5,
  "errors_total": 3,
  "errors": {"timeout": 3},
  "latency_of": "LOGIN",
  "latency_ms": {"count": 1200, "p50": 2.5, "p90": 4, "p99": 9.75, "p999": 20, "max": 31},
  "loop_ms": {"p50": 5, "p99": 15},
  "logins_per_s": 400.5
}
`

func TestParseBenchJSON(t *testing.T) {
	r, raw, err := parseBenchJSON([]byte(toolJSON))
	if err != nil {
		t.Fatal(err)
	}
	if r.Ops != 1200 || r.OpsPerS != 400.5 || r.ErrorsTotal != 3 || r.Latency.P99 != 9.75 || r.Loop.P99 != 15 {
		t.Errorf("parsed %+v", r)
	}
	if bytes.Contains(raw, []byte("\n")) || !bytes.Contains(raw, []byte(`"timeout":3`)) {
		t.Errorf("raw result not compact JSON: %s", raw)
	}
	// Two objects: the last counts.
	r, _, err = parseBenchJSON([]byte(`{"ops": 1}` + "\n" + toolJSON))
	if err != nil || r.Ops != 1200 {
		t.Errorf("two objects: ops %d, err %v; want the last one's 1200", r.Ops, err)
	}
	for _, bad := range []string{"", "login: 400 logins/s", `{"ops": "many"}`, "[1,2]"} {
		if _, _, err := parseBenchJSON([]byte(bad)); err == nil {
			t.Errorf("parseBenchJSON(%q) succeeded", bad)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int{"10KiB": 10240, "1MiB": 1 << 20, "512": 512, "2M": 2 << 20, "7B": 7} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "-1KiB", "lots", "65MiB"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded", bad)
		}
	}
}

func TestParseFlags(t *testing.T) {
	o, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.rounds != 3 || o.duration != 10*time.Second || o.idleSessions != 2000 {
		t.Errorf("defaults: rounds %d duration %v idle %d; want 3, 10s, 2000", o.rounds, o.duration, o.idleSessions)
	}
	for _, bad := range [][]string{
		{"--rounds", "0"}, {"--duration", "10ms"}, {"--workloads", "imap-login,nope"}, {"--workloads", ""},
		{"--fetch-users", "500"}, {"--lmtp-rcpts", "0"}, {"--fetch-size", "huge"}, {"stray"},
		{"--profile", "bogus"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) succeeded", bad)
		}
	}
}

func TestSelectWorkloadsKeepsReportOrder(t *testing.T) {
	ws, err := selectWorkloads("idle, imap-login,lmtp")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, w := range ws {
		keys = append(keys, w.key)
	}
	if !slices.Equal(keys, []string{"imap-login", "lmtp", "idle"}) {
		t.Errorf("selectWorkloads = %v", keys)
	}
}

func testRunner() *runner {
	o, _ := parseFlags(nil)
	return &runner{o: o, password: "secret"}
}

func TestArgs(t *testing.T) {
	r := testRunner()
	ws := allWorkloads()
	dt := &target{name: direct, addrs: map[string][]string{"imap": {"127.0.1.1:143", "127.0.1.2:143"}},
		maps: map[string]string{"imap": "/tmp/m"}}
	a := r.args(ws[0], dt, 10*time.Second, nil)
	joined := strings.Join(a, " ")
	for _, want := range []string{"login ", "--target 127.0.1.1:143,127.0.1.2:143", "--target-map /tmp/m", "--proto imap",
		"--user-range 1-500", "--duration 10s", "--json"} {
		if !strings.Contains(joined, want) {
			t.Errorf("args %q lack %q", joined, want)
		}
	}
	ut := &target{name: usher, addrs: map[string][]string{"imap": {"127.0.0.1:143"}, "lmtp": {"127.0.0.1:24"}}}
	idle := r.args(ws[4], ut, 10*time.Second, []int{77})
	joined = strings.Join(idle, " ")
	for _, want := range []string{"idle ", "--sessions 2000", "--hold 5s", "--pid 77", "--pid-children"} {
		if !strings.Contains(joined, want) {
			t.Errorf("idle args %q lack %q", joined, want)
		}
	}
	if strings.Contains(joined, "--duration") || strings.Contains(joined, "--target-map") {
		t.Errorf("idle args %q have --duration or a map", joined)
	}
	lmtp := strings.Join(r.args(ws[3], ut, time.Second, nil), " ")
	if !strings.Contains(lmtp, "--user-range 21-500") || !strings.Contains(lmtp, "--size 10KiB") {
		t.Errorf("lmtp args %q: want the non-fetch users and the size", lmtp)
	}
	red := strings.Join(redact(a), " ")
	if strings.Contains(red, "secret") || !strings.Contains(joined+red, "--password (redacted)") {
		t.Errorf("redact: %q", red)
	}
}

// fakeRun makes a successful run.
func fakeRun(round int, w, t string, metric, p99, proxyCPU float64, ops, errs int64) Run {
	r := Run{Round: round, Workload: w, Target: t, metric: metric, ProxyCPUPerUnit: proxyCPU}
	r.Result.Ops, r.Result.ErrorsTotal, r.Result.Latency.P99 = ops, errs, p99
	return r
}

func TestSummarizeAndChecks(t *testing.T) {
	ws, _ := selectWorkloads("imap-login,fetch,lmtp,idle")
	r := &report{Options: map[string]string{"rounds": "3"}}
	for round, v := range []struct{ d, u, dd float64 }{{1000, 980, 900}, {1010, 900, 950}, {990, 990, 940}} {
		r.Runs = append(r.Runs,
			fakeRun(round+1, "imap-login", direct, v.d, 10, 0, 10000, 0),
			fakeRun(round+1, "imap-login", usher, v.u, 12, 300, 10000, 0),
			fakeRun(round+1, "imap-login", dovecotD, v.dd, 14, 700, 10000, 0))
	}
	// A warm-up (round 0) and a failed run are left out of the medians.
	r.Runs = append(r.Runs, fakeRun(0, "imap-login", usher, 1, 1, 1, 1, 0))
	failed := fakeRun(2, "imap-login", usher, 5000, 1, 1, 1, 0)
	failed.Error = "load tool exited 1"
	r.Runs = append(r.Runs, failed)
	r.Runs = append(r.Runs,
		fakeRun(1, "fetch", direct, 500, 50, 0, 100, 0),
		fakeRun(1, "fetch", usher, 490, 50, 900, 100, 0),
		fakeRun(1, "lmtp", direct, 300, 5, 0, 3000, 0),
		fakeRun(1, "lmtp", usher, 290, 5, 500, 3000, 200), // 6% errors
		fakeRun(1, "idle", usher, 12, 5, 0, 1500, 0))
	r.summarize(ws)

	st := r.Summary["imap-login"][usher]
	if st.Runs != 4 || st.Failed != 1 || st.Metric != 980 || st.Min != 900 || st.Max != 990 || st.ProxyCPU != 300 {
		t.Errorf("usher imap-login stat %+v: want 4 runs, 1 failed, median 980 (900–990), CPU 300", st)
	}
	verdicts := map[string]string{}
	for _, c := range r.Checks {
		verdicts[c.Name] = c.Verdict
	}
	want := map[string]string{
		"IMAP logins/s ≥ 0.95× direct":                     "MISS", // failed run noted
		"IMAP logins/s ≥ Dovecot director":                 "MISS",
		"IMAP CPU per 1000 logins ≤ 0.5× Dovecot director": "MISS",
		"fetch MB/s ≥ 0.95× direct":                        "PASS",
		"LMTP deliveries/s ≥ 0.9× direct":                  "MISS", // errors
		"RSS per idle session ≤ 16 KiB at ≥ 2000 sessions": "MISS", // too few sessions
	}
	for name, v := range want {
		if verdicts[name] != v {
			t.Errorf("check %q = %q, want %q (all: %v)", name, verdicts[name], v, verdicts)
		}
	}
	if len(r.Checks) != len(want) {
		t.Errorf("%d checks, want %d: %v", len(r.Checks), len(want), verdicts)
	}

	// Without the failed run the login checks pass on the numbers alone.
	r.Runs = slices.DeleteFunc(r.Runs, func(x Run) bool { return x.Error != "" })
	r.summarize(ws)
	for _, c := range r.Checks {
		if strings.HasPrefix(c.Name, "IMAP logins/s") && c.Verdict != "PASS" {
			t.Errorf("check %q = %s (%.3f, %s), want PASS", c.Name, c.Verdict, c.Value, c.Note)
		}
		if strings.HasPrefix(c.Name, "IMAP CPU") && (c.Verdict != "PASS" || c.Value != 300.0/700) {
			t.Errorf("check %q = %s %.3f, want PASS at %.3f", c.Name, c.Verdict, c.Value, 300.0/700)
		}
	}

	md := r.markdown(ws)
	for _, s := range []string{"| IMAP login | logins/s | **1000** (990–1010) | **980** (900–990) | **940** (900–950) | 0.98× | 1.04× |",
		"usher's targets", "| fetch MB/s ≥ 0.95× direct | 0.98× direct | **PASS** |", "0.70 ms per login"} {
		if !strings.Contains(md, s) {
			t.Errorf("markdown lacks %q:\n%s", s, md)
		}
	}
}

func TestChecksWithoutData(t *testing.T) {
	ws, _ := selectWorkloads("imap-login")
	r := &report{}
	r.Runs = []Run{fakeRun(1, "imap-login", usher, 100, 1, 1, 100, 0)}
	r.summarize(ws)
	for _, c := range r.Checks {
		if c.Verdict != "n/a" {
			t.Errorf("check %q = %s without direct or director data, want n/a", c.Name, c.Verdict)
		}
	}
	if r.missed() {
		t.Error("missed() with only n/a checks")
	}
}

func TestSpliceSection(t *testing.T) {
	doc := "# B\n\nintro\n" + beginMarker + "\nold table\n" + endMarker + "\nafter\n"
	got, err := spliceSection(doc, "\nnew table\n")
	if err != nil {
		t.Fatal(err)
	}
	want := "# B\n\nintro\n" + beginMarker + "\nnew table\n" + endMarker + "\nafter\n"
	if got != want {
		t.Errorf("spliceSection = %q, want %q", got, want)
	}
	if _, err := spliceSection("no markers", "x"); err == nil {
		t.Error("spliceSection without markers succeeded")
	}
	if _, err := spliceSection(endMarker+beginMarker, "x"); err == nil {
		t.Error("spliceSection with the markers swapped succeeded")
	}
}

func TestFontCoversChartText(t *testing.T) {
	font := parseFont()
	entries := 0
	for _, l := range strings.Split(fontData, "\n") {
		if strings.TrimSpace(l) != "" {
			entries++
		}
	}
	if len(font) != entries {
		t.Errorf("parsed %d glyphs of %d font entries (a malformed entry?)", len(font), entries)
	}
	r := &report{}
	ws := allWorkloads()
	for _, w := range ws {
		r.Runs = append(r.Runs, fakeRun(1, w.key, usher, 1, 1, 1, 1, 0))
	}
	r.summarize(ws)
	texts := []string{"usher vs Dovecot director vs direct", "medians of 3 rounds x 10s, 2 CPUs, 2026-01-02",
		targetLabel(dovecotD), direct, usher, "n/a", "0123456789.-"}
	for _, p := range r.panels() {
		texts = append(texts, p.title)
	}
	for _, s := range texts {
		for _, c := range strings.ToUpper(s) {
			if _, ok := font[c]; !ok && c != ' ' {
				t.Errorf("font lacks %q (in %q)", c, s)
			}
		}
	}
}

func TestChartPNG(t *testing.T) {
	ws := allWorkloads()
	r := &report{Options: map[string]string{"rounds": "1", "duration": "1s"}}
	if _, err := r.chart(); err == nil {
		t.Error("chart without data succeeded")
	}
	for _, w := range ws {
		for _, tg := range []string{direct, usher, dovecotD} {
			if w.runsOn(tg) {
				r.Runs = append(r.Runs, fakeRun(1, w.key, tg, 100, 10, 50, 1000, 0))
			}
		}
	}
	r.summarize(ws)
	data, err := r.chart()
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	b := img.Bounds()
	if b.Dx() != chartCols*panelW+2*chartMargin || b.Dy() != headerH+2*panelH+chartMargin {
		t.Errorf("chart is %v, want 4×2 panels", b)
	}
	found := map[string]bool{}
	for y := b.Min.Y; y < b.Max.Y; y += 2 {
		for x := b.Min.X; x < b.Max.X; x += 2 {
			cr, cg, cb, _ := img.At(x, y).RGBA()
			for _, tg := range []string{direct, usher, dovecotD} {
				c := targetColor(tg)
				if cr>>8 == uint32(c.R) && cg>>8 == uint32(c.G) && cb>>8 == uint32(c.B) {
					found[tg] = true
				}
			}
		}
	}
	if len(found) != 3 {
		t.Errorf("colours of %v in the chart, want all three setups", found)
	}
}

func TestNiceMax(t *testing.T) {
	for in, want := range map[float64]float64{0: 1, 0.3: 0.5, 1: 1, 1.2: 2, 430: 500, 999: 1000, 5000: 5000} {
		if got := niceMax(in); got != want {
			t.Errorf("niceMax(%v) = %v, want %v", in, got, want)
		}
	}
}

func TestWarningLines(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	log := "a: Info: fine\nb: Warning: limit\nc: Warning: Killed with signal 15\nd: Error: bad\ne: Error: worse\n"
	if err := os.WriteFile(p, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	lines, n, err := warningLines(p, []string{"Warning:", "Error:"}, []string{"Killed with signal 15"}, 2)
	if err != nil || n != 3 || len(lines) != 2 || lines[0] != "b: Warning: limit" {
		t.Errorf("warningLines = %q, %d, %v; want 3 found, first 2 kept", lines, n, err)
	}
}

func TestConfigs(t *testing.T) {
	cfg := usherConfig("127.0.0.1", 1143, 1110, 1024, "/tmp/u", []string{"127.0.1.1", "127.0.1.2"})
	var v struct {
		IMAP struct {
			MaxSessionsPerIP int `toml:"max_sessions_per_ip"`
		} `toml:"imap"`
		LMTP struct {
			Listeners []struct {
				Address string `toml:"address"`
			} `toml:"listener"`
		} `toml:"lmtp"`
		Backends []struct {
			Address string `toml:"address"`
		} `toml:"backend"`
	}
	if err := toml.Unmarshal([]byte(cfg), &v); err != nil {
		t.Fatalf("usher config is not TOML: %v\n%s", err, cfg)
	}
	if v.IMAP.MaxSessionsPerIP < 10000 || len(v.LMTP.Listeners) != 1 || v.LMTP.Listeners[0].Address != "127.0.0.1:1024" || len(v.Backends) != 2 {
		t.Errorf("usher config %+v:\n%s", v, cfg)
	}

	// The director's configuration must parse for the installed Dovecot.
	dir := t.TempDir()
	var buf bytes.Buffer
	err := directorConf.Execute(&buf, map[string]any{
		"Dir": dir, "Log": filepath.Join(dir, "log"), "Addr": "127.0.2.1", "RingPort": 9090,
		"MailServers": "127.0.1.1 127.0.1.2", "Cores": 2, "IMAPPort": 143, "POP3Port": 110, "LMTPPort": 24,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"executable = imap-login director", "service_count = 0", "client_limit = 10000",
		"process_min_avail = 2", "lmtp_proxy = yes", "auth_socket_path = director-userdb", "args = proxy=y nopassword=y",
		"director_servers = 127.0.2.1:9090", "director_mail_servers = 127.0.1.1 127.0.1.2"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("director config lacks %q", want)
		}
	}
	if _, err := exec.LookPath("doveconf"); err != nil {
		t.Skip("doveconf not installed: not checking the configs with Dovecot")
	}
	conf := filepath.Join(dir, "director.conf")
	if err := os.WriteFile(conf, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("doveconf", "-c", conf, "-n").CombinedOutput()
	if err != nil {
		t.Errorf("doveconf rejects the director config: %v\n%s", err, out)
	}
	var tuning bytes.Buffer
	if err := backendTuning.Execute(&tuning, map[string]any{"Cores": 2}); err != nil {
		t.Fatal(err)
	}
	backend := filepath.Join(dir, "backend.conf")
	base := "base_dir = " + dir + "/b\nprotocols = imap pop3 lmtp\nssl = no\nservice imap-login {\n  inet_listener imap {\n    port = 143\n  }\n}\n"
	if err := os.WriteFile(backend, []byte(base+tuning.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command("doveconf", "-c", backend, "service/imap-login/service_count", "service/imap-login/inet_listener/imap/port").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "service_count = 0") {
		t.Errorf("doveconf on base + tuning: %v\n%s (want the appended service section merged)", err, out)
	}
}
