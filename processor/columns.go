package processor

import (
	"cmp"
	"encoding/binary"
	"math"
	"slices"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/store"
)

// Moving a range reads the buckets that enter and leave it. On the event
// clock a catch-up moves the alerting ranges through every bucket boundary,
// and reading those buckets back from Pebble once per range edge (26 edges
// with the default steps) bounded a replay. So every segment keeps, for the
// span of the ranges, the few numbers of each bucket the ranges' sums use
// in memory: its columns. loadRanges fills them with its one scan, each
// flush adds its committed deltas, and buckets that fall below every range
// that reads them are dropped, so that moving a range reads memory.
//
// The vector indices are grouped by the ranges that read them (with the
// default configuration: the flow windows over a week; each step's horizon
// and baseline weeks; the volume baselines) and by their class
// (layout.colClass: a stage's events and entities, a stage's sum of
// values, a step's entered, a step's converted), and a group's column
// holds the buckets from the lowest bound of its ranges up, sparse: a
// bucket whose numbers in the group are all zero takes nothing. Most
// buckets of a segment have visits but no deal, so a group per class
// leaves out what one per set of ranges held as zeros. A column is a
// slice of 16-bit words. An entry is the group's numbers, a count in one
// word (a minute's count in a segment is rarely above 32,767), a sum of
// values, in thousandths, in two, then the bucket as an offset from the
// column's base: one word while the group's columns span less than 65,536
// buckets, two once one spans more (colWiden). A number that does not fit
// is kept exact in the segment's wide map. At the end of the default bench
// the entries took 98 MiB with int32 words, 68 MiB with 16-bit ones,
// 51 MiB with the classes and 34 MiB with one-word offsets
// (docs/performance.md).

// colGroup is a set of vector indices read by the same ranges.
type colGroup struct {
	idx    []int // vector indices, in order
	ranges []int // the ranges that read them
	// stride is the words of an entry; at and two are, per index, the
	// word of the entry its number starts at and whether it takes two.
	stride int
	at     []int
	two    []bool
	// wideOff is whether the bucket offsets, after the numbers, take two
	// words rather than one (colWiden).
	wideOff bool
	// from is the lowest bucket from which the columns of the group hold
	// every stored bucket; a range move below it reads the store.
	from int64
	// bit is the group's bit in a flushed bucket's groups: 1 << its
	// index, or 0 beyond the 64th group.
	bit uint64
}

// has reports whether flushed bucket f has a number other than zero in
// the group.
func (g *colGroup) has(f *flushedBucket) bool {
	if g.bit != 0 {
		return f.groups&g.bit != 0
	}
	return g.holds(f.v)
}

// holds reports whether v has a number other than zero in the group.
func (g *colGroup) holds(v store.Vector) bool {
	for _, i := range g.idx {
		if i < len(v) && v[i] != 0 {
			return true
		}
	}
	return false
}

// groupsOf returns the colGroup.bit of every group v has a number other
// than zero in, found in one pass over v rather than one per group.
func (c *colLayout) groupsOf(v store.Vector) uint64 {
	var m uint64
	for k, x := range v {
		if x != 0 {
			m |= c.bits[k]
		}
	}
	return m
}

// colOp adds the value in slot of a column entry to sums[off].
type colOp struct {
	slot int
	at   int  // the word of an entry where the slot's number starts
	two  bool // whether it takes two words
	off  int
	sign int64
}

// colLayout is the grouping of the vector indices into columns.
type colLayout struct {
	groups []colGroup
	// bits is, per vector index, the bit of its group (colGroup.bit).
	bits []uint64
	// need is, per range, the vector indices its sums are read at.
	need [][]int
	// ops is, per range and group, how an entry adds to the range's sums.
	ops [][][]colOp
}

func newColLayout(l *layout) *colLayout {
	need := make([][]bool, len(l.ranges))
	for r := range need {
		need[r] = make([]bool, l.vecLen)
	}
	for _, r := range l.flow {
		for st := range l.stages {
			need[r][l.events(st)] = true
			need[r][l.entities(st)] = true
			need[r][l.value(st)] = true
		}
	}
	for t, sl := range l.steps {
		rs := slices.Clone(sl.baseline)
		for _, r := range sl.cohort {
			rs = append(rs, r)
		}
		for _, r := range rs {
			need[r][l.entered(t)] = true
			need[r][l.converted(t)] = true
		}
	}
	for _, r := range append([]int{l.volume.current}, l.volume.baseline...) {
		need[r][l.entities(l.firstStage)] = true
	}
	c := &colLayout{need: make([][]int, len(l.ranges))}
	byKey := map[string]int{} // class, then ranges
	for i := range l.vecLen {
		var rs []int
		key := binary.AppendUvarint(nil, uint64(l.colClass(i)))
		for r := range l.ranges {
			if need[r][i] {
				rs = append(rs, r)
				key = append(key, byte(r), byte(r>>8))
				c.need[r] = append(c.need[r], i)
			}
		}
		if len(rs) == 0 {
			continue
		}
		g, ok := byKey[string(key)]
		if !ok {
			g = len(c.groups)
			byKey[string(key)] = g
			c.groups = append(c.groups, colGroup{ranges: rs})
		}
		c.groups[g].idx = append(c.groups[g].idx, i)
	}
	c.bits = make([]uint64, l.vecLen)
	for g := range min(len(c.groups), 64) {
		c.groups[g].bit = 1 << g
		for _, i := range c.groups[g].idx {
			c.bits[i] = 1 << g
		}
	}
	isValue := make([]bool, l.vecLen)
	for st := range l.stages {
		isValue[l.value(st)] = true
	}
	for g := range c.groups {
		grp := &c.groups[g]
		for _, i := range grp.idx {
			grp.at = append(grp.at, grp.stride)
			grp.two = append(grp.two, isValue[i])
			grp.stride++
			if isValue[i] {
				grp.stride++
			}
		}
		grp.stride++ // the bucket offset
	}
	c.ops = make([][][]colOp, len(l.ranges))
	for r := range l.ranges {
		c.ops[r] = make([][]colOp, len(c.groups))
		for g, grp := range c.groups {
			for slot, i := range grp.idx {
				if need[r][i] {
					c.ops[r][g] = append(c.ops[r][g], colOp{slot: slot, at: grp.at[slot], two: grp.two[slot], off: r*l.vecLen + i, sign: 1})
				}
			}
		}
	}
	return c
}

// wideKey names a number of a column that does not fit its words.
type wideKey struct {
	group, slot int
	bucket      int64
}

// wordBytes is the size of a column's word.
const wordBytes = 2

// column is one group's entries of one segment, in bucket order: per
// entry, the group's numbers, then the bucket's offset from base, in the
// last word (a uint16) or, once its group is widened, the last two (an
// int32). Most columns span less than 65,536 buckets (45 days of minutes),
// and an entry of one count then takes two words rather than three.
type column struct {
	base    int64
	start   int // entries before start are dropped
	data    []int16
	wideOff bool // the group's wideOff, set with the column's first entry
}

func (c *column) len(stride int) int { return len(c.data)/stride - c.start }

func (c *column) bucket(stride, e int) int64 {
	k := (c.start + e + 1) * stride
	if c.wideOff {
		return c.base + int64(c.int32At(k-2))
	}
	return c.base + int64(uint16(c.data[k-1]))
}

// fits reports whether bucket b's offset from base fits the column's.
func (c *column) fits(b int64) bool {
	if c.wideOff {
		return b-c.base >= math.MinInt32 && b-c.base <= math.MaxInt32
	}
	return b >= c.base && b-c.base <= math.MaxUint16
}

// setBucket sets the bucket of the entry whose words end before word k.
func (c *column) setBucket(k int, b int64) {
	if c.wideOff {
		c.setInt32(k-2, int32(b-c.base))
	} else {
		c.data[k-1] = int16(uint16(b - c.base))
	}
}

// int32At is the int32 in words k and k+1.
func (c *column) int32At(k int) int32 { return int32(c.data[k])<<16 | int32(uint16(c.data[k+1])) }

func (c *column) setInt32(k int, x int32) { c.data[k], c.data[k+1] = int16(x>>16), int16(x) }

// number returns the number at word k, in two words or one; ok is false
// when the number is kept in the wide map (the words hold the smallest
// value they can).
func (c *column) number(k int, two bool) (x int64, ok bool) {
	if two {
		y := c.int32At(k)
		return int64(y), y != math.MinInt32
	}
	return int64(c.data[k]), c.data[k] != math.MinInt16
}

// setNumber16 stores x at word k if it fits one word, and the wide mark
// if not; it reports whether x fits. setNumber32 does the same in words k
// and k+1. Callers choose by the slot's width, so that both inline.
func (c *column) setNumber16(k int, x int64) bool {
	fits := uint64(x-math.MinInt16-1) <= math.MaxUint16-1 // in (MinInt16, MaxInt16]
	if !fits {
		x = math.MinInt16
	}
	c.data[k] = int16(x)
	return fits
}

func (c *column) setNumber32(k int, x int64) bool {
	fits := x > math.MinInt32 && x <= math.MaxInt32
	if !fits {
		x = math.MinInt32
	}
	c.setInt32(k, int32(x))
	return fits
}

// nextBucket is the bucket of entry e, or MaxInt64 past the last entry.
func (c *column) nextBucket(stride, e int) int64 {
	if e >= c.len(stride) {
		return math.MaxInt64
	}
	return c.bucket(stride, e)
}

// search returns the first entry at or after bucket b.
func (c *column) search(stride int, b int64) int { return c.searchIn(stride, 0, c.len(stride), b) }

// searchIn returns the first entry at or after bucket b among the entries
// lo to hi, hi if there is none.
func (c *column) searchIn(stride, lo, hi int, b int64) int {
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if c.bucket(stride, m) < b {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// wideValue returns slot of entry e of group g's column, a number kept in
// the wide map. Readers call column.number first, which inlines.
func (s *segment) wideValue(g, stride, e, slot int) int64 {
	return s.wide[wideKey{g, slot, s.cols[g].bucket(stride, e)}]
}

// colBudget bounds the bytes of the columns' entries. The columns hold at
// most the buckets of the ranges' span that have records, which is bounded
// by the configuration (segments, windows, horizons, baseline weeks); a
// configuration whose columns would hold more (many segments with records
// in most buckets) moves its ranges by reading the store, as without them.
const colBudget = 256 << 20

// colAddGroup adds the committed delta v of bucket b to the segment's
// column of group g, widening the group's offsets when b's does not fit
// one word. It reports false when a bucket offset does not fit an int32 (a
// span of more than 2^31 buckets) or the columns outgrow colBudget, and
// the columns cannot be used.
func (p *Processor) colAddGroup(s *segment, g int, b int64, v store.Vector) bool {
	grp := &p.cols.groups[g]
	if b < grp.from {
		return true // below every range that reads the group
	}
	if !grp.holds(v) {
		return true
	}
	stride := grp.stride
	c := &s.cols[g]
	n := c.len(stride)
	e := n
	if n > 0 && c.bucket(stride, n-1) >= b {
		e = c.search(stride, b)
	}
	if e == n || c.bucket(stride, e) != b {
		if n == 0 {
			c.wideOff = grp.wideOff
		}
		if !c.insert(p.colMem, stride, e, b) {
			if grp.wideOff {
				return false
			}
			p.colWiden(g)
			return p.colAddGroup(s, g, b, v)
		}
		if p.colBytes.Add(wordBytes*int64(stride)) > p.colBudget {
			return false
		}
	}
	p.colAddEntry(s, g, e, b, v)
	return true
}

// colAddEntry adds v to entry e, of bucket b, of group g's column.
func (p *Processor) colAddEntry(s *segment, g, e int, b int64, v store.Vector) {
	grp := &p.cols.groups[g]
	c := &s.cols[g]
	at := (c.start + e) * grp.stride
	for slot, i := range grp.idx {
		if i >= len(v) || v[i] == 0 {
			continue
		}
		d := v[i]
		k, two := at+grp.at[slot], grp.two[slot]
		x, ok := c.number(k, two)
		if !ok {
			s.wide[wideKey{g, slot, b}] += d
			continue
		}
		sum := x + d
		if two && c.setNumber32(k, sum) || !two && c.setNumber16(k, sum) {
			continue
		}
		if s.wide == nil {
			s.wide = map[wideKey]int64{}
		}
		s.wide[wideKey{g, slot, b}] = sum
	}
}

// insert makes an entry of zeros for bucket b at entry e. It reports
// false, changing nothing, when the span of the column's buckets with b
// does not fit its offsets.
func (c *column) insert(m colMem, stride, e int, b int64) bool {
	n := c.len(stride)
	if n == 0 {
		c.data, c.start, c.base = c.data[:0], 0, b
	}
	if !c.fits(b) {
		// Rebase on the first bucket.
		first, last := min(b, c.bucket(stride, 0)), max(b, c.bucket(stride, n-1))
		old := *c
		c.base = first
		if !c.fits(last) {
			*c = old
			return false
		}
		for e := range n {
			c.setBucket((c.start+e+1)*stride, old.bucket(stride, e))
		}
	}
	at, end := (c.start+e)*stride, len(c.data)
	c.extend(m, stride)
	copy(c.data[at+stride:], c.data[at:end])
	clear(c.data[at : at+stride])
	c.setBucket(at+stride, b)
	return true
}

// extend adds words to the end of the column. It grows the slice by an
// eighth, not by append's quarter: the columns are a large part of the
// memory, and copying a column when it grows costs little beside the
// flushes that fill it.
func (c *column) extend(m colMem, words int) {
	n := len(c.data)
	if n+words <= cap(c.data) {
		c.data = c.data[:n+words]
		return
	}
	d := m.alloc(n+words, n+words+max(n/8, 256))
	copy(d, c.data)
	m.free(c.data)
	c.data = d
}

// colMapBytes is the size from which a column's words are mapped outside
// the Go heap: the columns of the busiest segments, a few hundred with
// the default bench, hold most of the columns' bytes, and a bound on
// their count (the column budget over colMapBytes) keeps the number of
// mappings far below the system's limit.
const colMapBytes = 64 << 10

// colMem allocates the words of columns and start-up chunks: those of
// mapFrom bytes or more outside the Go heap (see offHeap).
type colMem struct {
	h       *offHeap
	mapFrom int
}

// alloc returns words of length n and capacity c. Free them with free.
func (m colMem) alloc(n, c int) []int16 {
	if c*wordBytes < m.mapFrom {
		return make([]int16, n, c)
	}
	return offHeapSlice[int16](m.h, c)[:n]
}

// free frees words from alloc: a mapping goes back to the system, the Go
// heap's words to the collector. They must not be used after.
func (m colMem) free(d []int16) {
	if offHeapHolds(m.h, d) {
		offHeapFree(m.h, d)
	}
}

// colWiden makes the bucket offsets of group g two words: a column of it
// spans 65,536 buckets or more (with one-minute buckets, more than 45
// days: with the defaults, the lead→deal cohorts and baselines of a store
// older than that). Every column of the group, and the chunks the
// start-up scan is filling, is rewritten with the wider entries.
func (p *Processor) colWiden(g int) {
	grp := &p.cols.groups[g]
	old := grp.stride
	grp.stride++
	grp.wideOff = true
	// widen returns the words of data, from word from on, widened, and
	// frees data.
	widen := func(data []int16, from, capEntries int) []int16 {
		live := data[from:]
		n := len(live) / old
		src := column{data: live}
		dst := column{data: p.colMem.alloc(n*(old+1), capEntries*(old+1)), wideOff: true}
		for e := range n {
			copy(dst.data[e*(old+1):], live[e*old:(e+1)*old-1])
			dst.setBucket((e+1)*(old+1), src.bucket(old, e))
		}
		p.colMem.free(data)
		return dst.data
	}
	for _, s := range p.segmentList {
		c := &s.cols[g]
		n := c.len(old)
		p.colBytes.Add(wordBytes * int64(n))
		c.data, c.start, c.wideOff = widen(c.data, c.start*old, n), 0, true
		if s.fill != nil {
			for i, ch := range s.fill[g] {
				p.colBytes.Add(wordBytes * int64(len(ch)/old))
				s.fill[g][i] = widen(ch, 0, cap(ch)/old)
			}
		}
	}
}

// colDrop drops the entries below every range that reads their group, at
// the current positions.
func (p *Processor) colDrop() {
	for g := range p.cols.groups {
		grp := &p.cols.groups[g]
		bound := int64(math.MaxInt64)
		for _, r := range grp.ranges {
			bound = min(bound, p.positions[r].lo)
		}
		if bound <= grp.from {
			continue
		}
		grp.from = bound
		stride := grp.stride
		for _, s := range p.segmentList {
			c := &s.cols[g]
			e := c.search(stride, bound)
			if e == 0 {
				continue
			}
			if s.wide != nil {
				for k := range s.wide {
					if k.group == g && k.bucket < bound {
						delete(s.wide, k)
					}
				}
			}
			c.start += e
			p.colBytes.Add(-wordBytes * int64(stride*e))
			// Compact once the dropped entries are a quarter of the
			// column: dropping costs O(1) per entry (three entries copied
			// per entry dropped), and a column holds at most a third more
			// than its live entries (with a half, the columns took twice
			// their live bytes).
			if c.start*stride >= len(c.data)/4 {
				live := c.data[c.start*stride:]
				if cap(c.data) > 1024 && len(live) < cap(c.data)/4 {
					// A column that shrank a lot: give the room back.
					d := p.colMem.alloc(len(live), len(live)+len(live)/8)
					copy(d, live)
					p.colMem.free(c.data)
					c.data, c.start = d, 0
					continue
				}
				n := copy(c.data, live)
				c.data, c.start = c.data[:n], 0
			}
		}
	}
}

// colCovers reports whether the columns hold every bucket of iv that
// range r reads.
func (p *Processor) colCovers(r int, iv position) bool {
	if !p.colsOn {
		return false
	}
	for g, ops := range p.cols.ops[r] {
		if len(ops) > 0 && iv.lo < p.cols.groups[g].from {
			return false
		}
	}
	return true
}

// colScan adds (sign +1) or subtracts (-1) the buckets of iv to range r's
// sums of every segment, from the columns.
func (p *Processor) colScan(r int, iv position, sign int64) {
	for g, ops := range p.cols.ops[r] {
		if len(ops) == 0 {
			continue
		}
		stride := p.cols.groups[g].stride
		for _, s := range p.segmentList {
			c := &s.cols[g]
			n := c.len(stride)
			if n == 0 {
				continue
			}
			for e := c.search(stride, iv.lo); e < n && c.bucket(stride, e) <= iv.hi; e++ {
				at := (c.start + e) * stride
				for _, op := range ops {
					x, ok := c.number(at+op.at, op.two)
					if !ok {
						x = s.wideValue(g, stride, e, op.slot)
					}
					s.sums[op.off] += sign * x
				}
			}
		}
	}
}

// colReset empties every segment's columns and makes them complete from
// bucket from: loadRanges then fills them from the store.
func (p *Processor) colReset(from int64) {
	p.colBytes.Store(0)
	for g := range p.cols.groups {
		p.cols.groups[g].from = from
	}
	for _, s := range p.segmentList {
		for g := range s.cols {
			s.cols[g] = column{data: s.cols[g].data[:0]}
		}
		s.wide = nil
	}
}

// colDisable stops using the columns: every range move reads the store.
func (p *Processor) colDisable() {
	p.colsOn = false
	p.colBytes.Store(0)
	for _, s := range p.segmentList {
		for _, c := range s.cols {
			p.colMem.free(c.data)
		}
		for _, chunks := range s.fill {
			for _, ch := range chunks {
				p.colMem.free(ch)
			}
		}
		s.cols, s.wide, s.fill = nil, nil, nil
	}
}

// segWorkers is how many goroutines fold and step the segments after a
// commit (foldSegments, stepColumns). Segments share nothing those write,
// and the flushes, half of which is folding and stepping, bound the rate
// of a catch-up.
const segWorkers = 2

// segWork is the scratch of one of those goroutines.
type segWork struct {
	// of colMerge
	adds []flushedBucket
	at   []int
	ins  []colInsert
	// of stepSegment
	cur         []stepCursor // per tap and group, its cursor
	due         []int64      // per tap, the boundary its cursors pass an entry at
	statusDirty []*segment   // the segments whose status changed
}

// eachSegment calls fn for every segment of segs from segWorkers
// goroutines and returns when all calls have. fn must write nothing but
// its segment and its scratch. Goroutine i takes segments i, i+segWorkers
// and so on: handing out the next segment not yet taken balanced no
// better in the bench, and with a fixed share every goroutine writes in
// the tests, where a segment's work is so small that the first goroutine
// could take all of them and hide a race from the race detector.
func (p *Processor) eachSegment(segs []*segment, fn func(w *segWork, s *segment)) {
	var g errgroup.Group
	for i := range p.segWork {
		w := &p.segWork[i]
		g.Go(func() error {
			for k := i; k < len(segs); k += len(p.segWork) {
				fn(w, segs[k])
			}
			return nil
		})
	}
	_ = g.Wait() // fn returns no error
}

// foldSegments folds the committed deltas of segs (foldFlushed), from
// several goroutines unless a column may need wider offsets: colWiden
// rewrites the columns of every segment.
func (p *Processor) foldSegments(segs []*segment) {
	if p.colsOn && p.colMayWiden(segs) {
		for _, s := range segs {
			if !p.foldFlushed(&p.segWork[0], s) {
				p.colDisable()
			}
		}
		return
	}
	var failed atomic.Bool
	p.eachSegment(segs, func(w *segWork, s *segment) {
		if !p.foldFlushed(w, s) {
			failed.Store(true)
		}
	})
	if failed.Load() {
		p.colDisable()
	}
}

// colMayWiden reports whether folding the committed deltas of segs may
// add a bucket to a column whose one-word offsets cannot span it with
// the column's entries (colAddGroup then widens the group). It looks at
// each segment's lowest and highest flushed bucket a group keeps, so it
// may say yes where no delta has a number in the group.
func (p *Processor) colMayWiden(segs []*segment) bool {
	for _, s := range segs {
		fl := s.flushed
		if len(fl) == 0 {
			continue
		}
		for g := range p.cols.groups {
			grp := &p.cols.groups[g]
			if grp.wideOff {
				continue
			}
			i, _ := slices.BinarySearchFunc(fl, grp.from, func(f flushedBucket, b int64) int { return cmp.Compare(f.b, b) })
			if i == len(fl) {
				continue
			}
			lo, hi := fl[i].b, fl[len(fl)-1].b
			c := &s.cols[g]
			if n := c.len(grp.stride); n > 0 {
				lo, hi = min(lo, c.bucket(grp.stride, 0)), max(hi, c.bucket(grp.stride, n-1))
			}
			if hi-lo > math.MaxUint16 {
				return true
			}
		}
	}
	return false
}

// foldFlushed adds the committed deltas of s to the sums of the ranges at
// their current positions and to the segment's columns, in bucket order,
// so that the buckets new to a column append to it. It reports false when
// the columns cannot be used any more (colMerge) and must be disabled.
// It writes only s, w, the columns' memory (colMem) and colBytes, and
// widens a group only when colMayWiden said it may.
func (p *Processor) foldFlushed(w *segWork, s *segment) bool {
	fl := s.flushed
	// fl is in bucket order: each range adds the run of it that it holds,
	// rather than each bucket checking every range.
	vl := p.layout.vecLen
	for r, pos := range p.positions {
		i, _ := slices.BinarySearchFunc(fl, pos.lo, func(f flushedBucket, b int64) int { return cmp.Compare(f.b, b) })
		sums := s.sums[r*vl : (r+1)*vl]
		for ; i < len(fl) && fl[i].b <= pos.hi; i++ {
			v := fl[i].v
			for _, k := range p.cols.need[r] {
				if k < len(v) {
					sums[k] += v[k]
				}
			}
		}
	}
	if p.colsOn {
		for g := range p.cols.groups {
			if !p.colMerge(w, s, g, fl) {
				return false
			}
		}
	}
	return true
}

// flushedBucket is a bucket's committed delta.
type flushedBucket struct {
	b      int64
	v      store.Vector
	groups uint64 // the colGroup.bit of the groups v has numbers in
}

// colMerge adds the flushed deltas fl (in bucket order) of s to its column
// of group g. The records of a catch-up come from partitions at different
// event times, so a flush's buckets can fall before the last one a column
// holds: it finds each delta's entry by galloping from the previous one,
// makes room for all the new entries at once, moving each run of entries
// between two new ones once, then adds.
func (p *Processor) colMerge(w *segWork, s *segment, g int, fl []flushedBucket) bool {
	grp := &p.cols.groups[g]
	stride := grp.stride
	c := &s.cols[g]
	// The deltas with numbers in the group, at or above its bound.
	add := w.adds[:0]
	defer func() { clear(add); w.adds = add[:0] }()
	for i := range fl {
		if fl[i].b >= grp.from && grp.has(&fl[i]) {
			add = append(add, fl[i])
		}
	}
	if len(add) == 0 {
		return true
	}
	n := c.len(stride)
	if n == 0 || !c.fits(add[0].b) || !c.fits(add[len(add)-1].b) {
		// An empty column, or one to rebase: one entry at a time.
		for _, f := range add {
			if !p.colAddGroup(s, g, f.b, f.v) {
				return false
			}
		}
		return true
	}
	// Find each delta's entry, galloping from the previous one: a catch-up
	// flush adds to a few runs of buckets far apart (one per partition).
	// at[i] is where add[i]'s entry will be once the new entries are in;
	// ins holds the new entries' places in the column as it is.
	at, ins := w.at[:0], w.ins[:0]
	e := 0
	for _, f := range add {
		e = c.seek(stride, e, f.b)
		at = append(at, e+len(ins))
		if e == n || c.bucket(stride, e) != f.b {
			ins = append(ins, colInsert{e, f.b})
		}
	}
	w.at, w.ins = at[:0], ins[:0]
	if k := len(ins); k > 0 {
		// Move each run of entries between two new ones once, from the
		// back, by the number of new entries before it.
		c.extend(p.colMem, k*stride)
		hi := n
		for j := k - 1; j >= 0; j-- {
			lo := ins[j].e
			copy(c.data[(c.start+lo+j+1)*stride:], c.data[(c.start+lo)*stride:(c.start+hi)*stride])
			word := (c.start + lo + j) * stride
			clear(c.data[word : word+stride])
			c.setBucket(word+stride, ins[j].b)
			hi = lo
		}
		if p.colBytes.Add(wordBytes*int64(k*stride)) > p.colBudget {
			return false
		}
	}
	for i, f := range add {
		p.colAddEntry(s, g, at[i], f.b, f.v)
	}
	return true
}

// colInsert is a new entry of a column: its bucket, to go before entry e.
type colInsert struct {
	e int
	b int64
}

// seek returns the first entry at or after bucket b, searching from entry
// e on (the entries before e are below b): it gallops, so that finding an
// entry d entries on costs O(log d).
func (c *column) seek(stride, e int, b int64) int {
	n := c.len(stride)
	step, hi := 1, e
	for hi < n && c.bucket(stride, hi) < b {
		e = hi + 1
		hi += step
		step *= 2
	}
	return c.searchIn(stride, e, min(hi, n), b)
}

// tapOps sets, for every tap, the column groups its ranges read and how
// an entry adds to their sums.
func (c *colLayout) tapOps(taps []*tap) {
	for _, t := range taps {
		t.groups, t.ops = nil, nil
		for g := range c.groups {
			var ops []colOp
			for _, sub := range t.subs {
				for _, op := range c.ops[sub.r][g] {
					op.sign = sub.sign
					ops = append(ops, op)
				}
			}
			if len(ops) > 0 {
				t.groups = append(t.groups, g)
				t.ops = append(t.ops, ops)
			}
		}
	}
}

// stepColumns is step from the columns. It reports false, having moved
// nothing, when a tap would read below the columns.
//
// It steps one segment at a time through all the boundaries: a segment's
// sums and flags depend only on its own columns and on how many baseline
// weeks are in the history at each boundary, which is the same for every
// segment. A tap's position at boundary b is b less a constant (b*bucket
// is a whole number of buckets, see rangeSpec.bounds), so each cursor
// knows the boundary at which it passes its next entry, and a segment
// visits only the boundaries where one of its cursors does so or where
// every segment is evaluated: the first, and each where the baseline
// weeks change. Stepping all segments boundary by boundary instead
// checked every cursor at nearly every boundary, and read each segment's
// columns from memory again at each. Segments being independent, several
// goroutines step them (eachSegment).
func (p *Processor) stepColumns(from, to int64) bool {
	if !p.colsOn {
		return false
	}
	for _, t := range p.evalTaps {
		t.rewind(p.positions)
		for _, g := range t.groups {
			if t.pos+1 < p.cols.groups[g].from {
				return false
			}
		}
	}
	l := p.layout
	bucket := p.bucketMs
	// The boundaries where every segment is evaluated, each with the
	// baseline weeks (evalWeeks) from it on. This leaves the positions at
	// the last boundary.
	nw := len(l.steps) + 1
	forced, weeks := p.stepForced[:0], p.stepWeeks[:0]
	for b := from; b <= to; b++ {
		for _, r := range p.evalRanges {
			lo, hi := l.ranges[r].bounds(b*bucket, bucket)
			p.positions[r] = position{lo, hi}
		}
		n := len(weeks)
		weeks = p.evalWeeks(weeks)
		if b > from && slices.Equal(weeks[n:], weeks[n-nw:n]) {
			weeks = weeks[:n]
			continue
		}
		forced = append(forced, b)
	}
	p.stepForced, p.stepWeeks = forced, weeks
	for _, t := range p.evalTaps {
		t.off = from - t.at(from*bucket, bucket)
	}
	p.eachSegment(p.segmentList, func(w *segWork, s *segment) { p.stepSegment(w, s, from, to) })
	for i := range p.segWork {
		w := &p.segWork[i]
		p.statusDirty = append(p.statusDirty, w.statusDirty...)
		clear(w.statusDirty)
		w.statusDirty = w.statusDirty[:0]
	}
	return true
}

// stepSegment steps s from boundary from to boundary to, evaluating it at
// the forced boundaries of stepColumns and where its sums move. It writes
// only s and w, so that goroutines can step different segments at once.
func (p *Processor) stepSegment(w *segWork, s *segment, from, to int64) {
	forced, weeks := p.stepForced, p.stepWeeks
	nw := len(p.layout.steps) + 1
	cur, due := w.cur[:0], w.due[:0]
	for _, t := range p.evalTaps {
		d := int64(math.MaxInt64)
		for _, g := range t.groups {
			stride := p.cols.groups[g].stride
			c := &s.cols[g]
			n := c.len(stride)
			e := c.searchIn(stride, 0, n, t.pos+1)
			cur = append(cur, stepCursor{e, n, c.nextBucket(stride, e)})
			d = min(d, dueAt(cur[len(cur)-1].next, t.off))
		}
		due = append(due, d)
	}
	w.cur, w.due = cur, due
	fi, wi := 0, 0 // the next forced boundary; the weeks in force
	for {
		// The next boundary where a cursor passes an entry or every
		// segment is evaluated: after one, every due is past it.
		b := int64(math.MaxInt64)
		for _, d := range due {
			b = min(b, d)
		}
		if fi < len(forced) {
			b = min(b, forced[fi])
		}
		if b > to {
			return
		}
		eval := false
		if fi < len(forced) && forced[fi] == b {
			eval, wi = true, fi
			fi++
		}
		k := 0
		for ti, t := range p.evalTaps {
			if due[ti] > b {
				k += len(t.groups)
				continue
			}
			target := b - t.off
			d := int64(math.MaxInt64)
			for gi, g := range t.groups {
				cc := &cur[k]
				k++
				if cc.next <= target {
					c := &s.cols[g]
					stride := p.cols.groups[g].stride
					e := cc.e
					for ; e < cc.n && c.bucket(stride, e) <= target; e++ {
						at := (c.start + e) * stride
						for _, op := range t.ops[gi] {
							x, ok := c.number(at+op.at, op.two)
							if !ok {
								x = s.wideValue(g, stride, e, op.slot)
							}
							s.sums[op.off] += op.sign * x
						}
					}
					cc.e, cc.next = e, math.MaxInt64
					if e < cc.n {
						cc.next = c.bucket(stride, e)
					}
					eval = true
				}
				d = min(d, dueAt(cc.next, t.off))
			}
			due[ti] = d
		}
		// Evaluating a segment again on the same sums and baseline
		// weeks gives the same result (z_off <= z_on makes the
		// hysteresis idempotent), so a segment is evaluated only where
		// its sums moved or every segment is.
		if eval {
			p.evaluateSegment(s, weeks[wi*nw:(wi+1)*nw], &w.statusDirty)
		}
	}
}

// stepCursor is a tap's cursor in a column while stepping: the entry it
// has reached, the column's entries (len divides by the stride), and the
// reached entry's bucket (MaxInt64 past the last).
type stepCursor struct {
	e, n int
	next int64
}

// dueAt is the boundary at which a tap whose position is the boundary
// less off reaches bucket next.
func dueAt(next, off int64) int64 {
	if next == math.MaxInt64 {
		return next
	}
	return next + off
}
