package config_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/config"
)

// withServices is minimal plus an [lmtp] (a unix: socket in dir and a TCP
// listener) and a [managesieve] listener.
func withServices(dir string) string {
	return minimal + `
[[lmtp.listener]]
address = 'unix:` + filepath.Join(dir, "lmtp.sock") + `'

[[lmtp.listener]]
address = "127.0.0.1:1024"

[[managesieve.listener]]
address = "127.0.0.1:4190"
`
}

func TestServiceDefaults(t *testing.T) {
	dir := t.TempDir()
	c, err := config.Parse([]byte(withServices(dir)), filepath.Join(dir, "usher.toml"))
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
		{"lmtp.max_sessions", c.LMTP.MaxSessions, 10000},
		{"lmtp.max_sessions_per_ip", c.LMTP.MaxSessionsPerIP, 0},
		{"lmtp.backend_port", c.LMTP.BackendPort, 24},
		{"lmtp.backend_tls", c.LMTP.BackendTLS, config.TLSNone},
		{"lmtp.backend_tls_verify", *c.LMTP.BackendTLSVerify, true},
		{"lmtp.backend_proxy", c.LMTP.BackendProxy, ""},
		{"lmtp.allow", strings.Join(c.LMTP.Allow, ","), "127.0.0.0/8,::1/128"},
		{"lmtp.proxy_trusted", len(c.LMTP.ProxyTrusted), 0},
		{"lmtp.recipient_delimiter", c.LMTP.RecipientDelimiter, ""},
		{"lmtp.max_message_size", c.LMTP.MaxMessageSize, int64(64 << 20)},
		{"lmtp.listener[0].mode", c.LMTP.Listeners[0].Mode, "0660"},
		{"lmtp.listener[0].tls", c.LMTP.Listeners[0].TLS, config.TLSNone},
		{"lmtp.listener[0].owner", c.LMTP.Listeners[0].Owner, ""},
		{"lmtp.listener[1].mode (TCP)", c.LMTP.Listeners[1].Mode, ""},
		{"lmtp.listener[1].proxy_protocol", c.LMTP.Listeners[1].ProxyProtocol, false},
		{"managesieve.max_sessions", c.ManageSieve.MaxSessions, 10000},
		{"managesieve.max_sessions_per_ip", c.ManageSieve.MaxSessionsPerIP, 50},
		{"managesieve.backend_port", c.ManageSieve.BackendPort, 4190},
		{"managesieve.backend_tls", c.ManageSieve.BackendTLS, config.TLSNone},
		{"managesieve.backend_tls_verify", *c.ManageSieve.BackendTLSVerify, true},
		{"managesieve.allow", len(c.ManageSieve.Allow), 0},
		{"managesieve.max_message_size", c.ManageSieve.MaxMessageSize, int64(0)},
		{"managesieve.listener[0].tls", c.ManageSieve.Listeners[0].TLS, config.TLSNone},
		{"imap.allow", len(c.IMAP.Allow), 0},
		{"imap.max_message_size", c.IMAP.MaxMessageSize, int64(0)},
		{"pop3.backend_proxy", c.POP3.BackendProxy, ""},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	ptrs := []*bool{c.IMAP.BackendTLSVerify, c.POP3.BackendTLSVerify, c.LMTP.BackendTLSVerify, c.ManageSieve.BackendTLSVerify}
	for i := range ptrs {
		for j := range i {
			if ptrs[i] == ptrs[j] {
				t.Errorf("services %d and %d share one backend_tls_verify pointer", i, j)
			}
		}
	}
	// The default allow list is a fresh slice per Config.
	c.LMTP.Allow[0] = "10.0.0.0/8"
	if got := config.DefaultLMTPAllow()[0]; got != "127.0.0.0/8" {
		t.Errorf("DefaultLMTPAllow()[0] = %q after a Config's copy changed", got)
	}
	if c2 := mustParse(t, withServices(dir)); c2.LMTP.Allow[0] != "127.0.0.0/8" {
		t.Errorf("second Parse: lmtp.allow = %v", c2.LMTP.Allow)
	}

	// A Config built in code gets the same defaults.
	z := &config.Config{LMTP: config.Service{Listeners: []config.Listener{{Address: "unix:/run/x.sock"}}}}
	z.ApplyDefaults()
	if z.LMTP.BackendPort != 24 || z.LMTP.MaxSessionsPerIP != 0 || z.LMTP.MaxMessageSize != 64<<20 ||
		len(z.LMTP.Allow) != 2 || z.LMTP.Listeners[0].Mode != "0660" || z.ManageSieve.BackendPort != 4190 ||
		z.ManageSieve.MaxSessionsPerIP != 50 || z.ManageSieve.BackendTLSVerify == nil {
		t.Errorf("ApplyDefaults on a zero Config: lmtp %+v, managesieve %+v", z.LMTP, z.ManageSieve)
	}
}

func TestServiceExplicitValuesKept(t *testing.T) {
	dir := t.TempDir()
	c := mustParse(t, withServices(dir)+`
[lmtp]
allow = []
max_sessions_per_ip = 5
max_message_size = 0
recipient_delimiter = "+-"

[managesieve]
max_sessions_per_ip = 0
allow = ["0.0.0.0/0"]
`)
	// An empty lmtp.allow is the loopback default, like a missing one.
	if got := strings.Join(c.LMTP.Allow, ","); got != "127.0.0.0/8,::1/128" {
		t.Errorf("lmtp.allow = [] gave %q, want loopback", got)
	}
	if c.LMTP.MaxSessionsPerIP != 5 || c.LMTP.MaxMessageSize != 0 || c.LMTP.RecipientDelimiter != "+-" {
		t.Errorf("lmtp = %+v", c.LMTP)
	}
	if c.ManageSieve.MaxSessionsPerIP != 0 || len(c.ManageSieve.Allow) != 1 {
		t.Errorf("managesieve = %+v", c.ManageSieve)
	}
	c.ApplyDefaults()
	if c.LMTP.MaxMessageSize != 0 || c.ManageSieve.MaxSessionsPerIP != 0 {
		t.Error("ApplyDefaults after Parse overwrote explicit values")
	}
	// The explicit max_message_size = 0 is reported, not replaced.
	err := c.Validate()
	if n := numErrs(err); n != 1 || !strings.Contains(err.Error(), "lmtp.max_message_size: must be between 1024 (1 KiB) and 2147483648 (2 GiB), got 0") {
		t.Errorf("Validate = %v", err)
	}

	c = mustParse(t, withServices(dir)+"[lmtp]\nallow = [\"0.0.0.0/0\", \"::/0\"]\n")
	if got := strings.Join(c.LMTP.Allow, ","); got != "0.0.0.0/0,::/0" {
		t.Errorf("lmtp.allow = %q, want everyone as written", got)
	}
	// An explicit mode wins over the default.
	c = mustParse(t, strings.Replace(withServices(dir), "lmtp.sock'", "lmtp.sock'\nmode = \"0600\"", 1))
	if c.LMTP.Listeners[0].Mode != "0600" || c.LMTP.Listeners[0].UnixMode() != 0o600 {
		t.Errorf("mode = %q", c.LMTP.Listeners[0].Mode)
	}
}

func TestServiceSchema(t *testing.T) {
	for _, tt := range []struct{ doc, want string }{
		{"[lmtp]\nmax_message_size = \"64M\"\n", `usher.toml:2: lmtp.max_message_size: want an integer, got a string`},
		{"[[managesieve.listener]]\naddress = \"127.0.0.1:4190\"\nproxy_protocol = \"yes\"\n", `usher.toml:3: managesieve.listener.proxy_protocol: want a boolean, got a string`},
		{"[[lmtp.listener]]\nmode = 660\n", `usher.toml:2: lmtp.listener.mode: want a string, got an integer`},
		{"[lmtp]\nRecipient_Delimiter = \"+\"\n", `usher.toml:2: unknown key "lmtp.Recipient_Delimiter" (keys are case-sensitive: did you mean "recipient_delimiter"?)`},
		{"[sieve]\n", `usher.toml:1: unknown key "sieve"`},
	} {
		if got := parseErr(t, tt.doc); got != tt.want {
			t.Errorf("error = %q\nwant    %q", got, tt.want)
		}
	}
	c := mustParse(t, "lmtp.max_message_size = 2147483648\n"+minimal)
	if c.LMTP.MaxMessageSize != 2<<30 {
		t.Errorf("max_message_size = %d", c.LMTP.MaxMessageSize)
	}
}

// TestServiceValidateRules has one failing case per rule of the four
// services; each must name its key.
func TestServiceValidateRules(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "lmtp.sock")
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	lmtp0 := func(c *config.Config) *config.Listener { return &c.LMTP.Listeners[0] }
	tests := []struct {
		name string
		edit func(c *config.Config)
		want string
	}{
		{"no listeners anywhere", func(c *config.Config) {
			c.IMAP.Listeners, c.POP3.Listeners, c.LMTP.Listeners, c.ManageSieve.Listeners = nil, nil, nil, nil
		}, `imap.listener: no listeners: configure at least one [[imap.listener]], [[pop3.listener]], [[lmtp.listener]] or [[managesieve.listener]]`},
		{"unix relative", func(c *config.Config) { lmtp0(c).Address = "unix:run/lmtp.sock" }, `lmtp.listener[0].address: "unix:run/lmtp.sock": the socket path must be absolute`},
		{"unix empty", func(c *config.Config) { lmtp0(c).Address = "unix:" }, `lmtp.listener[0].address: "unix:" has no path`},
		{"unix root", func(c *config.Config) { lmtp0(c).Address = "unix:/" }, `lmtp.listener[0].address: "unix:/" is a directory`},
		{"unix long", func(c *config.Config) { lmtp0(c).Address = "unix:/" + strings.Repeat("a", 107) }, `lmtp.listener[0].address: socket path "/` + strings.Repeat("a", 107) + `" is 108 bytes, longer than the 107`},
		{"unix unclean", func(c *config.Config) { lmtp0(c).Address = "unix:" + dir + "//x.sock" }, `lmtp.listener[0].address: socket path "` + dir + `//x.sock" is not clean: write "` + dir + `/x.sock"`},
		{"unix control", func(c *config.Config) { lmtp0(c).Address = "unix:" + dir + "/x\n.sock" }, `lmtp.listener[0].address: socket path "` + dir + `/x\n.sock" has a control character`},
		{"unix upper-case prefix", func(c *config.Config) { lmtp0(c).Address, lmtp0(c).Mode = "UNIX:"+sock, "" }, `lmtp.listener[0].address: "UNIX:` + sock + `": write the unix: prefix in lower case`},
		{"unix dir missing", func(c *config.Config) { lmtp0(c).Address = "unix:" + filepath.Join(dir, "nodir", "x.sock") }, `lmtp.listener[0].address: socket directory: stat ` + filepath.Join(dir, "nodir")},
		{"unix dir is a file", func(c *config.Config) { lmtp0(c).Address = "unix:" + filepath.Join(file, "x.sock") }, `lmtp.listener[0].address: socket directory ` + file + ` is not a directory`},
		{"unix path is a file", func(c *config.Config) { lmtp0(c).Address = "unix:" + file }, `lmtp.listener[0].address: ` + file + ` exists and is not a socket`},
		{"unix duplicate", func(c *config.Config) { c.ManageSieve.Listeners[0].Address = "unix:" + sock }, `managesieve.listener[0].address: "unix:` + sock + `" is already used by lmtp.listener[0]`},
		{"tcp duplicate across services", func(c *config.Config) { c.LMTP.Listeners[1].Address = "127.0.0.1:1143" }, `lmtp.listener[1].address: "127.0.0.1:1143" is already used by imap.listener[0]`},
		{"tcp duplicate managesieve", func(c *config.Config) { c.ManageSieve.Listeners[0].Address = "[::ffff:127.0.0.1]:1024" }, `managesieve.listener[0].address: "[::ffff:127.0.0.1]:1024" is already used by lmtp.listener[1]`},
		{"admin listen on a service", func(c *config.Config) {
			c.Admin.Listen, c.Admin.Token = "127.0.0.1:4190", "0123456789abcdef"
		}, `admin.listen: "127.0.0.1:4190" is already used by managesieve.listener[0]`},
		{"admin socket on a listener", func(c *config.Config) { c.Admin.Socket = sock }, `admin.socket: "` + sock + `" is already used by lmtp.listener[0]`},
		{"lmtp listener port 25", func(c *config.Config) { c.LMTP.Listeners[1].Address = "127.0.0.1:25" }, `lmtp.listener[1].address: LMTP must not be used on port 25 (RFC 2033)`},
		{"lmtp backend_port 25", func(c *config.Config) { c.LMTP.BackendPort = 25 }, `lmtp.backend_port: LMTP must not be used on port 25`},
		{"lmtp listener tls", func(c *config.Config) { c.LMTP.Listeners[1].TLS = "ssl" }, `lmtp.listener[1].tls: "ssl" is not a TLS mode`},
		{"lmtp listener cert missing", func(c *config.Config) { lmtp0(c).TLS, lmtp0(c).Key = config.TLSStartTLS, "k.pem" }, `lmtp.listener[0].cert: required with tls = "starttls"`},

		{"mode not octal", func(c *config.Config) { lmtp0(c).Mode = "0968" }, `lmtp.listener[0].mode: "0968" is not an octal mode like "0660"`},
		{"mode words", func(c *config.Config) { lmtp0(c).Mode = "rw-rw----" }, `lmtp.listener[0].mode: "rw-rw----" is not an octal mode`},
		{"mode big", func(c *config.Config) { lmtp0(c).Mode = "01777" }, `lmtp.listener[0].mode: "01777" is more than 0777`},
		{"mode on tcp", func(c *config.Config) { c.IMAP.Listeners[0].Mode = "0660" }, `imap.listener[0].mode: is only for unix: listeners ("127.0.0.1:1143" is a TCP address)`},
		{"owner on tcp", func(c *config.Config) { c.LMTP.Listeners[1].Owner = "root" }, `lmtp.listener[1].owner: is only for unix: listeners`},
		{"group on tcp", func(c *config.Config) { c.POP3.Listeners[0].Group = "0" }, `pop3.listener[0].group: is only for unix: listeners`},
		{"owner unknown", func(c *config.Config) { lmtp0(c).Owner = "usher-no-such-user" }, `lmtp.listener[0].owner: look up user: user: unknown user usher-no-such-user`},
		{"group unknown", func(c *config.Config) { lmtp0(c).Group = "usher-no-such-group" }, `lmtp.listener[0].group: look up group: group: unknown group usher-no-such-group`},
		{"owner syntax", func(c *config.Config) { lmtp0(c).Owner = "mail user" }, `lmtp.listener[0].owner: "mail user" is not a user name or a numeric id`},
		{"group dash", func(c *config.Config) { lmtp0(c).Group = "-1" }, `lmtp.listener[0].group: "-1" is not a group name or a numeric id`},
		{"owner id range", func(c *config.Config) { lmtp0(c).Owner = "4294967295" }, `lmtp.listener[0].owner: user id 4294967295 is out of range (0..4294967294)`},
		{"group long", func(c *config.Config) { lmtp0(c).Group = strings.Repeat("g", 257) }, `lmtp.listener[0].group: group name is 257 bytes, longer than 256`},

		{"proxy_protocol without proxy_trusted", func(c *config.Config) { c.IMAP.Listeners[0].ProxyProtocol = true }, `imap.listener[0].proxy_protocol: needs imap.proxy_trusted`},
		{"proxy_protocol on unix", func(c *config.Config) {
			lmtp0(c).ProxyProtocol = true
			c.LMTP.ProxyTrusted = []string{"10.0.0.1"}
		}, `lmtp.listener[0].proxy_protocol: is only for TCP listeners`},
		{"allow", func(c *config.Config) { c.POP3.Allow = []string{"10.0.0.0/8", "office"} }, `pop3.allow[1]: "office" is neither an IP address nor a CIDR prefix`},
		{"lmtp allow", func(c *config.Config) { c.LMTP.Allow = []string{"::1/129"} }, `lmtp.allow[0]: "::1/129" is not a CIDR prefix`},
		{"proxy_trusted", func(c *config.Config) { c.ManageSieve.ProxyTrusted = []string{"fe80::1%eth0"} }, `managesieve.proxy_trusted[0]: "fe80::1%eth0": IPv6 zones are not allowed`},
		{"backend_proxy", func(c *config.Config) { c.LMTP.BackendProxy = "v3" }, `lmtp.backend_proxy: "v3" is not a PROXY protocol version (want "v1", "v2" or "" for none)`},
		{"backend_proxy case", func(c *config.Config) { c.IMAP.BackendProxy = "V1" }, `imap.backend_proxy: "V1" is not a PROXY protocol version`},

		{"recipient_delimiter on imap", func(c *config.Config) { c.IMAP.RecipientDelimiter = "+" }, `imap.recipient_delimiter: is only for [lmtp]`},
		{"recipient_delimiter on managesieve", func(c *config.Config) { c.ManageSieve.RecipientDelimiter = "+" }, `managesieve.recipient_delimiter: is only for [lmtp]`},
		{"recipient_delimiter long", func(c *config.Config) { c.LMTP.RecipientDelimiter = "+-_=.~!#%" }, `lmtp.recipient_delimiter: "+-_=.~!#%" has 9 characters, more than 8`},
		{"recipient_delimiter at", func(c *config.Config) { c.LMTP.RecipientDelimiter = "+@" }, `lmtp.recipient_delimiter: "+@" has '@'`},
		{"recipient_delimiter space", func(c *config.Config) { c.LMTP.RecipientDelimiter = "+ " }, `lmtp.recipient_delimiter: "+ " has ' '`},
		{"recipient_delimiter control", func(c *config.Config) { c.LMTP.RecipientDelimiter = "\t" }, `lmtp.recipient_delimiter: "\t" has '\t'`},
		{"recipient_delimiter utf-8", func(c *config.Config) { c.LMTP.RecipientDelimiter = "+\xff" }, `lmtp.recipient_delimiter: "+\xff" is not valid UTF-8`},
		{"max_message_size on pop3", func(c *config.Config) { c.POP3.MaxMessageSize = 1 << 20 }, `pop3.max_message_size: is only for [lmtp]`},
		{"max_message_size small", func(c *config.Config) { c.LMTP.MaxMessageSize = 1023 }, `lmtp.max_message_size: must be between 1024 (1 KiB) and 2147483648 (2 GiB), got 1023`},
		{"max_message_size big", func(c *config.Config) { c.LMTP.MaxMessageSize = 2<<30 + 1 }, `lmtp.max_message_size: must be between 1024 (1 KiB) and 2147483648 (2 GiB), got 2147483649`},
		{"max_message_size negative", func(c *config.Config) { c.LMTP.MaxMessageSize = -1 }, `lmtp.max_message_size: must be between`},

		{"managesieve backend_port", func(c *config.Config) { c.ManageSieve.BackendPort = 0 }, `managesieve.backend_port: must be between 1 and 65535, got 0`},
		{"managesieve max_sessions", func(c *config.Config) { c.ManageSieve.MaxSessions = -1 }, `managesieve.max_sessions: must be 0 (unlimited) or more`},
		{"lmtp max_sessions_per_ip", func(c *config.Config) { c.LMTP.MaxSessionsPerIP = -1 }, `lmtp.max_sessions_per_ip: must be 0 (unlimited) or more`},
		{"lmtp backend_tls", func(c *config.Config) { c.LMTP.BackendTLS = "tls" }, `lmtp.backend_tls: "tls" is not a TLS mode`},
		{"managesieve backend_ca without tls", func(c *config.Config) { c.ManageSieve.BackendCA = file }, `managesieve.backend_ca: is set but backend_tls is "none"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, withServices(dir))
			if err := c.Validate(); err != nil {
				t.Fatalf("base config: %v", err)
			}
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

// TestServiceValidateAccepts checks the edges of the new rules from the
// accepting side.
func TestServiceValidateAccepts(t *testing.T) {
	dir := t.TempDir()
	writeCert(t, dir)
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	// A socket path of exactly 107 bytes is allowed.
	long := filepath.Join(dir, strings.Repeat("s", 107-len(dir)-1))
	if len(long) != 107 {
		t.Fatalf("temp dir %q too long for the test", dir)
	}
	// An existing (stale) socket at the path is fine: the server replaces it.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	tests := []struct {
		name string
		edit func(c *config.Config)
	}{
		{"only lmtp", func(c *config.Config) { c.IMAP.Listeners, c.POP3.Listeners, c.ManageSieve.Listeners = nil, nil, nil }},
		{"only managesieve", func(c *config.Config) { c.IMAP.Listeners, c.POP3.Listeners, c.LMTP.Listeners = nil, nil, nil }},
		{"socket path 107 bytes", func(c *config.Config) { c.LMTP.Listeners[0].Address = "unix:" + long }},
		{"stale socket", func(c *config.Config) { c.LMTP.Listeners[0].Address = "unix:" + stale }},
		{"tls on unix and lmtp", func(c *config.Config) {
			for i, mode := range []config.TLSMode{config.TLSImplicit, config.TLSStartTLS} {
				l := &c.LMTP.Listeners[i]
				l.TLS, l.Cert, l.Key = mode, filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
			}
		}},
		{"modes", func(c *config.Config) { c.LMTP.Listeners[0].Mode = "660" }},
		{"mode zero", func(c *config.Config) { c.LMTP.Listeners[0].Mode = "0" }},
		{"mode 0777", func(c *config.Config) { c.LMTP.Listeners[0].Mode = "0777" }},
		{"numeric ids", func(c *config.Config) { c.LMTP.Listeners[0].Owner, c.LMTP.Listeners[0].Group = "4294967294", "0" }},
		{"names", func(c *config.Config) { c.LMTP.Listeners[0].Owner, c.LMTP.Listeners[0].Group = me.Username, grp.Name }},
		{"proxy", func(c *config.Config) {
			c.IMAP.Listeners[0].ProxyProtocol = true
			c.IMAP.ProxyTrusted = []string{"10.0.0.5", "fd00::/64"}
			c.IMAP.BackendProxy, c.POP3.BackendProxy = "v1", "v2"
		}},
		{"delimiters", func(c *config.Config) { c.LMTP.RecipientDelimiter = "+-_=.~!ü" }},
		{"max_message_size low", func(c *config.Config) { c.LMTP.MaxMessageSize = 1024 }},
		{"max_message_size high", func(c *config.Config) { c.LMTP.MaxMessageSize = 2 << 30 }},
		{"allow everyone", func(c *config.Config) { c.LMTP.Allow = []string{"0.0.0.0/0", "::/0"} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, withServices(dir))
			tt.edit(c)
			if err := c.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

// TestValidateNoFilesSkipsHostChecks: without file checks, a socket
// directory or a user name that this host lacks is not an error; syntax
// still is.
func TestValidateNoFilesSkipsHostChecks(t *testing.T) {
	c := mustParse(t, minimal+`
[[lmtp.listener]]
address = "unix:/nonexistent-usher-dir/lmtp.sock"
owner = "usher-no-such-user"
group = "usher-no-such-group"
`)
	if err := c.ValidateNoFiles(); err != nil {
		t.Errorf("ValidateNoFiles: %v", err)
	}
	err := c.Validate()
	if n := numErrs(err); n != 3 {
		t.Errorf("Validate: %d errors, want 3 (directory, owner, group): %v", n, err)
	}
	c.LMTP.Listeners[0].Owner = "a:b"
	if err := c.ValidateNoFiles(); err == nil || !strings.Contains(err.Error(), `lmtp.listener[0].owner: "a:b" is not a user name`) {
		t.Errorf("ValidateNoFiles with a bad owner = %v", err)
	}
}

func TestServicePrefixes(t *testing.T) {
	s := config.Service{
		Allow:        []string{"10.0.0.1", "192.168.1.7/24", "::ffff:10.1.2.3", "bad", "fd00::/8"},
		ProxyTrusted: []string{"::1", "::ffff:172.16.0.0/108"},
	}
	str := func(ps []netip.Prefix) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.String())
		}
		return out
	}
	if got, want := str(s.AllowPrefixes()), []string{"10.0.0.1/32", "192.168.1.0/24", "10.1.2.3/32", "fd00::/8"}; !slices.Equal(got, want) {
		t.Errorf("AllowPrefixes = %v, want %v", got, want)
	}
	if got, want := str(s.ProxyTrustedPrefixes()), []string{"::1/128", "172.16.0.0/12"}; !slices.Equal(got, want) {
		t.Errorf("ProxyTrustedPrefixes = %v, want %v", got, want)
	}
	if got := (config.Service{}).AllowPrefixes(); len(got) != 0 {
		t.Errorf("empty AllowPrefixes = %v", got)
	}
	c := mustParse(t, minimal)
	lo := c.LMTP.AllowPrefixes()
	if len(lo) != 2 || !lo[0].Contains(netip.MustParseAddr("127.0.0.2")) || !lo[1].Contains(netip.IPv6Loopback()) {
		t.Errorf("default lmtp AllowPrefixes = %v", lo)
	}
}

func TestListenerUnixHelpers(t *testing.T) {
	tcp := config.Listener{Address: "127.0.0.1:24"}
	if tcp.IsUnix() || tcp.UnixPath() != "" {
		t.Errorf("TCP listener: IsUnix %v, UnixPath %q", tcp.IsUnix(), tcp.UnixPath())
	}
	u := config.Listener{Address: "unix:/run/usher/lmtp.sock"}
	if !u.IsUnix() || u.UnixPath() != "/run/usher/lmtp.sock" {
		t.Errorf("unix listener: IsUnix %v, UnixPath %q", u.IsUnix(), u.UnixPath())
	}
	for mode, want := range map[string]os.FileMode{"": 0o660, "0640": 0o640, "600": 0o600, "0": 0, "0777": 0o777, "bad": 0o660, "01777": 0o660} {
		u.Mode = mode
		if got := u.UnixMode(); got != want {
			t.Errorf("UnixMode(%q) = %04o, want %04o", mode, got, want)
		}
	}

	uid, gid, err := u.UnixOwner()
	if uid != -1 || gid != -1 || err != nil {
		t.Errorf("UnixOwner unset = %d, %d, %v; want -1, -1, nil", uid, gid, err)
	}
	u.Owner, u.Group = "1234", "0"
	if uid, gid, err := u.UnixOwner(); uid != 1234 || gid != 0 || err != nil {
		t.Errorf("UnixOwner numeric = %d, %d, %v", uid, gid, err)
	}
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	u.Owner, u.Group = me.Username, ""
	if uid, gid, err := u.UnixOwner(); uid != os.Getuid() || gid != -1 || err != nil {
		t.Errorf("UnixOwner(%s) = %d, %d, %v; want %d, -1", me.Username, uid, gid, err, os.Getuid())
	}
	u.Owner, u.Group = "", grp.Name
	if uid, gid, err := u.UnixOwner(); uid != -1 || gid != os.Getgid() || err != nil {
		t.Errorf("UnixOwner(group %s) = %d, %d, %v; want -1, %d", grp.Name, uid, gid, err, os.Getgid())
	}
	u.Owner, u.Group = "usher-no-such-user", ""
	_, _, err = u.UnixOwner()
	var unknownUser user.UnknownUserError
	if err == nil || !strings.Contains(err.Error(), "listener unix:/run/usher/lmtp.sock: owner: look up user") || !errors.As(err, &unknownUser) {
		t.Errorf("UnixOwner unknown user = %v", err)
	}
	u.Owner, u.Group = "", "usher-no-such-group"
	_, _, err = u.UnixOwner()
	var unknownGroup user.UnknownGroupError
	if err == nil || !strings.Contains(err.Error(), "group: look up group") || !errors.As(err, &unknownGroup) {
		t.Errorf("UnixOwner unknown group = %v", err)
	}
}
