package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/signal"
	"syscall"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/imap"
	"github.com/usher-mail/usher/internal/pop3"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/state"
)

func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("%s: invalid configuration:\n%w", path, err)
	}
	return cfg, nil
}

func serve(args []string, stderr io.Writer) error {
	fs := newFlagSet("serve")
	cfgPath := fs.String("config", "/etc/usher/usher.toml", "config file")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "text or json")
	if _, err := parseInterspersed(fs, args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("%w: --log-level: %v", errUsage, err)
	}
	hopts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch *logFormat {
	case "text":
		h = slog.NewTextHandler(stderr, hopts)
	case "json":
		h = slog.NewJSONHandler(stderr, hopts)
	default:
		return fmt.Errorf("%w: --log-format must be text or json", errUsage)
	}
	log := slog.New(h)

	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return run(ctx, cfg, log)
}

// run serves cfg until ctx ends.
func run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	var backends []state.Backend
	for _, b := range cfg.Backends {
		addr, err := netip.ParseAddr(b.Address)
		if err != nil {
			return fmt.Errorf("backend %q: %w", b.Address, err)
		}
		backends = append(backends, state.Backend{Addr: addr.Unmap(), Weight: *b.Weight, Tag: b.Tag, Up: true})
	}
	d, err := director.New(director.Options{
		Algorithm: route.Algorithm(cfg.Routing), HashTemplate: cfg.HashTemplate,
		UserExpire: cfg.UserExpire.Duration, Backends: backends, Logger: log,
	})
	if err != nil {
		return err
	}

	type service struct {
		name    string
		svc     config.Service
		port    int
		refusal string
		handler func(proxy.BackendOptions) proxy.Handler
	}
	services := []service{
		{"imap", cfg.IMAP, 143, "* BYE [UNAVAILABLE] Too many connections\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return imap.New(imap.Options{Director: d, Backend: b, IdleTimeout: cfg.Timeouts.PreLoginIdle.Duration, MaxLiteral: cfg.MaxLiteral})
		}},
		{"pop3", cfg.POP3, 110, "-ERR [SYS/TEMP] Too many connections\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return pop3.New(pop3.Options{Director: d, Backend: b, IdleTimeout: cfg.Timeouts.PreLoginIdle.Duration})
		}},
	}
	var servers []*proxy.Server
	closeAll := func() {
		for _, s := range servers {
			s.Close()
		}
	}
	for _, sv := range services {
		if !sv.svc.Enabled() {
			continue
		}
		btls, err := sv.svc.BackendTLSConfig()
		if err != nil {
			closeAll()
			return fmt.Errorf("%s backend tls: %w", sv.name, err)
		}
		bo := proxy.BackendOptions{
			Port: sv.svc.BackendPort, TLS: sv.svc.BackendTLS, TLSConfig: btls,
			ConnectTimeout: cfg.Timeouts.BackendConnect.Duration, LoginTimeout: cfg.Timeouts.BackendLogin.Duration,
		}
		var lns []proxy.ListenerSpec
		for _, l := range sv.svc.Listeners {
			tc, err := l.ServerTLS()
			if err != nil {
				closeAll()
				return fmt.Errorf("%s listener %s: %w", sv.name, l.Address, err)
			}
			lns = append(lns, proxy.ListenerSpec{Address: l.Address, TLS: l.TLS, TLSConfig: tc})
		}
		srv := proxy.NewServer(proxy.ServerOptions{
			Proto: sv.name, Handler: sv.handler(bo), Listeners: lns,
			MaxSessions: sv.svc.MaxSessions, MaxSessionsPerIP: sv.svc.MaxSessionsPerIP,
			Trusted: cfg.TrustedPrefixes(), Refusal: sv.refusal, Logger: log,
		})
		if err := srv.Listen(); err != nil {
			closeAll()
			return err
		}
		servers = append(servers, srv)
	}

	adm, err := admin.Listen(cfg.Admin.Socket, d, log)
	if err != nil {
		closeAll()
		return err
	}
	go func() {
		if err := adm.Serve(); err != nil {
			log.Error("admin api stopped", "err", err)
		}
	}()
	log.Info("usher started", "config", cfg.Path, "admin_socket", cfg.Admin.Socket, "backends", len(backends), "routing", cfg.Routing)

	expiryCtx, stopExpiry := context.WithCancel(ctx)
	defer stopExpiry()
	go d.RunExpiry(expiryCtx, min(cfg.UserExpire.Duration/4+time.Second, 30*time.Second))

	done := make(chan struct{})
	for _, s := range servers {
		go func() {
			s.Serve(ctx)
			done <- struct{}{}
		}()
	}
	<-ctx.Done()
	log.Info("usher stopping")
	for range servers {
		<-done
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := adm.Shutdown(sctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Warn("admin shutdown", "err", err)
	}
	log.Info("usher stopped")
	return nil
}
