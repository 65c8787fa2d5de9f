package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
)

// maxUsers bounds a user range, so a typo cannot allocate per-user state for
// billions of users.
const maxUsers = 10_000_000

// UserSet is the list of user names a run logs in as: a template with one
// %d (or %0Nd, zero-padded to N digits) expanded over an inclusive range,
// or a single fixed name when the template has no verb.
type UserSet struct {
	prefix, suffix string
	width          int // zero padding of %0Nd; 0 for %d
	lo, n          int // first number and how many
	fixed          bool
}

// ParseUsers parses --users TEMPLATE and --user-range LO-HI (or a single
// number N, meaning N-N). A template without a verb is one fixed user and
// the range must be empty; "%%" is not supported (user names do not need it).
func ParseUsers(template, rng string) (UserSet, error) {
	if template == "" {
		return UserSet{}, errors.New("parse users: empty template")
	}
	if strings.ContainsAny(template, "\r\n\x00\"\\ ") {
		return UserSet{}, fmt.Errorf("parse users: template %q: no spaces, quotes, backslashes or control characters", template)
	}
	i := strings.IndexByte(template, '%')
	if i < 0 {
		if rng != "" {
			return UserSet{}, fmt.Errorf("parse users: template %q has no %%d but a range %q was given", template, rng)
		}
		return UserSet{prefix: template, n: 1, fixed: true}, nil
	}
	j := i + 1
	width := 0
	if j < len(template) && template[j] == '0' {
		k := j + 1
		for k < len(template) && template[k] >= '0' && template[k] <= '9' {
			k++
		}
		w, err := strconv.Atoi(template[j+1 : k])
		if err != nil || w < 1 || w > 20 {
			return UserSet{}, fmt.Errorf("parse users: template %q: bad zero padding", template)
		}
		width, j = w, k
	}
	if j >= len(template) || template[j] != 'd' {
		return UserSet{}, fmt.Errorf("parse users: template %q: the only verb allowed is %%d or %%0Nd", template)
	}
	u := UserSet{prefix: template[:i], suffix: template[j+1:], width: width}
	if strings.IndexByte(u.suffix, '%') >= 0 {
		return UserSet{}, fmt.Errorf("parse users: template %q: more than one verb", template)
	}
	if rng == "" {
		return UserSet{}, fmt.Errorf("parse users: template %q needs a range (--user-range LO-HI)", template)
	}
	loS, hiS, isRange := strings.Cut(rng, "-")
	lo, err := strconv.Atoi(strings.TrimSpace(loS))
	if err != nil || lo < 0 {
		return UserSet{}, fmt.Errorf("parse users: range %q: bad low bound", rng)
	}
	hi := lo
	if isRange {
		if hi, err = strconv.Atoi(strings.TrimSpace(hiS)); err != nil {
			return UserSet{}, fmt.Errorf("parse users: range %q: bad high bound", rng)
		}
	}
	if hi < lo {
		return UserSet{}, fmt.Errorf("parse users: range %q is empty", rng)
	}
	if hi-lo+1 > maxUsers {
		return UserSet{}, fmt.Errorf("parse users: range %q has more than %d users", rng, maxUsers)
	}
	u.lo, u.n = lo, hi-lo+1
	return u, nil
}

// Len is the number of users.
func (u UserSet) Len() int { return u.n }

// User returns user i (0 <= i < Len; other i wrap around).
func (u UserSet) User(i int) string {
	if u.fixed {
		return u.prefix
	}
	if u.n > 0 {
		i %= u.n
		if i < 0 {
			i += u.n
		}
	}
	num := strconv.Itoa(u.lo + i)
	if pad := u.width - len(num); pad > 0 {
		num = strings.Repeat("0", pad) + num
	}
	return u.prefix + num + u.suffix
}

// String describes the set, e.g. "user%d@example.com 1-50".
func (u UserSet) String() string {
	if u.fixed {
		return u.prefix
	}
	verb := "%d"
	if u.width > 0 {
		verb = "%0" + strconv.Itoa(u.width) + "d"
	}
	return fmt.Sprintf("%s%s%s %d-%d", u.prefix, verb, u.suffix, u.lo, u.lo+u.n-1)
}

// userPicker hands out users round robin over the set (shared by all
// workers, so consecutive operations use consecutive users) or at random.
type userPicker struct {
	users  UserSet
	random bool
	next   atomic.Uint64
}

// index returns the index of the next user.
func (p *userPicker) index() int {
	if p.random {
		return rand.IntN(p.users.Len())
	}
	return int((p.next.Add(1) - 1) % uint64(p.users.Len()))
}

// pick returns the next user name.
func (p *userPicker) pick() string { return p.users.User(p.index()) }

// Targets says which server each user is sent to.
//
// With one --target every user goes there. With several (direct mode) user
// u goes to target FNV-1a-64(u) mod N, which spreads users over backends
// the way a director would (but not to the same backend usher or the Dovecot
// director would pick). A --target-map file overrides that per user; users
// it does not list fall back to the hash over the --target list.
type Targets struct {
	list []string
	m    map[string]string
}

// NewTargets checks and combines the target list and the optional map.
func NewTargets(list []string, m map[string]string) (*Targets, error) {
	if len(list) == 0 && len(m) == 0 {
		return nil, errors.New("targets: give --target host:port or --target-map FILE")
	}
	for _, t := range list {
		if err := checkTarget(t); err != nil {
			return nil, err
		}
	}
	for _, t := range m {
		if err := checkTarget(t); err != nil {
			return nil, err
		}
	}
	return &Targets{list: list, m: m}, nil
}

// checkTarget accepts host:port, a UNIX socket path (absolute, or unix:PATH).
func checkTarget(t string) error {
	if isUnixTarget(t) {
		return nil
	}
	if _, _, err := net.SplitHostPort(t); err != nil {
		return fmt.Errorf("targets: %q is not host:port or a UNIX socket path: %w", t, err)
	}
	return nil
}

func isUnixTarget(t string) bool {
	return strings.HasPrefix(t, "/") || strings.HasPrefix(t, "unix:")
}

// For returns the target of user.
func (t *Targets) For(user string) (string, error) {
	if tgt, ok := t.m[user]; ok {
		return tgt, nil
	}
	if len(t.list) == 0 {
		return "", fmt.Errorf("targets: user %q is not in the target map and there is no --target to hash it to", user)
	}
	return t.list[fnv1a64(user)%uint64(len(t.list))], nil
}

// Mode is "single" (one target), "direct" (users hashed over several) or
// "map" (a target map file).
func (t *Targets) Mode() string {
	switch {
	case len(t.m) > 0:
		return "map"
	case len(t.list) > 1:
		return "direct"
	default:
		return "single"
	}
}

// All returns every distinct target, list order first, then the map's
// targets sorted.
func (t *Targets) All() []string {
	out := slices.Clone(t.list)
	var extra []string
	for _, tgt := range t.m {
		if !slices.Contains(out, tgt) && !slices.Contains(extra, tgt) {
			extra = append(extra, tgt)
		}
	}
	slices.Sort(extra)
	return append(out, extra...)
}

// fnv1a64 is the FNV-1a 64-bit hash of s.
func fnv1a64(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// maxMapLine bounds one line of a target map file.
const maxMapLine = 4096

// ParseTargetMap reads "user target" lines (blank lines and lines starting
// with # are skipped). A user listed twice is an error.
func ParseTargetMap(r io.Reader) (map[string]string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxMapLine)
	m := make(map[string]string)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("target map line %d: want \"user target\", got %d fields", n, len(f))
		}
		if err := checkTarget(f[1]); err != nil {
			return nil, fmt.Errorf("target map line %d: %w", n, err)
		}
		if _, dup := m[f[0]]; dup {
			return nil, fmt.Errorf("target map line %d: user %q listed twice", n, f[0])
		}
		if len(m) >= maxUsers {
			return nil, fmt.Errorf("target map line %d: more than %d users", n, maxUsers)
		}
		m[f[0]] = f[1]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read target map: %w", err)
	}
	return m, nil
}
