package sieve

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"github.com/usher-mail/usher/internal/wire"
)

// Framing, parsing and encoding of ManageSieve lines (RFC 5804 section 4,
// formal syntax). The same code reads client commands and backend responses.
//
// A frame is read in two steps. readFrame reads the first line and, as long
// as the last line read ends with a literal announcement, the literal and the
// line that follows it. Framing does not depend on the command being valid,
// so an invalid command is always consumed whole and the next command starts
// where the client thinks it does. parseArgs then turns the frame into
// tokens.
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
	errSyntax = errors.New("syntax error")
	errNoName = errors.New("missing command name")
	// errLitLimit is a literal over the cap. The client sends a literal's
	// octets without waiting (there is no continuation in ManageSieve), so
	// the connection cannot be resynchronized.
	errLitLimit = errors.New("literal too big")
)

// frameLimits bound one frame (a command or a response with its literals).
type frameLimits struct {
	literal  int // one literal, in bytes
	literals int // number of literals
	total    int // lines and literals together, in bytes
}

// rawFrame is one command or response as framed on the wire: lines[i] for
// i < len(lits) ends with a literal announcement whose data is lits[i]; the
// last line has none. Lines are without their CRLF.
type rawFrame struct {
	lines [][]byte
	lits  [][]byte
}

// bytes returns the frame as it was sent, every line ended by CRLF.
func (f *rawFrame) bytes() []byte {
	var b []byte
	for i, l := range f.lines {
		b = append(b, l...)
		b = append(b, "\r\n"...)
		if i < len(f.lits) {
			b = append(b, f.lits[i]...)
		}
	}
	return b
}

// literalMarker reports whether line ends with a literal announcement:
// "{" number "+}" (literal-c2s) or "{" number "}" (literal-s2c, RFC 5804
// section 4). start is the index of "{". Sizes that do not fit 32 bits are
// saturated, so any cap rejects them.
func literalMarker(line []byte) (start int, n int64, ok bool) {
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, 0, false
	}
	start = bytes.LastIndexByte(line, '{')
	if start < 0 {
		return 0, 0, false
	}
	digits := line[start+1 : len(line)-1]
	if len(digits) > 0 && digits[len(digits)-1] == '+' {
		digits = digits[:len(digits)-1]
	}
	if len(digits) == 0 {
		return 0, 0, false
	}
	const saturated = 1 << 33
	for _, d := range digits {
		if d < '0' || d > '9' {
			return 0, 0, false
		}
		if n < saturated {
			n = n*10 + int64(d-'0')
		}
	}
	return start, n, true
}

// readFrame frames one command or response from r within lim. On an error
// the frame read so far is returned too.
func readFrame(r *wire.Reader, lim frameLimits) (*rawFrame, error) {
	line, err := r.ReadLine()
	if err != nil {
		return nil, err
	}
	f := &rawFrame{lines: [][]byte{bytes.Clone(line)}}
	total := len(line)
	for {
		_, n, ok := literalMarker(f.lines[len(f.lines)-1])
		if !ok {
			return f, nil
		}
		if n > int64(lim.literal) || len(f.lits) >= lim.literals || n > int64(lim.total-total) {
			return f, errLitLimit
		}
		lit, err := r.ReadLiteral(int(n))
		if err != nil {
			return f, err
		}
		f.lits = append(f.lits, lit)
		line, err := r.ReadLine()
		if err != nil {
			return f, err
		}
		total += len(lit) + len(line)
		if total > lim.total {
			return f, errLitLimit
		}
		f.lines = append(f.lines, bytes.Clone(line))
	}
}

// argKind tells atoms from strings: the atom PLAIN is not the string "PLAIN"
// (RFC 5804 section 4: an auth-type is a string).
type argKind uint8

const (
	argAtom   argKind = iota // 1*ATOM-CHAR
	argString                // quoted or literal
	argList                  // "(" ... ")", in response codes
)

// arg is one parsed token.
type arg struct {
	kind argKind
	s    string // atom text or decoded string
	list []arg  // for argList
}

func (a arg) isString() bool { return a.kind == argString }

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
func parseCommand(f *rawFrame) (*command, error) {
	args, err := parseArgs(f)
	if err != nil {
		return nil, err
	}
	if len(args) == 0 {
		return nil, errNoName
	}
	if args[0].kind != argAtom {
		return nil, fmt.Errorf("%w: command name is not an atom", errSyntax)
	}
	for i := 0; i < len(args[0].s); i++ {
		if c := args[0].s[i] | 0x20; c < 'a' || c > 'z' {
			return nil, fmt.Errorf("%w: invalid command name", errSyntax)
		}
	}
	return &command{name: asciiUpper(args[0].s), args: args[1:]}, nil
}

// parseArgs splits a frame into tokens.
func parseArgs(f *rawFrame) ([]arg, error) {
	p := &parser{f: f, line: f.lines[0]}
	return p.args(0)
}

// parser walks the lines and literals of a rawFrame.
type parser struct {
	f    *rawFrame
	li   int    // index of the current line
	line []byte // rest of the current line
}

func (p *parser) errorf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errSyntax}, a...)...)
}

// args parses tokens up to the end of the frame (depth 0) or up to the ")"
// that closes the list opened at depth.
func (p *parser) args(depth int) ([]arg, error) {
	var out []arg
	for {
		// Separators are single spaces in the grammar; runs of spaces and
		// trailing spaces are tolerated as Dovecot does.
		for len(p.line) > 0 && p.line[0] == ' ' {
			p.line = p.line[1:]
		}
		if len(p.line) == 0 {
			if p.li != len(p.f.lines)-1 {
				// A line ended with a literal marker that was not reached
				// as a token (inside a quoted string, after an atom).
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
		case isAtomChar(c):
			i := 0
			for i < len(p.line) && isAtomChar(p.line[i]) {
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

// quoted parses a quoted string (RFC 5804 section 4: QUOTED-CHAR, where only
// \" and \\ are escapes). 8-bit bytes are accepted as they are; NUL, CR and
// LF are not. The 1024-octet limit is not enforced on input (Dovecot does
// not either); line caps bound it.
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
	start, _, ok := literalMarker(p.line)
	if !ok || start != 0 || p.li >= len(p.f.lits) {
		return "", p.errorf("invalid literal")
	}
	data := p.f.lits[p.li]
	p.li++
	p.line = p.f.lines[p.li]
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

// appendString appends s as a string: quoted when possible, else as a
// literal, "{n}" from a server (literal-s2c) or "{n+}" from a client
// (literal-c2s, RFC 5804 section 4).
func appendString(b []byte, s string, fromClient bool) []byte {
	if quotable(s) {
		return appendQuoted(b, s)
	}
	b = append(b, '{')
	b = strconv.AppendInt(b, int64(len(s)), 10)
	if fromClient {
		b = append(b, '+')
	}
	b = append(b, "}\r\n"...)
	return append(b, s...)
}
