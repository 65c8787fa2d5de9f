package bench

import (
	"testing"
	"time"
)

func TestHistogramUniform(t *testing.T) {
	var h Histogram
	for v := 1; v <= 10000; v++ {
		h.Record(time.Duration(v) * time.Microsecond)
	}
	if h.Count() != 10000 {
		t.Fatalf("count %d", h.Count())
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{
		{0.5, 5000 * time.Microsecond},
		{0.9, 9000 * time.Microsecond},
		{0.99, 9900 * time.Microsecond},
		{0.999, 9990 * time.Microsecond},
	} {
		got := h.Quantile(c.q)
		// Never below the true value, at most 1/64 above it.
		if got < c.want || float64(got) > float64(c.want)*(1+1.0/64) {
			t.Errorf("q%.3f = %v, want %v (+1/64)", c.q, got, c.want)
		}
	}
	if h.Max() != 10*time.Millisecond || h.Min() != time.Microsecond {
		t.Errorf("min %v max %v", h.Min(), h.Max())
	}
	if h.Quantile(1) != h.Max() {
		t.Errorf("q1 %v != max", h.Quantile(1))
	}
	if m := h.Mean(); m < 5000*time.Microsecond || m > 5001*time.Microsecond {
		t.Errorf("mean %v", m)
	}
}

func TestHistogramBimodal(t *testing.T) {
	var h Histogram
	for range 990 {
		h.Record(time.Millisecond)
	}
	for range 10 {
		h.Record(time.Second)
	}
	s := h.Summary()
	// p99 is the 990th value (1 ms), p99.9 the 999th (1 s).
	if s.P50 < 1 || s.P50 > 1.016 || s.P99 < 1 || s.P99 > 1.016 {
		t.Errorf("p50 %v p99 %v, want ~1 ms", s.P50, s.P99)
	}
	if s.P999 != 1000 || s.Max != 1000 {
		t.Errorf("p99.9 %v max %v, want 1000 ms", s.P999, s.Max)
	}
	if s.Count != 1000 {
		t.Errorf("count %d", s.Count)
	}
}

func TestHistogramSmallValuesExact(t *testing.T) {
	var h Histogram
	for _, v := range []int{3, 7, 7, 100, 127} {
		h.Record(time.Duration(v) * time.Microsecond)
	}
	if got := h.Quantile(0.5); got != 7*time.Microsecond {
		t.Errorf("median %v, want 7µs", got)
	}
	if got := h.Quantile(0.8); got != 100*time.Microsecond {
		t.Errorf("q0.8 %v, want 100µs", got)
	}
}

func TestHistogramMergeAndOverflow(t *testing.T) {
	var a, b, all Histogram
	for v := 1; v <= 500; v++ {
		d := time.Duration(v) * 100 * time.Microsecond
		a.Record(d)
		all.Record(d)
	}
	for v := 1; v <= 300; v++ {
		d := time.Duration(v) * time.Millisecond
		b.Record(d)
		all.Record(d)
	}
	b.Record(2 * time.Minute) // beyond the 60 s range: top bucket, exact max
	all.Record(2 * time.Minute)
	a.Merge(&b)
	a.Merge(nil)
	a.Merge(&Histogram{})
	if a.Count() != all.Count() || a.Max() != 2*time.Minute || a.Min() != 100*time.Microsecond {
		t.Fatalf("merged count %d max %v min %v", a.Count(), a.Max(), a.Min())
	}
	for _, q := range []float64{0.1, 0.5, 0.9, 0.99, 0.999, 1} {
		if a.Quantile(q) != all.Quantile(q) {
			t.Errorf("q%v: merged %v, direct %v", q, a.Quantile(q), all.Quantile(q))
		}
	}
	if got := a.Quantile(1); got != 2*time.Minute {
		t.Errorf("max quantile %v", got)
	}
	var e Histogram
	if e.Quantile(0.5) != 0 || e.Summary() != (Percentiles{}) {
		t.Errorf("empty histogram: %+v", e.Summary())
	}
	e.Record(-time.Second)
	if e.Quantile(0.5) != 0 || e.Count() != 1 {
		t.Errorf("negative: %v", e.Quantile(0.5))
	}
}

// TestBucketBounds checks the bucket arithmetic over the whole range: a
// value's bucket holds it, and the bucket is at most 1/64 wide relative to it.
func TestBucketBounds(t *testing.T) {
	prev := -1
	for v := int64(0); v <= histMaxMicros; v += 1 + v/97 {
		i := bucketOf(v)
		if i < prev {
			t.Fatalf("bucketOf not monotonic at %d", v)
		}
		prev = i
		hi := bucketHigh(i)
		if hi < v || (v >= histLinear && float64(hi-v) > float64(v)/64) {
			t.Fatalf("v=%d bucket %d high %d", v, i, hi)
		}
		if i > 0 && bucketHigh(i-1) >= v {
			t.Fatalf("v=%d also fits bucket %d (high %d)", v, i-1, bucketHigh(i-1))
		}
	}
}
