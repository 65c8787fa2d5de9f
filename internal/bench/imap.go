package bench

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
)

// imapClient is a minimal IMAP4rev1 client (RFC 3501): one command at a
// time, untagged responses skipped except the few it needs, literals
// discarded without buffering.
type imapClient struct {
	c      *conn
	tag    int
	exists int    // EXISTS count of the last SELECT
	idling string // tag of the IDLE command in progress, "" if none
}

// dialIMAP connects, reads the greeting and, with cfg.StartTLS, upgrades
// the connection (RFC 3501 §6.2.1).
func dialIMAP(ctx context.Context, cfg *dialConfig, target string) (*imapClient, error) {
	c, err := dial(ctx, cfg, target)
	if err != nil {
		return nil, err
	}
	m := &imapClient{c: c}
	if err := m.greeting(); err != nil {
		c.close()
		return nil, stepErr("greeting", err)
	}
	if cfg.StartTLS {
		if err := m.simple("STARTTLS"); err != nil {
			c.close()
			return nil, stepErr("starttls", err)
		}
		if err := c.upgradeTLS(ctx, cfg.TLS); err != nil {
			c.close()
			return nil, stepErr("starttls", err)
		}
	}
	return m, nil
}

// greeting reads the server greeting: "* OK" or "* PREAUTH"; "* BYE" is a
// refusal (RFC 3501 §7.1.5).
func (m *imapClient) greeting() error {
	if err := m.c.begin(); err != nil {
		return err
	}
	line, err := m.c.readLine()
	if err != nil {
		return err
	}
	switch {
	case hasPrefixFold(line, "* OK"), hasPrefixFold(line, "* PREAUTH"):
		return nil
	case hasPrefixFold(line, "* BYE"):
		return rejected(line)
	default:
		return protoErr("unexpected greeting %q", clip(string(line)))
	}
}

// send writes "TAG command\r\n" and returns the tag.
func (m *imapClient) send(command string) (string, error) {
	m.tag++
	tag := "a" + strconv.Itoa(m.tag)
	if err := m.c.begin(); err != nil {
		return "", err
	}
	return tag, m.c.writeString(tag + " " + command + "\r\n")
}

// simple runs a command that needs nothing from the untagged responses.
func (m *imapClient) simple(command string) error {
	tag, err := m.send(command)
	if err != nil {
		return err
	}
	return m.response(tag, nil)
}

// response reads until the tagged completion of tag and returns nil for
// OK. untagged, if set, sees the first line of every untagged response.
// Literals ({N} at the end of a line, RFC 3501 §4.3; {N+} too, RFC 7888)
// are discarded and the response continues on the next line.
func (m *imapClient) response(tag string, untagged func(line []byte) error) error {
	cont := false // the next line continues a response after a literal
	for {
		line, err := m.c.readLine()
		if err != nil {
			return err
		}
		first := !cont
		n, isLit := literalSuffix(line)
		cont = isLit
		if first && len(line) > len(tag) && string(line[:len(tag)]) == tag && line[len(tag)] == ' ' && !isLit {
			status := line[len(tag)+1:]
			if hasPrefixFold(status, "OK") {
				return nil
			}
			return rejected(line)
		}
		if first && untagged != nil && len(line) > 0 && line[0] == '*' {
			if err := untagged(line); err != nil {
				return err
			}
		}
		if first && len(line) > 0 && line[0] == '+' {
			return protoErr("unexpected continuation request %q", clip(string(line)))
		}
		if isLit {
			if err := m.c.discard(n); err != nil {
				return err
			}
		}
	}
}

// literalSuffix reports whether line ends with a literal announcement {N}
// or {N+} and returns N.
func literalSuffix(line []byte) (int64, bool) {
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, false
	}
	open := bytes.LastIndexByte(line, '{')
	if open < 0 {
		return 0, false
	}
	digits := strings.TrimSuffix(string(line[open+1:len(line)-1]), "+")
	if digits == "" || len(digits) > 12 {
		return 0, false
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// quote returns s as an IMAP quoted string (RFC 3501 §4.3). ParseUsers and
// the option checks keep CR, LF and NUL out of names and passwords.
func quote(s string) string {
	if !strings.ContainsAny(s, `"\`) {
		return `"` + s + `"`
	}
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// Login sends LOGIN (RFC 3501 §6.2.3).
func (m *imapClient) Login(user, pass string) error {
	return stepErr("login", m.simple("LOGIN "+quote(user)+" "+quote(pass)))
}

// Open selects INBOX.
func (m *imapClient) Open() error { return m.selectMailbox("INBOX") }

// selectMailbox sends SELECT and records the EXISTS count (RFC 3501 §6.3.1, §7.3.1).
func (m *imapClient) selectMailbox(mailbox string) error {
	tag, err := m.send("SELECT " + quote(mailbox))
	if err != nil {
		return stepErr("select", err)
	}
	m.exists = 0
	err = m.response(tag, func(line []byte) error {
		f := bytes.Fields(line)
		if len(f) == 3 && bytes.EqualFold(f[2], []byte("EXISTS")) {
			if n, err := strconv.Atoi(string(f[1])); err == nil && n >= 0 {
				m.exists = n
			}
		}
		return nil
	})
	return stepErr("select", err)
}

// Noop sends NOOP (RFC 3501 §6.1.2).
func (m *imapClient) Noop() error { return stepErr("noop", m.simple("NOOP")) }

// Idle sends IDLE and waits for the continuation request (RFC 2177 §3).
func (m *imapClient) Idle() error {
	tag, err := m.send("IDLE")
	if err != nil {
		return stepErr("idle", err)
	}
	for {
		line, err := m.c.readLine()
		if err != nil {
			return stepErr("idle", err)
		}
		switch {
		case len(line) > 0 && line[0] == '+':
			m.idling = tag
			return nil
		case bytes.HasPrefix(line, []byte(tag+" ")):
			return stepErr("idle", rejected(line))
		}
	}
}

// Done ends IDLE with DONE and reads the tagged completion (RFC 2177 §3).
func (m *imapClient) Done() error {
	if m.idling == "" {
		return nil
	}
	tag := m.idling
	m.idling = ""
	if err := m.c.begin(); err != nil {
		return stepErr("idle", err)
	}
	if err := m.c.writeString("DONE\r\n"); err != nil {
		return stepErr("idle", err)
	}
	return stepErr("idle", m.response(tag, nil))
}

// Append stores msg (CRLF lines) in mailbox with a synchronizing literal
// (RFC 3501 §6.3.11, §7.5).
func (m *imapClient) Append(mailbox string, msg []byte) error {
	tag, err := m.send("APPEND " + quote(mailbox) + " {" + strconv.Itoa(len(msg)) + "}")
	if err != nil {
		return stepErr("append", err)
	}
	for {
		line, err := m.c.readLine()
		if err != nil {
			return stepErr("append", err)
		}
		if len(line) > 0 && line[0] == '+' {
			break
		}
		if bytes.HasPrefix(line, []byte(tag+" ")) {
			return stepErr("append", rejected(line))
		}
	}
	if err := m.c.begin(); err != nil {
		return stepErr("append", err)
	}
	if err := m.c.write(msg); err != nil {
		return stepErr("append", err)
	}
	if err := m.c.writeString("\r\n"); err != nil {
		return stepErr("append", err)
	}
	return stepErr("append", m.response(tag, nil))
}

// FetchAll fetches BODY.PEEK[] of every message (RFC 3501 §6.4.5) and
// returns the number of FETCH responses and the bytes read.
func (m *imapClient) FetchAll() (msgs int, bytesRead int64, err error) {
	start := m.c.read
	tag, err := m.send("FETCH 1:* (BODY.PEEK[])")
	if err != nil {
		return 0, 0, stepErr("fetch", err)
	}
	err = m.response(tag, func(line []byte) error {
		f := bytes.Fields(line)
		if len(f) >= 3 && bytes.EqualFold(f[2], []byte("FETCH")) {
			msgs++
		}
		return nil
	})
	return msgs, m.c.read - start, stepErr("fetch", err)
}

// Logout sends LOGOUT and closes the connection. The server answers
// "* BYE" and then the tagged OK (RFC 3501 §6.1.3); a server that closes
// right after BYE is accepted too.
func (m *imapClient) Logout() error {
	defer m.c.close()
	if err := m.Done(); err != nil {
		return stepErr("logout", err)
	}
	tag, err := m.send("LOGOUT")
	if err != nil {
		return stepErr("logout", err)
	}
	bye := false
	err = m.response(tag, func(line []byte) error {
		if hasPrefixFold(line, "* BYE") {
			bye = true
		}
		return nil
	})
	if err != nil && bye && isClosed(err) {
		err = nil
	}
	return stepErr("logout", err)
}

// Close drops the connection without LOGOUT.
func (m *imapClient) Close() { m.c.close() }

// isClosed reports an orderly or abrupt close by the peer.
func isClosed(err error) bool {
	return strings.HasSuffix(errorKind(err), ":closed")
}

func hasPrefixFold(b []byte, prefix string) bool {
	return len(b) >= len(prefix) && strings.EqualFold(string(b[:len(prefix)]), prefix)
}

// errEmpty reports a mailbox with nothing to fetch.
var errEmpty = errors.New("mailbox is empty (use --setup to fill it)")
