package store_test

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/funnelwatch/funnelwatch/store"
)

// open opens a store on fs (a fresh in-memory one when nil) and closes it
// when the test ends, unless the test closed it itself.
func open(t *testing.T, fs vfs.FS) *store.Store {
	t.Helper()
	if fs == nil {
		fs = vfs.NewMem()
	}
	st, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

func commit(t *testing.T, st *store.Store, fill func(b *store.Batch)) {
	t.Helper()
	b := st.NewBatch()
	fill(b)
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

// bucketRow is one row Store.Buckets visited.
type bucketRow struct {
	bucket int64
	seg    store.Segment
	v      string
}

func buckets(t *testing.T, st *store.Store, lo, hi int64) []bucketRow {
	t.Helper()
	var rows []bucketRow
	err := st.Buckets(lo, hi, func(b int64, seg []byte, v store.Vector) {
		rows = append(rows, bucketRow{b, store.Segment(seg), fmt.Sprint(v)})
	})
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

var (
	segAll    = store.MakeSegment(0, nil)
	segPaid   = store.MakeSegment(1, []uint32{3})
	segSeoEU  = store.MakeSegment(3, []uint32{4, 5})
	segSeoEU2 = store.MakeSegment(3, []uint32{4, 6})
)

func TestSegment(t *testing.T) {
	if got := segSeoEU.Breakdown(); got != 3 {
		t.Errorf("Breakdown = %d; want 3", got)
	}
	if got := segSeoEU.IDs(); !slices.Equal(got, []uint32{4, 5}) {
		t.Errorf("IDs = %v; want [4 5]", got)
	}
	if got := segAll.IDs(); len(got) != 0 {
		t.Errorf("IDs of the overall segment = %v; want none", got)
	}
}

// TestMergeAdds checks the merge operator: every AddBucket, AddTotals,
// AddHistogram and AddCounter adds to what is there, within a batch, across
// batches, and across a reopen of the store.
func TestMergeAdds(t *testing.T) {
	fs := vfs.NewMem()
	st, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	add := func(st *store.Store) {
		commit(t, st, func(b *store.Batch) {
			b.AddBucket(10, segPaid, store.Vector{1, 2})
			b.AddBucket(10, segPaid, store.Vector{10, 20, 30})
			b.AddTotals(segPaid, store.Vector{1})
			b.AddHistogram(2, store.Vector{0, 1})
			b.AddCounter(7, "consumed", "events", 5)
		})
	}
	check := func(st *store.Store, n int64) {
		t.Helper()
		want := []bucketRow{{10, segPaid, fmt.Sprint(store.Vector{11 * n, 22 * n, 30 * n})}}
		if got := buckets(t, st, 10, 10); !slices.Equal(got, want) {
			t.Errorf("after %d batches: buckets = %v; want %v", n, got, want)
		}
		var totals []string
		if err := st.Totals(func(seg store.Segment, v store.Vector) { totals = append(totals, fmt.Sprint(seg == segPaid, v)) }); err != nil {
			t.Fatal(err)
		}
		if want := []string{fmt.Sprint(true, store.Vector{n})}; !slices.Equal(totals, want) {
			t.Errorf("after %d batches: totals = %v; want %v", n, totals, want)
		}
		var hist []string
		if err := st.Histograms(func(step int, v store.Vector) { hist = append(hist, fmt.Sprint(step, v)) }); err != nil {
			t.Fatal(err)
		}
		if want := []string{fmt.Sprint(2, store.Vector{0, n})}; !slices.Equal(hist, want) {
			t.Errorf("after %d batches: histograms = %v; want %v", n, hist, want)
		}
		var counters []string
		if err := st.Counters(func(scope uint32, name, label string, v int64) {
			counters = append(counters, fmt.Sprint(scope, name, label, v))
		}); err != nil {
			t.Fatal(err)
		}
		if want := []string{fmt.Sprint(7, "consumed", "events", 5*n)}; !slices.Equal(counters, want) {
			t.Errorf("after %d batches: counters = %v; want %v", n, counters, want)
		}
	}
	add(st)
	check(st, 1)
	add(st)
	check(st, 2)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	st = open(t, fs)
	check(st, 2)
	add(st)
	check(st, 3)
}

// TestMergeManyOperands merges many operands, reopening the store in
// between so that some of them sit in flushed tables and some in the
// memtable, and checks the sum.
func TestMergeManyOperands(t *testing.T) {
	fs := vfs.NewMem()
	const batches, perBatch = 40, 200
	var st *store.Store
	for i := range batches {
		if i%10 == 0 {
			if st != nil {
				if err := st.Close(); err != nil {
					t.Fatal(err)
				}
			}
			var err error
			if st, err = store.Open("db", store.Options{FS: fs}); err != nil {
				t.Fatal(err)
			}
		}
		commit(t, st, func(b *store.Batch) {
			for j := range perBatch {
				b.AddBucket(int64(j%5), segAll, store.Vector{1, int64(i)})
			}
		})
	}
	defer st.Close()
	var want []bucketRow
	for b := range int64(5) {
		want = append(want, bucketRow{b, segAll, fmt.Sprint(store.Vector{batches * perBatch / 5, perBatch / 5 * (batches * (batches - 1) / 2)})})
	}
	if got := buckets(t, st, math.MinInt64, math.MaxInt64); !slices.Equal(got, want) {
		t.Errorf("buckets = %v; want %v", got, want)
	}
}

func TestBucketsRange(t *testing.T) {
	st := open(t, nil)
	commit(t, st, func(b *store.Batch) {
		for _, bucket := range []int64{math.MinInt64, -100, -1, 0, 1, 2, 100, math.MaxInt64} {
			b.AddBucket(bucket, segSeoEU2, store.Vector{bucket % 1000})
			b.AddBucket(bucket, segAll, store.Vector{1})
			b.AddBucket(bucket, segSeoEU, store.Vector{2})
			b.AddBucket(bucket, segPaid, store.Vector{3})
		}
	})
	keys := func(rows []bucketRow) []string {
		var out []string
		for _, r := range rows {
			out = append(out, fmt.Sprintf("%d/%x", r.bucket, string(r.seg)))
		}
		return out
	}
	for _, tc := range []struct {
		lo, hi int64
		want   []int64
	}{
		{0, 0, []int64{0}},
		{-1, 1, []int64{-1, 0, 1}},
		{-100, 2, []int64{-100, -1, 0, 1, 2}},
		{3, 99, nil},
		{2, 1, nil},
		{1, math.MaxInt64, []int64{1, 2, 100, math.MaxInt64}},
		{math.MinInt64, -1, []int64{math.MinInt64, -100, -1}},
		{math.MinInt64, math.MaxInt64, []int64{math.MinInt64, -100, -1, 0, 1, 2, 100, math.MaxInt64}},
		{math.MaxInt64, math.MaxInt64, []int64{math.MaxInt64}},
	} {
		// Group by group of 64 buckets, within a group segment by segment
		// in byte order, each segment's buckets in order.
		type row struct {
			b   int64
			seg store.Segment
		}
		var rows []row
		for _, b := range tc.want {
			for _, seg := range []store.Segment{segAll, segPaid, segSeoEU, segSeoEU2} {
				rows = append(rows, row{b, seg})
			}
		}
		slices.SortStableFunc(rows, func(x, y row) int {
			return cmp.Or(cmp.Compare(x.b>>6, y.b>>6), strings.Compare(string(x.seg), string(y.seg)))
		})
		var want []string
		for _, r := range rows {
			want = append(want, fmt.Sprintf("%d/%x", r.b, string(r.seg)))
		}
		if got := keys(buckets(t, st, tc.lo, tc.hi)); !slices.Equal(got, want) {
			t.Errorf("Buckets(%d, %d) = %v; want %v", tc.lo, tc.hi, got, want)
		}
	}
}

// TestDeleteBucketsBefore checks that retention deletes whole bucket
// groups: every bucket from the given one up stays, every group below it
// goes, and the buckets before it in its own group stay until a later
// deletion passes their group.
func TestDeleteBucketsBefore(t *testing.T) {
	st := open(t, nil)
	commit(t, st, func(b *store.Batch) {
		for bucket := int64(-70); bucket <= 140; bucket += 10 {
			b.AddBucket(bucket, segAll, store.Vector{1})
			b.AddBucket(bucket, segSeoEU, store.Vector{1})
		}
		b.AddTotals(segAll, store.Vector{7})
		b.SetMeta("clock", 5)
	})
	bucketsOf := func(seg store.Segment) []int64 {
		var got []int64
		for _, r := range buckets(t, st, math.MinInt64, math.MaxInt64) {
			if r.seg == seg {
				got = append(got, r.bucket)
			}
		}
		return got
	}
	commit(t, st, func(b *store.Batch) { b.DeleteBucketsBefore(85) })
	// Group 1 (64-127) holds 85: its buckets 70 and 80 stay.
	if got, want := bucketsOf(segAll), []int64{70, 80, 90, 100, 110, 120, 130, 140}; !slices.Equal(got, want) {
		t.Errorf("buckets after DeleteBucketsBefore(85) = %v; want %v", got, want)
	}
	commit(t, st, func(b *store.Batch) { b.DeleteBucketsBefore(128) })
	if got, want := bucketsOf(segSeoEU), []int64{130, 140}; !slices.Equal(got, want) {
		t.Errorf("buckets after DeleteBucketsBefore(128) = %v; want %v", got, want)
	}
	// Adding to a deleted bucket starts from zero; other kinds are kept.
	commit(t, st, func(b *store.Batch) { b.AddBucket(0, segAll, store.Vector{5}) })
	if got, want := buckets(t, st, 0, 0), []bucketRow{{0, segAll, "[5]"}}; !slices.Equal(got, want) {
		t.Errorf("bucket 0 re-added = %v; want %v", got, want)
	}
	var totals int
	if err := st.Totals(func(store.Segment, store.Vector) { totals++ }); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := st.Meta("clock"); err != nil || !ok || v != 5 || totals != 1 {
		t.Errorf("after deleting buckets: meta clock = %d, %v, %v and %d totals; want 5 and 1", v, ok, err, totals)
	}
}

// TestDeleteBucketsBeforeInBatch checks that a deletion removes what the
// same batch added before it, as it did when every bucket was a key.
func TestDeleteBucketsBeforeInBatch(t *testing.T) {
	st := open(t, nil)
	commit(t, st, func(b *store.Batch) {
		b.AddBucket(1, segAll, store.Vector{1})
		b.AddBucket(2, segAll, store.Vector{1})
		b.DeleteBucketsBefore(64)
		b.AddBucket(3, segAll, store.Vector{2})
	})
	if got, want := buckets(t, st, math.MinInt64, math.MaxInt64), []bucketRow{{3, segAll, "[2]"}}; !slices.Equal(got, want) {
		t.Errorf("buckets = %v; want %v", got, want)
	}
}

func TestEntities(t *testing.T) {
	fs := vfs.NewMem()
	st := open(t, fs)
	type key struct {
		partition int
		entity    string
	}
	states := map[key]store.Entity{}
	commit(t, st, func(b *store.Batch) {
		for _, p := range []int{0, 1, 256} {
			for i := range 7 {
				k := key{p, fmt.Sprintf("entity-%d", i)}
				e := store.Entity{LastSeen: int64(1000*p + i), Dims: []uint32{uint32(i)}, Reached: []int64{int64(i), store.NotReached}, Seen: []uint64{uint64(p)}}
				states[k] = e
				b.SetEntity(p, []byte(k.entity), &e)
			}
		}
		// An entity id with a zero byte and one that is a prefix of
		// another.
		for _, id := range []string{"a\x00b", "a"} {
			e := store.Entity{LastSeen: 1}
			states[key{1, id}] = e
			b.SetEntity(1, []byte(id), &e)
		}
	})
	commit(t, st, func(b *store.Batch) {
		b.DeleteEntity(0, []byte("entity-3"))
		delete(states, key{0, "entity-3"})
	})

	// Point reads, reusing the key buffer.
	var buf []byte
	for k, want := range states {
		var got store.Entity
		var found bool
		var err error
		buf, found, err = st.Entity(buf, k.partition, []byte(k.entity), &got)
		if err != nil || !found || !entityEqual(&got, &want) {
			t.Errorf("Entity(%d, %q) = %+v, %v, %v; want %+v", k.partition, k.entity, got, found, err, want)
		}
	}
	if _, found, err := st.Entity(buf, 0, []byte("entity-3"), &store.Entity{}); found || err != nil {
		t.Errorf("Entity of a deleted entity: found %v, %v", found, err)
	}
	if _, found, err := st.Entity(nil, 2, []byte("entity-1"), &store.Entity{}); found || err != nil {
		t.Errorf("Entity on another partition: found %v, %v", found, err)
	}

	// EntityKeys lists the key of every stored entity, in key order.
	var keys [][]byte
	if err := st.EntityKeys(context.Background(), func(k []byte) { keys = append(keys, bytes.Clone(k)) }); err != nil {
		t.Fatal(err)
	}
	var wantKeys [][]byte
	for k := range states {
		wantKeys = append(wantKeys, store.AppendEntityKey(nil, k.partition, []byte(k.entity)))
	}
	slices.SortFunc(wantKeys, bytes.Compare)
	if !slices.EqualFunc(keys, wantKeys, bytes.Equal) {
		t.Errorf("EntityKeys = %q; want %q", keys, wantKeys)
	}

	// Scans in chunks visit every entity once, in key order.
	for _, limit := range []int{1, 2, 3, 7, len(states), len(states) + 1, 1000} {
		var visited []key
		var after []byte
		for calls := 0; ; calls++ {
			if calls > len(states)+2 {
				t.Fatalf("limit %d: the scan does not end", limit)
			}
			n := 0
			next, err := st.Entities(after, limit, func(k []byte, partition int, entity []byte, e *store.Entity) bool {
				n++
				visited = append(visited, key{partition, string(entity)})
				if want := states[key{partition, string(entity)}]; !entityEqual(e, &want) {
					t.Errorf("entity %d/%q = %+v; want %+v", partition, entity, *e, want)
				}
				if !bytes.Equal(k, store.AppendEntityKey(nil, partition, entity)) {
					t.Errorf("key %x; want the entity key of %d/%q", k, partition, entity)
				}
				return true
			})
			if err != nil {
				t.Fatal(err)
			}
			if n > limit {
				t.Fatalf("limit %d: one call visited %d", limit, n)
			}
			if next == nil {
				break
			}
			after = next
		}
		if len(visited) != len(states) {
			t.Errorf("limit %d: visited %d entities; want %d: %v", limit, len(visited), len(states), visited)
		}
		if !slices.IsSortedFunc(visited, func(a, b key) int {
			return bytes.Compare(store.AppendEntityKey(nil, a.partition, []byte(a.entity)), store.AppendEntityKey(nil, b.partition, []byte(b.entity)))
		}) {
			t.Errorf("limit %d: visited out of key order: %v", limit, visited)
		}
		seen := map[key]bool{}
		for _, k := range visited {
			if seen[k] {
				t.Errorf("limit %d: visited %v twice", limit, k)
			}
			seen[k] = true
		}
	}

	// fn returning false stops the scan at that entity; the next scan
	// resumes after it.
	var first []key
	next, err := st.Entities(nil, 100, func(_ []byte, partition int, entity []byte, _ *store.Entity) bool {
		first = append(first, key{partition, string(entity)})
		return len(first) < 2
	})
	if err != nil || len(first) != 2 || next == nil {
		t.Fatalf("stopped scan: visited %v, next %x, %v; want 2 entities and a resume key", first, next, err)
	}
	if want := store.AppendEntityKey(nil, first[1].partition, []byte(first[1].entity)); !bytes.Equal(next, want) {
		t.Errorf("resume key = %x; want the last visited %x", next, want)
	}
	var resumed key
	if _, err := st.Entities(next, 1, func(_ []byte, partition int, entity []byte, _ *store.Entity) bool {
		resumed = key{partition, string(entity)}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if resumed == first[1] || resumed == first[0] {
		t.Errorf("resumed scan visited %v again", resumed)
	}
}

func TestOffsets(t *testing.T) {
	fs := vfs.NewMem()
	st, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	commit(t, st, func(b *store.Batch) {
		b.SetOffset("funnel-events", 0, 10)
		b.SetOffset("funnel-events", 1, 0)
		b.SetOffset("funnel-events", 70000, math.MaxInt64)
		b.SetOffset("crm-deals", 0, 3)
		b.SetOffset("crm", 0, 4)
	})
	commit(t, st, func(b *store.Batch) { b.SetOffset("funnel-events", 0, 12) })
	want := map[store.TopicPartition]int64{
		{Topic: "funnel-events", Partition: 0}:     12,
		{Topic: "funnel-events", Partition: 1}:     0,
		{Topic: "funnel-events", Partition: 70000}: math.MaxInt64,
		{Topic: "crm-deals", Partition: 0}:         3,
		{Topic: "crm", Partition: 0}:               4,
	}
	got, err := st.Offsets()
	if err != nil || !maps.Equal(got, want) {
		t.Errorf("Offsets = %v, %v; want %v", got, err, want)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st = open(t, fs)
	if got, err := st.Offsets(); err != nil || !maps.Equal(got, want) {
		t.Errorf("Offsets after reopen = %v, %v; want %v", got, err, want)
	}
}

func TestCounters(t *testing.T) {
	st := open(t, nil)
	commit(t, st, func(b *store.Batch) {
		b.AddCounter(0, "consumed", "events", 3)
		b.AddCounter(1, "consumed", "events", 4)
		b.AddCounter(0, "invalid:bad_time", "events", 1)
		b.AddCounter(store.GlobalScope, "overflow", "source", 2)
		b.AddCounter(store.GlobalScope, "overflow", "", 1)
	})
	commit(t, st, func(b *store.Batch) {
		b.AddCounter(0, "consumed", "events", 2)
		b.AddCounter(store.GlobalScope, "overflow", "source", -2)
	})
	got := map[string]int64{}
	if err := st.Counters(func(scope uint32, name, label string, v int64) {
		got[fmt.Sprintf("%d/%s/%s", scope, name, label)] = v
	}); err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{
		"0/consumed/events":          5,
		"1/consumed/events":          4,
		"0/invalid:bad_time/events":  1,
		"4294967295/overflow/source": 0,
		"4294967295/overflow/":       1,
	}
	if !maps.Equal(got, want) {
		t.Errorf("Counters = %v; want %v", got, want)
	}
}

func TestDictionary(t *testing.T) {
	st := open(t, nil)
	values := map[[2]string]uint32{
		{"source", "paid_search"}: 3,
		{"source", "seo"}:         4,
		{"region", "emea"}:        3,
		{"region", ""}:            5,
		{"region", `a",b="c`}:     6,
		{"region", "x\x00y"}:      7,
	}
	commit(t, st, func(b *store.Batch) {
		for k, id := range values {
			b.SetDictValue(k[0], k[1], id)
		}
	})
	got := map[[2]string]uint32{}
	if err := st.Dictionary(func(dim, value string, id uint32) { got[[2]string{dim, value}] = id }); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, values) {
		t.Errorf("Dictionary = %v; want %v", got, values)
	}
}

func TestMeta(t *testing.T) {
	st := open(t, nil)
	if v, ok, err := st.Meta("clock"); err != nil || ok {
		t.Errorf("Meta of an unset name = %d, %v, %v; want not set", v, ok, err)
	}
	for _, x := range []int64{0, -1, 1793606400000, math.MinInt64, math.MaxInt64} {
		commit(t, st, func(b *store.Batch) {
			b.SetMeta("clock", x)
			b.SetMeta("history_start", -x)
		})
		if v, ok, err := st.Meta("clock"); err != nil || !ok || v != x {
			t.Errorf("Meta(clock) = %d, %v, %v; want %d", v, ok, err, x)
		}
		if v, ok, err := st.Meta("history_start"); err != nil || !ok || v != -x {
			t.Errorf("Meta(history_start) = %d, %v, %v; want %d", v, ok, err, -x)
		}
	}
}

func TestStatuses(t *testing.T) {
	st := open(t, nil)
	commit(t, st, func(b *store.Batch) {
		b.SetStatus(segPaid, store.Vector{1, 0})
		b.SetStatus(segAll, store.Vector{0, 0})
	})
	commit(t, st, func(b *store.Batch) { b.SetStatus(segPaid, store.Vector{0, 1}) })
	got := map[store.Segment]string{}
	if err := st.Statuses(func(seg store.Segment, v store.Vector) { got[seg] = fmt.Sprint(v) }); err != nil {
		t.Fatal(err)
	}
	if want := map[store.Segment]string{segPaid: "[0 1]", segAll: "[0 0]"}; !maps.Equal(got, want) {
		t.Errorf("Statuses = %v; want %v (a status is set, not added)", got, want)
	}
}

// TestBatchAtomic checks that a closed, uncommitted batch writes nothing.
func TestBatchAtomic(t *testing.T) {
	st := open(t, nil)
	b := st.NewBatch()
	b.AddBucket(1, segAll, store.Vector{1})
	b.SetOffset("events", 0, 5)
	b.SetMeta("clock", 1)
	if b.Len() == 0 {
		t.Error("Len of a batch with writes = 0")
	}
	b.Close()
	if rows := buckets(t, st, math.MinInt64, math.MaxInt64); len(rows) != 0 {
		t.Errorf("buckets of a discarded batch: %v", rows)
	}
	if offs, err := st.Offsets(); err != nil || len(offs) != 0 {
		t.Errorf("offsets of a discarded batch: %v, %v", offs, err)
	}
	if _, ok, _ := st.Meta("clock"); ok {
		t.Error("meta of a discarded batch is set")
	}
}

func TestReadOnly(t *testing.T) {
	fs := vfs.NewMem()
	st, err := store.Open("db", store.Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	commit(t, st, func(b *store.Batch) { b.AddBucket(1, segAll, store.Vector{4}) })
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := store.Open("db", store.Options{FS: fs, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if got, want := buckets(t, ro, 1, 1), []bucketRow{{1, segAll, "[4]"}}; !slices.Equal(got, want) {
		t.Errorf("read-only buckets = %v; want %v", got, want)
	}
	if ro.DiskBytes() == 0 {
		t.Error("DiskBytes of a store with data = 0")
	}
}

// TestDiskBytes checks that DiskBytes follows what is written before any
// memtable is flushed: the write-ahead log holds it all then.
func TestDiskBytes(t *testing.T) {
	st := open(t, nil)
	before := st.DiskBytes()
	// Each bucket takes at least its four bytes (offset, length, numbers).
	const n = 20_000
	commit(t, st, func(b *store.Batch) {
		for i := range n {
			b.AddBucket(int64(i), segSeoEU, store.Vector{1, 2, 3})
		}
	})
	if got, want := st.DiskBytes()-before, uint64(n*5); got < want {
		t.Errorf("DiskBytes grew by %d after committing %d buckets; want at least %d", got, n, want)
	}
}
