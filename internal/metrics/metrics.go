// Package metrics holds usher's Prometheus metrics.
//
// Every collector lives on a private *prometheus.Registry owned by one
// Metrics value; the package has no global state and never touches the
// client_golang default registry, so tests and several instances in one
// process do not interfere. Handler serves that registry in the Prometheus
// text (or negotiated) exposition format.
//
// All methods are safe for concurrent use, and all are no-ops on a nil
// *Metrics, so callers can run without metrics by passing nil.
//
// # Metrics
//
//	usher_sessions_total{proto}                 counter   client sessions accepted (counted at open)
//	usher_sessions_open{proto,backend}          gauge     sessions open now; backend="" until login
//	usher_backend_sessions_total{proto,backend} counter   sessions that logged in to a backend
//	usher_logins_total{proto,result}            counter   login attempts by result: ok|failed|unavailable|error
//	usher_login_duration_seconds{proto}         histogram client login command to backend answer
//	usher_bytes_total{proto,direction}          counter   spliced bytes; in = client->backend, out = backend->client
//	usher_user_records                          gauge     user->backend records held (only once SetUserRecordsFunc is called)
//	usher_user_moves_total{result}              counter   user moves by result: ok|timeout|error
//	usher_user_kicks_total{reason}              counter   kick operations (one per user) by reason: move|kick|backend-down|flush
//	usher_kicked_sessions_total{reason}         counter   client sessions closed by those kicks
//	usher_backend_up{backend}                   gauge     1 if the last health probe succeeded, else 0
//	usher_backend_health_probe_seconds{backend,proto} histogram health probe duration, failed probes included
//	usher_backend_probe_failures_total{backend,proto} counter failed health probes
//	usher_admin_requests_total{code}            counter   admin API requests by HTTP status code
//
// plus the standard go_* and process_* collectors.
//
// # Invariants
//
//   - Label cardinality is bounded by configuration: proto is one of the
//     protocol names usher speaks, backend is a backend IP taken from the
//     configuration, result/reason/direction come from the fixed sets
//     above and code is an HTTP status. User names never become labels.
//   - A session is counted once in usher_sessions_total when it opens and
//     once in usher_backend_sessions_total when it logs in; the open gauge
//     moves from backend="" to the backend at login and drops at close, so
//     sum(usher_sessions_open) is the number of live client connections.
//   - ForgetBackend drops every series of a backend that has left the
//     configuration. Series of sessions still open on it stay until those
//     sessions close (and are gone from the next scrape after that), so the
//     open gauge never goes negative because of a forgotten backend.
//   - Counters never receive negative increments (client_golang panics on
//     them); negative byte or session counts are ignored.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Login results, the values of the result label of usher_logins_total.
const (
	LoginOK          = "ok"          // the backend accepted the credentials
	LoginFailed      = "failed"      // the backend rejected the credentials
	LoginUnavailable = "unavailable" // no backend could take the user
	LoginError       = "error"       // protocol or I/O error during login
)

// Move results, the values of the result label of usher_user_moves_total.
const (
	MoveOK      = "ok"
	MoveTimeout = "timeout"
	MoveError   = "error"
)

// Kick reasons, the values of the reason label of usher_user_kicks_total
// and usher_kicked_sessions_total.
const (
	KickMove        = "move"         // the user was moved to another backend
	KickKick        = "kick"         // an operator kicked the user
	KickBackendDown = "backend-down" // the user's backend went down
	KickFlush       = "flush"        // the user's record was flushed
)

// Directions, the values of the direction label of usher_bytes_total.
const (
	DirectionIn  = "in"  // client -> backend
	DirectionOut = "out" // backend -> client
)

var (
	loginResults = [...]string{LoginOK, LoginFailed, LoginUnavailable, LoginError}
	moveResults  = [...]string{MoveOK, MoveTimeout, MoveError}
	kickReasons  = [...]string{KickMove, KickKick, KickBackendDown, KickFlush}
)

// DurationBuckets are the histogram buckets, in seconds, of
// usher_login_duration_seconds and usher_backend_health_probe_seconds:
// 1ms to 30s.
func DurationBuckets() []float64 {
	return []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
}

// Metrics is the set of usher's collectors on their own registry. The zero
// value is not usable; create one with New. A nil *Metrics is a valid
// receiver for every method and records nothing.
type Metrics struct {
	reg     *prometheus.Registry
	handler http.Handler

	sessionsTotal *prometheus.CounterVec
	sessions      *sessionTable
	logins        *prometheus.CounterVec
	loginSeconds  *prometheus.HistogramVec
	bytes         *prometheus.CounterVec
	userRecords   *funcGauge
	moves         *prometheus.CounterVec
	kicks         *prometheus.CounterVec
	kickedSess    *prometheus.CounterVec
	backendUp     *prometheus.GaugeVec
	probeSeconds  *prometheus.HistogramVec
	probeFailures *prometheus.CounterVec
	adminRequests *prometheus.CounterVec

	// protoMu guards protos, the per-protocol cache of child collectors
	// for the hot path. Entries are created once and never removed: the
	// set of protocols is fixed by the program.
	protoMu sync.RWMutex
	protos  map[string]*protoChildren
}

// protoChildren caches the per-protocol children so the per-session calls
// skip the label hashing of the vectors.
type protoChildren struct {
	sessions     prometheus.Counter
	bytesIn      prometheus.Counter
	bytesOut     prometheus.Counter
	loginSeconds prometheus.Observer
	logins       [len(loginResults)]prometheus.Counter
}

// New returns a Metrics with every collector, including the Go runtime and
// process collectors, registered on a fresh private registry.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		sessionsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_sessions_total",
			Help: "Client sessions accepted, counted when the connection opens.",
		}, []string{"proto"}),
		sessions: newSessionTable(),
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_logins_total",
			Help: "Login attempts by result: ok (backend accepted), failed (backend rejected the credentials), unavailable (no backend could take the user), error (protocol or I/O error).",
		}, []string{"proto", "result"}),
		loginSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "usher_login_duration_seconds",
			Help:    "Time from the client's login command to the backend's answer, in seconds, for every login attempt.",
			Buckets: DurationBuckets(),
		}, []string{"proto"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_bytes_total",
			Help: "Bytes spliced between clients and backends; direction in is client to backend, out is backend to client.",
		}, []string{"proto", "direction"}),
		userRecords: newFuncGauge(prometheus.NewDesc(
			"usher_user_records",
			"User to backend records currently held by the director.",
			nil, nil)),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_user_moves_total",
			Help: "User moves to another backend by result: ok, timeout (old sessions did not end in time), error.",
		}, []string{"result"}),
		kicks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_user_kicks_total",
			Help: "Kick operations, one per user whose sessions were closed, by reason: move, kick (operator), backend-down, flush.",
		}, []string{"reason"}),
		kickedSess: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_kicked_sessions_total",
			Help: "Client sessions closed by kick operations, by reason: move, kick (operator), backend-down, flush.",
		}, []string{"reason"}),
		backendUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "usher_backend_up",
			Help: "1 if the backend's last health probe succeeded, 0 if it failed.",
		}, []string{"backend"}),
		probeSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "usher_backend_health_probe_seconds",
			Help:    "Duration of backend health probes in seconds, failed probes included.",
			Buckets: DurationBuckets(),
		}, []string{"backend", "proto"}),
		probeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_backend_probe_failures_total",
			Help: "Backend health probes that failed.",
		}, []string{"backend", "proto"}),
		adminRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "usher_admin_requests_total",
			Help: "Admin API requests by HTTP response status code.",
		}, []string{"code"}),
		protos: make(map[string]*protoChildren),
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.sessionsTotal, m.sessions, m.logins, m.loginSeconds, m.bytes,
		m.userRecords, m.moves, m.kicks, m.kickedSess,
		m.backendUp, m.probeSeconds, m.probeFailures, m.adminRequests,
	)
	// Series with a fixed label set start at 0 so that rate() and
	// absence alerts work from the first scrape.
	for _, r := range moveResults {
		m.moves.WithLabelValues(r)
	}
	for _, r := range kickReasons {
		m.kicks.WithLabelValues(r)
		m.kickedSess.WithLabelValues(r)
	}
	m.handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		// Serve what could be gathered and report the rest in
		// promhttp_metric_handler_errors_total rather than failing the
		// whole scrape.
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            reg,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	})
	return m
}

// Registry returns the private registry, for callers that register their
// own collectors or gather directly. It is nil for a nil Metrics.
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// Handler returns the HTTP handler that serves the registry. For a nil
// Metrics it answers 404.
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return m.handler
}

// proto returns the cached children of proto, creating them (and with
// them the proto's zero-valued series) on first use.
func (m *Metrics) proto(proto string) *protoChildren {
	m.protoMu.RLock()
	p := m.protos[proto]
	m.protoMu.RUnlock()
	if p != nil {
		return p
	}
	m.protoMu.Lock()
	defer m.protoMu.Unlock()
	if p = m.protos[proto]; p != nil {
		return p
	}
	p = &protoChildren{
		sessions:     m.sessionsTotal.WithLabelValues(proto),
		bytesIn:      m.bytes.WithLabelValues(proto, DirectionIn),
		bytesOut:     m.bytes.WithLabelValues(proto, DirectionOut),
		loginSeconds: m.loginSeconds.WithLabelValues(proto),
	}
	for i, r := range loginResults {
		p.logins[i] = m.logins.WithLabelValues(proto, r)
	}
	m.protos[proto] = p
	return p
}

// SessionOpened records a client connection accepted for proto: it counts
// it in usher_sessions_total and adds it to usher_sessions_open with
// backend "".
func (m *Metrics) SessionOpened(proto string) {
	if m == nil {
		return
	}
	m.proto(proto).sessions.Inc()
	m.sessions.opened(proto)
}

// SessionLoggedIn records that a session of proto, counted by
// SessionOpened, logged in to backend: its open gauge moves from backend
// "" to backend and usher_backend_sessions_total counts it. An empty
// backend is ignored.
func (m *Metrics) SessionLoggedIn(proto, backend string) {
	if m == nil || backend == "" {
		return
	}
	m.sessions.loggedIn(proto, backend)
}

// SessionClosed records the end of a session of proto: backend is the
// backend it logged in to, or "" if it never did. bytesIn (client to
// backend) and bytesOut (backend to client) are the bytes spliced and not
// yet reported with Bytes; negative values are ignored.
func (m *Metrics) SessionClosed(proto, backend string, bytesIn, bytesOut int64) {
	if m == nil {
		return
	}
	m.sessions.closed(proto, backend)
	m.Bytes(proto, bytesIn, bytesOut)
}

// Bytes adds spliced bytes of proto to usher_bytes_total without closing a
// session, so long-lived sessions can report as they go; the remainder is
// then passed to SessionClosed. Negative values are ignored.
func (m *Metrics) Bytes(proto string, bytesIn, bytesOut int64) {
	if m == nil {
		return
	}
	p := m.proto(proto)
	if bytesIn > 0 {
		p.bytesIn.Add(float64(bytesIn))
	}
	if bytesOut > 0 {
		p.bytesOut.Add(float64(bytesOut))
	}
}

// Login records one login attempt of proto with its result (LoginOK,
// LoginFailed, LoginUnavailable or LoginError) and d, the time from the
// client's login command to the backend's answer. A negative d counts as 0.
func (m *Metrics) Login(proto, result string, d time.Duration) {
	if m == nil {
		return
	}
	p := m.proto(proto)
	if i := indexOf(loginResults[:], result); i >= 0 {
		p.logins[i].Inc()
	} else {
		m.logins.WithLabelValues(proto, result).Inc()
	}
	p.loginSeconds.Observe(max(d, 0).Seconds())
}

// SetUserRecordsFunc makes usher_user_records report f() at every scrape.
// f must be safe for concurrent use and fast. Until it is called the
// metric is absent; a nil f removes it again.
func (m *Metrics) SetUserRecordsFunc(f func() float64) {
	if m == nil {
		return
	}
	m.userRecords.set(f)
}

// Move records one user move with its result (MoveOK, MoveTimeout or
// MoveError).
func (m *Metrics) Move(result string) {
	if m == nil {
		return
	}
	m.moves.WithLabelValues(result).Inc()
}

// Kick records one kick operation on a user for reason (KickMove,
// KickKick, KickBackendDown or KickFlush) that closed sessions client
// sessions. Call it once per user; a negative sessions counts as 0.
func (m *Metrics) Kick(reason string, sessions int) {
	if m == nil {
		return
	}
	m.kicks.WithLabelValues(reason).Inc()
	c := m.kickedSess.WithLabelValues(reason)
	if sessions > 0 {
		c.Add(float64(sessions))
	}
}

// BackendUp sets usher_backend_up of backend to 1 or 0. A backend that
// reports again after ForgetBackend is no longer treated as forgotten.
func (m *Metrics) BackendUp(backend string, up bool) {
	if m == nil {
		return
	}
	v := 0.0
	if up {
		v = 1
	}
	m.backendUp.WithLabelValues(backend).Set(v)
	m.sessions.unforget(backend)
}

// Probe records one health probe of backend over proto: its duration d
// (negative counts as 0) and, if !ok, a failure.
func (m *Metrics) Probe(backend, proto string, ok bool, d time.Duration) {
	if m == nil {
		return
	}
	m.probeSeconds.WithLabelValues(backend, proto).Observe(max(d, 0).Seconds())
	c := m.probeFailures.WithLabelValues(backend, proto)
	if !ok {
		c.Inc()
	}
}

// ForgetBackend deletes the series of a backend that left the
// configuration: usher_backend_up, the probe metrics and the session
// metrics. Session series with sessions still open stay until those
// sessions close, so that SessionClosed never drives a gauge negative. An
// empty backend (the pre-login pseudo-backend) is ignored.
func (m *Metrics) ForgetBackend(backend string) {
	if m == nil || backend == "" {
		return
	}
	m.backendUp.DeleteLabelValues(backend)
	m.probeSeconds.DeletePartialMatch(prometheus.Labels{"backend": backend})
	m.probeFailures.DeletePartialMatch(prometheus.Labels{"backend": backend})
	m.sessions.forget(backend)
}

// AdminRequest records one admin API request answered with HTTP status
// code.
func (m *Metrics) AdminRequest(code int) {
	if m == nil {
		return
	}
	m.adminRequests.WithLabelValues(strconv.Itoa(code)).Inc()
}

func indexOf(set []string, v string) int {
	for i, s := range set {
		if s == v {
			return i
		}
	}
	return -1
}

// funcGauge is a gauge whose value comes from a function that can be set
// after registration; it exports nothing while no function is set.
type funcGauge struct {
	desc *prometheus.Desc
	f    atomic.Pointer[func() float64]
}

func newFuncGauge(desc *prometheus.Desc) *funcGauge { return &funcGauge{desc: desc} }

func (g *funcGauge) set(f func() float64) {
	if f == nil {
		g.f.Store(nil)
		return
	}
	g.f.Store(&f)
}

// Describe implements prometheus.Collector.
func (g *funcGauge) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }

// Collect implements prometheus.Collector.
func (g *funcGauge) Collect(ch chan<- prometheus.Metric) {
	if f := g.f.Load(); f != nil {
		ch <- prometheus.MustNewConstMetric(g.desc, prometheus.GaugeValue, (*f)())
	}
}
