package testutil

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// Client is the test's side of a line-protocol connection. Every read and
// write has a deadline of Timeout; a failure fails the test at once.
type Client struct {
	T       testing.TB
	Conn    net.Conn
	R       *bufio.Reader
	Timeout time.Duration
}

// NewClient returns a Client on c with DefaultTimeout.
func NewClient(t testing.TB, c net.Conn) *Client {
	return &Client{T: t, Conn: c, R: bufio.NewReader(c), Timeout: DefaultTimeout}
}

// Write sends s as it is.
func (c *Client) Write(s string) {
	c.T.Helper()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.Timeout))
	if _, err := io.WriteString(c.Conn, s); err != nil {
		c.T.Fatalf("client write: %v", err)
	}
}

// Send sends each line followed by CRLF, in one write.
func (c *Client) Send(lines ...string) {
	c.T.Helper()
	c.Write(strings.Join(lines, "\r\n") + "\r\n")
}

// Line reads one line, which must end with CRLF, and returns it without.
func (c *Client) Line() string {
	c.T.Helper()
	_ = c.Conn.SetReadDeadline(time.Now().Add(c.Timeout))
	l, err := c.R.ReadString('\n')
	if err != nil {
		c.T.Fatalf("client read: %v (got %q)", err, l)
	}
	if !strings.HasSuffix(l, "\r\n") {
		c.T.Fatalf("line %q not ended by CRLF", l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// Expect reads one line and checks that it is want.
func (c *Client) Expect(want string) {
	c.T.Helper()
	if got := c.Line(); got != want {
		c.T.Fatalf("got %q, want %q", got, want)
	}
}

// ExpectPrefix reads one line, checks its prefix and returns it.
func (c *Client) ExpectPrefix(prefix string) string {
	c.T.Helper()
	got := c.Line()
	if !strings.HasPrefix(got, prefix) {
		c.T.Fatalf("got %q, want prefix %q", got, prefix)
	}
	return got
}

// ExpectClosed checks that the peer closed the connection: the next read
// fails, and not by the deadline.
func (c *Client) ExpectClosed() {
	c.T.Helper()
	_ = c.Conn.SetReadDeadline(time.Now().Add(c.Timeout))
	l, err := c.R.ReadString('\n')
	if err == nil {
		c.T.Fatalf("got %q, want connection closed", l)
	}
	if IsTimeout(err) {
		c.T.Fatalf("connection still open (read %q)", l)
	}
}

// StartTLS runs the client's TLS handshake on the connection, trusting pool
// and verifying 127.0.0.1, and reads from the TLS layer from then on.
func (c *Client) StartTLS(pool *x509.CertPool) {
	c.T.Helper()
	tc := tls.Client(c.Conn, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	_ = tc.SetDeadline(time.Now().Add(c.Timeout))
	if err := tc.Handshake(); err != nil {
		c.T.Fatalf("client TLS handshake: %v", err)
	}
	_ = tc.SetDeadline(time.Time{})
	c.Conn, c.R = tc, bufio.NewReader(tc)
}

// IsTimeout reports whether err is a network timeout.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// WaitFor polls cond until it holds, failing the test after d.
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
