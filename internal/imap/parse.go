package imap

import (
	"errors"
	"fmt"

	"github.com/usher-mail/usher/internal/wire"
)

// Framing and parsing of client commands (RFC 9051 section 9, formal syntax).
//
// A command is read in two steps. readCommand frames it with wire's IMAP
// string framing (a line, and as long as the last line read ends with a
// literal announcement, the literal and the line that follows it), so an
// invalid command is always consumed whole. parseCommand then turns the
// framed command into a tag, a name and arguments; the tokens are wire's,
// with IMAP's atom characters.

// maxLiterals bounds the literals of one command; LOGIN needs two, an ID
// command a few more. Together with MaxLiteral and the line cap it bounds the
// memory one command can take before login.
const maxLiterals = 16

// maxDepth bounds parenthesized list nesting (ID uses one level).
const maxDepth = 8

var (
	errBadTag = errors.New("missing or invalid tag")
	errSyntax = wire.ErrSyntax
	errNoName = errors.New("missing command name")
	// errLitLimit is a synchronizing literal over the cap, refused before
	// the continuation request.
	errLitLimit = wire.ErrLiteralTooBig
	// errNonSyncLimit is a non-synchronizing literal over the cap: its bytes
	// are on their way already, so the connection cannot be resynchronized.
	errNonSyncLimit = wire.ErrLiteralDesync
)

// syntax is IMAP's token grammar: astring characters (tags and command
// names are parsed before), and CHAR8 literals, which exclude NUL (RFC 9051
// section 9).
var syntax = wire.Syntax{AtomChar: isAstringChar, MaxDepth: maxDepth, NoNULInLiteral: true}

// readCommand frames one command from r. Each literal must be at most
// maxLiteral bytes; cont is called before a synchronizing literal is read, to
// send the continuation request ("+ ..."). On an error the command read so
// far is returned too, so the caller can answer with its tag.
func readCommand(r *wire.Reader, maxLiteral int, cont func() error) (*wire.Frame, error) {
	return r.ReadFrame(wire.FrameLimits{Literal: maxLiteral, Literals: maxLiterals}, cont)
}

// arg is one parsed argument: an atom (the atom NIL is nil, the string "NIL"
// is not, RFC 9051 section 4.5), a string or a list.
type arg = wire.Token

func isNil(a arg) bool { return a.IsAtom("NIL") }

// isAstring reports whether a is an astring (RFC 9051 section 9: atom or string).
func isAstring(a arg) bool { return a.Kind == wire.Atom || a.Kind == wire.String }

// command is one parsed client command.
type command struct {
	tag  string
	name string // upper case
	args []arg
}

// isTagChar reports whether b may appear in a tag: any ASTRING-CHAR except
// "+" (RFC 9051 section 9, "tag"). List wildcards are not ASTRING-CHARs; "*"
// must never start a tag, or a tagged answer would read as untagged.
func isTagChar(b byte) bool { return b != '+' && b != '*' && b != '%' && isAstringChar(b) }

// isAstringChar is ATOM-CHAR / resp-specials (RFC 9051 section 9): any CHAR
// except atom-specials, where "]" is allowed. List wildcards ("%", "*") are
// accepted too, like common servers do for LIST patterns sent as atoms.
func isAstringChar(b byte) bool {
	if b <= ' ' || b >= 0x7f {
		return false
	}
	switch b {
	case '(', ')', '{', '"', '\\':
		return false
	}
	return true
}

// parseTag splits the tag off a command's first line. ok is false when the
// line has no valid tag followed by a space or the line end.
func parseTag(line []byte) (tag string, rest []byte, ok bool) {
	i := 0
	for i < len(line) && line[i] != ' ' {
		if !isTagChar(line[i]) {
			return "", nil, false
		}
		i++
	}
	if i == 0 {
		return "", nil, false
	}
	return string(line[:i]), line[i:], true
}

// parseCommand parses a framed command. The returned command carries the tag
// whenever one could be read, also together with an error, so that the error
// can be answered with a tagged BAD.
func parseCommand(raw *wire.Frame) (*command, error) {
	first := raw.Lines[0]
	tag, rest, ok := parseTag(first)
	if !ok {
		return &command{}, errBadTag
	}
	cmd := &command{tag: tag}
	if len(rest) == 0 {
		return cmd, errNoName
	}
	rest = rest[1:] // the space after the tag
	i := 0
	for i < len(rest) && rest[i] != ' ' {
		b := rest[i]
		if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '-' || b == '_') {
			return cmd, fmt.Errorf("%w: invalid command name", errSyntax)
		}
		i++
	}
	if i == 0 {
		return cmd, errNoName
	}
	cmd.name = wire.UpperASCII(string(rest[:i]))
	args, err := syntax.Tokens(raw, len(first)-len(rest)+i)
	if err != nil {
		return cmd, err
	}
	cmd.args = args
	return cmd, nil
}

// Encoding of strings sent to the backend.

// quotable reports whether s can be sent as a quoted string to any IMAP4rev1
// server: 7-bit TEXT-CHARs only (RFC 3501 section 9).
func quotable(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c == '\r' || c == '\n' || c >= 0x80 {
			return false
		}
	}
	return true
}
