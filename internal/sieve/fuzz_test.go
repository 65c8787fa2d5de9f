package sieve

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

// FuzzParseCommand frames and parses arbitrary bytes, as read from clients
// and backends. Besides not panicking: a frame rendered back to bytes frames
// and parses the same (usher relays backend frames that way), parsed
// commands are well formed, and every string argument survives usher's
// encoding (quoted or literal, both directions) and parses back the same.
func FuzzParseCommand(f *testing.F) {
	lim := frameLimits{literal: 1024, literals: 4, total: 8192}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := wire.NewReaderFrom(bytes.NewReader(data), 0)
		for range 50 {
			fr, err := readFrame(r, lim)
			if err != nil {
				return
			}
			again, err := readFrame(wire.NewReaderFrom(bytes.NewReader(fr.bytes()), 0), lim)
			if err != nil || !slices.EqualFunc(again.lines, fr.lines, bytes.Equal) || !slices.EqualFunc(again.lits, fr.lits, bytes.Equal) {
				t.Fatalf("frame %q re-frames as %+v (%v)", fr.bytes(), again, err)
			}
			args, perr := parseArgs(fr)
			cmd, err := parseCommand(fr)
			if err != nil {
				continue
			}
			if perr != nil || len(args) != len(cmd.args)+1 {
				t.Fatalf("command %+v but args %+v (%v)", cmd, args, perr)
			}
			if cmd.name == "" || cmd.name != asciiUpper(cmd.name) {
				t.Fatalf("malformed command %+v", cmd)
			}
			for _, a := range cmd.args {
				if a.kind == argString {
					roundTrip(t, a.s)
				}
			}
		}
	})
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
func (m *memConn) LocalAddr() net.Addr                { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4190} }
func (m *memConn) RemoteAddr() net.Addr               { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40000} }
func (m *memConn) SetDeadline(t time.Time) error      { return nil }
func (m *memConn) SetReadDeadline(t time.Time) error  { return nil }
func (m *memConn) SetWriteDeadline(t time.Time) error { return nil }

// FuzzPreLogin feeds arbitrary client bytes to the unauthenticated state
// over an in-memory connection, with a Director that refuses every user.
// Serve must return once the input is consumed, with an end reason, and
// everything usher said before any TLS handshake must be well-formed
// ManageSieve responses.
func FuzzPreLogin(f *testing.F) {
	srvTLS, _ := testTLS(f)
	srv := New(Options{Director: refusingDirector{}, IdleTimeout: 2 * time.Second, MaxLiteral: 1024})
	f.Fuzz(func(t *testing.T, data []byte) {
		conn := &memConn{in: bytes.NewReader(data)}
		sess := &proxy.Session{
			ID: "fuzz", Proto: "sieve", Conn: conn,
			Remote: netip.MustParseAddrPort("192.0.2.1:40000"), Local: netip.MustParseAddrPort("127.0.0.1:4190"),
			Start: time.Now(), Log: slog.New(slog.DiscardHandler),
			// The first byte picks trusted or not, to reach both paths.
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
// frames, each a capability line, the empty SASL challenge, or an
// OK/NO/BYE response; nothing after a BYE.
func checkResponses(t *testing.T, out []byte) {
	if !bytes.HasPrefix(out, []byte(`"IMPLEMENTATION" "usher"`+"\r\n")) {
		t.Fatalf("no greeting: %q", out)
	}
	if len(out) > 0 && !bytes.HasSuffix(out, []byte("\r\n")) {
		t.Fatalf("unterminated output %q", out)
	}
	r := wire.NewReaderFrom(bytes.NewReader(out), 0)
	lim := frameLimits{literal: 1 << 20, literals: 4, total: 2 << 20}
	bye := false
	for {
		f, err := readFrame(r, lim)
		if err != nil {
			return // io.EOF: all consumed (other errors fail the checks below first)
		}
		if bye {
			t.Fatalf("output after BYE: %q", f.bytes())
		}
		args, err := parseArgs(f)
		if err != nil {
			t.Fatalf("response %q does not parse: %v", f.bytes(), err)
		}
		if resp, ok := toResponse(f, args); ok {
			if resp.text == "" {
				t.Fatalf("response without text: %q", f.bytes())
			}
			bye = resp.status == "BYE"
			if resp.status == "OK" && resp.text == "Begin TLS negotiation now." {
				return // the rest is TLS
			}
			continue
		}
		if len(args) == 0 || len(args) > 2 || !args[0].isString() || (len(args) == 2 && !args[1].isString()) {
			t.Fatalf("invalid line %q", f.bytes())
		}
	}
}
