package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"
)

// Client-side bounds. A reply line longer than maxReplyLine or a literal
// larger than maxLiteral fails the operation (and the connection).
const (
	maxReplyLine = 64 << 10
	maxLiteral   = 1 << 30
	// literalChunk is how much of a literal one deadline covers.
	literalChunk = 1 << 20
)

// dialConfig says how to reach a server.
type dialConfig struct {
	Timeout     time.Duration // dial, TLS handshake, and each operation
	TLS         *tls.Config   // for STARTTLS or implicit TLS; ServerName defaults to the target host
	ImplicitTLS bool          // TLS from the first byte (imaps, pop3s)
	StartTLS    bool          // upgrade with STARTTLS/STLS after the greeting
	Sources     []net.IP      // local addresses, used round robin; empty = the kernel's choice
	nextSource  atomic.Uint64
}

// conn is one client connection: bounded line reads, an explicit deadline
// per operation (begin), and a count of bytes read. Closing ctx (passed to
// dial) closes the connection, which unblocks any read or write.
type conn struct {
	raw     net.Conn
	br      *bufio.Reader
	timeout time.Duration
	host    string // for the TLS ServerName
	read    int64  // bytes consumed through readLine and discard
	stop    func() bool
}

// dial connects to target (host:port, /path or unix:/path) and, with
// cfg.ImplicitTLS, does the TLS handshake.
func dial(ctx context.Context, cfg *dialConfig, target string) (*conn, error) {
	network, addr := "tcp", target
	host := ""
	if isUnixTarget(target) {
		network, addr = "unix", strings.TrimPrefix(target, "unix:")
	} else if h, _, err := net.SplitHostPort(target); err == nil {
		host = h
	}
	d := net.Dialer{Timeout: cfg.Timeout}
	if len(cfg.Sources) > 0 && network == "tcp" {
		// Servers limit connections per client address (usher's
		// max_sessions_per_ip, Dovecot's mail_max_userip_connections);
		// several source addresses look like several clients.
		ip := cfg.Sources[(cfg.nextSource.Add(1)-1)%uint64(len(cfg.Sources))]
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	raw, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, stepErr("connect", err)
	}
	c := &conn{raw: raw, br: bufio.NewReaderSize(raw, maxReplyLine), timeout: cfg.Timeout, host: host}
	c.stop = context.AfterFunc(ctx, func() { raw.Close() })
	if cfg.ImplicitTLS {
		if err := c.upgradeTLS(ctx, cfg.TLS); err != nil {
			c.close()
			return nil, stepErr("connect", err)
		}
	}
	return c, nil
}

// begin starts an operation: reads and writes until the next begin must
// finish within the timeout.
func (c *conn) begin() error {
	if c.timeout <= 0 {
		return nil
	}
	if err := c.raw.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	return nil
}

// readLine returns the next line without CRLF (valid until the next read).
func (c *conn) readLine() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	c.read += int64(len(line))
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, protoErr("reply line longer than %d bytes", maxReplyLine)
		}
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// discard reads and drops an n-byte literal. Each 1 MiB gets a fresh
// deadline, so the timeout bounds stalls, not the transfer of a large literal.
func (c *conn) discard(n int64) error {
	if n < 0 || n > maxLiteral {
		return protoErr("literal of %d bytes (limit %d)", n, maxLiteral)
	}
	for n > 0 {
		chunk := min(n, literalChunk)
		if err := c.begin(); err != nil {
			return err
		}
		got, err := c.br.Discard(int(chunk))
		c.read += int64(got)
		n -= int64(got)
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) write(b []byte) error {
	_, err := c.raw.Write(b)
	return err
}

func (c *conn) writeString(s string) error {
	_, err := c.raw.Write([]byte(s))
	return err
}

// upgradeTLS starts TLS on the connection (after a STARTTLS reply, or
// right after connecting). Bytes the server sent after its STARTTLS reply
// would be read as if they came over TLS (the CVE-2011-0411 pattern), so
// they fail the upgrade.
func (c *conn) upgradeTLS(ctx context.Context, cfg *tls.Config) error {
	if c.br.Buffered() > 0 {
		return protoErr("server sent %d bytes after its STARTTLS reply", c.br.Buffered())
	}
	if cfg == nil {
		cfg = &tls.Config{}
	}
	if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
		cfg = cfg.Clone()
		cfg.ServerName = c.host
	}
	if err := c.begin(); err != nil {
		return err
	}
	tc := tls.Client(c.raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return &tlsError{err: err}
	}
	c.raw = tc
	c.br.Reset(tc)
	return nil
}

// close closes the connection (without a protocol goodbye).
func (c *conn) close() {
	c.stop()
	_ = c.raw.Close()
}
