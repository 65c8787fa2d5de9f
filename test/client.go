package test

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/pires/go-proxyproto"
)

// Limits of the test clients: a server that sends more is broken.
const (
	clientMaxLine    = 64 << 10
	clientMaxLiteral = 16 << 20
	clientTimeout    = 10 * time.Second
)

// IMAPClient is a minimal IMAP4rev1 client (RFC 3501) for tests: it sends
// tagged commands and collects the untagged responses up to the tagged one.
type IMAPClient struct {
	conn     net.Conn
	br       *bufio.Reader
	tag      int
	Greeting string        // the server greeting, "* OK …"
	Timeout  time.Duration // per command; default 10s
}

// IMAPResponse is the answer to one command.
type IMAPResponse struct {
	Untagged []string // untagged lines, literals inlined
	Status   string   // "OK", "NO" or "BAD"
	Text     string   // the tagged line after the status
}

// dialFrom connects to addr from the local IP from ("" = any).
func dialFrom(from, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: clientTimeout}
	if from != "" {
		ip := net.ParseIP(from)
		if ip == nil {
			return nil, fmt.Errorf("bad local address %q", from)
		}
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	return d.Dial("tcp", addr)
}

// DialIMAP connects to addr and reads the greeting.
func DialIMAP(addr string) (*IMAPClient, error) { return DialIMAPFrom("", addr) }

// DialIMAPFrom connects to addr from local IP from (e.g. "127.0.0.66", so the
// backend can tell the client apart) and reads the greeting.
func DialIMAPFrom(from, addr string) (*IMAPClient, error) {
	conn, err := dialFrom(from, addr)
	if err != nil {
		return nil, fmt.Errorf("dial imap %s: %w", addr, err)
	}
	return NewIMAPClient(conn)
}

// NewIMAPClient reads the greeting on an open connection (one that carried
// a PROXY header first, say) and returns the client; it closes conn on error.
func NewIMAPClient(conn net.Conn) (*IMAPClient, error) {
	c := &IMAPClient{conn: conn, br: bufio.NewReader(conn), Timeout: clientTimeout}
	_ = conn.SetReadDeadline(time.Now().Add(c.Timeout))
	// RFC 3501 §7.1: the greeting is an untagged OK, PREAUTH or BYE.
	g, err := readLine(c.br)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("imap %s greeting: %w", conn.RemoteAddr(), err)
	}
	if !strings.HasPrefix(g, "* OK") {
		conn.Close()
		return nil, fmt.Errorf("imap %s greeting: %q", conn.RemoteAddr(), g)
	}
	c.Greeting = g
	return c, nil
}

// readLine reads one CRLF line of at most clientMaxLine bytes, without CRLF.
func readLine(br *bufio.Reader) (string, error) {
	var sb strings.Builder
	for {
		frag, isPrefix, err := br.ReadLine()
		if err != nil {
			return "", fmt.Errorf("read line: %w", err)
		}
		sb.Write(frag)
		if sb.Len() > clientMaxLine {
			return "", errors.New("read line: line too long")
		}
		if !isPrefix {
			return sb.String(), nil
		}
	}
}

// readResponseLine reads one response line and inlines any literals
// (RFC 3501 §4.3: "{n}" at the end of a line is followed by n octets).
func (c *IMAPClient) readResponseLine() (string, error) { return readLiteralLine(c.br) }

// readLiteralLine reads one line with its literals inlined (IMAP and
// ManageSieve share the "{n}" CRLF octets syntax).
func readLiteralLine(br *bufio.Reader) (string, error) {
	var sb strings.Builder
	for {
		line, err := readLine(br)
		if err != nil {
			return "", err
		}
		sb.WriteString(line)
		n, ok := literalSize(line)
		if !ok {
			return sb.String(), nil
		}
		if n > clientMaxLiteral {
			return "", fmt.Errorf("read literal: %d bytes is too big", n)
		}
		sb.WriteString("\r\n")
		if _, err := io.CopyN(&sb, br, n); err != nil {
			return "", fmt.Errorf("read literal: %w", err)
		}
	}
}

func literalSize(line string) (int64, bool) {
	if !strings.HasSuffix(line, "}") {
		return 0, false
	}
	open := strings.LastIndexByte(line, '{')
	if open < 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSuffix(line[open+1:len(line)-1], "+"), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// Cmd sends one command (without tag and CRLF) and reads to its tagged answer.
// A NO or BAD answer is returned as a response, not as an error.
func (c *IMAPClient) Cmd(format string, args ...any) (*IMAPResponse, error) {
	c.tag++
	tag := fmt.Sprintf("t%d", c.tag)
	cmd := fmt.Sprintf(format, args...)
	_ = c.conn.SetDeadline(time.Now().Add(c.Timeout))
	if _, err := fmt.Fprintf(c.conn, "%s %s\r\n", tag, cmd); err != nil {
		return nil, fmt.Errorf("imap send %s: %w", verb(cmd), err)
	}
	return c.readTagged(tag, verb(cmd))
}

func (c *IMAPClient) readTagged(tag, what string) (*IMAPResponse, error) {
	r := &IMAPResponse{}
	for {
		line, err := c.readResponseLine()
		if err != nil {
			return r, fmt.Errorf("imap %s: %w", what, err)
		}
		if rest, ok := strings.CutPrefix(line, tag+" "); ok {
			r.Status, r.Text, _ = strings.Cut(rest, " ")
			return r, nil
		}
		r.Untagged = append(r.Untagged, line)
	}
}

func verb(cmd string) string {
	v, _, _ := strings.Cut(cmd, " ")
	return strings.ToUpper(v)
}

// Quote makes an IMAP quoted string (RFC 3501 §4.3).
func Quote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// Login sends LOGIN and returns an error unless the answer is OK.
func (c *IMAPClient) Login(user, pass string) error {
	r, err := c.Cmd("LOGIN %s %s", Quote(user), Quote(pass))
	if err != nil {
		return err
	}
	if r.Status != "OK" {
		return fmt.Errorf("imap login %s: %s %s", user, r.Status, r.Text)
	}
	return nil
}

// Append stores msg in mailbox with APPEND (RFC 3501 §6.3.11), sending the
// message as a synchronizing literal: it waits for the "+" continuation
// (§7.5) before the octets.
func (c *IMAPClient) Append(mailbox string, msg []byte) (*IMAPResponse, error) {
	c.tag++
	tag := fmt.Sprintf("t%d", c.tag)
	_ = c.conn.SetDeadline(time.Now().Add(c.Timeout))
	if _, err := fmt.Fprintf(c.conn, "%s APPEND %s {%d}\r\n", tag, Quote(mailbox), len(msg)); err != nil {
		return nil, fmt.Errorf("imap send APPEND: %w", err)
	}
	line, err := readLine(c.br)
	if err != nil {
		return nil, fmt.Errorf("imap APPEND continuation: %w", err)
	}
	if !strings.HasPrefix(line, "+") {
		r := &IMAPResponse{}
		if rest, ok := strings.CutPrefix(line, tag+" "); ok {
			r.Status, r.Text, _ = strings.Cut(rest, " ")
			return r, nil
		}
		return nil, fmt.Errorf("imap APPEND: expected continuation, got %q", line)
	}
	if _, err := c.conn.Write(append(append([]byte(nil), msg...), '\r', '\n')); err != nil {
		return nil, fmt.Errorf("imap send APPEND literal: %w", err)
	}
	return c.readTagged(tag, "APPEND")
}

// StartTLS sends STARTTLS (RFC 3501 §6.2.1) and performs the handshake.
func (c *IMAPClient) StartTLS(cfg *tls.Config) error {
	r, err := c.Cmd("STARTTLS")
	if err != nil {
		return err
	}
	if r.Status != "OK" {
		return fmt.Errorf("imap starttls: %s %s", r.Status, r.Text)
	}
	if c.br.Buffered() > 0 {
		return errors.New("imap starttls: server sent data after OK (injection)")
	}
	tc := tls.Client(c.conn, cfg)
	_ = tc.SetDeadline(time.Now().Add(c.Timeout))
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("imap starttls handshake: %w", err)
	}
	c.conn, c.br = tc, bufio.NewReader(tc)
	return nil
}

// Close sends LOGOUT (best effort) and closes the connection.
func (c *IMAPClient) Close() error {
	_ = c.conn.SetDeadline(time.Now().Add(2 * time.Second))
	_, _ = fmt.Fprintf(c.conn, "z LOGOUT\r\n")
	_, _ = io.Copy(io.Discard, io.LimitReader(c.br, 4096))
	return c.conn.Close()
}

// WaitClosed waits up to timeout for the server to close the connection
// (EOF or reset) without sending anything itself, and returns the lines
// the server sent before closing (an IMAP "* BYE …", say). It fails if the
// connection is still open after timeout.
func (c *IMAPClient) WaitClosed(timeout time.Duration) ([]string, error) {
	return waitClosed(c.conn, c.br, timeout)
}

// waitClosed reads lines until the peer closes the connection or timeout.
func waitClosed(conn net.Conn, br *bufio.Reader, timeout time.Duration) ([]string, error) {
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	var lines []string
	for {
		line, err := readLine(br)
		var ne net.Error
		switch {
		case err == nil:
			if len(lines) >= 100 {
				return lines, errors.New("wait for close: more than 100 lines")
			}
			lines = append(lines, line)
			continue
		case errors.As(err, &ne) && ne.Timeout():
			return lines, fmt.Errorf("wait for close: connection still open after %v", timeout)
		default: // io.EOF, connection reset: closed
			return lines, nil
		}
	}
}

// POP3Client is a minimal POP3 client (RFC 1939) for tests.
type POP3Client struct {
	conn     net.Conn
	br       *bufio.Reader
	Greeting string
	Timeout  time.Duration
}

// DialPOP3 connects to addr and reads the +OK greeting.
func DialPOP3(addr string) (*POP3Client, error) { return DialPOP3From("", addr) }

// DialPOP3From connects to addr from local IP from and reads the greeting.
func DialPOP3From(from, addr string) (*POP3Client, error) {
	conn, err := dialFrom(from, addr)
	if err != nil {
		return nil, fmt.Errorf("dial pop3 %s: %w", addr, err)
	}
	c := &POP3Client{conn: conn, br: bufio.NewReader(conn), Timeout: clientTimeout}
	_ = conn.SetReadDeadline(time.Now().Add(c.Timeout))
	g, err := readLine(c.br)
	if err != nil || !strings.HasPrefix(g, "+OK") {
		conn.Close()
		return nil, fmt.Errorf("pop3 %s greeting %q: %v", addr, g, err)
	}
	c.Greeting = g
	return c, nil
}

// Cmd sends one command line and returns the status line; "-ERR …" is an error.
func (c *POP3Client) Cmd(format string, args ...any) (string, error) {
	cmd := fmt.Sprintf(format, args...)
	_ = c.conn.SetDeadline(time.Now().Add(c.Timeout))
	if _, err := fmt.Fprintf(c.conn, "%s\r\n", cmd); err != nil {
		return "", fmt.Errorf("pop3 send %s: %w", verb(cmd), err)
	}
	line, err := readLine(c.br)
	if err != nil {
		return "", fmt.Errorf("pop3 %s: %w", verb(cmd), err)
	}
	if !strings.HasPrefix(line, "+OK") {
		return line, fmt.Errorf("pop3 %s: %s", verb(cmd), line)
	}
	return line, nil
}

// Multi sends a command with a multi-line answer (RFC 1939 §3) and returns
// the lines of the body, dot-unstuffed, without the terminating ".".
func (c *POP3Client) Multi(format string, args ...any) ([]string, error) {
	if _, err := c.Cmd(format, args...); err != nil {
		return nil, err
	}
	var lines []string
	size := 0
	for {
		line, err := readLine(c.br)
		if err != nil {
			return lines, fmt.Errorf("pop3 multi-line: %w", err)
		}
		if line == "." {
			return lines, nil
		}
		size += len(line)
		if size > clientMaxLiteral {
			return lines, errors.New("pop3 multi-line: answer too big")
		}
		lines = append(lines, strings.TrimPrefix(line, "."))
	}
}

// Login sends USER and PASS.
func (c *POP3Client) Login(user, pass string) error {
	if _, err := c.Cmd("USER %s", user); err != nil {
		return err
	}
	_, err := c.Cmd("PASS %s", pass)
	return err
}

// StartTLS sends STLS (RFC 2595 §4) and performs the handshake.
func (c *POP3Client) StartTLS(cfg *tls.Config) error {
	if _, err := c.Cmd("STLS"); err != nil {
		return err
	}
	tc := tls.Client(c.conn, cfg)
	_ = tc.SetDeadline(time.Now().Add(c.Timeout))
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("pop3 stls handshake: %w", err)
	}
	c.conn, c.br = tc, bufio.NewReader(tc)
	return nil
}

// WaitClosed is IMAPClient.WaitClosed for POP3.
func (c *POP3Client) WaitClosed(timeout time.Duration) ([]string, error) {
	return waitClosed(c.conn, c.br, timeout)
}

// Close sends QUIT (best effort) and closes the connection.
func (c *POP3Client) Close() error {
	_ = c.conn.SetDeadline(time.Now().Add(2 * time.Second))
	_, _ = fmt.Fprintf(c.conn, "QUIT\r\n")
	_, _ = readLine(c.br)
	return c.conn.Close()
}

// LMTPDeliver delivers msg to the recipients over LMTP (RFC 2033) at addr
// and returns an error unless every recipient was accepted and got a 250
// after the data (§4.2: one reply per successful RCPT).
func LMTPDeliver(addr, from string, rcpts []string, msg []byte) error {
	conn, err := dialFrom("", addr)
	if err != nil {
		return fmt.Errorf("lmtp dial %s: %w", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(clientTimeout))
	br := bufio.NewReader(conn)
	// reply reads one possibly multi-line reply ("250-…" continues, "250 …" ends).
	reply := func(want string) error {
		for {
			line, err := readLine(br)
			if err != nil {
				return fmt.Errorf("lmtp read reply: %w", err)
			}
			if len(line) < 4 || !strings.HasPrefix(line, want) {
				return fmt.Errorf("lmtp: got %q, want %s", line, want)
			}
			if line[3] == ' ' {
				return nil
			}
		}
	}
	send := func(line, want string) error {
		if _, err := fmt.Fprintf(conn, "%s\r\n", line); err != nil {
			return fmt.Errorf("lmtp send %s: %w", verb(line), err)
		}
		return reply(want)
	}
	if err := reply("220"); err != nil {
		return err
	}
	if err := send("LHLO e2e.example", "250"); err != nil {
		return err
	}
	if err := send("MAIL FROM:<"+from+">", "250"); err != nil {
		return err
	}
	for _, r := range rcpts {
		if err := send("RCPT TO:<"+r+">", "250"); err != nil {
			return err
		}
	}
	if err := send("DATA", "354"); err != nil {
		return err
	}
	var body strings.Builder
	for _, line := range strings.SplitAfter(strings.ReplaceAll(string(msg), "\r\n", "\n"), "\n") {
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, ".") { // RFC 5321 §4.5.2 dot-stuffing
			body.WriteByte('.')
		}
		body.WriteString(strings.TrimSuffix(line, "\n") + "\r\n")
	}
	body.WriteString(".\r\n")
	if _, err := io.WriteString(conn, body.String()); err != nil {
		return fmt.Errorf("lmtp send data: %w", err)
	}
	for range rcpts {
		if err := reply("250"); err != nil {
			return err
		}
	}
	_ = send("QUIT", "221")
	return nil
}

// dialAny connects to addr, "host:port" (from local IP from, "" = any) or
// "unix:/path" (from must be "").
func dialAny(from, addr string) (net.Conn, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if from != "" {
			return nil, fmt.Errorf("dial %s: a UNIX socket has no local address %q", addr, from)
		}
		d := net.Dialer{Timeout: clientTimeout}
		return d.Dial("unix", path)
	}
	return dialFrom(from, addr)
}

// DialProxied connects to addr from local IP from and sends a PROXY protocol
// header (version 1 or 2) claiming the connection came from src to dst, as
// a load balancer does. The caller reads the greeting (NewIMAPClient, say).
func DialProxied(from, addr string, version byte, src, dst netip.AddrPort) (net.Conn, error) {
	conn, err := dialFrom(from, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	h := proxyproto.HeaderProxyFromAddrs(version, net.TCPAddrFromAddrPort(src), net.TCPAddrFromAddrPort(dst))
	_ = conn.SetWriteDeadline(time.Now().Add(clientTimeout))
	if _, err := h.WriteTo(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send PROXY v%d header to %s: %w", version, addr, err)
	}
	_ = conn.SetWriteDeadline(time.Time{})
	return conn, nil
}

// WaitClosedConn waits up to timeout for the peer to close conn and returns
// the lines it sent before (a greeting, a refusal); it fails if conn is
// still open after timeout.
func WaitClosedConn(conn net.Conn, timeout time.Duration) ([]string, error) {
	return waitClosed(conn, bufio.NewReader(conn), timeout)
}

// SMTPReply is one SMTP/LMTP reply (RFC 5321 §4.2): the code and the text
// of each line.
type SMTPReply struct {
	Code  int
	Lines []string
}

func (r SMTPReply) String() string {
	if r.Code == 0 {
		return "(no reply)"
	}
	return fmt.Sprintf("%d %s", r.Code, strings.Join(r.Lines, " / "))
}

// LMTPClient is a minimal LMTP client (RFC 2033) for tests.
type LMTPClient struct {
	conn     net.Conn
	br       *bufio.Reader
	Greeting SMTPReply
	Timeout  time.Duration // per reply; default 10s
}

// LMTPResult is what the server answered to one transaction.
type LMTPResult struct {
	MAIL SMTPReply
	RCPT []SMTPReply // one per recipient, in order
	DATA SMTPReply   // the answer to the DATA command (354 to go on)
	// Final is the reply after the message for each recipient (RFC 2033
	// §4.2: one per accepted recipient, in RCPT order); zero for a
	// recipient refused at RCPT or when the transaction did not get that far.
	Final []SMTPReply
}

// DialLMTP connects to addr ("host:port" or "unix:/path") and reads the 220
// greeting.
func DialLMTP(addr string) (*LMTPClient, error) { return DialLMTPFrom("", addr) }

// DialLMTPFrom is DialLMTP from local IP from.
func DialLMTPFrom(from, addr string) (*LMTPClient, error) {
	conn, err := dialAny(from, addr)
	if err != nil {
		return nil, fmt.Errorf("dial lmtp %s: %w", addr, err)
	}
	c := &LMTPClient{conn: conn, br: bufio.NewReader(conn), Timeout: clientTimeout}
	g, err := c.Reply()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("lmtp %s greeting: %w", addr, err)
	}
	if g.Code != 220 {
		conn.Close()
		return nil, fmt.Errorf("lmtp %s greeting: %s", addr, g)
	}
	c.Greeting = g
	return c, nil
}

// Reply reads one possibly multi-line reply ("250-…" continues, "250 …" ends).
func (c *LMTPClient) Reply() (SMTPReply, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(c.Timeout))
	var r SMTPReply
	for n := 0; ; n++ {
		line, err := readLine(c.br)
		if err != nil {
			return r, fmt.Errorf("lmtp read reply: %w", err)
		}
		code, err := strconv.Atoi(line[:min(3, len(line))])
		if err != nil || len(line) < 3 || (len(line) > 3 && line[3] != ' ' && line[3] != '-') || n >= 200 {
			return r, fmt.Errorf("lmtp read reply: malformed line %q", line)
		}
		r.Code = code
		r.Lines = append(r.Lines, strings.TrimSpace(line[min(4, len(line)):]))
		if len(line) == 3 || line[3] == ' ' {
			return r, nil
		}
	}
}

// Cmd sends one command line and reads its reply.
func (c *LMTPClient) Cmd(format string, args ...any) (SMTPReply, error) {
	line := fmt.Sprintf(format, args...)
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.Timeout))
	if _, err := fmt.Fprintf(c.conn, "%s\r\n", line); err != nil {
		return SMTPReply{}, fmt.Errorf("lmtp send %s: %w", verb(line), err)
	}
	r, err := c.Reply()
	if err != nil {
		return r, fmt.Errorf("lmtp %s: %w", verb(line), err)
	}
	return r, nil
}

// Send runs LHLO (when lhlo is not ""), MAIL, one RCPT per recipient and,
// if any was accepted, DATA with msg (dot-stuffed, CRLF line ends) and reads
// one reply per accepted recipient. A refusal is a reply in the result, not
// an error; err means the conversation broke.
func (c *LMTPClient) Send(lhlo, from string, rcpts []string, msg []byte) (*LMTPResult, error) {
	res := &LMTPResult{RCPT: make([]SMTPReply, len(rcpts)), Final: make([]SMTPReply, len(rcpts))}
	if lhlo != "" {
		r, err := c.Cmd("LHLO %s", lhlo)
		if err != nil {
			return res, err
		}
		if r.Code != 250 {
			return res, fmt.Errorf("lmtp LHLO: %s", r)
		}
	}
	var err error
	if res.MAIL, err = c.Cmd("MAIL FROM:<%s>", from); err != nil || res.MAIL.Code != 250 {
		return res, err
	}
	var accepted []int
	for i, rc := range rcpts {
		if res.RCPT[i], err = c.Cmd("RCPT TO:<%s>", rc); err != nil {
			return res, err
		}
		if res.RCPT[i].Code/100 == 2 {
			accepted = append(accepted, i)
		}
	}
	if len(accepted) == 0 {
		_, err := c.Cmd("RSET")
		return res, err
	}
	if res.DATA, err = c.Cmd("DATA"); err != nil || res.DATA.Code != 354 {
		return res, err
	}
	var body strings.Builder
	for _, line := range strings.SplitAfter(strings.ReplaceAll(string(msg), "\r\n", "\n"), "\n") {
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, ".") { // RFC 5321 §4.5.2 dot-stuffing
			body.WriteByte('.')
		}
		body.WriteString(strings.TrimSuffix(line, "\n") + "\r\n")
	}
	body.WriteString(".\r\n")
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.Timeout))
	if _, err := io.WriteString(c.conn, body.String()); err != nil {
		return res, fmt.Errorf("lmtp send data: %w", err)
	}
	for _, i := range accepted {
		if res.Final[i], err = c.Reply(); err != nil {
			return res, fmt.Errorf("lmtp reply after data for %s: %w", rcpts[i], err)
		}
	}
	return res, nil
}

// Close sends QUIT (best effort) and closes the connection.
func (c *LMTPClient) Close() error {
	c.Timeout = 2 * time.Second
	_, _ = c.Cmd("QUIT")
	return c.conn.Close()
}

// LMTPTransaction connects to addr ("host:port" or "unix:/path"), runs one
// transaction (Send with LHLO) and quits.
func LMTPTransaction(addr, from string, rcpts []string, msg []byte) (*LMTPResult, error) {
	c, err := DialLMTP(addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.Send("e2e.example", from, rcpts, msg)
}

// SieveClient is a minimal ManageSieve client (RFC 5804) for tests.
type SieveClient struct {
	conn         net.Conn
	br           *bufio.Reader
	Capabilities []string // the capability lines of the greeting (§1.7)
	Timeout      time.Duration
}

// SieveResponse is the answer to one ManageSieve command (RFC 5804 §1.2).
type SieveResponse struct {
	Lines  []string // response lines before the final one, literals inlined
	Status string   // "OK", "NO" or "BYE"
	Text   string   // the rest of the final line (response code, string)
}

// DialSieve connects to addr and reads the capabilities up to the OK.
func DialSieve(addr string) (*SieveClient, error) { return DialSieveFrom("", addr) }

// DialSieveFrom is DialSieve from local IP from.
func DialSieveFrom(from, addr string) (*SieveClient, error) {
	conn, err := dialAny(from, addr)
	if err != nil {
		return nil, fmt.Errorf("dial managesieve %s: %w", addr, err)
	}
	c := &SieveClient{conn: conn, br: bufio.NewReader(conn), Timeout: clientTimeout}
	r, err := c.response("greeting")
	if err != nil {
		conn.Close()
		return nil, err
	}
	if r.Status != "OK" {
		conn.Close()
		return nil, fmt.Errorf("managesieve %s greeting: %s %s", addr, r.Status, r.Text)
	}
	c.Capabilities = r.Lines
	return c, nil
}

// response reads lines up to the final OK/NO/BYE (§1.2), inlining literals.
func (c *SieveClient) response(what string) (*SieveResponse, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(c.Timeout))
	r := &SieveResponse{}
	for {
		line, err := readLiteralLine(c.br)
		if err != nil {
			return r, fmt.Errorf("managesieve %s: %w", what, err)
		}
		word, rest, _ := strings.Cut(line, " ")
		if w, code, ok := strings.Cut(word, "("); ok { // "NO(QUOTA)" has no space
			word, rest = w, "("+code+" "+rest
		}
		switch strings.ToUpper(word) {
		case "OK", "NO", "BYE":
			r.Status, r.Text = strings.ToUpper(word), rest
			return r, nil
		}
		if len(r.Lines) >= 1000 {
			return r, fmt.Errorf("managesieve %s: more than 1000 response lines", what)
		}
		r.Lines = append(r.Lines, line)
	}
}

// Cmd sends one command line and reads the response; NO and BYE are
// responses, not errors.
func (c *SieveClient) Cmd(format string, args ...any) (*SieveResponse, error) {
	line := fmt.Sprintf(format, args...)
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.Timeout))
	if _, err := fmt.Fprintf(c.conn, "%s\r\n", line); err != nil {
		return nil, fmt.Errorf("managesieve send %s: %w", verb(line), err)
	}
	return c.response(verb(line))
}

// Authenticate logs in with SASL PLAIN and the initial response as a
// string argument (RFC 5804 §2.1, RFC 4616).
func (c *SieveClient) Authenticate(user, pass string) error {
	ir := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
	r, err := c.Cmd(`AUTHENTICATE "PLAIN" "%s"`, ir)
	if err != nil {
		return err
	}
	if r.Status != "OK" {
		return fmt.Errorf("managesieve authenticate %s: %s %s", user, r.Status, r.Text)
	}
	return nil
}

// PutScript uploads script under name with a non-synchronizing literal
// (RFC 5804 §2.6, §4 "literal-c2s").
func (c *SieveClient) PutScript(name, script string) (*SieveResponse, error) {
	return c.Cmd("PUTSCRIPT %s {%d+}\r\n%s", Quote(name), len(script), script)
}

// Close sends LOGOUT (best effort) and closes the connection.
func (c *SieveClient) Close() error {
	c.Timeout = 2 * time.Second
	_, _ = c.Cmd("LOGOUT")
	return c.conn.Close()
}
