package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/usher-mail/usher/internal/config"
)

// BackendOptions says how one service reaches its backends.
type BackendOptions struct {
	Port           int            // TCP port on every backend (143, 110, ...)
	TLS            config.TLSMode // none, starttls (done by the protocol) or implicit (done by Dial)
	TLSConfig      *tls.Config    // client config for implicit TLS and STARTTLS
	ConnectTimeout time.Duration  // TCP connect (+ implicit TLS handshake)
	LoginTimeout   time.Duration  // from greeting to the backend's answer to the login
}

// Addr returns the backend's TCP address for ip.
func (o *BackendOptions) Addr(ip netip.Addr) string {
	return net.JoinHostPort(ip.String(), strconv.Itoa(o.Port))
}

// Dial connects to the backend at ip; with implicit TLS it also completes the
// handshake. The connection is always TCP, whatever listener the client came
// in on.
func (o *BackendOptions) Dial(ctx context.Context, ip netip.Addr) (net.Conn, error) {
	if o.Port <= 0 || o.Port > 65535 {
		// A backend port of 0 is a configuration bug, never something to dial
		// (the Dovecot director did this behind UNIX listeners).
		return nil, fmt.Errorf("dial backend %s: invalid port %d", ip, o.Port)
	}
	if o.ConnectTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.ConnectTimeout)
		defer cancel()
	}
	addr := o.Addr(ip)
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial backend %s: %w", addr, err)
	}
	if o.TLS != config.TLSImplicit {
		return c, nil
	}
	tc := o.ClientTLS(c, ip)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("tls handshake with backend %s: %w", addr, err)
	}
	return tc, nil
}

// ClientTLS wraps c in a TLS client for the backend at ip (used for implicit
// TLS and after a successful STARTTLS/STLS).
func (o *BackendOptions) ClientTLS(c net.Conn, ip netip.Addr) *tls.Conn {
	cfg := o.TLSConfig
	if cfg == nil {
		cfg = &tls.Config{}
	}
	cfg = cfg.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName = ip.String()
	}
	return tls.Client(c, cfg)
}

var noDeadline time.Time
