package pop3

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/proxy"
)

func TestParseCommand(t *testing.T) {
	tests := []struct {
		line    string
		want    command
		wantErr bool
	}{
		{line: "CAPA", want: command{name: "CAPA"}},
		{line: "capa", want: command{name: "CAPA"}},
		{line: "USER alice", want: command{name: "USER", args: "alice"}},
		{line: "USER ", want: command{name: "USER", args: ""}},
		{line: "PASS my secret  pass ", want: command{name: "PASS", args: "my secret  pass "}},
		{line: "Auth PLAIN =", want: command{name: "AUTH", args: "PLAIN ="}},
		{line: "", wantErr: true},
		{line: " CAPA", wantErr: true},
		{line: "CA1PA", wantErr: true},
		{line: "USER a\x00b", wantErr: true},
		{line: "USER a\rb", wantErr: true},
		{line: strings.Repeat("A", maxKeyword+1), wantErr: true},
		{line: "\xffUSER x", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseCommand([]byte(tt.line))
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseCommand(%q) = %+v, %v; want %+v, err %v", tt.line, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestParsePlain(t *testing.T) {
	tests := []struct {
		msg      string
		user     string
		wantErr  bool
		errorsIs error
	}{
		{msg: "\x00alice\x00secret", user: "alice"},
		{msg: "carol\x00admin\x00pw", user: "carol"},
		{msg: "", wantErr: true, errorsIs: errEmptyPlain},
		{msg: "alice\x00secret", wantErr: true, errorsIs: errBadPlain},
		{msg: "\x00\x00secret", wantErr: true, errorsIs: errBadPlain},
		{msg: "\x00alice\x00", wantErr: true, errorsIs: errBadPlain},
		{msg: "\x00alice\x00sec\x00ret", wantErr: true, errorsIs: errBadPlain},
		{msg: "\x00al\nice\x00secret", wantErr: true, errorsIs: errBadPlain},
	}
	for _, tt := range tests {
		cr, err := parsePlain([]byte(tt.msg))
		if tt.wantErr {
			if !errors.Is(err, tt.errorsIs) {
				t.Errorf("parsePlain(%q) error %v, want %v", tt.msg, err, tt.errorsIs)
			}
			continue
		}
		if err != nil || cr.user != tt.user || string(cr.plain) != tt.msg {
			t.Errorf("parsePlain(%q) = %+v, %v", tt.msg, cr, err)
		}
	}
}

func TestDecodeSASLResponse(t *testing.T) {
	if b, err := decodeSASLResponse("="); err != nil || len(b) != 0 {
		t.Errorf(`"=" = %q, %v; want empty`, b, err)
	}
	if b, err := decodeSASLResponse("AGEAYg=="); err != nil || string(b) != "\x00a\x00b" {
		t.Errorf("decode = %q, %v", b, err)
	}
	for _, bad := range []string{"AGEAYg", "AGE AYg==", "!!!!", "AGEAYg==="} {
		if _, err := decodeSASLResponse(bad); !errors.Is(err, errBadBase64) {
			t.Errorf("decodeSASLResponse(%q) error %v, want errBadBase64", bad, err)
		}
	}
}

func TestCredentialsNeverPrintPassword(t *testing.T) {
	cr := &credentials{user: "alice", pass: "s3cret"}
	var sb strings.Builder
	slog.New(slog.NewTextHandler(&sb, nil)).Info("login", "user", cr)
	out := sb.String() + fmt.Sprint(cr) + fmt.Sprintf("%v %s", cr, cr)
	if strings.Contains(out, "s3cret") || !strings.Contains(out, "alice") {
		t.Errorf("credentials printed as %q", out)
	}
}

func TestLoginFailure(t *testing.T) {
	tests := []struct {
		err    error
		reply  string
		result string
	}{
		{&loginRejected{reply: "-ERR [AUTH] Authentication failed."}, "-ERR [AUTH] Authentication failed.", "rejected"},
		{fmt.Errorf("backend login: %w", &loginRejected{reply: "-ERR [SYS/TEMP] Try later"}), "-ERR [SYS/TEMP] Try later", "rejected"},
		{fmt.Errorf("acquire: %w", proxy.ErrUnavailable), replyUnavailable, "unavailable"},
		{errors.New("dial backend 127.0.0.1:110: connection refused"), replyBackendFailed, "backend failed"},
	}
	for _, tt := range tests {
		reply, _, result := loginFailure(tt.err)
		if reply != tt.reply || result != tt.result {
			t.Errorf("loginFailure(%v) = %q, %q; want %q, %q", tt.err, reply, result, tt.reply, tt.result)
		}
	}
}

func TestSanitize(t *testing.T) {
	if got := sanitize("-ERR a\x00b\x1bc\xff"); got != "-ERR a?b?c?" {
		t.Errorf("sanitize = %q", got)
	}
	long := strings.Repeat("x", 200)
	if got := sanitize(long); got != strings.Repeat("x", 160)+"..." {
		t.Errorf("sanitize(long) = %q", got)
	}
}
