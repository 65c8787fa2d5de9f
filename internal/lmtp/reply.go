package lmtp

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// reply is one SMTP/LMTP reply usher sends to the client. RFC 2034 section 4
// (and RFC 3463 for the codes' meaning): every 2xx, 4xx and 5xx reply other
// than the greeting and the LHLO answer carries an enhanced status code.
type reply struct {
	code int
	enh  string // "2.1.5"; "" for 220, 221 with host, 354 and LHLO
	text string
}

// String renders the reply as one line without CRLF.
func (r reply) String() string {
	var sb strings.Builder
	sb.WriteString(strconv.Itoa(r.code))
	if r.enh != "" {
		sb.WriteByte(' ')
		sb.WriteString(r.enh)
	}
	if r.text != "" {
		sb.WriteByte(' ')
		sb.WriteString(r.text)
	}
	return sb.String()
}

// Replies usher itself sends. The enhanced codes follow RFC 3463 (and
// RFC 5248's registry); the basic codes RFC 5321 section 4.2 and the RFCs
// cited next to each.
var (
	replyOK       = reply{250, "2.0.0", "OK"}
	replySenderOK = reply{250, "2.1.0", "Sender OK"}
	replyRcptOK   = reply{250, "2.1.5", "Recipient OK"}
	replyReset    = reply{250, "2.0.0", "Reset OK"}
	// RFC 5321 section 3.3: 354 has no enhanced code (only 2xx/4xx/5xx do).
	replyStartData = reply{354, "", "Start mail input; end with <CRLF>.<CRLF>"}
	// RFC 5321 section 3.5.3 / 7.3: VRFY may be answered with 252.
	replyVRFY = reply{252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"}
	// RFC 3207 section 4.
	replyTLSReady = reply{220, "2.0.0", "Ready to start TLS"}

	// RFC 2033 section 4.1: LMTP has LHLO instead of HELO and EHLO.
	replyNoHELO      = reply{500, "5.5.1", "LMTP requires LHLO"}
	replyUnknown     = reply{500, "5.5.2", "Command unrecognized"}
	replyNotImpl     = reply{502, "5.5.1", "Command not implemented"}
	replyLineTooLong = reply{500, "5.5.2", "Line too long"}
	replySyntax      = reply{501, "5.5.4", "Syntax error in parameters or arguments"}
	replyLHLOSyntax  = reply{501, "5.5.4", "Syntax: LHLO hostname"}
	replyBadSender   = reply{501, "5.1.7", "Bad sender address syntax"}
	replyBadRcpt     = reply{501, "5.1.3", "Bad recipient address syntax"}
	replyBadBody     = reply{501, "5.5.4", "Unsupported BODY value"}
	// RFC 5321 section 4.1.1.11: parameters not recognized.
	replyUnknownParam = reply{555, "5.5.4", "Unsupported parameter"}
	replyNeedLHLO     = reply{503, "5.5.1", "Send LHLO first"}
	replyNestedMail   = reply{503, "5.5.1", "Sender already given"}
	replyNeedMail     = reply{503, "5.5.1", "MAIL needed first"}
	// RFC 2033 section 4.2: DATA without a successful RCPT fails with 503.
	replyNoRcpts     = reply{503, "5.5.1", "No valid recipients"}
	replyBadSequence = reply{503, "5.5.1", "Bad sequence of commands"}
	// RFC 3030 section 2: after a failed chunk the transaction is dead.
	replyChunkFailed = reply{503, "5.5.1", "Previous data chunk failed, issue RSET first"}
	// RFC 1870 section 6.1 (SIZE over the fixed maximum).
	replyTooBig = reply{552, "5.3.4", "Message size exceeds fixed maximum message size"}
	// RFC 5321 section 4.5.3.1.10: too many recipients is 452.
	replyTooManyRcpts = reply{452, "4.5.3", "Too many recipients"}
	// RFC 6531 section 3.5 / RFC 5248: 5.6.7 non-ASCII address without SMTPUTF8.
	replyNeedUTF8 = reply{553, "5.6.7", "Non-ASCII address requires SMTPUTF8"}
	// An overlong line inside the message (RFC 5321 section 4.5.3.1.6 allows
	// 1000 octets; usher takes up to maxDataLine).
	replyDataLineTooLong = reply{554, "5.6.0", "Message line too long"}
	// The spool could not store the message (RFC 3463 X.3.1).
	replySpoolFailed = reply{452, "4.3.1", "Insufficient system storage"}
	// The Director cannot place the user now: temporary, the MTA retries.
	replyUnavailable = reply{451, "4.4.0", "No backend available, try again later"}
	replyTLSActive   = reply{503, "5.5.1", "TLS already active"}
	replyNoTLS       = reply{502, "5.5.1", "STARTTLS not available"}
	// Bytes pipelined after STARTTLS (CVE-2011-0411 pattern).
	replyTLSPipelined = reply{554, "5.5.1", "STARTTLS must be the last command in a pipelined group"}
)

// closing returns a 421 reply (RFC 5321 section 3.8: the server closes the
// channel), which names the host first.
func closing(host, enh, text string) reply {
	return reply{421, enh, host + " " + text}
}

// Reasons a whole session ends, with the 421 sent for them.
const (
	reasonQuit        = "quit"
	reasonClosed      = "client closed"
	reasonIdle        = "idle timeout"
	reasonShutdown    = "shutdown"
	reasonTooManyBad  = "too many bad commands"
	reasonLineFlood   = "line too long"
	reasonTLSInject   = "starttls injection"
	reasonTLSFailed   = "tls handshake failed"
	reasonWriteFailed = "client write failed"
	reasonReadFailed  = "client read failed"
	reasonBDATSyntax  = "bad BDAT"
)

// endReply maps a session's end reason to its farewell; ok is false when
// nothing is sent (the client is gone).
func endReply(host, reason string) (reply, bool) {
	switch reason {
	case reasonIdle:
		return closing(host, "4.4.2", "Timeout exceeded, closing connection"), true
	case reasonShutdown:
		return closing(host, "4.3.2", "Server shutting down"), true
	case reasonTooManyBad:
		return closing(host, "4.7.0", "Too many bad commands, closing connection"), true
	case reasonLineFlood:
		return closing(host, "4.5.0", "Line too long, closing connection"), true
	}
	return reply{}, false
}

// readEndReason classifies a failed client read.
func readEndReason(shutdown bool, err error) string {
	switch {
	case shutdown:
		return reasonShutdown
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET):
		return reasonClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		return reasonIdle
	}
	return reasonReadFailed
}

// backendFailed is the reply for a recipient whose backend failed at some
// step other than refusing the recipient: always temporary (451 4.4.0, as
// Dovecot's own LMTP proxy answers "Remote server not answering"), so the MTA
// keeps the message and retries. A 250 is only ever relayed from the backend.
func backendFailed(stage string) reply {
	return reply{451, "4.4.0", "Backend delivery failed (" + stage + "), try again later"}
}

// relayReply turns a backend's reply for one recipient into the client's
// reply: the backend's own code, its enhanced code (or class.0.0 when it
// gave none or one of another class, RFC 3463 section 2) and its text,
// sanitized. ok is false for codes that are not a final verdict (not 2xx,
// 4xx or 5xx), which the caller treats as a protocol error.
func relayReply(r smtpReply) (reply, bool) {
	class := r.code / 100
	if class != 2 && class != 4 && class != 5 {
		return reply{}, false
	}
	text := strings.Join(r.lines, " ")
	enh, rest := splitEnhanced(text)
	if enh == "" || int(enh[0]-'0') != class {
		enh = fmt.Sprintf("%d.0.0", class)
	}
	rest = sanitize(rest, maxRelayText)
	if rest == "" {
		rest = "(no text)"
	}
	return reply{r.code, enh, rest}, true
}

// splitEnhanced splits "class.subject.detail text" (RFC 3463 section 2:
// class 2, 4 or 5; subject and detail 1-3 digits) into the code and the
// rest; without a code it returns "" and the text unchanged.
func splitEnhanced(text string) (enh, rest string) {
	code, rest, _ := strings.Cut(text, " ")
	parts := strings.Split(code, ".")
	if len(parts) != 3 || len(parts[0]) != 1 || !strings.Contains("245", parts[0]) {
		return "", text
	}
	for _, p := range parts[1:] {
		if len(p) < 1 || len(p) > 3 {
			return "", text
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return "", text
			}
		}
	}
	return code, strings.TrimLeft(rest, " ")
}

// maxRelayText bounds the text relayed from a backend reply, so the reply
// line stays within RFC 5321 section 4.5.3.1.5's 512 octets.
const maxRelayText = 400

// sanitize makes a peer's text safe for a reply or log line: control bytes
// and non-ASCII become '?', and it is cut at max bytes.
func sanitize(s string, max int) string {
	b := make([]byte, 0, min(len(s), max))
	for i := 0; i < len(s) && len(b) < max; i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f {
			c = '?'
		}
		b = append(b, c)
	}
	return strings.TrimSpace(string(b))
}
