package sasl

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestDecodePlain(t *testing.T) {
	tests := []struct {
		name, msg                string
		authzid, authcid, passwd string
		err                      error
	}{
		{name: "no authzid", msg: "\x00alice\x00secret", authcid: "alice", passwd: "secret"},
		{name: "authzid", msg: "alice\x00master\x00mpw", authzid: "alice", authcid: "master", passwd: "mpw"},
		{name: "8-bit and spaces kept", msg: "\x00al ice\x00pä ss", authcid: "al ice", passwd: "pä ss"},
		{name: "empty message", msg: "", err: ErrPlainFields},
		{name: "one NUL", msg: "alice\x00secret", err: ErrPlainFields},
		{name: "no NUL", msg: "alicesecret", err: ErrPlainFields},
		{name: "NUL in passwd", msg: "\x00alice\x00sec\x00ret", err: ErrPlainFields},
		{name: "NUL in authcid", msg: "\x00al\x00ice\x00secret", err: ErrPlainFields},
		{name: "empty authcid", msg: "\x00\x00secret", err: ErrPlainEmpty},
		{name: "empty authcid with authzid", msg: "alice\x00\x00secret", err: ErrPlainEmpty},
		{name: "empty passwd", msg: "\x00alice\x00", err: ErrPlainEmpty},
		{name: "only separators", msg: "\x00\x00", err: ErrPlainEmpty},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			z, c, p, err := DecodePlain([]byte(tt.msg))
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("DecodePlain(%q) error %v, want %v", tt.msg, err, tt.err)
				}
				if z != "" || c != "" || p != "" {
					t.Errorf("DecodePlain(%q) returned fields %q %q %q with an error", tt.msg, z, c, p)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Errorf("error %q shows the password", err)
				}
				return
			}
			if err != nil || z != tt.authzid || c != tt.authcid || p != tt.passwd {
				t.Fatalf("DecodePlain(%q) = %q, %q, %q, %v; want %q, %q, %q", tt.msg, z, c, p, err, tt.authzid, tt.authcid, tt.passwd)
			}
			if got := EncodePlain(z, c, p); !bytes.Equal(got, []byte(tt.msg)) {
				t.Errorf("EncodePlain(DecodePlain(%q)) = %q", tt.msg, got)
			}
		})
	}
}

func TestEncodePlain(t *testing.T) {
	if got := string(EncodePlain("", "u", "p")); got != "\x00u\x00p" {
		t.Errorf("EncodePlain without authzid = %q", got)
	}
	if got := string(EncodePlain("z", "u", "p w")); got != "z\x00u\x00p w" {
		t.Errorf("EncodePlain with authzid = %q", got)
	}
}

func TestResponse(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"AGFsaWNlAHNlY3JldA==", "\x00alice\x00secret", true},
		{"AGFsaWNlAHNlY3JldA", "\x00alice\x00secret", true}, // padding omitted
		{"", "", true},
		{"AGFsaWNlAHNlY3JldA=", "", false}, // wrong padding
		{"!!!notbase64", "", false},
		{"AGE=AGE=", "", false},
		{"AGF", "", false}, // non-canonical trailing bits
	} {
		got, err := DecodeResponse(tc.in)
		if (err == nil) != tc.ok || (tc.ok && string(got) != tc.want) {
			t.Errorf("DecodeResponse(%q) = %q, %v; want %q, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	msg := EncodePlain("", "alice", "secret")
	if enc := EncodeResponse(msg); enc != "AGFsaWNlAHNlY3JldA==" {
		t.Errorf("EncodeResponse = %q", enc)
	}
}

func FuzzDecodePlain(f *testing.F) {
	f.Add([]byte("\x00alice\x00secret"))
	f.Add([]byte("z\x00u\x00p"))
	f.Add([]byte("\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		z, c, p, err := DecodePlain(b)
		if err != nil {
			return
		}
		if c == "" || p == "" || strings.ContainsRune(z+c+p, 0) {
			t.Fatalf("DecodePlain(%q) = %q, %q, %q", b, z, c, p)
		}
		if got := EncodePlain(z, c, p); !bytes.Equal(got, b) {
			t.Fatalf("round trip of %q gives %q", b, got)
		}
	})
}

func TestPlainCredentials(t *testing.T) {
	c, err := PlainCredentials([]byte("alice\x00master\x00mpw"))
	if err != nil || *c != (Credentials{Mech: "PLAIN", Authzid: "alice", Authcid: "master", Password: "mpw"}) || c.User() != "alice" {
		t.Fatalf("PlainCredentials = %+v, %v", c, err)
	}
	c, err = PlainCredentials([]byte("\x00bob\x00pw"))
	if err != nil || c.User() != "bob" {
		t.Fatalf("PlainCredentials without authzid = %+v, %v", c, err)
	}
	for _, msg := range []string{"\x00al\x01ice\x00pw", "ev\x7fe\x00bob\x00pw", "\x00\x00pw"} {
		if c, err := PlainCredentials([]byte(msg)); err == nil {
			t.Errorf("PlainCredentials(%q) = %+v, want an error", msg, c)
		}
	}
	if _, err := PlainCredentials([]byte("\x00al\x01ice\x00pw")); !errors.Is(err, ErrInvalidName) {
		t.Errorf("control character in authcid: %v, want ErrInvalidName", err)
	}
}

func TestCredentialsValid(t *testing.T) {
	for _, tc := range []struct {
		c    Credentials
		want bool
	}{
		{Credentials{Authcid: "alice", Password: "pw"}, true},
		{Credentials{Authcid: "al ice@example.org", Password: "pw"}, true},
		{Credentials{Authcid: "alice"}, false},
		{Credentials{Password: "pw"}, false},
		{Credentials{Authcid: "al\tice", Password: "pw"}, false},
		{Credentials{Authcid: "alice", Authzid: "b\nob", Password: "pw"}, false},
		{Credentials{Authcid: "alice", Authzid: "bob", Password: "pw"}, true},
	} {
		if got := tc.c.Valid(); got != tc.want {
			t.Errorf("%+v.Valid() = %v, want %v", tc.c, got, tc.want)
		}
	}
}

func TestCredentialsNeverPrinted(t *testing.T) {
	for _, c := range []*Credentials{
		{Mech: "LOGIN", Authcid: "alice", Password: "hunter2"},
		{Mech: "PLAIN", Authzid: "bob", Authcid: "alice", Password: "hunter2"},
	} {
		for _, s := range []string{c.String(), fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c), c.LogValue().String()} {
			if strings.Contains(s, "hunter2") {
				t.Errorf("password printed: %q", s)
			}
			if !strings.Contains(s, c.Mech+" "+c.User()) {
				t.Errorf("%q does not show mechanism and user", s)
			}
		}
	}
}
