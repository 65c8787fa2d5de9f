// Package xclient builds the XCLIENT command usher sends to a backend before
// a login or delivery, so the backend logs and rate-limits the real client
// instead of usher and ties its log lines to usher's session ID (Postfix
// XCLIENT_README; Dovecot's login proxies and LMTP client).
//
// The attribute values describing a session are the same for every
// protocol; what differs between Dovecot's servers is made explicit by the
// caller: which attributes are sent and in what order, how values are
// encoded (bare for pop3-login and managesieve-login, xtext for LMTP) and
// which octets a session ID may hold (ManageSieve parses its arguments as
// atoms).
//
// Invariants: a value is never sent with a zone, an IPv4-mapped IPv6 address
// is sent as IPv4, a session ID that Dovecot would ignore or that could not
// be parsed back is left out, and an attribute without a value is never sent.
package xclient

import (
	"net/netip"
	"strconv"
	"strings"
)

const (
	// ProxyTTL is the hop budget a proxied connection starts with: Dovecot's
	// LOGIN_PROXY_TTL and LMTP_PROXY_DEFAULT_TTL are both 5. Like Dovecot's
	// proxies, usher sends one less, so proxies pointing at each other give
	// up after a few hops instead of looping.
	ProxyTTL = 5
	// MaxSessionID is Dovecot's LOGIN_MAX_SESSION_ID_LEN; longer IDs are
	// ignored by XCLIENT, so usher leaves them out.
	MaxSessionID = 64
)

// Attr is one XCLIENT attribute, sent as NAME=value; an empty Value means
// the attribute is absent.
type Attr struct {
	Name  string
	Value string
}

// Attrs are the attributes describing one client connection.
type Attrs struct {
	Addr    Attr // ADDR: the client's address, bare (no zone, IPv4-mapped as IPv4)
	Port    Attr // PORT: the client's port, when the address is known
	Session Attr // SESSION: usher's session ID, when it may be sent
	TTL     Attr // TTL: ProxyTTL-1
}

// Printable reports whether c is printable ASCII other than space: what
// pop3-login and LMTP take in an attribute value.
func Printable(c byte) bool { return c > ' ' && c < 0x7f }

// For returns the attributes for a client at remote (invalid for a client
// on a UNIX socket: no ADDR and PORT) in session sessionID. idChar reports
// the octets the backend accepts in a SESSION value; an ID with another
// octet, or longer than MaxSessionID, is left out.
func For(remote netip.AddrPort, sessionID string, idChar func(byte) bool) Attrs {
	a := Attrs{
		Addr:    Attr{Name: "ADDR"},
		Port:    Attr{Name: "PORT"},
		Session: Attr{Name: "SESSION"},
		TTL:     Attr{Name: "TTL", Value: strconv.Itoa(ProxyTTL - 1)},
	}
	if remote.IsValid() {
		// Dovecot parses ADDR with net_addr2ip: a bare address, no zone,
		// IPv4-mapped IPv6 shown as IPv4.
		a.Addr.Value = remote.Addr().Unmap().WithZone("").String()
		if p := remote.Port(); p != 0 {
			a.Port.Value = strconv.Itoa(int(p))
		}
	}
	if validID(sessionID, idChar) {
		a.Session.Value = sessionID
	}
	return a
}

func validID(id string, idChar func(byte) bool) bool {
	if id == "" || len(id) > MaxSessionID {
		return false
	}
	for i := 0; i < len(id); i++ {
		if !idChar(id[i]) {
			return false
		}
	}
	return true
}

// Line renders the XCLIENT command (without CRLF) with the attributes that
// have a value, in the order given, each value passed through encode (nil
// sends values as they are). It returns "" when no attribute has a value.
func Line(attrs []Attr, encode func(string) string) string {
	var sb strings.Builder
	for _, a := range attrs {
		if a.Value == "" {
			continue
		}
		if sb.Len() == 0 {
			sb.WriteString("XCLIENT")
		}
		v := a.Value
		if encode != nil {
			v = encode(v)
		}
		sb.WriteString(" ")
		sb.WriteString(a.Name)
		sb.WriteString("=")
		sb.WriteString(v)
	}
	return sb.String()
}

// Xtext encodes s as RFC 3461 section 4 xtext, the form of SMTP and LMTP
// XCLIENT values (Postfix XCLIENT_README; Dovecot smtp_xtext_parse): "+",
// "=" and octets outside "!".."~" become "+" and two upper-case hex digits.
func Xtext(s string) string {
	const hex = "0123456789ABCDEF"
	var sb strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= '!' && c <= '~' && c != '+' && c != '=' {
			sb.WriteByte(c)
			continue
		}
		sb.WriteByte('+')
		sb.WriteByte(hex[c>>4])
		sb.WriteByte(hex[c&15])
	}
	return sb.String()
}
