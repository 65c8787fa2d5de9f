package bench

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"time"
)

// maxReplyLines bounds the lines of one multiline LMTP reply.
const maxReplyLines = 256

// lmtpClient is a minimal LMTP client (RFC 2033): LHLO, then lock-step
// MAIL/RCPT/DATA transactions, STARTTLS (RFC 3207) when asked.
type lmtpClient struct {
	c *conn
}

// reply is one SMTP-style reply: the code and the text of its last line.
type reply struct {
	code int
	line []byte
}

func (r reply) ok() bool { return r.code >= 200 && r.code < 300 }

func dialLMTP(ctx context.Context, cfg *dialConfig, target, helo string) (*lmtpClient, error) {
	c, err := dial(ctx, cfg, target)
	if err != nil {
		return nil, err
	}
	l := &lmtpClient{c: c}
	if err := l.expect("greeting", "", 220); err != nil {
		c.close()
		return nil, err
	}
	if err := l.expect("lhlo", "LHLO "+helo, 250); err != nil {
		c.close()
		return nil, err
	}
	if cfg.StartTLS {
		if err := l.expect("starttls", "STARTTLS", 220); err != nil {
			c.close()
			return nil, err
		}
		if err := c.upgradeTLS(ctx, cfg.TLS); err != nil {
			c.close()
			return nil, stepErr("starttls", err)
		}
		// RFC 3207 §4.2: the client must forget what it knew and say hello again.
		if err := l.expect("lhlo", "LHLO "+helo, 250); err != nil {
			c.close()
			return nil, err
		}
	}
	return l, nil
}

// readReply reads one reply, following "NNN-" continuation lines (RFC 5321 §4.2.1).
func (l *lmtpClient) readReply() (reply, error) {
	for range maxReplyLines {
		line, err := l.c.readLine()
		if err != nil {
			return reply{}, err
		}
		if len(line) < 3 {
			return reply{}, protoErr("short reply %q", clip(string(line)))
		}
		code, err := strconv.Atoi(string(line[:3]))
		if err != nil || code < 200 || code > 599 {
			return reply{}, protoErr("bad reply %q", clip(string(line)))
		}
		if len(line) > 3 && line[3] == '-' {
			continue
		}
		return reply{code: code, line: bytes.Clone(line)}, nil
	}
	return reply{}, protoErr("reply of more than %d lines", maxReplyLines)
}

// command sends command (unless empty) and reads the reply.
func (l *lmtpClient) command(command string) (reply, error) {
	if err := l.c.begin(); err != nil {
		return reply{}, err
	}
	if command != "" {
		if err := l.c.writeString(command + "\r\n"); err != nil {
			return reply{}, err
		}
	}
	return l.readReply()
}

// expect sends command and fails the step unless the reply has code want.
func (l *lmtpClient) expect(step, command string, want int) error {
	r, err := l.command(command)
	if err != nil {
		return stepErr(step, err)
	}
	if r.code != want {
		return stepErr(step, rejected(r.line))
	}
	return nil
}

// delivery is the outcome of one transaction.
type delivery struct {
	accepted  int           // RCPTs answered 2xx
	rejected  int           // RCPTs answered otherwise
	delivered int           // per-recipient DATA replies 2xx
	failed    int           // per-recipient DATA replies otherwise
	dataTime  time.Duration // DATA sent → last per-recipient reply
}

// Deliver runs MAIL, one RCPT per recipient, DATA with msg (already
// dot-stuffed, CRLF lines, without the final dot) and reads one reply per
// accepted recipient (RFC 2033 §4.2). A transaction with no accepted
// recipient is reset with RSET.
func (l *lmtpClient) Deliver(from string, rcpts []string, header, body []byte) (delivery, error) {
	var d delivery
	if err := l.expect("mail", "MAIL FROM:<"+from+">", 250); err != nil {
		return d, err
	}
	var lastRej error
	for _, r := range rcpts {
		rep, err := l.command("RCPT TO:<" + r + ">")
		if err != nil {
			return d, stepErr("rcpt", err)
		}
		if rep.ok() {
			d.accepted++
		} else {
			d.rejected++
			lastRej = rejected(rep.line)
		}
	}
	if d.accepted == 0 {
		if err := l.expect("rset", "RSET", 250); err != nil {
			return d, err
		}
		return d, stepErr("rcpt", lastRej)
	}
	t0 := time.Now()
	if err := l.expect("data", "DATA", 354); err != nil {
		return d, err
	}
	if err := l.c.begin(); err != nil {
		return d, stepErr("data", err)
	}
	bufs := net.Buffers{header, body, []byte(".\r\n")}
	if _, err := bufs.WriteTo(l.c.raw); err != nil {
		return d, stepErr("data", err)
	}
	var lastFail error
	for range d.accepted {
		if err := l.c.begin(); err != nil {
			return d, stepErr("data", err)
		}
		rep, err := l.readReply()
		if err != nil {
			return d, stepErr("data", err)
		}
		if rep.ok() {
			d.delivered++
		} else {
			d.failed++
			lastFail = rejected(rep.line)
		}
	}
	d.dataTime = time.Since(t0)
	if lastFail != nil {
		return d, stepErr("data", lastFail)
	}
	if lastRej != nil {
		return d, stepErr("rcpt", lastRej)
	}
	return d, nil
}

// Quit sends QUIT and closes the connection.
func (l *lmtpClient) Quit() error {
	defer l.c.close()
	return l.expect("quit", "QUIT", 221)
}

// Close drops the connection without QUIT.
func (l *lmtpClient) Close() { l.c.close() }
