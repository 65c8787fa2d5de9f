package route

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// boundedAssign places users 0..users-1 one after another with PickBounded
// on the default pool, each user's load counted from the users before it.
// It fails the test if a placement ever puts a backend above its capacity
// ceil(factor * (N+1) * w / W). It returns the per-backend counts and how
// many users did not get Pick's backend.
func boundedAssign(t *testing.T, bs []Backend, users int, factor float64) (map[netip.Addr]int, int) {
	t.Helper()
	tab := mustTable(t, Rendezvous, bs)
	weight := map[netip.Addr]float64{}
	total := 0.0
	for _, b := range bs {
		weight[b.Addr] = float64(b.Weight)
		total += float64(b.Weight)
	}
	m := make(map[netip.Addr]int, len(bs))
	load := func(a netip.Addr) int { return m[a] }
	off := 0
	for i := range users {
		k := userKey(i)
		a, ok := tab.PickBounded(k, "", factor, load)
		if !ok {
			t.Fatalf("PickBounded(%q) found no backend", k)
		}
		if p, _ := tab.Pick(k, ""); p != a {
			off++
		}
		m[a]++
		if capa := math.Ceil(factor * float64(i+1) * weight[a] / total); float64(m[a]) > capa {
			t.Fatalf("factor %v, user %d: %v holds %d, capacity %v", factor, i, a, m[a], capa)
		}
	}
	return m, off
}

// TestBalanceBounded: the users of TestBalance on the same 10 equal
// backends, placed with bounded loads.
//
// The bound caps the fullest backend at factor × mean by construction
// (checked after every placement); it does not lift the emptiest one, which
// only gains the users that overflow elsewhere. Worst case with n equal
// backends the emptiest holds (1 - (n-1)(factor-1)) × mean; measured, the
// pure hash's -2.40 % for these names shrinks to about -1.2 % at 1.005 and
// -1.9 % at 1.01 but stays at -2.2 % at 1.02. So ±2 % on both sides is
// asserted for 1.005 and 1.01, the cap for every factor.
func TestBalanceBounded(t *testing.T) {
	const users, n = 100000, 10
	mean := float64(users) / n
	for _, c := range []struct {
		factor float64
		both   bool // assert ±2 % on both sides
	}{{1.002, true}, {1.005, true}, {1.01, true}, {1.02, false}, {1.05, false}} {
		m, off := boundedAssign(t, backends(n, 100), users, c.factor)
		if len(m) != n {
			t.Fatalf("factor %v: %d of %d backends used", c.factor, len(m), n)
		}
		hi, lo := math.Inf(-1), math.Inf(1)
		for _, k := range m {
			d := (float64(k) - mean) / mean
			hi, lo = max(hi, d), min(lo, d)
		}
		t.Logf("factor %.3f: max deviation %+.2f%%, min %+.2f%%, %d of %d users not on their first choice",
			c.factor, 100*hi, 100*lo, off, users)
		if limit := math.Ceil(c.factor*users/n)/mean - 1; hi > limit+1e-12 {
			t.Errorf("factor %v: max deviation %+.2f%% above the bound %+.2f%%", c.factor, 100*hi, 100*limit)
		}
		if c.both && (hi > 0.02 || lo < -0.02) {
			t.Errorf("factor %v: deviation %+.2f%% .. %+.2f%%, want within ±2%%", c.factor, 100*lo, 100*hi)
		}
		if off == 0 {
			t.Errorf("factor %v: every user on its first choice; the bound never acted", c.factor)
		}
	}
}

// TestBalanceBoundedWeighted: with unequal weights no backend exceeds
// factor × its weighted share (plus the rounding up of one user).
func TestBalanceBoundedWeighted(t *testing.T) {
	const users = 60000
	bs := backends(6, 100)
	for i, w := range []int{50, 100, 100, 150, 200, 400} {
		bs[i].Weight = w
	}
	for _, factor := range []float64{1.01, 1.05} {
		m, off := boundedAssign(t, bs, users, factor)
		hi, lo := math.Inf(-1), math.Inf(1)
		for _, b := range bs {
			share := float64(users) * float64(b.Weight) / 1000
			r := float64(m[b.Addr]) / share
			hi, lo = max(hi, r), min(lo, r)
			if float64(m[b.Addr]) > math.Ceil(factor*share) {
				t.Errorf("factor %v: weight %d holds %d users, more than %v × its share %.0f", factor, b.Weight, m[b.Addr], factor, share)
			}
		}
		t.Logf("weighted, factor %.2f: load/share %.4f .. %.4f, %d of %d users not on their first choice", factor, lo, hi, off, users)
	}
}

// TestPickBoundedIsPickWhenOff: factor 0, a negative or NaN factor, a nil
// load and Dovecot tables all give exactly Pick, whatever the loads.
func TestPickBoundedIsPickWhenOff(t *testing.T) {
	bs := backends(10, 100)
	bs[2].Weight = 300
	heavy := func(netip.Addr) int { return 1 << 30 }
	skew := func(a netip.Addr) int { return int(a.As4()[3]) * 1000 }
	for _, alg := range []Algorithm{Rendezvous, Dovecot} {
		tab := mustTable(t, alg, bs)
		cases := []struct {
			factor float64
			load   func(netip.Addr) int
		}{{0, skew}, {-1, skew}, {math.NaN(), skew}, {1.02, nil}, {0, heavy}}
		if alg == Dovecot {
			cases = append(cases, struct {
				factor float64
				load   func(netip.Addr) int
			}{1.02, skew}, struct {
				factor float64
				load   func(netip.Addr) int
			}{1, heavy})
		}
		for _, c := range cases {
			for i := range 3000 {
				k := userKey(i)
				want, wok := tab.Pick(k, "")
				got, gok := tab.PickBounded(k, "", c.factor, c.load)
				if got != want || gok != wok {
					t.Fatalf("%s factor %v: PickBounded(%q) = %v, %v; Pick %v, %v", alg, c.factor, k, got, gok, want, wok)
				}
			}
		}
		if a, ok := tab.PickBounded("u", "nosuch", 1.02, skew); ok {
			t.Errorf("%s: PickBounded in an unknown pool = %v", alg, a)
		}
	}
}

// TestPickBoundedBelowCapacityIsPick: when every backend is below its
// capacity the bounded pick is Pick's.
func TestPickBoundedBelowCapacityIsPick(t *testing.T) {
	for _, weighted := range []bool{false, true} {
		bs := backends(10, 100)
		if weighted {
			for i := range bs {
				bs[i].Weight = 10 * (i + 1)
			}
		}
		tab := mustTable(t, Rendezvous, bs)
		total := 0
		for _, b := range bs {
			total += b.Weight
		}
		for _, factor := range []float64{1, 1.02, 2} {
			for _, scale := range []int{0, 1, 37, 1000} {
				// Loads proportional to the weights: N = scale*total, and
				// each load scale*w is below factor*(N+1)*w/total.
				load := func(a netip.Addr) int {
					for _, b := range bs {
						if b.Addr == a {
							return scale * b.Weight
						}
					}
					t.Fatalf("load asked for %v, not in the pool", a)
					return 0
				}
				for i := range 2000 {
					k := userKey(i)
					want, _ := tab.Pick(k, "")
					if got, ok := tab.PickBounded(k, "", factor, load); !ok || got != want {
						t.Fatalf("weighted=%v factor %v scale %d: PickBounded(%q) = %v, Pick %v", weighted, factor, scale, k, got, want)
					}
				}
			}
		}
	}
}

// refBounded is PickBounded written the long way: every backend's score,
// the full order, the capacities, the first with room.
func refBounded(bs []Backend, key string, factor float64, load func(netip.Addr) int) netip.Addr {
	type cand struct {
		addr  netip.Addr
		score float64
		w     float64
	}
	var cs []cand
	n, total := 0, 0.0
	kh := mix64(fnv1a64(key))
	for _, b := range bs {
		if !b.Up || b.Weight == 0 {
			continue
		}
		cs = append(cs, cand{b.Addr, rendezvousScore(kh, rendezvousSeed(b.Addr), float64(b.Weight)), float64(b.Weight)})
		n += load(b.Addr)
		total += float64(b.Weight)
	}
	slices.SortStableFunc(cs, func(x, y cand) int {
		switch {
		case x.score > y.score:
			return -1
		case x.score < y.score:
			return 1
		}
		return x.addr.Compare(y.addr)
	})
	for _, c := range cs {
		if float64(load(c.addr)) < math.Ceil(factor*float64(n+1)*c.w/total) {
			return c.addr
		}
	}
	return cs[0].addr
}

// TestPickBoundedOrder: against the reference, with random loads that fill
// some backends, for equal weights (hash comparison path) and unequal ones,
// a pool too large for the stack buffer and a pool with a down backend.
func TestPickBoundedOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	sets := map[string][]Backend{"equal": backends(10, 100), "large": backends(boundedStackLoads+20, 7)}
	w := backends(8, 100)
	for i := range w {
		w[i].Weight = 25 * (i + 1)
	}
	w[3].Up = false
	sets["weighted"] = w
	for name, bs := range sets {
		tab := mustTable(t, Rendezvous, bs)
		moved := 0
		for i := range 3000 {
			loads := map[netip.Addr]int{}
			for _, b := range bs {
				loads[b.Addr] = rng.IntN(50)
			}
			load := func(a netip.Addr) int { return loads[a] }
			factor := []float64{1, 1.01, 1.1, 1.5}[i%4]
			k := userKey(i)
			got, ok := tab.PickBounded(k, "", factor, load)
			if want := refBounded(bs, k, factor, load); !ok || got != want {
				t.Fatalf("%s: PickBounded(%q, %v) = %v, reference %v", name, k, factor, got, want)
			}
			if p, _ := tab.Pick(k, ""); p != got {
				moved++
			}
		}
		if moved < 100 {
			t.Errorf("%s: only %d of 3000 picks left the first choice; the loads did not bite", name, moved)
		}
	}
}

// TestPickBoundedFactorBelowOne: a factor in (0,1) acts as 1.
func TestPickBoundedFactorBelowOne(t *testing.T) {
	tab := mustTable(t, Rendezvous, backends(5, 100))
	loads := map[netip.Addr]int{}
	load := func(a netip.Addr) int { return loads[a] }
	for i := range 5000 {
		k := userKey(i)
		a, _ := tab.PickBounded(k, "", 0.5, load)
		if b, _ := tab.PickBounded(k, "", 1, load); a != b {
			t.Fatalf("user %d: factor 0.5 gave %v, factor 1 %v", i, a, b)
		}
		loads[a]++
	}
	for a, n := range loads {
		if n != 1000 {
			t.Errorf("factor 1: %v holds %d of 5000 users on 5 backends, want exactly 1000", a, n)
		}
	}
}

// TestPickBoundedFallback: if no backend has room (a load that changes
// between PickBounded's two passes over a large pool), Pick's backend.
func TestPickBoundedFallback(t *testing.T) {
	bs := backends(boundedStackLoads+1, 100)
	tab := mustTable(t, Rendezvous, bs)
	for i := range 200 {
		calls := 0
		load := func(netip.Addr) int {
			calls++
			if calls <= len(bs) {
				return 0 // first pass: N = 0
			}
			return 1 << 20 // second pass: everyone full
		}
		k := userKey(i)
		want, _ := tab.Pick(k, "")
		if got, ok := tab.PickBounded(k, "", 1.02, load); !ok || got != want {
			t.Fatalf("PickBounded(%q) = %v, %v; want Pick's %v", k, got, ok, want)
		}
		if calls != 2*len(bs) {
			t.Fatalf("load called %d times, want %d", calls, 2*len(bs))
		}
	}
}

// TestPickBoundedTies: equal hashes go to the lowest address, as in Pick,
// and to the next one when that is full.
func TestPickBoundedTies(t *testing.T) {
	a1, a2, a3 := addr("10.0.0.1"), addr("10.0.0.2"), addr("10.0.0.3")
	for _, same := range []bool{true, false} {
		p := &rendezvousPool{sameWeight: same, totalWeight: 3, entries: []rendezvousEntry{
			{seed: 42, weight: 1, addr: a1}, {seed: 42, weight: 1, addr: a2}, {seed: 42, weight: 1, addr: a3},
		}}
		loads := map[netip.Addr]int{}
		load := func(a netip.Addr) int { return loads[a] }
		if got, _ := p.pick("k"); got != a1 {
			t.Fatalf("sameWeight=%v: pick = %v, want %v", same, got, a1)
		}
		if got, _ := p.pickBounded("k", 1, load); got != a1 {
			t.Fatalf("sameWeight=%v: pickBounded, no load = %v, want %v", same, got, a1)
		}
		loads[a1] = 1 // N=1: capacities ceil(2/3) = 1, so a1 is full
		if got, _ := p.pickBounded("k", 1, load); got != a2 {
			t.Fatalf("sameWeight=%v: pickBounded, %v full = %v, want %v", same, a1, got, a2)
		}
	}
}

func TestPickBoundedNoAllocs(t *testing.T) {
	for _, n := range []int{10, boundedStackLoads + 10} {
		for _, weighted := range []bool{false, true} {
			bs := backends(n, 100)
			if weighted {
				bs[0].Weight = 50
			}
			tab := mustTable(t, Rendezvous, bs)
			loads := map[netip.Addr]int{bs[0].Addr: 5, bs[1].Addr: 3}
			long := fmt.Sprintf("%s@example.com", "long-user-name-long-user-name-long-user-name")
			if a := testing.AllocsPerRun(100, func() {
				tab.PickBounded(long, "", 1.02, func(a netip.Addr) int { return loads[a] })
			}); a != 0 {
				t.Errorf("%d backends, weighted=%v: PickBounded allocates %v times", n, weighted, a)
			}
		}
	}
}
