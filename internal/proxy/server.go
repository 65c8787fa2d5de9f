package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"time"

	"github.com/usher-mail/usher/internal/config"
)

// ListenerSpec is one address a Server accepts on.
type ListenerSpec struct {
	Address   string
	TLS       config.TLSMode
	TLSConfig *tls.Config // required for starttls and implicit
}

// ServerOptions configures a Server for one protocol.
type ServerOptions struct {
	Proto            string // "imap", "pop3"
	Handler          Handler
	Listeners        []ListenerSpec
	MaxSessions      int            // 0 = unlimited
	MaxSessionsPerIP int            // 0 = unlimited
	Trusted          []netip.Prefix // clients allowed plaintext logins without TLS
	// Refusal is written to a client refused by a limit, e.g.
	// "* BYE [UNAVAILABLE] Too many connections\r\n".
	Refusal          string
	HandshakeTimeout time.Duration // implicit TLS handshake; default 10s
	Logger           *slog.Logger
}

// Server runs the listeners of one protocol.
type Server struct {
	o   ServerOptions
	log *slog.Logger

	mu    sync.Mutex
	total int
	perIP map[netip.Addr]int
	lns   []net.Listener
	wg    sync.WaitGroup
}

// NewServer returns a Server; call Listen, then Serve.
func NewServer(o ServerOptions) *Server {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	return &Server{o: o, log: o.Logger.With("proto", o.Proto), perIP: map[netip.Addr]int{}}
}

// Listen opens every listener, so that configuration errors (address in use)
// surface before serving starts.
func (s *Server) Listen() error {
	for i := range s.o.Listeners {
		l := &s.o.Listeners[i]
		if l.TLS == "" {
			l.TLS = config.TLSNone
		}
		if l.TLS != config.TLSNone && l.TLSConfig == nil {
			s.Close()
			return fmt.Errorf("listen %s %s: tls %s needs a certificate", s.o.Proto, l.Address, l.TLS)
		}
		ln, err := net.Listen("tcp", l.Address)
		if err != nil {
			s.Close()
			return fmt.Errorf("listen %s: %w", s.o.Proto, err)
		}
		s.lns = append(s.lns, ln)
		s.log.Info("listening", "address", ln.Addr().String(), "tls", string(l.TLS))
	}
	return nil
}

// Close closes the listeners; open sessions continue until ctx of Serve ends.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ln := range s.lns {
		ln.Close()
	}
}

// Serve accepts on every listener until ctx ends, then closes the listeners,
// cancels the sessions and waits for them.
func (s *Server) Serve(ctx context.Context) {
	var accepters sync.WaitGroup
	for i, ln := range s.lns {
		accepters.Add(1)
		go func() {
			defer accepters.Done()
			s.accept(ctx, ln, s.o.Listeners[i])
		}()
	}
	<-ctx.Done()
	s.Close()
	accepters.Wait()
	s.wg.Wait()
}

func (s *Server) accept(ctx context.Context, ln net.Listener, spec ListenerSpec) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary failure (EMFILE...): back off like net/http.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(ctx, c, spec)
		}()
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// admit counts a new session against the limits; it reports false when a
// limit is reached.
func (s *Server) admit(ip netip.Addr) (ok bool, why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.o.MaxSessions > 0 && s.total >= s.o.MaxSessions {
		return false, "max_sessions reached"
	}
	if s.o.MaxSessionsPerIP > 0 && s.perIP[ip] >= s.o.MaxSessionsPerIP {
		return false, "max_sessions_per_ip reached"
	}
	s.total++
	s.perIP[ip]++
	return true, ""
}

func (s *Server) leave(ip netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.total--
	if s.perIP[ip]--; s.perIP[ip] <= 0 {
		delete(s.perIP, ip)
	}
}

// Addrs returns the addresses of the open listeners (useful with port 0).
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.lns))
	for i, ln := range s.lns {
		out[i] = ln.Addr()
	}
	return out
}

// Sessions returns the number of open sessions.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

func newSessionID() string {
	var b [9]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (s *Server) trusted(ip netip.Addr) bool {
	for _, p := range s.o.Trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func (s *Server) handle(ctx context.Context, c net.Conn, spec ListenerSpec) {
	remote, local := addrPort(c.RemoteAddr()), addrPort(c.LocalAddr())
	id := newSessionID()
	log := s.log.With("session", id, "remote", remote.String())
	if ok, why := s.admit(remote.Addr()); !ok {
		log.Warn("connection refused", "reason", why)
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Write([]byte(s.o.Refusal))
		c.Close()
		return
	}
	defer s.leave(remote.Addr())

	sess := &Session{
		ID: id, Proto: s.o.Proto, Conn: c, Remote: remote, Local: local, Start: time.Now(), Log: log,
		TLSMode: spec.TLS, TLSConfig: spec.TLSConfig, Trusted: s.trusted(remote.Addr()),
	}
	// Closing the raw connection also ends any TLS layer the handler put on it.
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer func() {
		stop()
		cancel()
		sess.Conn.Close()
		c.Close()
	}()
	log.Info("session start", "local", local.String(), "tls", string(sess.TLSMode))

	reason := ""
	defer func() {
		// A bug in one session must not take the director down.
		if r := recover(); r != nil {
			log.Error("session panic", "panic", r, "stack", string(debug.Stack()))
			reason = "internal error"
		}
		log.Info("session end", "user", sess.User, "backend", sess.Backend,
			"bytes_in", sess.BytesIn.Load(), "bytes_out", sess.BytesOut.Load(),
			"duration", time.Since(sess.Start).Round(time.Millisecond).String(), "reason", reason)
	}()
	if spec.TLS == config.TLSImplicit {
		tc := tls.Server(c, spec.TLSConfig)
		hctx, hcancel := context.WithTimeout(ctx, s.o.HandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		hcancel()
		if err != nil {
			reason = "tls handshake failed"
			log.Info("tls handshake failed", "err", err)
		} else {
			sess.Conn, sess.Secure = tc, true
		}
	}
	if reason == "" {
		reason = s.o.Handler.Serve(ctx, sess)
	}
}
