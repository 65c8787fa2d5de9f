// Package config loads, defaults and validates the usher configuration file
// (TOML, see examples/usher.toml).
//
// Invariants:
//   - Decoding is strict: a key that is not part of the schema, a key whose
//     case differs from the schema (TOML v1.0.0, "Keys": keys are
//     case-sensitive), or a value of the wrong TOML type is an error naming
//     the file, the line and the key. Nothing is silently ignored.
//   - Load and Parse return a Config with every default applied. Defaults are
//     filled in before the file is decoded over them, so a value written in the
//     file always wins, including a 0 that means "unlimited".
//   - Relative file paths (state_file, admin.socket, admin.token_file,
//     listener cert/key, backend_ca) are resolved against the directory of
//     the configuration file. A UNIX listener address ("unix:/path") must be
//     absolute and is never resolved.
//   - There are four services, [imap], [pop3], [lmtp] and [managesieve],
//     with the same keys; recipient_delimiter and max_message_size are for
//     [lmtp] only. The LMTP service defaults to clients on loopback only
//     (lmtp.allow), also when the file says allow = [].
//   - Keys of [tags] are lower-case domains and its values valid backend
//     tags (checked when parsing and again by Validate), so TagFor only
//     needs to lower-case the user's domain.
//   - Validate reports every problem at once (errors.Join), each naming the key
//     it is about, e.g. "imap.listener[0].address: ...". Code using a Config
//     may rely on everything Validate checks.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Defaults. A value written in the configuration file replaces its default.
const (
	DefaultUserExpire       = 15 * time.Minute
	DefaultRouting          = "rendezvous"
	DefaultHashTemplate     = "%Lu"
	DefaultMaxLiteral       = 8192
	DefaultAdminSocket      = "usher-admin.sock"
	DefaultPreLoginIdle     = 60 * time.Second
	DefaultLogin            = 3 * time.Minute
	DefaultBackendConnect   = 5 * time.Second
	DefaultBackendLogin     = 30 * time.Second
	DefaultMaxSessions      = 10000
	DefaultMaxSessionsPerIP = 50
	DefaultIMAPBackendPort  = 143
	DefaultPOP3BackendPort  = 110
	// DefaultLMTPBackendPort is Dovecot's usual LMTP port. RFC 2033 gives
	// LMTP no port of its own and forbids port 25 (RFC 2033, Abstract);
	// 24 is IANA's "any private mail system".
	DefaultLMTPBackendPort = 24
	// DefaultManageSieveBackendPort is the IANA port of ManageSieve (RFC 5804).
	DefaultManageSieveBackendPort = 4190
	// DefaultLMTPMaxSessionsPerIP is 0 (unlimited): an LMTP client is
	// usually the one MTA, so a per-IP cap would only cap the MTA.
	DefaultLMTPMaxSessionsPerIP = 0
	// DefaultLMTPMaxMessageSize caps an LMTP message: 64 MiB.
	DefaultLMTPMaxMessageSize = 64 << 20
	// DefaultUnixMode is the permission of a UNIX listener socket.
	DefaultUnixMode      = "0660"
	DefaultBackendWeight = 100
	DefaultStateFile     = "usher-state.json"
	DefaultMoveWait      = 30 * time.Second
	DefaultShutdownGrace = 30 * time.Second

	DefaultHealthInterval   = 5 * time.Second
	DefaultHealthTimeout    = 3 * time.Second
	DefaultHealthFall       = 3
	DefaultHealthRise       = 2
	DefaultHealthFlapWindow = 5 * time.Minute
	DefaultHealthFlapMax    = 4
	DefaultHealthHoldDown   = 2 * time.Minute
)

// DefaultAdminAllow returns the default admin.allow, used when admin.listen
// is set and admin.allow is empty: loopback only. A fresh slice per call.
func DefaultAdminAllow() []string { return []string{"127.0.0.0/8", "::1/128"} }

// DefaultLMTPAllow returns the default lmtp.allow, used when lmtp.allow is
// missing or empty: loopback only, as delivery is for the local MTA. A
// fresh slice per call. To accept every client, write
// allow = ["0.0.0.0/0", "::/0"].
func DefaultLMTPAllow() []string { return []string{"127.0.0.0/8", "::1/128"} }

// MaxFileSize caps the size of a configuration file Load reads.
const MaxFileSize = 1 << 20

// Load reads and decodes the configuration file at path and applies defaults.
// It does not call Validate.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("load config %s: larger than %d bytes", path, MaxFileSize)
	}
	return Parse(data, path)
}

// Parse decodes a configuration document and applies defaults. name is the
// file name used in error messages; its absolute form becomes Config.Path and
// is the base for relative paths. An empty name leaves Path empty and relative
// paths relative to the working directory. Parse does not call Validate.
func Parse(data []byte, name string) (*Config, error) {
	c := &Config{}
	if name != "" {
		abs, err := filepath.Abs(name)
		if err != nil {
			return nil, fmt.Errorf("parse config %s: %w", name, err)
		}
		c.Path = abs
	} else {
		name = "config"
	}

	// Defaults first, then the document decoded over them: a key present in
	// the document replaces its default, an absent key keeps it.
	c.ApplyDefaults()

	// The schema check gives precise messages for unknown keys (including
	// keys that differ only in case, which go-toml would otherwise accept)
	// and for values of the wrong TOML type.
	if problems := checkSchema(data, name); len(problems) > 0 {
		return nil, errors.Join(problems...)
	}

	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return nil, decodeError(name, err)
	}
	c.ApplyDefaults() // only fills what decoding can leave unset; see ApplyDefaults
	return c, nil
}

// fileError is a problem at a line of the configuration file.
type fileError struct {
	file string
	line int    // 0 if unknown
	key  string // dotted key path, may be empty
	msg  string
	err  error // underlying error, may be nil
}

func (e *fileError) Error() string {
	var b strings.Builder
	b.WriteString(e.file)
	if e.line > 0 {
		fmt.Fprintf(&b, ":%d", e.line)
	}
	b.WriteString(": ")
	if e.key != "" {
		b.WriteString(e.key)
		b.WriteString(": ")
	}
	b.WriteString(e.msg)
	return b.String()
}

func (e *fileError) Unwrap() error { return e.err }

// decodeError turns a go-toml error into errors naming file, line and key.
func decodeError(file string, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		errs := make([]error, 0, len(strict.Errors))
		for i := range strict.Errors {
			de := &strict.Errors[i]
			line, _ := de.Position()
			errs = append(errs, &fileError{
				file: file, line: line,
				msg: fmt.Sprintf("unknown key %q", strings.Join(de.Key(), ".")),
				err: de,
			})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, _ := de.Position()
		return &fileError{
			file: file, line: line,
			key: strings.Join(de.Key(), "."),
			msg: strings.TrimPrefix(de.Error(), "toml: "),
			err: de,
		}
	}
	return &fileError{file: file, msg: err.Error(), err: err}
}

// UnmarshalText parses a Go duration string such as "15m" or "1h30m".
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return err // already says `time: invalid duration "..."`
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration as a Go duration string ("15m0s").
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(d.String()), nil
}

// ApplyDefaults fills unset fields with their defaults and resolves relative
// paths against the directory of c.Path.
//
// The first call on a Config treats every zero value as unset. Later calls
// (Parse makes one after decoding) only fill what a file cannot set to a
// meaningful zero: nil pointers (backend weight, backend_tls_verify,
// health.enabled), an empty listener tls, an empty mode of a UNIX listener,
// an empty admin.socket or state_file, an empty admin.allow while
// admin.listen is set, an empty lmtp.allow (so `allow = []` in [lmtp] means
// loopback, like no allow at all). So an explicit
// `max_sessions = 0` (unlimited) or an explicit invalid `user_expire = "0s"`
// (reported by Validate) is never overwritten. ApplyDefaults is idempotent.
func (c *Config) ApplyDefaults() {
	if !c.defaulted {
		c.defaulted = true
		setDuration(&c.UserExpire, DefaultUserExpire)
		setString(&c.Routing, DefaultRouting)
		setString(&c.HashTemplate, DefaultHashTemplate)
		if c.MaxLiteral == 0 {
			c.MaxLiteral = DefaultMaxLiteral
		}
		setDuration(&c.Timeouts.PreLoginIdle, DefaultPreLoginIdle)
		setDuration(&c.Timeouts.Login, DefaultLogin)
		setDuration(&c.Timeouts.BackendConnect, DefaultBackendConnect)
		setDuration(&c.Timeouts.BackendLogin, DefaultBackendLogin)
		setDuration(&c.Timeouts.MoveWait, DefaultMoveWait)
		setDuration(&c.Timeouts.ShutdownGrace, DefaultShutdownGrace)
		c.Health.firstDefaults()
		c.IMAP.firstDefaults(DefaultIMAPBackendPort, DefaultMaxSessionsPerIP)
		c.POP3.firstDefaults(DefaultPOP3BackendPort, DefaultMaxSessionsPerIP)
		c.LMTP.firstDefaults(DefaultLMTPBackendPort, DefaultLMTPMaxSessionsPerIP)
		if c.LMTP.MaxMessageSize == 0 {
			c.LMTP.MaxMessageSize = DefaultLMTPMaxMessageSize
		}
		c.ManageSieve.firstDefaults(DefaultManageSieveBackendPort, DefaultMaxSessionsPerIP)
	}
	dir := ""
	if c.Path != "" {
		dir = filepath.Dir(c.Path)
	}
	if c.Admin.Socket == "" {
		c.Admin.Socket = DefaultAdminSocket
	}
	c.Admin.Socket = resolve(dir, c.Admin.Socket)
	c.Admin.TokenFile = resolve(dir, c.Admin.TokenFile)
	if c.Admin.Listen != "" && len(c.Admin.Allow) == 0 {
		c.Admin.Allow = DefaultAdminAllow()
	}
	setString(&c.StateFile, DefaultStateFile)
	c.StateFile = resolve(dir, c.StateFile)
	if c.Health.Enabled == nil {
		v := true
		c.Health.Enabled = &v
	}
	c.IMAP.laterDefaults(dir)
	c.POP3.laterDefaults(dir)
	c.LMTP.laterDefaults(dir)
	if len(c.LMTP.Allow) == 0 {
		c.LMTP.Allow = DefaultLMTPAllow()
	}
	c.ManageSieve.laterDefaults(dir)
	for i := range c.Backends {
		if c.Backends[i].Weight == nil {
			w := DefaultBackendWeight
			c.Backends[i].Weight = &w
		}
	}
}

func (h *Health) firstDefaults() {
	setDuration(&h.Interval, DefaultHealthInterval)
	setDuration(&h.Timeout, DefaultHealthTimeout)
	if h.Fall == 0 {
		h.Fall = DefaultHealthFall
	}
	if h.Rise == 0 {
		h.Rise = DefaultHealthRise
	}
	setDuration(&h.FlapWindow, DefaultHealthFlapWindow)
	if h.FlapMax == 0 {
		h.FlapMax = DefaultHealthFlapMax
	}
	setDuration(&h.HoldDown, DefaultHealthHoldDown)
}

func (s *Service) firstDefaults(port, perIP int) {
	if s.MaxSessions == 0 {
		s.MaxSessions = DefaultMaxSessions
	}
	if s.MaxSessionsPerIP == 0 {
		s.MaxSessionsPerIP = perIP
	}
	if s.BackendPort == 0 {
		s.BackendPort = port
	}
	if s.BackendTLS == "" {
		s.BackendTLS = TLSNone
	}
}

func (s *Service) laterDefaults(dir string) {
	if s.BackendTLSVerify == nil {
		v := true // a fresh pointer per service: decoding writes through it
		s.BackendTLSVerify = &v
	}
	s.BackendCA = resolve(dir, s.BackendCA)
	for i := range s.Listeners {
		l := &s.Listeners[i]
		if l.TLS == "" {
			l.TLS = TLSNone
		}
		if l.IsUnix() && l.Mode == "" {
			l.Mode = DefaultUnixMode
		}
		l.Cert = resolve(dir, l.Cert)
		l.Key = resolve(dir, l.Key)
	}
}

func setDuration(d *Duration, v time.Duration) {
	if d.Duration == 0 {
		d.Duration = v
	}
}

func setString(s *string, v string) {
	if *s == "" {
		*s = v
	}
}

// resolve makes a relative path p relative to dir. Empty paths stay empty.
func resolve(dir, p string) string {
	if p == "" || dir == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}
