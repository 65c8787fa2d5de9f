package lmtp

import (
	"bytes"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/wire"
)

func TestParsePath(t *testing.T) {
	cases := []struct {
		in                 string
		raw, local, domain string
		utf8               bool
		rest               string
		wantErr            bool
	}{
		{in: "<a@b.example>", raw: "a@b.example", local: "a", domain: "b.example"},
		{in: "<>", raw: ""},
		{in: "<> SIZE=1", rest: " SIZE=1"},
		{in: "<a@b> SIZE=1 BODY=8BITMIME", raw: "a@b", local: "a", domain: "b", rest: " SIZE=1 BODY=8BITMIME"},
		{in: `<"x y"@d.example>`, raw: `"x y"@d.example`, local: "x y", domain: "d.example"},
		{in: `<"a\"b\\c"@d>`, raw: `"a\"b\\c"@d`, local: `a"b\c`, domain: "d"},
		{in: "<@r1.example,@r2.example:u@d>", raw: "u@d", local: "u", domain: "d"},
		{in: "<u@[192.0.2.1]>", raw: "u@[192.0.2.1]", local: "u", domain: "[192.0.2.1]"},
		{in: "<u@[IPv6:2001:db8::1]>", raw: "u@[IPv6:2001:db8::1]", local: "u", domain: "[IPv6:2001:db8::1]"},
		{in: "<Postmaster>", raw: "Postmaster", local: "Postmaster"},
		{in: "<a..b.@host_1.example>", raw: "a..b.@host_1.example", local: "a..b.", domain: "host_1.example"},
		{in: "<jörg@bücher.example>", raw: "jörg@bücher.example", local: "jörg", domain: "bücher.example", utf8: true},
		{in: "<user+tag@d>", raw: "user+tag@d", local: "user+tag", domain: "d"},

		{in: "a@b", wantErr: true},
		{in: "<a@b", wantErr: true},
		{in: "<", wantErr: true},
		{in: "<@r:>", wantErr: true},
		{in: "<@r1,r2:u@d>", wantErr: true},
		{in: "<@r1;u@d>", wantErr: true},
		{in: "<a@>", wantErr: true},
		{in: "<a@b..c>", wantErr: true},
		{in: "<a@.b>", wantErr: true},
		{in: "<a@b.>", wantErr: true},
		{in: "<a b@c>", wantErr: true},
		{in: "<@>", wantErr: true},
		{in: `<"unterminated@d>`, wantErr: true},
		{in: `<"">`, wantErr: true},
		{in: `<""@d>`, wantErr: true},
		{in: "<\"a\x01\"@d>", wantErr: true},
		{in: "<\"a\\\x01\"@d>", wantErr: true},
		{in: "<\xff@d>", wantErr: true},
		{in: "<a@[]>", wantErr: true},
		{in: "<a@[x[y]>", wantErr: true},
		{in: "<a@[x y]>", wantErr: true},
		{in: "<" + strings.Repeat("a", maxPath) + "@d>", wantErr: true},
	}
	for _, tc := range cases {
		p, rest, err := parsePath(tc.in)
		if tc.wantErr {
			if err == nil {
				t.Errorf("parsePath(%q) = %+v, want error", tc.in, p)
			}
			continue
		}
		if err != nil {
			t.Errorf("parsePath(%q): %v", tc.in, err)
			continue
		}
		if p.raw != tc.raw || p.local != tc.local || p.domain != tc.domain || p.utf8 != tc.utf8 || rest != tc.rest {
			t.Errorf("parsePath(%q) = %+v rest %q, want raw %q local %q domain %q utf8 %v rest %q",
				tc.in, p, rest, tc.raw, tc.local, tc.domain, tc.utf8, tc.rest)
		}
	}
}

func TestParseMailRcptArgs(t *testing.T) {
	p, params, err := parseMailArg("from: <a@b> size=10 BODY=8BITMIME SMTPUTF8")
	if err != nil || p.raw != "a@b" || len(params) != 3 {
		t.Fatalf("got %+v %+v %v", p, params, err)
	}
	want := []param{{"SIZE", "10", true}, {"BODY", "8BITMIME", true}, {"SMTPUTF8", "", false}}
	for i := range want {
		if params[i] != want[i] {
			t.Errorf("param %d = %+v, want %+v", i, params[i], want[i])
		}
	}
	if p, _, err := parseMailArg("FROM:<>"); err != nil || p.raw != "" {
		t.Errorf("null sender: %+v %v", p, err)
	}
	for _, bad := range []string{"FROM<a@b>", "TO:<a@b>", "FROM:", "FROM:<a@b>SIZE=1"} {
		if _, _, err := parseMailArg(bad); err == nil {
			t.Errorf("parseMailArg(%q) succeeded", bad)
		}
	}
	if _, _, err := parseRcptArg("TO:<>"); err == nil {
		t.Error("null recipient accepted")
	}
	if p, _, err := parseRcptArg("To:<u@d>"); err != nil || p.raw != "u@d" {
		t.Errorf("RCPT: %+v %v", p, err)
	}
}

func TestParseParams(t *testing.T) {
	good := map[string]int{"": 0, " A": 1, "  A=b   C-1=x ": 2, " " + strings.Repeat("K ", maxParams): maxParams}
	for in, n := range good {
		ps, err := parseParams(in)
		if err != nil || len(ps) != n {
			t.Errorf("parseParams(%q) = %v, %v; want %d params", in, ps, err, n)
		}
	}
	bad := []string{"x", " =x", " -A", " A=", " A=b=c", " A=\x01", " A_B", " " + strings.Repeat("K ", maxParams+1)}
	for _, in := range bad {
		if ps, err := parseParams(in); err == nil {
			t.Errorf("parseParams(%q) = %v, want error", in, ps)
		}
	}
}

func TestParseCommand(t *testing.T) {
	v, a, err := parseCommand([]byte("rcpt TO:<a@b> X"))
	if err != nil || v != "RCPT" || a != "TO:<a@b> X" {
		t.Errorf("got %q %q %v", v, a, err)
	}
	for _, bad := range []string{"", " NOOP", "NO-OP", "N\x00OP", strings.Repeat("A", maxVerb+1)} {
		if _, _, err := parseCommand([]byte(bad)); err == nil {
			t.Errorf("parseCommand(%q) succeeded", bad)
		}
	}
}

func TestRoutingUser(t *testing.T) {
	cases := []struct{ addr, delims, want string }{
		{"<user+tag@d>", "+", "user@d"},
		{"<user+tag+more@d>", "+", "user@d"},
		{"<user-tag+x@d>", "+-", "user@d"},
		{"<user+tag@d>", "", "user+tag@d"},
		{"<+tag@d>", "+", "+tag@d"},
		{"<user+tag>", "+", "user"},
		{`<"us er+x"@d>`, "+", "us er@d"},
		{"<User+Tag@D.Example>", "+", "User@D.Example"}, // the Director applies %Lu
	}
	for _, tc := range cases {
		p, _, err := parsePath(tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.routingUser(tc.delims); got != tc.want {
			t.Errorf("routingUser(%q, %q) = %q, want %q", tc.addr, tc.delims, got, tc.want)
		}
	}
}

func TestParseHelo(t *testing.T) {
	for in, want := range map[string]string{"mx.example": "mx.example", "  [192.0.2.1] extra": "[192.0.2.1]"} {
		if got, ok := parseHelo(in); !ok || got != want {
			t.Errorf("parseHelo(%q) = %q, %v", in, got, ok)
		}
	}
	for _, bad := range []string{"", "   ", "a\x01b", "h\xc3\xa9", strings.Repeat("a", maxHelo+1)} {
		if got, ok := parseHelo(bad); ok {
			t.Errorf("parseHelo(%q) = %q", bad, got)
		}
	}
}

func TestXclientLine(t *testing.T) {
	sess := &proxy.Session{ID: "abc", Remote: netip.MustParseAddrPort("[2001:db8::1]:4000")}
	all := "ADDR PORT HELO TTL SESSION LOGIN"
	if got, want := xclientLine(all, sess, "mx.example"), "XCLIENT HELO=mx.example TTL=4 PORT=4000 SESSION=abc ADDR=2001:db8::1"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	// IPv4-mapped addresses are sent as IPv4.
	sess.Remote = netip.MustParseAddrPort("[::ffff:192.0.2.7]:25")
	if got, want := xclientLine("addr", sess, "x"), "XCLIENT ADDR=192.0.2.7"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	// A HELO that would make the line too long is dropped.
	long := strings.Repeat("+", maxHelo)
	if got := xclientLine(all, sess, long); strings.Contains(got, "HELO=") || len(got) > maxCommandLine {
		t.Errorf("long HELO: %q", got)
	}
	// Invalid session IDs and unknown remotes are left out.
	sess = &proxy.Session{ID: "a b"}
	if got, want := xclientLine(all, sess, "h"), "XCLIENT HELO=h TTL=4"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if got := xclientLine("NAME PROTO", sess, "h"); got != "" {
		t.Errorf("nothing to send, got %q", got)
	}
}

func TestSplitEnhancedAndRelay(t *testing.T) {
	for _, tc := range []struct{ in, enh, rest string }{
		{"2.1.5 ok", "2.1.5", "ok"},
		{"5.1.1", "5.1.1", ""},
		{"4.7.123   spaced", "4.7.123", "spaced"},
		{"x.1.1 t", "", "x.1.1 t"},
		{"3.1.1 t", "", "3.1.1 t"},
		{"2.1000.1 t", "", "2.1000.1 t"},
		{"2..1 t", "", "2..1 t"},
		{"2.1 t", "", "2.1 t"},
		{"plain text", "", "plain text"},
	} {
		if enh, rest := splitEnhanced(tc.in); enh != tc.enh || rest != tc.rest {
			t.Errorf("splitEnhanced(%q) = %q %q", tc.in, enh, rest)
		}
	}
	for _, tc := range []struct {
		r    smtpReply
		want string
		ok   bool
	}{
		{smtpReply{250, []string{"2.0.0 <a@b> Saved"}}, "250 2.0.0 <a@b> Saved", true},
		{smtpReply{250, []string{"Saved"}}, "250 2.0.0 Saved", true},
		{smtpReply{452, []string{"5.2.2 full"}}, "452 4.0.0 full", true},
		{smtpReply{550, []string{"5.1.1 first", "second\x1b[31m"}}, "550 5.1.1 first second?[31m", true},
		{smtpReply{421, []string{""}}, "421 4.0.0 (no text)", true},
		{smtpReply{550, []string{strings.Repeat("x", 1000)}}, "550 5.0.0 " + strings.Repeat("x", maxRelayText), true},
		{smtpReply{354, []string{"go"}}, "", false},
		{smtpReply{100, []string{"x"}}, "", false},
	} {
		got, ok := relayReply(tc.r)
		if ok != tc.ok || (ok && got.String() != tc.want) {
			t.Errorf("relayReply(%v) = %q, %v; want %q, %v", tc.r, got.String(), ok, tc.want, tc.ok)
		}
	}
}

func TestReadReply(t *testing.T) {
	read := func(in string) (smtpReply, error) {
		b := &backendConn{r: wire.NewReaderFrom(strings.NewReader(in), maxReplyLine)}
		return b.readReply()
	}
	r, err := read("250-host\r\n250-PIPELINING\r\n250 XCLIENT ADDR PORT\r\n")
	if err != nil || r.code != 250 || len(r.lines) != 3 || r.lines[2] != "XCLIENT ADDR PORT" {
		t.Errorf("got %+v %v", r, err)
	}
	if r, err := read("220\r\n"); err != nil || r.code != 220 || r.lines[0] != "" {
		t.Errorf("bare code: %+v %v", r, err)
	}
	for _, bad := range []string{"250-a\r\n251 b\r\n", "25\r\n", "2x0 x\r\n", "250x\r\n", "250-a\r\n",
		strings.Repeat("250-x\r\n", maxReplyLines+1)} {
		if r, err := read(bad); err == nil {
			t.Errorf("read(%q) = %+v", bad, r)
		}
	}
}

// TestNormalizer checks that BDAT data gets the same line ends however it
// is split into chunks, and that the dotStuffer gives it DATA's wire form
// however the spool hands it out.
func TestNormalizer(t *testing.T) {
	in := ".a\r\nb\n.\r\n..c\rd\n\nend"
	want := ".a\r\nb\r\n.\r\n..c\rd\r\n\r\nend\r\n"
	for split := 0; split <= len(in); split++ {
		for split2 := split; split2 <= len(in); split2++ {
			sp := newSpool("", 1<<20)
			st := &normalizer{sp: sp}
			for _, part := range []string{in[:split], in[split:split2], in[split2:]} {
				if err := st.write([]byte(part)); err != nil {
					t.Fatal(err)
				}
			}
			if err := st.end(); err != nil {
				t.Fatal(err)
			}
			if got := string(sp.buf); got != want {
				t.Fatalf("split at %d,%d: got %q, want %q", split, split2, got, want)
			}
		}
	}
	sp := newSpool("", 1<<20)
	st := &normalizer{sp: sp}
	_ = st.write([]byte("x\r\n"))
	_ = st.end()
	if string(sp.buf) != "x\r\n" {
		t.Errorf("complete last line changed: %q", sp.buf)
	}

	stuffed := "..a\r\nb\r\n..\r\n...c\rd\r\n\r\nend\r\n"
	for split := 0; split <= len(want); split++ {
		var out bytes.Buffer
		d := &dotStuffer{w: &out}
		for _, part := range []string{want[:split], want[split:]} {
			if n, err := d.Write([]byte(part)); err != nil || n != len(part) {
				t.Fatalf("Write = %d, %v", n, err)
			}
		}
		if out.String() != stuffed {
			t.Fatalf("split at %d: stuffed %q, want %q", split, out.String(), stuffed)
		}
	}
}

func TestSpool(t *testing.T) {
	dir := t.TempDir()
	sp := newSpool(dir, 10)
	var want bytes.Buffer
	for _, l := range []string{"12345", "abc", "a longer line that goes to the file"} {
		if err := sp.writeLine([]byte(l)); err != nil {
			t.Fatal(err)
		}
		want.WriteString(l + "\r\n")
	}
	if err := sp.finish(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "usher-lmtp-*"))
	if len(files) != 1 {
		t.Fatalf("spool files %v", files)
	}
	if fi, err := os.Stat(files[0]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("spool file mode: %v %v", fi, err)
	}
	if sp.buf != nil {
		t.Error("memory part kept after moving to the file")
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			got, err := io.ReadAll(sp.reader())
			if err != nil || string(got) != want.String() {
				t.Errorf("reader got %q, %v", got, err)
			}
		})
	}
	wg.Wait()
	if err := sp.close(); err != nil {
		t.Fatal(err)
	}
	if files, _ := filepath.Glob(filepath.Join(dir, "*")); len(files) != 0 {
		t.Errorf("left behind: %v", files)
	}
	if err := sp.close(); err != nil {
		t.Errorf("second close: %v", err)
	}

	// A spool directory that does not exist: the error sticks.
	sp = newSpool(filepath.Join(dir, "missing"), 4)
	if err := sp.writeLine([]byte("too long for memory")); err == nil {
		t.Fatal("write to a missing directory succeeded")
	}
	if err := sp.writeLine([]byte("x")); err == nil {
		t.Error("write after an error succeeded")
	}
	if err := sp.finish(); err == nil {
		t.Error("finish after an error succeeded")
	}
}
