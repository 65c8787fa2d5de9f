// Package route hashes users to backends. It is pure computation: no I/O,
// no logging, no package-level mutable state.
//
// A user's login name is first turned into a key by a username hash template
// (ExpandTemplate, Dovecot's director_username_hash syntax), then a Table maps
// the key and a pool tag to one backend address with one of two algorithms:
//
//   - Rendezvous (default): weighted highest-random-weight hashing. Even
//     spread, and a change to one backend moves only users to or from it.
//   - Dovecot: the Dovecot 2.3 director's consistent-hashing ring, bit for
//     bit, for sites migrating from the Dovecot director.
//
// Rendezvous tables can also pick with bounded loads (PickBounded, after
// Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
// Loads", 2016; HAProxy's hash-balance-factor): the caller says how many
// users each backend holds, and the user goes to the first backend in its
// rendezvous order (Pick's choice first) that is below its capacity
// ceil(factor * (N+1) * w_b / W): N users on the pool, w_b the backend's
// weight, W the pool's total weight. Assigned one after another, no backend
// ever holds more than its capacity (rounded up), so the spread stays within
// about the factor of each backend's weighted share, at the price of a
// placement that depends on the loads and not on the key alone.
//
// Invariants: a Table is immutable after NewTable and safe for concurrent
// use; Pick and PickBounded only return a backend that is Up, has Weight > 0
// and carries the requested Tag; for a given Table, key and tag, Pick always
// returns the same backend, and PickBounded the same backend for the same
// loads; PickBounded returns Pick's backend whenever that backend is below
// its capacity, and always on a Dovecot table or with factor <= 0; neither
// allocates (for Dovecot, with keys up to 128 bytes).
package route

import (
	"errors"
	"fmt"
	"net/netip"
)

// Algorithm names a hashing algorithm.
type Algorithm string

// The supported algorithms.
const (
	Rendezvous Algorithm = "rendezvous" // default
	Dovecot    Algorithm = "dovecot"
)

// MaxWeight is the largest backend weight NewTable accepts. A Dovecot ring
// holds one point per unit of weight (Dovecot's default is 100 per host), so
// the cap bounds the ring's memory.
const MaxWeight = 10000

// Backend is one candidate backend as routing sees it.
type Backend struct {
	Addr   netip.Addr
	Weight int    // 0 = takes no new users
	Tag    string // pool; "" is the default pool
	Up     bool   // false = takes no new users
}

// Table is an immutable routing table built from a backend set; safe for
// concurrent use.
type Table struct {
	alg        Algorithm
	rendezvous map[string]*rendezvousPool // by tag; Rendezvous only
	dovecot    map[string]*dovecotRing    // by tag; Dovecot only
}

// Errors from NewTable, wrapped with details.
var (
	ErrUnknownAlgorithm = errors.New("unknown algorithm")
	ErrDuplicateBackend = errors.New("duplicate backend address")
	ErrBadWeight        = errors.New("weight out of range")
	ErrBadAddress       = errors.New("invalid backend address")
)

// ParseAlgorithm maps a configuration value to an Algorithm; "" is
// Rendezvous.
func ParseAlgorithm(s string) (Algorithm, error) {
	switch Algorithm(s) {
	case "", Rendezvous:
		return Rendezvous, nil
	case Dovecot:
		return Dovecot, nil
	}
	return "", fmt.Errorf("route: parse algorithm %q: %w", s, ErrUnknownAlgorithm)
}

// NewTable builds a routing table. alg "" means Rendezvous. It fails on an
// unknown algorithm, an invalid address, two backends with the same address
// (an IPv4 address and its IPv4-mapped IPv6 form count as the same; zones
// are ignored), or a weight outside 0..MaxWeight. Backends that are down or
// have weight 0 are accepted and never picked.
func NewTable(alg Algorithm, backends []Backend) (*Table, error) {
	alg, err := ParseAlgorithm(string(alg))
	if err != nil {
		return nil, fmt.Errorf("route: new table: %w", err)
	}
	seen := make(map[netip.Addr]struct{}, len(backends))
	eligible := make(map[string][]Backend)
	for _, b := range backends {
		if !b.Addr.IsValid() {
			return nil, fmt.Errorf("route: new table: %w", ErrBadAddress)
		}
		if b.Weight < 0 || b.Weight > MaxWeight {
			return nil, fmt.Errorf("route: new table: backend %s weight %d (want 0..%d): %w",
				b.Addr, b.Weight, MaxWeight, ErrBadWeight)
		}
		id := b.Addr.Unmap().WithZone("")
		if _, dup := seen[id]; dup {
			return nil, fmt.Errorf("route: new table: backend %s: %w", b.Addr, ErrDuplicateBackend)
		}
		seen[id] = struct{}{}
		if b.Up && b.Weight > 0 {
			eligible[b.Tag] = append(eligible[b.Tag], b)
		}
	}
	t := &Table{alg: alg}
	switch alg {
	case Rendezvous:
		t.rendezvous = make(map[string]*rendezvousPool, len(eligible))
		for tag, bs := range eligible {
			t.rendezvous[tag] = newRendezvousPool(bs)
		}
	case Dovecot:
		t.dovecot = make(map[string]*dovecotRing, len(eligible))
		for tag, bs := range eligible {
			t.dovecot[tag] = buildDovecotRing(bs, dovecotPointHash)
		}
	}
	return t, nil
}

// Algorithm reports the table's algorithm.
func (t *Table) Algorithm() Algorithm { return t.alg }

// Pick returns the backend for key (an expanded template, see ExpandTemplate)
// among the backends that are Up, have Weight > 0 and whose Tag is tag. It
// returns false if there is none.
func (t *Table) Pick(key, tag string) (netip.Addr, bool) {
	switch t.alg {
	case Dovecot:
		if r := t.dovecot[tag]; r != nil {
			return r.pick(UserHash(key))
		}
	default:
		if p := t.rendezvous[tag]; p != nil {
			return p.pick(key)
		}
	}
	return netip.Addr{}, false
}

// PickBounded is Pick with bounded loads for Rendezvous tables (see the
// package documentation). load(b) is the number of users on backend b (as
// the table was given it in NewTable); it is called once or twice per
// eligible backend of the pool and must not change meanwhile. The result is
// the first backend in key's rendezvous order whose load is below
// ceil(factor * (N+1) * w_b / W), where N is the sum of load over the
// pool's eligible backends: the backend that places one more user without
// exceeding the bound. A factor below 1 is raised to 1 (capacities then
// still add up to at least N+1). On a Dovecot table, with factor <= 0 or
// NaN, or with a nil load, it is exactly Pick; and if no backend has room
// (only possible when load is inconsistent) it falls back to Pick.
func (t *Table) PickBounded(key, tag string, factor float64, load func(netip.Addr) int) (netip.Addr, bool) {
	if t.alg == Dovecot || !(factor > 0) || load == nil {
		return t.Pick(key, tag)
	}
	p := t.rendezvous[tag]
	if p == nil {
		return netip.Addr{}, false
	}
	return p.pickBounded(key, max(factor, 1), load)
}
