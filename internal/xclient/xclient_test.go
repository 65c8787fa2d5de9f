package xclient

import (
	"net/netip"
	"strings"
	"testing"
)

func TestFor(t *testing.T) {
	tests := []struct {
		remote, id          string
		addr, port, session string
	}{
		{"192.0.2.7:40000", "abc", "192.0.2.7", "40000", "abc"},
		{"[2001:db8::1]:110", "abc", "2001:db8::1", "110", "abc"},
		{"[::ffff:192.0.2.7]:1", "abc", "192.0.2.7", "1", "abc"},
		{"[fe80::1%eth0]:1", "abc", "fe80::1", "1", "abc"},
		{"192.0.2.7:0", "abc", "192.0.2.7", "", "abc"},
		{"192.0.2.7:1", "has space", "192.0.2.7", "1", ""},
		{"192.0.2.7:1", "tab\tid", "192.0.2.7", "1", ""},
		{"192.0.2.7:1", "del\x7f", "192.0.2.7", "1", ""},
		{"192.0.2.7:1", "é", "192.0.2.7", "1", ""},
		{"192.0.2.7:1", strings.Repeat("x", MaxSessionID), "192.0.2.7", "1", strings.Repeat("x", MaxSessionID)},
		{"192.0.2.7:1", strings.Repeat("x", MaxSessionID+1), "192.0.2.7", "1", ""},
		{"", "abc", "", "", "abc"}, // UNIX socket: no address
		{"", "", "", "", ""},
	}
	for _, tt := range tests {
		var remote netip.AddrPort
		if tt.remote != "" {
			remote = netip.MustParseAddrPort(tt.remote)
		}
		a := For(remote, tt.id, Printable)
		if a.Addr != (Attr{"ADDR", tt.addr}) || a.Port != (Attr{"PORT", tt.port}) ||
			a.Session != (Attr{"SESSION", tt.session}) || a.TTL != (Attr{"TTL", "4"}) {
			t.Errorf("For(%s, %q) = %+v", tt.remote, tt.id, a)
		}
	}
}

func TestForIDChar(t *testing.T) {
	// ManageSieve takes a session ID only as an atom: the caller says so.
	atom := func(c byte) bool { return Printable(c) && !strings.ContainsRune(`(){"\`, rune(c)) }
	remote := netip.MustParseAddrPort("192.0.2.1:1")
	if got := For(remote, `a"b`, atom).Session.Value; got != "" {
		t.Errorf("atom rule kept %q", got)
	}
	if got := For(remote, `a"b`, Printable).Session.Value; got != `a"b` {
		t.Errorf("printable rule dropped the ID, got %q", got)
	}
}

func TestLine(t *testing.T) {
	a := For(netip.MustParseAddrPort("192.0.2.7:40000"), "sid", Printable)
	if got, want := Line([]Attr{a.Addr, a.Port, a.Session, a.TTL}, nil), "XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=sid TTL=4"; got != want {
		t.Errorf("Line = %q, want %q", got, want)
	}
	// Order is the caller's; empty values are left out; values are encoded.
	helo := Attr{"HELO", "a b"}
	if got, want := Line([]Attr{helo, a.TTL, {Name: "PORT"}, a.Addr}, Xtext), "XCLIENT HELO=a+20b TTL=4 ADDR=192.0.2.7"; got != want {
		t.Errorf("Line = %q, want %q", got, want)
	}
	if got := Line([]Attr{{Name: "ADDR"}, {Name: "HELO"}}, nil); got != "" {
		t.Errorf("Line without values = %q, want empty", got)
	}
	if got := Line(nil, Xtext); got != "" {
		t.Errorf("Line(nil) = %q, want empty", got)
	}
}

func TestXtext(t *testing.T) {
	if got, want := Xtext("a+b=c d\x01é"), "a+2Bb+3Dc+20d+01+C3+A9"; got != want {
		t.Errorf("Xtext = %q, want %q", got, want)
	}
	if got := Xtext("!~"); got != "!~" {
		t.Errorf("Xtext kept range = %q", got)
	}
}
