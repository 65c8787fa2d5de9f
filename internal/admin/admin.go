// Package admin serves the director's admin API: JSON over HTTP on a local
// UNIX socket and, optionally, on TCP; and it provides the client the CLI
// uses (client.go).
//
// Invariants:
//   - the UNIX socket is created with mode 0600 before it accepts, so only
//     its owner (and root) can talk to it: file permissions are its access
//     control and it needs no token;
//   - every TCP request must come from an address inside the allow list
//     (else 403, checked first) and carry "Authorization: Bearer <token>"
//     (else 401, RFC 6750 section 3); the token is compared in constant
//     time; SetAuth swaps token and allow list atomically;
//   - every error reaches the client as a JSON object {"error": "..."} with
//     a fitting HTTP status, unknown paths and wrong methods included;
//     every refused request (401/403) is logged with the remote address;
//     Options.OnRequest sees the status of every request;
//   - request bodies are strict JSON: one object, at most MaxBodySize
//     bytes, no unknown fields, nothing after it;
//   - long operations (move, flush, backend down, backend remove) run on a
//     context that a client disconnect does not cancel, so they finish
//     consistently; they are bounded by Options.OpTimeout, and Shutdown
//     cuts their waits short (the director then still completes every
//     started move). Reads have deadlines (ReadHeaderTimeout, ReadTimeout);
//     each answer gets a write deadline when it is written, so a long
//     operation is not cut by the write timeout;
//   - Go's profiles (/debug/pprof/) are served only when Options.Profiling
//     is set (importing net/http/pprof also registers them on
//     http.DefaultServeMux, which usher never serves).
package admin

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/state"
)

// Limits of the API.
const (
	// MaxBodySize caps a request body; larger ones get 413.
	MaxBodySize = 64 << 10
	// DefaultOpTimeout bounds a long operation (move, flush, backend down
	// or remove) when Options.OpTimeout is zero.
	DefaultOpTimeout = 10 * time.Minute
	// MaxUserLen caps a user name in a path.
	MaxUserLen = 1024
	// MaxCauseLen caps the cause text of `backend up|down`.
	MaxCauseLen = 256
	// MaxFlushParallel caps a flush's max_parallel.
	MaxFlushParallel = 1000
	// DefaultCause is the cause of `backend up|down` without one.
	DefaultCause = "admin"

	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 30 * time.Second // per answer, set when it is written
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
)

// Director is what the API needs from the director (*director.Director).
type Director interface {
	Status() director.Status
	UserStatus(user string) director.UserStatus
	Map(backend netip.Addr) []director.UserRecord
	Backend(addr netip.Addr) (state.Backend, bool)
	AddBackend(b state.Backend) error
	UpdateBackend(addr netip.Addr, weight int) error
	SetBackendUp(ctx context.Context, addr netip.Addr, up bool, cause string) error
	RemoveBackend(ctx context.Context, addr netip.Addr) error
	MoveUser(ctx context.Context, user string, to netip.Addr) error
	KickUser(user string) int
	Flush(ctx context.Context, backend netip.Addr, maxParallel int) (director.FlushResult, error)
	Forget(backend netip.Addr) (int, error)
	Dump() []state.Command
}

// Options configures a Server.
type Options struct {
	Director Director
	// Metrics serves GET /metrics (nil: 404).
	Metrics http.Handler
	Logger  *slog.Logger
	// Token and Allow guard the TCP listener (see SetAuth). An empty token
	// refuses every TCP request.
	Token string
	Allow []netip.Prefix
	// OnRequest, optional, is called with the HTTP status of every request.
	OnRequest func(code int)
	// OpTimeout bounds a long operation (default DefaultOpTimeout).
	OpTimeout time.Duration
	// Profiling serves Go's profiles (net/http/pprof) under /debug/pprof/:
	// CPU, heap, goroutines, mutexes, an execution trace. Off by default;
	// the TCP listener guards them like every other path.
	Profiling bool
}

// Request and answer bodies of the API.
type (
	// AddBackendRequest is the body of POST /v1/backends.
	AddBackendRequest struct {
		Address string `json:"address"`
		Weight  *int   `json:"weight,omitempty"` // default 100
		Tag     string `json:"tag,omitempty"`
	}
	// AddBackendAnswer answers POST /v1/backends (201).
	AddBackendAnswer struct {
		Address string `json:"address"`
		Weight  int    `json:"weight"`
		Tag     string `json:"tag"`
	}
	// UpdateBackendRequest is the body of PATCH /v1/backends/{addr}.
	UpdateBackendRequest struct {
		Weight *int `json:"weight"` // required
	}
	// SetUpRequest is the optional body of POST /v1/backends/{addr}/up|down.
	SetUpRequest struct {
		Cause string `json:"cause,omitempty"` // default DefaultCause
	}
	// RemoveAnswer answers DELETE /v1/backends/{addr}.
	RemoveAnswer struct {
		Removed string `json:"removed"`
	}
	// MoveRequest is the body of POST /v1/users/{user}/move.
	MoveRequest struct {
		Backend string `json:"backend"`
	}
	// KickAnswer answers POST /v1/users/{user}/kick.
	KickAnswer struct {
		Kicked int `json:"kicked"`
	}
	// FlushRequest is the body of POST /v1/flush.
	FlushRequest struct {
		Backend     string `json:"backend"`                // an IP or "all"
		MaxParallel *int   `json:"max_parallel,omitempty"` // 1..MaxFlushParallel, default 10
		Forget      bool   `json:"forget,omitempty"`       // drop the records, kick nobody
	}
	// ForgetAnswer answers POST /v1/flush with forget.
	ForgetAnswer struct {
		Forgotten int `json:"forgotten"`
	}
	// MapAnswer answers GET /v1/map, sorted by user.
	MapAnswer struct {
		Users []director.UserRecord `json:"users"`
	}
	// DumpAnswer answers GET /v1/dump.
	DumpAnswer struct {
		Commands []state.Command `json:"commands"`
	}
	// ErrorAnswer is every error answer.
	ErrorAnswer struct {
		Error string `json:"error"`
	}
)

// auth is what guards the TCP listener.
type auth struct {
	token string
	allow []netip.Prefix
}

// listener is one socket with its HTTP server.
type listener struct {
	ln  net.Listener
	srv *http.Server
}

// Server is the admin HTTP API. Create it with New, open sockets with
// ListenUnix and ListenTCP, then Serve; stop it with Shutdown.
type Server struct {
	d         Director
	metrics   http.Handler
	log       *slog.Logger
	onRequest func(int)
	opTimeout time.Duration
	mux       *http.ServeMux
	auth      atomic.Pointer[auth]

	// ops is the parent of long operations' deadlines: Shutdown cancels it.
	ops     context.Context
	stopOps context.CancelFunc

	mu        sync.Mutex
	listeners []listener
	tcpAddr   net.Addr
	serving   bool
	closed    bool
	wg        sync.WaitGroup
}

// New builds a Server; it opens no socket yet.
func New(o Options) (*Server, error) {
	if o.Director == nil {
		return nil, errors.New("admin: no director")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.OnRequest == nil {
		o.OnRequest = func(int) {}
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = DefaultOpTimeout
	}
	s := &Server{d: o.Director, metrics: o.Metrics, log: o.Logger, onRequest: o.OnRequest, opTimeout: o.OpTimeout}
	s.ops, s.stopOps = context.WithCancel(context.Background())
	s.SetAuth(o.Token, o.Allow)

	m := http.NewServeMux()
	m.HandleFunc("GET /v1/status", s.status)
	m.HandleFunc("GET /v1/users/{user}", s.user)
	m.HandleFunc("POST /v1/users/{user}/move", s.moveUser)
	m.HandleFunc("POST /v1/users/{user}/kick", s.kickUser)
	m.HandleFunc("GET /v1/map", s.userMap)
	m.HandleFunc("POST /v1/backends", s.addBackend)
	m.HandleFunc("PATCH /v1/backends/{addr}", s.updateBackend)
	m.HandleFunc("DELETE /v1/backends/{addr}", s.removeBackend)
	m.HandleFunc("POST /v1/backends/{addr}/up", s.setUp(true))
	m.HandleFunc("POST /v1/backends/{addr}/down", s.setUp(false))
	m.HandleFunc("POST /v1/flush", s.flush)
	m.HandleFunc("GET /v1/dump", s.dump)
	m.HandleFunc("GET /metrics", s.serveMetrics)
	if o.Profiling {
		// Named profiles (heap, goroutine, allocs, block, mutex...) are
		// served by Index under their own names.
		m.HandleFunc("GET /debug/pprof/", pprof.Index)
		m.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		m.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		m.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		m.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	s.mux = m
	return s, nil
}

// SetAuth replaces the TCP listener's token and allow list (at a config
// reload); requests after it returns see the new pair, never a mix.
func (s *Server) SetAuth(token string, allow []netip.Prefix) {
	s.auth.Store(&auth{token: token, allow: slices.Clone(allow)})
}

// ListenUnix creates the UNIX socket at path with mode 0600. A stale socket
// left by a dead process is replaced; a socket someone still answers on,
// or any other file, is left alone and ListenUnix fails.
func (s *Server) ListenUnix(path string) error {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		// A socket left by a previous run; refuse if someone still answers on it.
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return fmt.Errorf("admin socket %s: another usher is listening", path)
		}
		os.Remove(path)
	}
	// The umask makes the socket 0600 from the start: no window in which
	// others could connect before the chmod.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := s.add(ln, false); err != nil {
		ln.Close()
		return fmt.Errorf("admin socket %s: %w", path, err)
	}
	return nil
}

// ListenTCP serves the API on a TCP address (host:port) too, guarded by
// token and allow list. It refuses to listen without a token.
func (s *Server) ListenTCP(addr string) error {
	if s.auth.Load().token == "" {
		return fmt.Errorf("admin listen %s: no admin token set", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("admin listen: %w", err)
	}
	if err := s.add(ln, true); err != nil {
		ln.Close()
		return fmt.Errorf("admin listen %s: %w", addr, err)
	}
	s.mu.Lock()
	s.tcpAddr = ln.Addr()
	s.mu.Unlock()
	return nil
}

// TCPAddr returns the address of the TCP listener (nil without one).
func (s *Server) TCPAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tcpAddr
}

func (s *Server) add(ln net.Listener, tcp bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.serving {
		return errors.New("server already serving or shut down")
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.serveHTTP(w, r, tcp) }),
		// No WriteTimeout: it would cut long operations. Each answer gets
		// a write deadline when it is written (see writeJSON).
		ReadHeaderTimeout: readHeaderTimeout, ReadTimeout: readTimeout, IdleTimeout: idleTimeout,
		MaxHeaderBytes: maxHeaderBytes,
		ErrorLog:       slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	s.listeners = append(s.listeners, listener{ln: ln, srv: srv})
	return nil
}

// Serve answers requests on every opened socket, each in its own
// goroutine, until Shutdown; it returns at once.
func (s *Server) Serve() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.serving || s.closed {
		return
	}
	s.serving = true
	for _, l := range s.listeners {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := l.srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("admin serve", "addr", l.ln.Addr().String(), "err", err)
			}
		}()
	}
}

// Shutdown closes the sockets (the UNIX socket file goes with its
// listener), waits for running requests until ctx ends, then cuts the
// waits of long operations short.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ls, serving := s.listeners, s.serving
	s.mu.Unlock()
	var errs []error
	for _, l := range ls {
		if serving {
			errs = append(errs, l.srv.Shutdown(ctx))
		} else if err := l.ln.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.stopOps()
	s.wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("admin shutdown: %w", err)
	}
	return nil
}

// statusWriter records the status of an answer and sets its write deadline.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
		// The answer is being written now: give it writeTimeout from here
		// (a long operation may have run for minutes before).
		_ = http.NewResponseController(w.ResponseWriter).SetWriteDeadline(time.Now().Add(writeTimeout))
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the connection.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// serveHTTP is every request's way in: auth on TCP, routing with JSON
// 404/405, OnRequest, and an audit log line.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request, tcp bool) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		p := recover()
		if p != nil && p != http.ErrAbortHandler {
			s.log.Error("admin handler panic", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "panic", fmt.Sprint(p))
			if sw.code == 0 {
				s.writeError(sw, http.StatusInternalServerError, errors.New("internal error"))
			}
		}
		code := cmp.Or(sw.code, http.StatusOK)
		s.onRequest(code)
		level := slog.LevelDebug
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			level = slog.LevelInfo // changes are audited
		}
		s.log.Log(r.Context(), level, "admin request", "method", r.Method, "path", r.URL.Path, "status", code,
			"remote", remoteString(r, tcp), "elapsed", time.Since(start).Round(time.Millisecond).String())
		if p == http.ErrAbortHandler {
			panic(p)
		}
	}()
	if tcp && !s.authorize(sw, r) {
		return
	}
	s.route(sw, r)
}

func remoteString(r *http.Request, tcp bool) string {
	if !tcp {
		return "unix"
	}
	return r.RemoteAddr
}

// authorize checks a TCP request: address first (403), then token (401).
func (s *Server) authorize(w http.ResponseWriter, r *http.Request) bool {
	a := s.auth.Load()
	ip := remoteIP(r.RemoteAddr)
	if !ip.IsValid() || !slices.ContainsFunc(a.allow, func(p netip.Prefix) bool { return p.Contains(ip) }) {
		s.log.Warn("admin request refused: address not allowed", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
		s.writeError(w, http.StatusForbidden, fmt.Errorf("address %s may not use the admin API", ip))
		return false
	}
	tok, ok := bearerToken(r.Header.Get("Authorization"))
	if !ok || a.token == "" || !tokenEqual(tok, a.token) {
		why := "bad token"
		if !ok {
			why = "no bearer token"
		}
		s.log.Warn("admin request refused: "+why, "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
		// RFC 6750, section 3: a 401 names the scheme.
		w.Header().Set("WWW-Authenticate", `Bearer realm="usher"`)
		s.writeError(w, http.StatusUnauthorized, errors.New("missing or bad bearer token"))
		return false
	}
	return true
}

func remoteIP(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// bearerToken extracts the token of "Bearer <token>" (RFC 6750, section
// 2.1; the scheme is case-insensitive, RFC 9110, section 11.1).
func bearerToken(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimLeft(tok, " ")
	return tok, tok != ""
}

// tokenEqual compares in constant time; hashing first hides the length too.
func tokenEqual(a, b string) bool {
	ha, hb := sha256.Sum256([]byte(a)), sha256.Sum256([]byte(b))
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

// headerOnly collects what the mux's fallback handlers (404, 405) set.
type headerOnly struct {
	h    http.Header
	code int
}

func (h *headerOnly) Header() http.Header         { return h.h }
func (h *headerOnly) Write(p []byte) (int, error) { return len(p), nil }
func (h *headerOnly) WriteHeader(code int)        { h.code = code }

// route serves r with the mux, answering unknown paths and wrong methods
// with JSON errors instead of the mux's plain text.
func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	h, pattern := s.mux.Handler(r)
	if pattern != "" {
		s.mux.ServeHTTP(w, r)
		return
	}
	fb := &headerOnly{h: http.Header{}}
	h.ServeHTTP(fb, r)
	switch fb.code {
	case http.StatusMethodNotAllowed:
		allow := fb.h.Get("Allow")
		w.Header().Set("Allow", allow)
		s.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s (allowed: %s)", r.Method, r.URL.Path, allow))
	default:
		s.fail(w, r, http.StatusNotFound, fmt.Errorf("no API endpoint %s %s", r.Method, r.URL.Path))
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Server) writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, ErrorAnswer{Error: err.Error()})
}

// fail answers an error and logs it (5xx as errors, others as warnings).
func (s *Server) fail(w http.ResponseWriter, r *http.Request, code int, err error) {
	level := slog.LevelWarn
	if code >= 500 {
		level = slog.LevelError
	}
	s.log.Log(r.Context(), level, "admin request failed", "method", r.Method, "path", r.URL.Path, "status", code, "err", err)
	s.writeError(w, code, err)
}

// failOp answers the error of a director operation with its status.
func (s *Server) failOp(w http.ResponseWriter, r *http.Request, err error) {
	s.fail(w, r, opStatus(err), err)
}

// opStatus maps the director's errors to HTTP statuses.
func opStatus(err error) int {
	switch {
	case errors.Is(err, director.ErrNotFound), errors.Is(err, state.ErrUnknownBackend):
		return http.StatusNotFound
	case errors.Is(err, state.ErrBackendExists), errors.Is(err, director.ErrBusy), errors.Is(err, state.ErrMoving):
		return http.StatusConflict
	case errors.Is(err, director.ErrBackendDown):
		return http.StatusServiceUnavailable
	case errors.Is(err, state.ErrBadCommand):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

// opContext is the context of a long operation: not cancelled when the
// client goes away (a half-done flush helps nobody; the director
// completes every move it started either way), bounded by opTimeout, and
// cut short by Shutdown.
func (s *Server) opContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.opTimeout)
	stop := context.AfterFunc(s.ops, cancel)
	return ctx, func() { stop(); cancel() }
}

// decodeBody reads a strict JSON object into v: at most MaxBodySize bytes
// (else 413), no unknown fields, nothing after the object. With optional,
// an empty body leaves v alone. It returns the status to answer on error.
func decodeBody(w http.ResponseWriter, r *http.Request, v any, optional bool) (int, error) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodySize))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return http.StatusRequestEntityTooLarge, fmt.Errorf("request body larger than %d bytes", MaxBodySize)
		}
		return http.StatusBadRequest, fmt.Errorf("read request body: %w", err)
	}
	if optional && len(bytes.TrimSpace(data)) == 0 {
		return 0, nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return http.StatusBadRequest, fmt.Errorf("decode request: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return http.StatusBadRequest, errors.New("decode request: data after the JSON object")
	}
	return 0, nil
}

// body decodes the request body into v, answering the error itself; it
// reports whether the handler may go on.
func (s *Server) body(w http.ResponseWriter, r *http.Request, v any, optional bool) bool {
	if code, err := decodeBody(w, r, v, optional); err != nil {
		s.fail(w, r, code, err)
		return false
	}
	return true
}

// backendParam parses the {addr} path value.
func (s *Server) backendParam(w http.ResponseWriter, r *http.Request) (netip.Addr, bool) {
	addr, err := config.ParseBackendAddress(r.PathValue("addr"))
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return netip.Addr{}, false
	}
	return addr, true
}

// userParam checks the {user} path value.
func (s *Server) userParam(w http.ResponseWriter, r *http.Request) (string, bool) {
	u := r.PathValue("user")
	var err error
	switch {
	case u == "":
		err = errors.New("user name must not be empty")
	case len(u) > MaxUserLen:
		err = fmt.Errorf("user name is %d bytes, longer than %d", len(u), MaxUserLen)
	case !utf8.ValidString(u):
		err = errors.New("user name is not UTF-8")
	}
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return "", false
	}
	return u, true
}

func checkWeight(w int) error {
	if w < 0 || w > config.MaxBackendWeight {
		return fmt.Errorf("weight %d out of range 0..%d", w, config.MaxBackendWeight)
	}
	return nil
}

// backendStatus returns one backend as in GET /v1/status.
func (s *Server) backendStatus(addr netip.Addr) director.BackendStatus {
	for _, b := range s.d.Status().Backends {
		if b.Address == addr.String() {
			return b
		}
	}
	return director.BackendStatus{Address: addr.String()}
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.d.Status())
}

func (s *Server) user(w http.ResponseWriter, r *http.Request) {
	if u, ok := s.userParam(w, r); ok {
		writeJSON(w, http.StatusOK, s.d.UserStatus(u))
	}
}

func (s *Server) userMap(w http.ResponseWriter, r *http.Request) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, fmt.Errorf("query: %w", err))
		return
	}
	var backend netip.Addr
	for k, vs := range q {
		if k != "backend" || len(vs) != 1 {
			s.fail(w, r, http.StatusBadRequest, fmt.Errorf("query: only one parameter \"backend\" is known, got %q", r.URL.RawQuery))
			return
		}
		if backend, err = config.ParseBackendAddress(vs[0]); err != nil {
			s.fail(w, r, http.StatusBadRequest, err)
			return
		}
		if _, ok := s.d.Backend(backend); !ok {
			s.fail(w, r, http.StatusNotFound, fmt.Errorf("map %s: %w", backend, director.ErrNotFound))
			return
		}
	}
	users := s.d.Map(backend)
	if users == nil {
		users = []director.UserRecord{}
	}
	slices.SortFunc(users, func(a, b director.UserRecord) int { return strings.Compare(a.User, b.User) })
	writeJSON(w, http.StatusOK, MapAnswer{Users: users})
}

func (s *Server) addBackend(w http.ResponseWriter, r *http.Request) {
	var req AddBackendRequest
	if !s.body(w, r, &req, false) {
		return
	}
	addr, err := config.ParseBackendAddress(req.Address)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return
	}
	weight := config.DefaultBackendWeight
	if req.Weight != nil {
		weight = *req.Weight
	}
	if err := checkWeight(weight); err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return
	}
	if err := config.CheckTag(req.Tag); err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return
	}
	if err := s.d.AddBackend(state.Backend{Addr: addr, Weight: weight, Tag: req.Tag, Up: true}); err != nil {
		s.failOp(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, AddBackendAnswer{Address: addr.String(), Weight: weight, Tag: req.Tag})
}

func (s *Server) updateBackend(w http.ResponseWriter, r *http.Request) {
	addr, ok := s.backendParam(w, r)
	if !ok {
		return
	}
	var req UpdateBackendRequest
	if !s.body(w, r, &req, false) {
		return
	}
	if req.Weight == nil {
		s.fail(w, r, http.StatusBadRequest, errors.New("weight is required"))
		return
	}
	if err := checkWeight(*req.Weight); err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return
	}
	if err := s.d.UpdateBackend(addr, *req.Weight); err != nil {
		s.failOp(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.backendStatus(addr))
}

func (s *Server) removeBackend(w http.ResponseWriter, r *http.Request) {
	addr, ok := s.backendParam(w, r)
	if !ok || !s.body(w, r, &struct{}{}, true) {
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	if err := s.d.RemoveBackend(ctx, addr); err != nil {
		s.failOp(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, RemoveAnswer{Removed: addr.String()})
}

func checkCause(c string) error {
	if len(c) > MaxCauseLen {
		return fmt.Errorf("cause is %d bytes, longer than %d", len(c), MaxCauseLen)
	}
	if !utf8.ValidString(c) || strings.ContainsFunc(c, unicode.IsControl) {
		return errors.New("cause must be UTF-8 text without control characters")
	}
	return nil
}

func (s *Server) setUp(up bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		addr, ok := s.backendParam(w, r)
		if !ok {
			return
		}
		var req SetUpRequest
		if !s.body(w, r, &req, true) {
			return
		}
		if err := checkCause(req.Cause); err != nil {
			s.fail(w, r, http.StatusBadRequest, err)
			return
		}
		cause := cmp.Or(strings.TrimSpace(req.Cause), DefaultCause)
		ctx, cancel := s.opContext(r)
		defer cancel()
		if err := s.d.SetBackendUp(ctx, addr, up, cause); err != nil {
			s.failOp(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, s.backendStatus(addr))
	}
}

func (s *Server) moveUser(w http.ResponseWriter, r *http.Request) {
	user, ok := s.userParam(w, r)
	if !ok {
		return
	}
	var req MoveRequest
	if !s.body(w, r, &req, false) {
		return
	}
	to, err := config.ParseBackendAddress(req.Backend)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	if err := s.d.MoveUser(ctx, user, to); err != nil {
		s.failOp(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.d.UserStatus(user))
}

func (s *Server) kickUser(w http.ResponseWriter, r *http.Request) {
	user, ok := s.userParam(w, r)
	if !ok || !s.body(w, r, &struct{}{}, true) {
		return
	}
	writeJSON(w, http.StatusOK, KickAnswer{Kicked: s.d.KickUser(user)})
}

func (s *Server) flush(w http.ResponseWriter, r *http.Request) {
	var req FlushRequest
	if !s.body(w, r, &req, false) {
		return
	}
	var backend netip.Addr // invalid: all backends
	if req.Backend != "all" {
		var err error
		if backend, err = config.ParseBackendAddress(req.Backend); err != nil {
			s.fail(w, r, http.StatusBadRequest, fmt.Errorf("%w (or \"all\")", err))
			return
		}
	}
	parallel := 0 // the director's default
	if req.MaxParallel != nil {
		parallel = *req.MaxParallel
		switch {
		case req.Forget:
			s.fail(w, r, http.StatusBadRequest, errors.New("max_parallel has no meaning with forget"))
			return
		case parallel < 1 || parallel > MaxFlushParallel:
			s.fail(w, r, http.StatusBadRequest, fmt.Errorf("max_parallel %d out of range 1..%d", parallel, MaxFlushParallel))
			return
		}
	}
	if req.Forget {
		n, err := s.d.Forget(backend)
		if err != nil {
			s.failOp(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, ForgetAnswer{Forgotten: n})
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	res, err := s.d.Flush(ctx, backend, parallel)
	if err != nil {
		s.failOp(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) dump(w http.ResponseWriter, r *http.Request) {
	cmds := s.d.Dump()
	if cmds == nil {
		cmds = []state.Command{}
	}
	writeJSON(w, http.StatusOK, DumpAnswer{Commands: cmds})
}

func (s *Server) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if s.metrics == nil {
		s.fail(w, r, http.StatusNotFound, errors.New("metrics are not served"))
		return
	}
	s.metrics.ServeHTTP(w, r)
}
