package config_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/config"
)

func TestTagsSchemaGood(t *testing.T) {
	for name, doc := range map[string]string{
		"table": minimal + `
[tags]
"archive.example.com" = "archive"
'example-2.org.x' = "x"
localhost = "pool_1.b"
`,
		"inline":      "tags = { \"archive.example.com\" = \"archive\", 'example-2.org.x' = \"x\", localhost = \"pool_1.b\" }\n" + minimal,
		"dotted keys": "tags.\"archive.example.com\" = \"archive\"\ntags.'example-2.org.x' = \"x\"\ntags.localhost = \"pool_1.b\"\n" + minimal,
	} {
		t.Run(name, func(t *testing.T) {
			c := mustParse(t, doc)
			want := map[string]string{"archive.example.com": "archive", "example-2.org.x": "x", "localhost": "pool_1.b"}
			if len(c.Tags) != len(want) {
				t.Fatalf("tags = %v, want %v", c.Tags, want)
			}
			for k, v := range want {
				if c.Tags[k] != v {
					t.Errorf("tags[%q] = %q, want %q", k, c.Tags[k], v)
				}
			}
			if err := c.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestTagsSchemaErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"integer value", "[tags]\n\"a.example\" = \"a\"\n\"b.example\" = 5\n", `usher.toml:3: tags."b.example": want a string (a backend tag), got an integer`},
		{"array value", "\ntags = { \"a.example\" = [\"x\"] }\n", `usher.toml:2: tags."a.example": want a string (a backend tag), got an array`},
		{"inline table value", "[tags]\n\"a.example\" = { x = \"y\" }\n", `usher.toml:2: tags."a.example": want a string (a backend tag), got an inline table`},
		{"bad tag", "[tags]\n\n\"a.example\" = \"hot pool\"\n", `usher.toml:3: tags."a.example": "hot pool" has ' '; only letters, digits, '_', '.' and '-' are allowed`},
		{"long tag", "[tags]\nx = \"" + strings.Repeat("t", 65) + "\"\n", `usher.toml:2: tags.x: "` + strings.Repeat("t", 65) + `" is longer than 64 characters`},
		{"empty tag", "[tags]\n\"a.example\" = \"\"\n", `usher.toml:2: tags."a.example": the tag must not be empty`},
		{"upper-case domain", "[tags]\n\"Archive.Example.com\" = \"archive\"\n", `usher.toml:2: tags."Archive.Example.com": "Archive.Example.com" has upper-case letters; domains are matched lower-cased: write "archive.example.com"`},
		{"at in domain", "[tags]\n\"bob@a.example\" = \"x\"\n", `usher.toml:2: tags."bob@a.example": "bob@a.example" has '@': write the domain only`},
		{"empty domain", "[tags]\n\"\" = \"x\"\n", `usher.toml:2: tags."": the domain must not be empty`},
		{"unquoted dotted domain", "[tags]\n\narchive.example.com = \"archive\"\n", `usher.toml:3: tags.archive: want a string, got a table (a domain with dots must be quoted: "archive.example.com" = "tag")`},
		{"dotted at top level", "tags.a.example = \"x\"\n", `usher.toml:1: tags.a: want a string, got a table (a domain with dots must be quoted: "a.example" = "tag")`},
		{"sub-table header", "\n[tags.\"a.example\"]\nx = 1\n", `usher.toml:2: tags."a.example": want a string, got a table (write [tags] and then "a.example" = "tag")`},
		{"array header", "[[tags]]\n", `usher.toml:1: tags: is a single table: write [tags]`},
		{"scalar", "tags = \"archive\"\n", `usher.toml:1: tags: want a table of strings, got a string`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := parseErr(t, tt.doc); !strings.HasPrefix(got, tt.want) {
				t.Errorf("error = %q\nwant    %q", got, tt.want)
			}
		})
	}
	// A domain given twice is reported by the decoder.
	got := parseErr(t, "[tags]\n\"a.example\" = \"x\"\n\"a.example\" = \"y\"\n")
	if !strings.HasPrefix(got, "usher.toml:3: ") || !strings.Contains(got, "already defined") {
		t.Errorf("duplicate domain error = %q", got)
	}
	// Every problem of the table is reported, each on its own line.
	got = parseErr(t, "[tags]\n\"A.example\" = \"x\"\n\"b.example\" = 1\n\"c.example\" = \"x y\"\n")
	for _, want := range []string{`usher.toml:2: tags."A.example"`, `usher.toml:3: tags."b.example"`, `usher.toml:4: tags."c.example"`} {
		if !strings.Contains(got, want) {
			t.Errorf("error %q lacks %q", got, want)
		}
	}
}

func TestNewDefaultsKeepExplicitValues(t *testing.T) {
	dir := t.TempDir()
	c, err := config.Parse([]byte(`state_file = "state/s.json"
[timeouts]
shutdown_grace = "0s"

[health]
enabled = false
fall = 0
`+minimal), filepath.Join(dir, "usher.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "state", "s.json"); c.StateFile != want {
		t.Errorf("state_file = %q, want %q", c.StateFile, want)
	}
	if c.Timeouts.ShutdownGrace.Duration != 0 {
		t.Errorf("shutdown_grace = %s, want explicit 0s", c.Timeouts.ShutdownGrace)
	}
	if c.Health.Enabled == nil || *c.Health.Enabled || c.Health.IsEnabled() {
		t.Errorf("health.enabled = false not kept")
	}
	if c.Health.Fall != 0 || c.Health.Rise != 2 {
		t.Errorf("health fall/rise = %d/%d, want explicit 0 and default 2", c.Health.Fall, c.Health.Rise)
	}
	c.ApplyDefaults()
	if c.Timeouts.ShutdownGrace.Duration != 0 || c.Health.Fall != 0 || c.Health.IsEnabled() {
		t.Error("ApplyDefaults after Parse overwrote explicit values")
	}
	// state/ does not exist yet, and fall = 0 is invalid; shutdown_grace 0 is fine.
	err = c.Validate()
	if n := numErrs(err); n != 2 || !strings.Contains(err.Error(), "state_file: directory: ") || !strings.Contains(err.Error(), "health.fall: ") {
		t.Fatalf("Validate = %v, want state_file and health.fall errors", err)
	}
	if err := os.Mkdir(filepath.Join(dir, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	c.Health.Fall = 1
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}

	// An absolute state_file stays as it is.
	abs := filepath.Join(t.TempDir(), "x.json")
	c = mustParse(t, "state_file = "+quote(abs)+"\n"+minimal)
	if c.StateFile != abs {
		t.Errorf("state_file = %q, want %q", c.StateFile, abs)
	}
}

// quote writes s as a TOML literal string.
func quote(s string) string { return "'" + s + "'" }

func TestAdminDefaults(t *testing.T) {
	dir := t.TempDir()
	tokenPath := filepath.Join(dir, "secrets", "admin.token")
	if err := os.Mkdir(filepath.Dir(tokenPath), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenPath, []byte("  0123456789abcdefXYZ-._~+/==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "usher.toml")
	c, err := config.Parse([]byte("[admin]\nlisten = \"127.0.0.1:8080\"\ntoken_file = \"secrets/admin.token\"\n"+minimal), path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Admin.TokenFile != tokenPath {
		t.Errorf("admin.token_file = %q, want %q (relative to the config dir)", c.Admin.TokenFile, tokenPath)
	}
	if !slices.Equal(c.Admin.Allow, []string{"127.0.0.0/8", "::1/128"}) {
		t.Errorf("admin.allow = %q, want loopback", c.Admin.Allow)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	tok, err := c.AdminToken()
	if err != nil || tok != "0123456789abcdefXYZ-._~+/==" {
		t.Errorf("AdminToken = %q, %v", tok, err)
	}
	var got []string
	for _, p := range c.AdminAllow() {
		got = append(got, p.String())
	}
	if !slices.Equal(got, []string{"127.0.0.0/8", "::1/128"}) {
		t.Errorf("AdminAllow = %v", got)
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("Warnings = %q, want none (token file mode 0600)", w)
	}

	// An explicit allow list is kept.
	c = mustParse(t, "[admin]\nlisten = \"[::1]:8080\"\ntoken = \"0123456789abcdef\"\nallow = [\"10.1.2.3\", \"::ffff:192.168.0.0/112\"]\n"+minimal)
	got = nil
	for _, p := range c.AdminAllow() {
		got = append(got, p.String())
	}
	if !slices.Equal(got, []string{"10.1.2.3/32", "192.168.0.0/16"}) {
		t.Errorf("AdminAllow = %v", got)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestAdminToken(t *testing.T) {
	dir := t.TempDir()
	c := mustParse(t, minimal)
	if _, err := c.AdminToken(); err == nil || !strings.Contains(err.Error(), "neither admin.token nor admin.token_file") {
		t.Errorf("AdminToken without token = %v", err)
	}
	c.Admin.Token = "\t0123456789abcdef \n"
	if tok, err := c.AdminToken(); err != nil || tok != "0123456789abcdef" {
		t.Errorf("AdminToken = %q, %v; want it trimmed", tok, err)
	}
	c.Admin.Token = "   "
	if _, err := c.AdminToken(); err == nil {
		t.Error("AdminToken with a blank token succeeded")
	}

	c.Admin.Token = ""
	c.Admin.TokenFile = filepath.Join(dir, "missing")
	if _, err := c.AdminToken(); err == nil || !strings.Contains(err.Error(), "admin token: open "+c.Admin.TokenFile) {
		t.Errorf("AdminToken with a missing file = %v", err)
	}
	// A bad token in the file is refused without showing it.
	c.Admin.TokenFile = filepath.Join(dir, "short")
	if err := os.WriteFile(c.Admin.TokenFile, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := c.AdminToken()
	if err == nil || strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "7 characters") {
		t.Errorf("AdminToken with a short token = %v", err)
	}
	// The Validate message does not show the token either.
	c.Admin.Listen = "127.0.0.1:8080"
	c.Admin.TokenFile = ""
	c.Admin.Token = "hunter2 hunter2 hunter2"
	if err := c.Validate(); err == nil || strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "admin.token: ") {
		t.Errorf("Validate with a bad token = %v", err)
	}
}

func TestTagFor(t *testing.T) {
	c := mustParse(t, "[tags]\n\"archive.example.com\" = \"archive\"\n\"b.example\" = \"pool-b\"\n\"é.example\" = \"e\"\n"+minimal)
	for user, want := range map[string]string{
		"bob@archive.example.com":       "archive",
		"Bob@ARCHIVE.Example.Com":       "archive",
		"a@b@archive.example.com":       "archive", // the domain is after the last '@'
		"bob@b.example":                 "pool-b",
		"bob@é.example":                 "e",
		"bob@É.example":                 "", // only ASCII is lower-cased
		"bob@archive.example.com.":      "",
		"bob@other.example":             "",
		"archive.example.com":           "",
		"bob@":                          "",
		"":                              "",
		"bob@archive.example.com@other": "",
	} {
		if got := c.TagFor(user); got != want {
			t.Errorf("TagFor(%q) = %q, want %q", user, got, want)
		}
	}
	empty := &config.Config{}
	if got := empty.TagFor("bob@archive.example.com"); got != "" {
		t.Errorf("TagFor without [tags] = %q", got)
	}
}

func TestHealthIsEnabled(t *testing.T) {
	yes, no := true, false
	for _, tt := range []struct {
		enabled *bool
		want    bool
	}{{nil, true}, {&yes, true}, {&no, false}} {
		if got := (config.Health{Enabled: tt.enabled}).IsEnabled(); got != tt.want {
			t.Errorf("IsEnabled with %v = %v, want %v", tt.enabled, got, tt.want)
		}
	}
	c := mustParse(t, "[health]\nenabled = false\n"+minimal)
	if c.Health.IsEnabled() {
		t.Error("health.enabled = false parsed as enabled")
	}
}

func TestHealthLoginBoth(t *testing.T) {
	c := mustParse(t, "[health]\nlogin_user = \"probe@example.org\"\nlogin_password = \"s3cret-pw\"\ninterval = \"10s\"\ntimeout = \"10s\"\n"+minimal)
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	c.Health.LoginUser = ""
	err := c.Validate()
	if err == nil || strings.Contains(err.Error(), "s3cret-pw") {
		t.Errorf("Validate with only a password = %v; want an error without the password", err)
	}
}

func TestWarnings(t *testing.T) {
	c := mustParse(t, `
[tags]
"z.example" = "pool-x"
"a.example" = "pool-y"
"b.example" = "hot"
"c.example" = "pool-x"
`+minimal+`
[[backend]]
address = "10.0.0.2"
tag = "hot"
`)
	if err := c.Validate(); err != nil {
		t.Fatalf("tags without backends must not be an error: %v", err)
	}
	want := []string{
		"tags: a.example → pool-y, but no [[backend]] has tag pool-y",
		"tags: c.example → pool-x, but no [[backend]] has tag pool-x",
		"tags: z.example → pool-x, but no [[backend]] has tag pool-x",
	}
	if got := c.Warnings(); !slices.Equal(got, want) {
		t.Errorf("Warnings =\n%q\nwant\n%q", got, want)
	}
	c.Backends = append(c.Backends, config.Backend{Address: "10.0.0.3", Tag: "pool-x"}, config.Backend{Address: "10.0.0.4", Tag: "pool-y"})
	if got := c.Warnings(); len(got) != 0 {
		t.Errorf("Warnings with every tag carried = %q", got)
	}

	// A token file others may read is a warning.
	tokenPath := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(tokenPath, []byte("0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tokenPath, 0o644); err != nil {
		t.Fatal(err)
	}
	c.Admin.Listen, c.Admin.TokenFile = "127.0.0.1:8080", tokenPath
	got := c.Warnings()
	if len(got) != 1 || !strings.HasPrefix(got[0], "admin.token_file: "+tokenPath+" has mode 0644") {
		t.Errorf("Warnings = %q, want the token file mode", got)
	}
}

func TestDefaultAdminAllowFresh(t *testing.T) {
	a := config.DefaultAdminAllow()
	a[0] = "0.0.0.0/0"
	if b := config.DefaultAdminAllow(); b[0] != "127.0.0.0/8" {
		t.Errorf("DefaultAdminAllow shares its slice: %v", b)
	}
	// Each Config gets its own slice too.
	c1 := &config.Config{Admin: config.Admin{Listen: "127.0.0.1:1"}}
	c2 := &config.Config{Admin: config.Admin{Listen: "127.0.0.1:1"}}
	c1.ApplyDefaults()
	c2.ApplyDefaults()
	c1.Admin.Allow[0] = "10.0.0.0/8"
	if c2.Admin.Allow[0] != "127.0.0.0/8" {
		t.Errorf("two configs share admin.allow: %v", c2.Admin.Allow)
	}
	if c1.Timeouts.MoveWait.Duration != 30*time.Second || c1.StateFile != "usher-state.json" {
		t.Errorf("defaults on a zero Config: move_wait %s, state_file %q", c1.Timeouts.MoveWait, c1.StateFile)
	}
}

func TestParseBackendAddress(t *testing.T) {
	good := map[string]string{
		"10.0.0.1":         "10.0.0.1",
		"::ffff:10.0.0.2":  "::ffff:10.0.0.2", // kept as written: the Dovecot ring hashes the text
		"2001:db8::1":      "2001:db8::1",
		"127.0.1.1":        "127.0.1.1",
		"2001:DB8:0:0::10": "2001:db8::10",
	}
	for in, want := range good {
		a, err := config.ParseBackendAddress(in)
		if err != nil || a.String() != want {
			t.Errorf("ParseBackendAddress(%q) = %v, %v; want %s", in, a, err, want)
		}
	}
	bad := map[string]string{
		"":                 "must not be empty",
		"mail.example.com": "not an IP address",
		"10.0.0.1:143":     "has a port",
		"[::1]:143":        "has a port",
		"0.0.0.0":          "not a unicast address",
		"::":               "not a unicast address",
		"::ffff:0.0.0.0":   "not a unicast address",
		"224.0.0.1":        "not a unicast address",
		"ff02::1":          "not a unicast address",
		"fe80::1%eth0":     "zone",
		"10.0.0.1/32":      "not an IP address",
	}
	for in, want := range bad {
		a, err := config.ParseBackendAddress(in)
		if err == nil {
			t.Errorf("ParseBackendAddress(%q) = %v, want an error", in, a)
			continue
		}
		if !strings.HasPrefix(err.Error(), "backend address: ") || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseBackendAddress(%q): error %q, want it to start with \"backend address: \" and mention %q", in, err, want)
		}
	}
}

func TestCheckTag(t *testing.T) {
	for _, tag := range []string{"", "ssd", "pool_1.b-2", strings.Repeat("t", 64)} {
		if err := config.CheckTag(tag); err != nil {
			t.Errorf("CheckTag(%q): %v", tag, err)
		}
	}
	for tag, want := range map[string]string{
		"no spaces":             "' '",
		strings.Repeat("t", 65): "longer than 64",
		"pool/b":                "'/'",
		"ü":                     "'ü'",
		"tab\there":             `'\t'`,
	} {
		err := config.CheckTag(tag)
		if err == nil || !strings.HasPrefix(err.Error(), "backend tag: ") || !strings.Contains(err.Error(), want) {
			t.Errorf("CheckTag(%q): %v, want an error mentioning %s", tag, err, want)
		}
	}
}
