package lmtp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

const testTimeout = 5 * time.Second

// fakeBackend is a small LMTP server standing in for Dovecot. It records
// the commands and the message (in wire form) of every connection and can
// be told to fail in specific ways.
type fakeBackend struct {
	t  testing.TB
	ip netip.Addr
	ln net.Listener

	ext       []string          // LHLO extensions (after the host line)
	xclient   string            // XCLIENT parameters to advertise; "" for none
	tls       *tls.Config       // offer STARTTLS
	mailReply string            // reply to MAIL (default 250)
	rcptReply map[string]string // address -> reply to RCPT (default 250; "": never answer)
	dataReply map[string]string // address -> reply after DATA (default 250)
	// closeMidData closes the connection after the first message line;
	// stall reads the message and then never answers.
	closeMidData bool
	stall        bool
	// failData is closeMidData switched on while the backend runs
	// (setFailData).
	failData bool
	// onData runs after the message was read, before the replies.
	onData func()

	mu       sync.Mutex
	conns    []*backendRecord
	open     map[net.Conn]bool // connections being served
	messages [][]byte          // every message received completely, unstuffed, in order
	ctx      context.Context   // ends with the test
	cancel   context.CancelFunc
}

// backendRecord is what one connection to a fake backend received.
type backendRecord struct {
	cmds []string // command lines; "+TLS " prefixes lines read over TLS
	// data is the last message as received: after DATA dot-stuffed and
	// without the final ".\r\n", after BDAT as sent.
	data []byte
}

// newBackends starts n fake backends on 127.0.0.1, 127.0.0.2, ... sharing
// one port (usher reaches every backend on the same port), and returns
// them with that port.
func newBackends(t *testing.T, n int, configure func(i int, b *fakeBackend)) ([]*fakeBackend, int) {
	t.Helper()
	for attempt := 0; attempt < 50; attempt++ {
		var lns []net.Listener
		port := 0
		ok := true
		for i := 0; i < n; i++ {
			addr := fmt.Sprintf("127.0.0.%d:%d", i+1, port)
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				ok = false
				break
			}
			if port == 0 {
				port = ln.Addr().(*net.TCPAddr).Port
			}
			lns = append(lns, ln)
		}
		if !ok {
			for _, ln := range lns {
				ln.Close()
			}
			continue
		}
		bs := make([]*fakeBackend, n)
		for i, ln := range lns {
			ctx, cancel := context.WithCancel(context.Background())
			b := &fakeBackend{
				t:      t,
				ip:     netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", i+1)),
				ln:     ln,
				ext:    []string{"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"},
				ctx:    ctx,
				cancel: cancel,
			}
			if configure != nil {
				configure(i, b)
			}
			bs[i] = b
			testutil.Serve(t, ln, b.handle)
			// Registered after Serve's, so it runs first: a stalled
			// backend waits for ctx, not for its connection.
			t.Cleanup(cancel)
		}
		return bs, port
	}
	t.Fatal("no common port for the fake backends")
	return nil, 0
}

// records returns a copy of what each connection received.
func (b *fakeBackend) records() []backendRecord {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]backendRecord, len(b.conns))
	for i, r := range b.conns {
		out[i] = backendRecord{cmds: append([]string(nil), r.cmds...), data: bytes.Clone(r.data)}
	}
	return out
}

// setFailData makes every later message fail as with closeMidData.
func (b *fakeBackend) setFailData() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failData = true
}

func (b *fakeBackend) failingData() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failData
}

// live returns how many connections are being served.
func (b *fakeBackend) live() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.open)
}

// delivered returns every message received completely (after DATA up to
// the final ".", after BDAT up to the last chunk), without dot-stuffing, in
// order.
func (b *fakeBackend) delivered() [][]byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.messages)
}

// kick ends every open connection as a backend's idle timeout does: it
// writes line (unless "") and closes the connection.
func (b *fakeBackend) kick(line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := range b.open {
		if line != "" {
			_, _ = io.WriteString(c, line+"\r\n")
		}
		c.Close()
	}
}

// handle serves one connection and records what it received.
func (b *fakeBackend) handle(c net.Conn, _ int) {
	rec := &backendRecord{}
	b.mu.Lock()
	b.conns = append(b.conns, rec)
	if b.open == nil {
		b.open = make(map[net.Conn]bool)
	}
	b.open[c] = true
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.open, c)
		b.mu.Unlock()
	}()
	// Unblock a stalled or reading backend when the test ends.
	stop := context.AfterFunc(b.ctx, func() { c.Close() })
	defer stop()
	b.serve(c, rec)
}

func (b *fakeBackend) record(rec *backendRecord, f func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f()
}

func (b *fakeBackend) serve(c net.Conn, rec *backendRecord) {
	_ = c.SetDeadline(time.Now().Add(2 * testTimeout))
	var conn net.Conn = c
	r := bufio.NewReader(conn)
	secure := false
	write := func(lines ...string) bool {
		_, err := io.WriteString(conn, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	if !write("220 fake" + b.ip.String() + " LMTP ready") {
		return
	}
	var accepted []string
	var chunks []byte // BDAT data so far
	inMail := false
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line := strings.TrimRight(l, "\r\n")
		prefix := ""
		if secure {
			prefix = "+TLS "
		}
		b.record(rec, func() { rec.cmds = append(rec.cmds, prefix+line) })
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "LHLO":
			lines := []string{"250-fake" + b.ip.String()}
			ext := append([]string(nil), b.ext...)
			if b.xclient != "" {
				ext = append(ext, "XCLIENT "+b.xclient)
			}
			if b.tls != nil && !secure {
				ext = append(ext, "STARTTLS")
			}
			for i, e := range ext {
				sep := "-"
				if i == len(ext)-1 {
					sep = " "
				}
				lines = append(lines, "250"+sep+e)
			}
			if len(ext) == 0 {
				lines[0] = "250 fake" + b.ip.String()
			}
			write(lines...)
			accepted, inMail = nil, false
		case "STARTTLS":
			write("220 2.0.0 Begin TLS")
			tc := tls.Server(c, b.tls)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn, r, secure = tc, bufio.NewReader(tc), true
			accepted, inMail = nil, false
		case "XCLIENT":
			write("220 fake" + b.ip.String() + " XCLIENT accepted")
			accepted, inMail = nil, false
		case "MAIL":
			if b.mailReply != "" {
				write(b.mailReply)
				continue
			}
			inMail = true
			write("250 2.1.0 OK")
		case "RCPT":
			if !inMail {
				write("503 5.5.1 MAIL needed first")
				continue
			}
			addr := strings.TrimSuffix(strings.TrimPrefix(arg, "TO:<"), ">")
			if rep, ok := b.rcptReply[addr]; ok {
				if rep == "" { // hang: never answer
					<-b.ctx.Done()
					return
				}
				write(rep)
				continue
			}
			accepted = append(accepted, addr)
			write("250 2.1.5 OK")
		case "DATA":
			if len(accepted) == 0 {
				write("503 5.5.1 No valid recipients")
				continue
			}
			write("354 OK")
			var data []byte
			for first := true; ; first = false {
				dl, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if dl == ".\r\n" {
					break
				}
				data = append(data, dl...)
				if first && (b.closeMidData || b.failingData()) {
					return
				}
			}
			if !b.finish(rec, data, unstuff(data), accepted, write) {
				return
			}
			accepted, inMail = nil, false
		case "BDAT":
			// RFC 3030 section 2: the chunk is read whatever the answer.
			sizeArg, last, _ := strings.Cut(arg, " ")
			n, err := strconv.Atoi(sizeArg)
			if err != nil || (last != "" && last != "LAST") || !slices.Contains(b.ext, "CHUNKING") {
				write("501 5.5.4 bad BDAT")
				return
			}
			k := n
			if b.closeMidData || b.failingData() {
				k = min(n, 10)
			}
			buf := make([]byte, k)
			if _, err := io.ReadFull(r, buf); err != nil || k < n {
				return
			}
			chunks = append(chunks, buf...)
			switch {
			case len(accepted) == 0:
				write("503 5.5.1 No valid recipients")
			case last == "":
				write("250 2.0.0 " + sizeArg + " octets received")
			default:
				if !b.finish(rec, chunks, chunks, accepted, write) {
					return
				}
				accepted, inMail, chunks = nil, false, nil
			}
		case "RSET":
			accepted, inMail, chunks = nil, false, nil
			write("250 2.0.0 OK")
		case "QUIT":
			write("221 2.0.0 Bye")
			return
		default:
			write("500 5.5.2 Unknown command")
		}
	}
}

// finish records a message received completely and sends the replies, one
// per accepted recipient (RFC 2033 section 4.2); false when the connection
// is to end.
func (b *fakeBackend) finish(rec *backendRecord, data, msg []byte, accepted []string, write func(...string) bool) bool {
	b.record(rec, func() {
		rec.data = data
		b.messages = append(b.messages, msg)
	})
	if b.onData != nil {
		b.onData()
	}
	if b.stall {
		<-b.ctx.Done()
		return false
	}
	for _, a := range accepted {
		if rep, ok := b.dataReply[a]; ok {
			write(rep)
		} else {
			write("250 2.0.0 <" + a + "> Saved")
		}
	}
	return true
}

type sessionOpts struct {
	mode config.TLSMode
	tls  *tls.Config
}

// options returns Options for the fake director and a backend port.
func options(d *proxytest.Director, port int) Options {
	return Options{
		Director:    d,
		Hostname:    "usher.test",
		IdleTimeout: testTimeout,
		DataTimeout: testTimeout,
		Backend: proxy.BackendOptions{
			Port:           port,
			TLS:            config.TLSNone,
			ConnectTimeout: testTimeout,
			LoginTimeout:   testTimeout,
		},
	}
}

// startSession runs srv.Serve on a real loopback connection and reads the
// greeting.
func startSession(t *testing.T, srv *Server, so sessionOpts) *proxytest.Session {
	t.Helper()
	h := proxytest.StartSession(t, srv, proxytest.SessionOptions{Proto: "lmtp", ID: "sid1",
		TLSMode: so.mode, TLSConfig: so.tls, Timeout: 2 * testTimeout})
	h.Client.Expect("220 usher.test usher LMTP ready")
	return h
}

// lhlo sends LHLO and returns the extension lines.
func lhlo(h *proxytest.Session) []string {
	t := h.Client.T
	t.Helper()
	h.Client.Send("LHLO client.example")
	lines := readReply(h.Client)
	if len(lines) == 0 || lines[0] != "250-usher.test" && lines[0] != "250 usher.test" {
		t.Fatalf("LHLO reply %q", lines)
	}
	return lines[1:]
}

// readReply reads one possibly multi-line reply.
func readReply(c *testutil.Client) []string {
	c.T.Helper()
	var out []string
	for {
		l := c.Line()
		out = append(out, l)
		if len(l) < 4 || l[3] != '-' {
			return out
		}
	}
}

// stuff dot-stuffs message lines and ends each with CRLF (RFC 5321
// section 4.5.2): the wire form the backends must receive.
func stuff(lines ...string) string {
	var sb strings.Builder
	for _, l := range lines {
		if strings.HasPrefix(l, ".") {
			sb.WriteByte('.')
		}
		sb.WriteString(l)
		sb.WriteString("\r\n")
	}
	return sb.String()
}

// plain ends each message line with CRLF, without dot-stuffing: the
// message as a backend stores it, and as BDAT carries it.
func plain(lines ...string) string {
	var sb strings.Builder
	for _, l := range lines {
		sb.WriteString(l)
		sb.WriteString("\r\n")
	}
	return sb.String()
}

// unstuff undoes DATA's dot-stuffing (RFC 5321 section 4.5.2).
func unstuff(data []byte) []byte {
	var out []byte
	for _, l := range bytes.SplitAfter(data, []byte("\n")) {
		if len(l) > 0 && l[0] == '.' {
			l = l[1:]
		}
		out = append(out, l...)
	}
	return out
}

// rcptsOf returns the RCPT commands in a backend record.
func rcptsOf(rec backendRecord) []string {
	var out []string
	for _, c := range rec.cmds {
		if strings.HasPrefix(c, "RCPT ") {
			out = append(out, c)
		}
	}
	return out
}

// hasExt reports whether an LHLO reply's extension lines list ext.
func hasExt(lines []string, ext string) bool {
	for _, l := range lines {
		if len(l) > 4 && l[4:] == ext {
			return true
		}
	}
	return false
}
