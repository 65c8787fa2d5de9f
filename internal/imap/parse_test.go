package imap

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/wire"
)

// frame reads all commands of input like the server does; conts counts the
// continuation requests sent.
func frame(input string, maxLiteral int) (cmds []*wire.Frame, conts int, err error) {
	r := wire.NewReaderFrom(strings.NewReader(input), 0)
	for {
		raw, err := readCommand(r, maxLiteral, func() error { conts++; return nil })
		if err != nil {
			return cmds, conts, err
		}
		cmds = append(cmds, raw)
	}
}

// show renders args compactly: atoms bare, strings quoted, lists in parens.
func show(args []arg) string {
	var parts []string
	for _, a := range args {
		switch a.Kind {
		case wire.Atom:
			parts = append(parts, a.S)
		case wire.String:
			parts = append(parts, "'"+a.S+"'")
		case wire.List:
			parts = append(parts, "("+show(a.List)+")")
		}
	}
	return strings.Join(parts, " ")
}

func TestParseCommand(t *testing.T) {
	tests := []struct {
		in        string
		tag, name string
		args      string
		err       error
	}{
		{in: "a1 LOGIN alice secret", tag: "a1", name: "LOGIN", args: "alice secret"},
		{in: "a1 login \"al ice\" \"s\\\"e\\\\c\"", tag: "a1", name: "LOGIN", args: `'al ice' 's"e\c'`},
		{in: "a1 LOGIN {5}\r\nalice {6+}\r\nsecret", tag: "a1", name: "LOGIN", args: "'alice' 'secret'"},
		{in: "a1 LOGIN {0}\r\n {0+}\r\n", tag: "a1", name: "LOGIN", args: "'' ''"},
		{in: "x ID (\"name\" \"mutt\" \"os\" NIL)", tag: "x", name: "ID", args: "('name' 'mutt' 'os' NIL)"},
		{in: "x ID (\"k\" {2}\r\nv1)", tag: "x", name: "ID", args: "('k' 'v1')"},
		{in: "x ID ((a) (b (c)))", tag: "x", name: "ID", args: "((a) (b (c)))"},
		{in: "x ID ()", tag: "x", name: "ID", args: "()"},
		{in: "tag]1 NOOP", tag: "tag]1", name: "NOOP"},
		{in: "a1 NOOP  ", tag: "a1", name: "NOOP"},
		{in: "a1 LOGIN u p]%*", tag: "a1", name: "LOGIN", args: "u p]%*"},
		{in: "a1 LOGIN \"pä\" x", tag: "a1", name: "LOGIN", args: "'pä' x"},
		{in: "", err: errBadTag},
		{in: " NOOP", err: errBadTag},
		{in: "a+1 NOOP", err: errBadTag},
		{in: "a*1 NOOP", err: errBadTag},
		{in: "\"a\" NOOP", err: errBadTag},
		{in: "a1", tag: "a1", err: errNoName},
		{in: "a1 ", tag: "a1", err: errNoName},
		{in: "a1 NO\x01OP", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN \"open", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN \"bad\\escape\"", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN \"a\"b", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN a\"b\"", tag: "a1", err: errSyntax},
		{in: "a1 ID (a", tag: "a1", err: errSyntax},
		{in: "a1 ID a)", tag: "a1", err: errSyntax},
		{in: "a1 ID ((((((((((a))))))))))", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN \"x {3}\r\nabc\"", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN {3}\r\na\x00c", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN x{3}\r\nabc", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN {3}\r\nabcdef", tag: "a1", err: errSyntax},
		{in: "a1 LOGIN \x80", tag: "a1", err: errSyntax},
	}
	for _, tc := range tests {
		cmds, _, ferr := frame(tc.in+"\r\n", 100)
		if len(cmds) != 1 {
			t.Errorf("%q: framed %d commands (%v)", tc.in, len(cmds), ferr)
			continue
		}
		cmd, err := parseCommand(cmds[0])
		if !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("%q: err %v, want %v", tc.in, err, tc.err)
			continue
		}
		if cmd.tag != tc.tag {
			t.Errorf("%q: tag %q, want %q", tc.in, cmd.tag, tc.tag)
		}
		if err == nil && (cmd.name != tc.name || show(cmd.args) != tc.args) {
			t.Errorf("%q: got %s [%s], want %s [%s]", tc.in, cmd.name, show(cmd.args), tc.name, tc.args)
		}
	}
}

func TestFraming(t *testing.T) {
	cmds, conts, err := frame("a {3}\r\nabc {2+}\r\nde\r\nb NOOP\r\n", 10)
	if len(cmds) != 2 || conts != 1 || err == nil {
		t.Fatalf("got %d commands, %d continuations, err %v", len(cmds), conts, err)
	}
	if !slices.EqualFunc(cmds[0].Lits, [][]byte{[]byte("abc"), []byte("de")}, bytes.Equal) {
		t.Errorf("literals %q", cmds[0].Lits)
	}
	_, conts, err = frame("a {11}\r\n", 10)
	if !errors.Is(err, errLitLimit) || conts != 0 {
		t.Errorf("sync over cap: err %v, %d continuations", err, conts)
	}
	_, _, err = frame("a {11+}\r\n", 10)
	if !errors.Is(err, errNonSyncLimit) {
		t.Errorf("non-sync over cap: err %v", err)
	}
	_, _, err = frame("a {99999999999999999999999}\r\n", 10)
	if !errors.Is(err, errLitLimit) {
		t.Errorf("huge literal: err %v", err)
	}
	_, _, err = frame("a"+strings.Repeat(" {0+}\r\n", maxLiterals+1), 10)
	if !errors.Is(err, errNonSyncLimit) {
		t.Errorf("too many literals: err %v", err)
	}
}
