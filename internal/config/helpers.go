package config

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
)

// Limits of the admin token and of [tags] keys.
const (
	// MinTokenLen is the shortest admin token accepted (after trimming).
	MinTokenLen = 16
	// MaxTokenFileSize caps what is read of admin.token_file.
	MaxTokenFileSize = 4096
	// MaxTagDomainLen caps a [tags] key: a domain name is at most 255
	// octets (RFC 1035, section 2.3.4).
	MaxTagDomainLen = 255
)

// IsEnabled reports whether health checks run: health.enabled, default true.
func (h Health) IsEnabled() bool {
	return h.Enabled == nil || *h.Enabled
}

// AdminToken returns the bearer token of the TCP admin API: admin.token, or
// the content of admin.token_file, with surrounding white space trimmed. It
// fails if neither is set, if the file cannot be read, or if the token is
// empty; the error never contains the token.
func (c *Config) AdminToken() (string, error) {
	switch {
	case c.Admin.Token != "":
		tok := strings.TrimSpace(c.Admin.Token)
		if tok == "" {
			return "", errors.New("admin token: admin.token is blank")
		}
		return tok, nil
	case c.Admin.TokenFile != "":
		tok, err := readTokenFile(c.Admin.TokenFile)
		if err != nil {
			return "", fmt.Errorf("admin token: %w", err)
		}
		return tok, nil
	}
	return "", errors.New("admin token: neither admin.token nor admin.token_file is set")
}

// readTokenFile reads a token file (at most MaxTokenFileSize bytes), trims
// it and checks it with checkToken.
func readTokenFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err // names the operation and the path
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxTokenFileSize+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > MaxTokenFileSize {
		return "", fmt.Errorf("%s is larger than %d bytes", path, MaxTokenFileSize)
	}
	tok := strings.TrimSpace(string(data))
	if err := checkToken(tok); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return tok, nil
}

// checkToken checks a trimmed admin token. Clients send it as
// "Authorization: Bearer <token>", whose token is a b64token
// (RFC 6750, section 2.1): letters, digits and -._~+/ then optional '='
// padding. The message never contains the token.
func checkToken(tok string) error {
	if tok == "" {
		return errors.New("token is empty")
	}
	if len(tok) < MinTokenLen {
		return fmt.Errorf("token is %d characters, want at least %d", len(tok), MinTokenLen)
	}
	body := strings.TrimRight(tok, "=")
	if body == "" {
		return errors.New("token is only '=' padding")
	}
	for i := 0; i < len(body); i++ {
		b := body[i]
		ok := b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
			strings.IndexByte("-._~+/", b) >= 0
		if !ok {
			return fmt.Errorf("token has a character not allowed in a bearer token at offset %d; use letters, digits and -._~+/ (RFC 6750, section 2.1)", i)
		}
	}
	return nil
}

// AdminAllow returns admin.allow as prefixes, masked, single IPs as /32 or
// /128, IPv4-mapped IPv6 unmapped (as TrustedPrefixes). Entries that do not
// parse are skipped: call it on a Config that passed Validate. Empty means
// no client may use the TCP API (ApplyDefaults sets loopback when
// admin.listen is set and admin.allow is empty).
func (c *Config) AdminAllow() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(c.Admin.Allow))
	for _, s := range c.Admin.Allow {
		if p, err := parseTrusted(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// TagFor returns the backend tag (pool) for a login name: the domain after
// its last '@', ASCII-lower-cased, looked up in [tags]. It returns "" (the
// default pool) for a name without '@' or a domain not in [tags].
func (c *Config) TagFor(user string) string {
	i := strings.LastIndexByte(user, '@')
	if i < 0 || i == len(user)-1 {
		return ""
	}
	return c.Tags[asciiLower(user[i+1:])]
}

// asciiLower lower-cases A-Z only, leaving other bytes (UTF-8 included) alone.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] >= 'A' && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// checkTagDomain checks a [tags] key: a domain as TagFor looks it up, so
// non-empty, without '@', white space or control characters, and without
// upper-case ASCII letters (TagFor lower-cases the user's domain, so an
// upper-case key could never match).
func checkTagDomain(d string) error {
	if d == "" {
		return errors.New("the domain must not be empty")
	}
	if len(d) > MaxTagDomainLen {
		return fmt.Errorf("the domain is %d bytes, longer than %d", len(d), MaxTagDomainLen)
	}
	if strings.Contains(d, "@") {
		return fmt.Errorf("%q has '@': write the domain only (the part of the user name after the last '@')", d)
	}
	for _, r := range d {
		if r <= ' ' || r == 0x7f {
			return fmt.Errorf("%q has %q; a domain has no white space or control characters", d, r)
		}
	}
	if low := asciiLower(d); low != d {
		return fmt.Errorf("%q has upper-case letters; domains are matched lower-cased: write %q", d, low)
	}
	return nil
}

// checkTagValue checks a [tags] value: a non-empty backend tag.
func checkTagValue(tag string) error {
	if tag == "" {
		return errors.New(`the tag must not be empty (users of domains not in [tags] already go to the default pool, tag "")`)
	}
	return checkTag(tag)
}

// Warnings returns problems that are not errors, one sentence each, in a
// stable order: a [tags] entry whose tag no [[backend]] carries (backends
// can be added at run time, so this is not a configuration error), and an
// admin.token_file that group or others may read. Call it after Validate.
func (c *Config) Warnings() []string {
	var out []string
	have := map[string]bool{}
	for _, b := range c.Backends {
		have[b.Tag] = true
	}
	for _, domain := range slices.Sorted(maps.Keys(c.Tags)) {
		if tag := c.Tags[domain]; !have[tag] {
			out = append(out, fmt.Sprintf("tags: %s → %s, but no [[backend]] has tag %s", domain, tag, tag))
		}
	}
	if c.Admin.Listen != "" && c.Admin.Token == "" && c.Admin.TokenFile != "" {
		if fi, err := os.Stat(c.Admin.TokenFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
			out = append(out, fmt.Sprintf("admin.token_file: %s has mode %04o: group or others may access it; use mode 0600",
				c.Admin.TokenFile, fi.Mode().Perm()))
		}
	}
	return out
}

// ParseBackendAddress checks a backend address given at run time (the admin
// API's `backend add`) as the [[backend]] address of a config file is
// checked: a plain unicast IP, no host name, no port; an IPv4-mapped IPv6
// address is kept as written (the Dovecot ring hashes its text). It also
// refuses an IPv6 zone ("fe80::1%eth0"): the state file,
// the routing table and `usher dump` key backends by address, and a zone
// names an interface of one host only.
func ParseBackendAddress(s string) (netip.Addr, error) {
	addr, err := checkBackendAddress(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("backend address: %w", err)
	}
	if addr.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("backend address: %q has an IPv6 zone; zones are not allowed", s)
	}
	return addr, nil
}

// CheckTag checks a backend tag given at run time as a [[backend]] tag is
// checked: [A-Za-z0-9_.-]{0,64}, "" being the default pool.
func CheckTag(tag string) error {
	if err := checkTag(tag); err != nil {
		return fmt.Errorf("backend tag: %w", err)
	}
	return nil
}

// AllowPrefixes returns the service's allow list as prefixes, masked,
// single IPs as /32 or /128, IPv4-mapped IPv6 unmapped (as TrustedPrefixes).
// Empty means every client may connect; for [lmtp], ApplyDefaults never
// leaves it empty (DefaultLMTPAllow). Entries that do not parse are skipped:
// call it on a Config that passed Validate. The list applies to TCP
// listeners, checked against the client address (after a PROXY header);
// a unix: listener has no client address, its mode, owner and group are its
// access control.
func (s Service) AllowPrefixes() []netip.Prefix {
	return prefixes(s.Allow)
}

// ProxyTrustedPrefixes returns proxy_trusted as prefixes, like
// AllowPrefixes: the peers a listener with proxy_protocol = true accepts a
// PROXY header from. Empty means none (Validate then refuses proxy_protocol).
func (s Service) ProxyTrustedPrefixes() []netip.Prefix {
	return prefixes(s.ProxyTrusted)
}

// prefixes parses CIDR and IP entries with parseTrusted, skipping bad ones.
func prefixes(list []string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(list))
	for _, s := range list {
		if p, err := parseTrusted(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// IsUnix reports whether the listener is a UNIX socket ("unix:/path").
func (l Listener) IsUnix() bool {
	return strings.HasPrefix(l.Address, unixPrefix)
}

// UnixPath returns the socket path of a unix: listener ("" for TCP).
func (l Listener) UnixPath() string {
	if !l.IsUnix() {
		return ""
	}
	return strings.TrimPrefix(l.Address, unixPrefix)
}

// UnixMode returns the permission of a unix: listener's socket: mode, or
// DefaultUnixMode (0660) when mode is empty or does not parse (call it on
// a Config that passed Validate).
func (l Listener) UnixMode() os.FileMode {
	if m, err := parseUnixMode(l.Mode); err == nil {
		return m
	}
	m, _ := parseUnixMode(DefaultUnixMode)
	return m
}

// UnixOwner resolves owner and group of a unix: listener to the ids for
// os.Chown: -1 for an empty owner or group (unchanged), a numeric value as
// it is, a name through the user or group database (os/user). The error
// names the listener and the key.
func (l Listener) UnixOwner() (uid, gid int, err error) {
	uid, err = resolveID(l.Owner, false, true)
	if err != nil {
		return -1, -1, fmt.Errorf("listener %s: owner: %w", l.Address, err)
	}
	gid, err = resolveID(l.Group, true, true)
	if err != nil {
		return -1, -1, fmt.Errorf("listener %s: group: %w", l.Address, err)
	}
	return uid, gid, nil
}
