package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// testMessage is a small RFC 5322 message with a unique subject.
func testMessage(subject string) []byte {
	return []byte(fmt.Sprintf("From: e2e@example.com\r\nTo: someone@example.com\r\nSubject: %s\r\nMessage-ID: <%s@e2e.example>\r\n\r\nBody of %s.\r\n",
		subject, strings.ReplaceAll(subject, " ", "-"), subject))
}

func caPool(t testing.TB, b *Backends) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile(b.Certs().CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no CA certificate in", b.Certs().CAFile)
	}
	return pool
}

// TestBackendsDirect checks the harness itself, without usher: every backend
// serves IMAP and POP3 with the shared users, storage is shared, STARTTLS
// works with the harness CA, logs name who served a login, a backend can be
// restarted, and Close leaves no process and no port behind.
func TestBackendsDirect(t *testing.T) {
	b := NewBackends(t, 3)
	user, pass := "user1@example.com", b.Password()

	// curl: LIST on backend 0.
	if _, err := exec.LookPath("curl"); err == nil {
		mark := b.Mark()
		out, err := exec.Command("curl", "-sS", "--max-time", "10", "imap://"+b.HostPort(0, PortIMAP)+"/", "-u", user+":"+pass).CombinedOutput()
		if err != nil {
			t.Fatalf("curl LIST on backend 0: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "INBOX") {
			t.Fatalf("curl LIST on backend 0: no INBOX in %q", out)
		}
		if who, err := b.WhoServed(mark, user); err != nil || who != 0 {
			t.Fatalf("curl login on backend 0 logged by backend %d: %v", who, err)
		}
	}

	// APPEND via backend 0 is visible via backend 1: the Maildir is shared.
	subject := fmt.Sprintf("direct %d", time.Now().UnixNano())
	c0, err := DialIMAP(b.HostPort(0, PortIMAP))
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	if err := c0.Login(user, pass); err != nil {
		t.Fatal(err)
	}
	if r, err := c0.Append("INBOX", testMessage(subject)); err != nil || r.Status != "OK" {
		t.Fatalf("APPEND on backend 0: %+v %v", r, err)
	}
	c1, err := DialIMAP(b.HostPort(1, PortIMAP))
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	if err := c1.Login(user, pass); err != nil {
		t.Fatal(err)
	}
	if r, err := c1.Cmd("SELECT INBOX"); err != nil || r.Status != "OK" {
		t.Fatalf("SELECT on backend 1: %+v %v", r, err)
	}
	r, err := c1.Cmd("UID SEARCH HEADER Subject %s", Quote(subject))
	if err != nil || r.Status != "OK" || len(r.Untagged) == 0 || strings.TrimSpace(r.Untagged[0]) == "* SEARCH" {
		t.Fatalf("backend 1 does not see the message appended on backend 0: %+v %v", r, err)
	}

	// A message put straight into new/ is seen by POP3 on backend 2.
	if _, err := b.Deliver("user2@example.com", testMessage("dropped")); err != nil {
		t.Fatal(err)
	}
	p, err := DialPOP3(b.HostPort(2, PortPOP3))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login("user2@example.com", pass); err != nil {
		t.Fatal(err)
	}
	if stat, err := p.Cmd("STAT"); err != nil || !strings.HasPrefix(stat, "+OK 1 ") {
		t.Fatalf("POP3 STAT on backend 2 = %q, %v; want 1 message", stat, err)
	}
	lines, err := p.Multi("RETR 1")
	if err != nil || !strings.Contains(strings.Join(lines, "\n"), "Subject: dropped") {
		t.Fatalf("POP3 RETR on backend 2: %v %q", err, lines)
	}
	p.Close()

	// The Python client script works against Dovecot itself, with and
	// without TLS, and reports refusals as exit 1.
	ca := b.Certs().CAFile
	res, code := python(t, "imap-roundtrip", b.Addr(0), "143", "user4@example.com", pass, "direct py", "--starttls", "--cafile", ca)
	if code != 0 || res["fetched_equal"] != true || res["tls"] != true {
		t.Errorf("mailclient.py imap-roundtrip on backend 0: exit %d %v", code, res)
	}
	res, code = python(t, "pop3", b.Addr(1), "110", "user2@example.com", pass, "--stls", "--cafile", ca, "--retr", "1")
	if code != 0 || res["count"] != float64(1) || !strings.Contains(fmt.Sprint(res["retr"]), "Subject: dropped") {
		t.Errorf("mailclient.py pop3 on backend 1: exit %d %v", code, res)
	}
	res, code = python(t, "pop3", b.Addr(1), "110", "user2@example.com", "wrong", "--source", "127.0.0.64")
	if code != 1 || !strings.Contains(fmt.Sprint(res["error"]), "-ERR") {
		t.Errorf("mailclient.py pop3 with a wrong password: exit %d %v", code, res)
	}
	if l := b.LogLines(nil, 1, "passwd-file(user2@example.com,127.0.0.64,", "Password mismatch"); len(l) != 1 {
		t.Errorf("backend 1 did not log the mismatch from 127.0.0.64: %q", l)
	}

	// STARTTLS with the harness CA; Dovecot logs TLS in the login line.
	mark := b.Mark()
	ct, err := DialIMAP(b.HostPort(2, PortIMAP))
	if err != nil {
		t.Fatal(err)
	}
	if err := ct.StartTLS(&tls.Config{RootCAs: caPool(t, b), ServerName: b.Addr(2)}); err != nil {
		t.Fatal(err)
	}
	if err := ct.Login("user3@example.com", pass); err != nil {
		t.Fatal(err)
	}
	ct.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := b.WaitLog(ctx, mark, 2, LoginNeedle("user3@example.com"), "TLS"); err != nil {
		t.Fatalf("no TLS login line: %v\n%s", err, strings.Join(b.LogLines(mark, 2), "\n"))
	}

	// A wrong password is refused and logged by auth.
	mark = b.Mark()
	cw, err := DialIMAP(b.HostPort(0, PortIMAP))
	if err != nil {
		t.Fatal(err)
	}
	if err := cw.Login(user, "wrong"); err == nil || !strings.Contains(err.Error(), "NO") {
		t.Fatalf("wrong password: err = %v, want NO", err)
	}
	cw.Close()
	if _, err := b.WaitLog(ctx, mark, 0, "Password mismatch"); err != nil {
		t.Fatal(err)
	}

	// LMTP delivers into the shared Maildir, running the user's Sieve script;
	// ManageSieve answers.
	if err := b.SetSieve("user10@example.com", "require [\"fileinto\", \"mailbox\"];\nfileinto :create \"Sieved\";\n"); err != nil {
		t.Fatal(err)
	}
	mark = b.Mark()
	if err := LMTPDeliver(b.HostPort(2, PortLMTP), "sender@example.net", []string{"user9@example.com", "user10@example.com"}, testMessage("via lmtp")); err != nil {
		t.Fatalf("LMTP delivery on backend 2: %v", err)
	}
	if files, _ := filepath.Glob(filepath.Join(b.MaildirPath("user9@example.com"), "new", "*")); len(files) != 1 {
		t.Errorf("LMTP delivery: %d files in user9's new/, want 1", len(files))
	}
	if files, _ := filepath.Glob(filepath.Join(b.MaildirPath("user10@example.com"), ".Sieved", "new", "*")); len(files) != 1 {
		t.Errorf("LMTP delivery through Sieve: %d files in user10's .Sieved/new/, want 1\n%s", len(files), strings.Join(b.LogLines(mark, 2), "\n"))
	}
	if conn, err := net.DialTimeout("tcp", b.HostPort(0, PortManageSieve), 5*time.Second); err != nil {
		t.Errorf("ManageSieve: %v", err)
	} else {
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		greet, _ := readLine(bufio.NewReader(conn))
		conn.Close()
		if !strings.Contains(greet, `"IMPLEMENTATION"`) {
			t.Errorf("ManageSieve greeting %q lacks IMPLEMENTATION (RFC 5804 §1.7)", greet)
		}
	}

	// Kill backend 1 (a crash: its session dies), then start it again.
	if err := b.Kill(1); err != nil {
		t.Fatal(err)
	}
	if r, err := c1.Cmd("NOOP"); err == nil {
		t.Errorf("session on backend 1 survived Kill: %+v", r)
	}
	if _, err := DialIMAP(b.HostPort(1, PortIMAP)); err == nil {
		t.Fatal("backend 1 still accepts connections after Kill")
	}
	if err := b.Start(1); err != nil {
		t.Fatal(err)
	}
	c1b, err := DialIMAP(b.HostPort(1, PortIMAP))
	if err != nil {
		t.Fatal(err)
	}
	if err := c1b.Login(user, pass); err != nil {
		t.Fatal(err)
	}
	c1b.Close()

	// Close leaves no process of any instance and frees the ports.
	var pgids []int
	for _, be := range b.bs {
		pgids = append(pgids, be.cmd.Process.Pid)
	}
	c0.Close()
	c1.Close()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for i, pg := range pgids {
		if err := syscall.Kill(-pg, 0); err == nil {
			t.Errorf("backend %d: process group %d still alive after Close", i, pg)
		}
		if err := portFree(b.Addr(i), PortIMAP); err != nil {
			t.Errorf("backend %d: %v", i, err)
		}
	}
	if _, err := os.Stat(b.Dir()); !os.IsNotExist(err) {
		t.Errorf("run dir %s not removed: %v", b.Dir(), err)
	}
}
