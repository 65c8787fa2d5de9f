package bench

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeServer is an in-process IMAP, POP3 or LMTP server on 127.0.0.1:0
// that accepts everything (password "pass") except the user reject, and
// counts what it saw.
type fakeServer struct {
	t      *testing.T
	proto  string
	ln     net.Listener
	tls    *tls.Config
	reject string // LOGIN/PASS fails, RCPT gets 550
	wg     sync.WaitGroup

	mu         sync.Mutex
	logins     map[string]int
	logouts    int
	noops      int
	idles      int
	dones      int
	tlsConns   int
	mail       map[string][][]byte // IMAP mailbox contents, by user
	delivered  map[string]int      // LMTP deliveries, by recipient
	dataBytes  int
	txRcpts    [][]string      // recipients of each LMTP transaction with DATA
	remotes    map[string]int  // connections by client IP
	created    map[string]bool // IMAP mailboxes created (user/mailbox)
	greetDelay time.Duration
}

func startFake(t *testing.T, proto string) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeServer{
		t: t, proto: proto, ln: ln, tls: testTLSConfig(t),
		logins: map[string]int{}, mail: map[string][][]byte{}, delivered: map[string]int{},
		remotes: map[string]int{}, created: map[string]bool{},
	}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			f.mu.Lock()
			f.remotes[host]++
			f.mu.Unlock()
			f.wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				s := &fakeConn{f: f, c: c, br: bufio.NewReader(c)}
				switch proto {
				case "imap":
					s.imap()
				case "pop3":
					s.pop3()
				case "lmtp":
					s.lmtp()
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
	})
	return f
}

func (f *fakeServer) addr() string { return f.ln.Addr().String() }

func (f *fakeServer) totalLogins() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.logins {
		n += c
	}
	return n
}

type fakeConn struct {
	f  *fakeServer
	c  net.Conn
	br *bufio.Reader
}

func (s *fakeConn) printf(format string, args ...any) {
	fmt.Fprintf(s.c, format, args...)
}

func (s *fakeConn) line() (string, bool) {
	l, err := s.br.ReadString('\n')
	if err != nil {
		return "", false
	}
	return strings.TrimRight(l, "\r\n"), true
}

func (s *fakeConn) startTLS() bool {
	tc := tls.Server(s.c, s.f.tls)
	if err := tc.Handshake(); err != nil {
		return false
	}
	s.c, s.br = tc, bufio.NewReader(tc)
	s.f.mu.Lock()
	s.f.tlsConns++
	s.f.mu.Unlock()
	return true
}

// imapArgs splits IMAP arguments: atoms and quoted strings.
func imapArgs(s string) []string {
	var out []string
	for s = strings.TrimLeft(s, " "); s != ""; s = strings.TrimLeft(s, " ") {
		if s[0] == '"' {
			var b strings.Builder
			i := 1
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				b.WriteByte(s[i])
			}
			out = append(out, b.String())
			s = s[min(i+1, len(s)):]
			continue
		}
		a, rest, _ := strings.Cut(s, " ")
		out = append(out, a)
		s = rest
	}
	return out
}

func (s *fakeConn) imap() {
	f := s.f
	time.Sleep(f.greetDelay)
	s.printf("* OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] fake ready\r\n")
	user := ""
	for {
		l, ok := s.line()
		if !ok {
			return
		}
		tag, rest, _ := strings.Cut(l, " ")
		cmd, argStr, _ := strings.Cut(rest, " ")
		args := imapArgs(argStr)
		switch strings.ToUpper(cmd) {
		case "STARTTLS":
			s.printf("%s OK begin TLS\r\n", tag)
			if !s.startTLS() {
				return
			}
		case "LOGIN":
			if len(args) != 2 || args[1] != "pass" || args[0] == f.reject {
				s.printf("%s NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", tag)
				continue
			}
			user = args[0]
			f.mu.Lock()
			f.logins[user]++
			f.mu.Unlock()
			s.printf("%s OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", tag)
		case "SELECT":
			f.mu.Lock()
			n := len(f.mail[user])
			exists := len(args) == 1 && (strings.EqualFold(args[0], "INBOX") || f.created[user+"/"+args[0]])
			f.mu.Unlock()
			if !exists {
				s.printf("%s NO [NONEXISTENT] Mailbox doesn't exist\r\n", tag)
				continue
			}
			s.printf("* FLAGS (\\Seen)\r\n* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] ok\r\n%s OK [READ-WRITE] Select completed\r\n", n, tag)
		case "CREATE":
			f.mu.Lock()
			f.created[user+"/"+args[0]] = true
			f.mu.Unlock()
			s.printf("%s OK Create completed\r\n", tag)
		case "NOOP":
			f.mu.Lock()
			f.noops++
			f.mu.Unlock()
			s.printf("%s OK NOOP completed\r\n", tag)
		case "IDLE":
			f.mu.Lock()
			f.idles++
			f.mu.Unlock()
			s.printf("+ idling\r\n* OK Still here\r\n")
			if d, ok := s.line(); !ok || d != "DONE" {
				return
			}
			f.mu.Lock()
			f.dones++
			f.mu.Unlock()
			s.printf("%s OK Idle completed\r\n", tag)
		case "APPEND":
			last := args[len(args)-1]
			n, err := strconv.Atoi(strings.Trim(last, "{}+"))
			if err != nil {
				s.printf("%s BAD literal\r\n", tag)
				continue
			}
			s.printf("+ OK\r\n")
			msg := make([]byte, n)
			if _, err := io.ReadFull(s.br, msg); err != nil {
				return
			}
			if l, ok := s.line(); !ok || l != "" {
				return
			}
			f.mu.Lock()
			f.mail[user] = append(f.mail[user], msg)
			f.mu.Unlock()
			s.printf("%s OK Append completed\r\n", tag)
		case "FETCH":
			f.mu.Lock()
			msgs := f.mail[user]
			f.mu.Unlock()
			for i, m := range msgs {
				s.printf("* %d FETCH (BODY[] {%d}\r\n", i+1, len(m))
				_, _ = s.c.Write(m)
				s.printf(")\r\n")
			}
			s.printf("%s OK Fetch completed\r\n", tag)
		case "LOGOUT":
			f.mu.Lock()
			f.logouts++
			f.mu.Unlock()
			s.printf("* BYE Logging out\r\n%s OK Logout completed\r\n", tag)
			return
		default:
			s.printf("%s BAD unknown command\r\n", tag)
		}
	}
}

func (s *fakeConn) pop3() {
	f := s.f
	s.printf("+OK fake ready\r\n")
	user := ""
	for {
		l, ok := s.line()
		if !ok {
			return
		}
		cmd, arg, _ := strings.Cut(l, " ")
		switch strings.ToUpper(cmd) {
		case "STLS":
			s.printf("+OK begin TLS\r\n")
			if !s.startTLS() {
				return
			}
		case "USER":
			user = arg
			s.printf("+OK\r\n")
		case "PASS":
			if arg != "pass" || user == f.reject {
				s.printf("-ERR [AUTH] Authentication failed.\r\n")
				continue
			}
			f.mu.Lock()
			f.logins[user]++
			f.mu.Unlock()
			s.printf("+OK Logged in.\r\n")
		case "STAT":
			s.printf("+OK 0 0\r\n")
		case "NOOP":
			f.mu.Lock()
			f.noops++
			f.mu.Unlock()
			s.printf("+OK\r\n")
		case "QUIT":
			f.mu.Lock()
			f.logouts++
			f.mu.Unlock()
			s.printf("+OK Logging out.\r\n")
			return
		default:
			s.printf("-ERR unknown command\r\n")
		}
	}
}

func (s *fakeConn) lmtp() {
	f := s.f
	s.printf("220 fake LMTP ready\r\n")
	var rcpts []string
	for {
		l, ok := s.line()
		if !ok {
			return
		}
		cmd, arg, _ := strings.Cut(l, " ")
		switch strings.ToUpper(cmd) {
		case "LHLO":
			s.printf("250-fake\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n")
		case "STARTTLS":
			s.printf("220 2.0.0 Begin TLS.\r\n")
			if !s.startTLS() {
				return
			}
		case "MAIL":
			rcpts = nil
			s.printf("250 2.1.0 OK\r\n")
		case "RCPT":
			u := strings.TrimSuffix(strings.TrimPrefix(arg, "TO:<"), ">")
			if u == f.reject {
				s.printf("550 5.1.1 <%s> User doesn't exist\r\n", u)
				continue
			}
			rcpts = append(rcpts, u)
			s.printf("250 2.1.5 OK\r\n")
		case "DATA":
			s.printf("354 OK\r\n")
			n := 0
			for {
				d, ok := s.line()
				if !ok {
					return
				}
				if d == "." {
					break
				}
				n += len(d) + 2
			}
			f.mu.Lock()
			f.dataBytes += n
			f.txRcpts = append(f.txRcpts, rcpts)
			for _, r := range rcpts {
				f.delivered[r]++
			}
			f.mu.Unlock()
			for _, r := range rcpts {
				s.printf("250 2.0.0 <%s> Saved\r\n", r)
			}
			rcpts = nil
		case "RSET":
			rcpts = nil
			s.printf("250 2.0.0 OK\r\n")
		case "QUIT":
			f.mu.Lock()
			f.logouts++
			f.mu.Unlock()
			s.printf("221 2.0.0 Bye\r\n")
			return
		default:
			s.printf("500 5.5.2 unknown command\r\n")
		}
	}
}

// testTLSConfig is a server config with a fresh self-signed certificate for 127.0.0.1.
func testTLSConfig(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "fake"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}
