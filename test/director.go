package test

// This file runs a real Dovecot 2.3 director as a reference for usher's
// routing = "dovecot": StartDirector starts one standalone instance (its own
// config, base_dir, state_dir and log) that forms a ring of one, and
// DirectorAdmin speaks the director's doveadm protocol on its director-admin
// socket, the protocol `doveadm director …` uses (dovecot/core
// src/director/doveadm-connection.c), so that a test can look up a thousand
// users in milliseconds instead of starting doveadm a thousand times.
//
// The director never connects to its mail servers to hash users, so the
// backend addresses may be fake. It binds only its ring port on Addr
// (127.0.2.1 by default, outside the 127.0.1.x backends' range) and UNIX
// sockets below its own directory, so it needs no machine-wide lock.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"
)

// DirectorOptions configures StartDirector. Zero values get the defaults noted.
type DirectorOptions struct {
	// Addr is the IPv4 loopback address the ring listener binds (default 127.0.2.1).
	Addr string
	// Port is the ring port (default: a port that was free on Addr a moment ago).
	Port int
	// MailServers is director_mail_servers: IPs, ranges "IP1-IP2", "IP@tag"
	// separated by spaces (required).
	MailServers string
	// UsernameHash is director_username_hash (default "%Lu", Dovecot's default).
	UsernameHash string
	// StartTimeout bounds the wait for the admin socket and the ring to be
	// synced (default 15s).
	StartTimeout time.Duration
	// StopGrace is how long Stop waits after SIGTERM before SIGKILL (default 2s).
	StopGrace time.Duration
}

// Director is a running standalone Dovecot director. Its methods are safe for
// concurrent use.
type Director struct {
	opts                              DirectorOptions
	dir, conf, logPath, errPath, sock string

	mu       sync.Mutex
	cmd      *exec.Cmd
	waitDone chan struct{}
	waitErr  error
}

// directorBinary is where Debian's dovecot-core installs the director service.
const directorBinary = "/usr/lib/dovecot/director"

// DirectorAvailable reports why a Dovecot director cannot run here, or nil.
func DirectorAvailable() error {
	if err := DovecotAvailable(); err != nil {
		return err
	}
	if _, err := os.Stat(directorBinary); err != nil {
		return fmt.Errorf("the Dovecot director service binary is missing (Dovecot 2.3 with the director, e.g. Debian dovecot-core before 2.4): %w", err)
	}
	if _, err := exec.LookPath("doveadm"); err != nil {
		return fmt.Errorf("doveadm not found: %w", err)
	}
	return nil
}

// NewDirector starts a director for a test, fails the test on error and
// stops it (removing its directory) in t.Cleanup, logging its log tail when
// the test failed. It skips the test in -short mode and when the director,
// Dovecot or root is missing.
func NewDirector(t testing.TB, opts DirectorOptions) *Director {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping Dovecot director test in -short mode")
	}
	if err := DirectorAvailable(); err != nil {
		t.Skipf("skipping Dovecot director test: %v", err)
	}
	d, err := StartDirector(opts)
	if err != nil {
		t.Fatalf("start Dovecot director: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if tail, err := tailFile(d.logPath, 40); err == nil {
				t.Logf("director log tail:\n%s", tail)
			}
		}
		if err := d.Stop(); err != nil {
			t.Errorf("stop Dovecot director: %v", err)
		}
	})
	return d
}

// directorConf is a complete, standalone Dovecot 2.3 configuration of a
// director that is its own ring of one. No protocols: nothing but the
// director service (ring listener and director-admin socket) listens.
var directorConf = template.Must(template.New("director.conf").Parse(`# Written by the usher e2e harness: a standalone Dovecot director.
instance_name = usher-director-{{.PID}}
base_dir = {{.Dir}}/run
state_dir = {{.Dir}}/state
log_path = {{.Log}}
protocols =
listen = {{.Addr}}
ssl = no
shutdown_clients = yes

director_servers = {{.Addr}}:{{.Port}}
director_mail_servers = {{.MailServers}}
director_username_hash = {{.UsernameHash}}

passdb {
  driver = static
  args = proxy=y nopassword=y
}

service director {
  process_min_avail = 1
  inet_listener {
    address = {{.Addr}}
    port = {{.Port}}
  }
  unix_listener director-admin {
    mode = 0600
  }
}
`))

// StartDirector writes the configuration, starts `dovecot -F` and waits until
// the director answers on its admin socket and reports its ring synced. On
// error everything is stopped again.
func StartDirector(opts DirectorOptions) (_ *Director, err error) {
	if opts.Addr == "" {
		opts.Addr = "127.0.2.1"
	}
	if opts.UsernameHash == "" {
		opts.UsernameHash = "%Lu"
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 15 * time.Second
	}
	if opts.StopGrace == 0 {
		opts.StopGrace = 2 * time.Second
	}
	ip := net.ParseIP(opts.Addr).To4()
	if ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("start director: Addr %q is not an IPv4 loopback address", opts.Addr)
	}
	if strings.TrimSpace(opts.MailServers) == "" {
		return nil, errors.New("start director: no MailServers")
	}
	for _, s := range []string{opts.MailServers, opts.UsernameHash} {
		if strings.ContainsAny(s, "\n\r#{}\"") {
			return nil, fmt.Errorf("start director: setting %q has characters the config file cannot hold", s)
		}
	}
	if opts.Port == 0 {
		l, err := net.Listen("tcp", net.JoinHostPort(opts.Addr, "0"))
		if err != nil {
			return nil, fmt.Errorf("start director: find a free port on %s: %w", opts.Addr, err)
		}
		opts.Port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}

	d := &Director{opts: opts}
	// Short path: the UNIX sockets live below base_dir (108-byte limit).
	if d.dir, err = os.MkdirTemp("", "usher-director-"); err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	defer func() {
		if err != nil {
			_ = d.Stop()
		}
	}()
	// The director process runs as dovecot, chrooted to base_dir below dir.
	if err := os.Chmod(d.dir, 0o755); err != nil {
		return nil, fmt.Errorf("start director: %w", err)
	}
	d.conf = filepath.Join(d.dir, "dovecot.conf")
	d.logPath = filepath.Join(d.dir, "director.log")
	d.errPath = filepath.Join(d.dir, "master.out")
	d.sock = filepath.Join(d.dir, "run", "director-admin")
	var buf bytes.Buffer
	err = directorConf.Execute(&buf, map[string]any{
		"PID": os.Getpid(), "Dir": d.dir, "Log": d.logPath, "Addr": opts.Addr, "Port": opts.Port,
		"MailServers": opts.MailServers, "UsernameHash": opts.UsernameHash,
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

func (d *Director) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	out, err := os.OpenFile(d.errPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start director: %w", err)
	}
	defer out.Close()
	// -F keeps the master in the foreground as our child; its own process
	// group lets Stop kill the director with it.
	cmd := exec.Command(dovecotPath(), "-F", "-c", d.conf)
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

	deadline := time.Now().Add(d.opts.StartTimeout)
	for {
		status, err := d.selfStatus()
		if err == nil && status == "ring synced" {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("start director: dovecot exited (%v): %s", d.waitErr, d.startFailure())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("start director: not synced after %v (status %q, %v): %s",
				d.opts.StartTimeout, status, err, d.startFailure())
		}
	}
}

func (d *Director) startFailure() string {
	var parts []string
	if out, err := os.ReadFile(d.errPath); err == nil && len(out) > 0 {
		parts = append(parts, strings.TrimSpace(string(out)))
	}
	if tail, err := tailFile(d.logPath, 15); err == nil && tail != "" {
		parts = append(parts, tail)
	}
	return strings.Join(parts, "\n")
}

// Stop stops the director (SIGTERM to its process group, SIGKILL after
// StopGrace), waits until every process of it is gone and removes its
// directory. Stopping twice does nothing.
func (d *Director) Stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if d.cmd != nil {
		pgid := d.cmd.Process.Pid
		d.cmd = nil
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-d.waitDone:
		case <-time.After(d.opts.StopGrace):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-d.waitDone
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // children, if any survived
		deadline := time.Now().Add(5 * time.Second)
		for syscall.Kill(-pgid, 0) == nil {
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("stop director: process group %d survives SIGKILL", pgid))
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if d.dir != "" {
		errs = append(errs, os.RemoveAll(d.dir))
		d.dir = ""
	}
	return errors.Join(errs...)
}

// ConfigPath is the director's dovecot.conf (for `doveadm -c`).
func (d *Director) ConfigPath() string { return d.conf }

// RingAddr is the director's ring listener host:port.
func (d *Director) RingAddr() string {
	return net.JoinHostPort(d.opts.Addr, strconv.Itoa(d.opts.Port))
}

// AdminSocket is the path of the director-admin socket doveadm talks to.
func (d *Director) AdminSocket() string { return d.sock }

// LogTail returns the last n lines of the director's log.
func (d *Director) LogTail(n int) (string, error) { return tailFile(d.logPath, n) }

// Doveadm runs `doveadm -c CONF ARGS...` with a 10s timeout and returns its
// stdout; a non-zero exit is an error carrying stderr.
func (d *Director) Doveadm(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	argv := append([]string{"-c", d.conf}, args...)
	cmd := exec.CommandContext(ctx, "doveadm", argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("doveadm %q: %w: %s", args, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// RingStatus is the status column of this director's own row of
// `doveadm director ring status` ("ring synced", "ring handshaking", …).
func (d *Director) RingStatus() (string, error) {
	out, err := d.Doveadm("-f", "tab", "director", "ring", "status")
	if err != nil {
		return "", err
	}
	rows := parseTabTable(out)
	for _, r := range rows {
		if r["type"] == "self" {
			return r["status"], nil
		}
	}
	return "", fmt.Errorf("doveadm director ring status: no self row in %q", out)
}

// WaitRingSynced polls `doveadm director ring status` until this director
// reports "ring synced" or timeout passes.
func (d *Director) WaitRingSynced(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := d.RingStatus()
		if err == nil && st == "ring synced" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for director ring sync: status %q (%v) after %v", st, err, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// selfStatus asks the admin socket (DIRECTOR-LIST) for this director's status.
func (d *Director) selfStatus() (string, error) {
	a, err := d.DialAdmin()
	if err != nil {
		return "", err
	}
	defer a.Close()
	lines, err := a.list("DIRECTOR-LIST")
	if err != nil {
		return "", err
	}
	for _, l := range lines {
		f := strings.Split(l, "\t")
		// ip, port, type, last failed, status, …
		if len(f) >= 5 && f[2] == "self" {
			return f[4], nil
		}
	}
	return "", fmt.Errorf("director list: no self row in %q", lines)
}

// DirectorUserStatus is `doveadm director status USER`.
type DirectorUserStatus struct {
	Current string // "" when the user is not in the director's user directory
	Hashed  string // host the hash ring gives now ("" if none)
	Initial string // host the ring of the configured director_mail_servers gives
}

// StatusUser runs `doveadm director status -- USER` and parses its output.
func (d *Director) StatusUser(user string) (DirectorUserStatus, error) {
	var st DirectorUserStatus
	out, err := d.Doveadm("director", "status", "--", user)
	if err != nil {
		return st, err
	}
	seen := 0
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			continue
		}
		switch k {
		case "Current":
			seen++
			if !strings.HasPrefix(v, "n/a") {
				st.Current, _, _ = strings.Cut(v, " ")
			}
		case "Hashed":
			seen++
			st.Hashed = strings.TrimSpace(v)
		case "Initial config":
			seen++
			st.Initial = strings.TrimSpace(v)
		}
	}
	if seen != 3 {
		return st, fmt.Errorf("doveadm director status %q: unexpected output %q", user, out)
	}
	return st, nil
}

// DirectorMapEntry is one row of `doveadm director map -f USERFILE`.
type DirectorMapEntry struct {
	User string
	Hash uint32
	Host string
}

// MapUsers writes users (one a line) to a file and runs
// `doveadm -f tab director map -f FILE`: doveadm computes each name's hash
// itself (mail_user_hash with director_username_hash) and prints the names
// whose hash is in the director's user directory.
func (d *Director) MapUsers(users []string) ([]DirectorMapEntry, error) {
	var buf bytes.Buffer
	for _, u := range users {
		if strings.ContainsAny(u, "\n\r") {
			return nil, fmt.Errorf("director map: user %q has a line break", u)
		}
		buf.WriteString(u + "\n")
	}
	f, err := os.CreateTemp("", "usher-director-users-")
	if err != nil {
		return nil, fmt.Errorf("director map: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(buf.Bytes()); err != nil {
		f.Close()
		return nil, fmt.Errorf("director map: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("director map: %w", err)
	}
	out, err := d.Doveadm("-f", "tab", "director", "map", "-f", f.Name())
	if err != nil {
		return nil, err
	}
	var es []DirectorMapEntry
	for _, r := range parseTabTable(out) {
		h, err := strconv.ParseUint(r["hash"], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("director map: bad hash in row %q: %w", r, err)
		}
		es = append(es, DirectorMapEntry{User: r["user"], Hash: uint32(h), Host: r["mail server ip"]})
	}
	return es, nil
}

// parseTabTable parses doveadm's tab formatter output: a header row, then
// rows; each row becomes a map from column name to value.
func parseTabTable(out string) []map[string]string {
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) == 0 || lines[0] == "" {
		return nil
	}
	head := strings.Split(lines[0], "\t")
	var rows []map[string]string
	for _, l := range lines[1:] {
		f := strings.Split(l, "\t")
		r := make(map[string]string, len(head))
		for i, h := range head {
			if i < len(f) {
				r[h] = f[i]
			}
		}
		rows = append(rows, r)
	}
	return rows
}

// DirectorAdmin is a connection to the director-admin socket, speaking the
// director's doveadm protocol: a VERSION handshake, then one tab-separated,
// tab-escaped command a line, answered in order. Not safe for concurrent use.
type DirectorAdmin struct {
	c net.Conn
	r *bufio.Reader
}

// directorAdminTimeout bounds one exchange on the admin socket.
const directorAdminTimeout = 10 * time.Second

// maxDirectorLine caps a line read from the admin socket.
const maxDirectorLine = 64 << 10

// DialAdmin connects to the director-admin socket and does the handshake.
func (d *Director) DialAdmin() (*DirectorAdmin, error) {
	c, err := net.DialTimeout("unix", d.sock, time.Second)
	if err != nil {
		return nil, fmt.Errorf("director admin: %w", err)
	}
	a := &DirectorAdmin{c: c, r: bufio.NewReaderSize(c, 4096)}
	_ = c.SetDeadline(time.Now().Add(directorAdminTimeout))
	if _, err := io.WriteString(c, "VERSION\tdirector-doveadm\t1\t0\n"); err != nil {
		c.Close()
		return nil, fmt.Errorf("director admin: handshake: %w", err)
	}
	line, err := a.readLine()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("director admin: handshake: %w", err)
	}
	if !strings.HasPrefix(line, "VERSION\tdirector-doveadm\t1\t") {
		c.Close()
		return nil, fmt.Errorf("director admin: handshake: unexpected %q", line)
	}
	return a, nil
}

// Close closes the connection.
func (a *DirectorAdmin) Close() error { return a.c.Close() }

func (a *DirectorAdmin) readLine() (string, error) {
	var sb strings.Builder
	for {
		chunk, isPrefix, err := a.r.ReadLine()
		if err != nil {
			return "", fmt.Errorf("read: %w", err)
		}
		sb.Write(chunk)
		if sb.Len() > maxDirectorLine {
			return "", fmt.Errorf("read: line longer than %d bytes", maxDirectorLine)
		}
		if !isPrefix {
			return sb.String(), nil
		}
	}
}

// directorTabEscape is Dovecot's str_tabescape (lib/strescape.c): \001, \t,
// \r and \n become \001 followed by '1', 't', 'r', 'n'.
func directorTabEscape(s string) string {
	if !strings.ContainsAny(s, "\x01\t\r\n") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case 0x01:
			b.WriteString("\x011")
		case '\t':
			b.WriteString("\x01t")
		case '\r':
			b.WriteString("\x01r")
		case '\n':
			b.WriteString("\x01n")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// command builds one protocol line from the command and its arguments.
func directorCommand(cmd string, args ...string) (string, error) {
	var b strings.Builder
	b.WriteString(cmd)
	for _, a := range args {
		if strings.IndexByte(a, 0) >= 0 {
			return "", fmt.Errorf("director admin: %s argument %q has a NUL byte", cmd, a)
		}
		b.WriteByte('\t')
		b.WriteString(directorTabEscape(a))
	}
	b.WriteByte('\n')
	return b.String(), nil
}

// pipeline sends the lines while it reads one reply line per command.
// The writer runs beside the reader so that neither side's socket buffer can
// fill up and stall the other.
func (a *DirectorAdmin) pipeline(lines []string) ([]string, error) {
	_ = a.c.SetDeadline(time.Now().Add(directorAdminTimeout))
	werr := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(a.c, 32<<10)
		for _, l := range lines {
			if _, err := w.WriteString(l); err != nil {
				werr <- err
				return
			}
		}
		werr <- w.Flush()
	}()
	replies := make([]string, 0, len(lines))
	for range lines {
		r, err := a.readLine()
		if err != nil {
			return nil, fmt.Errorf("director admin: reply %d of %d: %w", len(replies)+1, len(lines), err)
		}
		replies = append(replies, r)
	}
	if err := <-werr; err != nil {
		return nil, fmt.Errorf("director admin: write: %w", err)
	}
	return replies, nil
}

// list sends one command whose reply is lines ended by an empty line.
func (a *DirectorAdmin) list(cmd string, args ...string) ([]string, error) {
	line, err := directorCommand(cmd, args...)
	if err != nil {
		return nil, err
	}
	_ = a.c.SetDeadline(time.Now().Add(directorAdminTimeout))
	if _, err := io.WriteString(a.c, line); err != nil {
		return nil, fmt.Errorf("director admin: %s: %w", cmd, err)
	}
	var out []string
	for {
		l, err := a.readLine()
		if err != nil {
			return nil, fmt.Errorf("director admin: %s: %w", cmd, err)
		}
		if l == "" {
			return out, nil
		}
		out = append(out, l)
	}
}

// DirectorLookup is the director's answer to USER-LOOKUP (what
// `doveadm director status USER` prints).
type DirectorLookup struct {
	Current string // host in the user directory, "" if none
	Hashed  string // host the current hash ring gives, "" if none
	Initial string // host the ring of the configured mail servers gives, "" if none
}

// LookupUsers sends USER-LOOKUP for every user (tag "") and returns the
// answers in order. A user name that is all digits is taken by the director
// as a user hash, not a name (str_to_uint in doveadm_cmd_user_lookup), so
// such names are refused here.
func (a *DirectorAdmin) LookupUsers(users []string) ([]DirectorLookup, error) {
	lines := make([]string, len(users))
	for i, u := range users {
		if allDigits(u) {
			return nil, fmt.Errorf("director lookup: user %q is all digits, the director would take it as a hash", u)
		}
		l, err := directorCommand("USER-LOOKUP", u)
		if err != nil {
			return nil, err
		}
		lines[i] = l
	}
	replies, err := a.pipeline(lines)
	if err != nil {
		return nil, fmt.Errorf("director lookup: %w", err)
	}
	res := make([]DirectorLookup, len(users))
	for i, r := range replies {
		// current host, its expiry, hashed host, initial-config host
		f := strings.Split(r, "\t")
		if len(f) != 4 {
			return nil, fmt.Errorf("director lookup %q: unexpected reply %q", users[i], r)
		}
		res[i] = DirectorLookup{Current: f[0], Hashed: f[2], Initial: f[3]}
	}
	return res, nil
}

// DirectorHost is one row of HOST-LIST (`doveadm director status`).
type DirectorHost struct {
	IP     string
	VHosts int
	Users  int
	Tag    string
	Down   bool
}

// Hosts lists the director's mail servers.
func (a *DirectorAdmin) Hosts() ([]DirectorHost, error) {
	lines, err := a.list("HOST-LIST")
	if err != nil {
		return nil, err
	}
	var hs []DirectorHost
	for _, l := range lines {
		// ip, vhost count, user count, tag, U/D, last up/down change
		f := strings.Split(l, "\t")
		if len(f) < 5 {
			return nil, fmt.Errorf("director host list: unexpected row %q", l)
		}
		v, err1 := strconv.Atoi(f[1])
		u, err2 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("director host list: unexpected row %q", l)
		}
		hs = append(hs, DirectorHost{IP: f[0], VHosts: v, Users: u, Tag: f[3], Down: f[4] == "D"})
	}
	return hs, nil
}

// DirectorMove moves one user to a host.
type DirectorMove struct {
	User string
	Host string
}

// MoveUsers sends USER-MOVE for each move (`doveadm director move USER HOST`)
// and fails unless every one is answered OK. A user that is not in the user
// directory yet is added to it with its hash.
func (a *DirectorAdmin) MoveUsers(moves []DirectorMove) error {
	lines := make([]string, len(moves))
	for i, m := range moves {
		if allDigits(m.User) {
			return fmt.Errorf("director move: user %q is all digits, the director would take it as a hash", m.User)
		}
		l, err := directorCommand("USER-MOVE", m.User, m.Host)
		if err != nil {
			return err
		}
		lines[i] = l
	}
	replies, err := a.pipeline(lines)
	if err != nil {
		return fmt.Errorf("director move: %w", err)
	}
	for i, r := range replies {
		if r != "OK" {
			return fmt.Errorf("director move %q to %s: %q", moves[i].User, moves[i].Host, r)
		}
	}
	return nil
}

// DirectorUser is one row of USER-LIST: a user the directory holds.
type DirectorUser struct {
	Hash uint32
	Host string
}

// Users lists the user directory (`doveadm director map` without names).
func (a *DirectorAdmin) Users() ([]DirectorUser, error) {
	lines, err := a.list("USER-LIST")
	if err != nil {
		return nil, err
	}
	us := make([]DirectorUser, 0, len(lines))
	for _, l := range lines {
		// user hash, expire time, host
		f := strings.Split(l, "\t")
		if len(f) != 3 {
			return nil, fmt.Errorf("director user list: unexpected row %q", l)
		}
		h, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("director user list: row %q: %w", l, err)
		}
		us = append(us, DirectorUser{Hash: uint32(h), Host: f[2]})
	}
	return us, nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// WeightedBackend is a [[backend]] with an explicit weight
// (UsherConfig.Backends always writes weight 100).
type WeightedBackend struct {
	Address string
	Weight  int
}

// UsherBackendsTOML renders [[backend]] tables; append it to UsherConfig.TOML().
func UsherBackendsTOML(bs []WeightedBackend) string {
	var sb strings.Builder
	for _, b := range bs {
		fmt.Fprintf(&sb, "\n[[backend]]\naddress = %s\nweight = %d\n", strconv.Quote(b.Address), b.Weight)
	}
	return sb.String()
}

// UsherUserHash is the routing part of `usher status --json USER`.
type UsherUserHash struct {
	User        string `json:"user"`
	Key         string `json:"key"`
	Hash        uint32 `json:"hash"`
	HashBackend string `json:"hash_backend"`
}

// UserHashCLI runs `usher status --json -- USER`.
func (u *Usher) UserHashCLI(user string) (*UsherUserHash, error) {
	out, err := u.CLI([]string{"status"}, "--json", "--", user)
	if err != nil {
		return nil, err
	}
	var st UsherUserHash
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("usher status --json %q: %w in %q", user, err, out)
	}
	return &st, nil
}

// ErrUsherNotFound is returned by UsherAPI.UserHash when the admin API answers 404.
var ErrUsherNotFound = errors.New("usher admin api: 404 not found")

// UsherAPI asks usher's admin socket directly, over the same HTTP endpoint
// `usher status USER` uses (GET /v1/users/{user}, the name path-escaped like
// the CLI's admin.UserPath), without starting a process per user.
type UsherAPI struct {
	hc *http.Client
}

// NewUsherAPI returns a client of the admin socket at path.
func NewUsherAPI(path string) *UsherAPI {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &UsherAPI{hc: &http.Client{
		Transport: tr,
		Timeout:   10 * time.Second,
		// A redirect means the name did not survive path cleaning; report it.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// Close drops idle connections.
func (a *UsherAPI) Close() { a.hc.CloseIdleConnections() }

// UserHash fetches GET /v1/users/{user}.
func (a *UsherAPI) UserHash(user string) (*UsherUserHash, error) {
	resp, err := a.hc.Get("http://usher/v1/users/" + url.PathEscape(user))
	if err != nil {
		return nil, fmt.Errorf("usher admin api: user %q: %w", user, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("usher admin api: user %q: %w", user, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("user %q: %w", user, ErrUsherNotFound)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("usher admin api: user %q: %s: %q", user, resp.Status, body)
	}
	var st UsherUserHash
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("usher admin api: user %q: %w in %q", user, err, body)
	}
	return &st, nil
}
