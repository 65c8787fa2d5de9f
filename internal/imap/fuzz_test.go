package imap

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
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
			if cmd.tag == "" || cmd.name == "" || cmd.name != wire.UpperASCII(cmd.name) {
				t.Fatalf("malformed command %+v", cmd)
			}
			for _, a := range cmd.args {
				if isAstring(a) {
					roundTrip(t, a.S)
				}
			}
		}
	})
}

// roundTrip encodes s as both LOGIN arguments, reframes and reparses it.
func roundTrip(t *testing.T, s string) {
	t.Helper()
	for _, caps := range []map[string]bool{{"LITERAL+": true}, {}} {
		pieces := loginPieces("T1", &sasl.Credentials{Mech: "LOGIN", Authcid: s, Password: s}, caps)
		cmds, conts, err := frame(string(bytes.Join(pieces, nil)), 1<<20)
		if len(cmds) != 1 || conts != len(pieces)-1 || err != io.EOF {
			t.Fatalf("encoding of %q framed as %d commands, %d continuations, err %v", s, len(cmds), conts, err)
		}
		cmd, err := parseCommand(cmds[0])
		if err != nil {
			t.Fatalf("encoding of %q does not parse: %v", s, err)
		}
		if cmd.name != "LOGIN" || len(cmd.args) != 2 || cmd.args[0].S != s || cmd.args[1].S != s {
			t.Fatalf("encoding of %q parses as %s %q", s, cmd.name, flatten(cmd.args))
		}
	}
}

// FuzzPreLogin feeds arbitrary client bytes to the pre-login state machine
// over an in-memory connection, with a Director that refuses every user.
// Serve must return once the input is consumed, with an end reason, and
// everything usher said before any TLS handshake must be well-formed IMAP
// response lines.
func FuzzPreLogin(f *testing.F) {
	srvTLS := testutil.LoopbackPKI(f).Server
	local, remote := netip.MustParseAddrPort("127.0.0.1:143"), netip.MustParseAddrPort("192.0.2.1:40000")
	f.Fuzz(func(t *testing.T, data []byte) {
		d := proxytest.NewDirector(netip.Addr{})
		d.SetErr(proxy.ErrUnavailable)
		srv := New(Options{Director: d, IdleTimeout: 2 * time.Second, MaxLiteral: 1024})
		conn := testutil.NewMemConn(data, local, remote)
		sess := &proxy.Session{
			ID: "fuzz", Proto: "imap", Conn: conn,
			Remote: remote, Local: local,
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
		if n := d.Acquired(); n != 0 {
			t.Fatalf("%d leases acquired from a refusing director", n)
		}
		checkResponses(t, conn.Output())
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
