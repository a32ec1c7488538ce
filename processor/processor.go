// Package processor consumes funnel events from Kafka and turns them into
// per-segment conversion numbers (SPEC §3) kept in a store and exposed as
// Prometheus metrics.
//
// The pieces, in the order a record meets them: the Consumer reads
// partitions as a Kafka consumer group and decodes records with a Decoder;
// the Processor applies decoded batches to per-entity state (first touch,
// reach times, deduplication, cohort crediting) and to per-segment bucket
// deltas, all in memory; every flush interval it writes the deltas, the
// entity states and the offsets of the applied records in one store batch,
// then moves every window's running sums and evaluates degradation. The
// Collector exposes the result at scrape time.
package processor

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/store"
)

// DeadLetterWriter receives copies of invalid records. *kafka.Writer
// satisfies it.
type DeadLetterWriter interface {
	WriteMessages(ctx context.Context, msgs ...kafka.Message) error
}

// Options are the dependencies of a Processor.
type Options struct {
	// Logger defaults to discarding.
	Logger *slog.Logger
	// Registerer receives the processor's own metrics and its Collector;
	// nil registers nothing.
	Registerer prometheus.Registerer
	// Now is the wall clock; nil means time.Now.
	Now func() time.Time
	// DeadLetter, when set, receives invalid records before the flush that
	// accounts for them commits (at least once).
	DeadLetter DeadLetterWriter
	// Version and Revision label funnel_build_info.
	Version, Revision string
}

// Processor holds the state of every assigned partition's entities and of
// every segment. ApplyBatch, Flush and the Collector are safe for concurrent
// use; they serialise on one mutex. The caller owns the store and closes it
// after Run returns.
type Processor struct {
	cfg           Config
	st            *store.Store
	logger        *slog.Logger
	now           func() time.Time
	dlq           DeadLetterWriter
	layout        *layout
	breakdownDims [][]int
	topicStage    map[string]int
	eventClock    bool
	bucketMs      int64
	retentionMs   int64
	maxFutureMs   int64
	ttlMs         int64
	metrics       *metrics
	// stalled is set while flushes fail, so readers stop feeding state
	// that cannot be written.
	stalled atomic.Bool
	// mapped counts the bytes of the entity table and the columns mapped
	// outside the Go heap (see offHeap).
	mapped atomic.Int64
	// pending estimates the bytes a flush will write: the bucket vectors
	// of the pending deltas and the states of the dirty entities. At
	// pendingLimit Run flushes early, at twice that ApplyBatch flushes
	// before applying (see pendingBudget).
	pending      atomic.Int64
	pendingLimit int64
	vecBytes     int64 // what a pending bucket counts: its vector and bucketOverhead
	flushNow     chan struct{}
	// filterFull asks Run to rebuild the entity filter (see rebuildFilter).
	filterFull chan struct{}

	// flushMu serialises flushes. mu guards the live state: what
	// ApplyBatch changes. sumsMu guards the segments' running sums and
	// evaluations, which a flush moves without holding mu; it is taken
	// after mu when both are needed.
	flushMu sync.Mutex
	sumsMu  sync.Mutex
	// inflight is the state of the running flush; flushSegments,
	// flushDirty, vecsFlushing and spareDeadLetters are spare buffers
	// swapped with the live ones.
	inflight         inflight
	flushSegments    []*segment
	flushDirty       []uint32
	vecsFlushing     vecArena
	spareDeadLetters []kafka.Message
	// evalHistoryStart and evalHasHistory are the history start as of the
	// last flush, which evaluate uses (under sumsMu).
	evalHistoryStart int64
	evalHasHistory   bool

	mu       sync.Mutex
	entities *entityTable
	// known holds the keys of stored entities: nil until loadFilter
	// builds it, once (filterOnce). While rebuildFilter scans the store
	// (rebuilding), knownLog holds every key that may be stored without
	// the scan seeing it.
	known      *entityFilter
	filterOnce sync.Once
	rebuilding bool
	knownLog   []uint64
	dirty      []uint32   // records of entities changed since the last flush
	dirtyBytes []byte     // scratch of sortDirty
	dirtyKeys  []dirtyKey // scratch of sortDirty
	// combos are the distinct combinations of dimension values entities
	// have, with their segments: an entity refers to one by index.
	combos     []combo
	comboIndex map[string]uint32
	evalRanges []int  // the ranges evaluate reads
	evalTaps   []*tap // their edges, for stepping through buckets
	// cols groups the numbers the ranges read into per-segment columns;
	// colsOn is false once a span did not fit them (see columns.go).
	cols     *colLayout
	colsOn   bool
	colBytes atomic.Int64 // of the columns' entries
	colMem   colMem       // the columns' words
	weeksBuf []int        // scratch of evaluateSegments
	// Scratch of stepColumns.
	stepForced []int64
	stepWeeks  []int
	// segWork is the scratch of the goroutines that fold and step the
	// segments after a commit (segWorkers).
	segWork       [segWorkers]segWork
	colBudget     int64 // colBudget; tests lower it
	vecs          vecArena
	dict          *dictionary
	segments      map[store.Segment]*segment
	segmentList   []*segment
	dirtySegments []*segment
	statusDirty   []*segment
	positions     []position
	positioned    bool
	// evalBucket is the last bucket boundary evaluated (event clock).
	evalBucket    int64
	evaluated     bool
	parts         map[store.TopicPartition]*partition
	hist          [][]int64 // per step: bucket counts then sum in ms
	histDelta     [][]int64
	overflow      []int64 // per dimension
	overflowDelta []int64
	clock         int64 // event clock (ms); 0 until the first event
	historyStart  int64 // bucket of the earliest accepted event
	hasHistory    bool
	lastEvent     int64 // ms
	entityCount   int64
	// storedEntities is entityCount as of the last commit: what a batch
	// committed outside a flush (the sweep) may write, since entities
	// applied after the flush's prepare are not in the store yet.
	storedEntities int64
	deletedBefore  int64 // buckets below this were deleted
	sweepAfter     []byte
	deadLetters    []kafka.Message

	// scale holds the hooks of the scale-out mode; nil without it.
	scale *scaleHooks

	// Scratch space of the hot path, reused so that applying an event
	// allocates nothing.
	keyBuf       []byte
	getBuf       []byte
	loaded       store.Entity
	view         store.Entity
	dimBuf       []uint32
	comboKey     []byte
	bucketWrites []bucketWrite
	sortedWrites []bucketWrite // scratch of sortBucketWrites
	sortCounts   []int         // scratch of sortBucketWrites
	vecBuf       []store.Vector
	evictBuf     []int64
}

// bucketWrite is a pending bucket of a segment, to write.
type bucketWrite struct {
	b int64
	s *segment
	v store.Vector
}

// sortBucketWrites returns bw by segment, then bucket: the store writes
// one key per segment and bucket group when a segment's buckets come
// together and in order (store.Batch.AddBucket), and foldFlushed wants each
// segment's in order. The buckets of a flush mostly fall in a few dense
// runs (one per partition's stretch of event time), so it sorts by two
// stable counting passes, by bucket and then by segment; buckets
// spread far wider than there are writes are sorted by comparison instead.
func (p *Processor) sortBucketWrites(bw []bucketWrite) []bucketWrite {
	if len(bw) < 2 {
		return bw
	}
	lo, hi := bw[0].b, bw[0].b
	for _, w := range bw {
		lo, hi = min(lo, w.b), max(hi, w.b)
	}
	if hi-lo > 4*int64(len(bw))+1024 {
		slices.SortFunc(bw, func(x, y bucketWrite) int {
			return cmp.Or(cmp.Compare(x.s.index, y.s.index), cmp.Compare(x.b, y.b))
		})
		return bw
	}
	out := slices.Grow(p.sortedWrites[:0], len(bw))[:len(bw)]
	p.countingSort(out, bw, int(hi-lo)+1, func(w *bucketWrite) int { return int(w.b - lo) })
	p.countingSort(bw, out, len(p.segmentList), func(w *bucketWrite) int { return w.s.index })
	clear(out)
	p.sortedWrites = out[:0]
	return bw
}

// countingSort writes src into dst ordered by key (below n), keeping the
// order of equal keys.
func (p *Processor) countingSort(dst, src []bucketWrite, n int, key func(*bucketWrite) int) {
	at := slices.Grow(p.sortCounts[:0], n+1)[:n+1]
	clear(at)
	for i := range src {
		at[key(&src[i])+1]++
	}
	for i := 1; i <= n; i++ {
		at[i] += at[i-1]
	}
	for i := range src {
		k := key(&src[i])
		dst[at[k]] = src[i]
		at[k]++
	}
	p.sortCounts = at[:0]
}

// combo is a combination of dimension values (dictionary ids) and the
// segment of each breakdown it belongs to.
type combo struct {
	dims []uint32
	segs []*segment
	// dimBytes is the length of the dimension values, which a scale-out
	// marker carries as strings.
	dimBytes int
}

// partition is the processing position and the counters of one partition.
type partition struct {
	tp     store.TopicPartition
	next   int64 // next offset to apply; -1 when none was applied or stored
	stored int64 // next offset as of the last commit; -1 when none
	hwm    int64 // high watermark last seen; -1 unknown
	// assigned is true while this process consumes the partition.
	assigned bool
	// target is the high watermark when the partition was assigned:
	// reaching it ends the initial catch-up.
	target  int64
	counts  partCounts
	flushed partCounts
}

// partCounts are the process counters of one partition (SPEC §4.1); they
// are stored scoped by partition so they can move with it.
type partCounts struct {
	consumed, applied, duplicate, late int64
	invalid                            [numReasons]int64
}

// Counter names in the store.
const (
	ctrConsumed  = "consumed"
	ctrApplied   = "applied"
	ctrDuplicate = "duplicate"
	ctrLate      = "late"
	ctrInvalid   = "invalid:"
	ctrOverflow  = "overflow"
)

// Meta names in the store.
const (
	metaClock         = "clock"
	metaHistoryStart  = "history_start"
	metaEntities      = "entities"
	metaDeletedBefore = "deleted_before"
	metaLastEvent     = "last_event"
)

// ttcBounds are the upper bounds (seconds) of funnel_time_to_convert_seconds.
var ttcBounds = []float64{60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 345600, 604800, 1209600, 2592000}

// New builds a processor on an open store and loads its state. cfg must be
// valid (see Config.Validate).
func New(cfg Config, st *store.Store, o Options) (*Processor, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	p := &Processor{
		cfg:           cfg,
		st:            st,
		logger:        o.Logger,
		now:           o.Now,
		dlq:           o.DeadLetter,
		layout:        newLayout(&cfg),
		topicStage:    map[string]int{},
		eventClock:    cfg.Time.Clock == ClockEvent,
		bucketMs:      D(cfg.Time.Bucket).Milliseconds(),
		retentionMs:   D(cfg.Time.Retention).Milliseconds(),
		maxFutureMs:   D(cfg.Time.MaxFuture).Milliseconds(),
		ttlMs:         D(cfg.Time.EntityTTL).Milliseconds(),
		comboIndex:    map[string]uint32{},
		dict:          newDictionary(cfg.Segments.Dimensions, cfg.Segments.MaxValues),
		segments:      map[store.Segment]*segment{},
		parts:         map[store.TopicPartition]*partition{},
		overflow:      make([]int64, len(cfg.Segments.Dimensions)),
		deletedBefore: -1 << 62,
	}
	p.entities = newEntityTable(len(cfg.Funnel.Stages), &p.mapped)
	p.colMem = colMem{h: newOffHeap(&p.mapped), mapFrom: colMapBytes}
	runtime.AddCleanup(p, (*offHeap).release, p.colMem.h)
	p.overflowDelta = make([]int64, len(p.overflow))
	p.positions = make([]position, len(p.layout.ranges))
	for _, b := range cfg.Segments.Breakdowns {
		var idx []int
		for _, d := range b {
			idx = append(idx, slices.Index(cfg.Segments.Dimensions, d))
		}
		p.breakdownDims = append(p.breakdownDims, idx)
	}
	for _, t := range cfg.Kafka.Topics {
		p.topicStage[t.Name] = slices.Index(cfg.Funnel.Stages, t.Type)
	}
	for range cfg.Funnel.Steps {
		p.hist = append(p.hist, make([]int64, len(ttcBounds)+2))
		p.histDelta = append(p.histDelta, make([]int64, len(ttcBounds)+2))
	}
	p.vecs.vecLen, p.vecsFlushing.vecLen = p.layout.vecLen, p.layout.vecLen
	p.vecBytes = int64(8*p.layout.vecLen) + bucketOverhead
	p.pendingLimit = max(pendingBudget, 1024*p.vecBytes)
	p.flushNow = make(chan struct{}, 1)
	p.filterFull = make(chan struct{}, 1)
	p.evalRanges, p.evalTaps = p.layout.evalTaps()
	p.cols, p.colsOn, p.colBudget = newColLayout(p.layout), true, colBudget
	p.cols.tapOps(p.evalTaps)
	if err := p.load(); err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	p.metrics = newMetrics(p, o)
	if o.Registerer != nil {
		if err := p.metrics.register(o.Registerer); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func (p *Processor) load() error {
	if err := p.st.Dictionary(func(dim, value string, id uint32) {
		if err := p.dict.load(dim, value, id); err != nil {
			p.logger.Warn("skipping dictionary entry", "err", err)
		}
	}); err != nil {
		return err
	}
	if err := p.st.Totals(func(seg store.Segment, v store.Vector) {
		if seg.Breakdown() >= len(p.breakdownDims) || len(seg.IDs()) != len(p.breakdownDims[seg.Breakdown()]) {
			return // a breakdown the config no longer has
		}
		s := p.newSegment(seg)
		copy(s.totals, v)
	}); err != nil {
		return err
	}
	if err := p.st.Statuses(func(seg store.Segment, v store.Vector) {
		if s, ok := p.segments[seg]; ok {
			for i := range s.status {
				s.status[i] = i < len(v) && v[i] == 1
			}
		}
	}); err != nil {
		return err
	}
	if err := p.st.Histograms(func(step int, v store.Vector) {
		if step < len(p.hist) {
			copy(p.hist[step], v)
		}
	}); err != nil {
		return err
	}
	offsets, err := p.st.Offsets()
	if err != nil {
		return err
	}
	for tp, off := range offsets {
		part := p.partition(tp.Topic, tp.Partition)
		part.next, part.stored = off, off
	}
	if err := p.st.Counters(func(scope uint32, name, label string, v int64) {
		if scope == store.GlobalScope {
			if name == ctrOverflow {
				if i := slices.Index(p.cfg.Segments.Dimensions, label); i >= 0 {
					p.overflow[i] = v
				}
			}
			return
		}
		c := &p.partition(label, int(scope)).counts
		switch name {
		case ctrConsumed:
			c.consumed = v
		case ctrApplied:
			c.applied = v
		case ctrDuplicate:
			c.duplicate = v
		case ctrLate:
			c.late = v
		default:
			for r := ReasonMalformedJSON; r < numReasons; r++ {
				if name == ctrInvalid+r.String() {
					c.invalid[r] = v
				}
			}
		}
	}); err != nil {
		return err
	}
	for _, part := range p.parts {
		part.flushed = part.counts
	}
	for _, m := range []struct {
		name string
		dst  *int64
	}{
		{metaClock, &p.clock}, {metaEntities, &p.entityCount}, {metaDeletedBefore, &p.deletedBefore},
		{metaLastEvent, &p.lastEvent}, {metaHistoryStart, &p.historyStart},
	} {
		v, ok, err := p.st.Meta(m.name)
		if err != nil {
			return err
		}
		if ok {
			*m.dst = v
			if m.name == metaHistoryStart {
				p.hasHistory = true
			}
		}
	}
	p.storedEntities = p.entityCount
	now := p.clockNow()
	p.evalHistoryStart, p.evalHasHistory = p.historyStart, p.hasHistory
	if err := p.loadRanges(now); err != nil {
		return err
	}
	p.evaluate()
	if p.eventClock && now != 0 {
		p.evalBucket, p.evaluated = floorDiv(now, p.bucketMs), true
	}
	// The entity filter is left to loadFilter: the metrics do not need it.
	return nil
}

// loadFilter builds the entity filter the first time it is called; other
// calls wait for that build to end. New leaves the filter out because
// scanning every entity key takes about as long as loading the rest, and
// only applying records needs it: ApplyBatch and installStates call
// loadFilter before they create or look up an entity, and Run calls it
// first, so that a restart serves /metrics while the keys are scanned and
// consumption rarely waits. It must be called without p.mu: the scan runs
// without it, so that scrapes and readiness checks go on meanwhile. No
// entity is stored during the scan, since every path that stores one
// calls loadFilter first; a deleted one is only a false positive.
func (p *Processor) loadFilter() {
	p.filterOnce.Do(func() {
		p.mu.Lock()
		n := max(int(p.entityCount), p.entities.live)
		p.mu.Unlock()
		start := time.Now()
		f, err := p.scanFilter(context.Background(), n)
		if err != nil {
			// Every key may then be stored: each new entity costs a
			// lookup until the next flush rebuilds the filter, which
			// fails that flush if the scan fails again.
			p.logger.Error("building the entity filter; looking every entity up in the store until the next flush", "err", err)
			f = saturatedFilter()
		} else {
			p.logger.Info("entity filter built", "keys", f.n, "took", time.Since(start).Round(time.Millisecond))
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		p.installFilter(f)
	})
}

// rebuildFilters rebuilds the entity filter each time a flush finds it
// full, until ctx is done. A failed rebuild keeps the full filter, which
// only costs store lookups, until the next flush asks again.
func (p *Processor) rebuildFilters(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-p.filterFull:
		}
		if err := p.rebuildFilter(ctx); err != nil && ctx.Err() == nil {
			p.logger.Error("rebuilding the full entity filter; trying again after the next flush", "err", err)
		}
	}
}

// askRebuild asks rebuildFilters for a new filter if the current one is
// full. It runs under p.mu.
func (p *Processor) askRebuild() {
	if p.known != nil && p.known.full() {
		select {
		case p.filterFull <- struct{}{}:
		default:
		}
	}
}

// rebuildFilter replaces a full entity filter by one sized for twice the
// entities there are, filled from the store. A scan of millions of keys
// takes seconds on a busy machine, so it holds neither mu nor flushMu:
// records are applied and flushed meanwhile, and an entity may be stored
// after the scan's iterator was opened. Every such entity is in the cache
// when the rebuild begins or becomes known during it (markKnown), so the
// keys of both go to knownLog and from there into the new filter.
func (p *Processor) rebuildFilter(ctx context.Context) error {
	n, ok := p.beginRebuild()
	if !ok {
		return nil
	}
	f, err := p.scanFilter(ctx, n)
	p.endRebuild(f, err)
	return err
}

// beginRebuild starts a rebuild if the filter is full, logging the keys of
// the cached entities, and returns how many entities the new filter is for.
func (p *Processor) beginRebuild() (n int, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.known == nil || !p.known.full() {
		return 0, false
	}
	p.rebuilding = true
	p.entities.each(func(_ uint32, r *entityRec) { p.knownLog = append(p.knownLog, xxhash.Sum64(p.entities.key(r))) })
	return max(int(p.entityCount), p.entities.live), true
}

// endRebuild adds the logged keys to f, the scan's filter, and installs it;
// after a failed scan (err) it keeps the full filter.
func (p *Processor) endRebuild(f *entityFilter, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil {
		for _, h := range p.knownLog {
			f.add(h)
		}
		p.known = f
	}
	p.rebuilding, p.knownLog = false, nil
}

// markKnown adds the hash of an entity key that may be stored from now on
// to the entity filter, and to knownLog during a rebuild. It runs under
// p.mu.
func (p *Processor) markKnown(h uint64) {
	p.known.add(h)
	if p.rebuilding {
		p.knownLog = append(p.knownLog, h)
	}
}

// scanFilter returns a filter sized for twice n entities that holds the
// keys of the stored ones. It reads only the store.
func (p *Processor) scanFilter(ctx context.Context, n int) (*entityFilter, error) {
	f := newEntityFilter(2 * n)
	err := p.st.EntityKeys(ctx, func(key []byte) { f.add(xxhash.Sum64(key[1:])) })
	return f, err
}

// installFilter adds the keys of the entities in memory to f and makes it
// the entity filter. It runs under p.mu.
func (p *Processor) installFilter(f *entityFilter) {
	p.entities.each(func(_ uint32, r *entityRec) { f.add(xxhash.Sum64(p.entities.key(r))) })
	p.known = f
}

func (p *Processor) partition(topic string, part int) *partition {
	tp := store.TopicPartition{Topic: topic, Partition: part}
	if pt, ok := p.parts[tp]; ok {
		return pt
	}
	pt := &partition{tp: tp, next: -1, stored: -1, hwm: -1}
	p.parts[tp] = pt
	return pt
}

// clockNow is the processor clock (SPEC §3) in Unix ms.
func (p *Processor) clockNow() int64 {
	if p.eventClock {
		return p.clock
	}
	return p.now().UnixMilli()
}

// NextOffset returns the next offset to read of a partition: the one after
// the last applied record, or, when none was, the stored one. ok is false
// when the partition was never consumed.
func (p *Processor) NextOffset(topic string, partition int) (next int64, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pt, ok := p.parts[store.TopicPartition{Topic: topic, Partition: partition}]; ok && pt.next >= 0 {
		return pt.next, true
	}
	return 0, false
}

// StoredOffsets returns, for the given partitions, the next offset to read
// as committed in the store: safe to commit to Kafka.
func (p *Processor) StoredOffsets(tps []store.TopicPartition) map[string]map[int]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]map[int]int64{}
	for _, tp := range tps {
		pt, ok := p.parts[tp]
		if !ok || pt.stored < 0 {
			continue
		}
		if out[tp.Topic] == nil {
			out[tp.Topic] = map[int]int64{}
		}
		out[tp.Topic][tp.Partition] = pt.stored
	}
	return out
}

// SetAssignment records which partitions this process consumes now and
// the high watermark each had when it was assigned; nil means none.
func (p *Processor) SetAssignment(hwm map[store.TopicPartition]int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, part := range p.parts {
		part.assigned = false
	}
	for tp, h := range hwm {
		part := p.partition(tp.Topic, tp.Partition)
		part.assigned, part.target = true, h
		if h > part.hwm {
			part.hwm = h
		}
	}
}

// CaughtUp reports whether every assigned partition has been applied up to
// the high watermark it had when it was assigned: the initial catch-up
// after a start or a rebalance is over.
func (p *Processor) CaughtUp() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, part := range p.parts {
		if part.assigned && max(part.next, 0) < part.target {
			return false
		}
	}
	return true
}

// MappedBytes returns the memory the processor holds outside the Go heap:
// the entity cache and the large evaluation columns. The Go runtime's
// statistics and its memory limit do not count it; the resident set does.
// It is safe to call concurrently.
func (p *Processor) MappedBytes() int64 { return p.mapped.Load() }

// Stalled reports whether the last flush failed or the store's disk is
// below its reserve, so that the next flush will; readers wait while it
// is set, so that no more state piles up in memory than one flush could
// write. Checking the disk too stops them within a batch of the disk
// filling up rather than a flush interval later, which at full speed is
// tens of thousands of records applied that cannot be stored.
func (p *Processor) Stalled() bool { return p.stalled.Load() || p.st.LowOnSpace() }

// Batch is a run of consecutive records of one partition, decoded. Build it
// with Add and hand it to ApplyBatch; Reset makes it reusable.
type Batch struct {
	Topic         string
	Partition     int
	HighWaterMark int64
	Records       []Record
	arena         []byte
}

// Record is one decoded record of a Batch.
type Record struct {
	Offset int64
	// Reason is the decoding outcome: Applied when Event is usable.
	Reason Reason
	Event  Event
	// Key and Value are the record's, for the dead-letter topic.
	Key, Value []byte
	Time       time.Time
}

// Reset empties the batch, keeping its memory.
func (b *Batch) Reset() {
	b.Records = b.Records[:0]
	b.arena = b.arena[:0]
}

// Add decodes m with d and appends it, copying what the decoded event
// points to. topicStage is the topic's stage, or -1.
func (b *Batch) Add(d *Decoder, topicStage int, m *kafka.Message) {
	b.Records = slices.Grow(b.Records, 1)[:len(b.Records)+1]
	r := &b.Records[len(b.Records)-1]
	r.Offset, r.Time = m.Offset, m.Time
	// Kept for every record, not only those the decoder rejects: applying
	// can still find one invalid (future_time), and its dead letter needs
	// the record. They are references to memory the message owns anyway.
	r.Key, r.Value = m.Key, m.Value
	r.Reason = d.Decode(m.Value, topicStage, m.Time, &r.Event)
	if r.Reason != Applied {
		return
	}
	ev := &r.Event
	start := len(b.arena)
	b.arena = append(b.arena, ev.Entity...)
	for _, dv := range ev.Dims {
		b.arena = append(b.arena, dv...)
	}
	// The arena may have moved: slice it only after the last append.
	off := start
	ev.Entity = b.arena[off : off+len(ev.Entity) : off+len(ev.Entity)]
	off += len(ev.Entity)
	for i, dv := range ev.Dims {
		if dv == nil {
			continue
		}
		ev.Dims[i] = b.arena[off : off+len(dv) : off+len(dv)]
		off += len(dv)
	}
	if m.HighWaterMark > b.HighWaterMark {
		b.HighWaterMark = m.HighWaterMark
	}
}

// ApplyBatch applies a batch to the in-memory state. Records at offsets
// below the partition's next offset were applied before and are skipped, so
// a redelivered batch changes nothing. It applies applyChunk records at a
// time, and between them may wait for a flush (which then stores the part
// applied so far, with its offsets).
func (p *Processor) ApplyBatch(b *Batch) {
	p.loadFilter()
	for recs := b.Records; len(recs) > 0; {
		n := min(len(recs), applyChunk)
		p.applyRecords(b, recs[:n])
		recs = recs[n:]
	}
}

// applyChunk is how many records of a batch are applied at once. Every
// partition's reader checks the pending budget before it applies, so
// each can take the pending deltas past twice the budget by what it
// applies at once: with the consumer's whole batches of 2,048 records
// the pending vectors of the default bench reached about twice what
// the budget allows.
const applyChunk = 256

// applyRecords applies recs, records of b, waiting first for a flush when
// the pending deltas reached twice their budget.
func (p *Processor) applyRecords(b *Batch, recs []Record) {
	if p.pending.Load() >= 2*p.pendingLimit {
		// Flushes do not keep up: write before taking more, so that the
		// deltas held in memory stay bounded. An error stalls the
		// processor, which the consumer waits on.
		_ = p.flush(context.Background(), false, 2*p.pendingLimit)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	part := p.partition(b.Topic, b.Partition)
	if b.HighWaterMark > part.hwm {
		part.hwm = b.HighWaterMark
	}
	wall := int64(0)
	if !p.eventClock {
		wall = p.now().UnixMilli()
	}
	for i := range recs {
		r := &recs[i]
		if part.next >= 0 && r.Offset < part.next {
			continue
		}
		part.next = r.Offset + 1
		part.counts.consumed++
		reason := r.Reason
		if reason == Applied {
			now := wall
			if p.eventClock {
				now = p.clock
			}
			reason = p.apply(b.Partition, &r.Event, now)
		}
		switch {
		case reason == Applied:
			part.counts.applied++
		case reason == Duplicate:
			part.counts.duplicate++
		case reason == Late:
			part.counts.late++
		default:
			part.counts.invalid[reason]++
			if p.dlq != nil && p.cfg.Kafka.DeadLetterTopic != "" {
				p.deadLetters = append(p.deadLetters, deadLetter(p.cfg.Kafka.DeadLetterTopic, b, r, reason))
			}
		}
	}
}

func deadLetter(topic string, b *Batch, r *Record, reason Reason) kafka.Message {
	return kafka.Message{
		Topic: topic,
		Key:   r.Key,
		Value: r.Value,
		Time:  r.Time,
		Headers: []kafka.Header{
			{Key: "funnelwatch-reason", Value: []byte(reason.String())},
			{Key: "funnelwatch-source", Value: fmt.Appendf(nil, "%s/%d/%d", b.Topic, b.Partition, r.Offset)},
		},
	}
}

// apply applies one decoded event at processor time now and returns its
// outcome.
func (p *Processor) apply(partition int, ev *Event, now int64) Reason {
	if now != 0 && ev.Time > now+p.maxFutureMs {
		return ReasonFutureTime
	}
	b := floorDiv(ev.Time, p.bucketMs)
	if now != 0 && b < floorDiv(now-p.retentionMs, p.bucketMs) {
		return Late
	}
	idx, ok := p.entity(partition, ev.Entity)
	if !ok {
		return ReasonBadEntity // unreadable stored state; counted, not fatal
	}
	t := p.entities
	e := t.rec(idx)
	if e.flags&recState != 0 && ev.Time-e.lastSeen > p.ttlMs {
		// Expired: the entity starts afresh (SPEC §3). Expiry is measured
		// in event time, so a late event of an active entity continues it
		// whatever the wall clock says.
		e.flags &^= recState
		t.clearSeen(e)
	}
	if ev.HasID && slices.Contains(t.seen(e), ev.ID) {
		return Duplicate
	}

	// Accepted.
	if p.eventClock && ev.Time > p.clock {
		p.clock = ev.Time
	}
	if !p.hasHistory || b < p.historyStart {
		p.historyStart, p.hasHistory = b, true
	}
	p.lastEvent = max(p.lastEvent, ev.Time)
	if e.flags&recState == 0 {
		p.firstTouch(idx, e, ev)
	}
	if e.flags&recDirty == 0 {
		e.flags |= recDirty
		p.dirty = append(p.dirty, idx)
		p.addPending(p.entityBytes(e))
	}
	e.lastSeen = max(e.lastSeen, ev.Time)
	if ev.HasID {
		t.addSeen(e, ev.ID)
	}

	l := p.layout
	s := ev.Stage
	segs := p.combos[e.combo].segs
	ie, iv := l.events(s), l.value(s)
	vs := p.vecBuf[:0] // the event's bucket of each segment
	for _, seg := range segs {
		v := seg.vec(p, b)
		v[ie]++
		v[iv] += ev.Value
		seg.totalsDelta[s]++
		vs = append(vs, v)
	}
	p.vecBuf = vs
	reached := t.reachedOf(idx)
	if reached[s] != store.NotReached {
		return Applied
	}
	reached[s] = ev.Time
	in := l.entities(s)
	for _, v := range vs {
		v[in]++
	}
	for st := range l.steps {
		sl := &l.steps[st]
		switch s {
		case sl.from:
			ie := l.entered(st)
			for _, v := range vs {
				v[ie]++
			}
			if tb := reached[sl.to]; tb != store.NotReached {
				p.convert(segs, st, ev.Time, tb, now)
			}
		case sl.to:
			if ta := reached[sl.from]; ta != store.NotReached {
				p.convert(segs, st, ta, ev.Time, now)
			}
		}
	}
	return Applied
}

// maxSeenIDs is how many recent event ids an entity remembers for
// deduplication: redeliveries come close together, so a short history
// catches them without letting state grow with an entity's events.
const maxSeenIDs = 16

// convert credits a conversion of step t to the entry bucket of ta when tb
// is within the horizon.
func (p *Processor) convert(segs []*segment, t int, ta, tb, now int64) {
	st := &p.layout.steps[t]
	if tb < ta || tb > ta+st.horizon {
		return
	}
	b := floorDiv(ta, p.bucketMs)
	if now != 0 && b < floorDiv(now-p.retentionMs, p.bucketMs) {
		return // the entry bucket is past retention
	}
	ic := p.layout.converted(t)
	for _, seg := range segs {
		// The entry bucket is usually an old one: leave the segment's
		// cached bucket on the current one.
		seg.lookup(p, b, false)[ic]++
	}
	secs := float64(tb-ta) / 1000
	i, _ := slices.BinarySearch(ttcBounds, secs)
	p.histDelta[t][i]++
	p.histDelta[t][len(ttcBounds)+1] += tb - ta
}

// firstTouch freezes the entity's segment from its first accepted event.
func (p *Processor) firstTouch(idx uint32, e *entityRec, ev *Event) {
	dims := p.dimBuf[:0]
	for i := range p.cfg.Segments.Dimensions {
		var raw []byte
		if i < len(ev.Dims) {
			raw = ev.Dims[i]
		}
		id, overflow := p.dict.id(i, raw, ev.Invalid&(1<<i) != 0)
		if overflow {
			p.overflowDelta[i]++
		}
		dims = append(dims, id)
	}
	p.dimBuf = dims
	e.combo = p.comboFor(dims)
	reached := p.entities.reachedOf(idx)
	for i := range reached {
		reached[i] = store.NotReached
	}
	e.flags |= recState
}

// comboFor returns the index of the combination of dimension values dims,
// resolving its segments the first time.
func (p *Processor) comboFor(dims []uint32) uint32 {
	k := p.comboKey[:0]
	for _, d := range dims {
		k = binary.BigEndian.AppendUint32(k, d)
	}
	p.comboKey = k
	if c, ok := p.comboIndex[string(k)]; ok {
		return c
	}
	c := combo{dims: slices.Clone(dims)}
	for i, d := range dims {
		c.dimBytes += len(p.dict.value(i, d))
	}
	// Segments are created under sumsMu: a flush reads them without mu.
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	var key []byte
	for bd, bdims := range p.breakdownDims {
		key = append(key[:0], byte(bd))
		for _, d := range bdims {
			id := idUnknown
			if d < len(dims) {
				id = dims[d]
			}
			key = binary.BigEndian.AppendUint32(key, id)
		}
		c.segs = append(c.segs, p.segmentFor(key))
	}
	i := uint32(len(p.combos))
	p.combos = append(p.combos, c)
	p.comboIndex[string(k)] = i
	return i
}

// entity returns the record of the cached or stored state of an entity,
// or of a new one; ok is false when the stored state cannot be read.
func (p *Processor) entity(partition int, id []byte) (idx uint32, ok bool) {
	p.keyBuf = binary.BigEndian.AppendUint32(p.keyBuf[:0], uint32(partition))
	p.keyBuf = append(p.keyBuf, id...)
	h := xxhash.Sum64(p.keyBuf)
	t := p.entities
	if idx, ok := t.find(p.keyBuf, h); ok {
		return idx, true
	}
	found := false
	if p.known.mayContain(h) {
		var err error
		p.getBuf, found, err = p.st.Entity(p.getBuf, partition, id, &p.loaded)
		if err != nil {
			p.logger.Error("reading entity state", "entity", string(id), "err", err)
			return 0, false
		}
	}
	idx = t.insert(p.keyBuf, h)
	if !found {
		p.entityCount++
		p.markKnown(h)
		return idx, true
	}
	st := &p.loaded
	if len(st.Reached) != len(p.cfg.Funnel.Stages) || len(st.Dims) != len(p.cfg.Segments.Dimensions) {
		// Stored under another funnel or dimension list: start afresh.
		return idx, true
	}
	e := t.rec(idx)
	e.lastSeen = st.LastSeen
	e.combo = p.comboFor(st.Dims)
	copy(t.reachedOf(idx), st.Reached)
	t.setSeen(e, st.Seen)
	e.flags |= recState
	return idx, true
}

// Flush writes everything applied since the last flush in one store batch,
// then moves the windows to the current clock and evaluates degradation.
// When it fails nothing was written; the state stays in memory for the next
// attempt and Stalled reports true until one succeeds.
func (p *Processor) Flush(ctx context.Context) error {
	return p.flush(ctx, true, 0)
}

// flush is Flush; sweep says whether to check a chunk of stored entities
// for expiry, which early flushes (pending deltas at their bound) skip.
// With minPending > 0 it is an early flush, done only when at least that
// many pending vectors are still there once it is this flush's turn: the
// readers that found the bound reached at the same time wait for one flush
// instead of each running its own.
func (p *Processor) flush(ctx context.Context, sweep bool, minPending int64) error {
	start := time.Now()
	p.flushMu.Lock()
	if minPending > 0 && p.pending.Load() < minPending {
		p.flushMu.Unlock()
		return nil
	}
	err := p.flushLocked(ctx, sweep)
	p.flushMu.Unlock()
	p.stalled.Store(err != nil)
	p.metrics.flushDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		p.metrics.flushErrors.Inc()
	}
	return err
}

// inflight is what a flush took out of the live state to write it: the
// records applied meanwhile go to the live state, and a failed commit puts
// it back.
type inflight struct {
	now          int64
	segments     []*segment // with their flushing deltas
	dirty        []uint32
	fresh        []freshValue
	overflow     []int64
	hist         [][]int64
	histBuf      [][]int64
	parts        []flushedPart
	deadLetters  []kafka.Message
	statusDirty  []*segment
	cutoff       int64
	deleting     bool
	historyStart int64
	hasHistory   bool
	entities     int64
}

type flushedPart struct {
	part   *partition
	next   int64
	counts partCounts
}

// flush writes and commits the state in three phases, so that records keep
// being applied while the store syncs and the windows move: prepare takes
// the deltas out of the live state under the processor's mutex, the commit
// and the window moves run without it, and the bookkeeping that follows a
// commit takes it again.
func (p *Processor) flushLocked(ctx context.Context, sweep bool) error {
	p.mu.Lock()
	f, batch := p.prepare()
	p.mu.Unlock()
	fail := func(err error) error {
		batch.Close()
		p.mu.Lock()
		p.restore(f)
		p.mu.Unlock()
		return err
	}
	if len(f.deadLetters) > 0 {
		if err := p.dlq.WriteMessages(ctx, f.deadLetters...); err != nil {
			return fail(fmt.Errorf("write %d records to the dead-letter topic: %w", len(f.deadLetters), err))
		}
	}
	if p.scale != nil {
		if err := p.scale.beforeCommit(ctx, batch); err != nil {
			return fail(err)
		}
	}
	if err := batch.Commit(); err != nil {
		return fail(err)
	}

	// Committed.
	p.mu.Lock()
	for _, fp := range f.parts {
		fp.part.stored, fp.part.flushed = fp.next, fp.counts
	}
	for i, d := range f.overflow {
		p.overflow[i] += d
		p.overflowDelta[i] -= d
	}
	for t, h := range f.hist {
		for i, x := range h {
			p.hist[t][i] += x
			p.histDelta[t][i] -= x
		}
	}
	if f.deleting {
		p.deletedBefore = f.cutoff
	}
	p.storedEntities = f.entities
	p.flushDirty = f.dirty[:0]
	p.spareDeadLetters = f.deadLetters[:0]
	p.mu.Unlock()

	// Fold the deltas into the running sums, move the windows and evaluate;
	// the collector waits for it, ApplyBatch does not.
	p.sumsMu.Lock()
	for _, s := range f.statusDirty {
		s.statusDirty = false
	}
	p.statusDirty = p.statusDirty[:0]
	if p.ownsSegments() {
		p.foldSegments(f.segments)
	}
	for _, s := range f.segments {
		s.clearFlushing()
		for i, d := range s.totalsFlushing {
			s.totals[i] += d
			s.totalsFlushing[i] = 0
		}
	}
	p.flushSegments = f.segments[:0]
	p.vecsFlushing.reset()
	p.vecsFlushing.trim(p.pendingLimit / p.vecBytes)
	p.evalHistoryStart, p.evalHasHistory = f.historyStart, f.hasHistory
	var err error
	if p.ownsSegments() {
		err = p.advanceAndEvaluate(f.now)
		if err == nil && p.colsOn {
			p.colDrop()
		}
	}
	p.sumsMu.Unlock()
	if err != nil {
		return err
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if sweep {
		if err := p.sweep(f.now); err != nil {
			return err
		}
	}
	p.evict()
	p.askRebuild()
	return nil
}

// prepare builds the batch of a flush and moves what it writes out of the
// live state. It runs under p.mu.
func (p *Processor) prepare() (*inflight, *store.Batch) {
	f := &p.inflight
	*f = inflight{
		now: p.clockNow(), segments: p.flushSegments[:0], dirty: p.flushDirty[:0],
		overflow: f.overflow[:0], hist: f.hist[:0], histBuf: f.histBuf, parts: f.parts[:0], statusDirty: f.statusDirty[:0],
		fresh:        f.fresh[:0],
		historyStart: p.historyStart, hasHistory: p.hasHistory, entities: p.entityCount,
	}
	f.deadLetters, p.deadLetters = p.deadLetters, p.spareDeadLetters[:0]
	p.pending.Store(0)
	batch := p.st.NewBatch()
	// Buckets go into the batch segment by segment and in bucket order,
	// so that the batch writes a key per segment and bucket group
	// (store.Batch.AddBucket).
	bw := p.bucketWrites[:0]
	for _, s := range p.dirtySegments {
		if !p.ownsSegments() {
			break
		}
		for b, v := range s.pending.all() {
			bw = append(bw, bucketWrite{b, s, v})
		}
	}
	sorted := p.sortBucketWrites(bw)
	for _, w := range sorted {
		batch.AddBucket(w.b, w.s.key, w.v)
		// In bucket order per segment too, for foldFlushed; the groups
		// while the vector is in the cache.
		w.s.flushed = append(w.s.flushed, flushedBucket{b: w.b, v: w.v, groups: p.cols.groupsOf(w.v)})
	}
	clear(bw)
	clear(sorted)
	p.bucketWrites = bw[:0]
	for _, s := range p.dirtySegments {
		if p.ownsSegments() {
			batch.AddTotals(s.key, s.totalsDelta)
		}
		s.pending, s.flushing = s.flushing, s.pending
		s.last = nil
		copy(s.totalsFlushing, s.totalsDelta)
		clear(s.totalsDelta)
		f.segments = append(f.segments, s)
	}
	p.dirtySegments = p.dirtySegments[:0]
	p.vecs, p.vecsFlushing = p.vecsFlushing, p.vecs
	p.sortDirty()
	for i, idx := range p.dirty {
		e := p.entities.rec(idx)
		// The sort's copy of the key, not the table's: no second read of
		// the arena.
		d := &p.dirtyKeys[i]
		key := p.dirtyBytes[d.off : d.off+uint32(d.n)]
		p.entities.view(idx, p.combos[e.combo].dims, &p.view)
		batch.SetEntity(int(binary.BigEndian.Uint32(key)), key[4:], &p.view)
		e.flags &^= recDirty
		f.dirty = append(f.dirty, idx)
	}
	p.dirty = p.dirty[:0]
	f.fresh = append(f.fresh[:0], p.dict.fresh...)
	p.dict.fresh = p.dict.fresh[:0]
	for _, v := range f.fresh {
		batch.SetDictValue(p.dict.dims[v.dim], v.value, v.id)
	}
	// The overflow and histogram deltas stay where the collector sees them
	// until the commit moves them to the flushed counts.
	f.overflow = append(f.overflow, p.overflowDelta...)
	for i, d := range f.overflow {
		if d != 0 {
			batch.AddCounter(store.GlobalScope, ctrOverflow, p.cfg.Segments.Dimensions[i], d)
		}
	}
	for t, h := range p.histDelta {
		if len(f.histBuf) <= t {
			f.histBuf = append(f.histBuf, make([]int64, len(h)))
		}
		hb := f.histBuf[t]
		copy(hb, h)
		f.hist = append(f.hist, hb)
		if slices.ContainsFunc(h, func(x int64) bool { return x != 0 }) {
			batch.AddHistogram(t, h)
		}
	}
	for _, part := range p.parts {
		if part.next >= 0 && part.next != part.stored {
			batch.SetOffset(part.tp.Topic, part.tp.Partition, part.next)
		}
		writeCounters(batch, part)
		f.parts = append(f.parts, flushedPart{part, part.next, part.counts})
	}
	if p.eventClock {
		batch.SetMeta(metaClock, p.clock)
	}
	if p.hasHistory {
		batch.SetMeta(metaHistoryStart, p.historyStart)
	}
	batch.SetMeta(metaEntities, p.entityCount)
	batch.SetMeta(metaLastEvent, p.lastEvent)

	p.sumsMu.Lock()
	for _, s := range p.statusDirty {
		batch.SetStatus(s.key, s.statusVector())
		f.statusDirty = append(f.statusDirty, s)
	}
	f.cutoff = floorDiv(f.now-p.retentionMs, p.bucketMs)
	// Buckets a window still holds are read back to subtract them when
	// they leave it, after the commit: delete them at a later flush.
	for _, pos := range p.positions {
		f.cutoff = min(f.cutoff, pos.lo)
	}
	p.sumsMu.Unlock()
	f.deleting = f.now != 0 && f.cutoff > p.deletedBefore
	if f.deleting {
		batch.DeleteBucketsBefore(f.cutoff)
		batch.SetMeta(metaDeletedBefore, f.cutoff)
	}
	if p.scale != nil {
		p.scale.prepare(f, batch)
	}
	return f, batch
}

// restore puts what a failed flush took out back into the live state, so
// that the next flush writes it. It runs under p.mu.
func (p *Processor) restore(f *inflight) {
	p.deadLetters = append(f.deadLetters, p.deadLetters...)
	for _, s := range f.segments {
		for b, v := range s.flushing.all() {
			dst := s.vec(p, b)
			for i, x := range v {
				dst[i] += x
			}
		}
		s.clearFlushing()
		for i, d := range s.totalsFlushing {
			s.totalsDelta[i] += d
			s.totalsFlushing[i] = 0
		}
	}
	p.flushSegments = f.segments[:0]
	p.vecsFlushing.reset()
	for _, idx := range f.dirty {
		if e := p.entities.rec(idx); e.flags&recDirty == 0 {
			e.flags |= recDirty
			p.dirty = append(p.dirty, idx)
			p.addPending(p.entityBytes(e))
		}
	}
	p.flushDirty = f.dirty[:0]
	p.dict.fresh = append(f.fresh, p.dict.fresh...)
}

// pendingBudget bounds what a flush writes, and so the memory held between
// flushes: a catch-up applies records of thousands of buckets and of many
// entities between two flushes, each bucket making a vector per segment
// and each entity a state to write. Reaching it makes Run flush early;
// twice it makes ApplyBatch wait for a flush. In the scale-out mode it also
// bounds the size of a marker (docs/scaling.md), which must stay below the
// deltas topic's max.message.bytes. 8 MiB took the default bench's peak
// RSS 20-30 MiB below 16 MiB's for the same CPU; once the evaluation
// columns had shrunk, 2 MiB took it another ~14 MiB lower for 1-2% more
// CPU and 5-6% less of a catch-up's rate (more flushes, each holding the
// lock); 1 MiB cost 2-3% more CPU. With the entity table and the large
// columns mapped outside the Go heap, 4 MiB costs ~8 MiB of peak over 2
// MiB and gives back 7% of the CPU and 9% of the rate (docs/performance.md).
const pendingBudget = 4 << 20

// dirtyKey is an entry of sortDirty's scratch.
type dirtyKey struct {
	prefix uint64 // the key's first 8 bytes, big-endian, zero-padded
	off    uint32 // of the key in the scratch bytes
	n      uint16
	idx    uint32
}

// sortDirty orders p.dirty by entity key, the order of the store's keys,
// so that Pebble inserts a flush's entity states into its memtable in
// key order: each search then runs down a path close to the one before
// (6.4% of a replay's profile against 7.2% unsorted; sorting took 1%).
// The keys are copied side by side first, so that comparing them does
// not chase the table's arena; p.dirtyKeys[i] is then p.dirty[i]'s key in
// p.dirtyBytes, until the next sort.
func (p *Processor) sortDirty() {
	keys, dk := p.dirtyBytes[:0], p.dirtyKeys[:0]
	for _, idx := range p.dirty {
		k := p.entities.key(p.entities.rec(idx))
		var pre [8]byte
		copy(pre[:], k)
		dk = append(dk, dirtyKey{binary.BigEndian.Uint64(pre[:]), uint32(len(keys)), uint16(len(k)), idx})
		keys = append(keys, k...)
	}
	slices.SortFunc(dk, func(a, b dirtyKey) int {
		if c := cmp.Compare(a.prefix, b.prefix); c != 0 {
			return c
		}
		return bytes.Compare(keys[a.off:a.off+uint32(a.n)], keys[b.off:b.off+uint32(b.n)])
	})
	for i, d := range dk {
		p.dirty[i] = d.idx
	}
	p.dirtyBytes, p.dirtyKeys = keys, dk
}

// bucketOverhead is what a pending bucket holds besides its vector: its
// slot in the segment's bucketTable (32 bytes, at most three quarters
// full), and at the flush its flushedBucket and two bucketWrites (32 bytes
// each). Counting only the vector let a catch-up hold about twice the
// budget.
const bucketOverhead = 43 + 3*32

// addPending counts n more bytes for the next flush and asks Run for an
// early flush when they reach pendingLimit. It runs under p.mu.
func (p *Processor) addPending(n int64) {
	if v := p.pending.Add(n); v >= p.pendingLimit && v-n < p.pendingLimit {
		select {
		case p.flushNow <- struct{}{}:
		default:
		}
	}
}

// entityBytes bounds what the state of e takes in a flush: its key, reach
// times and dimension values, and room for every seen id it may collect
// before the flush.
func (p *Processor) entityBytes(e *entityRec) int64 {
	return int64(e.keyLen) + 8*int64(len(p.cfg.Funnel.Stages)+maxSeenIDs+2) + int64(p.combos[e.combo].dimBytes)
}

// maxEvalSteps bounds the bucket boundaries one flush evaluates one by one;
// a larger jump of the event clock (a gap in a replay) is taken at once.
const maxEvalSteps = 100_000

// advanceAndEvaluate moves the windows to now and runs degradation
// detection. With the wall clock it evaluates once per flush. With the
// event clock it evaluates at every bucket boundary the clock crossed, so
// that the hysteresis of a replay does not depend on when flushes happened.
func (p *Processor) advanceAndEvaluate(now int64) error {
	if now == 0 {
		p.evaluate()
		return nil
	}
	if p.eventClock {
		nb := floorDiv(now, p.bucketMs)
		from := p.evalBucket + 1
		if !p.evaluated {
			from = p.evalHistoryStart
		}
		if nb-from > maxEvalSteps {
			from = nb
		}
		if err := p.step(from, nb); err != nil {
			return err
		}
		p.evalBucket, p.evaluated = nb, true
	}
	if err := p.advance(now); err != nil {
		return fmt.Errorf("advance windows: %w", err)
	}
	if !p.eventClock {
		p.evaluate()
	}
	return nil
}

func writeCounters(b *store.Batch, part *partition) {
	scope := uint32(part.tp.Partition)
	topic := part.tp.Topic
	c, f := &part.counts, &part.flushed
	add := func(name string, now, then int64) {
		if now != then {
			b.AddCounter(scope, name, topic, now-then)
		}
	}
	add(ctrConsumed, c.consumed, f.consumed)
	add(ctrApplied, c.applied, f.applied)
	add(ctrDuplicate, c.duplicate, f.duplicate)
	add(ctrLate, c.late, f.late)
	for r := ReasonMalformedJSON; r < numReasons; r++ {
		add(ctrInvalid+r.String(), c.invalid[r], f.invalid[r])
	}
}

// sweepChunk is how many stored entities each flush checks for expiry, so
// that expiry costs a bounded amount per flush however many entities exist.
const sweepChunk = 20_000

// sweep deletes a chunk of expired entities, resuming where the previous
// sweep stopped.
func (p *Processor) sweep(now int64) error {
	if now == 0 {
		return nil
	}
	var dead [][]byte
	next, err := p.st.Entities(p.sweepAfter, sweepChunk, func(key []byte, partition int, id []byte, e *store.Entity) bool {
		last := e.LastSeen
		if idx, ok := p.entities.find(key[1:], xxhash.Sum64(key[1:])); ok {
			r := p.entities.rec(idx)
			if r.flags&recDirty != 0 {
				// Applied since the last flush's prepare: its state is
				// not in the store yet, the next flush writes it.
				return true
			}
			last = r.lastSeen
		}
		if now-last > p.ttlMs {
			dead = append(dead, slices.Clone(key))
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("sweep entities: %w", err)
	}
	p.sweepAfter = next
	if len(dead) == 0 {
		return nil
	}
	batch := p.st.NewBatch()
	for _, k := range dead {
		partition := int(binary.BigEndian.Uint32(k[1:5]))
		batch.DeleteEntity(partition, k[5:])
	}
	// Entities created since the flush's prepare are not in the store:
	// the count stored with this batch is the committed one.
	batch.SetMeta(metaEntities, p.storedEntities-int64(len(dead)))
	if err := batch.Commit(); err != nil {
		return fmt.Errorf("delete expired entities: %w", err)
	}
	for _, k := range dead {
		h := xxhash.Sum64(k[1:])
		if idx, ok := p.entities.find(k[1:], h); ok {
			p.entities.remove(idx, h)
		}
	}
	p.entityCount -= int64(len(dead))
	p.storedEntities -= int64(len(dead))
	return nil
}

// evict drops the least recently seen (in event time) entities beyond the
// configured cache size, down to 90% of it; the next event of a dropped
// entity reads it back from the store. It runs after a commit, when no
// entity is dirty.
func (p *Processor) evict() {
	t := p.entities
	limit := p.cfg.Store.EntityCache
	if t.live <= limit {
		return
	}
	drop := int64(t.live - limit*9/10)
	// The lastSeen below which drop entities lie: a histogram of lastSeen
	// over evictBins bins, then the bin where the count is reached.
	lo, hi := int64(math.MaxInt64), int64(math.MinInt64)
	t.each(func(_ uint32, r *entityRec) {
		lo, hi = min(lo, r.lastSeen), max(hi, r.lastSeen)
	})
	const evictBins = 4096
	width := (hi-lo)/evictBins + 1
	hist := append(p.evictBuf[:0], make([]int64, evictBins)...)
	p.evictBuf = hist
	t.each(func(_ uint32, r *entityRec) { hist[(r.lastSeen-lo)/width]++ })
	cut, below := int64(0), int64(0)
	for cut < evictBins-1 && below+hist[cut] < drop {
		below += hist[cut]
		cut++
	}
	edge := lo + cut*width
	inBin := drop - below // to drop from the cut bin
	t.each(func(idx uint32, r *entityRec) {
		if r.lastSeen >= edge+width || r.flags&recDirty != 0 {
			return
		}
		if r.lastSeen >= edge {
			if inBin <= 0 {
				return
			}
			inBin--
		}
		t.remove(idx, xxhash.Sum64(t.key(r)))
	})
}

// Run builds the entity filter (see loadFilter), then flushes every flush
// interval until ctx is done, then flushes once more so that a graceful
// shutdown loses nothing. Flush errors are logged and retried; Run returns
// the error of the final flush. Beside the flushes it rebuilds the entity
// filter whenever it fills up.
func (p *Processor) Run(ctx context.Context) error {
	p.loadFilter()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.rebuildFilters(gctx) })
	g.Go(func() error { return p.flushEvery(gctx) })
	return g.Wait()
}

// flushEvery is Run's flushing.
func (p *Processor) flushEvery(ctx context.Context) error {
	t := time.NewTicker(D(p.cfg.FlushInterval))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := p.Flush(context.WithoutCancel(ctx)); err != nil {
				return fmt.Errorf("final flush: %w", err)
			}
			return nil
		case <-t.C:
			if err := p.Flush(ctx); err != nil && !errors.Is(err, context.Canceled) {
				p.logger.Error("flush failed; consumption paused until it succeeds", "err", err)
			}
		case <-p.flushNow:
			// The pending deltas reached their bound (a catch-up): flush
			// early, so that memory does not grow with the rate.
			if err := p.flush(ctx, false, p.pendingLimit); err != nil && !errors.Is(err, context.Canceled) {
				p.logger.Error("flush failed; consumption paused until it succeeds", "err", err)
			}
		}
	}
}
