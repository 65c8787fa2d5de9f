// Package sasl holds the SASL pieces usher's front ends share: the PLAIN
// mechanism's message (RFC 4616) and the base64 encoding of client responses
// (RFC 4422 section 3 via each protocol's profile).
//
// Credentials carry a password and never print it.
//
// Invariants: DecodePlain accepts exactly the messages RFC 4616 section 2
// allows structurally (two NUL separators, non-empty authcid and passwd) and
// returns fields that contain no NUL, so EncodePlain of its result gives back
// the same bytes. Neither function keeps or logs what it is given: the
// password is the caller's to protect. UTF-8 validity of the fields is not
// checked; the backend that verifies the password decides.
package sasl

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
)

var (
	// ErrPlainFields reports a PLAIN message without exactly three
	// NUL-separated fields (a NUL inside a field makes more).
	ErrPlainFields = errors.New("PLAIN message needs 3 NUL-separated fields")
	// ErrPlainEmpty reports an empty authcid or passwd.
	ErrPlainEmpty = errors.New("PLAIN message with empty authcid or passwd")
	// ErrInvalidName reports a login name usher cannot route or log.
	ErrInvalidName = errors.New("invalid login name")
)

// DecodePlain splits a PLAIN message (RFC 4616 section 2):
//
//	message = [authzid] UTF8NUL authcid UTF8NUL passwd
//
// authzid may be empty (no authorization identity requested); authcid and
// passwd may not (both are 1*SAFE). The errors name neither field's value.
func DecodePlain(b []byte) (authzid, authcid, passwd string, err error) {
	parts := bytes.Split(b, []byte{0})
	if len(parts) != 3 {
		return "", "", "", fmt.Errorf("decode PLAIN: %w", ErrPlainFields)
	}
	authzid, authcid, passwd = string(parts[0]), string(parts[1]), string(parts[2])
	if authcid == "" || passwd == "" {
		return "", "", "", fmt.Errorf("decode PLAIN: %w", ErrPlainEmpty)
	}
	return authzid, authcid, passwd, nil
}

// EncodePlain builds the PLAIN message for the three fields (RFC 4616
// section 2), an empty authzid for none. The fields must not contain NUL;
// values returned by DecodePlain never do.
func EncodePlain(authzid, authcid, passwd string) []byte {
	b := make([]byte, 0, len(authzid)+len(authcid)+len(passwd)+2)
	b = append(b, authzid...)
	b = append(b, 0)
	b = append(b, authcid...)
	b = append(b, 0)
	return append(b, passwd...)
}

// DecodeResponse decodes a base64 client response (RFC 4648 section 4) as
// IMAP (RFC 9051 section 6.2.2) and ManageSieve (RFC 5804 section 2.1) carry
// it. Padding is optional because some clients omit it; anything else that
// is not canonical base64 is an error.
func DecodeResponse(s string) ([]byte, error) {
	enc := base64.StdEncoding
	if len(s)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	b, err := enc.Strict().DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("decode SASL response: %w", err)
	}
	return b, nil
}

// EncodeResponse encodes a client response in base64 with padding (RFC 4648
// section 4), as sent to backends.
func EncodeResponse(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// Credentials are what a client gave to log in, to be replayed to its
// backend. They must never reach a log: String, GoString and LogValue show
// the mechanism and the user, never the password.
type Credentials struct {
	Mech     string // "PLAIN", or a protocol's own login command ("LOGIN")
	Authzid  string // the identity to act as (PLAIN only); "" for none
	Authcid  string // the identity whose password this is
	Password string
}

// User is the login name the backend is chosen for: the authorization
// identity when one is given (a master user logging in as someone), else the
// authentication identity (RFC 4616 section 2).
func (c *Credentials) User() string {
	if c.Authzid != "" {
		return c.Authzid
	}
	return c.Authcid
}

func (c *Credentials) String() string       { return c.Mech + " " + c.User() + " <password hidden>" }
func (c *Credentials) GoString() string     { return c.String() }
func (c *Credentials) LogValue() slog.Value { return slog.StringValue(c.String()) }

// Valid reports whether c can be used for a login: a routable authcid, a
// routable authzid when one is given, and a password.
func (c *Credentials) Valid() bool {
	return ValidName(c.Authcid) && c.Password != "" && (c.Authzid == "" || ValidName(c.Authzid))
}

// ValidName reports whether u can be routed and logged sanely as a login
// name: not empty, without control characters.
func ValidName(u string) bool {
	if u == "" {
		return false
	}
	for i := 0; i < len(u); i++ {
		if u[i] < ' ' || u[i] == 0x7f {
			return false
		}
	}
	return true
}

// PlainCredentials decodes a PLAIN message (DecodePlain) into Credentials
// with Mech "PLAIN" and checks them (Valid).
func PlainCredentials(msg []byte) (*Credentials, error) {
	authzid, authcid, passwd, err := DecodePlain(msg)
	if err != nil {
		return nil, err
	}
	c := &Credentials{Mech: "PLAIN", Authzid: authzid, Authcid: authcid, Password: passwd}
	if !c.Valid() {
		return nil, fmt.Errorf("decode PLAIN: %w", ErrInvalidName)
	}
	return c, nil
}
