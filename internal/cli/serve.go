package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/usher-mail/usher/internal/config"
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
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()
	return run(ctx, cfg, log, reload)
}

// run serves cfg until ctx ends; each value on reload re-reads the config
// file. When ctx ends, listeners close and open sessions get
// timeouts.shutdown_grace to finish before they are closed.
func run(ctx context.Context, cfg *config.Config, log *slog.Logger, reload <-chan struct{}) error {
	a, err := newApp(cfg, log)
	if err != nil {
		return err
	}
	if err := a.start(); err != nil {
		a.abort()
		return err
	}
	log.Info("usher started", "config", cfg.Path, "admin_socket", cfg.Admin.Socket,
		"backends", len(a.d.Backends()), "routing", cfg.Routing, "state_file", cfg.StateFile)
	for {
		select {
		case <-reload:
			a.reload()
		case <-ctx.Done():
			a.shutdown()
			return nil
		}
	}
}
