package imap

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"

	"github.com/usher-mail/usher/internal/wire"
)

// Framing and parsing of client commands (RFC 9051 section 9, formal syntax).
//
// A command is read in two steps. readCommand frames it: it reads the first
// line and, as long as the last line read ends with a literal announcement,
// the literal and the line that follows it. Framing does not depend on the
// command being valid, so an invalid command is always consumed whole and the
// next command starts where the client thinks it does (RFC 9051 section 4.3:
// a literal is always announced at the end of a line). parseCommand then
// turns the framed command into a tag, a name and arguments.

// maxLiterals bounds the literals of one command; LOGIN needs two, an ID
// command a few more. Together with MaxLiteral and the line cap it bounds the
// memory one command can take before login.
const maxLiterals = 16

// maxDepth bounds parenthesized list nesting (ID uses one level).
const maxDepth = 8

var (
	errBadTag   = errors.New("missing or invalid tag")
	errSyntax   = errors.New("syntax error")
	errNoName   = errors.New("missing command name")
	errLitLimit = errors.New("literal too big")
	// errNonSyncLimit is a non-synchronizing literal over the cap: its bytes
	// are on their way already, so the connection cannot be resynchronized.
	errNonSyncLimit = errors.New("non-synchronizing literal too big")
)

// rawCommand is one command as framed on the wire: lines[i] for i < len(lits)
// ends with a literal announcement whose data is lits[i]; the last line has
// none. Lines are without their CRLF.
type rawCommand struct {
	lines [][]byte
	lits  [][]byte
}

// literalMarker reports whether line ends with a literal announcement:
// "{" number "}" (synchronizing, RFC 9051 section 4.3) or "{" number "+}"
// (non-synchronizing, RFC 7888 section 3). start is the index of "{". Sizes
// that do not fit 32 bits are saturated, so any cap rejects them.
func literalMarker(line []byte) (start int, n int64, nonSync, ok bool) {
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, 0, false, false
	}
	start = bytes.LastIndexByte(line, '{')
	if start < 0 {
		return 0, 0, false, false
	}
	digits := line[start+1 : len(line)-1]
	if len(digits) > 0 && digits[len(digits)-1] == '+' {
		nonSync = true
		digits = digits[:len(digits)-1]
	}
	if len(digits) == 0 {
		return 0, 0, false, false
	}
	const saturated = 1 << 33
	for _, d := range digits {
		if d < '0' || d > '9' {
			return 0, 0, false, false
		}
		if n < saturated {
			n = n*10 + int64(d-'0')
		}
	}
	return start, n, nonSync, true
}

// readCommand frames one command from r. Each literal must be at most
// maxLiteral bytes; cont is called before a synchronizing literal is read, to
// send the continuation request ("+ ..."). On an error the command read so
// far is returned too, so the caller can answer with its tag.
func readCommand(r *wire.Reader, maxLiteral int, cont func() error) (*rawCommand, error) {
	line, err := r.ReadLine()
	if err != nil {
		return nil, err
	}
	cmd := &rawCommand{lines: [][]byte{bytes.Clone(line)}}
	for {
		_, n, nonSync, ok := literalMarker(cmd.lines[len(cmd.lines)-1])
		if !ok {
			return cmd, nil
		}
		if n > int64(maxLiteral) || len(cmd.lits) >= maxLiterals {
			// RFC 9051 section 4.3 / RFC 7888 section 4: a synchronizing
			// literal is refused before the continuation, so the client
			// sends nothing more; the bytes of a non-synchronizing one
			// are already coming.
			if nonSync {
				return cmd, errNonSyncLimit
			}
			return cmd, errLitLimit
		}
		if !nonSync {
			if err := cont(); err != nil {
				return cmd, err
			}
		}
		lit, err := r.ReadLiteral(int(n))
		if err != nil {
			return cmd, err
		}
		cmd.lits = append(cmd.lits, lit)
		line, err := r.ReadLine()
		if err != nil {
			return cmd, err
		}
		cmd.lines = append(cmd.lines, bytes.Clone(line))
	}
}

// argKind tells atoms from strings: the atom NIL is nil, the string "NIL" is
// not (RFC 9051 section 4.5).
type argKind uint8

const (
	argAtom   argKind = iota // 1*ASTRING-CHAR
	argString                // quoted or literal
	argList                  // "(" ... ")"
)

// arg is one parsed argument.
type arg struct {
	kind argKind
	s    string // atom text or decoded string
	list []arg  // for argList
}

func (a arg) isNil() bool { return a.kind == argAtom && asciiUpper(a.s) == "NIL" }

// isAstring reports whether a is an astring (RFC 9051 section 9: atom or string).
func (a arg) isAstring() bool { return a.kind == argAtom || a.kind == argString }

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
func parseCommand(raw *rawCommand) (*command, error) {
	tag, rest, ok := parseTag(raw.lines[0])
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
	cmd.name = asciiUpper(string(rest[:i]))
	p := &parser{raw: raw, line: rest[i:]}
	args, err := p.args(0)
	if err != nil {
		return cmd, err
	}
	cmd.args = args
	return cmd, nil
}

// parser walks the lines and literals of a rawCommand.
type parser struct {
	raw  *rawCommand
	li   int    // index of the current line
	line []byte // rest of the current line
}

func (p *parser) errorf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errSyntax}, a...)...)
}

// args parses arguments up to the end of the command (depth 0) or up to the
// ")" that closes the list opened at depth.
func (p *parser) args(depth int) ([]arg, error) {
	var out []arg
	for {
		// Separators are single spaces in the grammar; runs of spaces and
		// trailing spaces are tolerated as many servers do.
		for len(p.line) > 0 && p.line[0] == ' ' {
			p.line = p.line[1:]
		}
		if len(p.line) == 0 {
			if p.li != len(p.raw.lines)-1 {
				// Only possible if a line ended with a literal marker that
				// was not reached as a token (e.g. inside a quoted string).
				return nil, p.errorf("literal announced in the middle of a token")
			}
			if depth > 0 {
				return nil, p.errorf("unclosed list")
			}
			return out, nil
		}
		var a arg
		switch c := p.line[0]; {
		case c == '(':
			if depth >= maxDepth {
				return nil, p.errorf("lists nested too deeply")
			}
			p.line = p.line[1:]
			list, err := p.args(depth + 1)
			if err != nil {
				return nil, err
			}
			a = arg{kind: argList, list: list}
		case c == ')':
			if depth == 0 {
				return nil, p.errorf("unexpected )")
			}
			p.line = p.line[1:]
			return out, p.endOfToken(depth - 1)
		case c == '"':
			s, err := p.quoted()
			if err != nil {
				return nil, err
			}
			a = arg{kind: argString, s: s}
		case c == '{':
			s, err := p.literal()
			if err != nil {
				return nil, err
			}
			a = arg{kind: argString, s: s}
		case isAstringChar(c):
			i := 0
			for i < len(p.line) && isAstringChar(p.line[i]) {
				i++
			}
			a = arg{kind: argAtom, s: string(p.line[:i])}
			p.line = p.line[i:]
		default:
			return nil, p.errorf("unexpected character 0x%02x", c)
		}
		out = append(out, a)
		if a.kind != argList {
			if err := p.endOfToken(depth); err != nil {
				return nil, err
			}
		}
	}
}

// endOfToken checks that a token is followed by a space, a ")" closing an
// open list, or the end of a line.
func (p *parser) endOfToken(depth int) error {
	if len(p.line) == 0 || p.line[0] == ' ' || (p.line[0] == ')' && depth > 0) {
		return nil
	}
	return p.errorf("unexpected character 0x%02x after token", p.line[0])
}

// quoted parses a quoted string (RFC 9051 section 4.3: QUOTED-CHAR, where
// only \" and \\ are escapes). 8-bit bytes are accepted (UTF-8 is allowed by
// RFC 9051; older clients send other charsets in passwords); NUL, CR and LF
// are not.
func (p *parser) quoted() (string, error) {
	var b []byte
	for i := 1; i < len(p.line); i++ {
		switch c := p.line[i]; c {
		case '"':
			p.line = p.line[i+1:]
			return string(b), nil
		case '\\':
			if i+1 < len(p.line) && (p.line[i+1] == '"' || p.line[i+1] == '\\') {
				b = append(b, p.line[i+1])
				i++
				continue
			}
			return "", p.errorf("invalid escape in quoted string")
		case 0, '\r', '\n':
			return "", p.errorf("control character in quoted string")
		default:
			b = append(b, c)
		}
	}
	return "", p.errorf("unterminated quoted string")
}

// literal takes the literal announced at the end of the current line; the
// framing already read its data.
func (p *parser) literal() (string, error) {
	start, _, _, ok := literalMarker(p.line)
	if !ok || start != 0 || p.li >= len(p.raw.lits) {
		return "", p.errorf("invalid literal")
	}
	data := p.raw.lits[p.li]
	// CHAR8 excludes NUL (RFC 9051 section 9).
	if bytes.IndexByte(data, 0) >= 0 {
		return "", p.errorf("NUL in literal")
	}
	p.li++
	p.line = p.raw.lines[p.li]
	return string(data), nil
}

func asciiUpper(s string) string {
	for i := 0; i < len(s); i++ {
		if 'a' <= s[i] && s[i] <= 'z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'a' <= b[j] && b[j] <= 'z' {
					b[j] -= 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
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

// appendQuoted appends s as a quoted string, escaping " and \.
func appendQuoted(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return append(b, '"')
}

// appendLiteralMarker appends the announcement of an n-byte literal and its CRLF.
func appendLiteralMarker(b []byte, n int, nonSync bool) []byte {
	b = append(b, '{')
	b = strconv.AppendInt(b, int64(n), 10)
	if nonSync {
		b = append(b, '+')
	}
	return append(b, "}\r\n"...)
}
