package imap

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// FuzzParseCommand frames and parses arbitrary client bytes. Besides not
// panicking, parsed commands must be well formed, and every astring argument
// must survive usher's backend encoding (quoted or literal, with and without
// LITERAL+) and parse back to the same value.
func FuzzParseCommand(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		r := wire.NewReaderFrom(bytes.NewReader(data), 0)
		for range 50 {
			raw, err := readCommand(r, 1024, func() error { return nil })
			if err != nil {
				return
			}
			cmd, err := parseCommand(raw)
			if err != nil {
				continue
			}
			if cmd.tag == "" || cmd.name == "" || cmd.name != asciiUpper(cmd.name) {
				t.Fatalf("malformed command %+v", cmd)
			}
			for _, a := range cmd.args {
				if a.isAstring() {
					roundTrip(t, a.s)
				}
			}
		}
	})
}

// roundTrip encodes s as both LOGIN arguments, reframes and reparses it.
func roundTrip(t *testing.T, s string) {
	t.Helper()
	for _, caps := range []map[string]bool{{"LITERAL+": true}, {}} {
		pieces := loginPieces("T1", &credentials{mech: "LOGIN", authcid: s, password: s}, caps)
		cmds, conts, err := frame(string(bytes.Join(pieces, nil)), 1<<20)
		if len(cmds) != 1 || conts != len(pieces)-1 || err != io.EOF {
			t.Fatalf("encoding of %q framed as %d commands, %d continuations, err %v", s, len(cmds), conts, err)
		}
		cmd, err := parseCommand(cmds[0])
		if err != nil {
			t.Fatalf("encoding of %q does not parse: %v", s, err)
		}
		if cmd.name != "LOGIN" || len(cmd.args) != 2 || cmd.args[0].s != s || cmd.args[1].s != s {
			t.Fatalf("encoding of %q parses as %s %q", s, cmd.name, flatten(cmd.args))
		}
	}
}

// refusingDirector never has a backend.
type refusingDirector struct{}

func (refusingDirector) Acquire(context.Context, string) (*proxy.Lease, error) {
	return nil, proxy.ErrUnavailable
}

// memConn is an in-memory client connection: reads come from a fixed input
// and end with EOF, writes are collected. Reads never block, so deadlines
// are not needed.
type memConn struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (m *memConn) Read(p []byte) (int, error)         { return m.in.Read(p) }
func (m *memConn) Write(p []byte) (int, error)        { return m.out.Write(p) }
func (m *memConn) Close() error                       { return nil }
func (m *memConn) LocalAddr() net.Addr                { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 143} }
func (m *memConn) RemoteAddr() net.Addr               { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40000} }
func (m *memConn) SetDeadline(t time.Time) error      { return nil }
func (m *memConn) SetReadDeadline(t time.Time) error  { return nil }
func (m *memConn) SetWriteDeadline(t time.Time) error { return nil }

// FuzzPreLogin feeds arbitrary client bytes to the pre-login state machine
// over an in-memory connection, with a Director that refuses every user.
// Serve must return once the input is consumed, with an end reason, and
// everything usher said before any TLS handshake must be well-formed IMAP
// response lines.
func FuzzPreLogin(f *testing.F) {
	srvTLS, _ := testTLS(f)
	srv := New(Options{Director: refusingDirector{}, IdleTimeout: 2 * time.Second, MaxLiteral: 1024})
	f.Fuzz(func(t *testing.T, data []byte) {
		conn := &memConn{in: bytes.NewReader(data)}
		sess := &proxy.Session{
			ID: "fuzz", Proto: "imap", Conn: conn,
			Remote: netip.MustParseAddrPort("192.0.2.1:40000"), Local: netip.MustParseAddrPort("127.0.0.1:143"),
			Start: time.Now(), Log: slog.New(slog.DiscardHandler),
			// The first byte picks trusted or not, to reach both LOGIN paths.
			TLSMode: config.TLSStartTLS, TLSConfig: srvTLS, Trusted: len(data) > 0 && data[0]&1 == 1,
		}
		done := make(chan string, 1)
		go func() { done <- srv.Serve(context.Background(), sess) }()
		select {
		case reason := <-done:
			if reason == "" {
				t.Fatal("Serve returned no reason")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return")
		}
		checkResponses(t, conn.out.Bytes())
	})
}

// checkResponses checks the plaintext part of usher's output: CRLF-ended
// lines, each untagged, a continuation request, or tagged OK/NO/BAD.
func checkResponses(t *testing.T, out []byte) {
	if !bytes.HasPrefix(out, []byte("* OK [CAPABILITY ")) {
		t.Fatalf("no greeting: %q", out)
	}
	for len(out) > 0 {
		line, rest, ok := bytes.Cut(out, []byte("\r\n"))
		if !ok {
			t.Fatalf("unterminated response %q", out)
		}
		out = rest
		s := string(line)
		if strings.HasPrefix(s, "* ") || strings.HasPrefix(s, "+ ") {
			continue
		}
		tag, resp, ok := strings.Cut(s, " ")
		status, _, _ := strings.Cut(resp, " ")
		if !ok || tag == "" || !slices.Contains([]string{"OK", "NO", "BAD"}, status) {
			t.Fatalf("invalid response line %q", s)
		}
		if _, _, valid := parseTag([]byte(tag)); !valid {
			t.Fatalf("response with invalid tag %q", s)
		}
		if strings.HasSuffix(s, " OK Begin TLS negotiation now") {
			return // the rest is TLS
		}
	}
}
