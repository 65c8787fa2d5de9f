package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/usher-mail/usher/internal/config"
)

// BackendOptions says how one service reaches its backends.
type BackendOptions struct {
	Port           int            // TCP port on every backend (143, 110, ...)
	TLS            config.TLSMode // none, starttls (done by the protocol) or implicit (done by Dial)
	TLSConfig      *tls.Config    // client config for implicit TLS and STARTTLS
	ConnectTimeout time.Duration  // TCP connect (+ implicit TLS handshake)
	LoginTimeout   time.Duration  // from greeting to the backend's answer to the login
	// SendProxy, "v1" or "v2", sends a PROXY protocol header with the
	// client's address first on every session's backend connection.
	SendProxy string
}

// Addr returns the backend's TCP address for ip.
func (o *BackendOptions) Addr(ip netip.Addr) string {
	return net.JoinHostPort(ip.String(), strconv.Itoa(o.Port))
}

// Dial connects to the backend at ip; with implicit TLS it also completes the
// handshake. With SendProxy it sends a LOCAL PROXY header (no client: health
// probes), so that backends which require the header still answer. The connection is always TCP, whatever listener the client came
// in on.
func (o *BackendOptions) Dial(ctx context.Context, ip netip.Addr) (net.Conn, error) {
	return o.dial(ctx, ip, nil)
}

// DialFor is Dial for a client session: with SendProxy it first sends the
// backend a PROXY header carrying the session's client and local addresses.
func (o *BackendOptions) DialFor(ctx context.Context, ip netip.Addr, s *Session) (net.Conn, error) {
	return o.dial(ctx, ip, s)
}

func (o *BackendOptions) dial(ctx context.Context, ip netip.Addr, s *Session) (net.Conn, error) {
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
	c = wrapConn(c)
	if o.SendProxy != "" {
		if s == nil {
			s = &Session{} // a health probe: a LOCAL header, no client
		}
		if err := writeProxyHeader(ctx, c, o.SendProxy, s); err != nil {
			c.Close()
			return nil, fmt.Errorf("send PROXY header to backend %s: %w", addr, err)
		}
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

// writeProxyHeader writes a PROXY protocol header (v1 or v2) for s to c.
// A session without a client IP (UNIX listener) sends a LOCAL header.
func writeProxyHeader(ctx context.Context, c net.Conn, version string, s *Session) error {
	v := byte(2)
	if version == "v1" {
		v = 1
	}
	var h *proxyproto.Header
	if s.Remote.IsValid() && s.Local.IsValid() && s.Remote.Addr().Is4() == s.Local.Addr().Is4() {
		h = proxyproto.HeaderProxyFromAddrs(v, net.TCPAddrFromAddrPort(s.Remote), net.TCPAddrFromAddrPort(s.Local))
	} else {
		h = &proxyproto.Header{Version: v, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetWriteDeadline(dl)
		defer c.SetWriteDeadline(noDeadline)
	}
	_, err := h.WriteTo(c)
	return err
}
