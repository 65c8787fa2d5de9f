package wire_test

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/wire"
)

func TestLiteralHeader(t *testing.T) {
	tests := []struct {
		line    string
		start   int
		n       int64
		nonSync bool
		ok      bool
	}{
		{"NOOP {3+}", 5, 3, true, true},
		{"NOOP {3}", 5, 3, false, true},
		{"x {5}", 2, 5, false, true},
		{"x {5+}", 2, 5, true, true},
		{"{0}", 0, 0, false, true},
		{"x {99999999999}", 2, 1 << 33, false, true},
		{"x {99999999999999999999+}", 2, 1 << 33, true, true},
		{"x {+}", 0, 0, false, false},
		{"x {}", 0, 0, false, false},
		{"x {3++}", 0, 0, false, false},
		{"x {5-}", 0, 0, false, false},
		{"x {-3}", 0, 0, false, false},
		{"x {3} ", 0, 0, false, false},
		{"}", 0, 0, false, false},
		{"x 3}", 0, 0, false, false},
		{"x 5}", 0, 0, false, false},
	}
	for _, tc := range tests {
		start, n, nonSync, ok := wire.LiteralHeader([]byte(tc.line))
		// Saturated sizes only need to be at least the cap.
		if ok != tc.ok || (ok && (start != tc.start || nonSync != tc.nonSync || n < tc.n || (tc.n < 1<<33 && n != tc.n))) {
			t.Errorf("LiteralHeader(%q) = %d, %d, %v, %v; want %d, %d, %v, %v",
				tc.line, start, n, nonSync, ok, tc.start, tc.n, tc.nonSync, tc.ok)
		}
	}
}

// frames reads every frame of input; conts counts continuation requests
// (cont is nil when withCont is false).
func frames(input string, lim wire.FrameLimits, withCont bool) (fs []*wire.Frame, conts int, err error) {
	r := wire.NewReaderFrom(strings.NewReader(input), 0)
	var cont func() error
	if withCont {
		cont = func() error { conts++; return nil }
	}
	for {
		f, err := r.ReadFrame(lim, cont)
		if err != nil {
			return fs, conts, err
		}
		fs = append(fs, f)
	}
}

func TestReadFrame(t *testing.T) {
	lim := wire.FrameLimits{Literal: 10, Literals: 2}
	fs, conts, err := frames("a {3}\r\nabc {2+}\r\nde\r\nb NOOP\r\n", lim, true)
	if len(fs) != 2 || conts != 1 || err != io.EOF {
		t.Fatalf("got %d frames, %d continuations, err %v", len(fs), conts, err)
	}
	if !slices.EqualFunc(fs[0].Lits, [][]byte{[]byte("abc"), []byte("de")}, bytes.Equal) ||
		!slices.EqualFunc(fs[0].Lines, [][]byte{[]byte("a {3}"), []byte(" {2+}"), []byte("")}, bytes.Equal) {
		t.Errorf("frame %q %q", fs[0].Lines, fs[0].Lits)
	}
	if got := string(fs[0].Bytes()); got != "a {3}\r\nabc {2+}\r\nde\r\n" {
		t.Errorf("Bytes = %q", got)
	}

	tests := []struct {
		name     string
		in       string
		lim      wire.FrameLimits
		withCont bool
		err      error
		conts    int
	}{
		// With continuation requests, a synchronizing literal over the cap
		// is refused before the request; a non-synchronizing one is coming.
		{"sync over cap", "a {11}\r\n", lim, true, wire.ErrLiteralTooBig, 0},
		{"non-sync over cap", "a {11+}\r\n", lim, true, wire.ErrLiteralDesync, 0},
		{"huge", "a {99999999999999999999999}\r\n", lim, true, wire.ErrLiteralTooBig, 0},
		{"too many sync", "a {0}\r\n {0}\r\n {0}\r\n", lim, true, wire.ErrLiteralTooBig, 2},
		{"too many non-sync", "a" + strings.Repeat(" {0+}\r\n", 3), lim, true, wire.ErrLiteralDesync, 0},
		// Without continuation requests every literal is coming at once.
		{"no cont, sync over cap", "a {11}\r\n", lim, false, wire.ErrLiteralDesync, 0},
		{"no cont, at cap", "A {10}\r\n0123456789\r\n", lim, false, io.EOF, 0},
		{"total before literal", "A" + strings.Repeat(" ", 95) + "{10+}\r\n0123456789\r\n",
			wire.FrameLimits{Literal: 10, Literals: 2, Total: 100}, false, wire.ErrLiteralDesync, 0},
		{"total after line", "A {10+}\r\n0123456789" + strings.Repeat("x", 90) + "\r\n",
			wire.FrameLimits{Literal: 10, Literals: 2, Total: 100}, false, wire.ErrLiteralDesync, 0},
		{"total zero is no bound", "A" + strings.Repeat(" ", 95) + "{10+}\r\n0123456789\r\n", lim, false, io.EOF, 0},
		{"short literal", "A {5+}\r\nab", lim, false, io.ErrUnexpectedEOF, 0},
	}
	for _, tc := range tests {
		_, conts, err := frames(tc.in, tc.lim, tc.withCont)
		if !errors.Is(err, tc.err) || conts != tc.conts {
			t.Errorf("%s: err %v, %d continuations; want %v, %d", tc.name, err, conts, tc.err, tc.conts)
		}
	}

	// A failing continuation stops the frame and is returned.
	errCont := errors.New("write failed")
	r := wire.NewReaderFrom(strings.NewReader("a {3}\r\nabc\r\n"), 0)
	f, err := r.ReadFrame(lim, func() error { return errCont })
	if !errors.Is(err, errCont) || f == nil || len(f.Lines) != 1 {
		t.Errorf("continuation error: frame %+v, err %v", f, err)
	}
}

func atomChar(b byte) bool {
	return b > ' ' && b < 0x7f && !strings.ContainsRune(`(){"\`, rune(b))
}

// show renders tokens compactly: atoms bare, strings quoted, lists in parens.
func show(ts []wire.Token) string {
	var parts []string
	for _, t := range ts {
		switch t.Kind {
		case wire.Atom:
			parts = append(parts, t.S)
		case wire.String:
			parts = append(parts, "'"+t.S+"'")
		case wire.List:
			parts = append(parts, "("+show(t.List)+")")
		}
	}
	return strings.Join(parts, " ")
}

func TestTokens(t *testing.T) {
	sx := wire.Syntax{AtomChar: atomChar, MaxDepth: 3}
	nul := wire.Syntax{AtomChar: atomChar, MaxDepth: 3, NoNULInLiteral: true}
	tests := []struct {
		sx    wire.Syntax
		in    string
		start int
		want  string
		err   bool
	}{
		{sx, "a1 LOGIN alice secret", 0, "a1 LOGIN alice secret", false},
		{sx, "a1 LOGIN alice secret", 9, "alice secret", false},
		{sx, `x "al ice" "s\"e\\c"`, 0, `x 'al ice' 's"e\c'`, false},
		{sx, "x {5}\r\nalice {6+}\r\nsecret", 0, "x 'alice' 'secret'", false},
		{sx, "x {0}\r\n {0+}\r\n", 0, "x '' ''", false},
		{sx, `x ("k" NIL (a (b)))`, 0, "x ('k' NIL (a (b)))", false},
		{sx, "x ()", 0, "x ()", false},
		{sx, "x   y  ", 0, "x y", false},
		{sx, "x \"p\xc3\xa4\"", 0, "x 'p\xc3\xa4'", false},
		{sx, "x {3}\r\na\x00c", 0, "x 'a\x00c'", false},
		{nul, "x {3}\r\na\x00c", 0, "", true},
		{sx, `x "open`, 0, "", true},
		{sx, `x "bad\escape"`, 0, "", true},
		{sx, "x \"a\x00b\"", 0, "", true},
		{sx, "x \"a\rb\"", 0, "", true},
		{sx, `x "a"b`, 0, "", true},
		{sx, `x a"b"`, 0, "", true},
		{sx, "x (a", 0, "", true},
		{sx, "x a)", 0, "", true},
		{sx, "x ((((a))))", 0, "", true},
		{sx, "x \"y {3}\r\nabc\"", 0, "", true},
		{sx, "x y{3}\r\nabc", 0, "", true},
		{sx, "x \x80", 0, "", true},
	}
	for _, tc := range tests {
		fs, _, ferr := frames(tc.in+"\r\n", wire.FrameLimits{Literal: 100, Literals: 4}, false)
		if len(fs) != 1 {
			t.Errorf("%q: framed %d frames (%v)", tc.in, len(fs), ferr)
			continue
		}
		got, err := tc.sx.Tokens(fs[0], tc.start)
		if tc.err {
			if !errors.Is(err, wire.ErrSyntax) {
				t.Errorf("Tokens(%q) = %s, %v; want a syntax error", tc.in, show(got), err)
			}
			continue
		}
		if err != nil || show(got) != tc.want {
			t.Errorf("Tokens(%q) = %s, %v; want %s", tc.in, show(got), err, tc.want)
		}
	}
	// A literal's data after a line that was not reached as a token.
	f := &wire.Frame{Lines: [][]byte{[]byte("x {3}"), []byte("")}, Lits: [][]byte{[]byte("abc")}}
	if got, err := sx.Tokens(f, 0); err != nil || show(got) != "x 'abc'" {
		t.Errorf("Tokens of a built frame = %s, %v", show(got), err)
	}
}

func TestTokenHelpers(t *testing.T) {
	if !(wire.Token{Kind: wire.Atom, S: "nil"}).IsAtom("NIL") || (wire.Token{Kind: wire.String, S: "NIL"}).IsAtom("NIL") {
		t.Error("IsAtom does not tell the atom NIL from the string")
	}
	if !(wire.Token{Kind: wire.String}).IsString() || (wire.Token{Kind: wire.Atom}).IsString() {
		t.Error("IsString")
	}
	if got := wire.UpperASCII("aBc-\xc3\xa4z"); got != "ABC-\xc3\xa4Z" {
		t.Errorf("UpperASCII = %q", got)
	}
}

func TestAppend(t *testing.T) {
	if got := string(wire.AppendQuoted([]byte("x "), `a"b\c`)); got != `x "a\"b\\c"` {
		t.Errorf("AppendQuoted = %q", got)
	}
	if got := string(wire.AppendQuoted(nil, "")); got != `""` {
		t.Errorf("AppendQuoted empty = %q", got)
	}
	if got := string(wire.AppendLiteralHeader([]byte("x "), 12, false)); got != "x {12}\r\n" {
		t.Errorf("AppendLiteralHeader = %q", got)
	}
	if got := string(wire.AppendLiteralHeader(nil, 0, true)); got != "{0+}\r\n" {
		t.Errorf("AppendLiteralHeader non-sync = %q", got)
	}
}

// FuzzStrings checks that any string encoded as a quoted string (when it
// can be one) or a literal frames and tokenizes back to itself.
func FuzzStrings(f *testing.F) {
	f.Add("alice")
	f.Add(`a"b\c`)
	f.Add("a\r\nb\x00")
	f.Add("{3}")
	sx := wire.Syntax{AtomChar: atomChar, MaxDepth: 2, NoNULInLiteral: false}
	f.Fuzz(func(t *testing.T, s string) {
		encs := [][]byte{append(wire.AppendLiteralHeader([]byte("X "), len(s), true), s...)}
		if !strings.ContainsAny(s, "\x00\r\n") {
			encs = append(encs, wire.AppendQuoted([]byte("X "), s))
		}
		for _, enc := range encs {
			fs, _, err := frames(string(enc)+"\r\n", wire.FrameLimits{Literal: len(s), Literals: 1}, false)
			if len(fs) != 1 || err != io.EOF {
				t.Fatalf("%q framed as %d frames, err %v", enc, len(fs), err)
			}
			toks, err := sx.Tokens(fs[0], 0)
			if err != nil || len(toks) != 2 || toks[1].Kind != wire.String || toks[1].S != s {
				t.Fatalf("%q tokenizes as %s, %v", enc, show(toks), err)
			}
		}
	})
}
