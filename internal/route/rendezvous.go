package route

import (
	"math"
	"net/netip"
	"slices"
)

// Weighted rendezvous (highest random weight) hashing, after Schindelhauer
// and Schomaker, "Weighted Distributed Hash Tables" (2005): every eligible
// backend b scores -w_b / ln(u_b(key)) with u_b(key) uniform on (0,1), and
// the highest score wins. The winner is backend b with probability
// w_b / sum(w), and changing one backend only moves users to or from that
// backend.
//
// u_b(key) comes from a 64-bit hash: FNV-1a 64 of the key, finalized with
// the splitmix64 mixer, XORed with a per-backend seed (the mixed FNV-1a of
// the backend's 16-byte address, computed once in NewTable) and mixed again.
// The top 53 bits become the float (h>>11 + 0.5) / 2^53, never 0 or 1.

// rendezvousEntry is one eligible backend of a pool.
type rendezvousEntry struct {
	seed   uint64
	weight float64
	addr   netip.Addr
}

// rendezvousPool holds the eligible backends of one tag, sorted by address so
// that the first best score wins ties deterministically (lowest address).
type rendezvousPool struct {
	entries []rendezvousEntry
	// sameWeight: all weights are equal, so the score is strictly
	// increasing in u and pick compares the 53-bit hashes directly, without
	// a logarithm (the exact order; the float scores could only differ by
	// rounding ties).
	sameWeight bool
	// totalWeight is the sum of the entries' weights, W of the capacity
	// bound of pickBounded.
	totalWeight float64
}

const (
	fnvOffset64 = 14695981039346656037
	fnvPrime64  = 1099511628211
)

// fnv1a64 is FNV-1a 64 of s; it does not allocate.
func fnv1a64(s string) uint64 {
	h := uint64(fnvOffset64)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime64
	}
	return h
}

// mix64 is the splitmix64 finalizer (Stafford's Mix13), a bijection with full
// avalanche.
func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// rendezvousSeed is the per-backend seed: IPv4 and its IPv4-mapped IPv6 form
// get the same seed, a zone is ignored.
func rendezvousSeed(a netip.Addr) uint64 {
	b := a.Unmap().WithZone("").As16()
	return mix64(fnv1a64(string(b[:])) ^ 0x9e3779b97f4a7c15)
}

func newRendezvousPool(backends []Backend) *rendezvousPool {
	p := &rendezvousPool{entries: make([]rendezvousEntry, 0, len(backends)), sameWeight: true}
	for _, b := range backends {
		p.entries = append(p.entries, rendezvousEntry{
			seed:   rendezvousSeed(b.Addr),
			weight: float64(b.Weight),
			addr:   b.Addr,
		})
		p.totalWeight += float64(b.Weight)
		if b.Weight != backends[0].Weight {
			p.sameWeight = false
		}
	}
	slices.SortFunc(p.entries, func(x, y rendezvousEntry) int { return x.addr.Compare(y.addr) })
	return p
}

// pick returns the winning backend for key; false if the pool is empty.
func (p *rendezvousPool) pick(key string) (netip.Addr, bool) {
	if len(p.entries) == 0 {
		return netip.Addr{}, false
	}
	kh := mix64(fnv1a64(key))
	best := 0
	if p.sameWeight {
		var bestH uint64
		for i := range p.entries {
			if h := mix64(kh^p.entries[i].seed) >> 11; i == 0 || h > bestH {
				best, bestH = i, h
			}
		}
		return p.entries[best].addr, true
	}
	bestScore := math.Inf(-1)
	for i := range p.entries {
		e := &p.entries[i]
		if s := rendezvousScore(kh, e.seed, e.weight); s > bestScore {
			best, bestScore = i, s
		}
	}
	return p.entries[best].addr, true
}

// boundedStackLoads is how many loads pickBounded keeps on the stack; a
// larger pool calls load twice per backend instead of allocating.
const boundedStackLoads = 128

// pickBounded returns the first backend in key's rendezvous order (the order
// of pick: highest score first, ties to the lowest address) whose load is
// below its capacity ceil(factor * (N+1) * w_b / W), where N is the sum of
// the loads of the pool's backends, w_b the backend's weight and W the
// pool's total weight. factor >= 1 (the caller's guarantee) makes the
// capacities add up to at least N+1, so some backend always has room; if
// none has (load is inconsistent between calls), it falls back to pick.
// Negative loads count as 0. It does not allocate.
func (p *rendezvousPool) pickBounded(key string, factor float64, load func(netip.Addr) int) (netip.Addr, bool) {
	if len(p.entries) == 0 {
		return netip.Addr{}, false
	}
	var buf [boundedStackLoads]int
	var loads []int
	if len(p.entries) <= len(buf) {
		loads = buf[:len(p.entries)]
	}
	total := 0
	for i := range p.entries {
		l := max(load(p.entries[i].addr), 0)
		if loads != nil {
			loads[i] = l
		}
		total += l
	}
	scale := factor * float64(total+1)
	kh := mix64(fnv1a64(key))
	best := -1
	var bestH uint64
	bestScore := math.Inf(-1)
	for i := range p.entries {
		e := &p.entries[i]
		var l int
		if loads != nil {
			l = loads[i]
		} else {
			l = max(load(e.addr), 0)
		}
		if float64(l) >= math.Ceil(scale*e.weight/p.totalWeight) {
			continue // full
		}
		if p.sameWeight {
			if h := mix64(kh^e.seed) >> 11; best < 0 || h > bestH {
				best, bestH = i, h
			}
		} else if s := rendezvousScore(kh, e.seed, e.weight); best < 0 || s > bestScore {
			best, bestScore = i, s
		}
	}
	if best < 0 {
		return p.pick(key)
	}
	return p.entries[best].addr, true
}

// rendezvousScore is -weight / ln(u) for the backend with seed; weight > 0.
func rendezvousScore(keyHash, seed uint64, weight float64) float64 {
	u := (float64(mix64(keyHash^seed)>>11) + 0.5) * 0x1p-53
	return -weight / math.Log(u)
}
