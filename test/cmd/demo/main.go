// Command demo runs usher in front of real Dovecot backends for `make demo`:
// it starts the backends with the e2e harness (package test), starts a usher
// binary in front of them (IMAP, POP3, LMTP on TCP and on a UNIX socket,
// ManageSieve), writes pid files and a ready file with connection
// instructions into its run directory, and keeps running until SIGTERM or
// SIGINT, when it stops everything it started. test/scripts/demo.sh drives it.
//
// Invariants: every process it starts is a child in its own process group
// with a parent-death signal, so even a killed demo leaves nothing running;
// the ready file exists only while everything is up.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/usher-mail/usher/test"
)

// options are the command-line flags.
type options struct {
	dir, usherBin, imapAddr, pop3Addr, firstIP string
	lmtpAddr, lmtpSocket, sieveAddr            string
	backends, users                            int
}

func main() {
	var o options
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	fs.StringVar(&o.dir, "dir", "/tmp/usher-demo/run", "run directory (configs, logs, Maildirs, pid files)")
	fs.StringVar(&o.usherBin, "usher", "", "usher binary (required)")
	fs.StringVar(&o.imapAddr, "imap", "127.0.0.1:10143", "usher IMAP listener")
	fs.StringVar(&o.pop3Addr, "pop3", "127.0.0.1:10110", "usher POP3 listener")
	fs.StringVar(&o.lmtpAddr, "lmtp", "127.0.0.1:10024", "usher LMTP listener (TCP)")
	fs.StringVar(&o.lmtpSocket, "lmtp-socket", "", "usher LMTP listener (UNIX socket path; default DIR/lmtp.sock)")
	fs.StringVar(&o.sieveAddr, "sieve", "127.0.0.1:14190", "usher ManageSieve listener")
	fs.StringVar(&o.firstIP, "first-ip", "127.0.1.1", "address of the first Dovecot backend")
	fs.IntVar(&o.backends, "backends", 3, "number of Dovecot backends")
	fs.IntVar(&o.users, "users", 50, "users user1@example.com … userN@example.com")
	_ = fs.Parse(os.Args[1:])
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(o, log); err != nil {
		log.Error("demo failed", "err", err)
		os.Exit(1)
	}
}

func run(o options, log *slog.Logger) error {
	if o.usherBin == "" {
		return fmt.Errorf("run demo: -usher is required")
	}
	if err := test.DovecotAvailable(); err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	if err := os.MkdirAll(o.dir, 0o755); err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	if o.lmtpSocket == "" {
		o.lmtpSocket = filepath.Join(o.dir, "lmtp.sock")
	}
	if !filepath.IsAbs(o.lmtpSocket) {
		return fmt.Errorf("run demo: -lmtp-socket %q is not an absolute path", o.lmtpSocket)
	}
	if err := os.WriteFile(filepath.Join(o.dir, "example.sieve"), []byte(exampleSieve), 0o644); err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	ready := filepath.Join(o.dir, "ready")
	_ = os.Remove(ready)

	// Signals arriving during start-up still lead to a clean stop below.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	b, err := test.StartBackends(test.BackendOptions{
		N: o.backends, Dir: filepath.Join(o.dir, "dovecot"), FirstIP: o.firstIP, Users: o.users,
	})
	if err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	defer func() {
		if err := b.Close(); err != nil {
			log.Error("stop backends", "err", err)
		}
		log.Info("backends stopped")
	}()
	log.Info("backends started", "backend", strings.Join(b.Addrs(), ","))
	for _, user := range b.Users() {
		msg := fmt.Sprintf("From: usher demo <demo@example.com>\r\nTo: %s\r\nSubject: Welcome to the usher demo\r\n"+
			"Date: %s\r\n\r\nHello %s, this message was dropped into your Maildir by the demo.\r\n",
			user, time.Now().Format(time.RFC1123Z), user)
		if _, err := b.Deliver(user, []byte(msg)); err != nil {
			return fmt.Errorf("run demo: %w", err)
		}
	}

	cfg := test.UsherConfig{
		IMAPAddr:    o.imapAddr,
		POP3Addr:    o.pop3Addr,
		ListenerTLS: "starttls",
		Cert:        b.Certs().CertFile,
		Key:         b.Certs().KeyFile,
		Backends:    b.Addrs(),
		Socket:      filepath.Join(o.dir, "usher-admin.sock"),
		UserExpire:  "15m",
		Services: []test.UsherService{
			// LMTP comes from the local MTA: no TLS, loopback only (the
			// default allow list), plus a UNIX socket as Postfix's
			// lmtp:unix: transport uses.
			{Name: "lmtp", RecipientDelimiter: "+", Listeners: []test.UsherListener{
				{Address: o.lmtpAddr}, {Address: "unix:" + o.lmtpSocket},
			}},
			{Name: "managesieve", Listeners: []test.UsherListener{
				{Address: o.sieveAddr, TLS: "starttls", Cert: b.Certs().CertFile, Key: b.Certs().KeyFile},
			}},
		},
	}
	u, err := test.LaunchUsher(test.UsherOptions{Bin: o.usherBin, Config: cfg.TOML(), Dir: o.dir})
	if err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	defer func() {
		if err := u.Stop(); err != nil {
			log.Error("stop usher", "err", err)
		}
		log.Info("usher stopped")
	}()
	log.Info("usher started", "imap", o.imapAddr, "pop3", o.pop3Addr, "lmtp", o.lmtpAddr,
		"lmtp_socket", o.lmtpSocket, "managesieve", o.sieveAddr)

	if err := writePIDs(o.dir, b, u); err != nil {
		return err
	}
	defer removePIDs(o.dir)
	if err := os.WriteFile(ready, []byte(instructions(o, b, u)), 0o644); err != nil {
		return fmt.Errorf("run demo: %w", err)
	}
	defer os.Remove(ready)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case s := <-sigs:
			log.Info("stopping", "signal", s.String())
			return nil
		case <-tick.C:
			if up, err := u.Running(); !up {
				return fmt.Errorf("run demo: usher exited (%v); see %s", err, u.LogPath())
			}
		}
	}
}

// writePIDs leaves pid files for demo.sh's fallback stop: usher.pid and
// dovecot-bN.pid (each pid is also the process group id).
func writePIDs(dir string, b *test.Backends, u *test.Usher) error {
	files := map[string]int{"usher.pid": u.PID()}
	for i := range b.N() {
		files[fmt.Sprintf("dovecot-b%d.pid", i+1)] = b.MasterPID(i)
	}
	for name, pid := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
	}
	return nil
}

func removePIDs(dir string) {
	names, _ := filepath.Glob(filepath.Join(dir, "*.pid"))
	for _, n := range names {
		if filepath.Base(n) != "demo.pid" {
			os.Remove(n)
		}
	}
}

// exampleSieve is DIR/example.sieve, for the sieve-connect example: it files
// messages with "[sorted]" in the subject into the folder Sorted.
const exampleSieve = `require ["fileinto", "mailbox"];
if header :contains "subject" "[sorted]" {
  fileinto :create "Sorted";
}
`

// splitHostPort splits "host:port"; a malformed address stays the host.
func splitHostPort(addr string) (string, string) {
	if h, p, err := net.SplitHostPort(addr); err == nil {
		return h, p
	}
	return addr, ""
}

// instructions is the text demo.sh prints once everything is up.
func instructions(o options, b *test.Backends, u *test.Usher) string {
	var sb strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&sb, format+"\n", args...) }
	users, pass, ca, bin, sock := b.Users(), b.Password(), b.Certs().CAFile, o.usherBin, u.Socket()
	w("usher demo is running.")
	w("")
	w("  usher IMAP  %s  (STARTTLS offered; plaintext login allowed from 127.0.0.0/8)", o.imapAddr)
	w("  usher POP3  %s  (STLS offered)", o.pop3Addr)
	w("  usher LMTP  %s and unix:%s  (recipient_delimiter \"+\")", o.lmtpAddr, o.lmtpSocket)
	w("  usher ManageSieve %s  (STARTTLS offered)", o.sieveAddr)
	w("  backends    %s  (Dovecot: IMAP 143, POP3 110, LMTP 24, ManageSieve 4190)", strings.Join(b.Addrs(), " "))
	w("  users       %s … %s and %s, password %q", users[0], users[o.users-1], strings.Join(users[o.users:], ", "), pass)
	w("")
	w("Try:")
	w("  curl -s imap://%s/ -u user1@example.com:%s", o.imapAddr, pass)
	w("  curl -s 'imap://%s/INBOX;UID=1' -u user1@example.com:%s   # the welcome message", o.imapAddr, pass)
	w("  curl -s pop3://%s/1 -u user2@example.com:%s", o.pop3Addr, pass)
	w("  openssl s_client -quiet -starttls imap -connect %s -CAfile %s", o.imapAddr, ca)
	w("      then: a LOGIN user1@example.com %s / b SELECT INBOX / c LOGOUT", pass)
	w("  openssl s_client -quiet -starttls pop3 -connect %s -CAfile %s", o.pop3Addr, ca)
	lhost, lport := splitHostPort(o.lmtpAddr)
	shost, sport := splitHostPort(o.sieveAddr)
	w("  swaks --protocol LMTP --server %s --port %s --from demo@example.net \\", lhost, lport)
	w("        --to user1@example.com,user2@example.com,user3+news@example.com --header 'Subject: via usher'")
	w("      (one 250 per recipient after DATA; each user's backend delivers: grep 'saved mail' in the Dovecot logs)")
	w("  swaks --protocol LMTP --socket %s --to user4@example.com", o.lmtpSocket)
	w("  sieve-connect --server %s --port %s --tlscafile %s --user user1@example.com --list", shost, sport, ca)
	w("  sieve-connect --server %s --port %s --tlscafile %s --user user1@example.com \\", shost, sport, ca)
	w("        --upload --localsieve %s --remotesieve demo", filepath.Join(o.dir, "example.sieve"))
	w("  sieve-connect --server %s --port %s --tlscafile %s --user user1@example.com --activate --remotesieve demo", shost, sport, ca)
	w("      then: swaks --protocol LMTP --server %s --port %s --to user1@example.com --header 'Subject: [sorted] hi'", lhost, lport)
	w("      and:  curl -s 'imap://%s/Sorted' -u user1@example.com:%s -X 'FETCH 1:* (ENVELOPE)'", o.imapAddr, pass)
	w("      (sieve-connect asks for the password; install it with apt-get install sieve-connect)")
	w("  %s status --socket %s                    # backends, users, sessions", bin, sock)
	w("  %s status --socket %s user1@example.com  # where user1 is pinned", bin, sock)
	w("")
	w("Logs:")
	w("  usher    %s", u.LogPath())
	for i := range b.N() {
		w("  dovecot  %s", b.LogPath(i))
	}
	w("  Maildirs %s", b.MailRoot())
	w("")
	w("Stop with: make demo-stop   (or test/scripts/demo.sh stop)")
	return sb.String()
}
