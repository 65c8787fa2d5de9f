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
// Invariants: a Table is immutable after NewTable and safe for concurrent
// use; Pick only returns a backend that is Up, has Weight > 0 and carries the
// requested Tag; for a given Table, key and tag, Pick always returns the same
// backend; Pick does not allocate (for Dovecot, with keys up to 128 bytes).
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
