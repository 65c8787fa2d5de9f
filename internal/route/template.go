package route

import (
	"crypto/md5"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// DefaultTemplate is the username hash template used when none is configured;
// it is also Dovecot's default director_username_hash.
const DefaultTemplate = "%Lu"

// ValidateTemplate checks a username hash template. It accepts the variables
// %u (user as given), %n (local part before the first '@'), %d (domain after
// the first '@'), each optionally with the L (ASCII lowercase) modifier, and
// %% for a literal '%'. Anything else after '%' is an error, as is a trailing
// '%', and so is a template without any user variable (it would send every
// user to the same backend).
func ValidateTemplate(tmpl string) error {
	vars := 0
	for i := 0; i < len(tmpl); i++ {
		if tmpl[i] != '%' {
			continue
		}
		i++
		if i >= len(tmpl) {
			return fmt.Errorf("route: validate template %q: trailing %%", tmpl)
		}
		c := tmpl[i]
		if c == '%' {
			continue
		}
		if c == 'L' {
			i++
			if i >= len(tmpl) {
				return fmt.Errorf("route: validate template %q: %%L without a variable", tmpl)
			}
			c = tmpl[i]
		}
		switch c {
		case 'u', 'n', 'd':
			vars++
		default:
			return fmt.Errorf("route: validate template %q: %w %%%s", tmpl, errUnknownVar, tmpl[i:i+1])
		}
	}
	if vars == 0 {
		return fmt.Errorf("route: validate template %q: %w", tmpl, errNoVar)
	}
	return nil
}

var (
	errUnknownVar = errors.New("unknown variable")
	errNoVar      = errors.New("no user variable (%u, %n, %d), every user would hash alike")
)

// ExpandTemplate expands a username hash template for user, the way Dovecot
// 2.3's mail_user_hash() (src/lib-mail/mail-user-hash.c) builds the string it
// hashes: %u is the user, %n is t_strcut(user, '@') (everything before the
// first '@', the whole user if there is none), %d is what follows the first
// '@' ("" if there is none), and L lowercases ASCII letters only (Dovecot's
// t_str_lcase/i_tolower in the C locale); other bytes, including non-ASCII
// UTF-8, are kept as they are. ExpandTemplate never fails: sequences that
// ValidateTemplate rejects are copied literally, so call ValidateTemplate
// once when loading the configuration.
func ExpandTemplate(tmpl, user string) string {
	// Fast paths for the common templates; they allocate at most once.
	switch tmpl {
	case "%u":
		return user
	case "%Lu":
		return asciiLower(user)
	}
	local, domain := user, ""
	if at := strings.IndexByte(user, '@'); at >= 0 {
		local, domain = user[:at], user[at+1:]
	}
	var b strings.Builder
	b.Grow(len(tmpl) + len(user))
	for i := 0; i < len(tmpl); i++ {
		c := tmpl[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		start := i
		i++
		if i >= len(tmpl) {
			b.WriteByte('%') // trailing '%': literal
			break
		}
		c = tmpl[i]
		if c == '%' {
			b.WriteByte('%')
			continue
		}
		lower := false
		if c == 'L' && i+1 < len(tmpl) {
			lower = true
			i++
			c = tmpl[i]
		}
		var v string
		switch c {
		case 'u':
			v = user
		case 'n':
			v = local
		case 'd':
			v = domain
		default:
			b.WriteString(tmpl[start : i+1]) // unknown: literal
			continue
		}
		if lower {
			writeASCIILower(&b, v)
		} else {
			b.WriteString(v)
		}
	}
	return b.String()
}

// asciiLower returns s with A-Z mapped to a-z; it returns s itself (no
// allocation) when there is nothing to change.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			var b strings.Builder
			b.Grow(len(s))
			b.WriteString(s[:i])
			writeASCIILower(&b, s[i:])
			return b.String()
		}
	}
	return s
}

func writeASCIILower(b *strings.Builder, s string) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		b.WriteByte(c)
	}
}

// UserHash is the Dovecot 2.3 director user hash of an expanded template key:
// the first 4 bytes of MD5(key) read big-endian, with 0 replaced by 1.
//
// Confirmed against dovecot/core src/lib-mail/mail-user-hash.c (2.3,
// mail_user_hash: md5_get_digest of the expanded string, then
// hash = (hash << 8) | md5[i] for i in 0..3) and its 2.3 header, which
// documents "The returned hash is never 0" (0 is "no user" inside the
// director). The stored test vectors of src/lib-mail/test-mail-user-hash.c
// are in route_test.go.
func UserHash(key string) uint32 {
	var sum [md5.Size]byte
	// Copying short keys into a stack buffer keeps UserHash (and so
	// Table.Pick) free of heap allocations for every realistic user name.
	var buf [128]byte
	if len(key) <= len(buf) {
		n := copy(buf[:], key)
		sum = md5.Sum(buf[:n])
	} else {
		sum = md5.Sum([]byte(key))
	}
	h := binary.BigEndian.Uint32(sum[:4])
	if h == 0 {
		h = 1
	}
	return h
}
