package config_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/usher-mail/usher/internal/config"
)

const examplePath = "../../examples/usher.toml"

// minimal is the smallest valid configuration.
const minimal = `
[[imap.listener]]
address = "127.0.0.1:1143"

[[pop3.listener]]
address = "127.0.0.1:1110"

[[backend]]
address = "10.0.0.1"
`

func mustParse(t *testing.T, doc string) *config.Config {
	t.Helper()
	c, err := config.Parse([]byte(doc), filepath.Join(t.TempDir(), "usher.toml"))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return c
}

func parseErr(t *testing.T, doc string) string {
	t.Helper()
	_, err := config.Parse([]byte(doc), "usher.toml")
	if err == nil {
		t.Fatalf("Parse succeeded, want an error for:\n%s", doc)
	}
	return err.Error()
}

// numErrs counts the errors joined in err.
func numErrs(err error) int {
	if err == nil {
		return 0
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return len(j.Unwrap())
	}
	return 1
}

func TestExampleLoadsAndValidates(t *testing.T) {
	c, err := config.Load(examplePath)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if err := c.ValidateNoFiles(); err != nil {
		t.Fatalf("ValidateNoFiles: %v", err)
	}
	if len(c.IMAP.Listeners) != 3 || len(c.POP3.Listeners) != 2 || len(c.LMTP.Listeners) != 2 || len(c.ManageSieve.Listeners) != 1 {
		t.Errorf("listeners: imap %d pop3 %d lmtp %d managesieve %d, want 3, 2, 2, 1",
			len(c.IMAP.Listeners), len(c.POP3.Listeners), len(c.LMTP.Listeners), len(c.ManageSieve.Listeners))
	}
	if l := c.LMTP.Listeners[0]; !l.IsUnix() || l.UnixPath() != "/run/usher/lmtp.sock" || l.UnixMode() != 0o660 {
		t.Errorf("lmtp listener 0 = %+v", l)
	}
	if c.LMTP.RecipientDelimiter != "+" || c.LMTP.MaxMessageSize != 64<<20 || c.LMTP.BackendPort != 24 ||
		c.ManageSieve.BackendPort != 4190 || !c.IMAP.Listeners[2].ProxyProtocol || len(c.IMAP.ProxyTrustedPrefixes()) != 1 {
		t.Errorf("lmtp %+v, managesieve %+v, imap %+v", c.LMTP, c.ManageSieve, c.IMAP)
	}
	if c.IMAP.Listeners[1].Address != "0.0.0.0:993" || c.IMAP.Listeners[1].TLS != config.TLSImplicit {
		t.Errorf("imap listener 1 = %+v", c.IMAP.Listeners[1])
	}
	if len(c.Backends) != 3 {
		t.Fatalf("backends: %d, want 3", len(c.Backends))
	}
	if b := c.Backends[2]; b.Address != "10.0.0.13" || *b.Weight != 50 || b.Tag != "archive" {
		t.Errorf("backend 2 = %+v (weight %d)", b, *b.Weight)
	}
	abs, _ := filepath.Abs(examplePath)
	if c.Path != abs {
		t.Errorf("Path = %q, want %q", c.Path, abs)
	}

	// With file checks, the only problems are the five TLS listeners'
	// missing certificate files and, on a host without /run/usher, the
	// directory of the LMTP socket.
	err = c.Validate()
	want := 5
	if fi, serr := os.Stat("/run/usher"); serr != nil || !fi.IsDir() {
		want++
	}
	if n := numErrs(err); n != want {
		t.Fatalf("Validate: %d errors, want %d: %v", n, want, err)
	}
	certErrs := 0
	for _, line := range strings.Split(err.Error(), "\n") {
		switch {
		case strings.Contains(line, ".cert: load certificate and key") && strings.Contains(line, "/etc/usher/tls/cert.pem"):
			certErrs++
		case strings.HasPrefix(line, "lmtp.listener[0].address: socket directory: stat /run/usher: "):
		default:
			t.Errorf("unexpected Validate error: %s", line)
		}
	}
	if certErrs != 5 {
		t.Errorf("Validate: %d certificate errors, want 5: %v", certErrs, err)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Validate error does not wrap fs.ErrNotExist: %v", err)
	}

	exampleDir := filepath.Dir(abs)
	if want := filepath.Join(exampleDir, "usher-state.json"); c.StateFile != want {
		t.Errorf("state_file = %q, want %q", c.StateFile, want)
	}
	if len(c.Tags) != 1 || c.Tags["archive.example.com"] != "archive" {
		t.Errorf("tags = %v, want archive.example.com = archive", c.Tags)
	}
	if got := c.TagFor("bob@Archive.Example.COM"); got != "archive" {
		t.Errorf("TagFor = %q, want archive", got)
	}
	if !c.Health.IsEnabled() || c.Health.Fall != 3 || c.Timeouts.MoveWait.Duration != 30*time.Second {
		t.Errorf("health %+v, move_wait %s", c.Health, c.Timeouts.MoveWait)
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("example Warnings = %q, want none", w)
	}
}

// TestExampleHasEveryKey keeps the documented example complete.
func TestExampleHasEveryKey(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := toml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	present := map[string]bool{}
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		switch v := v.(type) {
		case map[string]any:
			// A table is itself a key: SchemaKeys lists the map-typed [tags]
			// as a leaf, while struct tables are never listed.
			present[prefix] = true
			for k, e := range v {
				walk(strings.TrimPrefix(prefix+"."+k, "."), e)
			}
		case []any:
			isTables := len(v) > 0
			for _, e := range v {
				if _, ok := e.(map[string]any); !ok {
					isTables = false
				}
			}
			if !isTables {
				present[prefix] = true
				return
			}
			for _, e := range v {
				walk(prefix, e)
			}
		default:
			present[prefix] = true
		}
	}
	walk("", doc)
	keys := config.SchemaKeys()
	if len(keys) < 20 {
		t.Fatalf("SchemaKeys returned only %d keys: %v", len(keys), keys)
	}
	// The four services share their keys. Each service has its table with
	// a listener; each service key is shown in at least one of them (mode,
	// owner and group only fit a unix: listener, recipient_delimiter and
	// max_message_size only [lmtp]).
	services := []string{"imap", "pop3", "lmtp", "managesieve"}
	anyService := map[string]bool{}
	for k := range present {
		if svc, rest, ok := strings.Cut(k, "."); ok && slices.Contains(services, svc) {
			anyService[rest] = true
		}
	}
	for _, svc := range services {
		if !present[svc+".listener.address"] {
			t.Errorf("example has no [[%s.listener]]", svc)
		}
	}
	for _, k := range []string{"lmtp.recipient_delimiter", "lmtp.max_message_size", "lmtp.listener.mode", "lmtp.listener.owner", "lmtp.listener.group"} {
		if !present[k] {
			t.Errorf("example lacks key %q", k)
		}
	}
	for _, k := range keys {
		svc, rest, _ := strings.Cut(k, ".")
		if slices.Contains(services, svc) {
			if !anyService[rest] {
				t.Errorf("example lacks key %q in every service", k)
			}
		} else if !present[k] {
			t.Errorf("example lacks key %q", k)
		}
	}
}

func TestDefaults(t *testing.T) {
	dir := t.TempDir()
	c, err := config.Parse([]byte(minimal), filepath.Join(dir, "usher.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"path", c.Path, filepath.Join(dir, "usher.toml")},
		{"user_expire", c.UserExpire.Duration, 15 * time.Minute},
		{"routing", c.Routing, "rendezvous"},
		{"hash_template", c.HashTemplate, "%Lu"},
		{"max_literal", c.MaxLiteral, 8192},
		{"trusted_networks", len(c.TrustedNetworks), 0},
		{"admin.socket", c.Admin.Socket, filepath.Join(dir, "usher-admin.sock")},
		{"timeouts.pre_login_idle", c.Timeouts.PreLoginIdle.Duration, 60 * time.Second},
		{"timeouts.login", c.Timeouts.Login.Duration, 3 * time.Minute},
		{"timeouts.backend_connect", c.Timeouts.BackendConnect.Duration, 5 * time.Second},
		{"timeouts.backend_login", c.Timeouts.BackendLogin.Duration, 30 * time.Second},
		{"imap.max_sessions", c.IMAP.MaxSessions, 10000},
		{"imap.max_sessions_per_ip", c.IMAP.MaxSessionsPerIP, 50},
		{"imap.backend_port", c.IMAP.BackendPort, 143},
		{"imap.backend_tls", c.IMAP.BackendTLS, config.TLSNone},
		{"imap.backend_tls_verify", *c.IMAP.BackendTLSVerify, true},
		{"imap.backend_ca", c.IMAP.BackendCA, ""},
		{"imap.listener[0].tls", c.IMAP.Listeners[0].TLS, config.TLSNone},
		{"pop3.max_sessions", c.POP3.MaxSessions, 10000},
		{"pop3.max_sessions_per_ip", c.POP3.MaxSessionsPerIP, 50},
		{"pop3.backend_port", c.POP3.BackendPort, 110},
		{"pop3.backend_tls", c.POP3.BackendTLS, config.TLSNone},
		{"pop3.backend_tls_verify", *c.POP3.BackendTLSVerify, true},
		{"pop3.listener[0].tls", c.POP3.Listeners[0].TLS, config.TLSNone},
		{"backend[0].weight", *c.Backends[0].Weight, 100},
		{"backend[0].tag", c.Backends[0].Tag, ""},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	if c.IMAP.BackendTLSVerify == c.POP3.BackendTLSVerify {
		t.Error("imap and pop3 share one backend_tls_verify pointer")
	}
	newChecks := []struct {
		name      string
		got, want any
	}{
		{"state_file", c.StateFile, filepath.Join(dir, "usher-state.json")},
		{"timeouts.move_wait", c.Timeouts.MoveWait.Duration, 30 * time.Second},
		{"timeouts.shutdown_grace", c.Timeouts.ShutdownGrace.Duration, 30 * time.Second},
		{"health.enabled", *c.Health.Enabled, true},
		{"health.IsEnabled", c.Health.IsEnabled(), true},
		{"health.interval", c.Health.Interval.Duration, 5 * time.Second},
		{"health.timeout", c.Health.Timeout.Duration, 3 * time.Second},
		{"health.fall", c.Health.Fall, 3},
		{"health.rise", c.Health.Rise, 2},
		{"health.flap_window", c.Health.FlapWindow.Duration, 5 * time.Minute},
		{"health.flap_max", c.Health.FlapMax, 4},
		{"health.hold_down", c.Health.HoldDown.Duration, 2 * time.Minute},
		{"health.login_user", c.Health.LoginUser, ""},
		{"health.login_password", c.Health.LoginPassword, ""},
		{"admin.listen", c.Admin.Listen, ""},
		{"admin.token", c.Admin.Token, ""},
		{"admin.token_file", c.Admin.TokenFile, ""},
		{"admin.allow (no listen)", len(c.Admin.Allow), 0},
		{"tags", len(c.Tags), 0},
	}
	for _, ch := range newChecks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("Warnings = %q, want none", w)
	}
}

func TestApplyDefaultsOnZeroConfig(t *testing.T) {
	c := &config.Config{Backends: []config.Backend{{Address: "10.0.0.1"}}}
	c.ApplyDefaults()
	if c.IMAP.MaxSessions != 10000 || c.POP3.BackendPort != 110 || c.UserExpire.Duration != 15*time.Minute ||
		*c.Backends[0].Weight != 100 || c.Admin.Socket != "usher-admin.sock" {
		t.Errorf("defaults not applied: %+v", c)
	}
	// Later calls keep values set after the first one, including a 0 that
	// means unlimited.
	c.IMAP.MaxSessions = 0
	c.ApplyDefaults()
	if c.IMAP.MaxSessions != 0 {
		t.Errorf("second ApplyDefaults changed max_sessions 0 to %d", c.IMAP.MaxSessions)
	}
}

func TestExplicitZeroKept(t *testing.T) {
	c := mustParse(t, minimal+`
[imap]
max_sessions = 0
max_sessions_per_ip = 0

[[backend]]
address = "10.0.0.2"
weight = 0
`)
	if c.IMAP.MaxSessions != 0 || c.IMAP.MaxSessionsPerIP != 0 {
		t.Errorf("imap limits = %d/%d, want 0/0 (unlimited)", c.IMAP.MaxSessions, c.IMAP.MaxSessionsPerIP)
	}
	if c.POP3.MaxSessions != 10000 || c.POP3.MaxSessionsPerIP != 50 {
		t.Errorf("pop3 limits = %d/%d, want defaults 10000/50", c.POP3.MaxSessions, c.POP3.MaxSessionsPerIP)
	}
	if *c.Backends[0].Weight != 100 {
		t.Errorf("backend without weight: %d, want 100", *c.Backends[0].Weight)
	}
	if *c.Backends[1].Weight != 0 {
		t.Errorf("backend with weight = 0: %d, want 0", *c.Backends[1].Weight)
	}
	c.ApplyDefaults() // must not undo explicit values
	if c.IMAP.MaxSessions != 0 || *c.Backends[1].Weight != 0 {
		t.Errorf("ApplyDefaults after Parse overwrote explicit zeros")
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestExplicitInvalidNotMaskedByDefaults(t *testing.T) {
	c := mustParse(t, "user_expire = \"0s\"\n"+minimal)
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "user_expire: must be greater than 0") {
		t.Errorf("Validate = %v, want user_expire error", err)
	}
}

func TestOtherTOMLForms(t *testing.T) {
	c := mustParse(t, `
imap = { max_sessions = 5, listener = [ { address = "127.0.0.1:1143", tls = "none" } ] }
pop3.backend_port = 1110
timeouts.backend_login = "3s"
backend = [ { address = "10.0.0.1", weight = 7 }, { address = "fd00::1" } ]
`)
	if c.IMAP.MaxSessions != 5 || len(c.IMAP.Listeners) != 1 || c.IMAP.Listeners[0].Address != "127.0.0.1:1143" {
		t.Errorf("imap = %+v", c.IMAP)
	}
	if c.POP3.BackendPort != 1110 || c.Timeouts.BackendLogin.Duration != 3*time.Second {
		t.Errorf("dotted keys: pop3.backend_port %d, timeouts.backend_login %s", c.POP3.BackendPort, c.Timeouts.BackendLogin)
	}
	if len(c.Backends) != 2 || *c.Backends[0].Weight != 7 || *c.Backends[1].Weight != 100 {
		t.Errorf("backends = %+v", c.Backends)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestUnknownKeys(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"in table", "# comment\n\n[imap]\nmax_sessions = 1\nlistner = 2\n", `usher.toml:5: unknown key "imap.listner"`},
		{"top level", "\n\n\nuser_expiry = \"1m\"\n", `usher.toml:4: unknown key "user_expiry"`},
		{"table", "\n[imapp]\nmax_sessions = 1\n", `usher.toml:2: unknown key "imapp"`},
		{"array table", "[[imap.listener]]\naddress = \"127.0.0.1:1\"\ncertificate = \"x\"\n", `usher.toml:3: unknown key "imap.listener.certificate"`},
		{"dotted", "\nimap.foo.bar = 1\n", `usher.toml:2: unknown key "imap.foo"`},
		{"inline", "\n\nimap = { listener = [ { address = \"a:1\", tsl = \"none\" } ] }\n", `usher.toml:3: unknown key "imap.listener.tsl"`},
		{"case", "\nUser_Expire = \"1m\"\n", `usher.toml:2: unknown key "User_Expire" (keys are case-sensitive: did you mean "user_expire"?)`},
		{"path is not a key", "Path = \"/x\"\n", `usher.toml:1: unknown key "Path"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := parseErr(t, tt.doc); got != tt.want {
				t.Errorf("error = %q\nwant    %q", got, tt.want)
			}
		})
	}
}

func TestUnknownKeysAllReported(t *testing.T) {
	got := parseErr(t, "a = 1\n[imap]\nb = 2\n[[backend]]\nc = 3\n")
	for _, want := range []string{
		`usher.toml:1: unknown key "a"`,
		`usher.toml:3: unknown key "imap.b"`,
		`usher.toml:5: unknown key "backend.c"`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("error %q lacks %q", got, want)
		}
	}
}

func TestTypeErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"string for int", "\n\nmax_literal = \"big\"\n", `usher.toml:3: max_literal: want an integer, got a string`},
		{"float for int", "max_literal = 1.5\n", `usher.toml:1: max_literal: want an integer, got a float`},
		{"int for duration", "\nuser_expire = 15\n", `usher.toml:2: user_expire: want a duration string like "15m", got an integer`},
		{"string for bool", "[pop3]\n\nbackend_tls_verify = \"yes\"\n", `usher.toml:3: pop3.backend_tls_verify: want a boolean, got a string`},
		{"nested", "[[backend]]\naddress = \"10.0.0.1\"\nweight = \"heavy\"\n", `usher.toml:3: backend.weight: want an integer, got a string`},
		{"array element", "trusted_networks = [\"10.0.0.0/8\", 7]\n", `usher.toml:1: trusted_networks: want an array of strings, got an array holding an integer`},
		{"scalar for table", "\nimap = 5\n", `usher.toml:2: imap: want a table, got an integer`},
		{"date for string", "routing = 1979-05-27\n", `usher.toml:1: routing: want a string, got a date/time`},
		{"table for scalar", "[user_expire]\n", `usher.toml:1: user_expire: want a duration string like "15m", got a table`},
		{"table header on array", "[imap.listener]\naddress = \"x:1\"\n", `usher.toml:1: imap.listener: is an array of tables: write [[imap.listener]]`},
		{"array header on table", "[[imap]]\n", `usher.toml:1: imap: is a single table: write [imap]`},
		{"dotted through scalar", "routing.x = 1\n", `usher.toml:1: routing: want a string, got a table`},
		{"backends not inline tables", "backend = [\"10.0.0.1\"]\n", `usher.toml:1: backend: want an array of tables, got an array holding a string`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := parseErr(t, tt.doc); got != tt.want {
				t.Errorf("error = %q\nwant    %q", got, tt.want)
			}
		})
	}
}

func TestBadDuration(t *testing.T) {
	doc := "# usher\n\nrouting = \"rendezvous\"\n\n\n\nuser_expire = \"fifteen\"\n"
	want := `usher.toml:7: user_expire: time: invalid duration "fifteen"`
	if got := parseErr(t, doc); got != want {
		t.Errorf("error = %q\nwant    %q", got, want)
	}
	got := parseErr(t, "[timeouts]\nbackend_login = \"5\"\n")
	if !strings.HasPrefix(got, "usher.toml:2: timeouts.backend_login: time: missing unit") {
		t.Errorf("error = %q", got)
	}
}

func TestSyntaxAndDuplicateErrors(t *testing.T) {
	if got := parseErr(t, "\nx = [\n"); !strings.HasPrefix(got, "usher.toml:2: ") {
		t.Errorf("syntax error = %q, want it at line 2", got)
	}
	got := parseErr(t, "max_literal = 1\n\nmax_literal = 2\n")
	if !strings.HasPrefix(got, "usher.toml:3: max_literal: ") || !strings.Contains(got, "already defined") {
		t.Errorf("duplicate key error = %q", got)
	}
	if got := parseErr(t, "max_literal = 99999999999999999999\n"); !strings.HasPrefix(got, "usher.toml:1: max_literal: ") {
		t.Errorf("overflow error = %q", got)
	}
}

func TestDecodeErrorBackstop(t *testing.T) {
	var target struct {
		IMAP struct {
			MaxSessions int `toml:"max_sessions"`
		} `toml:"imap"`
	}
	dec := toml.NewDecoder(strings.NewReader("\n[imap]\nmax_sessions = 1\nlistner = 2\n"))
	dec.DisallowUnknownFields()
	err := config.DecodeError("usher.toml", dec.Decode(&target))
	if got, want := err.Error(), `usher.toml:4: unknown key "imap.listner"`; got != want {
		t.Errorf("error = %q, want %q", got, want)
	}
	var de *toml.DecodeError
	if !errors.As(err, &de) {
		t.Errorf("error does not wrap *toml.DecodeError")
	}
}

func TestLoad(t *testing.T) {
	_, err := config.Load(filepath.Join(t.TempDir(), "missing.toml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of a missing file = %v, want fs.ErrNotExist", err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "u.toml")
	if err := os.WriteFile(path, []byte(minimal+"\n[admin]\nsocket = \"run/a.sock\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "run", "a.sock"); c.Admin.Socket != want {
		t.Errorf("admin.socket = %q, want %q (relative to the config dir)", c.Admin.Socket, want)
	}
	if err := os.WriteFile(path, []byte("\n\nbogus = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(path); err == nil || err.Error() != path+`:3: unknown key "bogus"` {
		t.Errorf("Load error = %v", err)
	}
}

func TestDurationText(t *testing.T) {
	var d config.Duration
	if err := d.UnmarshalText([]byte("1h30m")); err != nil || d.Duration != 90*time.Minute {
		t.Fatalf("UnmarshalText = %v, %v", d, err)
	}
	b, err := d.MarshalText()
	if err != nil || string(b) != "1h30m0s" {
		t.Errorf("MarshalText = %q, %v", b, err)
	}
	if err := d.UnmarshalText([]byte("soon")); err == nil {
		t.Error("UnmarshalText(soon) succeeded")
	}
}

// TestValidateRules has one failing case per rule; each must name its key.
func TestValidateRules(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	emptyToken := filepath.Join(dir, "empty.token")
	shortToken := filepath.Join(dir, "short.token")
	bigToken := filepath.Join(dir, "big.token")
	for name, content := range map[string]string{
		emptyToken: " \n",
		shortToken: "tooshort\n",
		bigToken:   strings.Repeat("a", config.MaxTokenFileSize+1),
	} {
		if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	const goodToken = "0123456789abcdef"
	listen := func(c *config.Config) { c.Admin.Listen = "127.0.0.1:8080" }
	tests := []struct {
		name string
		edit func(c *config.Config)
		want string // substring of the error, starting with the key
	}{
		{"routing", func(c *config.Config) { c.Routing = "maglev" }, `routing: "maglev" is not a routing algorithm`},
		{"template unknown var", func(c *config.Config) { c.HashTemplate = "%Lu-%x" }, `hash_template: unknown variable "%x" at offset 4`},
		{"template unknown L var", func(c *config.Config) { c.HashTemplate = "%Lx" }, `hash_template: unknown variable "%Lx"`},
		{"template lone percent", func(c *config.Config) { c.HashTemplate = "%u%" }, `hash_template: "%u%" ends with a lone %`},
		{"template no variable", func(c *config.Config) { c.HashTemplate = "all%%" }, `hash_template: "all%%" uses no variable`},
		{"template empty", func(c *config.Config) { c.HashTemplate = "" }, `hash_template: must not be empty`},
		{"user_expire", func(c *config.Config) { c.UserExpire.Duration = -time.Second }, `user_expire: must be greater than 0`},
		{"pre_login_idle", func(c *config.Config) { c.Timeouts.PreLoginIdle.Duration = 0 }, `timeouts.pre_login_idle: must be greater than 0`},
		{"login", func(c *config.Config) { c.Timeouts.Login.Duration = -time.Second }, `timeouts.login: must be greater than 0`},
		{"backend_connect", func(c *config.Config) { c.Timeouts.BackendConnect.Duration = 0 }, `timeouts.backend_connect: must be greater than 0`},
		{"backend_login", func(c *config.Config) { c.Timeouts.BackendLogin.Duration = 0 }, `timeouts.backend_login: must be greater than 0`},
		{"max_literal 0", func(c *config.Config) { c.MaxLiteral = 0 }, `max_literal: must be between 1 and 16777216`},
		{"max_literal big", func(c *config.Config) { c.MaxLiteral = 16<<20 + 1 }, `max_literal: must be between 1 and 16777216`},
		{"trusted prefix", func(c *config.Config) { c.TrustedNetworks = []string{"10.0.0.0/8", "10.0.0.0/33"} }, `trusted_networks[1]: "10.0.0.0/33" is not a CIDR prefix`},
		{"trusted junk", func(c *config.Config) { c.TrustedNetworks = []string{"office"} }, `trusted_networks[0]: "office" is neither an IP address nor a CIDR prefix`},
		{"admin socket empty", func(c *config.Config) { c.Admin.Socket = "" }, `admin.socket: must not be empty`},
		{"admin socket long", func(c *config.Config) { c.Admin.Socket = "/" + strings.Repeat("a", 107) }, `admin.socket: path`},
		{"no listeners", func(c *config.Config) { c.IMAP.Listeners, c.POP3.Listeners = nil, nil }, `imap.listener: no listeners`},
		{"listener no port", func(c *config.Config) { c.IMAP.Listeners[0].Address = "127.0.0.1" }, `imap.listener[0].address: missing port in address "127.0.0.1"`},
		{"listener port 0", func(c *config.Config) { c.POP3.Listeners[0].Address = "127.0.0.1:0" }, `pop3.listener[0].address: port "0" in address "127.0.0.1:0" must be a number between 1 and 65535`},
		{"listener port big", func(c *config.Config) { c.IMAP.Listeners[0].Address = ":65536" }, `imap.listener[0].address: port "65536"`},
		{"listener port name", func(c *config.Config) { c.IMAP.Listeners[0].Address = "127.0.0.1:imap" }, `imap.listener[0].address: port "imap"`},
		{"listener duplicate", func(c *config.Config) { c.POP3.Listeners[0].Address = "127.0.0.1:1143" }, `pop3.listener[0].address: "127.0.0.1:1143" is already used by imap.listener[0]`},
		{"listener duplicate mapped", func(c *config.Config) { c.POP3.Listeners[0].Address = "[::ffff:127.0.0.1]:1143" }, `pop3.listener[0].address: "[::ffff:127.0.0.1]:1143" is already used by imap.listener[0]`},
		{"listener tls mode", func(c *config.Config) { c.IMAP.Listeners[0].TLS = "ssl" }, `imap.listener[0].tls: "ssl" is not a TLS mode`},
		{"listener cert missing", func(c *config.Config) {
			c.IMAP.Listeners[0].TLS, c.IMAP.Listeners[0].Key = config.TLSStartTLS, "k.pem"
		}, `imap.listener[0].cert: required with tls = "starttls"`},
		{"listener key missing", func(c *config.Config) {
			c.IMAP.Listeners[0].TLS, c.IMAP.Listeners[0].Cert = config.TLSImplicit, "c.pem"
		}, `imap.listener[0].key: required with tls = "implicit"`},
		{"listener cert unreadable", func(c *config.Config) {
			c.POP3.Listeners[0].TLS, c.POP3.Listeners[0].Cert, c.POP3.Listeners[0].Key = config.TLSImplicit, missing, missing
		}, `pop3.listener[0].cert: load certificate and key: open ` + missing},
		{"listener cert on plaintext", func(c *config.Config) { c.IMAP.Listeners[0].Cert = "c.pem" }, `imap.listener[0].tls: cert and key are set but tls is "none"`},
		{"max_sessions", func(c *config.Config) { c.IMAP.MaxSessions = -1 }, `imap.max_sessions: must be 0 (unlimited) or more`},
		{"max_sessions_per_ip", func(c *config.Config) { c.POP3.MaxSessionsPerIP = -1 }, `pop3.max_sessions_per_ip: must be 0 (unlimited) or more`},
		{"backend_port 0", func(c *config.Config) { c.IMAP.BackendPort = 0 }, `imap.backend_port: must be between 1 and 65535, got 0`},
		{"backend_port big", func(c *config.Config) { c.POP3.BackendPort = 65536 }, `pop3.backend_port: must be between 1 and 65535, got 65536`},
		{"backend_tls", func(c *config.Config) { c.IMAP.BackendTLS = "tls" }, `imap.backend_tls: "tls" is not a TLS mode`},
		{"backend_ca missing", func(c *config.Config) { c.IMAP.BackendTLS, c.IMAP.BackendCA = config.TLSStartTLS, missing }, `imap.backend_ca: load: open ` + missing},
		{"backend_ca garbage", func(c *config.Config) { c.POP3.BackendTLS, c.POP3.BackendCA = config.TLSImplicit, garbage }, `pop3.backend_ca: load: ` + garbage + `: no PEM certificates found`},
		{"backend_ca without tls", func(c *config.Config) { c.IMAP.BackendCA = garbage }, `imap.backend_ca: is set but backend_tls is "none"`},
		{"no backends", func(c *config.Config) { c.Backends = nil }, `backend: no backends`},
		{"backend host name", func(c *config.Config) { c.Backends[0].Address = "mail1.example.com" }, `backend[0].address: "mail1.example.com" is not an IP address (host names are not allowed`},
		{"backend port", func(c *config.Config) { c.Backends[0].Address = "10.0.0.1:143" }, `backend[0].address: "10.0.0.1:143" has a port`},
		{"backend v6 port", func(c *config.Config) { c.Backends[0].Address = "[fd00::1]:143" }, `backend[0].address: "[fd00::1]:143" has a port`},
		{"backend empty", func(c *config.Config) { c.Backends[0].Address = "" }, `backend[0].address: must not be empty`},
		{"backend unspecified", func(c *config.Config) { c.Backends[0].Address = "0.0.0.0" }, `backend[0].address: "0.0.0.0" is not a unicast address`},
		{"backend duplicate", func(c *config.Config) {
			c.Backends = append(c.Backends, config.Backend{Address: "::ffff:10.0.0.1", Weight: c.Backends[0].Weight})
		}, `backend[1].address: "::ffff:10.0.0.1" is the same backend as backend[0]`},
		{"weight negative", func(c *config.Config) { w := -1; c.Backends[0].Weight = &w }, `backend[0].weight: must be between 0 and 1000, got -1`},
		{"weight big", func(c *config.Config) { w := 1001; c.Backends[0].Weight = &w }, `backend[0].weight: must be between 0 and 1000, got 1001`},
		{"tag chars", func(c *config.Config) { c.Backends[0].Tag = "hot pool" }, `backend[0].tag: "hot pool" has ' '`},
		{"tag long", func(c *config.Config) { c.Backends[0].Tag = strings.Repeat("t", 65) }, `backend[0].tag: "` + strings.Repeat("t", 65) + `" is longer than 64`},

		{"move_wait", func(c *config.Config) { c.Timeouts.MoveWait.Duration = 0 }, `timeouts.move_wait: must be greater than 0, got 0s`},
		{"shutdown_grace", func(c *config.Config) { c.Timeouts.ShutdownGrace.Duration = -time.Second }, `timeouts.shutdown_grace: must be 0 (close at once) or more, got -1s`},
		{"state_file empty", func(c *config.Config) { c.StateFile = "" }, `state_file: must not be empty`},
		{"state_file dir missing", func(c *config.Config) { c.StateFile = filepath.Join(dir, "nodir", "s.json") }, `state_file: directory: stat ` + filepath.Join(dir, "nodir")},
		{"state_file dir is a file", func(c *config.Config) { c.StateFile = filepath.Join(garbage, "s.json") }, `state_file: ` + garbage + ` is not a directory`},

		{"health interval", func(c *config.Config) { c.Health.Interval.Duration = 0 }, `health.interval: must be greater than 0`},
		{"health timeout", func(c *config.Config) { c.Health.Timeout.Duration = -1 }, `health.timeout: must be greater than 0`},
		{"health timeout over interval", func(c *config.Config) { c.Health.Timeout.Duration = 6 * time.Second }, `health.timeout: must not exceed health.interval (5s), got 6s`},
		{"health fall 0", func(c *config.Config) { c.Health.Fall = 0 }, `health.fall: must be between 1 and 100, got 0`},
		{"health fall big", func(c *config.Config) { c.Health.Fall = 101 }, `health.fall: must be between 1 and 100, got 101`},
		{"health rise 0", func(c *config.Config) { c.Health.Rise = 0 }, `health.rise: must be between 1 and 100, got 0`},
		{"health rise big", func(c *config.Config) { c.Health.Rise = 101 }, `health.rise: must be between 1 and 100, got 101`},
		{"health flap_max", func(c *config.Config) { c.Health.FlapMax = 0 }, `health.flap_max: must be 1 or more, got 0`},
		{"health flap_window", func(c *config.Config) { c.Health.FlapWindow.Duration = 0 }, `health.flap_window: must be greater than 0`},
		{"health hold_down", func(c *config.Config) { c.Health.HoldDown.Duration = 0 }, `health.hold_down: must be greater than 0`},
		{"health user without password", func(c *config.Config) { c.Health.LoginUser = "probe" }, `health.login_password: required when health.login_user is set`},
		{"health password without user", func(c *config.Config) { c.Health.LoginPassword = "s3cret" }, `health.login_user: required when health.login_password is set`},

		{"admin listen no port", func(c *config.Config) { c.Admin.Listen, c.Admin.Token = "127.0.0.1", goodToken }, `admin.listen: missing port in address "127.0.0.1"`},
		{"admin listen port 0", func(c *config.Config) { c.Admin.Listen, c.Admin.Token = "127.0.0.1:0", goodToken }, `admin.listen: port "0" in address "127.0.0.1:0" must be a number between 1 and 65535`},
		{"admin listen port big", func(c *config.Config) { c.Admin.Listen, c.Admin.Token = "[::1]:65536", goodToken }, `admin.listen: port "65536"`},
		{"admin listen taken", func(c *config.Config) { c.Admin.Listen, c.Admin.Token = "127.0.0.1:1110", goodToken }, `admin.listen: "127.0.0.1:1110" is already used by pop3.listener[0]`},
		{"admin no token", listen, `admin.token: admin.listen is set, so admin.token or admin.token_file is required`},
		{"admin token and file", func(c *config.Config) {
			listen(c)
			c.Admin.Token, c.Admin.TokenFile = goodToken, shortToken
		}, `admin.token: set only one of admin.token and admin.token_file`},
		{"admin token short", func(c *config.Config) { listen(c); c.Admin.Token = "  0123456789abcde  " }, `admin.token: token is 15 characters, want at least 16`},
		{"admin token char", func(c *config.Config) { listen(c); c.Admin.Token = goodToken + "\"x" }, `admin.token: token has a character not allowed in a bearer token at offset 16`},
		{"admin token_file missing", func(c *config.Config) { listen(c); c.Admin.TokenFile = missing }, `admin.token_file: open ` + missing},
		{"admin token_file empty", func(c *config.Config) { listen(c); c.Admin.TokenFile = emptyToken }, `admin.token_file: ` + emptyToken + `: token is empty`},
		{"admin token_file short", func(c *config.Config) { listen(c); c.Admin.TokenFile = shortToken }, `admin.token_file: ` + shortToken + `: token is 8 characters`},
		{"admin token_file big", func(c *config.Config) { listen(c); c.Admin.TokenFile = bigToken }, `admin.token_file: ` + bigToken + ` is larger than 4096 bytes`},
		{"admin allow", func(c *config.Config) {
			c.Admin.Listen, c.Admin.Token = "127.0.0.1:8080", goodToken
			c.Admin.Allow = []string{"::1", "10.0.0.0/40"}
		}, `admin.allow[1]: "10.0.0.0/40" is not a CIDR prefix`},

		{"tags domain upper", func(c *config.Config) { c.Tags = map[string]string{"Example.org": "a"} }, `tags."Example.org": "Example.org" has upper-case letters; domains are matched lower-cased: write "example.org"`},
		{"tags domain at", func(c *config.Config) { c.Tags = map[string]string{"bob@example.org": "a"} }, `tags."bob@example.org": "bob@example.org" has '@'`},
		{"tags domain empty", func(c *config.Config) { c.Tags = map[string]string{"": "a"} }, `tags."": the domain must not be empty`},
		{"tags domain space", func(c *config.Config) { c.Tags = map[string]string{"a b": "a"} }, `tags."a b": "a b" has ' '`},
		{"tags tag empty", func(c *config.Config) { c.Tags = map[string]string{"example.org": ""} }, `tags."example.org": the tag must not be empty`},
		{"tags tag bad", func(c *config.Config) { c.Tags = map[string]string{"example.org": "pool/1"} }, `tags."example.org": "pool/1" has '/'`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, minimal)
			tt.edit(c)
			err := c.Validate()
			if err == nil {
				t.Fatalf("Validate succeeded, want %q", tt.want)
			}
			if n := numErrs(err); n != 1 {
				t.Errorf("%d errors, want 1: %v", n, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q\nwant it to contain %q", err, tt.want)
			}
		})
	}
}

func TestValidateReportsAllProblems(t *testing.T) {
	c := mustParse(t, minimal)
	c.Routing = "x"
	c.MaxLiteral = -1
	c.IMAP.Listeners[0].Address = "nope"
	c.Backends[0].Address = "mail"
	c.Backends[0].Tag = "a b"
	err := c.Validate()
	if n := numErrs(err); n != 5 {
		t.Fatalf("%d errors, want 5: %v", n, err)
	}
	for _, key := range []string{"routing:", "max_literal:", "imap.listener[0].address:", "backend[0].address:", "backend[0].tag:"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error lacks %q: %v", key, err)
		}
	}
}

func TestTrustedPrefixes(t *testing.T) {
	c := mustParse(t, `trusted_networks = ["10.0.0.1", "192.168.1.7/24", "::1", "::ffff:10.1.2.3", "fd00::/8", "::ffff:172.16.0.0/108"]`+"\n"+minimal)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range c.TrustedPrefixes() {
		got = append(got, p.String())
	}
	want := []string{"10.0.0.1/32", "192.168.1.0/24", "::1/128", "10.1.2.3/32", "fd00::/8", "172.16.0.0/12"}
	if !slices.Equal(got, want) {
		t.Errorf("TrustedPrefixes = %v, want %v", got, want)
	}
	if !c.TrustedPrefixes()[1].Contains(netip.MustParseAddr("192.168.1.200")) {
		t.Error("192.168.1.0/24 does not contain 192.168.1.200")
	}
}

func TestEnabled(t *testing.T) {
	c := mustParse(t, "[[imap.listener]]\naddress = \"127.0.0.1:1143\"\n[[backend]]\naddress = \"10.0.0.1\"\n")
	if !c.IMAP.Enabled() || c.POP3.Enabled() {
		t.Errorf("Enabled: imap %v pop3 %v, want true false", c.IMAP.Enabled(), c.POP3.Enabled())
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate with IMAP only: %v", err)
	}
}

// writeCert writes a self-signed certificate for 127.0.0.1 (usable as its own
// CA) and its key to dir/cert.pem and dir/key.pem.
func writeCert(t *testing.T, dir string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "usher test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) {
		var buf bytes.Buffer
		if err := pem.Encode(&buf, &pem.Block{Type: typ, Bytes: b}); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), buf.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("cert.pem", "CERTIFICATE", der)
	write("key.pem", "PRIVATE KEY", kder)
}

func TestTLS(t *testing.T) {
	dir := t.TempDir()
	writeCert(t, dir)
	path := filepath.Join(dir, "usher.toml")
	// Relative cert paths resolve against the config file's directory.
	doc := `
[imap]
backend_tls = "implicit"
backend_ca = "cert.pem"

[[imap.listener]]
address = "127.0.0.1:1993"
tls = "implicit"
cert = "cert.pem"
key = "key.pem"

[pop3]
backend_tls = "starttls"
backend_tls_verify = false

[[pop3.listener]]
address = "127.0.0.1:1110"

[[backend]]
address = "127.0.0.1"
`
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if want := filepath.Join(dir, "cert.pem"); c.IMAP.Listeners[0].Cert != want || c.IMAP.BackendCA != want {
		t.Errorf("cert %q, backend_ca %q, want %q", c.IMAP.Listeners[0].Cert, c.IMAP.BackendCA, want)
	}

	srv, err := c.IMAP.Listeners[0].ServerTLS()
	if err != nil || srv == nil {
		t.Fatalf("ServerTLS = %v, %v", srv, err)
	}
	if srv.MinVersion != tls.VersionTLS12 || len(srv.Certificates) != 1 {
		t.Errorf("ServerTLS: MinVersion %x, %d certificates", srv.MinVersion, len(srv.Certificates))
	}
	if cfg, err := c.POP3.Listeners[0].ServerTLS(); cfg != nil || err != nil {
		t.Errorf("ServerTLS of a plaintext listener = %v, %v; want nil, nil", cfg, err)
	}

	cli, err := c.IMAP.BackendTLSConfig()
	if err != nil || cli == nil {
		t.Fatalf("BackendTLSConfig = %v, %v", cli, err)
	}
	if cli.RootCAs == nil || cli.InsecureSkipVerify || cli.MinVersion != tls.VersionTLS12 {
		t.Errorf("imap BackendTLSConfig: RootCAs %v, InsecureSkipVerify %v, MinVersion %x", cli.RootCAs, cli.InsecureSkipVerify, cli.MinVersion)
	}
	// The two configurations complete a verified handshake.
	cli = cli.Clone()
	cli.ServerName = "127.0.0.1"
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	deadline := time.Now().Add(5 * time.Second)
	_ = a.SetDeadline(deadline)
	_ = b.SetDeadline(deadline)
	done := make(chan error, 1)
	go func() { done <- tls.Server(a, srv).Handshake() }()
	if err := tls.Client(b, cli).Handshake(); err != nil {
		t.Errorf("client handshake: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("server handshake: %v", err)
	}

	pop, err := c.POP3.BackendTLSConfig()
	if err != nil || pop == nil || !pop.InsecureSkipVerify || pop.RootCAs != nil {
		t.Errorf("pop3 BackendTLSConfig = %+v, %v; want InsecureSkipVerify and system roots", pop, err)
	}
	c.POP3.BackendTLS = config.TLSNone
	if cfg, err := c.POP3.BackendTLSConfig(); cfg != nil || err != nil {
		t.Errorf("BackendTLSConfig with backend_tls none = %v, %v; want nil, nil", cfg, err)
	}

	// A key that does not belong to the certificate is reported.
	other := t.TempDir()
	writeCert(t, other)
	c.IMAP.Listeners[0].Key = filepath.Join(other, "key.pem")
	if _, err := c.IMAP.Listeners[0].ServerTLS(); err == nil {
		t.Error("ServerTLS with a mismatched key succeeded")
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "imap.listener[0].cert: load certificate and key") {
		t.Errorf("Validate with a mismatched key = %v", err)
	}
}

func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile(examplePath); err == nil {
		f.Add(data)
	}
	for _, s := range []string{
		minimal,
		"imap = { listener = [ { address = \"a:1\" } ] }\nbackend = [{address=\"::1\"}]",
		"[imap.listener]\n[[imap]]\n[user_expire]\nrouting.x = 1",
		"user_expire = 15\nmax_literal = \"x\"\ntrusted_networks = [1, \"a\"]",
		"x = [\n",
		"a.b.c.d = { e = [ { f = 1 } ] }",
		"[[backend]]\nweight = 0\n[[backend]]\naddress = \"10.0.0.1\"",
		"[tags]\n\"a.example\" = \"pool\"\nb = \"x\"\n[[backend]]\naddress = \"10.0.0.1\"\ntag = \"pool\"",
		"tags = { \"A.example\" = 5, c.d = \"x\", e = { f = \"g\" } }\n[tags.x]\n[[tags]]",
		"tags.\"a@b\" = \"\"\n[health]\nenabled = false\nfall = 0\nlogin_user = \"u\"",
		"[admin]\nlisten = \"127.0.0.1:8080\"\ntoken = \"0123456789abcdef\"\nallow = [\"::1\", \"x\"]",
		"[lmtp]\nallow = []\nrecipient_delimiter = \"+-\"\nmax_message_size = 1024\n[[lmtp.listener]]\naddress = \"unix:/run/l.sock\"\nmode = \"0640\"\nowner = \"0\"\ngroup = \"mail\"",
		"managesieve = { proxy_trusted = [\"10.0.0.1\"], backend_proxy = \"v2\", listener = [ { address = \"127.0.0.1:4190\", proxy_protocol = true } ] }",
		"[lmtp]\nmax_message_size = 99999999999999999999\n[[lmtp.listener]]\nmode = 0660\n[[pop3.listener]]\naddress = \"UNIX:/x\"\nmode = \"9\"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := config.Parse(data, "fuzz.toml")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.toml") {
				t.Errorf("error does not name the file: %v", err)
			}
			return
		}
		// Parse checked [tags]; Validate's repeat of those checks agrees.
		verr := c.ValidateNoFiles()
		if verr != nil && strings.Contains(verr.Error(), "tags.") {
			t.Errorf("Parse accepted [tags] that Validate rejects: %v", verr)
		}
		_ = c.TrustedPrefixes()
		_ = c.AdminAllow()
		_ = c.Warnings()
		if len(c.LMTP.Allow) == 0 {
			t.Errorf("lmtp.allow is empty after Parse, want the loopback default")
		}
		for _, s := range []config.Service{c.IMAP, c.POP3, c.LMTP, c.ManageSieve} {
			_ = s.AllowPrefixes()
			_ = s.ProxyTrustedPrefixes()
			for _, l := range s.Listeners {
				if l.IsUnix() && l.Mode == "" {
					t.Errorf("unix listener %q without the default mode", l.Address)
				}
				if m := l.UnixMode(); m&^0o777 != 0 {
					t.Errorf("UnixMode(%q) = %o, more than permission bits", l.Mode, m)
				}
				// On a valid config, a unix: path is absolute and fits sun_path.
				if p := l.UnixPath(); verr == nil && l.IsUnix() && (!filepath.IsAbs(p) || len(p) > 107) {
					t.Errorf("ValidateNoFiles accepted socket path %q", p)
				}
			}
		}
		for domain, tag := range c.Tags {
			upper := strings.Map(func(r rune) rune {
				if r >= 'a' && r <= 'z' {
					return r - 'a' + 'A'
				}
				return r
			}, domain)
			if got := c.TagFor("a@b@" + upper); got != tag {
				t.Errorf("TagFor(a@b@%s) = %q, want %q", upper, got, tag)
			}
		}
	})
}

func TestLoadTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.toml")
	if err := os.WriteFile(path, bytes.Repeat([]byte("# padding\n"), config.MaxFileSize/10+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(path); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("Load of an oversized file = %v", err)
	}
}

func TestSchemaProblemsCapped(t *testing.T) {
	var doc strings.Builder
	for i := range 30 {
		fmt.Fprintf(&doc, "unknown%d = 1\n", i)
	}
	_, err := config.Parse([]byte(doc.String()), "usher.toml")
	if n := numErrs(err); n != 21 {
		t.Fatalf("%d errors, want 20 and a final one: %v", n, err)
	}
	lines := strings.Split(err.Error(), "\n")
	if lines[19] != `usher.toml:20: unknown key "unknown19"` || lines[20] != "usher.toml: more than 20 problems, stopped checking" {
		t.Errorf("errors end with %q, %q", lines[19], lines[20])
	}
}
