package proxytest

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
)

// SessionOptions describe the session a Handler serves, as the listener
// would have set it up.
type SessionOptions struct {
	Proto   string
	ID      string
	Trusted bool
	// TLSMode is the listener's TLS mode (default config.TLSNone) and
	// TLSConfig its server config. With config.TLSImplicit the handshake is
	// done before Serve, as the listener does, the client trusting ClientTLS.
	TLSMode   config.TLSMode
	TLSConfig *tls.Config
	ClientTLS *tls.Config
	// Timeout bounds the harness's waits and the client's reads and writes
	// (default testutil.DefaultTimeout).
	Timeout time.Duration
	// Setup, when set, may change the session before Serve starts.
	Setup func(*proxy.Session)
}

// Session is one Serve run on a loopback TCP connection.
type Session struct {
	Sess   *proxy.Session
	Client *testutil.Client
	Logs   *testutil.LogBuffer // the session's log, at debug level
	Cancel context.CancelFunc  // ends Serve's context (a shutdown)
	// CancelCause ends Serve's context with a cause, as the Server does
	// (proxy.ErrLoginTimeout).
	CancelCause context.CancelCauseFunc

	t       testing.TB
	timeout time.Duration
	reason  chan string
}

// StartSession runs h.Serve on a fresh connection on 127.0.0.1. When the
// test ends Serve's context is cancelled, the client closed, and Serve must
// return within the timeout.
func StartSession(t testing.TB, h proxy.Handler, o SessionOptions) *Session {
	t.Helper()
	if o.TLSMode == "" {
		o.TLSMode = config.TLSNone
	}
	if o.Timeout <= 0 {
		o.Timeout = testutil.DefaultTimeout
	}
	cc, sc := testutil.TCPPair(t)
	log, logs := testutil.CaptureLog()
	sess := &proxy.Session{
		ID:        o.ID,
		Proto:     o.Proto,
		Conn:      sc,
		Remote:    sc.RemoteAddr().(*net.TCPAddr).AddrPort(),
		Local:     sc.LocalAddr().(*net.TCPAddr).AddrPort(),
		Start:     time.Now(),
		Log:       log,
		TLSMode:   o.TLSMode,
		TLSConfig: o.TLSConfig,
		Trusted:   o.Trusted,
	}
	var client net.Conn = cc
	if o.TLSMode == config.TLSImplicit {
		tc := tls.Server(sc, o.TLSConfig)
		clientTLS := tls.Client(cc, o.ClientTLS)
		_ = cc.SetDeadline(time.Now().Add(o.Timeout))
		_ = sc.SetDeadline(time.Now().Add(o.Timeout))
		errc := make(chan error, 1)
		go func() { errc <- clientTLS.Handshake() }()
		if err := tc.Handshake(); err != nil {
			t.Fatalf("implicit TLS handshake (server): %v", err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("implicit TLS handshake (client): %v", err)
		}
		_ = cc.SetDeadline(time.Time{})
		_ = sc.SetDeadline(time.Time{})
		sess.Conn, sess.Secure, client = tc, true, clientTLS
	}
	if o.Setup != nil {
		o.Setup(sess)
	}
	ctx, cancelCause := context.WithCancelCause(context.Background())
	cancel := func() { cancelCause(nil) }
	c := testutil.NewClient(t, client)
	c.Timeout = o.Timeout
	s := &Session{Sess: sess, Client: c, Logs: logs, Cancel: cancel, CancelCause: cancelCause, t: t, timeout: o.Timeout,
		reason: make(chan string, 1)}
	go func() {
		r := h.Serve(ctx, sess)
		sess.Conn.Close()
		sc.Close()
		s.reason <- r
	}()
	t.Cleanup(func() {
		cancel()
		cc.Close()
		select {
		case <-s.reason:
		case <-time.After(o.Timeout):
			t.Error("Serve did not return after cancel")
		}
	})
	return s
}

// Wait returns Serve's end reason, failing the test if Serve does not
// return within the timeout.
func (s *Session) Wait() string {
	s.t.Helper()
	select {
	case r := <-s.reason:
		s.reason <- r // for the next Wait and the cleanup
		return r
	case <-time.After(s.timeout):
		s.t.Fatal("Serve did not return")
		return ""
	}
}
