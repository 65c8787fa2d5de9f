package pop3

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

// In FuzzPreLogin lines are capped at fuzzMaxLine, so short inputs reach
// the overlong-line path, and inputs at maxFuzzInput: the fuzzer's
// minimization is quadratic in the input length, and long inputs only made
// it stall.
const (
	fuzzMaxLine  = 256
	maxFuzzInput = 4 << 10
)

// FuzzPreLogin feeds arbitrary client input to the AUTHORIZATION state with
// a Director that refuses every user. The first byte selects the listener's
// TLS mode and whether the client is trusted. Serve must return, and
// everything usher writes before any TLS handshake must be CRLF-terminated
// lines starting with the greeting.
func FuzzPreLogin(f *testing.F) {
	srvTLS := testutil.LoopbackPKI(f).Server
	local, remote := netip.MustParseAddrPort("127.0.0.1:110"), netip.MustParseAddrPort("127.0.0.2:4000")
	discard := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxFuzzInput {
			// The flood that ends a session is covered by TestLongLines.
			t.Skip()
		}
		var flags byte
		if len(data) > 0 {
			flags, data = data[0], data[1:]
		}
		conn := testutil.NewMemConn(data, local, remote)
		sess := &proxy.Session{
			ID:      "fuzz",
			Proto:   "pop3",
			Conn:    conn,
			Remote:  remote,
			Local:   local,
			Log:     discard,
			Trusted: flags&4 != 0,
			TLSMode: config.TLSNone,
		}
		switch flags & 3 {
		case 1:
			sess.TLSMode, sess.TLSConfig = config.TLSStartTLS, srvTLS
		case 2:
			// As after the listener's implicit handshake.
			sess.TLSMode, sess.TLSConfig, sess.Secure = config.TLSImplicit, srvTLS, true
		}
		d := proxytest.NewDirector(netip.Addr{})
		d.SetErr(proxy.ErrUnavailable)
		srv := New(Options{Director: d, IdleTimeout: time.Second,
			Backend: proxy.BackendOptions{Port: 110, LoginTimeout: time.Second}})
		srv.maxLine = fuzzMaxLine

		// Synchronous: MemConn reads never block and the Director answers
		// at once, so Serve must return by itself (a hang fails the run by
		// its timeout). A goroutine and timer here would make coverage
		// depend on scheduling and stall the fuzzer's minimization.
		reason := srv.Serve(context.Background(), sess)
		if reason == "" {
			t.Fatal("empty reason")
		}
		if d.Acquired() != 0 {
			t.Fatal("lease acquired from a refusing director")
		}

		out := conn.Output()
		// After "+OK Begin TLS ..." the bytes are TLS records.
		if i := bytes.Index(out, []byte(replyBeginTLS+"\r\n")); i >= 0 {
			out = out[:i+len(replyBeginTLS)+2]
		}
		if !bytes.HasPrefix(out, []byte(replyGreeting+"\r\n")) {
			t.Fatalf("output does not start with the greeting: %q", out)
		}
		if !bytes.HasSuffix(out, []byte("\r\n")) {
			t.Fatalf("output not CRLF-terminated: %q", out)
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(out), "\r\n"), "\r\n") {
			if strings.ContainsAny(line, "\r\n\x00") {
				t.Fatalf("bad output line %q", line)
			}
		}
		if !sess.Trusted && !sess.Secure && len(d.Users()) > 0 {
			t.Fatalf("plaintext login attempted on an insecure untrusted session")
		}
	})
}

// FuzzParseCommand checks the command parser and the AUTH PLAIN decoding
// on arbitrary lines.
func FuzzParseCommand(f *testing.F) {
	f.Fuzz(func(t *testing.T, line []byte) {
		if len(line) > 1<<10 {
			// Nothing in the parser depends on length past the keyword;
			// long inputs only stall the fuzzer's quadratic minimization.
			t.Skip()
		}
		cmd, err := parseCommand(line)
		if err != nil {
			return
		}
		if cmd.name == "" || len(cmd.name) > maxKeyword {
			t.Fatalf("keyword %q", cmd.name)
		}
		for _, c := range []byte(cmd.name) {
			if c < 'A' || c > 'Z' {
				t.Fatalf("keyword %q not upper-case letters", cmd.name)
			}
		}
		if strings.ContainsAny(cmd.args, "\x00\r\n") {
			t.Fatalf("args %q contain NUL, CR or LF", cmd.args)
		}
		// The line is the keyword (in any case), then " " and the args.
		name, args, hasArgs := bytes.Cut(line, []byte{' '})
		if !strings.EqualFold(string(name), cmd.name) || string(args) != cmd.args {
			t.Fatalf("parse(%q) = %+v", line, cmd)
		}
		re := cmd.name
		if hasArgs {
			re += " " + cmd.args
		}
		again, err := parseCommand([]byte(re))
		if err != nil || again != cmd {
			t.Fatalf("reparse of %q = %+v, %v; want %+v", re, again, err, cmd)
		}

		// The args as an AUTH PLAIN initial response.
		msg, err := decodeSASLResponse(cmd.args)
		if err != nil {
			return
		}
		cr, err := parsePlain(msg)
		if err != nil {
			return
		}
		if cr.user == "" || strings.ContainsAny(cr.user, "\x00\r\n") || !cr.isPlain() {
			t.Fatalf("credentials from %q: user %q", msg, cr.user)
		}
		if cr.String() != cr.user || cr.LogValue().String() != cr.user {
			t.Fatal("credentials print more than the user")
		}
	})
}
