package wire

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// The IMAP string syntax, shared by IMAP (RFC 9051 sections 4.3 and 9) and
// ManageSieve (RFC 5804 section 4, which borrows it): lines of atoms,
// quoted strings and parenthesized lists, where a line ending in a literal
// announcement "{n}" or "{n+}" is continued by n octets and another line.
//
// Reading is in two steps. ReadFrame frames a command or response: the first
// line and, as long as the last line read ends with a literal announcement,
// the literal and the line that follows it. Framing does not depend on the
// tokens being valid, so an invalid command is always consumed whole and the
// next one starts where the peer thinks it does (a literal is always
// announced at the end of a line). Syntax.Tokens then splits a frame into
// tokens. What the protocols differ in (tags, command names, the octets of
// an atom, continuation requests, NUL in literals) stays with their packages
// and is passed in.

var (
	// ErrSyntax reports a frame that does not tokenize.
	ErrSyntax = errors.New("syntax error")
	// ErrLiteralTooBig reports a synchronizing literal over the limits,
	// refused before the continuation request: the peer sends nothing more
	// of it, so the stream stays in step (RFC 9051 section 4.3).
	ErrLiteralTooBig = errors.New("literal too big")
	// ErrLiteralDesync reports a literal (or frame) over the limits whose
	// octets are already on their way: a non-synchronizing literal (RFC 7888
	// section 4), or any literal where there are no continuation requests
	// (ManageSieve). The stream cannot be resynchronized.
	ErrLiteralDesync = errors.New("literal too big, already sent")
)

// Frame is one command or response as framed on the wire: Lines[i] for
// i < len(Lits) ends with a literal announcement whose data is Lits[i]; the
// last line has none. Lines are without their CRLF.
type Frame struct {
	Lines [][]byte
	Lits  [][]byte
}

// Bytes returns the frame as it was sent, every line ended by CRLF.
func (f *Frame) Bytes() []byte {
	var b []byte
	for i, l := range f.Lines {
		b = append(b, l...)
		b = append(b, "\r\n"...)
		if i < len(f.Lits) {
			b = append(b, f.Lits[i]...)
		}
	}
	return b
}

// FrameLimits bound one frame.
type FrameLimits struct {
	Literal  int // one literal, in bytes
	Literals int // literals in one frame
	// Total bounds lines and literals together, in bytes; 0 leaves the
	// bound to Literal, Literals and the Reader's MaxLine.
	Total int
}

// LiteralHeader reports whether line ends with a literal announcement:
// "{" number "}" (synchronizing, RFC 9051 section 4.3; literal-s2c in RFC
// 5804 section 4) or "{" number "+}" (non-synchronizing, RFC 7888 section 3;
// literal-c2s). start is the index of "{". Sizes that do not fit 32 bits are
// saturated, so any cap rejects them.
func LiteralHeader(line []byte) (start int, n int64, nonSync, ok bool) {
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

// ReadFrame frames one command or response within lim. cont, when not nil,
// is called before a synchronizing literal is read, to send the continuation
// request (IMAP, RFC 9051 section 7.5); with cont nil both literal forms are
// read at once (ManageSieve has no continuation requests). A literal over
// lim gives ErrLiteralTooBig when it was refused before its continuation,
// else ErrLiteralDesync. On an error the frame read so far is returned too,
// nil only when not even the first line could be read.
func (r *Reader) ReadFrame(lim FrameLimits, cont func() error) (*Frame, error) {
	line, err := r.ReadLine()
	if err != nil {
		return nil, err
	}
	f := &Frame{Lines: [][]byte{bytes.Clone(line)}}
	total := len(line)
	for {
		_, n, nonSync, ok := LiteralHeader(f.Lines[len(f.Lines)-1])
		if !ok {
			return f, nil
		}
		sync := cont != nil && !nonSync
		if n > int64(lim.Literal) || len(f.Lits) >= lim.Literals || (lim.Total > 0 && n > int64(lim.Total-total)) {
			// A synchronizing literal is refused before the continuation,
			// so the peer sends nothing more (RFC 9051 section 4.3, RFC
			// 7888 section 4); the octets of any other are coming.
			if sync {
				return f, ErrLiteralTooBig
			}
			return f, ErrLiteralDesync
		}
		if sync {
			if err := cont(); err != nil {
				return f, err
			}
		}
		lit, err := r.ReadLiteral(int(n))
		if err != nil {
			return f, err
		}
		f.Lits = append(f.Lits, lit)
		line, err := r.ReadLine()
		if err != nil {
			return f, err
		}
		total += len(lit) + len(line)
		if lim.Total > 0 && total > lim.Total {
			return f, ErrLiteralDesync
		}
		f.Lines = append(f.Lines, bytes.Clone(line))
	}
}

// TokenKind tells atoms from strings: the atom NIL is not the string "NIL"
// (RFC 9051 section 4.5), nor the atom PLAIN the string "PLAIN" (RFC 5804
// section 4: an auth-type is a string).
type TokenKind uint8

const (
	Atom   TokenKind = iota // atom characters, as Syntax.AtomChar says
	String                  // quoted or literal
	List                    // "(" ... ")"
)

// Token is one parsed token.
type Token struct {
	Kind TokenKind
	S    string  // atom text or decoded string
	List []Token // for List
}

// IsString reports whether t is a quoted string or a literal.
func (t Token) IsString() bool { return t.Kind == String }

// IsAtom reports whether t is the atom name, compared ASCII
// case-insensitively (name in upper case).
func (t Token) IsAtom(name string) bool { return t.Kind == Atom && UpperASCII(t.S) == name }

// Syntax is what the token grammars of IMAP and ManageSieve differ in.
type Syntax struct {
	// AtomChar reports whether an octet may appear in an atom.
	AtomChar func(byte) bool
	// MaxDepth bounds parenthesized list nesting.
	MaxDepth int
	// NoNULInLiteral refuses literals holding NUL (IMAP: CHAR8 excludes
	// NUL, RFC 9051 section 9); ManageSieve literals may hold any octet.
	NoNULInLiteral bool
}

// Tokens parses the tokens of f from offset start of its first line (after
// anything the caller parsed itself, such as an IMAP tag) to its end. Errors
// wrap ErrSyntax.
func (sx Syntax) Tokens(f *Frame, start int) ([]Token, error) {
	p := &tokenizer{sx: sx, f: f, line: f.Lines[0][start:]}
	return p.tokens(0)
}

// tokenizer walks the lines and literals of a Frame.
type tokenizer struct {
	sx   Syntax
	f    *Frame
	li   int    // index of the current line
	line []byte // rest of the current line
}

func (p *tokenizer) errorf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrSyntax}, a...)...)
}

// tokens parses tokens up to the end of the frame (depth 0) or up to the ")"
// that closes the list opened at depth.
func (p *tokenizer) tokens(depth int) ([]Token, error) {
	var out []Token
	for {
		// Separators are single spaces in the grammars; runs of spaces and
		// trailing spaces are tolerated as many servers (Dovecot) do.
		for len(p.line) > 0 && p.line[0] == ' ' {
			p.line = p.line[1:]
		}
		if len(p.line) == 0 {
			if p.li != len(p.f.Lines)-1 {
				// A line ended with a literal marker that was not reached
				// as a token (inside a quoted string, after an atom).
				return nil, p.errorf("literal announced in the middle of a token")
			}
			if depth > 0 {
				return nil, p.errorf("unclosed list")
			}
			return out, nil
		}
		var t Token
		switch c := p.line[0]; {
		case c == '(':
			if depth >= p.sx.MaxDepth {
				return nil, p.errorf("lists nested too deeply")
			}
			p.line = p.line[1:]
			list, err := p.tokens(depth + 1)
			if err != nil {
				return nil, err
			}
			t = Token{Kind: List, List: list}
		case c == ')':
			if depth == 0 {
				return nil, p.errorf("unexpected )")
			}
			p.line = p.line[1:]
			return out, p.endOfToken(depth - 1)
		case c == '"':
			s, rest, err := parseQuoted(p.line)
			if err != nil {
				return nil, p.errorf("%w", err)
			}
			p.line = rest
			t = Token{Kind: String, S: s}
		case c == '{':
			s, err := p.literal()
			if err != nil {
				return nil, err
			}
			t = Token{Kind: String, S: s}
		case p.sx.AtomChar(c):
			i := 0
			for i < len(p.line) && p.sx.AtomChar(p.line[i]) {
				i++
			}
			t = Token{Kind: Atom, S: string(p.line[:i])}
			p.line = p.line[i:]
		default:
			return nil, p.errorf("unexpected character 0x%02x", c)
		}
		out = append(out, t)
		if t.Kind != List {
			if err := p.endOfToken(depth); err != nil {
				return nil, err
			}
		}
	}
}

// endOfToken checks that a token is followed by a space, a ")" closing an
// open list, or the end of a line.
func (p *tokenizer) endOfToken(depth int) error {
	if len(p.line) == 0 || p.line[0] == ' ' || (p.line[0] == ')' && depth > 0) {
		return nil
	}
	return p.errorf("unexpected character 0x%02x after token", p.line[0])
}

// literal takes the literal announced at the end of the current line; the
// framing already read its data.
func (p *tokenizer) literal() (string, error) {
	start, _, _, ok := LiteralHeader(p.line)
	if !ok || start != 0 || p.li >= len(p.f.Lits) {
		return "", p.errorf("invalid literal")
	}
	data := p.f.Lits[p.li]
	if p.sx.NoNULInLiteral && bytes.IndexByte(data, 0) >= 0 {
		return "", p.errorf("NUL in literal")
	}
	p.li++
	p.line = p.f.Lines[p.li]
	return string(data), nil
}

// parseQuoted parses the quoted string at the start of b (b[0] is '"') and
// returns its value and what follows the closing quote. Only \" and \\ are
// escapes (QUOTED-CHAR, RFC 9051 section 9 and RFC 5804 section 4). 8-bit
// octets are accepted as they are (UTF-8 is allowed by both; older clients
// send other charsets in passwords); NUL, CR and LF are not. Length is not
// bounded here: the line cap bounds it.
func parseQuoted(b []byte) (string, []byte, error) {
	var s []byte
	for i := 1; i < len(b); i++ {
		switch c := b[i]; c {
		case '"':
			return string(s), b[i+1:], nil
		case '\\':
			if i+1 < len(b) && (b[i+1] == '"' || b[i+1] == '\\') {
				s = append(s, b[i+1])
				i++
				continue
			}
			return "", nil, errors.New("invalid escape in quoted string")
		case 0, '\r', '\n':
			return "", nil, errors.New("control character in quoted string")
		default:
			s = append(s, c)
		}
	}
	return "", nil, errors.New("unterminated quoted string")
}

// AppendQuoted appends s as a quoted string, escaping " and \. The caller
// checks that s can be quoted in its protocol (no NUL, CR or LF, and what
// else the protocol requires).
func AppendQuoted(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return append(b, '"')
}

// AppendLiteralHeader appends the announcement of an n-byte literal and its
// CRLF: "{n}" or, when nonSync, "{n+}".
func AppendLiteralHeader(b []byte, n int, nonSync bool) []byte {
	b = append(b, '{')
	b = strconv.AppendInt(b, int64(n), 10)
	if nonSync {
		b = append(b, '+')
	}
	return append(b, "}\r\n"...)
}

// UpperASCII upper-cases the ASCII letters of s and leaves every other octet
// alone (unlike strings.ToUpper, which maps Unicode and can change lengths).
func UpperASCII(s string) string {
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
