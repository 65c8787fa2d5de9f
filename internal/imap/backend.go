package imap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/sasl"
	"github.com/usher-mail/usher/internal/wire"
)

// The backend side of a login: usher acts as an IMAP client toward the
// user's backend, from its greeting to the tagged answer to the login.

const (
	// backendMaxLine caps one backend line before login; a CAPABILITY
	// line of a server with many extensions stays far below it.
	backendMaxLine = 64 << 10
	// backendMaxResponse caps one backend response with its literals.
	backendMaxResponse = 256 << 10
	// literalMinusMax is the largest non-synchronizing literal allowed by
	// LITERAL- (RFC 7888 section 5).
	literalMinusMax = 4096
)

var errBackendProtocol = errors.New("backend protocol error")

// backend is usher's client connection to one backend during login.
type backend struct {
	conn net.Conn
	tcp  net.Conn // the TCP connection under any TLS layer
	r    *wire.Reader
	caps map[string]bool // upper case; nil when unknown
	seq  int
}

// response is one backend response.
type response struct {
	tag    string // "*" (untagged), "+" (continuation request) or a tag
	status string // upper-cased first word after the tag: OK, NO, BAD, BYE, CAPABILITY, ...
	rest   []byte // the first line after the tag, from the space on
	raw    []byte // the whole response, literals included, without the final CRLF
}

func (b *backend) nextTag() string {
	b.seq++
	return "U" + strconv.Itoa(b.seq)
}

func (b *backend) close() { b.conn.Close() }

// logout ends a connection whose login was refused, politely but without
// waiting for the answer.
func (b *backend) logout() {
	_, _ = b.conn.Write([]byte(b.nextTag() + " LOGOUT\r\n"))
	b.conn.Close()
}

func (b *backend) send(p []byte) error {
	if _, err := b.conn.Write(p); err != nil {
		return fmt.Errorf("write to backend: %w", err)
	}
	return nil
}

// read reads one response. Untagged data may carry literals (RFC 9051
// section 4.3); they are read into raw within backendMaxResponse.
func (b *backend) read() (*response, error) {
	line, err := b.r.ReadLine()
	if err != nil {
		return nil, fmt.Errorf("read from backend: %w", err)
	}
	first := bytes.Clone(line)
	raw := first
	tag, rest, _ := bytes.Cut(first, []byte{' '})
	resp := &response{tag: string(tag), rest: first[len(tag):]}
	if len(tag) == 0 {
		return nil, fmt.Errorf("%w: response without tag", errBackendProtocol)
	}
	word, _, _ := bytes.Cut(rest, []byte{' '})
	resp.status = wire.UpperASCII(string(word))
	if resp.tag == "*" {
		for {
			_, n, _, ok := wire.LiteralHeader(line)
			if !ok {
				break
			}
			if n > int64(backendMaxResponse-len(raw)) {
				return nil, fmt.Errorf("%w: response too long", errBackendProtocol)
			}
			lit, err := b.r.ReadLiteral(int(n))
			if err != nil {
				return nil, fmt.Errorf("read from backend: %w", err)
			}
			if line, err = b.r.ReadLine(); err != nil {
				return nil, fmt.Errorf("read from backend: %w", err)
			}
			raw = append(append(append(raw[:len(raw):len(raw)], "\r\n"...), lit...), line...)
		}
	}
	resp.raw = raw
	return resp, nil
}

// noteCapabilities records capabilities from an untagged CAPABILITY response
// or a [CAPABILITY ...] response code (RFC 9051 sections 7.2.2 and 7.1).
func (b *backend) noteCapabilities(r *response) {
	var list string
	rest := strings.TrimPrefix(string(r.rest), " ")
	switch {
	case r.tag == "*" && r.status == "CAPABILITY":
		list = rest[len("CAPABILITY"):]
	case r.status == "OK":
		code := strings.TrimPrefix(rest[2:], " ")
		if len(code) < len("[CAPABILITY ") || wire.UpperASCII(code[:len("[CAPABILITY ")]) != "[CAPABILITY " {
			return
		}
		end := strings.IndexByte(code, ']')
		if end < 0 {
			return
		}
		list = code[len("[CAPABILITY "):end]
	default:
		return
	}
	b.caps = map[string]bool{}
	for _, c := range strings.Fields(list) {
		b.caps[wire.UpperASCII(c)] = true
	}
}

// await reads responses up to the tagged one for tag and returns it.
// Untagged responses are passed to untagged (nil ignores them); a
// continuation request calls cont (nil makes it a protocol error). An
// untagged BYE means the backend is going away.
func (b *backend) await(tag string, untagged func(*response) error, cont func() error) (*response, error) {
	for {
		r, err := b.read()
		if err != nil {
			return nil, err
		}
		switch {
		case r.tag == "*":
			if r.status == "BYE" {
				return nil, fmt.Errorf("%w: backend said%s", errBackendProtocol, truncate(r.rest, 200))
			}
			b.noteCapabilities(r)
			if untagged != nil {
				if err := untagged(r); err != nil {
					return nil, err
				}
			}
		case r.tag == "+":
			if cont == nil {
				return nil, fmt.Errorf("%w: unexpected continuation request", errBackendProtocol)
			}
			if err := cont(); err != nil {
				return nil, err
			}
		case r.tag == tag:
			switch r.status {
			case "OK", "NO", "BAD":
			default:
				return nil, fmt.Errorf("%w: invalid tagged status %.20q", errBackendProtocol, r.status)
			}
			if r.status == "OK" {
				b.noteCapabilities(r)
			}
			return r, nil
		default:
			return nil, fmt.Errorf("%w: unexpected tag %.20q", errBackendProtocol, r.tag)
		}
	}
}

// simple runs a command without arguments that must succeed.
func (b *backend) simple(name string) error {
	tag := b.nextTag()
	if err := b.send([]byte(tag + " " + name + "\r\n")); err != nil {
		return err
	}
	r, err := b.await(tag, nil, nil)
	if err != nil {
		return err
	}
	if r.status != "OK" {
		return fmt.Errorf("%w: %s answered%s", errBackendProtocol, name, truncate(r.rest, 200))
	}
	return nil
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return strings.ToValidUTF8(string(b), "?")
}

// backendLogin connects to the lease's backend and replays the login of
// clientTag's command there. It returns the backend's tagged answer; an error
// means the backend could not be used (unreachable, timeout, protocol error).
func (c *client) backendLogin(ctx context.Context, clientTag string, lease *proxy.Lease, cr *sasl.Credentials) (*backend, *response, error) {
	o := &c.srv.o.Backend
	conn, err := o.DialFor(ctx, lease.Backend, c.sess)
	if err != nil {
		return nil, nil, err
	}
	b := &backend{conn: conn, tcp: conn}
	done := false
	defer func() {
		if !done {
			b.close()
		}
	}()
	// One deadline for the whole exchange, from greeting to login answer;
	// it also covers the writes. The TLS layer below shares it.
	if err := conn.SetDeadline(time.Now().Add(o.LoginTimeout)); err != nil {
		return nil, nil, fmt.Errorf("set backend deadline: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(wire.PastDeadline()) })
	defer stop()
	b.r = wire.NewReader(conn, 0, backendMaxLine)

	greeting, err := b.read()
	if err != nil {
		return nil, nil, fmt.Errorf("backend greeting: %w", err)
	}
	if greeting.tag != "*" || greeting.status != "OK" {
		// PREAUTH would log usher in as someone; BYE means refused.
		return nil, nil, fmt.Errorf("%w: greeting%s", errBackendProtocol, truncate(greeting.rest, 200))
	}
	b.noteCapabilities(greeting)

	if o.TLS == config.TLSStartTLS {
		if err := b.simple("STARTTLS"); err != nil {
			return nil, nil, fmt.Errorf("backend STARTTLS: %w", err)
		}
		// The backend must not have sent anything behind its OK: it would
		// be taken as sent over TLS (CVE-2011-0411 pattern, reversed).
		if b.r.Buffered() > 0 {
			return nil, nil, fmt.Errorf("%w: data after STARTTLS answer", errBackendProtocol)
		}
		tc := o.ClientTLS(conn, lease.Backend)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, nil, fmt.Errorf("backend TLS handshake: %w", err)
		}
		b.conn = tc
		b.r = wire.NewReader(tc, 0, backendMaxLine)
		b.caps = nil // RFC 9051 section 6.2.1: forget capabilities learned before TLS
	}
	if b.caps == nil {
		if err := b.simple("CAPABILITY"); err != nil {
			return nil, nil, fmt.Errorf("backend CAPABILITY: %w", err)
		}
		if b.caps == nil {
			return nil, nil, fmt.Errorf("%w: no CAPABILITY response", errBackendProtocol)
		}
	}
	if b.caps["LOGINDISABLED"] {
		// RFC 9051 section 6.2.3. Configuration problem: the backend wants
		// TLS (or trust in usher's address) before plaintext logins.
		return nil, nil, fmt.Errorf("%w: backend advertises LOGINDISABLED", errBackendProtocol)
	}
	// RFC 2971 ID tells the backend who the client is. It goes out in one
	// write with the login (pipelining, RFC 9051 section 5.5: the two are
	// independent), which saves a round trip per login, as Dovecot's own
	// proxy does.
	var id []byte
	idTag := ""
	if b.caps["ID"] {
		idTag = b.nextTag()
		id = c.idCommand(idTag)
	}
	final, err := c.replayLogin(b, cr, id, idTag)
	if err != nil {
		return nil, nil, err
	}
	// The caller splices the connection (OK) or logs out politely (NO/BAD).
	done = true
	return b, final, nil
}

// idCommand builds the ID command telling the backend who the client is
// (the x-* fields of Dovecot's login proxy), followed by the client's own ID
// parameters.
func (c *client) idCommand(tag string) []byte {
	s := c.sess
	var params []idParam
	// A client on a UNIX socket has no address to forward.
	if s.Remote.IsValid() {
		params = append(params,
			idParam{key: "x-originating-ip", value: ptr(s.Remote.Addr().Unmap().String())},
			idParam{key: "x-originating-port", value: ptr(strconv.Itoa(int(s.Remote.Port())))})
	}
	if s.Local.IsValid() {
		params = append(params,
			idParam{key: "x-connected-ip", value: ptr(s.Local.Addr().Unmap().String())},
			idParam{key: "x-connected-port", value: ptr(strconv.Itoa(int(s.Local.Port())))})
	}
	params = append(params, idParam{key: "x-session-id", value: ptr(s.ID)})
	params = append(params, c.clientID...)
	b := []byte(tag + " ID (")
	for i, p := range params {
		if i > 0 {
			b = append(b, ' ')
		}
		b = wire.AppendQuoted(b, p.key)
		b = append(b, ' ')
		if p.value == nil {
			b = append(b, "NIL"...)
		} else {
			b = wire.AppendQuoted(b, *p.value)
		}
	}
	return append(b, ")\r\n"...)
}

func ptr(s string) *string { return &s }

// replayLogin sends the client's login to the backend and returns the
// backend's tagged answer. Untagged responses are relayed to the client as
// they are (except BYE, which await turns into an error).
//
// id, when not empty, is an ID command tagged idTag sent in the same write;
// its answer is informational (a NO is not fatal) and is read first.
func (c *client) replayLogin(b *backend, cr *sasl.Credentials, id []byte, idTag string) (*response, error) {
	tag := b.nextTag()
	pieces := loginPieces(tag, cr, b.caps)
	relay := func(r *response) error {
		return c.write(append(r.raw[:len(r.raw):len(r.raw)], "\r\n"...))
	}
	if err := b.send(append(id, pieces[0]...)); err != nil {
		return nil, err
	}
	if len(id) > 0 {
		if _, err := b.await(idTag, nil, nil); err != nil {
			return nil, fmt.Errorf("backend ID: %w", err)
		}
		// The login's answer comes after authentication: do not let it
		// wait for a delayed ACK of the ID answer (see proxy.AckNow).
		proxy.AckNow(b.tcp)
	}
	for _, p := range pieces[1:] {
		// Wait for the continuation request (synchronizing literal, or the
		// empty challenge of AUTHENTICATE without SASL-IR); a tagged answer
		// now is a refusal.
		var gotCont bool
		final, err := b.await(tag, relay, func() error {
			gotCont = true
			return errContinue
		})
		if errors.Is(err, errContinue) && gotCont {
			if err := b.send(p); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		return final, nil
	}
	return b.await(tag, relay, nil)
}

// errContinue stops await at a continuation request.
var errContinue = errors.New("continuation request")

// loginPieces encodes the login command for the backend. Each piece after
// the first is sent after a continuation request from the backend.
func loginPieces(tag string, cr *sasl.Credentials, caps map[string]bool) [][]byte {
	var pieces [][]byte
	if cr.Mech == "PLAIN" {
		// RFC 4616 section 2 message, base64 (RFC 9051 section 6.2.2).
		enc := sasl.EncodeResponse(sasl.EncodePlain(cr.Authzid, cr.Authcid, cr.Password))
		if caps["SASL-IR"] { // RFC 4959
			return [][]byte{[]byte(tag + " AUTHENTICATE PLAIN " + enc + "\r\n")}
		}
		return [][]byte{[]byte(tag + " AUTHENTICATE PLAIN\r\n"), []byte(enc + "\r\n")}
	}
	cur := []byte(tag + " LOGIN ")
	for i, s := range []string{cr.Authcid, cr.Password} {
		if i > 0 {
			cur = append(cur, ' ')
		}
		switch {
		case quotable(s):
			cur = wire.AppendQuoted(cur, s)
		case caps["LITERAL+"] || (caps["LITERAL-"] && len(s) <= literalMinusMax):
			// RFC 7888: non-synchronizing literal, no round trip.
			cur = wire.AppendLiteralHeader(cur, len(s), true)
			cur = append(cur, s...)
		default:
			// RFC 9051 section 4.3: synchronizing literal.
			cur = wire.AppendLiteralHeader(cur, len(s), false)
			pieces = append(pieces, cur)
			cur = []byte(s)
		}
	}
	return append(pieces, append(cur, "\r\n"...))
}
