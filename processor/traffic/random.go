package traffic

import (
	"math"
	"math/rand/v2"
	"time"
)

// mix is the splitmix64 finalizer: a bijection of uint64 that turns
// counters into well-spread seeds and ids (distinct in, distinct out).
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// logUniform returns a duration in milliseconds whose logarithm is uniform
// in [log lo, log hi]: as many return visits in the first hour as between
// the first and the second day's.
func logUniform(r *rand.Rand, lo, hi time.Duration) int64 {
	l, h := float64(lo.Milliseconds()), float64(hi.Milliseconds())
	return int64(l * math.Exp(r.Float64()*math.Log(h/l)))
}

// truncLogNormal returns a log-normal duration in milliseconds with the
// given median and shape, redrawn until it falls in [lo, hi] (the ranges
// used cut off a few percent at most).
func truncLogNormal(r *rand.Rand, median time.Duration, sigma float64, lo, hi time.Duration) int64 {
	m := float64(median.Milliseconds())
	l, h := float64(lo.Milliseconds()), float64(hi.Milliseconds())
	for {
		x := m * math.Exp(sigma*r.NormFloat64())
		if x >= l && x <= h {
			return int64(x)
		}
	}
}

// poisson draws from the Poisson distribution with mean lambda: by
// multiplying uniforms for small means, by Hörmann's transformed rejection
// (PTRS) for large ones, so large scales stay fast.
func poisson(r *rand.Rand, lambda float64) int {
	if lambda <= 0 {
		return 0
	}
	if lambda < 10 {
		limit := math.Exp(-lambda)
		k, p := 0, r.Float64()
		for p > limit {
			k++
			p *= r.Float64()
		}
		return k
	}
	slam := math.Sqrt(lambda)
	loglam := math.Log(lambda)
	b := 0.931 + 2.53*slam
	a := -0.059 + 0.02483*b
	invalpha := 1.1239 + 1.1328/(b-3.4)
	vr := 0.9277 - 3.6224/(b-2)
	for {
		u := r.Float64() - 0.5
		v := r.Float64()
		us := 0.5 - math.Abs(u)
		k := math.Floor((2*a/us+b)*u + lambda + 0.43)
		if us >= 0.07 && v <= vr {
			return int(k)
		}
		if k < 0 || (us < 0.013 && v > us) {
			continue
		}
		lg, _ := math.Lgamma(k + 1)
		if math.Log(v)+math.Log(invalpha)-math.Log(a/(us*us)+b) <= -lambda+k*loglam-lg {
			return int(k)
		}
	}
}
