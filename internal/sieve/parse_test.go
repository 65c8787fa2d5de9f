package sieve

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/wire"
)

var testLimits = wire.FrameLimits{Literal: 1 << 20, Literals: 16, Total: 4 << 20}

// frame reads all frames of s.
func frame(s string, lim wire.FrameLimits) ([]*wire.Frame, error) {
	r := wire.NewReaderFrom(strings.NewReader(s), 0)
	var out []*wire.Frame
	for {
		f, err := r.ReadFrame(lim, nil)
		if err != nil {
			return out, err
		}
		out = append(out, f)
	}
}

func TestParseCommand(t *testing.T) {
	tests := []struct {
		in   string
		name string
		args []string // kind prefix: a: atom, s: string
		err  error
	}{
		{"CAPABILITY\r\n", "CAPABILITY", nil, nil},
		{"noop  \"x y\"  \r\n", "NOOP", []string{"s:x y"}, nil},
		{"AUTHENTICATE \"PLAIN\" {5+}\r\nab\r\nc\r\n", "AUTHENTICATE", []string{"s:PLAIN", "s:ab\r\nc"}, nil},
		{"PUTSCRIPT {1}\r\nx {0}\r\n\r\n", "PUTSCRIPT", []string{"s:x", "s:"}, nil},
		{"NOOP \"a\\\\b\\\"c\"\n", "NOOP", []string{`s:a\b"c`}, nil},
		{"NOOP \"\xc3\xa4\"\r\n", "NOOP", []string{"s:\xc3\xa4"}, nil},
		{"AUTHENTICATE PLAIN *\r\n", "AUTHENTICATE", []string{"a:PLAIN", "a:*"}, nil},
		{"\r\n", "", nil, errNoName},
		{"\"NOOP\"\r\n", "", nil, errSyntax},
		{"NO0P\r\n", "", nil, errSyntax},
		{"NOOP \"x\r\n", "", nil, errSyntax},
		{"NOOP \"a\\nb\"\r\n", "", nil, errSyntax},
		{"NOOP \"x\"y\r\n", "", nil, errSyntax},
		{"NOOP )\r\n", "", nil, errSyntax},
		{"NOOP ((((((x))))))\r\n", "", nil, errSyntax},
		{"NOOP \"x{3+}\r\nabc\"\r\n", "", nil, errSyntax},
		{"NOOP x{1+}\r\na\r\n", "", nil, errSyntax},
		{"NOOP \x01\r\n", "", nil, errSyntax},
	}
	for _, tc := range tests {
		fs, err := frame(tc.in, testLimits)
		if len(fs) != 1 || err != io.EOF {
			t.Errorf("%q framed as %d frames, err %v", tc.in, len(fs), err)
			continue
		}
		cmd, err := parseCommand(fs[0])
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("parseCommand(%q) err %v, want %v", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseCommand(%q): %v", tc.in, err)
			continue
		}
		var got []string
		for _, a := range cmd.args {
			k := "a:"
			if a.Kind == wire.String {
				k = "s:"
			}
			got = append(got, k+a.S)
		}
		if cmd.name != tc.name || !slices.Equal(got, tc.args) {
			t.Errorf("parseCommand(%q) = %s %q, want %s %q", tc.in, cmd.name, got, tc.name, tc.args)
		}
	}
}

func TestParseResponse(t *testing.T) {
	tests := []struct {
		in                 string
		ok                 bool
		status, code, text string
	}{
		{"OK \"Logged in.\"\r\n", true, "OK", "", "Logged in."},
		{"ok\r\n", true, "OK", "", ""},
		{"NO (TRYLATER) \"later\"\r\n", true, "NO", "TRYLATER", "later"},
		{"NO (trylater/noretry) \"x\"\r\n", true, "NO", "TRYLATER/NORETRY", "x"},
		{"NO (REFERRAL sieve://b.example) \"moved\"\r\n", true, "NO", "REFERRAL", "moved"},
		{"NO (SASL \"abc\") {3}\r\nx\ny\r\n", true, "NO", "SASL", "x\ny"},
		{"BYE \"bye\"\r\n", true, "BYE", "", "bye"},
		{"\"SASL\" \"PLAIN\"\r\n", false, "", "", ""},
		{"\"\"\r\n", false, "", "", ""},
		{"PREAUTH\r\n", false, "", "", ""},
	}
	for _, tc := range tests {
		fs, err := frame(tc.in, testLimits)
		if len(fs) != 1 || err != io.EOF {
			t.Fatalf("%q framed as %d frames, err %v", tc.in, len(fs), err)
		}
		args, err := parseArgs(fs[0])
		if err != nil {
			t.Errorf("parseArgs(%q): %v", tc.in, err)
			continue
		}
		r, ok := toResponse(fs[0], args)
		if ok != tc.ok || (ok && (r.status != tc.status || r.code != tc.code || r.text != tc.text)) {
			t.Errorf("toResponse(%q) = %+v, %v", tc.in, r, ok)
		}
		if ok && string(r.frame.Bytes()) != tc.in {
			t.Errorf("frame of %q renders as %q", tc.in, r.frame.Bytes())
		}
	}
}

func TestFrameBytesKeepsLiterals(t *testing.T) {
	in := "NO (SASL \"abc\") {3}\r\nx\ny and {2}\r\n\r\n\r\nNOOP\r\n"
	fs, err := frame(in, testLimits)
	if len(fs) != 2 || err != io.EOF {
		t.Fatalf("framed as %d frames, err %v", len(fs), err)
	}
	if got := string(fs[0].Bytes()) + string(fs[1].Bytes()); got != in {
		t.Errorf("frames render as %q, want %q", got, in)
	}
}

func TestReadFrameLimits(t *testing.T) {
	lim := wire.FrameLimits{Literal: 10, Literals: 2, Total: 100}
	tests := []struct {
		in  string
		err error
	}{
		{"A {10+}\r\n0123456789\r\n", io.EOF},
		{"A {11+}\r\n01234567890\r\n", errLitLimit},
		{"A {1+}\r\na {1+}\r\nb\r\n", io.EOF},
		{"A {1+}\r\na {1+}\r\nb {1+}\r\nc\r\n", errLitLimit},
		{"A" + strings.Repeat(" ", 95) + "{10+}\r\n0123456789\r\n", errLitLimit},
		{"A {5+}\r\nab", io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		_, err := frame(tc.in, lim)
		if !errors.Is(err, tc.err) {
			t.Errorf("frame(%.40q) err %v, want %v", tc.in, err, tc.err)
		}
	}
}

func TestAppendString(t *testing.T) {
	tests := []struct {
		s          string
		fromClient bool
		want       string
	}{
		{"abc", false, `"abc"`},
		{`a"b\c`, true, `"a\"b\\c"`},
		{"", false, `""`},
		{"ä", false, `"ä"`},
		{"a\r\nb", false, "{4}\r\na\r\nb"},
		{"a\x00b", true, "{3+}\r\na\x00b"},
		{"\xff", false, "{1}\r\n\xff"},
		{strings.Repeat("x", 1024), false, `"` + strings.Repeat("x", 1024) + `"`},
		{strings.Repeat("x", 1025), true, "{1025+}\r\n" + strings.Repeat("x", 1025)},
	}
	for _, tc := range tests {
		if got := string(appendString(nil, tc.s, tc.fromClient)); got != tc.want {
			t.Errorf("appendString(%.20q, %v) = %.40q, want %.40q", tc.s, tc.fromClient, got, tc.want)
		}
	}
}

func TestAuthCommand(t *testing.T) {
	cr := &sasl.Credentials{Authzid: "z", Authcid: "u", Password: "p"}
	want := `AUTHENTICATE "PLAIN" "` + plainB64("z", "u", "p") + "\"\r\n"
	if got := string(authCommand(cr)); got != want {
		t.Errorf("authCommand = %q, want %q", got, want)
	}
}

func TestReplyFormat(t *testing.T) {
	for _, tc := range []struct {
		r    reply
		want string
	}{
		{reply{status: "NO", text: "x"}, `NO "x"`},
		{reply{status: "NO", code: "TRYLATER", text: `a"b`}, `NO (TRYLATER) "a\"b"`},
		{reply{status: "BYE", text: ""}, `BYE ""`},
	} {
		if got := tc.r.format(); got != tc.want {
			t.Errorf("format(%+v) = %q, want %q", tc.r, got, tc.want)
		}
	}
	if got := string(ok("TAG {1}\r\nx", "Done")); got != "OK (TAG {1}\r\nx) \"Done\"\r\n" {
		t.Errorf("ok = %q", got)
	}
}

// roundTrip encodes s both ways, reframes and reparses it.
func roundTrip(t *testing.T, s string) {
	t.Helper()
	for _, fromClient := range []bool{true, false} {
		enc := string(appendString([]byte("NOOP "), s, fromClient)) + "\r\n"
		fs, err := frame(enc, wire.FrameLimits{Literal: 1 << 20, Literals: 1, Total: 2 << 20})
		if len(fs) != 1 || err != io.EOF {
			t.Fatalf("encoding of %q framed as %d frames, err %v", s, len(fs), err)
		}
		cmd, err := parseCommand(fs[0])
		if err != nil {
			t.Fatalf("encoding of %q does not parse: %v", s, err)
		}
		if cmd.name != "NOOP" || len(cmd.args) != 1 || cmd.args[0].Kind != wire.String || cmd.args[0].S != s {
			t.Fatalf("encoding %q of %q parses as %s %+v", enc, s, cmd.name, cmd.args)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	for _, s := range []string{"", "x", `"\`, "a\r\nb", "\x00", "{3}", "x {3+}", strings.Repeat("\xc3\xa4", 600), "\xff\xfe"} {
		t.Run(fmt.Sprintf("%.10q", s), func(t *testing.T) { roundTrip(t, s) })
	}
	// A long frame keeps its bytes.
	if b := appendString(nil, strings.Repeat("x", 2000), false); !bytes.HasPrefix(b, []byte("{2000}\r\n")) {
		t.Errorf("long string encoded as %.20q", b)
	}
}
