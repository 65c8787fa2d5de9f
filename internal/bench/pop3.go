package bench

import (
	"context"
)

// pop3Client is a minimal POP3 client (RFC 1939): USER/PASS login, STAT,
// NOOP, QUIT, and STLS (RFC 2595 §4).
type pop3Client struct {
	c *conn
}

func dialPOP3(ctx context.Context, cfg *dialConfig, target string) (*pop3Client, error) {
	c, err := dial(ctx, cfg, target)
	if err != nil {
		return nil, err
	}
	p := &pop3Client{c: c}
	if err := c.begin(); err != nil {
		c.close()
		return nil, stepErr("greeting", err)
	}
	if _, err := p.status(); err != nil {
		c.close()
		return nil, stepErr("greeting", err)
	}
	if cfg.StartTLS {
		if _, err := p.cmd("STLS"); err != nil {
			c.close()
			return nil, stepErr("starttls", err)
		}
		if err := c.upgradeTLS(ctx, cfg.TLS); err != nil {
			c.close()
			return nil, stepErr("starttls", err)
		}
	}
	return p, nil
}

// status reads a single-line reply: +OK or -ERR (RFC 1939 §3).
func (p *pop3Client) status() ([]byte, error) {
	line, err := p.c.readLine()
	if err != nil {
		return nil, err
	}
	switch {
	case hasPrefixFold(line, "+OK"):
		return line, nil
	case hasPrefixFold(line, "-ERR"):
		return nil, rejected(line)
	default:
		return nil, protoErr("unexpected reply %q", clip(string(line)))
	}
}

func (p *pop3Client) cmd(command string) ([]byte, error) {
	if err := p.c.begin(); err != nil {
		return nil, err
	}
	if err := p.c.writeString(command + "\r\n"); err != nil {
		return nil, err
	}
	return p.status()
}

// Login sends USER and PASS (RFC 1939 §7).
func (p *pop3Client) Login(user, pass string) error {
	if _, err := p.cmd("USER " + user); err != nil {
		return stepErr("login", err)
	}
	_, err := p.cmd("PASS " + pass)
	return stepErr("login", err)
}

// Open sends STAT (RFC 1939 §5), the POP3 counterpart of SELECT INBOX.
func (p *pop3Client) Open() error {
	_, err := p.cmd("STAT")
	return stepErr("stat", err)
}

// Noop sends NOOP (RFC 1939 §5).
func (p *pop3Client) Noop() error {
	_, err := p.cmd("NOOP")
	return stepErr("noop", err)
}

// Logout sends QUIT and closes the connection (RFC 1939 §6).
func (p *pop3Client) Logout() error {
	defer p.c.close()
	_, err := p.cmd("QUIT")
	return stepErr("logout", err)
}

// Close drops the connection without QUIT.
func (p *pop3Client) Close() { p.c.close() }

// mailSession is what the login and idle workloads need of IMAP and POP3.
type mailSession interface {
	Login(user, pass string) error
	Open() error
	Noop() error
	Logout() error
	Close()
}

// dialSession connects with proto ("imap" or "pop3").
func dialSession(ctx context.Context, proto string, cfg *dialConfig, target string) (mailSession, error) {
	if proto == "pop3" {
		return dialPOP3(ctx, cfg, target)
	}
	return dialIMAP(ctx, cfg, target)
}
