package pop3

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"

	"github.com/usher-mail/usher/internal/sasl"
)

// maxKeyword bounds a command keyword. RFC 1939 section 3 keywords are three
// or four characters; anything longer is unknown anyway, the bound only keeps
// garbage out of log lines.
const maxKeyword = 16

var (
	errSyntax     = errors.New("malformed command")
	errBadBase64  = errors.New("invalid base64")
	errBadPlain   = errors.New("malformed PLAIN message")
	errEmptyPlain = errors.New("empty PLAIN message")
)

// command is one parsed client line.
type command struct {
	name string // the keyword in upper case
	args string // everything after the first space, unmodified (may be "")
}

// parseCommand splits a client line into keyword and arguments.
//
// RFC 1939 section 3: a command is a case-insensitive keyword, possibly
// followed by arguments separated by a single space. USER and PASS take the
// rest of the line as one argument (RFC 1939 section 7 allows spaces in the
// password), so args is kept whole and each command splits it as it needs.
// The keyword must be ASCII letters; NUL, CR and LF are refused anywhere in
// the line because the arguments are replayed to the backend and a NUL would
// corrupt a SASL PLAIN message.
func parseCommand(line []byte) (command, error) {
	name, args, _ := bytes.Cut(line, []byte{' '})
	if len(name) == 0 || len(name) > maxKeyword {
		return command{}, errSyntax
	}
	up := make([]byte, len(name))
	for i, b := range name {
		switch {
		case 'a' <= b && b <= 'z':
			up[i] = b - 'a' + 'A'
		case 'A' <= b && b <= 'Z':
			up[i] = b
		default:
			return command{}, errSyntax
		}
	}
	if bytes.ContainsAny(args, "\x00\r\n") {
		return command{}, errSyntax
	}
	return command{name: string(up), args: string(args)}, nil
}

// credentials is what the client gave to log in. It is replayed to the
// backend exactly once and must never reach a log: LogValue and String
// show the login name only.
type credentials struct {
	user string // the login name used for routing (never the password)

	// USER/PASS (RFC 1939 section 7); empty plain means this form.
	pass string
	// AUTH PLAIN (RFC 5034, RFC 4616): the decoded message, re-encoded when
	// replayed.
	plain []byte
}

func (c *credentials) isPlain() bool { return c.plain != nil }

// LogValue keeps the password out of any log line the credentials reach.
func (c *credentials) LogValue() slog.Value { return slog.StringValue(c.user) }

// String keeps the password out of fmt output.
func (c *credentials) String() string { return c.user }

// decodeSASLResponse decodes one client response of RFC 5034 section 4: "="
// stands for an empty initial response.
func decodeSASLResponse(s string) ([]byte, error) {
	if s == "=" {
		return []byte{}, nil
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, errBadBase64
	}
	return b, nil
}

// parsePlain checks a SASL PLAIN message (RFC 4616 section 2:
// [authzid] NUL authcid NUL passwd) and returns the credentials. The user
// routed on is the authorization identity when one is given (a master user
// logging in as someone else reaches that someone's backend), else the
// authentication identity.
func parsePlain(msg []byte) (*credentials, error) {
	if len(msg) == 0 {
		return nil, errEmptyPlain
	}
	authzid, authcid, _, err := sasl.DecodePlain(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBadPlain, err)
	}
	// The message is replayed as it is; CR or LF would not fit a POP3 line.
	if bytes.ContainsAny(msg, "\r\n") {
		return nil, errBadPlain
	}
	user := authcid
	if authzid != "" {
		user = authzid
	}
	return &credentials{user: user, plain: bytes.Clone(msg)}, nil
}
