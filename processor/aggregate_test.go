package processor

import (
	"maps"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/funnelwatch/funnelwatch/store"
)

// TestBucketTable checks the pending buckets' table against a map, with
// the patterns a flush sees: runs of consecutive buckets from partitions
// far apart in event time, scattered late buckets, negative and extreme
// buckets, and reuse after reset.
func TestBucketTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, tc := range []struct {
		name string
		next func(i int) int64
	}{
		{"runs", func(i int) int64 { return int64(i%6)*1_000_003 + int64(i/6) }},
		{"same home", func(i int) int64 { return int64(i) << 20 }},
		{"scattered", func(int) int64 { return rng.Int64() - math.MaxInt64/2 }},
		{"negative", func(i int) int64 { return -int64(i) }},
		{"extremes", func(i int) int64 {
			return []int64{math.MinInt64, math.MaxInt64, 0, -1}[i%4] + int64(i/4)*int64(1-2*(i%2))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tb bucketTable
			for _, n := range []int{3000, 10, 0, 700} { // reused after reset
				want := map[int64]store.Vector{}
				for i := range n {
					b := tc.next(i)
					v := tb.get(b)
					if (v != nil) != (want[b] != nil) {
						t.Fatalf("get(%d) = %v; want %v", b, v, want[b])
					}
					if v == nil {
						v = store.Vector{b}
						tb.put(b, v)
						want[b] = v
					}
					v[0]++
				}
				if tb.n != len(want) {
					t.Fatalf("%d buckets; want %d", tb.n, len(want))
				}
				got := map[int64]store.Vector{}
				for b, v := range tb.all() {
					if _, dup := got[b]; dup {
						t.Fatalf("bucket %d twice", b)
					}
					got[b] = v
				}
				if !maps.EqualFunc(got, want, func(x, y store.Vector) bool { return x[0] == y[0] }) {
					t.Fatalf("table holds %d buckets; want %d", len(got), len(want))
				}
				tb.reset()
				if tb.n != 0 || tb.get(tc.next(0)) != nil {
					t.Fatal("reset left buckets")
				}
			}
		})
	}
}
