package sieve

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
	"github.com/usher-mail/usher/internal/wire"
)

// FuzzParseCommand frames and parses arbitrary bytes, as read from clients
// and backends. Besides not panicking: a frame rendered back to bytes frames
// and parses the same (usher relays backend frames that way), parsed
// commands are well formed, and every string argument survives usher's
// encoding (quoted or literal, both directions) and parses back the same.
func FuzzParseCommand(f *testing.F) {
	lim := wire.FrameLimits{Literal: 1024, Literals: 4, Total: 8192}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := wire.NewReaderFrom(bytes.NewReader(data), 0)
		for range 50 {
			fr, err := r.ReadFrame(lim, nil)
			if err != nil {
				return
			}
			again, err := wire.NewReaderFrom(bytes.NewReader(fr.Bytes()), 0).ReadFrame(lim, nil)
			if err != nil || !slices.EqualFunc(again.Lines, fr.Lines, bytes.Equal) || !slices.EqualFunc(again.Lits, fr.Lits, bytes.Equal) {
				t.Fatalf("frame %q re-frames as %+v (%v)", fr.Bytes(), again, err)
			}
			args, perr := parseArgs(fr)
			cmd, err := parseCommand(fr)
			if err != nil {
				continue
			}
			if perr != nil || len(args) != len(cmd.args)+1 {
				t.Fatalf("command %+v but args %+v (%v)", cmd, args, perr)
			}
			if cmd.name == "" || cmd.name != wire.UpperASCII(cmd.name) {
				t.Fatalf("malformed command %+v", cmd)
			}
			for _, a := range cmd.args {
				if a.Kind == wire.String {
					roundTrip(t, a.S)
				}
			}
		}
	})
}

// FuzzPreLogin feeds arbitrary client bytes to the unauthenticated state
// over an in-memory connection, with a Director that refuses every user.
// Serve must return once the input is consumed, with an end reason, and
// everything usher said before any TLS handshake must be well-formed
// ManageSieve responses.
func FuzzPreLogin(f *testing.F) {
	srvTLS := testutil.LoopbackPKI(f).Server
	local, remote := netip.MustParseAddrPort("127.0.0.1:4190"), netip.MustParseAddrPort("192.0.2.1:40000")
	f.Fuzz(func(t *testing.T, data []byte) {
		d := proxytest.NewDirector(netip.Addr{})
		d.SetErr(proxy.ErrUnavailable)
		srv := New(Options{Director: d, IdleTimeout: 2 * time.Second, MaxLiteral: 1024})
		conn := testutil.NewMemConn(data, local, remote)
		sess := &proxy.Session{
			ID: "fuzz", Proto: "sieve", Conn: conn,
			Remote: remote, Local: local,
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
		if n := d.Acquired(); n != 0 {
			t.Fatalf("%d leases acquired from a refusing director", n)
		}
		checkResponses(t, conn.Output())
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
	lim := wire.FrameLimits{Literal: 1 << 20, Literals: 4, Total: 2 << 20}
	bye := false
	for {
		f, err := r.ReadFrame(lim, nil)
		if err != nil {
			return // io.EOF: all consumed (other errors fail the checks below first)
		}
		if bye {
			t.Fatalf("output after BYE: %q", f.Bytes())
		}
		args, err := parseArgs(f)
		if err != nil {
			t.Fatalf("response %q does not parse: %v", f.Bytes(), err)
		}
		if resp, ok := toResponse(f, args); ok {
			if resp.text == "" {
				t.Fatalf("response without text: %q", f.Bytes())
			}
			bye = resp.status == "BYE"
			if resp.status == "OK" && resp.text == "Begin TLS negotiation now." {
				return // the rest is TLS
			}
			continue
		}
		if len(args) == 0 || len(args) > 2 || !args[0].IsString() || (len(args) == 2 && !args[1].IsString()) {
			t.Fatalf("invalid line %q", f.Bytes())
		}
	}
}
