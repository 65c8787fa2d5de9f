package config

import (
	"time"
)

// TLSMode says how TLS is used on a connection.
type TLSMode string

// TLS modes for listeners and backends.
const (
	TLSNone     TLSMode = "none"     // plaintext only
	TLSStartTLS TLSMode = "starttls" // plaintext, upgraded by STARTTLS/STLS
	TLSImplicit TLSMode = "implicit" // TLS from the first byte
)

// Duration is a time.Duration written in TOML as a Go duration string ("15m", "30s").
type Duration struct{ time.Duration }

// Config is the whole usher configuration file.
type Config struct {
	// Path is the absolute path of the file the Config was loaded from ("" if
	// unknown). Relative paths in the file are resolved against its directory.
	Path string `toml:"-"`
	// defaulted records that ApplyDefaults ran once; see ApplyDefaults.
	defaulted bool

	// UserExpire is how long a user record lives after the user's last session closed.
	UserExpire Duration `toml:"user_expire"` // default 15m
	// Routing is the hash algorithm for users without a record: "rendezvous" (default) or "dovecot".
	Routing string `toml:"routing"`
	// BalanceFactor bounds the load of rendezvous routing ("consistent
	// hashing with bounded loads"): a user without a record goes to the
	// first backend in its rendezvous order that holds fewer user records
	// than ceil(BalanceFactor × (N+1) × weight / total weight), N being the
	// records on the pool's eligible backends. So no backend exceeds
	// BalanceFactor × its weighted share, at the price of a placement that
	// depends on the records, not on the hash alone. Users with a record
	// never move. 0 (default) is off: pure hashing. Otherwise
	// MinBalanceFactor..MaxBalanceFactor; not with routing = "dovecot".
	// A reload applies a change to users placed from then on.
	BalanceFactor float64 `toml:"balance_factor"`
	// HashTemplate is expanded from the login name to the string that is hashed
	// and that keys user records: %u, %Lu (default), %n, %Ln, %d, %Ld.
	HashTemplate string `toml:"hash_template"`
	// TrustedNetworks (CIDRs, or single IPs meaning /32 or /128) may log in with
	// plaintext passwords without TLS. See TrustedPrefixes.
	TrustedNetworks []string `toml:"trusted_networks"`
	// MaxLiteral caps an IMAP literal before login, in bytes (default 8192).
	MaxLiteral int `toml:"max_literal"`

	// StateFile keeps the backend set and user records across restarts
	// (written atomically after every admin change and at shutdown). Default
	// "usher-state.json" next to the config file. When it exists, it wins over
	// the [[backend]] list, which only seeds a fresh state.
	StateFile string `toml:"state_file"`
	// Tags maps a user's domain (the part after '@', lower-cased) to a backend
	// tag (pool): `[tags]` then `"example.org" = "pool-b"`. Users of other
	// domains go to the default pool (backends without a tag).
	Tags map[string]string `toml:"tags"`

	Admin       Admin     `toml:"admin"`
	Timeouts    Timeouts  `toml:"timeouts"`
	Health      Health    `toml:"health"`
	IMAP        Service   `toml:"imap"`
	POP3        Service   `toml:"pop3"`
	LMTP        Service   `toml:"lmtp"`
	ManageSieve Service   `toml:"managesieve"`
	Backends    []Backend `toml:"backend"`
}

// Health configures the built-in backend health checks: per backend and
// enabled service, connect and read the greeting (optionally log in).
type Health struct {
	Enabled  *bool    `toml:"enabled"`  // default true
	Interval Duration `toml:"interval"` // default 5s: time between probes of one backend
	Timeout  Duration `toml:"timeout"`  // default 3s: one probe, connect to answer
	Fall     int      `toml:"fall"`     // default 3: consecutive failures to mark down
	Rise     int      `toml:"rise"`     // default 2: consecutive successes to mark up
	// A backend whose state changed more than FlapMax times within
	// FlapWindow is held down for HoldDown (damping).
	FlapWindow Duration `toml:"flap_window"` // default 5m
	FlapMax    int      `toml:"flap_max"`    // default 4
	HoldDown   Duration `toml:"hold_down"`   // default 2m
	// LoginUser and LoginPassword, when set, make each probe also log in.
	LoginUser     string `toml:"login_user"`
	LoginPassword string `toml:"login_password"`
}

// Admin configures the local admin socket that the CLI talks to.
type Admin struct {
	// Socket is the path of the UNIX admin socket (mode 0600). Default "usher-admin.sock"
	// next to the config file; a relative path is relative to the config file's directory.
	Socket string `toml:"socket"`
	// Listen optionally serves the API on TCP too (host:port). Every TCP
	// request needs "Authorization: Bearer <token>" and a client address in
	// Allow; others get 401/403.
	Listen string `toml:"listen"`
	// Token (or TokenFile, a file holding it) is the bearer token for Listen.
	Token     string `toml:"token"`
	TokenFile string `toml:"token_file"`
	// Allow lists the CIDRs (or single IPs) that may use the TCP API.
	// Default: loopback only.
	Allow []string `toml:"allow"`
	// Profiling serves Go's runtime profiles (CPU, heap, goroutines, an
	// execution trace; net/http/pprof) under /debug/pprof/ on the admin
	// socket and, with the token, on Listen. Default false; a change needs
	// a restart.
	Profiling bool `toml:"profiling"`
}

// Timeouts bound every wait of a session.
type Timeouts struct {
	PreLoginIdle Duration `toml:"pre_login_idle"` // default 60s: idle time allowed before login
	// Login bounds the whole time from connect to a successful login
	// (IMAP, POP3, ManageSieve), however busy the client keeps the session.
	// Default 3m, Dovecot's own limit for its login processes.
	Login          Duration `toml:"login"`
	BackendConnect Duration `toml:"backend_connect"` // default 5s
	BackendLogin   Duration `toml:"backend_login"`   // default 30s: greeting..tagged login answer
	// MoveWait bounds how long a login waits while its user is being moved
	// (then it gets a temporary failure). Default 30s.
	MoveWait Duration `toml:"move_wait"`
	// ShutdownGrace is how long SIGTERM lets open sessions drain before they
	// are closed. Default 30s.
	ShutdownGrace Duration `toml:"shutdown_grace"`
}

// Service configures one protocol (IMAP, POP3, LMTP or ManageSieve): its
// listeners, limits and backend side.
type Service struct {
	Listeners []Listener `toml:"listener"`
	// MaxSessions caps open sessions of this service (0 = unlimited; default 10000).
	MaxSessions int `toml:"max_sessions"`
	// MaxSessionsPerIP caps open sessions per client IP (0 = unlimited;
	// default 50, for LMTP 0).
	MaxSessionsPerIP int `toml:"max_sessions_per_ip"`
	// BackendPort is the backend's port (default 143 for IMAP, 110 for POP3,
	// 24 for LMTP, 4190 for ManageSieve).
	BackendPort int `toml:"backend_port"`
	// BackendTLS is how usher talks TLS to the backend (default none). With
	// starttls the protocol code upgrades the connection; with implicit, TLS
	// starts at connect.
	BackendTLS TLSMode `toml:"backend_tls"`
	// BackendTLSVerify checks the backend certificate (default true). BackendCA is a PEM
	// file of roots to trust instead of the system pool (only with backend_tls
	// starttls or implicit). See BackendTLSConfig.
	BackendTLSVerify *bool  `toml:"backend_tls_verify"`
	BackendCA        string `toml:"backend_ca"`

	// Allow lists the client networks (CIDRs or single IPs) that may connect;
	// others are refused at connect with a log line. Empty: everyone, except
	// for LMTP where missing and empty both mean loopback only (127.0.0.0/8,
	// ::1; see DefaultLMTPAllow). Checked against the real client address
	// (after a PROXY header) on TCP listeners; a unix: listener has no client
	// address, its mode/owner/group are its access control. See AllowPrefixes.
	Allow []string `toml:"allow"`
	// ProxyTrusted lists the load balancers (CIDRs or IPs) that send a PROXY
	// protocol v1/v2 header on listeners with proxy_protocol = true;
	// connections from elsewhere to such a listener are refused. Required
	// when a listener has proxy_protocol = true. See ProxyTrustedPrefixes.
	ProxyTrusted []string `toml:"proxy_trusted"`
	// BackendProxy sends a PROXY protocol header ("v1" or "v2", exactly) to the
	// backend before its greeting, carrying the client's address (health
	// probes send a LOCAL header); "" (default) sends none. The address is
	// also forwarded in the protocol where the backend accepts it (IMAP ID,
	// POP3/LMTP/ManageSieve XCLIENT).
	BackendProxy string `toml:"backend_proxy"`

	// LMTP only: RecipientDelimiter (e.g. "+") is stripped with what follows
	// it from a recipient's local part before routing ("" = none); each of
	// its (at most 8) characters is a delimiter of its own, as in Postfix and
	// Dovecot. MaxMessageSize caps a message in bytes (default 64 MiB,
	// 1 KiB..2 GiB; must stay 0 in the other services).
	RecipientDelimiter string `toml:"recipient_delimiter"`
	MaxMessageSize     int64  `toml:"max_message_size"`
}

// Listener is one address a service accepts clients on.
type Listener struct {
	// Address is host:port, or unix:/path for a UNIX socket (absolute, at
	// most 107 bytes; the backend is still reached on its TCP port).
	Address string  `toml:"address"`
	TLS     TLSMode `toml:"tls"`  // default none
	Cert    string  `toml:"cert"` // PEM certificate chain, needed for starttls/implicit (only then)
	Key     string  `toml:"key"`  // PEM private key, likewise
	// Mode (octal string 0..0777, default "0660") and Owner/Group (names or
	// numeric ids, default: unchanged) of a UNIX socket; not allowed on TCP
	// listeners. See UnixMode and UnixOwner.
	Mode  string `toml:"mode"`
	Owner string `toml:"owner"`
	Group string `toml:"group"`
	// ProxyProtocol expects a PROXY v1/v2 header from the service's
	// proxy_trusted load balancers before the greeting (TCP listeners only).
	ProxyProtocol bool `toml:"proxy_protocol"`
}

// Backend is one mail server users are routed to.
type Backend struct {
	Address string `toml:"address"` // IP address, no port, no host name (ports come from the service)
	Weight  *int   `toml:"weight"`  // 0..1000, default 100 (never nil after ApplyDefaults); 0 drains
	Tag     string `toml:"tag"`     // pool name, [A-Za-z0-9_.-]{0,64}; "" is the default pool
}
