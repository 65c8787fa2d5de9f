package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"
)

// Standard Dovecot ports the backends listen on (usher's defaults point there).
const (
	PortIMAP        = 143
	PortPOP3        = 110
	PortLMTP        = 24
	PortManageSieve = 4190
	PortIMAPS       = 993
	PortPOP3S       = 995
)

// DefaultPassword is the password of every user the harness creates.
const DefaultPassword = "pass"

// BackendOptions configures StartBackends. Zero values get the defaults noted.
type BackendOptions struct {
	// N is the number of Dovecot instances (default 3, at most 200).
	N int
	// Dir is the run directory (configs, logs, Maildir root). Default: a new
	// directory under os.TempDir that Close removes. A given Dir is kept.
	Dir string
	// FirstIP is the address of backend 0; backend i listens on FirstIP+i.
	// Default 127.0.1.1.
	FirstIP string
	// Users is the number of generated users user1@example.com … userK@example.com
	// (default 50). ExtraUsers are added as well (default: testuser,
	// testuser@example.com, alice@example.org, bob@example.org).
	Users      int
	ExtraUsers []string
	// Password of every user (default "pass").
	Password string
	// MailUser owns the Maildir root and runs the mail processes (default
	// "vmail" if it exists, else "mail").
	MailUser string
	// StartTimeout bounds how long one instance may take to listen (default 15s).
	StartTimeout time.Duration
	// StopGrace is how long Stop waits after SIGTERM before it sends SIGKILL
	// (default 2s; Dovecot takes a few seconds with sessions open).
	StopGrace time.Duration
	// LogDebug turns on Dovecot's auth_debug and mail_debug.
	LogDebug bool
	// LockWait is how long StartBackends waits for another process's
	// backends (another test run, `make demo`) to go away (default 2m).
	LockWait time.Duration
	// HAProxyIMAPPort and HAProxyLMTPPort, when not 0, give every backend
	// a second IMAP or LMTP listener on that port with haproxy = yes:
	// Dovecot then demands a PROXY protocol v1/v2 header from
	// haproxy_trusted_networks (127.0.0.0/8) and takes the client's
	// address from it.
	HAProxyIMAPPort, HAProxyLMTPPort int
}

// Backends is a set of running Dovecot instances sharing one Maildir root.
// Its methods are safe for concurrent use.
type Backends struct {
	opts     BackendOptions
	dir      string
	ownDir   bool // dir was created by us and is removed by Close
	mailRoot string
	homeRoot string
	certs    *Certs
	users    []string
	uid, gid int

	lock *os.File // machine-wide lock on the standard ports, see lockPorts

	mu sync.Mutex
	bs []*backend
}

// backend is one Dovecot instance.
type backend struct {
	index    int
	addr     string
	dir      string
	conf     string
	logPath  string
	errPath  string // stdout/stderr of the master, for start-up failures
	cmd      *exec.Cmd
	waitDone chan struct{} // closed when cmd.Wait returned
	waitErr  error
}

// LoginMark is a snapshot of every backend log's size, see Backends.Mark.
type LoginMark []int64

// DovecotAvailable reports why the harness cannot run here, or nil.
func DovecotAvailable() error {
	if _, err := exec.LookPath("dovecot"); err != nil {
		if _, err2 := os.Stat("/usr/sbin/dovecot"); err2 != nil {
			return fmt.Errorf("dovecot binary not found (install dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved dovecot-sieve): %w", err)
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("the Dovecot harness needs root (ports < 1024, mail uid switching)")
	}
	return nil
}

func dovecotPath() string {
	if p, err := exec.LookPath("dovecot"); err == nil {
		return p
	}
	return "/usr/sbin/dovecot"
}

// NewBackends starts n backends for a test, fails the test on error and stops
// them in t.Cleanup. It skips the test in -short mode and when Dovecot or
// root is missing.
func NewBackends(t testing.TB, n int) *Backends {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping Dovecot end-to-end test in -short mode")
	}
	if err := DovecotAvailable(); err != nil {
		t.Skipf("skipping Dovecot end-to-end test: %v", err)
	}
	b, err := StartBackends(BackendOptions{N: n})
	if err != nil {
		t.Fatalf("start %d Dovecot backends: %v", n, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i := range b.N() {
				if tail, err := b.LogTail(i, 40); err == nil {
					t.Logf("backend %d (%s) log tail:\n%s", i, b.Addr(i), tail)
				}
			}
		}
		if err := b.Close(); err != nil {
			t.Errorf("stop Dovecot backends: %v", err)
		}
	})
	return b
}

// StartBackends writes the configs, users and certificates and starts every
// instance. On error everything already started is stopped again.
func StartBackends(opts BackendOptions) (_ *Backends, err error) {
	if opts.N == 0 {
		opts.N = 3
	}
	if opts.N < 0 || opts.N > 200 {
		return nil, fmt.Errorf("start backends: N=%d out of range 1..200", opts.N)
	}
	if opts.FirstIP == "" {
		opts.FirstIP = "127.0.1.1"
	}
	if opts.Users == 0 {
		opts.Users = 50
	}
	if opts.ExtraUsers == nil {
		opts.ExtraUsers = []string{"testuser", "testuser@example.com", "alice@example.org", "bob@example.org"}
	}
	if opts.Password == "" {
		opts.Password = DefaultPassword
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 15 * time.Second
	}
	if opts.StopGrace == 0 {
		opts.StopGrace = 2 * time.Second
	}
	if opts.LockWait == 0 {
		opts.LockWait = 2 * time.Minute
	}
	first := net.ParseIP(opts.FirstIP).To4()
	if first == nil || !first.IsLoopback() {
		return nil, fmt.Errorf("start backends: FirstIP %q is not an IPv4 loopback address", opts.FirstIP)
	}
	if int(first[3])+opts.N-1 > 254 {
		return nil, fmt.Errorf("start backends: %d addresses from %s leave the /24", opts.N, opts.FirstIP)
	}

	b := &Backends{opts: opts, dir: opts.Dir}
	if b.lock, err = lockPorts(opts.LockWait); err != nil {
		return nil, fmt.Errorf("start backends: %w", err)
	}
	removeStaleDirs()
	defer func() {
		if err != nil {
			_ = b.Close()
		}
	}()
	if b.dir == "" {
		// Short path: Dovecot's UNIX sockets live below base_dir (108-byte limit).
		b.dir, err = os.MkdirTemp("", "usher-e2e-")
		if err != nil {
			return nil, fmt.Errorf("start backends: %w", err)
		}
		b.ownDir = true
	} else if err := os.MkdirAll(b.dir, 0o755); err != nil {
		return nil, fmt.Errorf("start backends: %w", err)
	}
	// Mail processes run as the mail user and must traverse the directory.
	if err := os.Chmod(b.dir, 0o755); err != nil {
		return nil, fmt.Errorf("start backends: %w", err)
	}
	if err := b.lookupMailUser(); err != nil {
		return nil, err
	}
	b.mailRoot = filepath.Join(b.dir, "mail")
	b.homeRoot = filepath.Join(b.dir, "home")
	for _, d := range []string{b.mailRoot, b.homeRoot} {
		if err := mkdirOwned(d, b.uid, b.gid); err != nil {
			return nil, fmt.Errorf("start backends: %w", err)
		}
	}

	for i := range opts.N {
		ip := make(net.IP, 4)
		copy(ip, first)
		ip[3] += byte(i)
		d := filepath.Join(b.dir, fmt.Sprintf("b%d", i+1))
		b.bs = append(b.bs, &backend{
			index:   i,
			addr:    ip.String(),
			dir:     d,
			conf:    filepath.Join(d, "dovecot.conf"),
			logPath: filepath.Join(d, "dovecot.log"),
			errPath: filepath.Join(d, "master.out"),
		})
	}

	// One certificate for every backend and for usher's own listeners.
	certDir := filepath.Join(b.dir, "certs")
	if err := os.MkdirAll(certDir, 0o755); err != nil {
		return nil, fmt.Errorf("start backends: %w", err)
	}
	ips := []net.IP{net.ParseIP("127.0.0.1")}
	for _, be := range b.bs {
		ips = append(ips, net.ParseIP(be.addr))
	}
	if b.certs, err = GenerateCerts(certDir, ips, []string{"localhost"}); err != nil {
		return nil, fmt.Errorf("start backends: %w", err)
	}

	if err := b.writeUsers(); err != nil {
		return nil, err
	}
	for _, be := range b.bs {
		if err := b.writeConfig(be); err != nil {
			return nil, err
		}
	}
	for i := range b.bs {
		if err := b.Start(i); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func (b *Backends) lookupMailUser() error {
	names := []string{b.opts.MailUser}
	if b.opts.MailUser == "" {
		names = []string{"vmail", "mail"}
	}
	var lastErr error
	for _, n := range names {
		u, err := user.Lookup(n)
		if err != nil {
			lastErr = err
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil || uid == 0 {
			lastErr = fmt.Errorf("user %s has unusable uid/gid %s/%s", n, u.Uid, u.Gid)
			continue
		}
		b.uid, b.gid = uid, gid
		return nil
	}
	return fmt.Errorf("start backends: no mail user (%s): %w", strings.Join(names, ", "), lastErr)
}

func mkdirOwned(dir string, uid, gid int) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("mkdir %s: %w", dir, err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	return nil
}

func (b *Backends) writeUsers() error {
	for i := 1; i <= b.opts.Users; i++ {
		b.users = append(b.users, fmt.Sprintf("user%d@example.com", i))
	}
	b.users = append(b.users, b.opts.ExtraUsers...)
	var buf bytes.Buffer
	for _, u := range b.users {
		if strings.ContainsAny(u, ":\n") || strings.ContainsAny(b.opts.Password, ":\n") {
			return fmt.Errorf("write users: bad user %q or password", u)
		}
		// passwd-file: user:password:uid:gid:gecos:home:shell:extra
		fmt.Fprintf(&buf, "%s:{PLAIN}%s::::::\n", u, b.opts.Password)
	}
	p := filepath.Join(b.dir, "users")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write users: %w", err)
	}
	return nil
}

// dovecotConf is a complete, standalone Dovecot 2.3 configuration of one backend.
var dovecotConf = template.Must(template.New("dovecot.conf").Parse(`# Written by the usher e2e harness; backend {{.Index}}.
instance_name = usher-e2e-b{{.Index}}
base_dir = {{.Dir}}/run
state_dir = {{.Dir}}/state
listen = {{.Addr}}
protocols = imap pop3 lmtp sieve
shutdown_clients = yes

log_path = {{.Log}}
auth_verbose = yes
auth_debug = {{.Debug}}
mail_debug = {{.Debug}}
verbose_ssl = no
imap_id_log = *
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0
disable_plaintext_auth = no
auth_mechanisms = plain login
{{- if or .HAProxyPort .HAProxyLMTPPort}}
haproxy_trusted_networks = 127.0.0.0/8
{{- end}}

ssl = yes
ssl_cert = <{{.Cert}}
ssl_key = <{{.Key}}

first_valid_uid = {{.UID}}
first_valid_gid = {{.GID}}
mail_location = maildir:{{.Mail}}/%d/%n
mail_fsync = always
mmap_disable = yes
lmtp_save_to_detail_mailbox = no

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {{.Users}}
}
userdb {
  driver = static
  args = uid={{.UID}} gid={{.GID}} home={{.Home}}/%d/%n
}

service imap-login {
  inet_listener imap {
    port = 143
  }
{{- if .HAProxyPort}}
  inet_listener imap_haproxy {
    port = {{.HAProxyPort}}
    haproxy = yes
  }
{{- end}}
  inet_listener imaps {
    port = 993
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    port = 110
  }
  inet_listener pop3s {
    port = 995
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    port = 24
  }
{{- if .HAProxyLMTPPort}}
  inet_listener lmtp_haproxy {
    port = {{.HAProxyLMTPPort}}
    haproxy = yes
  }
{{- end}}
}
service managesieve-login {
  inet_listener sieve {
    port = 4190
  }
}

protocol lmtp {
  mail_plugins = $mail_plugins sieve
}
plugin {
  sieve = file:~/sieve;active=~/.dovecot.sieve
}
`))

func (b *Backends) writeConfig(be *backend) error {
	if err := os.MkdirAll(be.dir, 0o755); err != nil {
		return fmt.Errorf("write config of backend %d: %w", be.index, err)
	}
	debug := "no"
	if b.opts.LogDebug {
		debug = "yes"
	}
	var buf bytes.Buffer
	err := dovecotConf.Execute(&buf, map[string]any{
		"Index": be.index + 1, "Dir": be.dir, "Addr": be.addr, "Log": be.logPath,
		"Debug": debug, "Cert": b.certs.CertFile, "Key": b.certs.KeyFile,
		"UID": b.uid, "GID": b.gid, "Mail": b.mailRoot, "Home": b.homeRoot,
		"Users": filepath.Join(b.dir, "users"), "HAProxyPort": b.opts.HAProxyIMAPPort,
		"HAProxyLMTPPort": b.opts.HAProxyLMTPPort,
	})
	if err != nil {
		return fmt.Errorf("write config of backend %d: %w", be.index, err)
	}
	if err := os.WriteFile(be.conf, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write config of backend %d: %w", be.index, err)
	}
	return nil
}

func (b *Backends) get(i int) (*backend, error) {
	if i < 0 || i >= len(b.bs) {
		return nil, fmt.Errorf("backend index %d out of range 0..%d", i, len(b.bs)-1)
	}
	return b.bs[i], nil
}

// Start starts backend i (again) and waits until all its ports accept
// connections. Starting a running backend is an error.
func (b *Backends) Start(i int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	be, err := b.get(i)
	if err != nil {
		return fmt.Errorf("start backend: %w", err)
	}
	if be.cmd != nil {
		return fmt.Errorf("start backend %d (%s): already running", i, be.addr)
	}
	ports := []int{PortIMAP, PortPOP3, PortLMTP, PortManageSieve, PortIMAPS, PortPOP3S}
	for _, p := range []int{b.opts.HAProxyIMAPPort, b.opts.HAProxyLMTPPort} {
		if p != 0 {
			ports = append(ports, p)
		}
	}
	for _, p := range ports {
		if err := portFree(be.addr, p); err != nil {
			return fmt.Errorf("start backend %d: %w (is a system dovecot or `make demo` running? see `ss -ltnp`)", i, err)
		}
	}
	out, err := os.OpenFile(be.errPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start backend %d: %w", i, err)
	}
	defer out.Close()
	// -F keeps the master in the foreground so it stays our child; its own
	// process group lets Stop kill every Dovecot process of this instance.
	cmd := exec.Command(dovecotPath(), "-F", "-c", be.conf)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start backend %d: dovecot: %w", i, err)
	}
	be.cmd = cmd
	be.waitDone = make(chan struct{})
	go func() {
		be.waitErr = cmd.Wait()
		close(be.waitDone)
	}()

	// The master binds every listener before it forks any service, so one
	// accepting port means all are bound (probing each would only add
	// "Disconnected" noise to the log).
	deadline := time.Now().Add(b.opts.StartTimeout)
	for _, p := range ports[:1] {
		addr := net.JoinHostPort(be.addr, strconv.Itoa(p))
		for {
			c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-be.waitDone:
				msg := b.startFailure(be)
				be.cmd = nil
				return fmt.Errorf("start backend %d (%s): dovecot exited (%v): %s", i, be.addr, be.waitErr, msg)
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				msg := b.startFailure(be)
				b.stopLocked(be, syscall.SIGKILL)
				return fmt.Errorf("start backend %d: %s not listening after %v: %s", i, addr, b.opts.StartTimeout, msg)
			}
		}
	}
	return nil
}

func (b *Backends) startFailure(be *backend) string {
	var parts []string
	if out, err := os.ReadFile(be.errPath); err == nil && len(out) > 0 {
		parts = append(parts, strings.TrimSpace(string(out)))
	}
	if tail, err := tailFile(be.logPath, 15); err == nil && tail != "" {
		parts = append(parts, tail)
	}
	return strings.Join(parts, "\n")
}

func portFree(host string, port int) error {
	l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("port %s:%d is taken: %w", host, port, err)
	}
	return l.Close()
}

// Stop stops backend i gracefully (SIGTERM to its process group, SIGKILL
// after StopGrace) and waits until every process of it is gone and its ports
// are free. Stopping a stopped backend does nothing.
func (b *Backends) Stop(i int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	be, err := b.get(i)
	if err != nil {
		return fmt.Errorf("stop backend: %w", err)
	}
	return b.stopLocked(be, syscall.SIGTERM)
}

// Kill kills backend i at once (SIGKILL to its process group), like a crash:
// clients see their connections reset. It waits like Stop.
func (b *Backends) Kill(i int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	be, err := b.get(i)
	if err != nil {
		return fmt.Errorf("kill backend: %w", err)
	}
	return b.stopLocked(be, syscall.SIGKILL)
}

func (b *Backends) stopLocked(be *backend, sig syscall.Signal) error {
	if be.cmd == nil {
		return nil
	}
	pgid := be.cmd.Process.Pid
	be.cmd = nil
	_ = syscall.Kill(-pgid, sig)
	select {
	case <-be.waitDone:
	case <-time.After(b.opts.StopGrace):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-be.waitDone
	}
	// The master is gone; make sure its children are too.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(-pgid, 0) == nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("stop backend %d: process group %d survives SIGKILL", be.index, pgid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := portFree(be.addr, PortIMAP); err != nil {
		return fmt.Errorf("stop backend %d: %w", be.index, err)
	}
	return nil
}

// Close stops every backend (all at once) and removes the run directory if
// StartBackends created it.
func (b *Backends) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	errs := make([]error, len(b.bs)+1)
	var wg sync.WaitGroup
	for i, be := range b.bs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = b.stopLocked(be, syscall.SIGTERM)
		}()
	}
	wg.Wait()
	if b.ownDir && b.dir != "" {
		errs[len(b.bs)] = os.RemoveAll(b.dir)
		b.ownDir = false
	}
	if b.lock != nil {
		b.lock.Close() // releases the flock
		b.lock = nil
	}
	return errors.Join(errs...)
}

// removeStaleDirs removes run directories that StartBackends created in
// earlier processes which died without Close (a `go test -timeout` panic).
// Such a directory is only in use while its process holds the lock, and we
// hold it now.
func removeStaleDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "usher-e2e-*"))
	for _, d := range dirs {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			_ = os.RemoveAll(d)
		}
	}
}

// lockPorts takes the machine-wide lock that serialises users of the
// standard Dovecot ports on 127.0.1.x (test binaries of several `go test`
// runs, the demo), waiting up to wait for the current holder. The lock is
// an flock, so it dies with its process; the file names the holder.
func lockPorts(wait time.Duration) (*os.File, error) {
	path := filepath.Join(os.TempDir(), "usher-backends.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock backend ports: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			holder, _ := os.ReadFile(path)
			f.Close()
			return nil, fmt.Errorf("lock backend ports: %s is held by %s (another e2e run, or `make demo`: stop it with make demo-stop): %w",
				path, strings.TrimSpace(string(holder)), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintf("pid %d (%s)\n", os.Getpid(), filepath.Base(os.Args[0]))), 0)
	return f, nil
}

// N is the number of backends.
func (b *Backends) N() int { return len(b.bs) }

// Addr is the IP address of backend i.
func (b *Backends) Addr(i int) string { return b.bs[i].addr }

// Addrs are the IP addresses of all backends, in index order.
func (b *Backends) Addrs() []string {
	out := make([]string, len(b.bs))
	for i, be := range b.bs {
		out[i] = be.addr
	}
	return out
}

// Index returns the index of the backend with IP address addr, or -1.
func (b *Backends) Index(addr string) int {
	for i, be := range b.bs {
		if be.addr == addr {
			return i
		}
	}
	return -1
}

// HostPort is backend i's address at port, e.g. HostPort(0, PortIMAP).
func (b *Backends) HostPort(i, port int) string {
	return net.JoinHostPort(b.bs[i].addr, strconv.Itoa(port))
}

// Dir is the run directory.
func (b *Backends) Dir() string { return b.dir }

// MasterPID is the pid of backend i's Dovecot master (also its process
// group id), or 0 when it is stopped.
func (b *Backends) MasterPID(i int) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if be := b.bs[i]; be.cmd != nil {
		return be.cmd.Process.Pid
	}
	return 0
}

// ConfigPath is backend i's dovecot.conf (for doveadm -c).
func (b *Backends) ConfigPath(i int) string { return b.bs[i].conf }

// LogPath is backend i's Dovecot log file.
func (b *Backends) LogPath(i int) string { return b.bs[i].logPath }

// Certs are the CA and server certificate every backend presents; the server
// certificate is also valid for 127.0.0.1 and localhost, for usher's listeners.
func (b *Backends) Certs() *Certs { return b.certs }

// Users are all user names in the passwd-file; all share one password.
func (b *Backends) Users() []string { return append([]string(nil), b.users...) }

// Password is the password of every user.
func (b *Backends) Password() string { return b.opts.Password }

// MailRoot is the shared Maildir root.
func (b *Backends) MailRoot() string { return b.mailRoot }

// MaildirPath is user's Maildir (INBOX) as Dovecot expands maildir:<root>/%d/%n.
func (b *Backends) MaildirPath(user string) string {
	n, d := splitUser(user)
	return filepath.Join(b.mailRoot, d, n)
}

// HomePath is user's home directory (home=<homes>/%d/%n in the userdb).
func (b *Backends) HomePath(user string) string {
	n, d := splitUser(user)
	return filepath.Join(b.homeRoot, d, n)
}

func splitUser(user string) (name, domain string) {
	name = user
	if at := strings.LastIndexByte(user, '@'); at >= 0 {
		name, domain = user[:at], user[at+1:]
	}
	return strings.ToLower(name), strings.ToLower(domain)
}

// SetSieve installs script as user's active Sieve script (~/.dovecot.sieve),
// which LMTP deliveries run through the sieve plugin.
func (b *Backends) SetSieve(user, script string) error {
	home := b.HomePath(user)
	for _, d := range []string{filepath.Dir(home), home} {
		if err := mkdirOwned(d, b.uid, b.gid); err != nil {
			return fmt.Errorf("set sieve of %s: %w", user, err)
		}
	}
	p := filepath.Join(home, ".dovecot.sieve")
	if err := os.WriteFile(p, []byte(script), 0o644); err != nil {
		return fmt.Errorf("set sieve of %s: %w", user, err)
	}
	if err := os.Chown(p, b.uid, b.gid); err != nil {
		return fmt.Errorf("set sieve of %s: %w", user, err)
	}
	return nil
}

// Deliver puts msg into user's INBOX by writing it straight into the Maildir's
// new/ directory (tmp/ first, then rename, as Maildir demands), owned by the
// mail user. It returns the file's path.
func (b *Backends) Deliver(user string, msg []byte) (string, error) {
	md := b.MaildirPath(user)
	for _, d := range []string{filepath.Dir(md), md, filepath.Join(md, "cur"), filepath.Join(md, "new"), filepath.Join(md, "tmp")} {
		if err := mkdirOwned(d, b.uid, b.gid); err != nil {
			return "", fmt.Errorf("deliver to %s: %w", user, err)
		}
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return "", fmt.Errorf("deliver to %s: %w", user, err)
	}
	name := fmt.Sprintf("%d.R%s.usher-e2e", time.Now().Unix(), hex.EncodeToString(rnd[:]))
	tmp := filepath.Join(md, "tmp", name)
	if err := os.WriteFile(tmp, msg, 0o600); err != nil {
		return "", fmt.Errorf("deliver to %s: %w", user, err)
	}
	if err := os.Chown(tmp, b.uid, b.gid); err != nil {
		return "", fmt.Errorf("deliver to %s: %w", user, err)
	}
	dst := filepath.Join(md, "new", name)
	if err := os.Rename(tmp, dst); err != nil {
		return "", fmt.Errorf("deliver to %s: %w", user, err)
	}
	return dst, nil
}

// Log returns backend i's whole log.
func (b *Backends) Log(i int) (string, error) {
	data, err := os.ReadFile(b.bs[i].logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read log of backend %d: %w", i, err)
	}
	return string(data), nil
}

// LogTail returns the last n lines of backend i's log.
func (b *Backends) LogTail(i, n int) (string, error) {
	return tailFile(b.bs[i].logPath, n)
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

// LogContains reports whether backend i's log contains substr.
func (b *Backends) LogContains(i int, substr string) bool {
	s, err := b.Log(i)
	return err == nil && strings.Contains(s, substr)
}

// LogLines returns the lines of backend i's log written after mark that
// contain every one of substrs. A nil mark means the whole log.
func (b *Backends) LogLines(mark LoginMark, i int, substrs ...string) []string {
	s, err := b.Log(i)
	if err != nil {
		return nil
	}
	if i < len(mark) && mark[i] <= int64(len(s)) {
		s = s[mark[i]:]
	}
	var out []string
	for _, line := range strings.Split(s, "\n") {
		ok := true
		for _, sub := range substrs {
			if !strings.Contains(line, sub) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			out = append(out, line)
		}
	}
	return out
}

// Mark records the current size of every backend log so that later calls can
// look only at what was logged afterwards.
func (b *Backends) Mark() LoginMark {
	m := make(LoginMark, len(b.bs))
	for i, be := range b.bs {
		if st, err := os.Stat(be.logPath); err == nil {
			m[i] = st.Size()
		}
	}
	return m
}

// LoginNeedle is the text Dovecot's login processes log for a successful
// login of user (imap-login, pop3-login and managesieve-login alike):
// "imap-login: Info: Login: user=<user1@example.com>, method=PLAIN, rip=…".
func LoginNeedle(user string) string { return "Login: user=<" + user + ">" }

// Logins counts, per backend, the successful logins of user logged after mark
// (nil: since start).
func (b *Backends) Logins(mark LoginMark, user string) []int {
	out := make([]int, len(b.bs))
	for i := range b.bs {
		out[i] = len(b.LogLines(mark, i, LoginNeedle(user)))
	}
	return out
}

// WaitLogins polls until user has at least n successful logins after mark,
// summed over all backends, or until timeout (Dovecot's log process writes
// asynchronously, a moment after the client saw OK). It returns the per-backend
// counts either way and an error on timeout.
func (b *Backends) WaitLogins(mark LoginMark, user string, n int, timeout time.Duration) ([]int, error) {
	deadline := time.Now().Add(timeout)
	for {
		counts := b.Logins(mark, user)
		total := 0
		for _, c := range counts {
			total += c
		}
		if total >= n {
			return counts, nil
		}
		if time.Now().After(deadline) {
			return counts, fmt.Errorf("wait for %d logins of %s: saw %d (%v) after %v", n, user, total, counts, timeout)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// WhoServed waits up to 10s for a login of user after mark and returns the
// index of the one backend that logged it. It fails if no backend or more than
// one did.
func (b *Backends) WhoServed(mark LoginMark, user string) (int, error) {
	counts, err := b.WaitLogins(mark, user, 1, 10*time.Second)
	if err != nil {
		return -1, fmt.Errorf("who served %s: %w", user, err)
	}
	who := -1
	for i, c := range counts {
		if c == 0 {
			continue
		}
		if who >= 0 {
			return -1, fmt.Errorf("who served %s: logins on several backends: %v", user, counts)
		}
		who = i
	}
	return who, nil
}

// WaitLog polls until backend i's log after mark has a line containing all
// substrs, or until timeout.
func (b *Backends) WaitLog(ctx context.Context, mark LoginMark, i int, substrs ...string) ([]string, error) {
	for {
		if lines := b.LogLines(mark, i, substrs...); len(lines) > 0 {
			return lines, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for %q in log of backend %d: %w", substrs, i, ctx.Err())
		case <-time.After(25 * time.Millisecond):
		}
	}
}
