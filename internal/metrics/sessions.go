package metrics

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// sessionTable exports usher_sessions_open{proto,backend} and
// usher_backend_sessions_total{proto,backend}.
//
// It is a custom collector rather than a GaugeVec/CounterVec pair because
// ForgetBackend must not lose open sessions: deleting a vector child while
// sessions are still open on it would make the matching SessionClosed
// recreate the series at -1. Here a forgotten entry stays until its open
// count is back to 0.
//
// Locking: the per-session calls hold mu for reading while they update an
// entry's atomics, and take it for writing only to create an entry. Entries
// are removed only with mu held for writing, so no update can land on an
// entry that has already left the map.
type sessionTable struct {
	openDesc  *prometheus.Desc
	totalDesc *prometheus.Desc

	mu sync.RWMutex
	m  map[sessionKey]*sessionEntry
}

type sessionKey struct{ proto, backend string }

type sessionEntry struct {
	open   atomic.Int64  // sessions open now
	logins atomic.Uint64 // sessions that logged in (backend != "" only)
	// forgotten is set by ForgetBackend while sessions were still open; the
	// entry is dropped once open is 0. Guarded by sessionTable.mu (write).
	forgotten bool
}

func newSessionTable() *sessionTable {
	return &sessionTable{
		openDesc: prometheus.NewDesc("usher_sessions_open",
			`Client sessions open now, by protocol and backend; backend is "" until the session has logged in.`,
			[]string{"proto", "backend"}, nil),
		totalDesc: prometheus.NewDesc("usher_backend_sessions_total",
			"Client sessions that logged in to a backend, counted at login.",
			[]string{"proto", "backend"}, nil),
		m: make(map[sessionKey]*sessionEntry),
	}
}

// entryLocked returns the entry of k, creating it; mu must be held for
// writing.
func (t *sessionTable) entryLocked(k sessionKey) *sessionEntry {
	e := t.m[k]
	if e == nil {
		e = new(sessionEntry)
		t.m[k] = e
	}
	return e
}

// add adds delta to the open count of k.
func (t *sessionTable) add(k sessionKey, delta int64) {
	t.mu.RLock()
	if e := t.m[k]; e != nil {
		e.open.Add(delta)
		t.mu.RUnlock()
		return
	}
	t.mu.RUnlock()
	t.mu.Lock()
	t.entryLocked(k).open.Add(delta)
	t.mu.Unlock()
}

func (t *sessionTable) opened(proto string) { t.add(sessionKey{proto, ""}, 1) }

func (t *sessionTable) closed(proto, backend string) { t.add(sessionKey{proto, backend}, -1) }

// loggedIn moves one open session of proto from backend "" to backend and
// counts the login. Both changes happen under one hold of mu, so a scrape
// (which takes mu for writing) sees either neither or both.
func (t *sessionTable) loggedIn(proto, backend string) {
	from, to := sessionKey{proto, ""}, sessionKey{proto, backend}
	t.mu.RLock()
	if ef, et := t.m[from], t.m[to]; ef != nil && et != nil {
		ef.open.Add(-1)
		et.open.Add(1)
		et.logins.Add(1)
		t.mu.RUnlock()
		return
	}
	t.mu.RUnlock()
	t.mu.Lock()
	ef, et := t.entryLocked(from), t.entryLocked(to)
	ef.open.Add(-1)
	et.open.Add(1)
	et.logins.Add(1)
	t.mu.Unlock()
}

// forget drops the entries of backend that have no open session and marks
// the others for removal once their sessions have closed.
func (t *sessionTable) forget(backend string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, e := range t.m {
		if k.backend != backend {
			continue
		}
		if e.open.Load() == 0 {
			delete(t.m, k)
		} else {
			e.forgotten = true
		}
	}
}

// unforget clears the forgotten mark of backend's entries: the backend is
// configured again.
func (t *sessionTable) unforget(backend string) {
	t.mu.RLock()
	found := false
	for k, e := range t.m {
		if k.backend == backend && e.forgotten {
			found = true
			break
		}
	}
	t.mu.RUnlock()
	if !found {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, e := range t.m {
		if k.backend == backend {
			e.forgotten = false
		}
	}
}

// Describe implements prometheus.Collector.
func (t *sessionTable) Describe(ch chan<- *prometheus.Desc) {
	ch <- t.openDesc
	ch <- t.totalDesc
}

type sessionSample struct {
	key    sessionKey
	open   int64
	logins uint64
}

// Collect implements prometheus.Collector. It drops forgotten entries whose
// sessions have all closed, then exports a snapshot taken under the lock
// (so a login's move from "" to its backend is seen whole) without holding
// the lock while sending.
func (t *sessionTable) Collect(ch chan<- prometheus.Metric) {
	t.mu.Lock()
	snap := make([]sessionSample, 0, len(t.m))
	for k, e := range t.m {
		open := e.open.Load()
		if e.forgotten && open == 0 {
			delete(t.m, k)
			continue
		}
		snap = append(snap, sessionSample{k, open, e.logins.Load()})
	}
	t.mu.Unlock()
	for _, s := range snap {
		ch <- prometheus.MustNewConstMetric(t.openDesc, prometheus.GaugeValue,
			float64(s.open), s.key.proto, s.key.backend)
		if s.key.backend != "" {
			ch <- prometheus.MustNewConstMetric(t.totalDesc, prometheus.CounterValue,
				float64(s.logins), s.key.proto, s.key.backend)
		}
	}
}
