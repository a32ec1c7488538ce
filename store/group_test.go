package store

import (
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// countKeys returns the number of keys under prefix.
func countKeys(t *testing.T, s *Store, prefix byte) int {
	t.Helper()
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefix}, UpperBound: []byte{prefix + 1}})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for iter.First(); iter.Valid(); iter.Next() {
		n++
	}
	if err := iter.Close(); err != nil {
		t.Fatal(err)
	}
	return n
}

func openMem(t *testing.T, fs vfs.FS) *Store {
	t.Helper()
	if fs == nil {
		fs = vfs.NewMem()
	}
	s, err := Open("db", Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// readAll returns every bucket's vector by segment and bucket.
func readAll(t *testing.T, s *Store) map[string]string {
	t.Helper()
	got := map[string]string{}
	err := s.Buckets(-1<<62, 1<<62, func(b int64, seg []byte, v Vector) {
		got[fmt.Sprintf("%x/%d", seg, b)] = fmt.Sprint(v)
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestAddBucketGroups checks that a segment's buckets added in order write
// one key per bucket group, and that any other order adds up the same.
func TestAddBucketGroups(t *testing.T) {
	segA, segB := MakeSegment(1, []uint32{1}), MakeSegment(1, []uint32{2})
	for _, tc := range []struct {
		name    string
		buckets []int64 // added to segA then segB, in this order
		keys    int
	}{
		{"one group in order", []int64{0, 1, 5, 63}, 2},
		{"two groups", []int64{-1, 0, 62, 63, 64, 127}, 6},
		{"out of order", []int64{5, 3, 4}, 4},
		{"repeated bucket", []int64{7, 7, 7}, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openMem(t, nil)
			want := map[string]string{}
			sums := map[string]int64{}
			b := s.NewBatch()
			for _, seg := range []Segment{segA, segB} {
				for i, bucket := range tc.buckets {
					b.AddBucket(bucket, seg, Vector{int64(i), 1})
					sums[fmt.Sprintf("%x/%d", seg, bucket)] += int64(i)
				}
			}
			for _, seg := range []Segment{segA, segB} {
				for _, bucket := range tc.buckets {
					k := fmt.Sprintf("%x/%d", seg, bucket)
					n := int64(0)
					for _, x := range tc.buckets {
						if x == bucket {
							n++
						}
					}
					want[k] = fmt.Sprint(Vector{sums[k], n})
				}
			}
			if err := b.Commit(); err != nil {
				t.Fatal(err)
			}
			// Distinct keys: the operands of a key read as one.
			if got := countKeys(t, s, prefixBucket); got != groupsOf(tc.buckets, 2) {
				t.Errorf("%d bucket group keys; want %d", got, groupsOf(tc.buckets, 2))
			}
			if got := readAll(t, s); !maps.Equal(got, want) {
				t.Errorf("buckets = %v; want %v", got, want)
			}
			if ops := batchOps(t, tc.buckets, segA, segB); ops != tc.keys {
				t.Errorf("the batch wrote %d merge operands; want %d", ops, tc.keys)
			}
		})
	}
}

// groupsOf is the number of distinct bucket groups of buckets, times segs.
func groupsOf(buckets []int64, segs int) int {
	g := map[int64]bool{}
	for _, b := range buckets {
		g[b>>groupBits] = true
	}
	return len(g) * segs
}

// batchOps adds buckets to both segments in a fresh batch and counts the
// merge operands it holds.
func batchOps(t *testing.T, buckets []int64, segs ...Segment) int {
	t.Helper()
	s := openMem(t, nil)
	b := s.NewBatch()
	defer b.Close()
	for _, seg := range segs {
		for _, bucket := range buckets {
			b.AddBucket(bucket, seg, Vector{1})
		}
	}
	b.endGroup()
	return int(b.b.Count())
}

// TestBucketCursorOrder checks that a cursor hands out every bucket of
// Buckets, in bucket order, over random buckets of several segments.
func TestBucketCursorOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	s := openMem(t, nil)
	segs := []Segment{MakeSegment(0, nil), MakeSegment(1, []uint32{1}), MakeSegment(1, []uint32{2}), MakeSegment(2, []uint32{1, 9})}
	for range 5 {
		b := s.NewBatch()
		for range 300 {
			b.AddBucket(rng.Int64N(1000)-300, segs[rng.IntN(len(segs))], Vector{rng.Int64N(5), 1})
		}
		if err := b.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range [][2]int64{{-1 << 62, 1 << 62}, {-300, -300}, {-37, 450}, {64, 127}, {65, 65}, {2000, 3000}} {
		want := map[string]string{}
		if err := s.Buckets(r[0], r[1], func(b int64, seg []byte, v Vector) {
			want[fmt.Sprintf("%x/%d", seg, b)] = fmt.Sprint(v)
		}); err != nil {
			t.Fatal(err)
		}
		c, err := s.NewBucketCursor(r[0], r[1])
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		last := int64(-1 << 63)
		for ; c.Valid(); c.Next() {
			if c.Bucket() < last {
				t.Fatalf("range %v: bucket %d after %d", r, c.Bucket(), last)
			}
			last = c.Bucket()
			got[fmt.Sprintf("%x/%d", c.Segment(), c.Bucket())] = fmt.Sprint(c.Vector())
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(got, want) {
			t.Errorf("range %v: cursor read %d buckets, Buckets %d: %v; want %v", r, len(got), len(want), got, want)
		}
	}
}

// legacyMerge writes a bucket the way versions before bucket groups did.
func legacyMerge(t *testing.T, s *Store, bucket int64, seg Segment, v Vector) {
	t.Helper()
	k := appendI64([]byte{prefixLegacyBucket}, bucket)
	k = append(k, seg...)
	if err := s.db.Merge(k, AppendVector(nil, v), pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

// TestConvertLegacyBuckets checks that Open converts a store of the layout
// before bucket groups: in one batch or many, and after a conversion that
// stopped between batches (the groups below 0 converted, their legacy keys
// deleted, the others not yet); and that a read-only Open refuses such a
// store.
func TestConvertLegacyBuckets(t *testing.T) {
	segs := []Segment{MakeSegment(0, nil), MakeSegment(1, []uint32{1}), MakeSegment(3, []uint32{4, 5})}
	for _, tc := range []struct {
		name       string
		batchBytes int // of a first conversion of the buckets below 0; 0 for none
	}{
		{"one batch", 0},
		{"stopped, small batches", 100},
		{"stopped, one batch", convertBatchBytes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(5, 6))
			fs := vfs.NewMem()
			s, err := Open("db", Options{FS: fs})
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{}
			sums := map[string]Vector{}
			write := func(negative bool) {
				for range 1000 {
					b, seg := rng.Int64N(3000), segs[rng.IntN(len(segs))]
					if negative {
						b = -1 - b
					}
					v := Vector{1, rng.Int64N(1 << 40)}
					legacyMerge(t, s, b, seg, v)
					k := fmt.Sprintf("%x/%d", seg, b)
					sums[k] = sums[k].Add(v)
					want[k] = fmt.Sprint(sums[k])
				}
			}
			write(true)
			if tc.batchBytes > 0 {
				if err := s.convertLegacyBuckets(false, nil, tc.batchBytes); err != nil {
					t.Fatal(err)
				}
			}
			write(false)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := Open("db", Options{FS: fs, ReadOnly: true}); err == nil {
				t.Error("read-only Open of a store in the earlier layout succeeded; want an error")
			}
			s = openMem(t, fs)
			if n := countKeys(t, s, prefixLegacyBucket); n != 0 {
				t.Errorf("%d legacy bucket keys after the conversion; want 0", n)
			}
			if got := readAll(t, s); !maps.Equal(got, want) {
				t.Errorf("after the conversion: %d buckets; want %d", len(got), len(want))
			}
		})
	}
}

// FuzzBucketGroup checks that reading a bucket group never panics, that
// the merge operator accepts what reads and returns a valid group, and that
// merging random groups adds them bucket by bucket.
func FuzzBucketGroup(f *testing.F) {
	f.Add(appendGroupEntry(appendGroupEntry(nil, 0, Vector{1, 2}), 63, Vector{-5}), []byte{1, 2, 3})
	f.Add([]byte{}, []byte{})
	f.Add([]byte{64, 1, 0}, []byte{0})
	f.Fuzz(func(t *testing.T, raw, seed []byte) {
		valid := true
		r := newGroupReader(raw)
		for {
			_, enc, ok, err := r.next()
			if err != nil {
				valid = false
				break
			}
			if !ok {
				break
			}
			if _, err := DecodeBucketVector(nil, enc); err != nil {
				valid = false
				break
			}
		}
		key := []byte{prefixBucket}
		if valid {
			// A valid group merged with itself doubles every bucket.
			m, _ := vectorMerger.Merge(key, raw)
			if err := m.MergeNewer(raw); err != nil {
				t.Fatalf("merging a valid group %x: %v", raw, err)
			}
			out, closer, err := m.Finish(true)
			if err != nil {
				t.Fatal(err)
			}
			want, got := groupSums(t, raw), groupSums(t, out)
			for off, v := range want {
				if g := got[off]; !slices.Equal(g, trimZeros(v.Add(v))) {
					t.Fatalf("self-merge of %x at %d = %v; want twice %v", raw, off, g, v)
				}
			}
			closer.Close()
		}

		// Groups built from seed merge to their bucket-wise sums.
		var groups [3][]byte
		sum := map[int]Vector{}
		for i := 0; i+2 < len(seed); i += 3 {
			g := &groups[int(seed[i])%3]
			off := int(seed[i+1]) % 64
			if r := newGroupReader(*g); len(*g) > 0 {
				last := -1
				for {
					o, _, ok, _ := r.next()
					if !ok {
						break
					}
					last = o
				}
				if off <= last {
					continue
				}
			}
			v := Vector{int64(int8(seed[i+2])), 1}
			*g = appendGroupEntry(*g, off, v)
			sum[off] = sum[off].Add(v)
		}
		m, _ := vectorMerger.Merge(key, groups[0])
		if err := m.MergeOlder(groups[1]); err != nil {
			t.Fatal(err)
		}
		if err := m.MergeNewer(groups[2]); err != nil {
			t.Fatal(err)
		}
		out, closer, err := m.Finish(true)
		if err != nil {
			t.Fatal(err)
		}
		got := groupSums(t, out)
		closer.Close()
		if len(got) != len(sum) {
			t.Fatalf("merged group has %d buckets; want %d", len(got), len(sum))
		}
		for off, v := range sum {
			if !slices.Equal(got[off], v) {
				t.Fatalf("merged bucket %d = %v; want %v", off, got[off], v)
			}
		}
	})
}

// groupSums reads a group that must be valid.
func groupSums(t *testing.T, b []byte) map[int]Vector {
	t.Helper()
	out := map[int]Vector{}
	r := newGroupReader(b)
	for {
		off, enc, ok, err := r.next()
		if err != nil {
			t.Fatalf("group %x: %v", b, err)
		}
		if !ok {
			return out
		}
		v, err := DecodeBucketVector(nil, enc)
		if err != nil {
			t.Fatalf("group %x at %d: %v", b, off, err)
		}
		out[off] = v
	}
}

// TestSparseVector checks the sparse form of a bucket's Vector on the
// shapes that matter: empty, all zeros, gaps, trailing zeros, extremes.
func TestSparseVector(t *testing.T) {
	for _, tc := range []struct {
		v    Vector
		want Vector // trailing zeros dropped
		size int
	}{
		{nil, Vector{}, 1},
		{Vector{0, 0, 0}, Vector{}, 1},
		{Vector{1}, Vector{1}, 3},
		{Vector{0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, Vector{0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 5},
		{Vector{-3, 0, 0}, Vector{-3}, 3},
		{Vector{math.MinInt64, math.MaxInt64}, Vector{math.MinInt64, math.MaxInt64}, 1 + 2*(1+10)},
	} {
		enc := appendSparse(nil, tc.v)
		got, err := DecodeBucketVector(nil, enc)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("DecodeBucketVector(appendSparse(%v)) = %v, %v; want %v", tc.v, got, err, tc.want)
		}
		if len(enc) != tc.size {
			t.Errorf("appendSparse(%v) takes %d bytes; want %d", tc.v, len(enc), tc.size)
		}
		if n, err := addSparse(nil, append(enc, 9, 9)); err != nil || n != len(enc) {
			t.Errorf("addSparse(nil, appendSparse(%v) + 2 bytes) = %d, %v; want %d", tc.v, n, err, len(enc))
		}
	}
	for _, b := range [][]byte{{}, {1}, {1, 0}, {2, 0, 2}, {1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 2}, {1, 0, 2, 7}} {
		if v, err := DecodeBucketVector(nil, b); err == nil {
			t.Errorf("DecodeBucketVector(%x) = %v; want an error", b, v)
		}
	}
}

// FuzzSparseVector checks that decoding never panics, that what decodes
// encodes to something that decodes the same, and that any vector
// round-trips but for its trailing zeros.
func FuzzSparseVector(f *testing.F) {
	f.Add(appendSparse(nil, Vector{0, 1, 0, -2, math.MaxInt64}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if v, err := DecodeBucketVector(nil, b); err == nil {
			// An encoding may hold zeros; encoding again drops those at
			// the end.
			again, err := DecodeBucketVector(nil, appendSparse(nil, v))
			if err != nil || !slices.Equal(again, trimZeros(v)) {
				t.Fatalf("decode∘encode∘decode(%x) = %v, %v; want %v", b, again, err, v)
			}
		}
		var v Vector
		for i := 0; i+8 <= len(b); i += 8 {
			v = append(v, int64(binary.LittleEndian.Uint64(b[i:])))
		}
		want := trimZeros(v)
		got, err := DecodeBucketVector(nil, appendSparse(nil, v))
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("DecodeBucketVector(appendSparse(%v)) = %v, %v", v, got, err)
		}
	})
}

func trimZeros(v Vector) Vector {
	for len(v) > 0 && v[len(v)-1] == 0 {
		v = v[:len(v)-1]
	}
	return v
}
