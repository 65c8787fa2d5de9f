package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// report is everything one benchmark run produced.
type report struct {
	Started  time.Time         `json:"started"`
	Finished time.Time         `json:"finished"`
	Machine  Machine           `json:"machine"`
	Options  map[string]string `json:"options"`
	Pinned   string            `json:"users_per_backend"`
	Runs     []Run             `json:"runs"`
	// Summary maps workload → target → medians.
	Summary map[string]map[string]*Stat `json:"summary"`
	Checks  []Check                     `json:"checks"`
	// Profiles are the perf reports written (--profile).
	Profiles []string `json:"profiles,omitempty"`
}

// Stat is the median of one workload against one target over the rounds.
type Stat struct {
	Runs   int     `json:"runs"`
	Failed int     `json:"failed"`
	Metric float64 `json:"metric"` // median of the workload's metric
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	P50    float64 `json:"p50_ms"`
	P99    float64 `json:"p99_ms"`
	// ProxyCPU and BackendCPU are medians of CPU ms per the workload's
	// cpuPer unit.
	ProxyCPU   float64 `json:"proxy_cpu_ms_per_unit"`
	BackendCPU float64 `json:"backend_cpu_ms_per_unit"`
	Ops        int64   `json:"ops"`    // summed
	Errors     int64   `json:"errors"` // summed
	MinOps     int64   `json:"min_ops"`
	// LatencyOf is what the load tool timed ("LOGIN sent → tagged OK").
	LatencyOf string `json:"latency_of,omitempty"`
	// Idle runs: the tool's and this program's own RSS figure (medians).
	ToolRSS float64 `json:"tool_rss_per_session_kib,omitempty"`
	OwnRSS  float64 `json:"own_rss_per_session_kib,omitempty"`
}

// Check is one of usher's targets from the issue.
type Check struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	// Unit of Value and Limit: "× direct", "× director" or "KiB".
	Unit string `json:"unit"`
	// Verdict is PASS, MISS or n/a (no data).
	Verdict string `json:"verdict"`
	Note    string `json:"note,omitempty"`
}

func (r *report) missed() bool {
	for _, c := range r.Checks {
		if c.Verdict == "MISS" {
			return true
		}
	}
	return false
}

// summary renders the options for the report.
func (o options) summary() map[string]string {
	return map[string]string{
		"rounds": fmt.Sprint(o.rounds), "duration": o.duration.String(), "warmup": o.warmup.String(),
		"backends": fmt.Sprint(o.backends), "users": fmt.Sprint(o.users),
		"concurrency": fmt.Sprint(o.concurrency), "idle_sessions": fmt.Sprint(o.idleSessions),
		"hold": o.hold.String(), "fetch": fmt.Sprintf("%d users × %d × %s", o.fetchUsers, o.fetchCount, o.fetchSize),
		"lmtp": fmt.Sprintf("%s, %d rcpt", o.lmtpSize, o.lmtpRcpts), "login_processes": fmt.Sprint(o.cores),
	}
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// summarize computes the medians of the measured runs (round ≥ 1 without
// error) and the checks.
func (r *report) summarize(wls []workload) {
	r.Summary = map[string]map[string]*Stat{}
	for _, w := range wls {
		for _, t := range []string{direct, usher, dovecotD} {
			if !w.runsOn(t) {
				continue
			}
			st := &Stat{MinOps: math.MaxInt64}
			var metric, p50, p99, pcpu, bcpu, toolRSS, ownRSS []float64
			for _, run := range r.Runs {
				if run.Workload != w.key || run.Target != t || run.Round < 1 {
					continue
				}
				st.Runs++
				if run.Error != "" {
					st.Failed++
					continue
				}
				metric = append(metric, run.metric)
				st.LatencyOf = run.Result.LatencyOf
				p50 = append(p50, run.Result.Latency.P50)
				p99 = append(p99, run.Result.Latency.P99)
				pcpu = append(pcpu, run.ProxyCPUPerUnit)
				bcpu = append(bcpu, run.BackendCPUPer)
				toolRSS = append(toolRSS, run.ToolRSSPerSession)
				ownRSS = append(ownRSS, run.OwnRSSPerSession)
				n := run.Result.Ops
				if w.tool == "idle" {
					n = run.Result.sessions()
				}
				st.Ops += n
				st.Errors += run.Result.ErrorsTotal
				st.MinOps = min(st.MinOps, n)
			}
			if st.Runs == 0 {
				continue
			}
			if len(metric) == 0 {
				st.MinOps = 0
			} else {
				st.Metric, st.Min, st.Max = median(metric), slices.Min(metric), slices.Max(metric)
				st.P50, st.P99 = median(p50), median(p99)
				st.ProxyCPU, st.BackendCPU = median(pcpu), median(bcpu)
				if w.tool == "idle" {
					st.ToolRSS, st.OwnRSS = median(toolRSS), median(ownRSS)
				}
			}
			if r.Summary[w.key] == nil {
				r.Summary[w.key] = map[string]*Stat{}
			}
			r.Summary[w.key][t] = st
		}
	}
	r.Checks = r.checks()
}

// stat returns the summary of a workload and target with at least one
// good run, or nil.
func (r *report) stat(workload, target string) *Stat {
	st := r.Summary[workload][target]
	if st == nil || st.Runs == st.Failed {
		return nil
	}
	return st
}

// errorNote warns when a setup's runs had errors (more than 1% of ops):
// a failed operation is often fast, so the rate would flatter it.
func errorNote(sts ...*Stat) string {
	var notes []string
	for _, st := range sts {
		if st == nil {
			continue
		}
		if st.Failed > 0 {
			notes = append(notes, fmt.Sprintf("%d failed runs", st.Failed))
		}
		if st.Errors*100 > st.Ops+st.Errors {
			notes = append(notes, fmt.Sprintf("%d errors in %d ops", st.Errors, st.Ops+st.Errors))
		}
	}
	return strings.Join(notes, "; ")
}

// checks evaluates usher's targets (issue 5).
func (r *report) checks() []Check {
	var cs []Check
	ratio := func(name, workload, other string, min float64, field func(*Stat) float64, atMost bool) {
		c := Check{Name: name, Limit: min, Unit: "× " + targetLabel(other), Verdict: "n/a"}
		u, o := r.stat(workload, usher), r.stat(workload, other)
		if u != nil && o != nil && field(o) > 0 {
			c.Value = field(u) / field(o)
			pass := c.Value >= min
			if atMost {
				pass = c.Value <= min
			}
			c.Verdict = map[bool]string{true: "PASS", false: "MISS"}[pass]
			c.Note = errorNote(u, o)
			if c.Note != "" {
				c.Verdict = "MISS"
			}
		}
		cs = append(cs, c)
	}
	metric := func(s *Stat) float64 { return s.Metric }
	cpu := func(s *Stat) float64 { return s.ProxyCPU }
	for _, p := range []struct{ key, name string }{{"imap-login", "IMAP"}, {"pop3-login", "POP3"}} {
		if r.Summary[p.key] == nil {
			continue
		}
		ratio(p.name+" logins/s ≥ 0.95× direct", p.key, direct, 0.95, metric, false)
		ratio(p.name+" logins/s ≥ Dovecot director", p.key, dovecotD, 1.0, metric, false)
		ratio(p.name+" CPU per 1000 logins ≤ 0.5× Dovecot director", p.key, dovecotD, 0.5, cpu, true)
	}
	if r.Summary["fetch"] != nil {
		ratio("fetch MB/s ≥ 0.95× direct", "fetch", direct, 0.95, metric, false)
	}
	if r.Summary["idle"] != nil {
		c := Check{Name: "RSS per idle session ≤ 16 KiB at ≥ 2000 sessions", Limit: 16, Unit: "KiB", Verdict: "n/a"}
		if u := r.stat("idle", usher); u != nil {
			c.Value = u.Metric
			c.Verdict = map[bool]string{true: "PASS", false: "MISS"}[u.Metric <= 16 && u.MinOps >= 2000]
			if u.MinOps < 2000 {
				c.Note = fmt.Sprintf("only %d sessions in the smallest run", u.MinOps)
			}
			if n := errorNote(u); n != "" {
				c.Note = strings.TrimPrefix(c.Note+"; "+n, "; ")
			}
		}
		cs = append(cs, c)
	}
	if r.Summary["lmtp"] != nil {
		ratio("LMTP deliveries/s ≥ 0.9× direct", "lmtp", direct, 0.9, metric, false)
	}
	return cs
}

// num formats a measurement with sensible precision.
func num(v float64) string {
	switch a := math.Abs(v); {
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// markdown renders the results section.
func (r *report) markdown(wls []workload) string {
	var sb strings.Builder
	m := r.Machine
	fmt.Fprintf(&sb, "Run of %s (UTC), %s rounds × %s per run after a %s warm-up; %s.\n\n",
		r.Started.Format("2006-01-02 15:04"), r.Options["rounds"], r.Options["duration"], r.Options["warmup"], m.Usher)
	fmt.Fprintf(&sb, "Machine: %s, %d CPUs, %.0f GiB RAM, Linux %s, %s, %s; load average %s at the start, %s at the end (the machine is shared).\n\n",
		m.CPU, m.CPUs, m.MemGiB, m.Kernel, dovecotShort(m.Dovecot), m.Go, m.LoadStart, m.LoadEnd)
	fmt.Fprintf(&sb, "Setup: %s Dovecot backends, %s users (users per backend: %s), %s concurrent clients, fetch mailboxes %s, LMTP %s, idle %s sessions held %s, %s login processes per protocol on the director and the backends.\n\n",
		r.Options["backends"], r.Options["users"], r.Pinned, r.Options["concurrency"], r.Options["fetch"],
		r.Options["lmtp"], r.Options["idle_sessions"], r.Options["hold"], r.Options["login_processes"])
	sb.WriteString("Medians over the rounds (min–max in brackets); latency is of the step the load tool names; CPU time is charged per 1000 operations (per GB for fetch), of the proxy (usher's process, or every process of the director instance) and of the three backends together.\n\n")
	sb.WriteString("| Workload | Metric | direct | usher | Dovecot director | usher ÷ direct | usher ÷ director |\n")
	sb.WriteString("|---|---|---:|---:|---:|---:|---:|\n")
	cell := func(st *Stat, f func(*Stat) string) string {
		if st == nil {
			return "—"
		}
		return f(st)
	}
	ratio := func(a, b *Stat, f func(*Stat) float64) string {
		if a == nil || b == nil || f(b) == 0 {
			return "—"
		}
		return fmt.Sprintf("%.2f×", f(a)/f(b))
	}
	for _, w := range wls {
		d, u, dd := r.stat(w.key, direct), r.stat(w.key, usher), r.stat(w.key, dovecotD)
		if w.noDirect {
			d = nil
		}
		first := true
		row := func(metric string, f func(*Stat) string, rd, rdd string) {
			title := ""
			if first {
				title, first = w.title, false
			}
			fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s | %s |\n", title, metric, cell(d, f), cell(u, f), cell(dd, f), rd, rdd)
		}
		metric := func(s *Stat) float64 { return s.Metric }
		mainCell := func(s *Stat) string { return fmt.Sprintf("**%s** (%s–%s)", num(s.Metric), num(s.Min), num(s.Max)) }
		row(w.unit, mainCell, ratio(u, d, metric), ratio(u, dd, metric))
		if w.tool == "idle" {
			row("sessions (smallest run)", func(s *Stat) string { return fmt.Sprint(s.MinOps) }, "—", "—")
			row("KiB/session, own /proc sampling", func(s *Stat) string { return num(s.OwnRSS) }, "—", "—")
			continue
		}
		latency := "latency p50 / p99 ms"
		for _, s := range []*Stat{u, d, dd} {
			if s != nil && s.LatencyOf != "" {
				latency += " (" + s.LatencyOf + ")"
				break
			}
		}
		row(latency, func(s *Stat) string { return num(s.P50) + " / " + num(s.P99) }, "—", "—")
		row("proxy CPU ms per "+w.cpuPer, func(s *Stat) string {
			if s == d {
				return "—"
			}
			return num(s.ProxyCPU)
		}, "—", ratio(u, dd, func(s *Stat) float64 { return s.ProxyCPU }))
		row("backend CPU ms per "+w.cpuPer, func(s *Stat) string { return num(s.BackendCPU) }, "—", "—")
		row("errors / ops", func(s *Stat) string { return fmt.Sprintf("%d / %d", s.Errors, s.Ops) }, "—", "—")
	}
	sb.WriteString("\nusher's targets (issue 5):\n\n| Target | Measured | Verdict |\n|---|---:|---|\n")
	for _, c := range r.Checks {
		v := "—"
		if c.Verdict != "n/a" {
			v = num(c.Value) + " " + c.Unit
			if c.Unit != "KiB" {
				v = fmt.Sprintf("%.2f%s", c.Value, c.Unit)
			}
		}
		verdict := "**" + c.Verdict + "**"
		if c.Note != "" {
			verdict += " (" + c.Note + ")"
		}
		fmt.Fprintf(&sb, "| %s | %s | %s |\n", c.Name, v, verdict)
	}
	if st := r.stat("imap-login", dovecotD); st != nil {
		fmt.Fprintf(&sb, "\nThe Dovecot director (high-performance login mode) used %s ms of CPU per 1000 proxied IMAP logins, %.2f ms per login", num(st.ProxyCPU), st.ProxyCPU/1000)
		if us := r.stat("imap-login", usher); us != nil {
			fmt.Fprintf(&sb, "; usher %s ms, %.2f ms per login", num(us.ProxyCPU), us.ProxyCPU/1000)
		}
		sb.WriteString(".\n")
	}
	return sb.String()
}

func dovecotShort(v string) string {
	if f := strings.Fields(v); len(f) > 0 {
		return "Dovecot " + f[0]
	}
	return "Dovecot"
}

// Markers of the results section in the documentation.
const (
	beginMarker = "<!-- results:begin -->"
	endMarker   = "<!-- results:end -->"
)

// spliceSection replaces the text between the markers with section.
func spliceSection(doc, section string) (string, error) {
	b := strings.Index(doc, beginMarker)
	e := strings.Index(doc, endMarker)
	if b < 0 || e < b {
		return "", fmt.Errorf("no %s … %s section", beginMarker, endMarker)
	}
	return doc[:b+len(beginMarker)] + "\n" + strings.TrimSpace(section) + "\n" + doc[e:], nil
}

// write writes results.json, results.md, the chart and the doc section.
func (r *report) write(o options, wls []workload, log *slog.Logger) error {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	var errs []error
	jp := filepath.Join(o.outDir, "results.json")
	errs = append(errs, os.WriteFile(jp, append(js, '\n'), 0o644))
	md := r.markdown(wls)
	if o.chart != "" {
		rel := o.chart
		if o.doc != "" {
			if p, err := filepath.Rel(filepath.Dir(o.doc), o.chart); err == nil {
				rel = p
			}
		}
		md += fmt.Sprintf("\n![logins/s, p99 latency and more per setup](%s)\n", filepath.ToSlash(rel))
		png, err := r.chart()
		if err == nil {
			err = os.WriteFile(o.chart, png, 0o644)
		}
		errs = append(errs, err)
	}
	mp := filepath.Join(o.outDir, "results.md")
	errs = append(errs, os.WriteFile(mp, []byte(md), 0o644))
	if o.markdown != "" {
		errs = append(errs, os.WriteFile(o.markdown, []byte(md), 0o644))
	}
	if o.doc != "" {
		doc, err := os.ReadFile(o.doc)
		if err == nil {
			var out string
			if out, err = spliceSection(string(doc), md); err == nil {
				err = os.WriteFile(o.doc, []byte(out), 0o644)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("update %s: %w", o.doc, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	log.Info("results written", "json", jp, "markdown", mp, "chart", o.chart, "doc", o.doc)
	return nil
}
