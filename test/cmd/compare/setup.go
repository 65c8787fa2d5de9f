package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/template"
	"time"

	"github.com/usher-mail/usher/test"
)

// backendTuning is appended to every backend's dovecot.conf (Dovecot merges
// a repeated service section into the first and lets a later setting win),
// so that neither Dovecot's default limits nor its login mode caps any of
// the three setups: the backends serve all three alike.
var backendTuning = template.Must(template.New("tuning").Parse(`
# --- appended by usher's test/cmd/compare: benchmark limits ---
auth_verbose = no
# The harness fsyncs every write for its tests; Dovecot's default is optimized.
mail_fsync = optimized
# Dovecot's default_process_limit (100) stays: the login services need a
# few processes in high-performance mode; the mail processes get more.
default_client_limit = 20000
default_vsz_limit = 1G
# Every session of the benchmark comes from 127.0.0.1 (or a proxy).
mail_max_userip_connections = 100000
auth_cache_size = 10M
auth_cache_ttl = 1 hour
auth_cache_negative_ttl = 1 hour
auth_failure_delay = 0
# Dovecot's high-performance login mode (doc: "Login processes").
service imap-login {
  service_count = 0
  process_min_avail = {{.Cores}}
  client_limit = 10000
}
service pop3-login {
  service_count = 0
  process_min_avail = {{.Cores}}
  client_limit = 10000
}
service imap {
  process_limit = 6000
}
service pop3 {
  process_limit = 6000
}
service lmtp {
  process_min_avail = {{.Cores}}
  process_limit = 1000
}
service auth {
  client_limit = 20000
}
service anvil {
  client_limit = 20000
}
`))

// tuneBackends appends backendTuning to every backend's configuration and
// restarts it.
func tuneBackends(b *test.Backends, cores int) error {
	var buf bytes.Buffer
	if err := backendTuning.Execute(&buf, map[string]any{"Cores": cores}); err != nil {
		return fmt.Errorf("tune backends: %w", err)
	}
	for i := range b.N() {
		f, err := os.OpenFile(b.ConfigPath(i), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("tune backend %d: %w", i, err)
		}
		_, err = f.Write(buf.Bytes())
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("tune backend %d: %w", i, err)
		}
		if err := b.Stop(i); err != nil {
			return fmt.Errorf("tune backend %d: %w", i, err)
		}
		if err := b.Start(i); err != nil {
			return fmt.Errorf("tune backend %d: %w", i, err)
		}
	}
	return nil
}

// directorConf is a Dovecot 2.3 director in proxy mode, the way its
// documentation sets one up (conf.d/10-director.conf): the login services
// ask the director (executable = imap-login director) which backend a user
// is on, the static passdb turns every login into a proxied one (the
// backend checks the password), and LMTP proxies through the director's
// userdb socket. Its login services run in Dovecot's high-performance mode
// (service_count = 0, one process per core, many clients each).
var directorConf = template.Must(template.New("director.conf").Parse(`# Written by usher's test/cmd/compare: a Dovecot director in proxy mode.
instance_name = usher-bench-director
base_dir = {{.Dir}}/run
state_dir = {{.Dir}}/state
log_path = {{.Log}}
protocols = imap pop3 lmtp
listen = {{.Addr}}
ssl = no
shutdown_clients = yes
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = no
login_trusted_networks = 127.0.0.0/8
default_client_limit = 20000
default_vsz_limit = 1G

director_servers = {{.Addr}}:{{.RingPort}}
director_mail_servers = {{.MailServers}}
director_username_hash = %Lu
director_user_expire = 15 min
lmtp_proxy = yes

passdb {
  driver = static
  args = proxy=y nopassword=y
}

service director {
  unix_listener login/director {
    mode = 0666
  }
  fifo_listener login/proxy-notify {
    mode = 0666
  }
  unix_listener director-userdb {
    mode = 0600
  }
  unix_listener director-admin {
    mode = 0600
  }
  inet_listener {
    address = {{.Addr}}
    port = {{.RingPort}}
  }
}
service imap-login {
  executable = imap-login director
  service_count = 0
  process_min_avail = {{.Cores}}
  client_limit = 10000
  inet_listener imap {
    port = {{.IMAPPort}}
  }
}
service pop3-login {
  executable = pop3-login director
  service_count = 0
  process_min_avail = {{.Cores}}
  client_limit = 10000
  inet_listener pop3 {
    port = {{.POP3Port}}
  }
}
service lmtp {
  process_min_avail = {{.Cores}}
  inet_listener lmtp {
    port = {{.LMTPPort}}
  }
}
protocol lmtp {
  auth_socket_path = director-userdb
}
service auth {
  client_limit = 20000
}
service anvil {
  client_limit = 20000
}
`))

// directorOptions configures startDirector.
type directorOptions struct {
	Addr                         string // IPv4 loopback address of every listener
	IMAPPort, POP3Port, LMTPPort int
	MailServers                  []string // backend IPs
	Cores                        int      // login processes per protocol
	// Check logs in as this user to tell that the director proxies (a
	// director answers logins only once its ring is synced).
	CheckUser, CheckPassword string
	StartTimeout             time.Duration
}

// director is a running Dovecot director instance in proxy mode.
type director struct {
	opts                        directorOptions
	dir, conf, logPath, errPath string

	mu       sync.Mutex
	cmd      *exec.Cmd
	waitDone chan struct{}
	waitErr  error
}

// startDirector writes the configuration and starts the instance. On error
// everything is stopped and removed again.
func startDirector(opts directorOptions) (_ *director, err error) {
	ip := net.ParseIP(opts.Addr).To4()
	if ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("start director: %q is not an IPv4 loopback address", opts.Addr)
	}
	for _, p := range []int{opts.IMAPPort, opts.POP3Port, opts.LMTPPort} {
		if err := portFree(opts.Addr, p); err != nil {
			return nil, fmt.Errorf("start director: %w", err)
		}
	}
	ring, err := freePort(opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	d := &director{opts: opts}
	// Short path: Dovecot's UNIX sockets live below base_dir (108-byte limit).
	if d.dir, err = os.MkdirTemp("", "usher-bench-director-"); err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	defer func() {
		if err != nil {
			_ = d.close()
		}
	}()
	// The director and login processes run as unprivileged users below it.
	if err := os.Chmod(d.dir, 0o755); err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	d.conf = filepath.Join(d.dir, "dovecot.conf")
	d.logPath = filepath.Join(d.dir, "director.log")
	d.errPath = filepath.Join(d.dir, "master.out")
	var buf bytes.Buffer
	err = directorConf.Execute(&buf, map[string]any{
		"Dir": d.dir, "Log": d.logPath, "Addr": opts.Addr, "RingPort": ring,
		"MailServers": strings.Join(opts.MailServers, " "), "Cores": opts.Cores,
		"IMAPPort": opts.IMAPPort, "POP3Port": opts.POP3Port, "LMTPPort": opts.LMTPPort,
	})
	if err != nil {
		return nil, fmt.Errorf("start director: render config: %w", err)
	}
	if err := os.WriteFile(d.conf, buf.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	if err := d.start(); err != nil {
		return nil, err
	}
	return d, nil
}

// start runs `dovecot -F -c CONF` in its own process group and waits until a
// login through it succeeds.
func (d *director) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd != nil {
		return errors.New("start director: already running")
	}
	out, err := os.OpenFile(d.errPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start director: %w", err)
	}
	defer out.Close()
	cmd := exec.Command("dovecot", "-F", "-c", d.conf)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start director: dovecot: %w", err)
	}
	d.cmd = cmd
	d.waitDone = make(chan struct{})
	done := d.waitDone
	go func() {
		d.waitErr = cmd.Wait()
		close(done)
	}()
	addr := net.JoinHostPort(d.opts.Addr, strconv.Itoa(d.opts.IMAPPort))
	deadline := time.Now().Add(d.opts.StartTimeout)
	var lastErr error
	for {
		if lastErr = imapLogin(addr, d.opts.CheckUser, d.opts.CheckPassword); lastErr == nil {
			return nil
		}
		select {
		case <-done:
			d.cmd = nil
			return fmt.Errorf("start director: dovecot exited (%v): %s", d.waitErr, d.failure())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("start director: no login through %s after %v (%v): %s",
				addr, d.opts.StartTimeout, lastErr, d.failure())
		}
	}
}

func (d *director) failure() string {
	var parts []string
	if out, err := os.ReadFile(d.errPath); err == nil && len(out) > 0 {
		parts = append(parts, strings.TrimSpace(string(out)))
	}
	if tail, err := tailFile(d.logPath, 20); err == nil && tail != "" {
		parts = append(parts, tail)
	}
	return strings.Join(parts, "\n")
}

// stop stops the instance (SIGTERM to its process group, SIGKILL after 3s)
// and waits until every process of it is gone. Stopping twice does nothing.
func (d *director) stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return nil
	}
	pgid := d.cmd.Process.Pid
	d.cmd = nil
	return killGroup(pgid, d.waitDone, 3*time.Second)
}

// restart stops and starts the instance (fresh processes, empty caches).
func (d *director) restart() error {
	if err := d.stop(); err != nil {
		return err
	}
	return d.start()
}

// close stops the instance and removes its directory.
func (d *director) close() error {
	err := d.stop()
	if d.dir != "" {
		err = errors.Join(err, os.RemoveAll(d.dir))
		d.dir = ""
	}
	return err
}

// pid is the master's pid (the root of the instance's process tree), or 0.
func (d *director) pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// killGroup sends SIGTERM to process group pgid, waits for done (the
// leader's Wait), sends SIGKILL after grace, and waits until the group is
// empty.
func killGroup(pgid int, done <-chan struct{}, grace time.Duration) error {
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(-pgid, 0) == nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("stop process group %d: survives SIGKILL", pgid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// imapLogin logs in once at addr and logs out.
func imapLogin(addr, user, pass string) error {
	c, err := test.DialIMAP(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Login(user, pass)
}

// pop3Login logs in once at addr and quits.
func pop3Login(addr, user, pass string) error {
	c, err := test.DialPOP3(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Login(user, pass)
}

func portFree(host string, port int) error {
	l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("port %s:%d is taken: %w", host, port, err)
	}
	return l.Close()
}

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// pickPort returns want when it is free on host, else a free port.
func pickPort(host string, want int) (int, error) {
	if portFree(host, want) == nil {
		return want, nil
	}
	return freePort(host)
}

func tailFile(path string, n int) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("tail %s: %w", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n"), nil
}

// usherSetup is usher's configuration for the benchmark: IMAP, POP3 and
// LMTP on host, the backends, no per-IP cap (every benchmark client comes
// from 127.0.0.1), and a short drain on restart.
func usherConfig(host string, imapPort, pop3Port, lmtpPort int, dir string, backends []string) string {
	hp := func(p int) string { return net.JoinHostPort(host, strconv.Itoa(p)) }
	cfg := test.UsherConfig{
		IMAPAddr:         hp(imapPort),
		POP3Addr:         hp(pop3Port),
		Backends:         backends,
		Socket:           filepath.Join(dir, "admin.sock"),
		StateFile:        filepath.Join(dir, "state.json"),
		MaxSessionsPerIP: 1000000,
		AdminProfiling:   true, // --profile also takes a Go CPU profile
		Services: []test.UsherService{
			{Name: "lmtp", Listeners: []test.UsherListener{{Address: hp(lmtpPort)}}},
		},
		Tables: "[timeouts]\nshutdown_grace = \"1s\"",
	}
	return cfg.TOML()
}

// warmUsers logs every user in once through addr (IMAP), workers at a time,
// so that usher pins each user and every backend has the user's Maildir.
func warmUsers(ctx context.Context, addr string, users []string, pass string, workers int) error {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	next := make(chan string)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range next {
				if err := imapLogin(addr, u, pass); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("warm-up login of %s at %s: %w", u, addr, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for _, u := range users {
		select {
		case next <- u:
		case <-ctx.Done():
		}
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// usherMap is the part of `usher map --json` the benchmark reads.
type usherMap struct {
	Users []struct {
		User    string `json:"user"`
		Backend string `json:"backend"`
	} `json:"users"`
}

// pinnedBackends asks usher (`usher map --json`) which backend each user is
// pinned to. Users without a record get the backend the hash would give
// them (`usher status --json USER`, hash_backend).
func pinnedBackends(u *test.Usher, users []string) (map[string]string, error) {
	out, err := u.CLI([]string{"map"}, "--json")
	if err != nil {
		return nil, fmt.Errorf("pinned backends: %w", err)
	}
	var m usherMap
	if err := json.Unmarshal(out, &m); err != nil {
		return nil, fmt.Errorf("pinned backends: usher map --json: %w", err)
	}
	pinned := make(map[string]string, len(users))
	for _, r := range m.Users {
		pinned[strings.ToLower(r.User)] = r.Backend
	}
	api := test.NewUsherAPI(u.Socket())
	defer api.Close()
	out2 := make(map[string]string, len(users))
	for _, user := range users {
		if be, ok := pinned[strings.ToLower(user)]; ok && be != "" {
			out2[user] = be
			continue
		}
		st, err := api.UserHash(user)
		if err != nil {
			return nil, fmt.Errorf("pinned backends: %w", err)
		}
		out2[user] = st.HashBackend
	}
	return out2, nil
}

// writeTargetMap writes the `user host:port` lines of a --target-map file.
func writeTargetMap(path string, users []string, backendOf map[string]string, port int) error {
	var buf bytes.Buffer
	for _, u := range users {
		be, ok := backendOf[u]
		if !ok || be == "" {
			return fmt.Errorf("write target map: no backend for %s", u)
		}
		fmt.Fprintf(&buf, "%s %s\n", u, net.JoinHostPort(be, strconv.Itoa(port)))
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write target map: %w", err)
	}
	return nil
}

// spread counts users per backend, for the log.
func spread(backendOf map[string]string) string {
	n := map[string]int{}
	for _, be := range backendOf {
		n[be]++
	}
	keys := make([]string, 0, len(n))
	for k := range n {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, n[k])
	}
	return strings.Join(parts, " ")
}

// logDirectorSpread logs how the director spread the users (doveadm
// director status lists users per mail server).
func logDirectorSpread(log *slog.Logger, d *director) {
	out, err := exec.Command("doveadm", "-c", d.conf, "director", "status").CombinedOutput()
	if err != nil {
		log.Warn("doveadm director status", "err", err, "out", strings.TrimSpace(string(out)))
		return
	}
	log.Info("director mail servers", "status", strings.Join(strings.Fields(string(out)), " "))
}

// warningLines returns the lines of the log at path that contain one of
// needles and none of ignore, at most limit of them, and how many there were.
func warningLines(path string, needles, ignore []string, limit int) ([]string, int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read log %s: %w", path, err)
	}
	var out []string
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		if slices.ContainsFunc(ignore, func(i string) bool { return strings.Contains(line, i) }) {
			continue
		}
		for _, needle := range needles {
			if strings.Contains(line, needle) {
				n++
				if len(out) < limit {
					out = append(out, line)
				}
				break
			}
		}
	}
	return out, n, nil
}

// saveWarnings writes the warnings and errors the backends, usher and the
// director logged into dir/warnings.log, so that a limit that was hit
// (a process_limit, a file limit) shows up next to the numbers.
// restarts lists the proxy restarts ("HH:MM:SS target"): processes log
// errors while they are stopped, which are expected at those times.
func saveWarnings(log *slog.Logger, dir string, b *test.Backends, u *test.Usher, d *director, restarts func() []string) {
	dovecotNeedles := []string{"Warning:", "Error:", "Fatal:", "Panic:"}
	type source struct {
		name, path string
		needles    []string
	}
	sources := []source{{"usher", u.LogPath(), []string{"level=WARN", "level=ERROR"}}, {"director", d.logPath, dovecotNeedles}}
	// Restarts (tuning, idle runs) make every process log its SIGTERM.
	ignore := []string{"Killed with signal 15", "Shutting down logging for"}
	for i := range b.N() {
		sources = append(sources, source{"backend " + b.Addr(i), b.LogPath(i), dovecotNeedles})
	}
	var buf bytes.Buffer
	if rs := restarts(); len(rs) > 0 {
		fmt.Fprintf(&buf, "Proxy restarts (before each idle run; errors of the restarted instance at these times are expected): %s\n",
			strings.Join(rs, ", "))
	}
	for _, s := range sources {
		lines, n, err := warningLines(s.path, s.needles, ignore, 200)
		if err != nil {
			log.Warn("collect warnings", "err", err)
			continue
		}
		fmt.Fprintf(&buf, "== %s: %d warning/error lines (%s)\n", s.name, n, s.path)
		for _, l := range lines {
			buf.WriteString(l + "\n")
		}
		if n > 0 {
			log.Warn("warnings in log", "source", s.name, "lines", n)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "warnings.log"), buf.Bytes(), 0o644); err != nil {
		log.Warn("save warnings", "err", err)
	}
}
