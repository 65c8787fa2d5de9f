package sieve

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/usher-mail/usher/internal/wire"
)

// Framing, parsing and encoding of ManageSieve lines (RFC 5804 section 4,
// formal syntax). The same code reads client commands and backend responses.
//
// A frame is read in two steps, with wire's IMAP string framing and
// tokens: wire.Reader.ReadFrame reads the first line and, as long as the last
// line read ends with a literal announcement, the literal and the line that
// follows it, so an invalid command is always consumed whole. parseArgs then
// turns the frame into tokens with ManageSieve's atom characters. The
// 1024-octet limit on quoted strings is not enforced on input (Dovecot does
// not either); line caps bound them.
//
// ManageSieve has no continuation requests for literals: a client announces
// "{n+}" (literal-c2s) and sends the octets at once; a server sends "{n}"
// (literal-s2c). Like Dovecot's managesieve-login, usher also accepts "{n}"
// from clients and treats both forms alike, without a continuation: a client
// sending "{n}" sends its octets right away too, as no server would answer it.

// maxDepth bounds parenthesized list nesting; only response codes use lists
// ("NO (TRYLATER) ..."), so one level is enough and a few are tolerated.
const maxDepth = 4

// maxQuoted is the longest quoted string a server may send (RFC 5804 section
// 4: "limited to 1024 octets between the <">s"); longer strings are sent as
// literals.
const maxQuoted = 1024

var (
	errSyntax = wire.ErrSyntax
	errNoName = errors.New("missing command name")
	// errLitLimit is a literal over the cap. The client sends a literal's
	// octets without waiting (there is no continuation in ManageSieve), so
	// the connection cannot be resynchronized.
	errLitLimit = wire.ErrLiteralDesync
)

// syntax is ManageSieve's token grammar: atoms (command names, and in
// responses OK/NO/BYE and response codes) and strings of any octets.
var syntax = wire.Syntax{AtomChar: isAtomChar, MaxDepth: maxDepth}

// arg is one parsed token: an atom, a string or a list. The atom PLAIN is
// not the string "PLAIN" (RFC 5804 section 4: an auth-type is a string).
type arg = wire.Token

// command is one parsed client command (ManageSieve commands have no tags).
type command struct {
	name string // upper case
	args []arg
}

// isAtomChar reports whether b may appear in an atom: any CHAR except
// atom-specials (RFC 5804 section 4: "(", ")", "{", SP, CTL, quoted-specials).
// "*" and "%" are accepted: "*" is how some clients cancel an AUTHENTICATE.
func isAtomChar(b byte) bool {
	if b <= ' ' || b >= 0x7f {
		return false
	}
	switch b {
	case '(', ')', '{', '"', '\\':
		return false
	}
	return true
}

// parseCommand parses a framed client command: a command name (an atom of
// letters) and its arguments.
func parseCommand(f *wire.Frame) (*command, error) {
	args, err := parseArgs(f)
	if err != nil {
		return nil, err
	}
	if len(args) == 0 {
		return nil, errNoName
	}
	if args[0].Kind != wire.Atom {
		return nil, fmt.Errorf("%w: command name is not an atom", errSyntax)
	}
	for i := 0; i < len(args[0].S); i++ {
		if c := args[0].S[i] | 0x20; c < 'a' || c > 'z' {
			return nil, fmt.Errorf("%w: invalid command name", errSyntax)
		}
	}
	return &command{name: wire.UpperASCII(args[0].S), args: args[1:]}, nil
}

// parseArgs splits a frame into tokens.
func parseArgs(f *wire.Frame) ([]arg, error) { return syntax.Tokens(f, 0) }

// Encoding of strings.

// quotable reports whether s can be sent as a quoted string: at most 1024
// octets of UTF-8 without NUL, CR or LF (RFC 5804 section 4, SAFE-UTF8-CHAR).
func quotable(s string) bool {
	if len(s) > maxQuoted || !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c == '\r' || c == '\n' {
			return false
		}
	}
	return true
}

// appendString appends s as a string: quoted when possible, else as a
// literal, "{n}" from a server (literal-s2c) or "{n+}" from a client
// (literal-c2s, RFC 5804 section 4).
func appendString(b []byte, s string, fromClient bool) []byte {
	if quotable(s) {
		return wire.AppendQuoted(b, s)
	}
	return append(wire.AppendLiteralHeader(b, len(s), fromClient), s...)
}
