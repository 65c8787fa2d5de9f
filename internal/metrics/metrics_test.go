package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape GETs m.Handler() and parses the text exposition.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape: status %d: %s", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("scrape: Content-Type %q, want text/plain", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape: parse: %v", err)
	}
	return mfs
}

// flatten turns the usher_* families into "name{k=v,...}" -> value, with
// labels sorted; histograms contribute name_count, name_sum and one
// name_bucket{...,le=X} per bucket.
func flatten(t *testing.T, mfs map[string]*dto.MetricFamily) map[string]float64 {
	t.Helper()
	out := make(map[string]float64)
	put := func(name string, labels []string, v float64) {
		k := seriesKey(name, labels)
		if _, dup := out[k]; dup {
			t.Errorf("duplicate series %s", k)
		}
		out[k] = v
	}
	for name, mf := range mfs {
		if !strings.HasPrefix(name, "usher_") {
			continue
		}
		for _, mt := range mf.GetMetric() {
			var labels []string
			for _, lp := range mt.GetLabel() {
				labels = append(labels, lp.GetName()+"="+lp.GetValue())
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				put(name, labels, mt.GetCounter().GetValue())
			case dto.MetricType_GAUGE:
				put(name, labels, mt.GetGauge().GetValue())
			case dto.MetricType_HISTOGRAM:
				h := mt.GetHistogram()
				put(name+"_count", labels, float64(h.GetSampleCount()))
				put(name+"_sum", labels, h.GetSampleSum())
				for _, b := range h.GetBucket() {
					le := fmt.Sprint(b.GetUpperBound())
					put(name+"_bucket", append(slices.Clone(labels), "le="+le), float64(b.GetCumulativeCount()))
				}
			default:
				t.Errorf("family %s: unexpected type %v", name, mf.GetType())
			}
		}
	}
	return out
}

// seriesKey is name{labels} with the "k=v" labels sorted.
func seriesKey(name string, labels []string) string {
	labels = slices.Clone(labels)
	sort.Strings(labels)
	return name + "{" + strings.Join(labels, ",") + "}"
}

// histogram returns the flattened series of one histogram with the given
// sorted labels (comma-joined, may be empty) whose observations are obs.
func histogram(name, labels string, obs ...float64) map[string]float64 {
	out := make(map[string]float64)
	sum := 0.0
	for _, o := range obs {
		sum += o
	}
	out[name+"_count{"+labels+"}"] = float64(len(obs))
	out[name+"_sum{"+labels+"}"] = sum
	for _, b := range append(DurationBuckets(), math.Inf(1)) {
		n := 0
		for _, o := range obs {
			if o <= b {
				n++
			}
		}
		var l []string
		if labels != "" {
			l = strings.Split(labels, ",")
		}
		out[seriesKey(name+"_bucket", append(l, "le="+fmt.Sprint(b)))] = float64(n)
	}
	return out
}

func merge(ms ...map[string]float64) map[string]float64 {
	out := make(map[string]float64)
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

func assertSeries(t *testing.T, got, want map[string]float64) {
	t.Helper()
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		g, gok := got[k]
		w, wok := want[k]
		switch {
		case !gok:
			t.Errorf("missing series %s (want %v)", k, w)
		case !wok:
			t.Errorf("unexpected series %s = %v", k, g)
		case math.Abs(g-w) > 1e-9:
			t.Errorf("%s = %v, want %v", k, g, w)
		}
	}
}

// baseline is what a fresh Metrics exports: the label sets with fixed
// values start at zero.
func baseline() map[string]float64 {
	return map[string]float64{
		"usher_user_moves_total{result=ok}":                0,
		"usher_user_moves_total{result=timeout}":           0,
		"usher_user_moves_total{result=error}":             0,
		"usher_user_kicks_total{reason=move}":              0,
		"usher_user_kicks_total{reason=kick}":              0,
		"usher_user_kicks_total{reason=backend-down}":      0,
		"usher_user_kicks_total{reason=flush}":             0,
		"usher_kicked_sessions_total{reason=move}":         0,
		"usher_kicked_sessions_total{reason=kick}":         0,
		"usher_kicked_sessions_total{reason=backend-down}": 0,
		"usher_kicked_sessions_total{reason=flush}":        0,
	}
}

// protoZero is what the first use of a protocol creates.
func protoZero(proto string) map[string]float64 {
	return merge(map[string]float64{
		"usher_sessions_total{proto=" + proto + "}":                  0,
		"usher_bytes_total{direction=in,proto=" + proto + "}":        0,
		"usher_bytes_total{direction=out,proto=" + proto + "}":       0,
		"usher_logins_total{proto=" + proto + ",result=ok}":          0,
		"usher_logins_total{proto=" + proto + ",result=failed}":      0,
		"usher_logins_total{proto=" + proto + ",result=unavailable}": 0,
		"usher_logins_total{proto=" + proto + ",result=error}":       0,
	}, histogram("usher_login_duration_seconds", "proto="+proto))
}

func TestFresh(t *testing.T) {
	m := New()
	mfs := scrape(t, m)
	assertSeries(t, flatten(t, mfs), baseline())
	// The Go and process collectors are registered too.
	for _, name := range []string{"go_goroutines", "go_memstats_alloc_bytes", "process_start_time_seconds", "process_cpu_seconds_total"} {
		if mfs[name] == nil {
			t.Errorf("family %s missing", name)
		}
	}
}

func TestAllMethods(t *testing.T) {
	m := New()
	const b1, b2 = "192.0.2.1", "2001:db8::2"

	// Three IMAP sessions and one POP3 session open; two IMAP sessions
	// log in to b1, the POP3 session to b2; the third IMAP session fails
	// its login and closes without a backend.
	for range 3 {
		m.SessionOpened("imap")
	}
	m.SessionOpened("pop3")
	m.SessionLoggedIn("imap", b1)
	m.SessionLoggedIn("imap", b1)
	m.SessionLoggedIn("pop3", b2)
	m.Login("imap", LoginOK, 10*time.Millisecond)
	m.Login("imap", LoginOK, 2*time.Second)
	m.Login("imap", LoginFailed, 40*time.Second) // above the last bucket
	m.Login("pop3", LoginOK, -time.Second)       // clamps to 0
	m.Login("pop3", "weird", time.Millisecond)   // unknown result still counted
	m.SessionClosed("imap", "", 7, 9)
	m.SessionClosed("imap", b1, 100, 2000)
	m.SessionClosed("pop3", b2, -5, 30) // negative ignored
	m.Bytes("imap", 1, 0)

	m.SetUserRecordsFunc(func() float64 { return 42 })
	m.Move(MoveOK)
	m.Move(MoveOK)
	m.Move(MoveTimeout)
	m.Kick(KickMove, 2)
	m.Kick(KickBackendDown, 5)
	m.Kick(KickBackendDown, 0)
	m.Kick(KickFlush, -3) // negative counts as 0 sessions

	m.BackendUp(b1, true)
	m.BackendUp(b2, false)
	m.Probe(b1, "imap", true, 3*time.Millisecond)
	m.Probe(b1, "imap", true, 20*time.Millisecond)
	m.Probe(b2, "pop3", false, 5*time.Second)
	m.AdminRequest(200)
	m.AdminRequest(200)
	m.AdminRequest(404)

	want := merge(baseline(), protoZero("imap"), protoZero("pop3"),
		histogram("usher_login_duration_seconds", "proto=imap", 0.01, 2, 40),
		histogram("usher_login_duration_seconds", "proto=pop3", 0, 0.001),
		histogram("usher_backend_health_probe_seconds", "backend="+b1+",proto=imap", 0.003, 0.02),
		histogram("usher_backend_health_probe_seconds", "backend="+b2+",proto=pop3", 5),
		map[string]float64{
			"usher_sessions_total{proto=imap}":                                  3,
			"usher_sessions_total{proto=pop3}":                                  1,
			"usher_sessions_open{backend=,proto=imap}":                          0,
			"usher_sessions_open{backend=" + b1 + ",proto=imap}":                1,
			"usher_sessions_open{backend=,proto=pop3}":                          0,
			"usher_sessions_open{backend=" + b2 + ",proto=pop3}":                0,
			"usher_backend_sessions_total{backend=" + b1 + ",proto=imap}":       2,
			"usher_backend_sessions_total{backend=" + b2 + ",proto=pop3}":       1,
			"usher_logins_total{proto=imap,result=ok}":                          2,
			"usher_logins_total{proto=imap,result=failed}":                      1,
			"usher_logins_total{proto=pop3,result=ok}":                          1,
			"usher_logins_total{proto=pop3,result=weird}":                       1,
			"usher_bytes_total{direction=in,proto=imap}":                        108,
			"usher_bytes_total{direction=out,proto=imap}":                       2009,
			"usher_bytes_total{direction=in,proto=pop3}":                        0,
			"usher_bytes_total{direction=out,proto=pop3}":                       30,
			"usher_user_records{}":                                              42,
			"usher_user_moves_total{result=ok}":                                 2,
			"usher_user_moves_total{result=timeout}":                            1,
			"usher_user_kicks_total{reason=move}":                               1,
			"usher_user_kicks_total{reason=backend-down}":                       2,
			"usher_user_kicks_total{reason=flush}":                              1,
			"usher_kicked_sessions_total{reason=move}":                          2,
			"usher_kicked_sessions_total{reason=backend-down}":                  5,
			"usher_backend_up{backend=" + b1 + "}":                              1,
			"usher_backend_up{backend=" + b2 + "}":                              0,
			"usher_backend_probe_failures_total{backend=" + b1 + ",proto=imap}": 0,
			"usher_backend_probe_failures_total{backend=" + b2 + ",proto=pop3}": 1,
			"usher_admin_requests_total{code=200}":                              2,
			"usher_admin_requests_total{code=404}":                              1,
		})
	mfs := scrape(t, m)
	assertSeries(t, flatten(t, mfs), want)

	// Types and HELP texts as documented.
	types := map[string]dto.MetricType{
		"usher_sessions_total":               dto.MetricType_COUNTER,
		"usher_sessions_open":                dto.MetricType_GAUGE,
		"usher_backend_sessions_total":       dto.MetricType_COUNTER,
		"usher_logins_total":                 dto.MetricType_COUNTER,
		"usher_login_duration_seconds":       dto.MetricType_HISTOGRAM,
		"usher_bytes_total":                  dto.MetricType_COUNTER,
		"usher_user_records":                 dto.MetricType_GAUGE,
		"usher_user_moves_total":             dto.MetricType_COUNTER,
		"usher_user_kicks_total":             dto.MetricType_COUNTER,
		"usher_kicked_sessions_total":        dto.MetricType_COUNTER,
		"usher_backend_up":                   dto.MetricType_GAUGE,
		"usher_backend_health_probe_seconds": dto.MetricType_HISTOGRAM,
		"usher_backend_probe_failures_total": dto.MetricType_COUNTER,
		"usher_admin_requests_total":         dto.MetricType_COUNTER,
	}
	for name, typ := range types {
		mf := mfs[name]
		if mf == nil {
			t.Errorf("family %s missing", name)
			continue
		}
		if mf.GetType() != typ {
			t.Errorf("family %s: type %v, want %v", name, mf.GetType(), typ)
		}
		if len(mf.GetHelp()) < 20 {
			t.Errorf("family %s: HELP %q too short", name, mf.GetHelp())
		}
	}
	for name := range mfs {
		if _, ok := types[name]; strings.HasPrefix(name, "usher_") && !ok {
			t.Errorf("undocumented family %s", name)
		}
	}

	// SetUserRecordsFunc(nil) removes the gauge; a new func replaces it.
	m.SetUserRecordsFunc(nil)
	if mfs := scrape(t, m); mfs["usher_user_records"] != nil {
		t.Errorf("usher_user_records present after SetUserRecordsFunc(nil)")
	}
	n := 0.0
	m.SetUserRecordsFunc(func() float64 { n++; return n })
	for i := 1; i <= 2; i++ {
		if got := flatten(t, scrape(t, m))["usher_user_records{}"]; got != float64(i) {
			t.Errorf("scrape %d: usher_user_records = %v, want %v (evaluated per scrape)", i, got, i)
		}
	}
}

func TestForgetBackend(t *testing.T) {
	m := New()
	const gone, kept = "192.0.2.1", "192.0.2.2"
	for _, b := range []string{gone, kept} {
		m.BackendUp(b, true)
		m.Probe(b, "imap", false, time.Millisecond)
		m.SessionOpened("imap")
		m.SessionLoggedIn("imap", b)
	}
	// One more session on gone stays open across ForgetBackend; one more
	// on a second protocol closes before it.
	m.SessionOpened("imap")
	m.SessionLoggedIn("imap", gone)
	m.SessionOpened("pop3")
	m.SessionLoggedIn("pop3", gone)
	m.SessionClosed("pop3", gone, 0, 0)
	m.SessionClosed("imap", gone, 0, 0)

	m.ForgetBackend(gone)
	m.ForgetBackend("") // ignored

	got := flatten(t, scrape(t, m))
	for k := range got {
		if strings.Contains(k, "backend="+gone) &&
			k != "usher_sessions_open{backend="+gone+",proto=imap}" &&
			k != "usher_backend_sessions_total{backend="+gone+",proto=imap}" {
			t.Errorf("series %s of forgotten backend still exported", k)
		}
	}
	// The open session keeps its series, with the right value.
	if v, ok := got["usher_sessions_open{backend="+gone+",proto=imap}"]; !ok || v != 1 {
		t.Errorf("open sessions of forgotten backend = %v (present %v), want 1", v, ok)
	}
	if v := got["usher_backend_sessions_total{backend="+gone+",proto=imap}"]; v != 2 {
		t.Errorf("backend sessions of forgotten backend = %v, want 2", v)
	}
	// The other backend is untouched.
	for k, want := range map[string]float64{
		"usher_backend_up{backend=" + kept + "}":                                    1,
		"usher_backend_probe_failures_total{backend=" + kept + ",proto=imap}":       1,
		"usher_backend_health_probe_seconds_count{backend=" + kept + ",proto=imap}": 1,
		"usher_sessions_open{backend=" + kept + ",proto=imap}":                      1,
		"usher_backend_sessions_total{backend=" + kept + ",proto=imap}":             1,
		"usher_sessions_open{backend=,proto=imap}":                                  0,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}

	// Once the last session closes the series go, and the gauge never
	// went negative.
	m.SessionClosed("imap", gone, 0, 0)
	got = flatten(t, scrape(t, m))
	for k, v := range got {
		if strings.Contains(k, "backend="+gone) {
			t.Errorf("series %s = %v of forgotten backend still exported after its sessions closed", k, v)
		}
	}

	// A backend that comes back starts afresh.
	m.BackendUp(gone, false)
	m.SessionOpened("imap")
	m.SessionLoggedIn("imap", gone)
	got = flatten(t, scrape(t, m))
	for k, want := range map[string]float64{
		"usher_backend_up{backend=" + gone + "}":                        0,
		"usher_sessions_open{backend=" + gone + ",proto=imap}":          1,
		"usher_backend_sessions_total{backend=" + gone + ",proto=imap}": 1,
	} {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
}

func TestForgetThenBackendUpKeepsSeries(t *testing.T) {
	m := New()
	const b = "192.0.2.7"
	m.SessionOpened("imap")
	m.SessionLoggedIn("imap", b)
	m.ForgetBackend(b) // session still open: marked, kept
	m.BackendUp(b, true)
	m.SessionClosed("imap", b, 0, 0)
	got := flatten(t, scrape(t, m))
	if v, ok := got["usher_sessions_open{backend="+b+",proto=imap}"]; !ok || v != 0 {
		t.Errorf("open sessions = %v (present %v), want 0 and kept: backend reconfigured", v, ok)
	}
	if v := got["usher_backend_sessions_total{backend="+b+",proto=imap}"]; v != 1 {
		t.Errorf("backend sessions = %v, want 1", v)
	}
}

func TestConcurrent(t *testing.T) {
	m := New()
	const workers, rounds = 8, 500
	backends := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			proto := []string{"imap", "pop3"}[w%2]
			for i := range rounds {
				b := backends[(w+i)%len(backends)]
				m.SessionOpened(proto)
				m.SessionLoggedIn(proto, b)
				m.Login(proto, LoginOK, time.Millisecond)
				m.SessionClosed(proto, b, 3, 4)
				m.Move(MoveOK)
				m.Kick(KickKick, 1)
				m.Probe(b, proto, i%2 == 0, time.Millisecond)
				m.AdminRequest(200)
			}
		})
	}
	// Scrapes, backend churn and records updates race with the sessions.
	wg.Go(func() {
		for i := range 50 {
			m.BackendUp(backends[i%len(backends)], i%2 == 0)
			m.ForgetBackend(backends[i%len(backends)])
			m.SetUserRecordsFunc(func() float64 { return float64(i) })
			if _, err := m.Registry().Gather(); err != nil {
				t.Errorf("gather: %v", err)
			}
		}
	})
	wg.Wait()

	got := flatten(t, scrape(t, m))
	const perProto = workers / 2 * rounds
	for k, want := range map[string]float64{
		"usher_sessions_total{proto=imap}":            perProto,
		"usher_sessions_total{proto=pop3}":            perProto,
		"usher_logins_total{proto=imap,result=ok}":    perProto,
		"usher_bytes_total{direction=in,proto=imap}":  3 * perProto,
		"usher_bytes_total{direction=out,proto=pop3}": 4 * perProto,
		"usher_user_moves_total{result=ok}":           workers * rounds,
		"usher_kicked_sessions_total{reason=kick}":    workers * rounds,
		"usher_admin_requests_total{code=200}":        workers * rounds,
		"usher_sessions_open{backend=,proto=imap}":    0,
		"usher_sessions_open{backend=,proto=pop3}":    0,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	// Every session closed: no open gauge is anything but 0, despite the
	// concurrent ForgetBackend calls.
	for k, v := range got {
		if strings.HasPrefix(k, "usher_sessions_open{") && v != 0 {
			t.Errorf("%s = %v, want 0", k, v)
		}
	}
}

func TestNilReceiver(t *testing.T) {
	var m *Metrics
	m.SessionOpened("imap")
	m.SessionLoggedIn("imap", "192.0.2.1")
	m.SessionClosed("imap", "192.0.2.1", 1, 2)
	m.Bytes("imap", 1, 2)
	m.Login("imap", LoginOK, time.Second)
	m.SetUserRecordsFunc(func() float64 { return 1 })
	m.Move(MoveOK)
	m.Kick(KickKick, 1)
	m.BackendUp("192.0.2.1", true)
	m.Probe("192.0.2.1", "imap", true, time.Second)
	m.ForgetBackend("192.0.2.1")
	m.AdminRequest(200)
	if m.Registry() != nil {
		t.Errorf("nil Metrics: Registry() != nil")
	}
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("nil Metrics: handler status %d, want 404", rec.Code)
	}
}

func TestIndependentInstances(t *testing.T) {
	a, b := New(), New()
	a.SessionOpened("imap")
	if got := flatten(t, scrape(t, b))["usher_sessions_total{proto=imap}"]; got != 0 {
		t.Errorf("second instance sees first's session: %v", got)
	}
}

func BenchmarkSessionLifecycle(b *testing.B) {
	m := New()
	backends := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			be := backends[i%len(backends)]
			i++
			m.SessionOpened("imap")
			m.SessionLoggedIn("imap", be)
			m.SessionClosed("imap", be, 100, 1000)
		}
	})
}
