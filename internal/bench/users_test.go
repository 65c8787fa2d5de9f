package bench

import (
	"strings"
	"testing"
)

func TestParseUsers(t *testing.T) {
	for _, c := range []struct {
		tmpl, rng string
		want      []string
		str       string
	}{
		{"user%d@example.com", "1-3", []string{"user1@example.com", "user2@example.com", "user3@example.com"}, "user%d@example.com 1-3"},
		{"u%03d", "8-10", []string{"u008", "u009", "u010"}, "u%03d 8-10"},
		{"%d", "7", []string{"7"}, "%d 7-7"},
		{"fixed@example.com", "", []string{"fixed@example.com"}, "fixed@example.com"},
	} {
		u, err := ParseUsers(c.tmpl, c.rng)
		if err != nil {
			t.Fatalf("%q %q: %v", c.tmpl, c.rng, err)
		}
		if u.Len() != len(c.want) || u.String() != c.str {
			t.Errorf("%q %q: len %d %q", c.tmpl, c.rng, u.Len(), u.String())
		}
		for i, w := range c.want {
			if got := u.User(i); got != w {
				t.Errorf("%q: user %d = %q, want %q", c.tmpl, i, got, w)
			}
		}
		// Indexes wrap around.
		if got := u.User(len(c.want)); got != c.want[0] {
			t.Errorf("%q: wrap: %q", c.tmpl, got)
		}
	}
	for _, c := range []struct{ tmpl, rng, want string }{
		{"", "", "empty"},
		{"user%s", "1-2", "only verb"},
		{"u%d%d", "1-2", "more than one"},
		{"user%d", "", "needs a range"},
		{"user%d", "5-1", "empty"},
		{"user%d", "a-b", "low bound"},
		{"user%d", "1-x", "high bound"},
		{"user%d", "0-99999999", "more than"},
		{"fixed", "1-2", "no %d"},
		{"us er%d", "1-2", "no spaces"},
		{"u%0d", "1-2", "zero padding"},
	} {
		_, err := ParseUsers(c.tmpl, c.rng)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q %q: err %v, want %q", c.tmpl, c.rng, err, c.want)
		}
	}
}

func TestUserPicker(t *testing.T) {
	u, _ := ParseUsers("u%d", "1-3")
	p := &userPicker{users: u}
	var got []string
	for range 7 {
		got = append(got, p.pick())
	}
	if strings.Join(got, " ") != "u1 u2 u3 u1 u2 u3 u1" {
		t.Errorf("round robin: %v", got)
	}
	r := &userPicker{users: u, random: true}
	seen := map[string]bool{}
	for range 200 {
		seen[r.pick()] = true
	}
	if len(seen) != 3 {
		t.Errorf("random picked %v", seen)
	}
}

func TestTargets(t *testing.T) {
	list := []string{"127.0.1.1:143", "127.0.1.2:143", "127.0.1.3:143"}
	tg, err := NewTargets(list, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tg.Mode() != "direct" {
		t.Errorf("mode %s", tg.Mode())
	}
	u, _ := ParseUsers("user%d@example.com", "1-300")
	count := map[string]int{}
	for i := range u.Len() {
		user := u.User(i)
		got, err := tg.For(user)
		if err != nil {
			t.Fatal(err)
		}
		if want := list[fnv1a64(user)%3]; got != want {
			t.Fatalf("%s -> %s, want %s", user, got, want)
		}
		again, _ := tg.For(user)
		if again != got {
			t.Fatalf("%s not stable", user)
		}
		count[got]++
	}
	for _, tgt := range list {
		if count[tgt] < 60 { // 100 expected each
			t.Errorf("uneven spread: %v", count)
		}
	}
	// FNV-1a 64 known answer ("a" from the reference test vectors).
	if fnv1a64("a") != 0xaf63dc4c8601ec8c {
		t.Errorf("fnv1a64(a) = %x", fnv1a64("a"))
	}

	m, err := ParseTargetMap(strings.NewReader("# comment\n\nuser1@example.com 127.0.1.9:143\n  user2@example.com   /run/lmtp.sock \n"))
	if err != nil {
		t.Fatal(err)
	}
	tm, err := NewTargets(list[:1], m)
	if err != nil {
		t.Fatal(err)
	}
	for user, want := range map[string]string{
		"user1@example.com": "127.0.1.9:143",
		"user2@example.com": "/run/lmtp.sock",
		"user3@example.com": list[0], // not in the map: hashed over the list
	} {
		if got, _ := tm.For(user); got != want {
			t.Errorf("map: %s -> %s, want %s", user, got, want)
		}
	}
	if tm.Mode() != "map" || strings.Join(tm.All(), " ") != "127.0.1.1:143 /run/lmtp.sock 127.0.1.9:143" {
		t.Errorf("mode %s all %v", tm.Mode(), tm.All())
	}
	only, _ := NewTargets(nil, m)
	if _, err := only.For("user3@example.com"); err == nil {
		t.Error("user missing from a map without a list: no error")
	}
	if err := only.covers(u); err == nil {
		t.Error("covers: no error for users missing from the map")
	}

	for _, bad := range []string{"a b c\n", "u1 nohostport\n", "u1 h:1\nu1 h:2\n", "justone\n"} {
		if _, err := ParseTargetMap(strings.NewReader(bad)); err == nil {
			t.Errorf("map %q: no error", bad)
		}
	}
	if _, err := ParseTargetMap(strings.NewReader(strings.Repeat("x", maxMapLine+1) + " h:1\n")); err == nil {
		t.Error("overlong map line: no error")
	}
	if _, err := NewTargets(nil, nil); err == nil {
		t.Error("no targets: no error")
	}
	if _, err := NewTargets([]string{"nohostport"}, nil); err == nil {
		t.Error("bad target: no error")
	}
}

func TestDefaultPortAndSize(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1":       "127.0.0.1:143",
		"127.0.0.1:10143": "127.0.0.1:10143",
		"[::1]":           "[::1]:143",
		"localhost":       "localhost:143",
		"/run/x.sock":     "/run/x.sock",
	} {
		if got := withDefaultPort(in, "143"); got != want {
			t.Errorf("withDefaultPort(%q) = %q, want %q", in, got, want)
		}
	}
	if defaultPort("login", "pop3", true) != "995" || defaultPort("lmtp", "", false) != "24" || defaultPort("fetch", "", true) != "993" {
		t.Error("default ports")
	}
	for in, want := range map[string]int{"512": 512, "10k": 10240, "10KiB": 10240, "1MiB": 1 << 20, "2MB": 2 << 20, "1G": 1 << 30, "7b": 7} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "1T", "9999999G"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q): no error", bad)
		}
	}
}
