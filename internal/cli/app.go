package cli

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/health"
	"github.com/usher-mail/usher/internal/imap"
	"github.com/usher-mail/usher/internal/lmtp"
	"github.com/usher-mail/usher/internal/metrics"
	"github.com/usher-mail/usher/internal/pop3"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/route"
	"github.com/usher-mail/usher/internal/sieve"
	"github.com/usher-mail/usher/internal/state"
)

// app is one running director: the pieces `usher serve` wires together and
// their life cycle (start, reload, drain, stop).
type app struct {
	log *slog.Logger
	m   *metrics.Metrics
	d   *director.Director
	adm *admin.Server
	// relay carries logged-in sessions of every server (Linux; nil elsewhere).
	relay *proxy.Relay

	// bg runs the director's expiry/save loop and the health checker.
	bg     context.Context
	stopBg context.CancelFunc
	bgWG   sync.WaitGroup

	// sessions is the context of every client session; cancelled only by
	// the end of the shutdown drain.
	sessions    context.Context
	endSessions context.CancelFunc

	mu       sync.Mutex
	cfg      *config.Config
	servers  []*proxy.Server           // the current servers
	retired  []*proxy.Server           // replaced by reloads, draining
	limiters map[string]*proxy.Limiter // per protocol, shared across reloads
	stopHC   context.CancelFunc
	hcDone   chan struct{}

	// checker is read by `usher status` under the director's lock, so it is
	// not guarded by mu (lock order: mu may be held while taking the
	// director's lock, never the reverse).
	checker atomic.Pointer[health.Checker]

	knownMu sync.Mutex
	// knownBackends are the backends metrics have series for.
	knownBackends []string
}

func newApp(cfg *config.Config, log *slog.Logger) (*app, error) {
	a := &app{log: log, m: metrics.New(), cfg: cfg, limiters: map[string]*proxy.Limiter{}}
	var backends []state.Backend
	for _, b := range cfg.Backends {
		addr, err := netip.ParseAddr(b.Address)
		if err != nil {
			return nil, fmt.Errorf("backend %q: %w", b.Address, err)
		}
		backends = append(backends, state.Backend{Addr: addr, Weight: *b.Weight, Tag: b.Tag, Up: true})
	}
	d, err := director.New(director.Options{
		Algorithm: route.Algorithm(cfg.Routing), BalanceFactor: cfg.BalanceFactor, HashTemplate: cfg.HashTemplate,
		UserExpire: cfg.UserExpire.Duration, Backends: backends,
		TagFor: cfg.TagFor, MoveWait: cfg.Timeouts.MoveWait.Duration,
		StateFile: cfg.StateFile, Observer: a.m, Logger: log,
		BackendsChanged: a.backendsChanged, Health: a.health,
	})
	if err != nil {
		return nil, err
	}
	a.d = d
	a.m.SetUserRecordsFunc(func() float64 { return float64(d.UserRecords()) })
	for _, w := range cfg.Warnings() {
		log.Warn("configuration warning", "warning", w)
	}
	return a, nil
}

// start opens every listener and starts the background work. On error the
// caller calls abort.
func (a *app) start() error {
	a.bg, a.stopBg = context.WithCancel(context.Background())
	a.sessions, a.endSessions = context.WithCancel(context.Background())
	relay, err := proxy.NewRelay(proxy.RelayOptions{Logger: a.log.With("component", "relay")})
	if err != nil {
		return err
	}
	a.relay = relay
	servers, err := a.buildServers(a.cfg)
	if err != nil {
		return err
	}
	tok, err := adminToken(a.cfg)
	if err != nil {
		stopAll(servers)
		return err
	}
	a.adm, err = admin.New(admin.Options{
		Director: a.d, Metrics: a.m.Handler(), Logger: a.log, Token: tok, Allow: a.cfg.AdminAllow(),
		OnRequest: a.m.AdminRequest, Profiling: a.cfg.Admin.Profiling,
	})
	if err == nil {
		err = a.adm.ListenUnix(a.cfg.Admin.Socket)
	}
	if err == nil && a.cfg.Admin.Listen != "" {
		err = a.adm.ListenTCP(a.cfg.Admin.Listen)
	}
	if err != nil {
		stopAll(servers)
		return err
	}
	a.adm.Serve()
	for _, s := range servers {
		s.Start(a.sessions)
	}
	a.servers = servers
	a.startHealth(a.cfg)
	// The interval is read here, not in the goroutine: a reload replaces a.cfg.
	expireEvery := min(a.cfg.UserExpire.Duration/4+time.Second, 30*time.Second)
	a.bgWG.Add(1)
	go func() {
		defer a.bgWG.Done()
		a.d.Run(a.bg, expireEvery)
	}()
	for _, b := range a.d.Backends() {
		a.m.BackendUp(b.Addr.String(), b.Up)
	}
	return nil
}

// adminToken is the TCP admin API's token; without a TCP listener there is none.
func adminToken(cfg *config.Config) (string, error) {
	if cfg.Admin.Listen == "" {
		return "", nil
	}
	return cfg.AdminToken()
}

func stopAll(servers []*proxy.Server) {
	for _, s := range servers {
		s.StopAccepting()
	}
}

// abort undoes a failed start.
func (a *app) abort() {
	if a.adm != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = a.adm.Shutdown(ctx)
		cancel()
	}
	a.stopBg()
	a.bgWG.Wait()
	a.endSessions()
	if a.relay != nil {
		a.relay.Close()
	}
}

// buildServers makes and opens (Listen) one server per enabled service.
func (a *app) buildServers(cfg *config.Config) ([]*proxy.Server, error) {
	type service struct {
		name    string
		svc     config.Service
		refusal string
		handler func(proxy.BackendOptions) proxy.Handler
	}
	services := []service{
		{"imap", cfg.IMAP, "* BYE [UNAVAILABLE] Too many connections\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return imap.New(imap.Options{Director: a.d, Backend: b, IdleTimeout: cfg.Timeouts.PreLoginIdle.Duration, MaxLiteral: cfg.MaxLiteral})
		}},
		{"pop3", cfg.POP3, "-ERR [SYS/TEMP] Too many connections\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return pop3.New(pop3.Options{Director: a.d, Backend: b, IdleTimeout: cfg.Timeouts.PreLoginIdle.Duration})
		}},
		{"lmtp", cfg.LMTP, "421 4.3.2 Too many connections\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return lmtp.New(lmtp.Options{Director: a.d, Backend: b, MaxMessageSize: cfg.LMTP.MaxMessageSize,
				RecipientDelimiter: cfg.LMTP.RecipientDelimiter})
		}},
		{"managesieve", cfg.ManageSieve, "BYE \"Too many connections\"\r\n", func(b proxy.BackendOptions) proxy.Handler {
			return sieve.New(sieve.Options{Director: a.d, Backend: b, IdleTimeout: cfg.Timeouts.PreLoginIdle.Duration, MaxLiteral: cfg.MaxLiteral})
		}},
	}
	// UNIX listeners the running servers hold are taken over on a reload.
	held := map[string]bool{}
	if a.cfg != nil && a.cfg != cfg {
		for _, svc := range []config.Service{a.cfg.IMAP, a.cfg.POP3, a.cfg.LMTP, a.cfg.ManageSieve} {
			for _, l := range svc.Listeners {
				held[l.Address] = true
			}
		}
	}
	var servers []*proxy.Server
	for _, sv := range services {
		if !sv.svc.Enabled() {
			continue
		}
		bo, err := backendOptions(cfg, sv.svc)
		if err != nil {
			stopAll(servers)
			return nil, fmt.Errorf("%s: %w", sv.name, err)
		}
		var lns []proxy.ListenerSpec
		for _, l := range sv.svc.Listeners {
			tc, err := l.ServerTLS()
			if err != nil {
				stopAll(servers)
				return nil, fmt.Errorf("%s listener %s: %w", sv.name, l.Address, err)
			}
			spec := proxy.ListenerSpec{Address: l.Address, TLS: l.TLS, TLSConfig: tc, ProxyProtocol: l.ProxyProtocol}
			if l.IsUnix() {
				uid, gid, err := l.UnixOwner()
				if err != nil {
					stopAll(servers)
					return nil, err
				}
				spec.Mode, spec.Chown, spec.UID, spec.GID = l.UnixMode(), uid >= 0 || gid >= 0, uid, gid
				spec.Takeover = held[l.Address]
			}
			lns = append(lns, spec)
		}
		loginTimeout := cfg.Timeouts.Login.Duration
		if sv.name == "lmtp" {
			loginTimeout = 0 // no login: an MTA session lasts as long as it delivers
		}
		lim := a.limiters[sv.name]
		if lim == nil {
			lim = proxy.NewLimiter(sv.svc.MaxSessions, sv.svc.MaxSessionsPerIP)
			a.limiters[sv.name] = lim
		}
		srv := proxy.NewServer(proxy.ServerOptions{
			Proto: sv.name, Handler: sv.handler(bo), Listeners: lns, Limiter: lim,
			Trusted: cfg.TrustedPrefixes(), Allow: sv.svc.AllowPrefixes(), ProxyTrusted: sv.svc.ProxyTrustedPrefixes(),
			Refusal: sv.refusal, Observer: a.m, Logger: a.log, Relay: a.relay,
			LoginTimeout: loginTimeout,
		})
		if err := srv.Listen(); err != nil {
			stopAll(servers)
			return nil, err
		}
		servers = append(servers, srv)
	}
	// Limits change only once the new servers are sure to run.
	for _, sv := range services {
		if lim := a.limiters[sv.name]; lim != nil && sv.svc.Enabled() {
			defer lim.SetLimits(sv.svc.MaxSessions, sv.svc.MaxSessionsPerIP)
		}
	}
	return servers, nil
}

func backendOptions(cfg *config.Config, svc config.Service) (proxy.BackendOptions, error) {
	btls, err := svc.BackendTLSConfig()
	if err != nil {
		return proxy.BackendOptions{}, fmt.Errorf("backend tls: %w", err)
	}
	return proxy.BackendOptions{
		Port: svc.BackendPort, TLS: svc.BackendTLS, TLSConfig: btls, SendProxy: svc.BackendProxy,
		ConnectTimeout: cfg.Timeouts.BackendConnect.Duration, LoginTimeout: cfg.Timeouts.BackendLogin.Duration,
	}, nil
}

// startHealth starts a health checker for cfg (if enabled). Caller holds
// a.mu or owns a.
func (a *app) startHealth(cfg *config.Config) {
	h := cfg.Health
	if !h.IsEnabled() {
		return
	}
	var svcs []health.Service
	for _, s := range []struct {
		proto string
		svc   config.Service
	}{{health.ProtoIMAP, cfg.IMAP}, {health.ProtoPOP3, cfg.POP3}} {
		if !s.svc.Enabled() {
			continue
		}
		bo, err := backendOptions(cfg, s.svc)
		if err != nil {
			a.log.Error("health checks", "proto", s.proto, "err", err)
			continue
		}
		bo.ConnectTimeout = h.Timeout.Duration
		svcs = append(svcs, health.Service{Proto: s.proto, Backend: bo})
	}
	c := health.New(health.Options{
		Services: svcs, Interval: h.Interval.Duration, Timeout: h.Timeout.Duration,
		Fall: h.Fall, Rise: h.Rise, FlapWindow: h.FlapWindow.Duration, FlapMax: h.FlapMax, HoldDown: h.HoldDown.Duration,
		LoginUser: h.LoginUser, LoginPassword: h.LoginPassword,
		Report: a.healthReport,
		Initial: func(addr netip.Addr) bool {
			b, ok := a.d.Backend(addr)
			return !ok || b.Up
		},
		Observe: func(addr netip.Addr, proto string, ok bool, d time.Duration) {
			a.m.Probe(addr.String(), proto, ok, d)
		},
		Logger: a.log.With("component", "health"),
	})
	var addrs []netip.Addr
	for _, b := range a.d.Backends() {
		addrs = append(addrs, b.Addr)
	}
	c.SetBackends(addrs)
	ctx, cancel := context.WithCancel(a.bg)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.Run(ctx)
	}()
	a.checker.Store(c)
	a.stopHC, a.hcDone = cancel, done
}

// stopHealth stops the running checker and waits for it. Caller holds a.mu.
func (a *app) stopHealth() {
	if a.checker.Swap(nil) == nil {
		return
	}
	a.stopHC()
	<-a.hcDone
}

// healthReport is the checker's verdict: mark the backend up or down.
func (a *app) healthReport(addr netip.Addr, up bool, cause string) {
	if err := a.d.HealthVerdict(a.bg, addr, up, cause); err != nil {
		a.log.Warn("health verdict not applied", "backend", addr.String(), "err", err)
	}
}

// health gives `usher status` the checker's view of a backend.
func (a *app) health(addr netip.Addr) (director.HealthInfo, bool) {
	c := a.checker.Load()
	if c == nil {
		return director.HealthInfo{}, false
	}
	r, ok := c.Status(addr)
	if !ok {
		return director.HealthInfo{}, false
	}
	hi := director.HealthInfo{Healthy: r.Healthy, LastError: r.LastError, Latency: r.Latency, HeldDown: r.HeldDown}
	if !r.Checked.IsZero() {
		t := r.Checked
		hi.Checked = &t
	}
	if r.HeldDown {
		t := r.HeldUntil
		hi.HeldUntil = &t
	}
	return hi, true
}

// backendsChanged keeps the checker and the metrics in step with the
// director's backend set.
func (a *app) backendsChanged(bs []state.Backend) {
	addrs := make([]netip.Addr, len(bs))
	seen := map[string]bool{}
	for i, b := range bs {
		addrs[i] = b.Addr
		seen[b.Addr.String()] = true
		a.m.BackendUp(b.Addr.String(), b.Up)
	}
	a.knownMu.Lock()
	for _, old := range a.knownBackends {
		if !seen[old] {
			a.m.ForgetBackend(old)
		}
	}
	a.knownBackends = a.knownBackends[:0]
	for k := range seen {
		a.knownBackends = append(a.knownBackends, k)
	}
	a.knownMu.Unlock()
	if c := a.checker.Load(); c != nil {
		c.SetBackends(addrs)
	}
}

// reload re-reads the config file. A bad file is refused with a log line and
// the running configuration stays; open sessions survive either way.
func (a *app) reload() {
	a.mu.Lock()
	path := a.cfg.Path
	a.mu.Unlock()
	a.log.Info("reloading configuration", "config", path)
	cfg, err := loadConfig(path)
	if err != nil {
		a.log.Error("configuration reload failed; keeping the running configuration", "config", path, "err", err)
		return
	}
	if err := a.apply(cfg); err != nil {
		a.log.Error("configuration reload failed; keeping the running configuration", "config", path, "err", err)
		return
	}
	for _, w := range cfg.Warnings() {
		a.log.Warn("configuration warning", "warning", w)
	}
	a.log.Info("configuration reloaded", "config", path)
}

// apply switches the running app to cfg: new servers take over the
// listeners (SO_REUSEPORT lets both bind at once), the old ones stop
// accepting and keep their sessions until those end.
func (a *app) apply(cfg *config.Config) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.cfg
	for _, ch := range []struct{ what, from, to string }{
		{"routing", old.Routing, cfg.Routing}, {"hash_template", old.HashTemplate, cfg.HashTemplate},
		{"state_file", old.StateFile, cfg.StateFile}, {"admin.socket", old.Admin.Socket, cfg.Admin.Socket},
		{"admin.listen", old.Admin.Listen, cfg.Admin.Listen},
		{"admin.profiling", fmt.Sprint(old.Admin.Profiling), fmt.Sprint(cfg.Admin.Profiling)},
	} {
		if ch.from != ch.to {
			return fmt.Errorf("%s changed from %q to %q: that needs a restart", ch.what, ch.from, ch.to)
		}
	}
	tok, err := adminToken(cfg)
	if err != nil {
		return err
	}
	servers, err := a.buildServers(cfg)
	if err != nil {
		return err
	}
	if err := a.d.SetBalanceFactor(cfg.BalanceFactor); err != nil {
		stopAll(servers)
		return err
	}
	if err := a.d.Reconfigure(cfg.UserExpire.Duration, cfg.TagFor, cfg.Timeouts.MoveWait.Duration); err != nil {
		stopAll(servers)
		return err
	}
	for _, s := range servers {
		s.Start(a.sessions)
	}
	for _, s := range a.servers {
		s.StopAccepting()
	}
	a.retired = append(a.retired, a.servers...)
	a.servers = servers
	a.adm.SetAuth(tok, cfg.AdminAllow())
	a.stopHealth()
	a.cfg = cfg
	a.startHealth(cfg)
	return nil
}

// shutdown stops accepting, lets sessions drain for shutdown_grace, closes
// what is left, and saves the state.
func (a *app) shutdown() {
	a.mu.Lock()
	grace := a.cfg.Timeouts.ShutdownGrace.Duration
	servers := append(append([]*proxy.Server(nil), a.servers...), a.retired...)
	a.stopHealth()
	a.mu.Unlock()
	a.log.Info("usher stopping", "open_sessions", a.openSessions(), "grace", grace.String())
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	var wg sync.WaitGroup
	closed := make([]int, len(servers))
	for i, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			closed[i] = s.Drain(ctx)
		}()
	}
	wg.Wait()
	n := 0
	for _, c := range closed {
		n += c
	}
	if n > 0 {
		a.log.Warn("sessions closed at the end of the shutdown grace", "sessions", n)
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	if err := a.adm.Shutdown(sctx); err != nil {
		a.log.Warn("admin shutdown", "err", err)
	}
	a.stopBg() // the director's Run saves the state once more
	a.bgWG.Wait()
	a.endSessions()
	a.relay.Close() // every session has ended: the servers drained
	a.log.Info("usher stopped")
}

func (a *app) openSessions() int {
	n := 0
	for _, l := range a.limiters {
		n += l.Open()
	}
	return n
}
