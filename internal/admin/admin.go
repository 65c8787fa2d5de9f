// Package admin serves the director's admin API (JSON over HTTP on a local
// UNIX socket, mode 0600) and provides the client the CLI uses.
//
// Invariants: the socket is created with mode 0600 before it accepts, so only
// its owner (and root) can talk to it; every error reaches the client as a
// JSON object {"error": "..."} with a fitting HTTP status.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/state"
)

// Director is what the API needs from the director.
type Director interface {
	Status() director.Status
	UserStatus(user string) director.UserStatus
	AddBackend(b state.Backend) error
}

// Server is the admin HTTP API.
type Server struct {
	d   Director
	log *slog.Logger
	srv *http.Server
	ln  net.Listener
}

// AddBackendRequest is the body of POST /v1/backends.
type AddBackendRequest struct {
	Address string `json:"address"`
	Weight  *int   `json:"weight,omitempty"`
	Tag     string `json:"tag,omitempty"`
}

// Listen creates the UNIX socket at path (replacing a stale one) with mode 0600.
func Listen(path string, d Director, log *slog.Logger) (*Server, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		// A socket left by a previous run; refuse if someone still answers on it.
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin socket %s: another usher is listening", path)
		}
		os.Remove(path)
	}
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	s := &Server{d: d, log: log, ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", s.status)
	mux.HandleFunc("GET /v1/users/{user}", s.user)
	mux.HandleFunc("POST /v1/backends", s.addBackend)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second}
	return s, nil
}

// Serve answers requests until Shutdown.
func (s *Server) Serve() error {
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("admin serve: %w", err)
	}
	return nil
}

// Shutdown stops the API and removes the socket.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	os.Remove(s.ln.Addr().String())
	return err
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, code int, err error) {
	s.log.Warn("admin request failed", "method", r.Method, "path", r.URL.Path, "status", code, "err", err)
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.d.Status())
}

func (s *Server) user(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.d.UserStatus(r.PathValue("user")))
}

func (s *Server) addBackend(w http.ResponseWriter, r *http.Request) {
	var req AddBackendRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		s.fail(w, r, http.StatusBadRequest, fmt.Errorf("decode request: %w", err))
		return
	}
	addr, err := netip.ParseAddr(req.Address)
	if err != nil {
		s.fail(w, r, http.StatusBadRequest, fmt.Errorf("backend address must be an IP address: %w", err))
		return
	}
	weight := 100
	if req.Weight != nil {
		weight = *req.Weight
	}
	if weight < 0 || weight > 1000 {
		s.fail(w, r, http.StatusBadRequest, fmt.Errorf("weight %d out of range 0..1000", weight))
		return
	}
	err = s.d.AddBackend(state.Backend{Addr: addr.Unmap(), Weight: weight, Tag: req.Tag, Up: true})
	switch {
	case errors.Is(err, state.ErrBackendExists):
		s.fail(w, r, http.StatusConflict, err)
	case err != nil:
		s.fail(w, r, http.StatusBadRequest, err)
	default:
		s.log.Info("backend added", "backend", addr.String(), "weight", weight, "tag", req.Tag)
		writeJSON(w, http.StatusCreated, map[string]any{"address": addr.String(), "weight": weight, "tag": req.Tag})
	}
}
