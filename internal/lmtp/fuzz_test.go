package lmtp

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
	"github.com/usher-mail/usher/internal/testutil/proxytest"
)

// FuzzParsePath feeds arbitrary text to the MAIL and RCPT argument parsers.
// Whatever they accept must be a clean mailbox: no control octets, valid
// UTF-8, within maxPath, parsing again to the same result, and parameters
// that can be forwarded as they are.
func FuzzParsePath(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		for _, parse := range []func(string) (path, []param, error){
			func(s string) (path, []param, error) { return parseMailArg("FROM:" + s) },
			func(s string) (path, []param, error) { return parseRcptArg("TO:" + s) },
		} {
			p, params, err := parse(s)
			if err != nil {
				continue
			}
			if len(p.raw) > maxPath || !utf8.ValidString(p.raw) {
				t.Fatalf("accepted raw %q", p.raw)
			}
			for i := 0; i < len(p.raw); i++ {
				if c := p.raw[i]; c < 0x20 || c == 0x7f || (c >= 0x80 && !p.utf8) {
					t.Fatalf("accepted raw %q with octet %#x (utf8 %v)", p.raw, c, p.utf8)
				}
			}
			if p.raw != "" {
				again, rest, err := parsePath("<" + p.raw + ">")
				if err != nil || rest != "" || again != p {
					t.Fatalf("%q reparsed as %+v %q %v, first %+v", p.raw, again, rest, err, p)
				}
				if u := p.routingUser("+-"); u == "" || len(u) > len(p.local)+1+len(p.domain) {
					t.Fatalf("routing user %q of %+v", u, p)
				}
			}
			for _, pr := range params {
				if !validKeyword(pr.key) || pr.key != strings.ToUpper(pr.key) ||
					strings.ContainsAny(pr.value, " =\r\n\x00") {
					t.Fatalf("accepted parameter %+v", pr)
				}
			}
		}
	})
}

// In FuzzSession command lines are capped at fuzzMaxLine, message lines at
// fuzzMaxDataLine and the memory spool at fuzzMemSpool, so short inputs
// reach the overlong-line and file spool paths; inputs over maxFuzzInput are skipped (the fuzzer's
// minimization is quadratic in the input length).
const (
	fuzzMaxLine     = 256
	fuzzMemSpool    = 64
	fuzzMaxDataLine = 512
	maxFuzzInput    = 8 << 10
)

// FuzzSession feeds arbitrary client input to the session state machine.
// The first byte selects options: bit 0 a starttls listener, bit 1 a
// Director that accepts every user (whose backend cannot be reached: every
// delivery fails at connect), otherwise one that refuses everyone; bit 2 a
// 100-octet size limit; bit 3 an accepting Director and a backend that
// answers with what the next bytes hold (two length octets, then the
// script) and then hangs up, so backend replies are fuzzed too. Serve must return by itself, release every lease,
// leave no spool file behind, and everything it writes before any TLS
// handshake must be CRLF-terminated replies, starting with the greeting.
func FuzzSession(f *testing.F) {
	srvTLS := testutil.LoopbackPKI(f).Server
	local, remote := netip.MustParseAddrPort("127.0.0.1:24"), netip.MustParseAddrPort("127.0.0.2:4000")
	discard := slog.New(slog.DiscardHandler)
	base := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxFuzzInput {
			t.Skip()
		}
		var flags byte
		if len(data) > 0 {
			flags, data = data[0], data[1:]
		}
		var script []byte // what the backend says, with flag bit 3
		if flags&8 != 0 && len(data) >= 2 {
			n := min(int(data[0])<<8|int(data[1]), len(data)-2)
			script, data = data[2:2+n], data[2+n:]
		}
		conn := testutil.NewMemConn(data, local, remote)
		sess := &proxy.Session{
			ID:      "fuzz",
			Proto:   "lmtp",
			Conn:    conn,
			Remote:  remote,
			Local:   local,
			Log:     discard,
			TLSMode: config.TLSNone,
		}
		if flags&1 != 0 {
			sess.TLSMode, sess.TLSConfig = config.TLSStartTLS, srvTLS
		}
		d := proxytest.NewDirector(netip.MustParseAddr("127.0.0.1"))
		if flags&(2|8) == 0 {
			d.SetErr(proxy.ErrUnavailable) // counts attempts and refuses every user
		}
		// Inputs run one at a time in each process, so base must be empty
		// before and after each run.
		dir := base
		o := Options{Director: d, Hostname: "usher.fuzz", IdleTimeout: time.Second,
			DataTimeout: time.Second, SpoolDir: dir, RecipientDelimiter: "+",
			Backend: proxy.BackendOptions{LoginTimeout: time.Second}}
		if flags&4 != 0 {
			o.MaxMessageSize = 100
		}
		srv := New(o)
		srv.maxLine = fuzzMaxLine
		srv.memSpool = fuzzMemSpool
		srv.maxDataLine = fuzzMaxDataLine
		srv.dial = func(context.Context, netip.Addr, *proxy.Session) (net.Conn, error) {
			if script == nil {
				return nil, errors.New("fuzz: no backend")
			}
			// The backend's replies are all there at once, then EOF;
			// what usher sends is collected and ignored.
			return testutil.NewMemConn(script, local, remote), nil
		}

		// Synchronous: MemConn reads never block and the Director and dial
		// answer at once, so Serve must return by itself (a hang fails the
		// run by its timeout).
		reason := srv.Serve(context.Background(), sess)
		if reason == "" {
			t.Fatal("empty end reason")
		}
		if h := d.Held(); h != 0 {
			t.Fatalf("%d leases not released (reason %q)", h, reason)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Fatalf("spool files left: %v", entries)
		}
		out := conn.Output()
		if i := bytes.Index(out, []byte("220 2.0.0 Ready to start TLS\r\n")); i >= 0 {
			out = out[:i] // then come TLS records
		}
		if !bytes.HasPrefix(out, []byte("220 usher.fuzz usher LMTP ready\r\n")) {
			t.Fatalf("output does not start with the greeting: %q", out)
		}
		for _, l := range bytes.SplitAfter(out, []byte("\r\n")) {
			if len(l) == 0 {
				continue
			}
			if !bytes.HasSuffix(l, []byte("\r\n")) || len(l) < 5 || bytes.ContainsAny(l[:len(l)-2], "\r\n") {
				t.Fatalf("malformed reply line %q in %q", l, out)
			}
			for _, c := range l[:3] {
				if c < '0' || c > '9' {
					t.Fatalf("reply line %q without a code", l)
				}
			}
		}
	})
}
