package test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// BuildUsher compiles ./cmd/usher of the module that contains the current
// directory into outDir and returns the binary's path.
func BuildUsher(outDir string) (string, error) {
	goBin, err := goTool()
	if err != nil {
		return "", fmt.Errorf("build usher: %w", err)
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", fmt.Errorf("build usher: %w", err)
	}
	bin := filepath.Join(outDir, "usher")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", bin, "./cmd/usher")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build usher: go build ./cmd/usher: %w\n%s", err, out)
	}
	return bin, nil
}

func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if r := os.Getenv("GOROOT"); r != "" {
		if p := filepath.Join(r, "bin", "go"); fileExists(p) {
			return p, nil
		}
	}
	if p := "/usr/local/go/bin/go"; fileExists(p) {
		return p, nil
	}
	return "", errors.New("go tool not found in PATH, $GOROOT/bin or /usr/local/go/bin")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// ModuleRoot is the directory of the go.mod governing the current directory.
func ModuleRoot() (string, error) {
	goBin, err := goTool()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	out, err := exec.Command(goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root: go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("find module root: not inside a Go module")
	}
	return filepath.Dir(mod), nil
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that were free a
// moment ago (all are held open together, so they differ from each other).
func FreePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// UsherConfig renders a usher TOML configuration for tests. Zero fields are
// left out so that usher's own defaults apply.
type UsherConfig struct {
	IMAPAddr, POP3Addr string   // listener host:port; "" = no listener
	ListenerTLS        string   // tls of both listeners ("none", "starttls", "implicit")
	Cert, Key          string   // listener certificate and key
	BackendTLS         string   // [imap]/[pop3] backend_tls
	BackendCA          string   // [imap]/[pop3] backend_ca
	Backends           []string // [[backend]] addresses, weight 100
	Socket             string   // [admin] socket
	UserExpire         string   // user_expire, e.g. "15m"
	Routing            string   // routing
	Extra              string   // appended top-level TOML (before any table)

	// BackendSpecs are [[backend]] tables with a tag or weight, written
	// after Backends.
	BackendSpecs []UsherBackend
	// ExtraIMAPAddrs are further [[imap.listener]] addresses (same TLS as IMAPAddr).
	ExtraIMAPAddrs []string
	// MaxSessionsPerIP is [imap] and [pop3] max_sessions_per_ip (0: usher's default).
	MaxSessionsPerIP int
	// StateFile is state_file ("": usher's default, next to the config file).
	StateFile string
	// Tags is the [tags] table: domain → backend tag.
	Tags map[string]string
	// AdminListen, AdminToken and AdminAllow are [admin] listen, token and
	// allow (the TCP admin API); empty ones are left out.
	AdminListen string
	AdminToken  string
	AdminAllow  []string
	// AdminProfiling is [admin] profiling (Go's profiles on the socket).
	AdminProfiling bool
	// Tables is TOML appended at the very end, e.g. "[health]\ninterval = \"500ms\"".
	Tables string
	// Services are further service sections ([lmtp], [managesieve], or
	// [imap]/[pop3] when IMAPAddr/POP3Addr is empty: TOML allows a table
	// only once), written after [imap] and [pop3].
	Services []UsherService
}

// UsherService is one service section ([lmtp], [managesieve], [imap],
// [pop3]) with its listeners. Zero fields are left out (usher's defaults).
type UsherService struct {
	Name      string // "lmtp", "managesieve", "imap", "pop3"
	Listeners []UsherListener
	// Allow and ProxyTrusted are allow and proxy_trusted; nil is left out
	// (an empty, non-nil slice is written as []).
	Allow, ProxyTrusted []string
	BackendProxy        string // backend_proxy: "v1" or "v2"
	BackendPort         int    // backend_port
	RecipientDelimiter  string // LMTP recipient_delimiter
	MaxMessageSize      int64  // LMTP max_message_size
	// Extra is TOML appended to the section before its listeners.
	Extra string
}

// UsherListener is one [[SERVICE.listener]] table.
type UsherListener struct {
	Address            string // host:port or unix:/path
	TLS, Cert, Key     string
	Mode, Owner, Group string // UNIX socket mode ("0660"), owner and group
	ProxyProtocol      bool
}

// tomlList renders a TOML array of strings.
func tomlList(list []string) string {
	quoted := make([]string, len(list))
	for i, a := range list {
		quoted[i] = strconv.Quote(a)
	}
	return "[" + strings.Join(quoted, ", ") + "]"
}

// write renders the section into sb.
func (s UsherService) write(sb *strings.Builder) {
	q := strconv.Quote
	fmt.Fprintf(sb, "\n[%s]\n", s.Name)
	if s.Allow != nil {
		fmt.Fprintf(sb, "allow = %s\n", tomlList(s.Allow))
	}
	if s.ProxyTrusted != nil {
		fmt.Fprintf(sb, "proxy_trusted = %s\n", tomlList(s.ProxyTrusted))
	}
	if s.BackendProxy != "" {
		fmt.Fprintf(sb, "backend_proxy = %s\n", q(s.BackendProxy))
	}
	if s.BackendPort != 0 {
		fmt.Fprintf(sb, "backend_port = %d\n", s.BackendPort)
	}
	if s.RecipientDelimiter != "" {
		fmt.Fprintf(sb, "recipient_delimiter = %s\n", q(s.RecipientDelimiter))
	}
	if s.MaxMessageSize != 0 {
		fmt.Fprintf(sb, "max_message_size = %d\n", s.MaxMessageSize)
	}
	if s.Extra != "" {
		sb.WriteString(strings.TrimSpace(s.Extra) + "\n")
	}
	for _, l := range s.Listeners {
		fmt.Fprintf(sb, "\n[[%s.listener]]\naddress = %s\n", s.Name, q(l.Address))
		for _, kv := range [][2]string{{"tls", l.TLS}, {"cert", l.Cert}, {"key", l.Key}, {"mode", l.Mode}, {"owner", l.Owner}, {"group", l.Group}} {
			if kv[1] != "" {
				fmt.Fprintf(sb, "%s = %s\n", kv[0], q(kv[1]))
			}
		}
		if l.ProxyProtocol {
			sb.WriteString("proxy_protocol = true\n")
		}
	}
}

// UsherBackend is one [[backend]] table. Weight 0 is left out (usher's
// default, 100); drain with `usher backend update` instead.
type UsherBackend struct {
	Address string
	Weight  int
	Tag     string
}

// TOML returns the configuration file text.
func (c UsherConfig) TOML() string {
	var sb strings.Builder
	q := strconv.Quote
	sb.WriteString("# Written by the usher e2e harness.\n")
	if c.UserExpire != "" {
		fmt.Fprintf(&sb, "user_expire = %s\n", q(c.UserExpire))
	}
	if c.Routing != "" {
		fmt.Fprintf(&sb, "routing = %s\n", q(c.Routing))
	}
	sb.WriteString("trusted_networks = [\"127.0.0.0/8\"]\n")
	if c.StateFile != "" {
		fmt.Fprintf(&sb, "state_file = %s\n", q(c.StateFile))
	}
	if c.Extra != "" {
		sb.WriteString(strings.TrimSpace(c.Extra) + "\n")
	}
	fmt.Fprintf(&sb, "\n[admin]\nsocket = %s\n", q(c.Socket))
	if c.AdminListen != "" {
		fmt.Fprintf(&sb, "listen = %s\n", q(c.AdminListen))
	}
	if c.AdminToken != "" {
		fmt.Fprintf(&sb, "token = %s\n", q(c.AdminToken))
	}
	if len(c.AdminAllow) > 0 {
		quoted := make([]string, len(c.AdminAllow))
		for i, a := range c.AdminAllow {
			quoted[i] = q(a)
		}
		fmt.Fprintf(&sb, "allow = [%s]\n", strings.Join(quoted, ", "))
	}
	if c.AdminProfiling {
		sb.WriteString("profiling = true\n")
	}
	if len(c.Tags) > 0 {
		sb.WriteString("\n[tags]\n")
		for _, d := range slices.Sorted(maps.Keys(c.Tags)) {
			fmt.Fprintf(&sb, "%s = %s\n", q(d), q(c.Tags[d]))
		}
	}
	service := func(name string, addrs ...string) {
		if len(addrs) == 0 || addrs[0] == "" {
			return
		}
		fmt.Fprintf(&sb, "\n[%s]\n", name)
		if c.BackendTLS != "" {
			fmt.Fprintf(&sb, "backend_tls = %s\n", q(c.BackendTLS))
		}
		if c.BackendCA != "" {
			fmt.Fprintf(&sb, "backend_ca = %s\n", q(c.BackendCA))
		}
		if c.MaxSessionsPerIP != 0 {
			fmt.Fprintf(&sb, "max_sessions_per_ip = %d\n", c.MaxSessionsPerIP)
		}
		for _, addr := range addrs {
			fmt.Fprintf(&sb, "\n[[%s.listener]]\naddress = %s\n", name, q(addr))
			if c.ListenerTLS != "" {
				fmt.Fprintf(&sb, "tls = %s\ncert = %s\nkey = %s\n", q(c.ListenerTLS), q(c.Cert), q(c.Key))
			}
		}
	}
	service("imap", append([]string{c.IMAPAddr}, c.ExtraIMAPAddrs...)...)
	service("pop3", c.POP3Addr)
	for _, s := range c.Services {
		s.write(&sb)
	}
	for _, b := range c.Backends {
		fmt.Fprintf(&sb, "\n[[backend]]\naddress = %s\nweight = 100\n", q(b))
	}
	for _, b := range c.BackendSpecs {
		fmt.Fprintf(&sb, "\n[[backend]]\naddress = %s\n", q(b.Address))
		if b.Weight != 0 {
			fmt.Fprintf(&sb, "weight = %d\n", b.Weight)
		}
		if b.Tag != "" {
			fmt.Fprintf(&sb, "tag = %s\n", q(b.Tag))
		}
	}
	if c.Tables != "" {
		sb.WriteString("\n" + strings.TrimSpace(c.Tables) + "\n")
	}
	return sb.String()
}

// UsherOptions configures LaunchUsher.
type UsherOptions struct {
	Bin    string // usher binary (see BuildUsher)
	Config string // TOML text of the configuration
	// Dir holds the config file and usher.log. Default: a new directory under
	// os.TempDir that Stop removes.
	Dir string
	// StartTimeout bounds the wait for the listeners and the admin socket (default 10s).
	StartTimeout time.Duration
}

// Usher is a running `usher serve` process.
type Usher struct {
	bin, dir, confPath, logPath, socket string
	ownDir                              bool
	imapAddrs, pop3Addrs                []string
	// listeners are the listener addresses per service ("imap", "pop3",
	// "lmtp", "managesieve"), "host:port" or "unix:/path".
	listeners map[string][]string

	mu       sync.Mutex
	cmd      *exec.Cmd
	waitDone chan struct{}
	waitErr  error
}

// usherConfigView is the part of the configuration the harness needs.
type usherConfigView struct {
	Admin struct {
		Socket string `toml:"socket"`
	} `toml:"admin"`
	IMAP        usherServiceView `toml:"imap"`
	POP3        usherServiceView `toml:"pop3"`
	LMTP        usherServiceView `toml:"lmtp"`
	ManageSieve usherServiceView `toml:"managesieve"`
}

type usherServiceView struct {
	Listeners []struct {
		Address string `toml:"address"`
	} `toml:"listener"`
}

func (v usherServiceView) addrs() []string {
	var out []string
	for _, l := range v.Listeners {
		out = append(out, l.Address)
	}
	return out
}

// StartUsher runs usher with configTOML for a test, fails the test on error,
// and stops usher in t.Cleanup (logging its output when the test failed).
func StartUsher(t testing.TB, bin, configTOML string) *Usher {
	t.Helper()
	return StartUsherOpts(t, UsherOptions{Bin: bin, Config: configTOML})
}

// StartUsherOpts is StartUsher with every option of LaunchUsher.
func StartUsherOpts(t testing.TB, opts UsherOptions) *Usher {
	t.Helper()
	u, err := LaunchUsher(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if tail, err := tailFile(u.logPath, 60); err == nil {
				t.Logf("usher log tail:\n%s", tail)
			}
		}
		if err := u.Stop(); err != nil {
			t.Errorf("stop usher: %v", err)
		}
	})
	return u
}

// LaunchUsher writes the configuration, starts `usher serve --config FILE`
// and waits until every listener accepts connections and the admin socket
// answers. On error the process is stopped again.
func LaunchUsher(opts UsherOptions) (_ *Usher, err error) {
	if opts.Bin == "" {
		return nil, errors.New("launch usher: no binary")
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 10 * time.Second
	}
	var view usherConfigView
	if err := toml.Unmarshal([]byte(opts.Config), &view); err != nil {
		return nil, fmt.Errorf("launch usher: parse config: %w", err)
	}
	u := &Usher{bin: opts.Bin, dir: opts.Dir, socket: view.Admin.Socket}
	u.imapAddrs, u.pop3Addrs = view.IMAP.addrs(), view.POP3.addrs()
	u.listeners = map[string][]string{
		"imap": u.imapAddrs, "pop3": u.pop3Addrs,
		"lmtp": view.LMTP.addrs(), "managesieve": view.ManageSieve.addrs(),
	}
	if u.dir == "" {
		if u.dir, err = os.MkdirTemp("", "usher-run-"); err != nil {
			return nil, fmt.Errorf("launch usher: %w", err)
		}
		u.ownDir = true
	}
	defer func() {
		if err != nil {
			_ = u.Stop()
		}
	}()
	u.confPath = filepath.Join(u.dir, "usher.toml")
	u.logPath = filepath.Join(u.dir, "usher.log")
	if u.socket == "" {
		u.socket = filepath.Join(u.dir, "usher-admin.sock")
	}
	if err := os.WriteFile(u.confPath, []byte(opts.Config), 0o644); err != nil {
		return nil, fmt.Errorf("launch usher: %w", err)
	}
	if err := u.Start(opts.StartTimeout); err != nil {
		return nil, err
	}
	return u, nil
}

// Start starts the usher process (again, after Stop) and waits until it is ready.
func (u *Usher) Start(timeout time.Duration) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.cmd != nil {
		return errors.New("start usher: already running")
	}
	logf, err := os.OpenFile(u.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start usher: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(u.bin, "serve", "--config", u.confPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start usher: %w", err)
	}
	u.cmd = cmd
	u.waitDone = make(chan struct{})
	done := u.waitDone
	go func() {
		u.waitErr = cmd.Wait()
		close(done)
	}()

	deadline := time.Now().Add(timeout)
	check := func(network, addr string) error {
		for {
			c, err := net.DialTimeout(network, addr, 500*time.Millisecond)
			if err == nil {
				return c.Close()
			}
			select {
			case <-done:
				u.cmd = nil
				tail, _ := tailFile(u.logPath, 30)
				return fmt.Errorf("start usher: exited (%v) before %s %s was ready:\n%s", u.waitErr, network, addr, tail)
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				tail, _ := tailFile(u.logPath, 30)
				return fmt.Errorf("start usher: %s %s not ready after %v: %v\n%s", network, addr, timeout, err, tail)
			}
		}
	}
	for _, svc := range []string{"imap", "pop3", "lmtp", "managesieve"} {
		for _, a := range u.listeners[svc] {
			network, addr := "tcp", a
			if p, ok := strings.CutPrefix(a, "unix:"); ok {
				network, addr = "unix", p
			}
			if err := check(network, addr); err != nil {
				return err
			}
		}
	}
	return check("unix", u.socket)
}

// Stop terminates usher (SIGTERM, SIGKILL after 5s) with its process group
// and removes the run directory if LaunchUsher created it.
func (u *Usher) Stop() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	var errs []error
	if u.cmd != nil {
		pgid := u.cmd.Process.Pid
		u.cmd = nil
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-u.waitDone:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-u.waitDone
			errs = append(errs, errors.New("stop usher: did not exit within 5s of SIGTERM"))
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // stray children, if any
	}
	if u.ownDir {
		errs = append(errs, os.RemoveAll(u.dir))
		u.ownDir = false
	}
	return errors.Join(errs...)
}

// Signal sends sig to the usher process (SIGHUP reloads, SIGTERM drains).
func (u *Usher) Signal(sig syscall.Signal) error {
	pid := u.PID()
	if pid == 0 {
		return fmt.Errorf("signal usher (%v): not running", sig)
	}
	if err := syscall.Kill(pid, sig); err != nil {
		return fmt.Errorf("signal usher (%v): %w", sig, err)
	}
	return nil
}

// Wait waits up to timeout for the process to exit by itself (after a
// signal the test sent) and returns its exit status as an error (nil for
// exit 0). The run directory stays, so Start runs usher again on the same
// configuration, log and state file.
func (u *Usher) Wait(timeout time.Duration) error {
	u.mu.Lock()
	cmd, done := u.cmd, u.waitDone
	u.mu.Unlock()
	if cmd == nil {
		return errors.New("wait for usher: not running")
	}
	select {
	case <-done:
	case <-time.After(timeout):
		return fmt.Errorf("wait for usher: still running %v later", timeout)
	}
	u.mu.Lock()
	err := u.waitErr
	if u.cmd == cmd {
		u.cmd = nil
	}
	u.mu.Unlock()
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // stray children, if any
	if err != nil {
		return fmt.Errorf("usher exited: %w", err)
	}
	return nil
}

// WriteConfig replaces the configuration file (for a reload with SIGHUP or
// the next Start). It does not change the addresses the harness waits for.
func (u *Usher) WriteConfig(configTOML string) error {
	if err := os.WriteFile(u.confPath, []byte(configTOML), 0o644); err != nil {
		return fmt.Errorf("write usher config: %w", err)
	}
	return nil
}

// LogSize is the current length of usher's log, a mark for WaitLog.
func (u *Usher) LogSize() int64 {
	st, err := os.Stat(u.logPath)
	if err != nil {
		return 0
	}
	return st.Size()
}

// WaitLog polls usher's log, from offset from on, until a line contains
// every one of substrs, and returns that line; it fails after timeout.
func (u *Usher) WaitLog(from int64, timeout time.Duration, substrs ...string) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		log := u.Log()
		if from > 0 && from <= int64(len(log)) {
			log = log[from:]
		}
		for _, line := range strings.Split(log, "\n") {
			ok := line != ""
			for _, sub := range substrs {
				if !strings.Contains(line, sub) {
					ok = false
					break
				}
			}
			if ok {
				return line, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("usher log: no line with %q within %v", substrs, timeout)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// Exec runs the usher binary with exactly args (no --socket added) and
// extra environment variables env ("KEY=value"), with a 15s timeout. err
// is set only when the binary could not run or timed out; a non-zero exit
// is reported in code.
func (u *Usher) Exec(env []string, args ...string) (stdout, stderr string, code int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, u.bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return so.String(), se.String(), -1, fmt.Errorf("usher %s: %w", strings.Join(args, " "), ctx.Err())
	case errors.As(err, &ee):
		return so.String(), se.String(), ee.ExitCode(), nil
	case err != nil:
		return so.String(), se.String(), -1, fmt.Errorf("usher %s: %w", strings.Join(args, " "), err)
	}
	return so.String(), se.String(), 0, nil
}

// Dir is the run directory (configuration file, log, default state file).
func (u *Usher) Dir() string { return u.dir }

// Running reports whether the process is alive; err is its exit status otherwise.
func (u *Usher) Running() (bool, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.cmd == nil {
		return false, nil
	}
	select {
	case <-u.waitDone:
		return false, u.waitErr
	default:
		return true, nil
	}
}

// PID is the usher process id (also its process group id), or 0 when stopped.
func (u *Usher) PID() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.cmd != nil {
		return u.cmd.Process.Pid
	}
	return 0
}

// IMAPAddr is the first IMAP listener's host:port ("" if none).
func (u *Usher) IMAPAddr() string { return first(u.imapAddrs) }

// POP3Addr is the first POP3 listener's host:port ("" if none).
func (u *Usher) POP3Addr() string { return first(u.pop3Addrs) }

// Listeners are the configured listener addresses of service ("imap",
// "pop3", "lmtp", "managesieve"), "host:port" or "unix:/path", in order.
func (u *Usher) Listeners(service string) []string {
	return append([]string(nil), u.listeners[service]...)
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// Socket is the admin socket path.
func (u *Usher) Socket() string { return u.socket }

// ConfigPath is the written configuration file.
func (u *Usher) ConfigPath() string { return u.confPath }

// LogPath is the file usher's stdout and stderr go to.
func (u *Usher) LogPath() string { return u.logPath }

// Log returns usher's output so far.
func (u *Usher) Log() string {
	data, _ := os.ReadFile(u.logPath)
	return string(data)
}

// CLI runs `usher WORDS... --socket S ARGS...` and returns its stdout; a
// non-zero exit is an error carrying stderr.
func (u *Usher) CLI(words []string, args ...string) ([]byte, error) {
	argv := append(append(append([]string{}, words...), "--socket", u.socket), args...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, u.bin, argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("usher %s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// UserStatus is `usher status --json USER`.
type UserStatus struct {
	User        string     `json:"user"`
	Key         string     `json:"key"`
	Tag         string     `json:"tag"`
	Hash        uint32     `json:"hash"`
	Backend     string     `json:"backend"` // "" when usher has no record
	Sessions    int        `json:"sessions"`
	Moving      bool       `json:"moving"`
	Expires     *time.Time `json:"expires"` // nil while sessions are open
	HashBackend string     `json:"hash_backend"`
}

// BackendStatus is one entry of `usher status --json`.
type BackendStatus struct {
	Address    string         `json:"address"`
	Weight     int            `json:"weight"`
	Tag        string         `json:"tag"`
	Up         bool           `json:"up"`
	Users      int            `json:"users"`
	Sessions   int            `json:"sessions"`
	LastChange *BackendChange `json:"last_change"` // nil until the state changed
	Health     *BackendHealth `json:"health"`      // nil when health checks are off
}

// BackendChange says why and when a backend last went up or down.
type BackendChange struct {
	Cause string    `json:"cause"`
	Time  time.Time `json:"time"`
}

// BackendHealth is the health checker's view of a backend.
type BackendHealth struct {
	Healthy   bool       `json:"healthy"`
	Checked   *time.Time `json:"checked"`
	LastError string     `json:"last_error"`
	LatencyNS int64      `json:"latency_ns"`
	HeldDown  bool       `json:"held_down"`
	HeldUntil *time.Time `json:"held_until"`
}

// Backend returns the entry of addr, or nil.
func Backend(bs []BackendStatus, addr string) *BackendStatus {
	for i := range bs {
		if bs[i].Address == addr {
			return &bs[i]
		}
	}
	return nil
}

// Status runs `usher status --json USER`.
func (u *Usher) Status(user string) (*UserStatus, error) {
	out, err := u.CLI([]string{"status"}, "--json", user)
	if err != nil {
		return nil, err
	}
	var st UserStatus
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("usher status --json %s: %w in %q", user, err, out)
	}
	return &st, nil
}

// BackendsStatus runs `usher status --json`.
func (u *Usher) BackendsStatus() ([]BackendStatus, error) {
	out, err := u.CLI([]string{"status"}, "--json")
	if err != nil {
		return nil, err
	}
	var st struct {
		Backends []BackendStatus `json:"backends"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("usher status --json: %w in %q", err, out)
	}
	return st.Backends, nil
}

// BackendAdd runs `usher backend add --weight N ADDR`.
func (u *Usher) BackendAdd(addr string, weight int) error {
	_, err := u.CLI([]string{"backend", "add"}, "--weight", strconv.Itoa(weight), addr)
	return err
}
