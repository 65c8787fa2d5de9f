package lmtp

import (
	"errors"
	"strings"
	"unicode/utf8"
)

// Bounds of the command parser.
const (
	// maxVerb bounds a command verb; the longest LMTP verb has 8 letters
	// (STARTTLS), the bound only keeps garbage out of logs.
	maxVerb = 16
	// maxPath bounds a mailbox. RFC 5321 section 4.5.3.1.3 says 256 octets
	// for a path; real VERP/SRS addresses exceed the 64-octet local-part
	// limit, so usher only enforces a generous total.
	maxPath = 512
	// maxParams bounds the ESMTP parameters of one MAIL or RCPT.
	maxParams = 16
	// maxHelo bounds the client's LHLO name (a domain is at most 255 octets,
	// RFC 5321 section 4.5.3.1.2).
	maxHelo = 255
)

var (
	errVerb      = errors.New("malformed command verb")
	errPath      = errors.New("malformed path")
	errParam     = errors.New("malformed parameter")
	errManyParam = errors.New("too many parameters")
)

// parseCommand splits a command line into its verb, upper-cased, and the
// argument text after the first space (RFC 5321 section 4.1.1: verbs are
// case-insensitive alphabetic keywords).
func parseCommand(line []byte) (verb, arg string, err error) {
	v, a, _ := strings.Cut(string(line), " ")
	if len(v) == 0 || len(v) > maxVerb {
		return "", "", errVerb
	}
	up := []byte(v)
	for i, c := range up {
		switch {
		case 'a' <= c && c <= 'z':
			up[i] = c - 'a' + 'A'
		case 'A' <= c && c <= 'Z':
		default:
			return "", "", errVerb
		}
	}
	return string(up), a, nil
}

// path is a parsed reverse- or forward-path (RFC 5321 section 4.1.2).
type path struct {
	// raw is the mailbox as the client wrote it, without the angle brackets
	// and without a source route; "" for the null reverse-path "<>". It is
	// what usher sends to the backend.
	raw string
	// local is the local part with quoting removed; domain is the domain
	// or address literal ("" when the client gave none).
	local, domain string
	// utf8 reports non-ASCII octets (valid UTF-8), which need SMTPUTF8
	// (RFC 6531 section 3.3).
	utf8 bool
}

// routingUser is the user name a recipient is routed by: the mailbox with
// any recipient delimiter and what follows it removed from the local part.
// delims is a set of delimiter characters (as Postfix's and Dovecot's
// recipient_delimiter): the first occurrence of any of them cuts the local
// part, unless it is the first character (a local part is never emptied).
func (p path) routingUser(delims string) string {
	local := p.local
	if delims != "" {
		if i := strings.IndexAny(local, delims); i > 0 {
			local = local[:i]
		}
	}
	if p.domain == "" {
		return local
	}
	return local + "@" + p.domain
}

// param is one ESMTP parameter (RFC 5321 section 4.1.2: esmtp-keyword
// ["=" esmtp-value]); key is upper-cased.
type param struct {
	key, value string
	hasValue   bool
}

// parseMailArg parses the argument of MAIL: "FROM:" Reverse-path
// [SP Mail-parameters] (RFC 5321 section 4.1.1.2).
func parseMailArg(arg string) (path, []param, error) {
	return parsePathArg(arg, "FROM:", true)
}

// parseRcptArg parses the argument of RCPT: "TO:" Forward-path
// [SP Rcpt-parameters] (RFC 5321 section 4.1.1.3).
func parseRcptArg(arg string) (path, []param, error) {
	return parsePathArg(arg, "TO:", false)
}

func parsePathArg(arg, prefix string, allowNull bool) (path, []param, error) {
	if len(arg) < len(prefix) || !strings.EqualFold(arg[:len(prefix)], prefix) {
		return path{}, nil, errPath
	}
	// RFC 5321 has no space after the colon, but some clients send one
	// (Dovecot's whitespace-before-path workaround); it costs nothing to
	// accept.
	s := strings.TrimLeft(arg[len(prefix):], " ")
	p, rest, err := parsePath(s)
	if err != nil {
		return path{}, nil, err
	}
	if p.raw == "" && !allowNull {
		return path{}, nil, errPath
	}
	params, err := parseParams(rest)
	if err != nil {
		return path{}, nil, err
	}
	return p, params, nil
}

// parsePath parses one path at the start of s and returns the text after
// its closing '>'.
//
//	Path      = "<" [ A-d-l ":" ] Mailbox ">"
//	A-d-l     = At-domain *( "," At-domain )
//	Mailbox   = Local-part [ "@" ( Domain / address-literal ) ]
//
// Source routes (A-d-l) are accepted and dropped: RFC 5321 section 4.1.1.3
// and appendix C say servers SHOULD ignore them. The domain is optional, as
// in Dovecot's LMTP (rcpt_domain_optional), so "<user>" and RFC 5321's
// "<Postmaster>" work. The local part is parsed leniently (atext and dots in
// any order) because real mail carries "a..b@" and "a.@" addresses.
// Non-ASCII octets must form valid UTF-8 (RFC 6531 section 3.3).
func parsePath(s string) (path, string, error) {
	if len(s) < 2 || s[0] != '<' {
		return path{}, "", errPath
	}
	i := 1
	if s[i] == '>' {
		return path{}, s[2:], nil
	}
	if s[i] == '@' {
		// Source route: "@dom,@dom:"; skip it.
		for {
			if i >= len(s) || s[i] != '@' {
				return path{}, "", errPath
			}
			j := scanDomain(s, i+1)
			if j == i+1 {
				return path{}, "", errPath
			}
			i = j
			if i < len(s) && s[i] == ',' {
				i++
				continue
			}
			if i < len(s) && s[i] == ':' {
				i++
				break
			}
			return path{}, "", errPath
		}
	}
	start := i
	var p path
	if i < len(s) && s[i] == '"' {
		local, j, ok := scanQuoted(s, i)
		if !ok || local == "" {
			// RFC 5321 allows `""`, but an empty user cannot be routed.
			return path{}, "", errPath
		}
		p.local, i = local, j
	} else {
		j := i
		for j < len(s) && (isAtext(s[j]) || s[j] == '.') {
			j++
		}
		if j == i {
			return path{}, "", errPath
		}
		p.local, i = s[i:j], j
	}
	if i < len(s) && s[i] == '@' {
		var j int
		if i+1 < len(s) && s[i+1] == '[' {
			j = scanLiteral(s, i+1)
		} else {
			j = scanDomain(s, i+1)
		}
		if j == i+1 {
			return path{}, "", errPath
		}
		p.domain, i = s[i+1:j], j
	}
	if i >= len(s) || s[i] != '>' {
		return path{}, "", errPath
	}
	p.raw = s[start:i]
	if len(p.raw) > maxPath {
		return path{}, "", errPath
	}
	for k := 0; k < len(p.raw); k++ {
		if p.raw[k] >= 0x80 {
			if !utf8.ValidString(p.raw) {
				return path{}, "", errPath
			}
			p.utf8 = true
			break
		}
	}
	return p, s[i+1:], nil
}

// isAtext reports RFC 5322 atext, extended by RFC 6531 section 3.3 with
// UTF-8 octets (validated as a whole by the caller).
func isAtext(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c >= 0x80:
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

// scanQuoted scans an RFC 5321 Quoted-string starting at s[i] == '"' and
// returns its content with the quoting removed and the index after it.
//
//	QcontentSMTP    = qtextSMTP / quoted-pairSMTP
//	quoted-pairSMTP = %d92 %d32-126
//	qtextSMTP       = %d32-33 / %d35-91 / %d93-126 (and UTF-8, RFC 6531)
func scanQuoted(s string, i int) (string, int, bool) {
	var sb strings.Builder
	for j := i + 1; j < len(s); j++ {
		c := s[j]
		switch {
		case c == '"':
			return sb.String(), j + 1, true
		case c == '\\':
			if j+1 >= len(s) || s[j+1] < 32 || s[j+1] > 126 {
				return "", 0, false
			}
			j++
			sb.WriteByte(s[j])
		case c >= 32 && c != 127:
			sb.WriteByte(c)
		default:
			return "", 0, false
		}
	}
	return "", 0, false
}

// scanDomain scans a domain starting at s[i] and returns the index after
// it (i when there is none). Labels are letters, digits, '-' and '_'
// (found in real host names) or UTF-8 (RFC 6531 U-labels), separated by
// single dots; the domain may not start or end with a dot.
func scanDomain(s string, i int) int {
	j := i
	label := 0
	for j < len(s) {
		c := s[j]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c >= 0x80:
			label++
		case c == '.':
			if label == 0 {
				return i
			}
			label = 0
		default:
			if label == 0 {
				return i
			}
			return j
		}
		j++
	}
	if label == 0 {
		return i
	}
	return j
}

// scanLiteral scans an address literal "[...]" (RFC 5321 section 4.1.3)
// starting at s[i] == '[' and returns the index after it (i on error). The
// content is dtext (%d33-90 / %d94-126); usher does not check the address
// form, the backend does.
func scanLiteral(s string, i int) int {
	for j := i + 1; j < len(s); j++ {
		c := s[j]
		switch {
		case c == ']':
			if j == i+1 {
				return i
			}
			return j + 1
		case c >= 33 && c <= 126 && c != '[' && c != '\\':
		default:
			return i
		}
	}
	return i
}

// parseParams parses the ESMTP parameters after a path: empty, or one or
// more of SP esmtp-keyword ["=" esmtp-value] (RFC 5321 section 4.1.2).
//
//	esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
//	esmtp-value   = 1*(%d33-60 / %d62-126)
func parseParams(rest string) ([]param, error) {
	if rest == "" {
		return nil, nil
	}
	if rest[0] != ' ' {
		return nil, errParam
	}
	var out []param
	for _, f := range strings.Split(rest, " ") {
		if f == "" {
			continue // extra spaces are harmless
		}
		if len(out) == maxParams {
			return nil, errManyParam
		}
		k, v, hasValue := strings.Cut(f, "=")
		if !validKeyword(k) || (hasValue && !validValue(v)) {
			return nil, errParam
		}
		out = append(out, param{key: strings.ToUpper(k), value: v, hasValue: hasValue})
	}
	return out, nil
}

func validKeyword(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		if !alnum && (i == 0 || c != '-') {
			return false
		}
	}
	return true
}

func validValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 33 || c > 126 || c == '=' {
			return false
		}
	}
	return true
}

// parseHelo checks the LHLO argument (RFC 2033 section 4.1: a domain or
// address literal) loosely: one token of printable ASCII, at most maxHelo
// octets. It is only used in logs and XCLIENT HELO (xtext-encoded).
func parseHelo(arg string) (string, bool) {
	name, _, _ := strings.Cut(strings.TrimLeft(arg, " "), " ")
	if name == "" || len(name) > maxHelo {
		return "", false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c >= 0x7f {
			return "", false
		}
	}
	return name, true
}
