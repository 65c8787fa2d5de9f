package bench

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestQuoteAndLiteralSuffix(t *testing.T) {
	for in, want := range map[string]string{
		`user1@example.com`: `"user1@example.com"`,
		`a"b\c`:             `"a\"b\\c"`,
		``:                  `""`,
	} {
		if got := quote(in); got != want {
			t.Errorf("quote(%q) = %s, want %s", in, got, want)
		}
	}
	for in, want := range map[string]int64{
		"* 1 FETCH (BODY[] {12}": 12,
		"* 1 FETCH (BODY[] {0}":  0,
		"* LIST () \"/\" {5+}":   5,
	} {
		if n, ok := literalSuffix([]byte(in)); !ok || n != want {
			t.Errorf("literalSuffix(%q) = %d, %v", in, n, ok)
		}
	}
	for _, in := range []string{"a OK done", "* OK {x}", "{}", "* x {-1}", "* x {9999999999999}", "}"} {
		if _, ok := literalSuffix([]byte(in)); ok {
			t.Errorf("literalSuffix(%q): want no literal", in)
		}
	}
}

// pipeIMAP returns a client whose server side writes script and then,
// with hangUp, closes; what the client sends is discarded.
func pipeIMAP(t *testing.T, script string, hangUp bool) *imapClient {
	t.Helper()
	cli, srv := net.Pipe()
	go func() {
		go io.Copy(io.Discard, srv)
		_, _ = srv.Write([]byte(script))
		if hangUp {
			srv.Close()
		}
	}()
	t.Cleanup(func() { cli.Close() })
	return &imapClient{c: &conn{raw: cli, br: bufio.NewReaderSize(cli, maxReplyLine), timeout: 2 * time.Second, stop: func() bool { return true }}}
}

func TestIMAPResponses(t *testing.T) {
	// Literals inside untagged responses are skipped, even when they hold
	// something that looks like the tagged completion.
	script := "* 3 EXISTS\r\n* LIST () \"/\" {12}\r\na1 OK fake\r\n\r\n* 1 FETCH (BODY[] {5+}\r\nhello)\r\na1 OK [READ-WRITE] done\r\n"
	m := pipeIMAP(t, script, false)
	if err := m.selectMailbox("INBOX"); err != nil || m.exists != 3 {
		t.Fatalf("select: %v exists %d", err, m.exists)
	}
	if m.c.read != int64(len(script)) {
		t.Errorf("bytes read %d", m.c.read)
	}

	m = pipeIMAP(t, "a1 NO [AUTHENTICATIONFAILED] nope\r\n", false)
	if err := m.Login("u", "p"); errorKind(err) != "login:rejected" || !strings.Contains(err.Error(), "AUTHENTICATIONFAILED") {
		t.Errorf("NO: %v (%s)", err, errorKind(err))
	}
	m = pipeIMAP(t, "+ go ahead\r\n", false)
	if err := m.Noop(); errorKind(err) != "noop:protocol" {
		t.Errorf("stray continuation: %v", err)
	}
	// A server that closes right after BYE logs out fine.
	m = pipeIMAP(t, "* BYE bye\r\n", true)
	if err := m.Logout(); err != nil {
		t.Errorf("logout after BYE+close: %v", err)
	}
	m = pipeIMAP(t, "", true)
	if err := m.Logout(); errorKind(err) != "logout:closed" {
		t.Errorf("logout without BYE: %v", err)
	}
	m = pipeIMAP(t, "* 1 FETCH (BODY[] {99999999999}\r\n", false)
	if _, _, err := m.FetchAll(); errorKind(err) != "fetch:protocol" {
		t.Errorf("huge literal: %v (%s)", err, errorKind(err))
	}
	// STARTTLS with plaintext queued behind the reply is refused.
	m = pipeIMAP(t, "a1 OK begin TLS\r\n* OK injected\r\n", false)
	if err := m.simple("STARTTLS"); err != nil {
		t.Fatal(err)
	}
	if err := m.c.upgradeTLS(t.Context(), nil); err == nil || !strings.Contains(err.Error(), "after its STARTTLS reply") {
		t.Errorf("injection: %v", err)
	}
}
