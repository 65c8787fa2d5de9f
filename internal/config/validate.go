package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits checked by Validate.
const (
	MaxMaxLiteral    = 16 << 20 // max_literal upper bound, 16 MiB
	MaxBackendWeight = 1000     // the dovecot ring puts weight points per backend
	MaxTagLen        = 64
	MaxHealthCount   = 100 // health.fall and health.rise upper bound
	// MinBalanceFactor and MaxBalanceFactor bound balance_factor when it
	// is not 0 (off). Below 1 the capacities could not hold every user;
	// above 10 the bound hardly ever acts.
	MinBalanceFactor = 1.0
	MaxBalanceFactor = 10.0
	// maxSocketPath is the longest UNIX socket path Linux accepts
	// (sun_path is 108 bytes including the terminating NUL, unix(7)).
	maxSocketPath = 107

	// MinMaxMessageSize and MaxMaxMessageSize bound lmtp.max_message_size.
	MinMaxMessageSize = 1 << 10 // 1 KiB
	MaxMaxMessageSize = 2 << 30 // 2 GiB
	// MaxRecipientDelimiter caps lmtp.recipient_delimiter, in characters.
	MaxRecipientDelimiter = 8
	// maxIDNameLen caps a listener owner or group name.
	maxIDNameLen = 256
	// maxUnixMode is the largest listener mode: permission bits only, no
	// setuid, setgid or sticky bit.
	maxUnixMode = 0o777
	// smtpPort is the port LMTP must not use (RFC 2033, Abstract).
	smtpPort = 25
)

// unixPrefix starts the address of a UNIX socket listener.
const unixPrefix = "unix:"

// Backend PROXY protocol versions for backend_proxy.
const (
	BackendProxyNone = ""
	BackendProxyV1   = "v1"
	BackendProxyV2   = "v2"
)

// service is one [service] table with its key.
type service struct {
	name string // "imap", "pop3", "lmtp", "managesieve"
	s    *Service
}

// services lists the four services in a fixed order.
func (c *Config) services() []service {
	return []service{{"imap", &c.IMAP}, {"pop3", &c.POP3}, {"lmtp", &c.LMTP}, {"managesieve", &c.ManageSieve}}
}

// Validate checks the whole configuration, including that certificate, key
// and CA files load, that admin.token_file holds a usable token, that the
// directories of state_file and of unix: listener sockets exist, and that
// listener owner and group names resolve (os/user). Findings that are not
// errors (a [tags] entry no backend serves yet) come from Warnings. It
// returns every problem found, joined with errors.Join, each starting with
// the key it is about. Call it after ApplyDefaults (Load and Parse apply
// defaults).
func (c *Config) Validate() error {
	return c.validate(true)
}

// validator collects problems.
type validator struct {
	errs []error
}

func (v *validator) add(key, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
}

func (v *validator) wrap(key, what string, err error) {
	v.errs = append(v.errs, fmt.Errorf("%s: %s: %w", key, what, err))
}

// validate is Validate; checkFiles=false skips the checks that read files
// (the user and group database included), so that a config can be
// validated on a host without its certificates, directories or users.
func (c *Config) validate(checkFiles bool) error {
	v := &validator{}

	if c.Routing != "rendezvous" && c.Routing != "dovecot" {
		v.add("routing", "%q is not a routing algorithm (want \"rendezvous\" or \"dovecot\")", c.Routing)
	}
	switch f := c.BalanceFactor; {
	case f == 0:
	case !(f >= MinBalanceFactor && f <= MaxBalanceFactor): // NaN too
		v.add("balance_factor", "must be 0 (off) or between %g and %g, got %g", MinBalanceFactor, MaxBalanceFactor, f)
	case c.Routing == "dovecot":
		v.add("balance_factor", "must be 0 with routing = \"dovecot\", whose point is Dovecot's own placement; got %g", f)
	}
	if err := checkHashTemplate(c.HashTemplate); err != nil {
		v.add("hash_template", "%v", err)
	}
	if c.UserExpire.Duration <= 0 {
		v.add("user_expire", "must be greater than 0, got %s", c.UserExpire.Duration)
	}
	for _, t := range []struct {
		key string
		d   Duration
	}{
		{"timeouts.pre_login_idle", c.Timeouts.PreLoginIdle},
		{"timeouts.login", c.Timeouts.Login},
		{"timeouts.backend_connect", c.Timeouts.BackendConnect},
		{"timeouts.backend_login", c.Timeouts.BackendLogin},
		{"timeouts.move_wait", c.Timeouts.MoveWait},
	} {
		if t.d.Duration <= 0 {
			v.add(t.key, "must be greater than 0, got %s", t.d.Duration)
		}
	}
	if c.Timeouts.ShutdownGrace.Duration < 0 {
		v.add("timeouts.shutdown_grace", "must be 0 (close at once) or more, got %s", c.Timeouts.ShutdownGrace.Duration)
	}
	if c.MaxLiteral < 1 || c.MaxLiteral > MaxMaxLiteral {
		v.add("max_literal", "must be between 1 and %d (16 MiB), got %d", MaxMaxLiteral, c.MaxLiteral)
	}
	for i, s := range c.TrustedNetworks {
		if _, err := parseTrusted(s); err != nil {
			v.add(fmt.Sprintf("trusted_networks[%d]", i), "%v", err)
		}
	}

	enabled := false
	for _, svc := range c.services() {
		enabled = enabled || svc.s.Enabled()
	}
	if !enabled {
		v.add("imap.listener", "no listeners: configure at least one [[imap.listener]], [[pop3.listener]], [[lmtp.listener]] or [[managesieve.listener]]")
	}
	// normalized address (host:port, or unix: and a clean path) -> key that
	// listens on it, across all services and the admin API.
	listening := map[string]string{}
	for _, svc := range c.services() {
		svc.s.validate(v, svc.name, listening, checkFiles)
	}
	c.Admin.validate(v, listening, checkFiles)
	c.Health.validate(v)
	c.validateStateFile(v, checkFiles)
	c.validateTags(v)

	c.validateBackends(v)
	return errors.Join(v.errs...)
}

// validate checks [admin]. listening holds the service listeners, so that
// admin.listen cannot take one of their addresses.
func (a *Admin) validate(v *validator, listening map[string]string, checkFiles bool) {
	switch {
	case a.Socket == "":
		v.add("admin.socket", "must not be empty")
	case len(a.Socket) > maxSocketPath:
		v.add("admin.socket", "path %q is %d bytes, longer than the %d a UNIX socket allows",
			a.Socket, len(a.Socket), maxSocketPath)
	default:
		if prev, dup := listening[unixPrefix+filepath.Clean(a.Socket)]; dup {
			v.add("admin.socket", "%q is already used by %s", a.Socket, prev)
		}
	}
	for i, s := range a.Allow {
		if _, err := parseTrusted(s); err != nil {
			v.add(fmt.Sprintf("admin.allow[%d]", i), "%v", err)
		}
	}
	if a.Listen == "" {
		return
	}
	if norm, err := checkListenAddress(a.Listen); err != nil {
		v.add("admin.listen", "%v", err)
	} else if prev, dup := listening[norm]; dup {
		v.add("admin.listen", "%q is already used by %s", a.Listen, prev)
	} else {
		listening[norm] = "admin.listen"
	}
	// The TCP API is only ever served with a bearer token.
	switch {
	case a.Token == "" && a.TokenFile == "":
		v.add("admin.token", "admin.listen is set, so admin.token or admin.token_file is required")
	case a.Token != "" && a.TokenFile != "":
		v.add("admin.token", "set only one of admin.token and admin.token_file")
	case a.Token != "":
		if err := checkToken(strings.TrimSpace(a.Token)); err != nil {
			v.add("admin.token", "%v", err)
		}
	case checkFiles:
		if _, err := readTokenFile(a.TokenFile); err != nil {
			v.add("admin.token_file", "%v", err)
		}
	}
}

// validate checks [health].
func (h *Health) validate(v *validator) {
	for _, t := range []struct {
		key string
		d   Duration
	}{
		{"health.interval", h.Interval},
		{"health.timeout", h.Timeout},
		{"health.flap_window", h.FlapWindow},
		{"health.hold_down", h.HoldDown},
	} {
		if t.d.Duration <= 0 {
			v.add(t.key, "must be greater than 0, got %s", t.d.Duration)
		}
	}
	if h.Interval.Duration > 0 && h.Timeout.Duration > h.Interval.Duration {
		v.add("health.timeout", "must not exceed health.interval (%s), got %s", h.Interval.Duration, h.Timeout.Duration)
	}
	if h.Fall < 1 || h.Fall > MaxHealthCount {
		v.add("health.fall", "must be between 1 and %d, got %d", MaxHealthCount, h.Fall)
	}
	if h.Rise < 1 || h.Rise > MaxHealthCount {
		v.add("health.rise", "must be between 1 and %d, got %d", MaxHealthCount, h.Rise)
	}
	if h.FlapMax < 1 {
		v.add("health.flap_max", "must be 1 or more, got %d", h.FlapMax)
	}
	// The password is never part of a message.
	switch {
	case h.LoginUser != "" && h.LoginPassword == "":
		v.add("health.login_password", "required when health.login_user is set")
	case h.LoginUser == "" && h.LoginPassword != "":
		v.add("health.login_user", "required when health.login_password is set")
	}
}

// validateStateFile checks state_file; with checkFiles, that its directory exists.
func (c *Config) validateStateFile(v *validator, checkFiles bool) {
	if c.StateFile == "" {
		v.add("state_file", "must not be empty")
		return
	}
	if !checkFiles {
		return
	}
	dir := filepath.Dir(c.StateFile)
	fi, err := os.Stat(dir)
	switch {
	case err != nil:
		v.wrap("state_file", "directory", err)
	case !fi.IsDir():
		v.add("state_file", "%s is not a directory", dir)
	}
}

// validateTags checks [tags] (Parse checked it already; a Config built in
// code has not been). Tags no backend carries are warnings, see Warnings.
func (c *Config) validateTags(v *validator) {
	for _, domain := range slices.Sorted(maps.Keys(c.Tags)) {
		key := "tags." + quoteKey(domain)
		if err := checkTagDomain(domain); err != nil {
			v.add(key, "%v", err)
		}
		if err := checkTagValue(c.Tags[domain]); err != nil {
			v.add(key, "%v", err)
		}
	}
}

func (s *Service) validate(v *validator, name string, listening map[string]string, checkFiles bool) {
	lmtp := name == "lmtp"
	for i, l := range s.Listeners {
		key := fmt.Sprintf("%s.listener[%d]", name, i)
		s.validateListener(v, key, l, lmtp, listening, checkFiles)
	}
	if s.MaxSessions < 0 {
		v.add(name+".max_sessions", "must be 0 (unlimited) or more, got %d", s.MaxSessions)
	}
	if s.MaxSessionsPerIP < 0 {
		v.add(name+".max_sessions_per_ip", "must be 0 (unlimited) or more, got %d", s.MaxSessionsPerIP)
	}
	switch {
	case s.BackendPort < 1 || s.BackendPort > 65535:
		v.add(name+".backend_port", "must be between 1 and 65535, got %d", s.BackendPort)
	case lmtp && s.BackendPort == smtpPort:
		v.add(name+".backend_port", "LMTP must not be used on port 25 (RFC 2033); Dovecot's LMTP port is usually 24")
	}
	for i, a := range s.Allow {
		if _, err := parseTrusted(a); err != nil {
			v.add(fmt.Sprintf("%s.allow[%d]", name, i), "%v", err)
		}
	}
	for i, a := range s.ProxyTrusted {
		if _, err := parseTrusted(a); err != nil {
			v.add(fmt.Sprintf("%s.proxy_trusted[%d]", name, i), "%v", err)
		}
	}
	switch s.BackendProxy {
	case BackendProxyNone, BackendProxyV1, BackendProxyV2:
	default:
		v.add(name+".backend_proxy", "%q is not a PROXY protocol version (want \"v1\", \"v2\" or \"\" for none)", s.BackendProxy)
	}
	switch {
	case s.RecipientDelimiter == "":
	case !lmtp:
		v.add(name+".recipient_delimiter", "is only for [lmtp]")
	default:
		if err := checkRecipientDelimiter(s.RecipientDelimiter); err != nil {
			v.add(name+".recipient_delimiter", "%v", err)
		}
	}
	switch {
	case !lmtp && s.MaxMessageSize != 0:
		v.add(name+".max_message_size", "is only for [lmtp]")
	case lmtp && (s.MaxMessageSize < MinMaxMessageSize || s.MaxMessageSize > MaxMaxMessageSize):
		v.add(name+".max_message_size", "must be between %d (1 KiB) and %d (2 GiB), got %d",
			MinMaxMessageSize, MaxMaxMessageSize, s.MaxMessageSize)
	}
	switch s.BackendTLS {
	case TLSNone:
		if s.BackendCA != "" {
			v.add(name+".backend_ca", "is set but backend_tls is \"none\"")
		}
	case TLSStartTLS, TLSImplicit:
		if s.BackendCA != "" && checkFiles {
			if _, err := loadCertPool(s.BackendCA); err != nil {
				v.wrap(name+".backend_ca", "load", err)
			}
		}
	default:
		v.add(name+".backend_tls", "%q is not a TLS mode (want \"none\", \"starttls\" or \"implicit\")", s.BackendTLS)
	}
}

// validateListener checks one listener of a service, at key. lmtp says
// the service is [lmtp].
func (s *Service) validateListener(v *validator, key string, l Listener, lmtp bool, listening map[string]string, checkFiles bool) {
	unix := l.IsUnix()
	if unix {
		if norm, err := checkUnixAddress(l.Address, checkFiles); err != nil {
			v.add(key+".address", "%v", err)
		} else if prev, dup := listening[norm]; dup {
			v.add(key+".address", "%q is already used by %s", l.Address, prev)
		} else {
			listening[norm] = key
		}
	} else {
		if len(l.Address) >= len(unixPrefix) && strings.EqualFold(l.Address[:len(unixPrefix)], unixPrefix) {
			v.add(key+".address", "%q: write the unix: prefix in lower case", l.Address)
		} else if norm, err := checkListenAddress(l.Address); err != nil {
			v.add(key+".address", "%v", err)
		} else if prev, dup := listening[norm]; dup {
			v.add(key+".address", "%q is already used by %s", l.Address, prev)
		} else {
			listening[norm] = key
			if _, port, _ := net.SplitHostPort(norm); lmtp && port == strconv.Itoa(smtpPort) {
				v.add(key+".address", "LMTP must not be used on port 25 (RFC 2033)")
			}
		}
	}

	// TLS works the same on TCP and UNIX listeners. LMTP may use STARTTLS
	// (RFC 2033 keeps ESMTP's extensions, so RFC 3207 applies) and implicit TLS.
	switch l.TLS {
	case TLSNone:
		if l.Cert != "" || l.Key != "" {
			v.add(key+".tls", "cert and key are set but tls is \"none\"; set tls = \"starttls\" or \"implicit\", or remove them")
		}
	case TLSStartTLS, TLSImplicit:
		missing := false
		if l.Cert == "" {
			v.add(key+".cert", "required with tls = %q", l.TLS)
			missing = true
		}
		if l.Key == "" {
			v.add(key+".key", "required with tls = %q", l.TLS)
			missing = true
		}
		if !missing && checkFiles {
			if _, err := tls.LoadX509KeyPair(l.Cert, l.Key); err != nil {
				v.wrap(key+".cert", "load certificate and key", err)
			}
		}
	default:
		v.add(key+".tls", "%q is not a TLS mode (want \"none\", \"starttls\" or \"implicit\")", l.TLS)
	}

	// Mode, owner and group only exist for a socket file.
	if !unix {
		for _, f := range []struct{ name, val string }{{"mode", l.Mode}, {"owner", l.Owner}, {"group", l.Group}} {
			if f.val != "" {
				v.add(key+"."+f.name, "is only for unix: listeners (%q is a TCP address)", l.Address)
			}
		}
	} else {
		if l.Mode != "" {
			if _, err := parseUnixMode(l.Mode); err != nil {
				v.add(key+".mode", "%v", err)
			}
		}
		if _, err := resolveID(l.Owner, false, checkFiles); err != nil {
			v.add(key+".owner", "%v", err)
		}
		if _, err := resolveID(l.Group, true, checkFiles); err != nil {
			v.add(key+".group", "%v", err)
		}
	}

	if l.ProxyProtocol {
		switch {
		case unix:
			// The PROXY header is only accepted from proxy_trusted
			// addresses, and a UNIX socket peer has none.
			v.add(key+".proxy_protocol", "is only for TCP listeners: a unix: socket has no client address to check against proxy_trusted")
		case len(s.ProxyTrusted) == 0:
			name, _, _ := strings.Cut(key, ".")
			v.add(key+".proxy_protocol", "needs %s.proxy_trusted: the load balancers that may send the PROXY header", name)
		}
	}
}

// checkUnixAddress checks a "unix:/path" listener address and returns
// "unix:" and the path, the form used for duplicate detection. With
// checkFiles, the path's directory must exist, and the path must not be
// something other than a socket (a stale socket is replaced when listening,
// a regular file never is).
func checkUnixAddress(addr string, checkFiles bool) (string, error) {
	p := strings.TrimPrefix(addr, unixPrefix)
	switch {
	case p == "":
		return "", fmt.Errorf("%q has no path (want unix:/absolute/path)", addr)
	case !filepath.IsAbs(p):
		return "", fmt.Errorf("%q: the socket path must be absolute (want unix:/absolute/path)", addr)
	case len(p) > maxSocketPath:
		return "", fmt.Errorf("socket path %q is %d bytes, longer than the %d a UNIX socket allows", p, len(p), maxSocketPath)
	case strings.ContainsFunc(p, func(r rune) bool { return r < ' ' || r == 0x7f }):
		return "", fmt.Errorf("socket path %q has a control character", p)
	case filepath.Clean(p) != p:
		return "", fmt.Errorf("socket path %q is not clean: write %q", p, filepath.Clean(p))
	case p == "/":
		return "", fmt.Errorf("%q is a directory, not a socket path", addr)
	}
	if checkFiles {
		dir := filepath.Dir(p)
		if fi, err := os.Stat(dir); err != nil {
			return "", fmt.Errorf("socket directory: %w", err)
		} else if !fi.IsDir() {
			return "", fmt.Errorf("socket directory %s is not a directory", dir)
		}
		if fi, err := os.Lstat(p); err == nil && fi.Mode().Type() != os.ModeSocket {
			return "", fmt.Errorf("%s exists and is not a socket (mode %s); usher only replaces stale sockets", p, fi.Mode().Type())
		}
	}
	return unixPrefix + p, nil
}

// parseUnixMode parses a listener mode: an octal number 0..0777, with or
// without a leading 0 ("0660", "660").
func parseUnixMode(s string) (os.FileMode, error) {
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not an octal mode like \"0660\"", s)
	}
	if n > maxUnixMode {
		return 0, fmt.Errorf("%q is more than 0777: only permission bits are allowed", s)
	}
	return os.FileMode(n), nil
}

// resolveID resolves a listener owner (group=false) or group: "" is -1
// (unchanged); a decimal number is that id, found in the user or group
// database or not; anything else is a name, looked up (os/user) only when
// lookup is set, else -1 once its syntax is checked.
func resolveID(s string, group, lookup bool) (int, error) {
	what := "user"
	if group {
		what = "group"
	}
	switch {
	case s == "":
		return -1, nil
	case strings.Trim(s, "0123456789") == "":
		n, err := strconv.ParseUint(s, 10, 32)
		// (uid_t)-1 and (gid_t)-1 mean "unchanged" to chown(2).
		if err != nil || n == 1<<32-1 {
			return -1, fmt.Errorf("%s id %s is out of range (0..4294967294)", what, s)
		}
		return int(n), nil
	case len(s) > maxIDNameLen:
		return -1, fmt.Errorf("%s name is %d bytes, longer than %d", what, len(s), maxIDNameLen)
	case s[0] == '-' || strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f || r == ':' || r == '/' }):
		return -1, fmt.Errorf("%q is not a %s name or a numeric id", s, what)
	case !lookup:
		return -1, nil
	}
	var id string
	if group {
		g, err := user.LookupGroup(s)
		if err != nil {
			return -1, fmt.Errorf("look up group: %w", err)
		}
		id = g.Gid
	} else {
		u, err := user.Lookup(s)
		if err != nil {
			return -1, fmt.Errorf("look up user: %w", err)
		}
		id = u.Uid
	}
	n, err := strconv.Atoi(id)
	if err != nil {
		return -1, fmt.Errorf("%s %q has the non-numeric id %q", what, s, id)
	}
	return n, nil
}

// checkRecipientDelimiter checks lmtp.recipient_delimiter: at most
// MaxRecipientDelimiter characters, each of which is a delimiter, none of
// them '@', white space or a control character.
func checkRecipientDelimiter(d string) error {
	if !utf8.ValidString(d) {
		return fmt.Errorf("%q is not valid UTF-8", d)
	}
	if n := utf8.RuneCountInString(d); n > MaxRecipientDelimiter {
		return fmt.Errorf("%q has %d characters, more than %d", d, n, MaxRecipientDelimiter)
	}
	for _, r := range d {
		if r == '@' || unicode.IsSpace(r) || unicode.IsControl(r) {
			return fmt.Errorf("%q has %q; '@', white space and control characters cannot be delimiters", d, r)
		}
	}
	return nil
}

func (c *Config) validateBackends(v *validator) {
	if len(c.Backends) == 0 {
		v.add("backend", "no backends: configure at least one [[backend]]")
	}
	seen := map[netip.Addr]int{}
	for i, b := range c.Backends {
		key := fmt.Sprintf("backend[%d]", i)
		if addr, err := checkBackendAddress(b.Address); err != nil {
			v.add(key+".address", "%v", err)
		} else if j, dup := seen[addr.Unmap()]; dup {
			v.add(key+".address", "%q is the same backend as backend[%d]", b.Address, j)
		} else {
			seen[addr.Unmap()] = i
		}
		if b.Weight != nil && (*b.Weight < 0 || *b.Weight > MaxBackendWeight) {
			v.add(key+".weight", "must be between 0 and %d, got %d", MaxBackendWeight, *b.Weight)
		}
		if err := checkTag(b.Tag); err != nil {
			v.add(key+".tag", "%v", err)
		}
	}
}

// checkListenAddress checks a host:port listen address and returns it in a
// normalized form for duplicate detection.
func checkListenAddress(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			return "", fmt.Errorf("%s %q (want host:port, e.g. \"0.0.0.0:143\")", ae.Err, addr)
		}
		return "", fmt.Errorf("%q: %w", addr, err)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("port %q in address %q must be a number between 1 and 65535", port, addr)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		host = ip.Unmap().String()
	} else {
		host = strings.ToLower(host)
	}
	return net.JoinHostPort(host, strconv.Itoa(n)), nil
}

// checkBackendAddress parses a backend address, which must be a plain IP.
func checkBackendAddress(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, errors.New("must not be empty")
	}
	addr, err := netip.ParseAddr(s)
	if err != nil {
		if _, _, herr := net.SplitHostPort(s); herr == nil {
			return netip.Addr{}, fmt.Errorf("%q has a port; write the IP only, the port comes from each service's backend_port", s)
		}
		return netip.Addr{}, fmt.Errorf("%q is not an IP address (host names are not allowed, write the IP)", s)
	}
	// The address is kept as written: the Dovecot ring hashes its text, so
	// an IPv4-mapped address must stay mapped to place users as Dovecot did.
	if u := addr.Unmap(); u.IsUnspecified() || u.IsMulticast() {
		return netip.Addr{}, fmt.Errorf("%q is not a unicast address", s)
	}
	return addr, nil
}

// parseTrusted parses a trusted_networks entry: a CIDR prefix or a single IP
// (a /32 or /128). IPv4-mapped IPv6 addresses are unmapped.
func parseTrusted(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix: %w", s, err)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is neither an IP address nor a CIDR prefix: %w", s, err)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q: IPv6 zones are not allowed", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// checkHashTemplate checks a hash_template: literal text plus the variables
// %u %Lu %n %Ln %d %Ld and %% (a literal %), with at least one variable.
func checkHashTemplate(t string) error {
	if t == "" {
		return errors.New("must not be empty")
	}
	vars := 0
	for i := 0; i < len(t); i++ {
		if t[i] != '%' {
			continue
		}
		rest := t[i+1:]
		switch {
		case strings.HasPrefix(rest, "%"):
			i++
		case len(rest) > 0 && strings.ContainsRune("und", rune(rest[0])):
			vars++
			i++
		case len(rest) > 1 && rest[0] == 'L' && strings.ContainsRune("und", rune(rest[1])):
			vars++
			i += 2
		case rest == "":
			return fmt.Errorf("%q ends with a lone %%; write %%%% for a literal %%", t)
		default:
			bad := rest[:1]
			if rest[0] == 'L' && len(rest) > 1 {
				bad = rest[:2]
			}
			return fmt.Errorf("unknown variable %q at offset %d in %q (want %%u %%Lu %%n %%Ln %%d %%Ld or %%%%)", "%"+bad, i, t)
		}
	}
	if vars == 0 {
		return fmt.Errorf("%q uses no variable, so every user would hash the same (want %%u %%Lu %%n %%Ln %%d or %%Ld)", t)
	}
	return nil
}

// checkTag checks a backend tag: [A-Za-z0-9_.-]{0,64}.
func checkTag(tag string) error {
	if len(tag) > MaxTagLen {
		return fmt.Errorf("%q is longer than %d characters", tag, MaxTagLen)
	}
	for _, r := range tag {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			r == '_' || r == '.' || r == '-'
		if !ok {
			return fmt.Errorf("%q has %q; only letters, digits, '_', '.' and '-' are allowed", tag, r)
		}
	}
	return nil
}

// TrustedPrefixes returns trusted_networks as prefixes, masked, single IPs as
// /32 or /128, IPv4-mapped IPv6 unmapped. Entries that do not parse are
// skipped: call it on a Config that passed Validate. Callers should Unmap
// client addresses before calling Contains.
func (c *Config) TrustedPrefixes() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(c.TrustedNetworks))
	for _, s := range c.TrustedNetworks {
		if p, err := parseTrusted(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// Enabled reports whether the service has listeners.
func (s Service) Enabled() bool {
	return len(s.Listeners) > 0
}

// ServerTLS returns the server TLS configuration of a listener: nil, nil for
// tls = "none"; otherwise its certificate, TLS 1.2 or newer.
func (l Listener) ServerTLS() (*tls.Config, error) {
	switch l.TLS {
	case TLSNone, "":
		return nil, nil
	case TLSStartTLS, TLSImplicit:
	default:
		return nil, fmt.Errorf("listener %s: unknown tls mode %q", l.Address, l.TLS)
	}
	cert, err := tls.LoadX509KeyPair(l.Cert, l.Key)
	if err != nil {
		return nil, fmt.Errorf("listener %s: load certificate: %w", l.Address, err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// BackendTLSConfig returns the client TLS configuration for connections to
// backends: nil, nil for backend_tls = "none". RootCAs come from backend_ca
// if set (else the system pool); backend_tls_verify = false skips
// verification. Verification needs a ServerName: callers Clone the result
// and set ServerName to the backend address for each connection.
func (s Service) BackendTLSConfig() (*tls.Config, error) {
	switch s.BackendTLS {
	case TLSNone, "":
		return nil, nil
	case TLSStartTLS, TLSImplicit:
	default:
		return nil, fmt.Errorf("backend tls: unknown mode %q", s.BackendTLS)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if s.BackendCA != "" {
		pool, err := loadCertPool(s.BackendCA)
		if err != nil {
			return nil, fmt.Errorf("backend tls: load backend_ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if s.BackendTLSVerify != nil && !*s.BackendTLSVerify {
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}

// loadCertPool reads a PEM file of CA certificates.
func loadCertPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificates found", path)
	}
	return pool, nil
}
