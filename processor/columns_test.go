package processor

import (
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/store"
)

// TestColumnsMatchStore replays weeks of randomized traffic (late records,
// conversions credited to old entry buckets, values too large for an
// int32, a bucket with more events than a count's word holds) with flushes that cross from one to thousands of bucket
// boundaries, and a restart half-way. Every few flushes it checks that the
// columns hold what the store holds from their lower bound up, and that the
// sums of every range, which the flush moved from the columns, equal the
// sums of the store's buckets at the range's position.
func TestColumnsMatchStore(t *testing.T) {
	for _, tc := range []struct {
		name   string
		clock  string
		budget int64 // bytes of the columns, 0 for the default
		weeks  int64 // of event time
		// mapAll maps every column outside the Go heap; the columns of
		// this test are below colMapBytes otherwise.
		mapAll bool
	}{
		{"event clock", ClockEvent, 0, 7, false},
		{"wall clock", ClockWall, 0, 7, true},
		// Over the budget the columns are dropped and the ranges move
		// by reading the store.
		{"over budget", ClockEvent, 64 << 10, 3, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Kafka.Topics = []TopicConfig{{Name: "events"}}
			cfg.Time.Clock = tc.clock
			cfg.Store.EntityCache = 2000
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			st := MemStore(t)
			start := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
			wall := start
			opts := Options{Now: func() time.Time { return time.UnixMilli(wall) }}
			p, err := New(cfg, st, opts)
			if err != nil {
				t.Fatal(err)
			}
			if tc.budget > 0 {
				p.colBudget = tc.budget
			}
			if tc.mapAll {
				p.colMem.mapFrom = 0
			}
			// No early flush within a batch (the burst below is larger
			// than twice the pending budget): on the event clock a flush
			// evaluates the boundaries the clock crossed with what was
			// applied then, and checkEvaluated compares with evaluating
			// once all of a batch is in.
			p.pendingLimit = 64 << 20
			rng := rand.New(rand.NewPCG(5, 6))
			sources := [][]byte{[]byte("ads"), []byte("seo"), []byte("mail"), nil}
			span := tc.weeks * (7 * 24 * time.Hour).Milliseconds()
			var off int64
			b := &Batch{Topic: "events"}
			ctx := context.Background()
			restarted := false
			flushes := 0
			// Whether the wide maps held numbers of one and two words.
			var sawWide [2]bool
			wideRestarted := false
			widenedRestarted := false
			widenedFlushing := false
			for tm := start; tm < start+span; {
				b.Records = b.Records[:0]
				// Flushes a minute to a few days of event time apart.
				next := tm + 60_000 + rng.Int64N(3*24*3600_000)/int64(1+rng.IntN(40))
				for ; tm < next; tm += rng.Int64N(10 * 60_000) {
					ent := binary.BigEndian.AppendUint32(nil, rng.Uint32N(4000))
					evt := tm
					switch rng.IntN(30) {
					case 0: // late, up to 40 days
						evt -= rng.Int64N(40 * 24 * 3600_000)
					case 1: // within grace
						evt -= rng.Int64N(5 * 60_000)
					}
					value := rng.Int64N(5000)
					if rng.IntN(200) == 0 {
						value = 3 * math.MaxInt32
					}
					source := sources[rng.IntN(len(sources))]
					if rng.IntN(300) == 0 {
						// A segment with records days apart: its sums stay
						// put over many boundaries (see checkEvaluated).
						source = []byte("rare")
					}
					b.Records = append(b.Records, Record{Offset: off, Event: Event{
						Stage: rng.IntN(3), Entity: ent, Time: evt, Value: value,
						Dims: [][]byte{source, nil},
					}})
					off++
				}
				if flushes == 3 && len(b.Records) > 0 {
					// More events in one bucket than a count's one word
					// holds, before the restart, so that loading the
					// columns meets one too.
					for i := range math.MaxInt16 + 100 {
						b.Records = append(b.Records, Record{Offset: off, Event: Event{
							Entity: fmt.Appendf(nil, "burst-%d", i), Time: tm, Dims: [][]byte{sources[0], nil},
						}})
						off++
					}
				}
				wall = tm
				p.ApplyBatch(b)
				if err := p.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				flushes++
				if !restarted && slices.ContainsFunc(p.cols.groups, func(g colGroup) bool { return g.wideOff }) {
					widenedFlushing = true
				}
				if n := len(p.colMem.h.maps); !p.colsOn && n != 0 {
					t.Fatalf("flush %d: %d mappings left with the columns off; want 0", flushes, n)
				}
				for width, n := range wideWidths(p) {
					sawWide[width] = sawWide[width] || n > 0
				}
				at := fmt.Sprintf("flush %d, clock %s", flushes, time.UnixMilli(p.clockNow()).UTC())
				if tc.clock == ClockEvent {
					checkEvaluated(t, p, at)
				}
				// A wrong number stays in a column until it is dropped,
				// so checking every few flushes finds it; the store scans
				// of a check cost more than the flushes.
				if flushes%4 == 0 || tm >= start+span {
					checkColumns(t, p, at)
				}
				if !restarted && tm > start+span/2 {
					restarted = true
					if p, err = New(cfg, st, opts); err != nil {
						t.Fatal(err)
					}
					if tc.budget > 0 {
						p.colBudget = tc.budget
					}
					if tc.mapAll {
						// Load again, into mappings, twice: the second
						// load replaces mapped columns.
						p.colMem.mapFrom = 0
						for range 2 {
							if err := p.loadRanges(p.clockNow()); err != nil {
								t.Fatal(err)
							}
						}
					}
					p.pendingLimit = 64 << 20
					checkColumns(t, p, at+", restarted")
					wideRestarted = wideWidths(p)[0] > 0
					widenedRestarted = slices.ContainsFunc(p.cols.groups, func(g colGroup) bool { return g.wideOff })
				}
			}
			if tc.budget > 0 {
				if p.colsOn {
					t.Errorf("columns on with a budget of %d bytes", tc.budget)
				}
				return
			}
			if tc.mapAll && len(p.colMem.h.maps) == 0 {
				t.Error("no column mapped outside the Go heap: the test misses a path")
			}
			if !p.colsOn {
				t.Fatal("columns off")
			}
			// The lead→deal cohorts and baselines span more than 65,536
			// buckets of the seven weeks, the flow windows less.
			var offWidths [2]int
			for _, grp := range p.cols.groups {
				if grp.wideOff {
					offWidths[1]++
				} else {
					offWidths[0]++
				}
			}
			// A flush that widens a group must fold alone (foldSegments).
			if !widenedFlushing {
				t.Error("no flush widened a group before the restart: the test misses a path")
			}
			if offWidths[0] == 0 || offWidths[1] == 0 || !widenedRestarted {
				t.Errorf("groups with one-word offsets %d, two-word %d, widened by the restart %v; want both and a restart that widens: the test misses a path",
					offWidths[0], offWidths[1], widenedRestarted)
			}
			if !sawWide[0] || !sawWide[1] || !wideRestarted {
				t.Errorf("wide maps: one-word numbers %v, two-word %v, one-word loaded by the restart %v; want all: the test misses a path",
					sawWide[0], sawWide[1], wideRestarted)
			}
		})
	}
}

// checkEvaluated checks that every segment's evaluation is the one that
// evaluating it again gives: stepping through the boundaries of a flush
// evaluates only the segments whose sums moved (stepColumns), which must
// leave none behind.
func checkEvaluated(t *testing.T, p *Processor, at string) {
	t.Helper()
	type evaluation struct {
		eval   []stepEval
		vol    volumeEval
		status []bool
	}
	before := make([]evaluation, len(p.segmentList))
	for i, s := range p.segmentList {
		before[i] = evaluation{slices.Clone(s.eval), s.vol, slices.Clone(s.status)}
	}
	p.evaluate()
	for i, s := range p.segmentList {
		if b := before[i]; !slices.Equal(b.eval, s.eval) || b.vol != s.vol || !slices.Equal(b.status, s.status) {
			t.Fatalf("%s: segment %v evaluated as %+v %+v %v; evaluating again gives %+v %+v %v", at, s.labels, b.eval, b.vol, b.status, s.eval, s.vol, s.status)
		}
	}
}

// checkColumns compares p's columns and range sums with the store.
func checkColumns(t *testing.T, p *Processor, at string) {
	t.Helper()
	l := p.layout
	vl := l.vecLen
	// One scan from the lowest bound of the ranges and the columns up.
	type cell struct {
		seg         string
		bucket      int64
		group, slot int
	}
	want := map[string][]int64{}
	stored := map[cell]int64{}
	lo := int64(math.MaxInt64)
	for _, pos := range p.positions {
		lo = min(lo, pos.lo)
	}
	for _, grp := range p.cols.groups {
		lo = min(lo, grp.from)
	}
	err := p.st.Buckets(lo, math.MaxInt64, func(b int64, key []byte, v store.Vector) {
		for r, pos := range p.positions {
			if b < pos.lo || b > pos.hi {
				continue
			}
			w := want[string(key)]
			if w == nil {
				w = make([]int64, len(l.ranges)*vl)
				want[string(key)] = w
			}
			for _, i := range p.cols.need[r] {
				if i < len(v) {
					w[r*vl+i] += v[i]
				}
			}
		}
		for g, grp := range p.cols.groups {
			if b < grp.from {
				continue
			}
			for slot, i := range grp.idx {
				if i < len(v) && v[i] != 0 {
					stored[cell{string(key), b, g, slot}] = v[i]
				}
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range p.segmentList {
		w := want[string(s.key)]
		for r := range l.ranges {
			for _, i := range p.cols.need[r] {
				var x int64
				if w != nil {
					x = w[r*vl+i]
				}
				if got := s.sum(l, r, i); got != x {
					t.Fatalf("%s: segment %x, range %d %+v at %+v, index %d: sum %d; want %d (from the store)",
						at, s.key, r, l.ranges[r], p.positions[r], i, got, x)
				}
			}
		}
	}
	if !p.colsOn {
		return
	}
	total := 0
	for g, grp := range p.cols.groups {
		stride := grp.stride
		n := 0
		for _, s := range p.segmentList {
			c := &s.cols[g]
			for e := range c.len(stride) {
				b := c.bucket(stride, e)
				if e > 0 && c.bucket(stride, e-1) >= b {
					t.Fatalf("%s: group %d of segment %x: bucket %d after %d", at, g, s.key, b, c.bucket(stride, e-1))
				}
				if b < grp.from {
					t.Fatalf("%s: group %d of segment %x holds bucket %d below its bound %d", at, g, s.key, b, grp.from)
				}
				for slot := range grp.idx {
					got, ok := c.number((c.start+e)*grp.stride+grp.at[slot], grp.two[slot])
					if !ok {
						got = s.wideValue(g, grp.stride, e, slot)
					}
					if got == 0 {
						continue
					}
					n++
					if w := stored[cell{string(s.key), b, g, slot}]; got != w {
						t.Fatalf("%s: group %d (indices %v) of segment %x, bucket %d, slot %d: %d; want %d (from the store)",
							at, g, grp.idx, s.key, b, slot, got, w)
					}
				}
			}
		}
		total += n
	}
	if total != len(stored) {
		t.Fatalf("%s: the columns hold %d non-zero numbers; the store %d", at, total, len(stored))
	}
	// Every mapping outside the Go heap holds a column's words: none was
	// left behind when a column moved.
	mapped := 0
	for _, s := range p.segmentList {
		for _, c := range s.cols {
			if offHeapHolds(p.colMem.h, c.data) {
				mapped++
			}
		}
	}
	if n := len(p.colMem.h.maps); n != mapped {
		t.Fatalf("%s: %d mappings for %d mapped columns", at, n, mapped)
	}
}

// TestSortBucketWrites checks both ways of ordering a flush's writes
// (counting by bucket and segment, comparing) against a plain sort.
func TestSortBucketWrites(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	segs := make([]*segment, 50)
	for i, r := range rng.Perm(len(segs)) {
		segs[i] = &segment{index: r}
	}
	for _, tc := range []struct {
		name   string
		n      int
		spread int64
	}{{"empty", 0, 1}, {"one", 1, 1}, {"dense", 5000, 300}, {"runs", 3000, 5000}, {"sparse", 200, 1 << 40}} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Processor{segmentList: segs}
			for range 3 { // reusing the scratch
				var bw []bucketWrite
				seen := map[[2]int64]bool{}
				for len(bw) < tc.n {
					w := bucketWrite{b: 1_000_000 - tc.spread/2 + rng.Int64N(tc.spread), s: segs[rng.IntN(len(segs))]}
					if k := [2]int64{w.b, int64(w.s.index)}; !seen[k] {
						seen[k] = true
						bw = append(bw, w)
					}
				}
				want := slices.Clone(bw)
				slices.SortFunc(want, func(x, y bucketWrite) int {
					return cmp.Or(cmp.Compare(x.s.index, y.s.index), cmp.Compare(x.b, y.b))
				})
				got := p.sortBucketWrites(bw)
				if len(got) != len(want) {
					t.Fatalf("got %d writes; want %d", len(got), len(want))
				}
				for i := range got {
					if got[i].b != want[i].b || got[i].s.index != want[i].s.index {
						t.Fatalf("write %d: got bucket %d segment %d; want bucket %d segment %d", i, got[i].b, got[i].s.index, want[i].b, want[i].s.index)
					}
				}
			}
		})
	}
}

// wideWidths counts the numbers in the wide maps that do not fit one word
// and two.
func wideWidths(p *Processor) (n [2]int) {
	for _, s := range p.segmentList {
		for k := range s.wide {
			if p.cols.groups[k.group].two[k.slot] {
				n[1]++
			} else {
				n[0]++
			}
		}
	}
	return n
}

// TestColumnNumbers checks the words of a column entry at the limits of
// what they hold: numbers that do not fit are marked for the wide map, and
// bucket offsets keep their sign.
func TestColumnNumbers(t *testing.T) {
	for _, tc := range []struct {
		two  bool
		x    int64
		fits bool
	}{
		{false, 0, true},
		{false, -1, true},
		{false, math.MaxInt16, true},
		{false, math.MaxInt16 + 1, false},
		{false, math.MinInt16 + 1, true},
		{false, math.MinInt16, false},
		{true, math.MaxInt16 + 1, true},
		{true, -70_000, true},
		{true, math.MaxInt32, true},
		{true, math.MaxInt32 + 1, false},
		{true, math.MinInt32 + 1, true},
		{true, math.MinInt32, false},
	} {
		c := column{data: make([]int16, 4)}
		c.data[3] = 7 // a neighbour, which must stay
		var fits bool
		if tc.two {
			fits = c.setNumber32(1, tc.x)
		} else {
			fits = c.setNumber16(1, tc.x)
		}
		got, ok := c.number(1, tc.two)
		if fits != tc.fits || ok != tc.fits || (ok && got != tc.x) {
			t.Errorf("two words %v, %d: got fits %v, read %d, %v; want fits %v", tc.two, tc.x, fits, got, ok, tc.fits)
		}
		if c.data[0] != 0 || c.data[3] != 7 || (!tc.two && c.data[2] != 0) {
			t.Errorf("two words %v, %d: neighbouring words changed: %v", tc.two, tc.x, c.data)
		}
	}
	// Bucket offsets, after a one-word number, in one word or two.
	for _, tc := range []struct {
		wide bool
		off  int64
		fits bool
	}{
		{false, 0, true},
		{false, 1, true},
		{false, math.MaxInt16 + 1, true},
		{false, math.MaxUint16, true},
		{false, math.MaxUint16 + 1, false},
		{false, -1, false},
		{true, 0, true},
		{true, -1, true},
		{true, math.MaxUint16 + 1, true},
		{true, -70_000, true},
		{true, math.MaxInt32, true},
		{true, math.MinInt32, true},
		{true, math.MaxInt32 + 1, false},
		{true, math.MinInt32 - 1, false},
	} {
		stride := 2
		if tc.wide {
			stride = 3
		}
		c := column{base: 1000, data: make([]int16, stride), wideOff: tc.wide}
		c.data[0] = 7
		if got := c.fits(1000 + tc.off); got != tc.fits {
			t.Errorf("wide %v, offset %d: fits %v; want %v", tc.wide, tc.off, got, tc.fits)
		}
		if !tc.fits {
			continue
		}
		c.setBucket(stride, 1000+tc.off)
		if got := c.bucket(stride, 0); got != 1000+tc.off || c.data[0] != 7 {
			t.Errorf("wide %v, offset %d: bucket %d, number %d; want %d, 7", tc.wide, tc.off, got, c.data[0], 1000+tc.off)
		}
	}
}

// TestColLayout checks the column groups of the default configuration:
// every number a range reads is in one group, and a group holds one class
// (layout.colClass) read by one set of ranges, so that a bucket with
// visits and no deal adds no zeros for the deal.
func TestColLayout(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Kafka.Topics = []TopicConfig{{Name: "events"}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	l := newLayout(&cfg)
	c := newColLayout(l)
	type groupKey struct {
		ranges string
		class  int
	}
	seen := map[groupKey]int{}
	in := map[int]int{} // vector index -> group
	for g, grp := range c.groups {
		class := l.colClass(grp.idx[0])
		for _, i := range grp.idx {
			if got := l.colClass(i); got != class {
				t.Errorf("group %d: index %d has class %d; want %d like index %d", g, i, got, class, grp.idx[0])
			}
			if prev, ok := in[i]; ok {
				t.Errorf("index %d in groups %d and %d", i, prev, g)
			}
			in[i] = g
		}
		k := groupKey{fmt.Sprint(grp.ranges), class}
		if prev, ok := seen[k]; ok {
			t.Errorf("groups %d and %d both hold class %d of ranges %v", prev, g, class, grp.ranges)
		}
		seen[k] = g
	}
	for r, need := range c.need {
		for _, i := range need {
			g, ok := in[i]
			if !ok {
				t.Errorf("range %d reads index %d, which no group holds", r, i)
				continue
			}
			if !slices.Contains(c.groups[g].ranges, r) {
				t.Errorf("range %d reads index %d of group %d, whose ranges are %v", r, i, g, c.groups[g].ranges)
			}
		}
	}
	for st := range l.stages {
		if in[l.events(st)] == in[l.value(st)] {
			t.Errorf("stage %d: events and values in one group", st)
		}
	}
	for step := range len(cfg.Funnel.Steps) {
		if in[l.entered(step)] == in[l.converted(step)] {
			t.Errorf("step %d: entered and converted in one group", step)
		}
	}
	// A flushed bucket's group bits (groupsOf) name the groups of its
	// non-zero indices; a group past the 64th has no bit and reads the
	// vector.
	for i := range l.vecLen {
		g, ok := in[i]
		want := uint64(0)
		if ok {
			want = c.groups[g].bit
		}
		if c.bits[i] != want || ok && want != 1<<g {
			t.Errorf("index %d of group %d (ok %v): bit %#x, group's %#x", i, g, ok, c.bits[i], want)
		}
	}
	far := colGroup{idx: []int{2}}
	for _, tc := range []struct {
		v    store.Vector
		want bool
	}{{store.Vector{0, 0, 5}, true}, {store.Vector{5, 5, 0}, false}, {store.Vector{5}, false}} {
		if got := far.has(&flushedBucket{v: tc.v, groups: ^uint64(0)}); got != tc.want {
			t.Errorf("group without a bit: has(%v) = %v; want %v", tc.v, got, tc.want)
		}
	}
}
