package processor

import (
	"fmt"
	"iter"
	"math"
	"slices"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/store"
)

// segment is the per-segment state of one breakdown's segment: deltas not
// yet flushed, the sums of every moving range as of the last flush, and the
// result of the last degradation evaluation.
type segment struct {
	key       store.Segment
	breakdown int
	index     int      // in Processor.segmentList
	labels    []string // values of the breakdown's dimensions

	// pending holds per-bucket deltas since the last flush; last caches the
	// most recently used bucket because events arrive roughly in time order.
	pending bucketTable
	lastB   int64
	last    store.Vector
	// flushing holds the deltas of the flush being committed, and
	// totalsFlushing its totals: ApplyBatch fills pending meanwhile.
	flushing       bucketTable
	flushed        []flushedBucket // flushing in bucket order, for foldFlushed
	totalsFlushing []int64

	sums        []int64 // len(ranges) * vecLen
	totals      []int64 // all-time events per stage
	totalsDelta []int64

	// cols are the numbers the ranges read of the buckets in their span,
	// per column group (see columns.go); wide holds those that do not fit
	// a column's words.
	cols []column
	wide map[wideKey]int64
	// fill holds, per column group, the entries of the start-up scan
	// until they move to cols (see colload.go).
	fill [][][]int16

	status []bool // degraded flag per alerting step, then volume
	eval   []stepEval
	vol    volumeEval
	// statusDirty is set when status changed since the last flush.
	statusDirty bool
	// frozen is set on stage 2 of the scale-out mode for the segments of
	// the partitions the replica does not hold (docs/scaling.md): they
	// keep the numbers and flags they had, evaluate leaves them alone and
	// snapshots omit them. Written under mu and sumsMu.
	frozen bool
}

// stepEval is a degradation evaluation of one alerting step.
type stepEval struct {
	available bool // at least one shifted window of history
	x, n      int64
	x0, n0    int64
	z         float64
	zOK       bool
	weeksUsed int
}

// volumeEval is the volume evaluation of the first stage.
type volumeEval struct {
	available bool
	n         int64
	lambda    float64
	z         float64
	zOK       bool
}

func (p *Processor) newSegment(key store.Segment) *segment {
	l := p.layout
	bd := key.Breakdown()
	s := &segment{
		key:            key,
		breakdown:      bd,
		totalsFlushing: make([]int64, l.stages),
		sums:           make([]int64, len(l.ranges)*l.vecLen),
		totals:         make([]int64, l.stages),
		totalsDelta:    make([]int64, l.stages),
		status:         make([]bool, l.alertingSteps()+1),
		eval:           make([]stepEval, len(l.steps)),
	}
	if p.colsOn {
		s.cols = make([]column, len(p.cols.groups))
	}
	ids := key.IDs()
	for i, dim := range p.breakdownDims[bd] {
		if i < len(ids) {
			s.labels = append(s.labels, p.dict.value(dim, ids[i]))
		}
	}
	p.segments[key] = s
	s.index = len(p.segmentList)
	p.segmentList = append(p.segmentList, s)
	return s
}

// segmentFor returns the segment with the given key, creating it.
func (p *Processor) segmentFor(key []byte) *segment {
	if s, ok := p.segments[store.Segment(key)]; ok {
		return s
	}
	return p.newSegment(store.Segment(key))
}

// vec returns the pending delta vector of bucket b, creating it.
func (s *segment) vec(p *Processor, b int64) store.Vector { return s.lookup(p, b, true) }

// lookup returns the pending delta vector of bucket b, creating it; with
// remember it becomes the cached one.
func (s *segment) lookup(p *Processor, b int64, remember bool) store.Vector {
	if s.last != nil && s.lastB == b {
		return s.last
	}
	v := s.pending.get(b)
	if v == nil {
		v = p.vecs.alloc()
		p.addPending(p.vecBytes)
		if s.pending.n == 0 {
			p.dirtySegments = append(p.dirtySegments, s)
		}
		s.pending.put(b, v)
	}
	if remember {
		s.lastB, s.last = b, v
	}
	return v
}

// clearFlushing empties the deltas of a flush.
func (s *segment) clearFlushing() {
	clear(s.flushed)
	s.flushed = s.flushed[:0]
	if cap(s.flushed) > 4096 {
		s.flushed = nil
	}
	s.flushing.reset()
}

// bucketTable maps buckets to a segment's pending delta vectors. It is an
// open-addressing table probed linearly, and its slot keeps the low six
// bits of the bucket: the buckets of a flush mostly come in runs of
// consecutive buckets (one per partition's stretch of event time), which
// then take consecutive slots, so that most lookups read one slot next to
// the previous one. With Go's map, which hashes them apart, segment.vec was
// 10% of a replay's CPU profile; the table took 3-5% off the replay's CPU
// (docs/performance.md).
type bucketTable struct {
	slots []bucketSlot // a power of two of them, or none
	n     int
}

// bucketSlot is a slot of a bucketTable; v is nil when it is free.
type bucketSlot struct {
	b int64
	v store.Vector
}

// home is the slot where the search for b starts: runs of 64 buckets are
// spread by a multiplicative hash, the buckets within one stay in order.
func (t *bucketTable) home(b int64) int {
	h := uint64(b)&63 | (uint64(b>>6)*0x9e3779b97f4a7c15)<<6
	return int(h & uint64(len(t.slots)-1))
}

// get returns the vector of b, or nil.
func (t *bucketTable) get(b int64) store.Vector {
	if t.n == 0 {
		return nil
	}
	mask := len(t.slots) - 1
	for i := t.home(b); ; i = (i + 1) & mask {
		sl := &t.slots[i]
		if sl.v == nil || sl.b == b {
			return sl.v
		}
	}
}

// put adds b, which the table does not hold, with v (not nil).
func (t *bucketTable) put(b int64, v store.Vector) {
	// Three quarters full at most: about the memory per bucket of Go's
	// map, for a few more probes.
	if 4*(t.n+1) > 3*len(t.slots) {
		old := t.slots
		t.slots = make([]bucketSlot, max(16, 2*len(old)))
		for _, sl := range old {
			if sl.v != nil {
				t.insert(sl.b, sl.v)
			}
		}
	}
	t.insert(b, v)
	t.n++
}

func (t *bucketTable) insert(b int64, v store.Vector) {
	mask := len(t.slots) - 1
	i := t.home(b)
	for t.slots[i].v != nil {
		i = (i + 1) & mask
	}
	t.slots[i] = bucketSlot{b, v}
}

// all iterates over the buckets and their vectors, in no particular order.
func (t *bucketTable) all() iter.Seq2[int64, store.Vector] {
	return func(yield func(int64, store.Vector) bool) {
		for _, sl := range t.slots {
			if sl.v != nil && !yield(sl.b, sl.v) {
				return
			}
		}
	}
}

// reset empties the table. A table mostly free (grown by a catch-up, now
// live) is dropped, so that it neither holds its memory nor costs its
// clearing at every flush.
func (t *bucketTable) reset() {
	if len(t.slots) > 64 && 8*t.n < len(t.slots) {
		t.slots = nil
	} else {
		clear(t.slots)
	}
	t.n = 0
}

func (s *segment) sum(l *layout, r, i int) int64 { return s.sums[r*l.vecLen+i] }

// vecArena hands out the pending delta vectors of a flush from reused
// chunks, so that a new bucket of a segment allocates nothing once the
// arena has grown to a flush's worth.
type vecArena struct {
	vecLen     int
	chunks     [][]int64
	chunk, off int
}

const vecChunk = 1 << 14 // int64s

func (a *vecArena) alloc() store.Vector {
	n := a.vecLen
	for {
		if a.chunk < len(a.chunks) {
			c := a.chunks[a.chunk]
			if a.off+n <= len(c) {
				v := c[a.off : a.off+n : a.off+n]
				a.off += n
				clear(v)
				return v
			}
			a.chunk, a.off = a.chunk+1, 0
			continue
		}
		a.chunks = append(a.chunks, make([]int64, max(vecChunk, n)))
	}
}

// reset makes every vector free again; call it when none is used.
func (a *vecArena) reset() { a.chunk, a.off = 0, 0 }

// trim releases the chunks beyond what n vectors take.
func (a *vecArena) trim(n int64) {
	keep := int(n*int64(a.vecLen)/vecChunk) + 1
	if len(a.chunks) > keep {
		clear(a.chunks[keep:])
		a.chunks = a.chunks[:keep]
	}
}

// addToRanges adds v (times sign) to every range that holds bucket b, at
// the current positions.
func (p *Processor) addToRanges(s *segment, b int64, v store.Vector, sign int64) {
	l := p.layout
	for r, pos := range p.positions {
		if b < pos.lo || b > pos.hi {
			continue
		}
		sums := s.sums[r*l.vecLen : (r+1)*l.vecLen]
		for _, i := range p.cols.need[r] {
			if i < len(v) {
				sums[i] += sign * v[i]
			}
		}
	}
}

type position struct{ lo, hi int64 }

// advance moves every range to the positions of now, adding the buckets
// that enter a range and subtracting the ones that leave it, read from the
// columns or, below them, back from the store. It must run right after a
// commit, so the store and the columns hold every bucket the sums hold.
func (p *Processor) advance(now int64) error {
	l := p.layout
	for r, spec := range l.ranges {
		lo, hi := spec.bounds(now, l.bucket)
		old := p.positions[r]
		if old == (position{lo, hi}) && p.positioned {
			continue
		}
		next := position{lo, hi}
		var add, sub []position
		if !p.positioned {
			add = []position{next}
		} else {
			add = minus(next, old)
			sub = minus(old, next)
		}
		for _, iv := range sub {
			if err := p.moveRange(r, iv, -1); err != nil {
				return err
			}
		}
		for _, iv := range add {
			if err := p.moveRange(r, iv, +1); err != nil {
				return err
			}
		}
		p.positions[r] = next
	}
	p.positioned = true
	return nil
}

// minus returns the parts of a that are not in b.
func minus(a, b position) []position {
	if b.hi < a.lo || b.lo > a.hi {
		return []position{a}
	}
	var out []position
	if a.lo < b.lo {
		out = append(out, position{a.lo, b.lo - 1})
	}
	if a.hi > b.hi {
		out = append(out, position{b.hi + 1, a.hi})
	}
	return out
}

// moveRange adds (sign +1) or subtracts (-1) the buckets of iv to range
// r's sums, from the columns when they hold iv.
func (p *Processor) moveRange(r int, iv position, sign int64) error {
	if p.colCovers(r, iv) {
		p.colScan(r, iv, sign)
		return nil
	}
	return p.scanInto(r, iv, sign)
}

func (p *Processor) scanInto(r int, iv position, sign int64) error {
	vl := p.layout.vecLen
	need := p.cols.need[r]
	return p.st.Buckets(iv.lo, iv.hi, func(_ int64, key []byte, v store.Vector) {
		s := p.segmentFor(key)
		sums := s.sums[r*vl : (r+1)*vl]
		for _, i := range need {
			if i < len(v) {
				sums[i] += sign * v[i]
			}
		}
	})
}

// scanBatch is a run of buckets, their vectors still encoded, that
// scanBuckets passes from the goroutine reading the store to the one
// calling fn.
type scanBatch struct {
	buckets []int64
	segEnds []int // ends of the segment keys in segs
	segs    []byte
	encEnds []int // ends of the encoded vectors in encs
	encs    []byte
}

// scanBatchLen is the buckets of a scanBatch: large enough that passing a
// batch costs little against reading it, small enough to stay in cache.
const scanBatchLen = 1024

// scanBuckets is st.Buckets with the store's iteration in a goroutine of
// its own, and the decoding and fn in the caller's: at start-up the two
// take about as long, so that on two cores the scan takes about half as
// long.
func scanBuckets(st *store.Store, lo, hi int64, fn func(b int64, seg []byte, v store.Vector)) error {
	full := make(chan *scanBatch, 2)
	free := make(chan *scanBatch, 3)
	for range cap(free) {
		free <- &scanBatch{}
	}
	var g errgroup.Group
	g.Go(func() error {
		defer close(full)
		bt := <-free
		err := st.EncodedBuckets(lo, hi, func(b int64, seg, enc []byte) error {
			bt.buckets = append(bt.buckets, b)
			bt.segs = append(bt.segs, seg...)
			bt.segEnds = append(bt.segEnds, len(bt.segs))
			bt.encs = append(bt.encs, enc...)
			bt.encEnds = append(bt.encEnds, len(bt.encs))
			if len(bt.buckets) == scanBatchLen {
				full <- bt
				bt = <-free
				bt.buckets, bt.segEnds, bt.segs, bt.encEnds, bt.encs = bt.buckets[:0], bt.segEnds[:0], bt.segs[:0], bt.encEnds[:0], bt.encs[:0]
			}
			return nil
		})
		if len(bt.buckets) > 0 {
			full <- bt
		}
		return err
	})
	// Every batch goes back to free, so the reader never waits for one
	// for good; it closes full when the scan ends or fails.
	var (
		vec       store.Vector
		decodeErr error
	)
	for bt := range full {
		seg0, enc0 := 0, 0
		for i, b := range bt.buckets {
			if decodeErr == nil {
				var err error
				if vec, err = store.DecodeBucketVector(vec, bt.encs[enc0:bt.encEnds[i]]); err != nil {
					decodeErr = fmt.Errorf("bucket %d: %w", b, err)
				} else {
					fn(b, bt.segs[seg0:bt.segEnds[i]], vec)
				}
			}
			seg0, enc0 = bt.segEnds[i], bt.encEnds[i]
		}
		free <- bt
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return decodeErr
}

// loadRanges computes every range's sums from the store in one scan over
// the union of the ranges, for start-up, and fills the columns from the
// same scan: it reads on to the newest bucket, since the buckets above the
// ranges (the cohorts not yet mature, records ahead of the clock) enter
// them later.
func (p *Processor) loadRanges(now int64) error {
	l := p.layout
	lo, hi := int64(math.MaxInt64), int64(math.MinInt64)
	for r, spec := range l.ranges {
		a, b := spec.bounds(now, l.bucket)
		p.positions[r] = position{a, b}
		lo, hi = min(lo, a), max(hi, b)
	}
	p.positioned = true
	for _, s := range p.segmentList {
		clear(s.sums)
	}
	if !p.colsOn {
		return p.st.Buckets(lo, hi, func(b int64, key []byte, v store.Vector) {
			p.addToRanges(p.segmentFor(key), b, v, +1)
		})
	}
	p.colReset(lo)
	fits := true
	err := scanBuckets(p.st, lo, math.MaxInt64, func(b int64, key []byte, v store.Vector) {
		s := p.segmentFor(key)
		if b <= hi {
			p.addToRanges(s, b, v, +1)
		}
		if fits {
			fits = p.colLoad(s, b, v)
		}
	})
	if err != nil {
		return err
	}
	if !fits {
		p.colDisable()
		return nil
	}
	p.colLoaded()
	p.colDrop()
	return nil
}

// evaluate runs degradation and volume detection (SPEC §3) on every
// segment at the current positions, with hysteresis.
func (p *Processor) evaluate() { p.evaluateSegments(p.segmentList) }

// evaluateSegments evaluates the segments of list at the current
// positions. It runs under sumsMu.
func (p *Processor) evaluateSegments(list []*segment) {
	weeks := p.evalWeeks(p.weeksBuf[:0])
	p.weeksBuf = weeks
	for _, s := range list {
		p.evaluateSegment(s, weeks, &p.statusDirty)
	}
}

// evalWeeks appends, per step and then for volume detection, how many
// baseline weeks evaluation uses at the current positions (baselineWeeks;
// 0 for a step that does not alert).
func (p *Processor) evalWeeks(weeks []int) []int {
	l := p.layout
	for _, sl := range l.steps {
		n := 0
		if sl.alerting {
			n = p.baselineWeeks(sl.baseline)
		}
		weeks = append(weeks, n)
	}
	return append(weeks, p.baselineWeeks(l.volume.baseline))
}

// evaluateSegment evaluates s on its sums with the baseline weeks of
// evalWeeks, adding s to dirty if its status changes. It writes nothing
// but s and dirty.
func (p *Processor) evaluateSegment(s *segment, weeks []int, dirty *[]*segment) {
	l := p.layout
	a := p.cfg.Alerts
	if s.frozen {
		return
	}
	for t, sl := range l.steps {
		if !sl.alerting {
			continue
		}
		e := stepEval{}
		cur := sl.cohort[sl.window]
		e.x, e.n = s.sum(l, cur, l.converted(t)), s.sum(l, cur, l.entered(t))
		for _, r := range sl.baseline[:weeks[t]] {
			e.available = true
			e.weeksUsed++
			e.x0 += s.sum(l, r, l.converted(t))
			e.n0 += s.sum(l, r, l.entered(t))
		}
		on := false
		if e.available && e.n > 0 && e.n0 > 0 {
			x, n, x0, n0 := float64(e.x), float64(e.n), float64(e.x0), float64(e.n0)
			pp, p0 := x/n, x0/n0
			pbar := (x + x0) / (n + n0)
			if pbar > 0 && pbar < 1 {
				e.z = (pp - p0) / math.Sqrt(pbar*(1-pbar)*(1/n+1/n0))
				e.zOK = true
			}
			sample := e.n >= int64(a.MinEntered) && n*p0 >= a.MinExpected
			was := s.status[sl.statusIdx]
			switch {
			case !e.zOK || !sample:
				on = false
			case was:
				on = e.z <= -a.ZOff
			default:
				on = e.z <= -a.ZOn && pp <= (1-a.MinDrop)*p0
			}
		}
		s.eval[t] = e
		setStatus(s, sl.statusIdx, on, dirty)
	}

	v := volumeEval{}
	first := l.entities(l.firstStage)
	v.n = s.sum(l, l.volume.current, first)
	var n0 int64
	k := 0
	for _, r := range l.volume.baseline[:weeks[len(l.steps)]] {
		k++
		n0 += s.sum(l, r, first)
	}
	on := false
	if k > 0 {
		v.available = true
		v.lambda = float64(n0) / float64(k)
		if v.lambda > 0 {
			v.z = (float64(v.n) - v.lambda) / math.Sqrt(v.lambda)
			v.zOK = true
		}
		was := s.status[len(s.status)-1]
		switch {
		case !v.zOK || v.lambda < a.MinExpected:
		case was:
			on = v.z <= -a.ZOff
		default:
			on = v.z <= -a.ZOn && float64(v.n) <= (1-a.MinDrop)*v.lambda
		}
	}
	s.vol = v
	setStatus(s, len(s.status)-1, on, dirty)
}

// baselineWeeks returns how many of the baseline ranges, in order of their
// shift, lie within the history at the current positions: evaluation uses
// those.
func (p *Processor) baselineWeeks(ranges []int) int {
	for n, r := range ranges {
		if !p.evalHasHistory || p.positions[r].lo < p.evalHistoryStart {
			return n
		}
	}
	return len(ranges)
}

// setStatus sets flag i of s, adding s to dirty (the segments whose
// status the next flush writes) when it changes.
func setStatus(s *segment, i int, on bool, dirty *[]*segment) {
	if s.status[i] != on {
		s.status[i] = on
		if !s.statusDirty {
			s.statusDirty = true
			*dirty = append(*dirty, s)
		}
	}
}

func (s *segment) statusVector() store.Vector {
	v := make(store.Vector, len(s.status))
	for i, on := range s.status {
		if on {
			v[i] = 1
		}
	}
	return v
}

// dictionary assigns ids to dimension values, first come, up to max_values
// per dimension (SPEC §3), and remembers them in the store.
type dictionary struct {
	dims []string
	ids  []map[string]uint32 // under the processor's mu
	// mu guards values: a flush names new segments without the
	// processor's mu while ApplyBatch adds values.
	mu        sync.RWMutex
	values    [][]string
	maxValues int
	// fresh lists the values assigned since the last flush.
	fresh []freshValue
}

type freshValue struct {
	dim   int
	value string
	id    uint32
}

// reservedValues are the values of the reserved ids.
var reservedValues = [firstValueID]string{"unknown", "invalid", "other"}

// Reserved ids. Their values are not counted toward max_values.
const (
	idUnknown uint32 = iota
	idInvalid
	idOther
	firstValueID
)

func newDictionary(dims []string, maxValues int) *dictionary {
	d := &dictionary{dims: dims, maxValues: maxValues}
	for range dims {
		d.ids = append(d.ids, map[string]uint32{})
		d.values = append(d.values, slices.Clone(reservedValues[:]))
	}
	return d
}

func (d *dictionary) load(dim, value string, id uint32) error {
	for i, name := range d.dims {
		if name != dim {
			continue
		}
		if id < firstValueID {
			return fmt.Errorf("dictionary id %d of %s=%q out of range", id, dim, value)
		}
		d.ids[i][value] = id
		d.mu.Lock()
		for uint32(len(d.values[i])) <= id {
			d.values[i] = append(d.values[i], "")
		}
		d.values[i][id] = value
		d.mu.Unlock()
	}
	return nil
}

// id returns the id of a raw value of dimension i; overflow reports that the
// value was new but the dimension was full.
func (d *dictionary) id(i int, raw []byte, invalid bool) (id uint32, overflow bool) {
	switch {
	case invalid:
		return idInvalid, false
	case len(raw) == 0:
		// Absent and empty are the same to Prometheus (an empty label is no
		// label), so both are unknown.
		return idUnknown, false
	}
	// A producer's literal "unknown", "invalid" or "other" means what ours
	// does: an id of its own would export a second segment with the same
	// labels, and a duplicate series fails the whole scrape.
	for id, name := range reservedValues {
		if string(raw) == name {
			return uint32(id), false
		}
	}
	if id, ok := d.ids[i][string(raw)]; ok {
		return id, false
	}
	if len(d.ids[i]) >= d.maxValues {
		return idOther, true
	}
	v := string(raw)
	d.mu.Lock()
	id = uint32(len(d.values[i]))
	d.values[i] = append(d.values[i], v)
	d.mu.Unlock()
	d.ids[i][v] = id
	d.fresh = append(d.fresh, freshValue{i, v, id})
	return id, false
}

func (d *dictionary) value(i int, id uint32) string {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if int(id) < len(d.values[i]) {
		return d.values[i][id]
	}
	return "unknown"
}
