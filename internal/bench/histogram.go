package bench

import (
	"math"
	"math/bits"
	"time"
)

// Histogram bounds and resolution. Values are tracked in microseconds from
// 1 µs to 60 s; each power of two above 128 µs is split into 64 linear
// buckets, so a reported percentile is at most 1/64 (1.6 %) above the true
// value, like an HDR histogram with two significant digits. Values below
// 128 µs are exact to the microsecond; values above 60 s land in the top
// bucket (the exact maximum is kept separately).
const (
	histSubBits   = 6
	histSub       = 1 << histSubBits // 64 buckets per power of two
	histLinear    = 2 * histSub      // values below this are their own bucket
	histMaxMicros = int64(60 * time.Second / time.Microsecond)
)

// Histogram is a log-linear latency histogram (see the constants above).
// The zero value is ready to use. It is not safe for concurrent use: each
// worker records into its own and the runner merges them.
type Histogram struct {
	counts []uint64 // grown on demand up to bucketOf(histMaxMicros)+1
	n      uint64
	sum    time.Duration
	min    time.Duration
	max    time.Duration
}

// bucketOf returns the bucket index of v microseconds (v >= 0).
func bucketOf(v int64) int {
	if v < histLinear {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - (histSubBits + 1) // v>>shift in [64, 128)
	return histLinear + (shift-1)*histSub + int(v>>shift) - histSub
}

// bucketHigh returns the highest value (µs) that falls into bucket i.
func bucketHigh(i int) int64 {
	if i < histLinear {
		return int64(i)
	}
	shift := (i-histLinear)/histSub + 1
	sub := int64((i-histLinear)%histSub + histSub)
	return (sub+1)<<shift - 1
}

// Record adds one observation. Negative durations count as 0.
func (h *Histogram) Record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	v := min(int64(d/time.Microsecond), histMaxMicros)
	i := bucketOf(v)
	if i >= len(h.counts) {
		grown := make([]uint64, bucketOf(histMaxMicros)+1)
		copy(grown, h.counts)
		h.counts = grown
	}
	h.counts[i]++
	if h.n == 0 || d < h.min {
		h.min = d
	}
	if d > h.max {
		h.max = d
	}
	h.n++
	h.sum += d
}

// Merge adds all observations of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o == nil || o.n == 0 {
		return
	}
	if len(h.counts) < len(o.counts) {
		grown := make([]uint64, len(o.counts))
		copy(grown, h.counts)
		h.counts = grown
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.n += o.n
	h.sum += o.sum
}

// Count is the number of observations.
func (h *Histogram) Count() uint64 { return h.n }

// Max is the largest observation, exact.
func (h *Histogram) Max() time.Duration { return h.max }

// Min is the smallest observation, exact.
func (h *Histogram) Min() time.Duration { return h.min }

// Mean is the arithmetic mean, exact.
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return h.sum / time.Duration(h.n)
}

// Quantile returns the value at quantile q (0 < q <= 1): the highest value
// of the bucket holding the ceil(q·n)-th smallest observation, clamped to
// the exact minimum and maximum. It is 0 for an empty histogram.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	if q >= 1 {
		return h.max
	}
	// The epsilon keeps 0.999·1000 from rounding up to rank 1000.
	rank := uint64(math.Ceil(q*float64(h.n) - 1e-9))
	rank = max(rank, 1)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			v := time.Duration(bucketHigh(i)) * time.Microsecond
			return min(max(v, h.min), h.max)
		}
	}
	return h.max
}

// Percentiles is a histogram summary in milliseconds, as it appears in the
// JSON result (latency_ms, loop_ms).
type Percentiles struct {
	Count uint64  `json:"count"`
	Min   float64 `json:"min"`
	Mean  float64 `json:"mean"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	P999  float64 `json:"p999"`
	Max   float64 `json:"max"`
}

func ms(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Millisecond)*1000) / 1000
}

// Summary returns the percentiles of h in milliseconds (rounded to 1 µs).
func (h *Histogram) Summary() Percentiles {
	return Percentiles{
		Count: h.n,
		Min:   ms(h.min),
		Mean:  ms(h.Mean()),
		P50:   ms(h.Quantile(0.50)),
		P90:   ms(h.Quantile(0.90)),
		P99:   ms(h.Quantile(0.99)),
		P999:  ms(h.Quantile(0.999)),
		Max:   ms(h.max),
	}
}
