package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/usher-mail/usher/internal/config"
)

// Session is one accepted client connection, handed to a protocol Handler.
// The Server fills the connection fields; the Handler sets User and Backend
// as it learns them, and Splice counts bytes; the Server logs all of it when
// the session ends.
type Session struct {
	ID     string         // unique, short, printable; also sent to backends
	Proto  string         // "imap", "pop3", ...
	Conn   net.Conn       // the client connection (the Handler replaces it after STARTTLS)
	Remote netip.AddrPort // the client's address
	Local  netip.AddrPort // the address the client connected to
	Start  time.Time
	Log    *slog.Logger // carries session, proto and remote

	// TLSMode is the listener's mode; TLSConfig is its server config (nil for none).
	TLSMode   config.TLSMode
	TLSConfig *tls.Config
	// Secure is true once the client connection is TLS (implicit or after STARTTLS).
	Secure bool
	// Trusted is true when Remote is in the trusted networks: plaintext logins
	// are allowed without TLS.
	Trusted bool

	User    string // login name as the client gave it (never the password)
	Backend string // backend address once chosen

	// Obs receives session and login events for metrics (never nil).
	Obs Observer
	// loggedIn is the backend the session logged in to (for metrics).
	loggedIn netip.Addr
	// phase is phasePreLogin until a successful login or the login timeout.
	phase atomic.Int32

	BytesIn  atomic.Int64 // client -> backend, after login
	BytesOut atomic.Int64 // backend -> client, after login

	// relay, when set, takes spliced sessions off their goroutines (see
	// Splice). detached is set when it did: the session then ends later,
	// through finish, not when the Handler returns.
	relay    *Relay
	detached bool
	finish   func(reason string)
}

// Session phases (Session.phase).
const (
	phasePreLogin int32 = iota
	phaseLoggedIn
	phaseLoginTimedOut
)

// LoginTimedOut reports whether ctx, a session's context, was cancelled
// because the client did not log in in time (ServerOptions.LoginTimeout).
func LoginTimedOut(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), ErrLoginTimeout)
}

// Observer receives session and login events; metrics.Metrics implements it.
type Observer interface {
	SessionOpened(proto string)
	SessionLoggedIn(proto, backend string)
	SessionClosed(proto, backend string, bytesIn, bytesOut int64)
	Login(proto, result string, d time.Duration)
}

// NopObserver ignores every event.
type NopObserver struct{}

func (NopObserver) SessionOpened(string)                       {}
func (NopObserver) SessionLoggedIn(string, string)             {}
func (NopObserver) SessionClosed(string, string, int64, int64) {}
func (NopObserver) Login(string, string, time.Duration)        {}

// Login results passed to LoginDone.
const (
	LoginOK          = "ok"          // the backend accepted the login
	LoginFailed      = "failed"      // the backend refused it (wrong password...)
	LoginUnavailable = "unavailable" // no backend, or the backend failed
)

// LoginDone records the outcome of one login attempt for metrics: result is
// one of the Login* constants, backend the backend tried (zero if none),
// elapsed the time from the client's command to the backend's answer.
func (s *Session) LoginDone(result string, backend netip.Addr, elapsed time.Duration) {
	if s.Obs == nil {
		s.Obs = NopObserver{}
	}
	s.Obs.Login(s.Proto, result, elapsed)
	if result == LoginOK {
		s.phase.CompareAndSwap(phasePreLogin, phaseLoggedIn)
		s.loggedIn = backend
		s.Obs.SessionLoggedIn(s.Proto, backend.String())
	}
}

// PlaintextAllowed reports whether a plaintext password may be sent on this
// session (RFC 9051 section 11.1 / RFC 2595 section 3.2: not without TLS unless
// the client is trusted).
func (s *Session) PlaintextAllowed() bool { return s.Secure || s.Trusted }

// Handler serves one protocol on a session. Serve returns when the session is
// over, with a short reason for the end-of-session log line ("logout",
// "client closed", "backend closed", "idle timeout", "kicked", ...).
type Handler interface {
	Serve(ctx context.Context, s *Session) (reason string)
}

// Director picks and pins a user's backend. Protocol packages depend on this
// interface only.
type Director interface {
	// Acquire returns the backend for user (the login name; the Director
	// applies the hash template) and counts one open session of that user.
	// The caller must call Lease.Release exactly once when the session ends.
	Acquire(ctx context.Context, user string) (*Lease, error)
}

// Lease is one session's hold on a user's backend.
type Lease struct {
	User    string     // the user key (hash template expanded)
	Backend netip.Addr // the backend's IP
	// Done is closed when the user must leave the backend (kick, move); the
	// session then closes. Nil means never.
	Done    <-chan struct{}
	kicked  context.Context // when set, Done is kicked.Done()
	release func()
	done    atomic.Bool
	// detached is set when Splice handed the session to the Relay or to
	// goroutines of its own: the lease is then released when the session
	// ends, and Release is a no-op.
	detached atomic.Bool
}

// NewLease returns a lease; release is called once by Release.
func NewLease(user string, backend netip.Addr, done <-chan struct{}, release func()) *Lease {
	return &Lease{User: user, Backend: backend, Done: done, release: release}
}

// NewKickableLease returns a lease that ends when kicked is cancelled. A
// spliced session then needs no goroutine to watch for the kick
// (context.AfterFunc), which keeps idle sessions small.
func NewKickableLease(user string, backend netip.Addr, kicked context.Context, release func()) *Lease {
	return &Lease{User: user, Backend: backend, Done: kicked.Done(), kicked: kicked, release: release}
}

// afterKick arranges for f to run when the lease is kicked; stop cancels
// that. Without a kick context it falls back to a goroutine on Done.
func (l *Lease) afterKick(f func()) (stop func()) {
	switch {
	case l == nil || l.Done == nil:
		return func() {}
	case l.kicked != nil:
		s := context.AfterFunc(l.kicked, f)
		return func() { s() }
	}
	stopc := make(chan struct{})
	go func() {
		select {
		case <-l.Done:
			f()
		case <-stopc:
		}
	}()
	return func() { close(stopc) }
}

// Release ends the session's hold; it is safe to call more than once. After
// Splice handed the session over (to the Relay or to goroutines of its own),
// the lease is released when the session ends and Release does nothing.
func (l *Lease) Release() {
	if l != nil && !l.detached.Load() {
		l.releaseNow()
	}
}

func (l *Lease) releaseNow() {
	if l != nil && l.done.CompareAndSwap(false, true) && l.release != nil {
		l.release()
	}
}

// ErrUnavailable means no backend can take the user now (none up, empty pool).
// Protocols answer it with a temporary failure (IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]).
var ErrUnavailable = errors.New("no backend available")
