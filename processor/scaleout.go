package processor

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/store"
)

// scaleHooks are the calls a flush makes in the scale-out mode: prepare
// runs under the processor's mutex when the batch is built, beforeCommit
// after it, before the batch is committed (a failure fails the flush).
type scaleHooks struct {
	prepare      func(f *inflight, b *store.Batch)
	beforeCommit func(ctx context.Context, b *store.Batch) error
	// entitiesOnly is set on stage 1: its segment deltas go to the
	// markers, not to its own store and windows.
	entitiesOnly bool
}

// ownsSegments reports whether the processor stores and windows its
// segment deltas itself (all but stage 1 of the scale-out mode).
func (p *Processor) ownsSegments() bool { return p.scale == nil || !p.scale.entitiesOnly }

// ErrFenced is returned by ScaleOut.Run when a marker of this replica was
// rejected: another replica owns one of its partitions. The local store is
// at an accepted state; a restart resumes from it.
var ErrFenced = errors.New("a marker of this replica was rejected: another replica took over its partitions; restarting is required")

// deltasMaxBytes bounds a marker; the deltas topic is created with it.
const deltasMaxBytes = 64 << 20

type markerKey struct{ writer, seq uint64 }

// decision is stage 2's verdict on a marker and, when accepted, the
// sequence number it gave each entity-partition the marker covers.
type decision struct {
	accepted bool
	seqs     map[int]int64
}

type histEntry struct {
	ep       int
	seq, off int64
}

// ScaleOut runs a replica in the scale-out mode (docs/scaling.md): stage 1
// is a Processor of the entities of the assigned partitions whose flushes
// become markers on the deltas topic; stage 2 is a Processor of segments fed
// by every accepted marker of every replica. Build it with NewScaleOut,
// give it the consumer with Attach, and run it with Run instead of the
// processors' and the consumer's Run.
type ScaleOut struct {
	cfg      Config
	logger   *slog.Logger
	topic    string
	dialer   *kafka.Dialer
	client   *kafka.Client
	entities *Processor
	segments *Processor
	consumer *Consumer
	writer   uint64
	nextSeq  atomic.Uint64

	// outgoing is the marker of the running stage-1 flush (under its
	// flushMu).
	outgoing *marker
	// localSeq is, per entity-partition the stage-1 store holds, the
	// sequence number of the last accepted marker its state includes.
	holdMu   sync.Mutex
	localSeq map[int]int64

	// The acceptance state of stage 2, under segments.mu: the next input
	// offset of every partition as of the accepted markers, the count of
	// accepted markers per entity-partition, and the deltas offsets of the
	// accepted markers not yet committed.
	applied  map[store.TopicPartition]int64
	seq      map[int]int64
	histPend []histEntry

	// Stage 2 keeps the segments of the segment-partitions it holds, under
	// segments.mu: held are those it applies markers to (restored and
	// assigned), segPos is, for each other one whose segments it has, the
	// deltas offset up to which their deltas are in its state. heldView is
	// held for the collector. A segment belongs to the partition
	// segmentPart gives it; bdNames are the breakdowns' names.
	held     map[int]bool
	segPos   map[int]int64
	heldView atomic.Pointer[map[int]bool]
	bdNames  []string
	keyBuf   []byte

	// flagsOut holds the flags of the held segments changed since the last
	// marker, by segment key: the next marker carries them.
	flagsMu  sync.Mutex
	flagsOut map[string]markerStatus

	waitMu  sync.Mutex
	waiters map[markerKey]chan decision

	initDone  chan struct{}
	startEnd  int64
	readPos   atomic.Int64 // next deltas offset stage 2 applied
	caughtUp  atomic.Bool
	restoring atomic.Bool
	remaining atomic.Int64
	owned     atomic.Pointer[map[int]bool]
	parts     atomic.Int64
	fenceOnce sync.Once
	fenced    chan struct{}

	restoreDesc, ownedDesc *prometheus.Desc
}

// NewScaleOut builds both stages on their stores: entityStore holds stage
// 1 (as the single-replica store does), segmentStore stage 2. cfg must be
// valid. o.Registerer receives stage 1's operational series and stage 2's
// per-segment series of the segments this replica exports.
func NewScaleOut(cfg Config, entityStore, segmentStore *store.Store, o Options) (*ScaleOut, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	reg := o.Registerer
	o.Registerer = nil
	p1, err := New(cfg, entityStore, o)
	if err != nil {
		return nil, fmt.Errorf("stage 1: %w", err)
	}
	cfg2 := cfg
	// Values were admitted by the owner of each entity's partition: stage 2
	// takes what it receives.
	cfg2.Segments.MaxValues = math.MaxInt32
	o2 := o
	o2.DeadLetter = nil
	p2, err := New(cfg2, segmentStore, o2)
	if err != nil {
		return nil, fmt.Errorf("stage 2: %w", err)
	}
	dialer, err := cfg.Kafka.Dialer()
	if err != nil {
		return nil, err
	}
	transport, err := cfg.Kafka.Transport()
	if err != nil {
		return nil, err
	}
	s := &ScaleOut{
		cfg:      cfg,
		logger:   o.Logger,
		topic:    cfg.ScaleOut.Topic(cfg.Kafka.Group),
		dialer:   dialer,
		client:   &kafka.Client{Addr: kafka.TCP(cfg.Kafka.Brokers...), Transport: transport, Timeout: 30 * time.Second},
		entities: p1,
		segments: p2,
		writer:   rand.Uint64(),
		localSeq: map[int]int64{},
		applied:  map[store.TopicPartition]int64{},
		seq:      map[int]int64{},
		held:     map[int]bool{},
		segPos:   map[int]int64{},
		flagsOut: map[string]markerStatus{},
		waiters:  map[markerKey]chan decision{},
		initDone: make(chan struct{}),
		fenced:   make(chan struct{}),
		restoreDesc: prometheus.NewDesc("funnel_restore_remaining_records",
			"Deltas-topic records left to read to restore the state of newly assigned partitions.", nil, nil),
		ownedDesc: prometheus.NewDesc("funnel_scale_out_partitions_owned",
			"Entity-partitions this replica consumes and exports the segments of.", nil, nil),
	}
	for _, b := range cfg.Segments.Breakdowns {
		s.bdNames = append(s.bdNames, BreakdownName(b))
	}
	p1.scale = &scaleHooks{prepare: s.prepareMarker, beforeCommit: s.sendMarker, entitiesOnly: true}
	p2.scale = &scaleHooks{prepare: s.prepareAccepted, beforeCommit: func(context.Context, *store.Batch) error { return nil }}
	p2.metrics.keep = s.exported
	if reg != nil {
		m1 := p1.metrics
		for _, c := range []prometheus.Collector{m1.flushDuration, m1.collectDuration, m1.flushErrors, m1.buildInfo, scaleCollector{s}} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// Entities is stage 1, the processor the consumer feeds.
func (s *ScaleOut) Entities() *Processor { return s.entities }

// Segments is stage 2, the processor whose numbers the page and the API
// show.
func (s *ScaleOut) Segments() *Processor { return s.segments }

// Attach makes c consume for this replica: the sticky balancer, a restore
// of the assigned partitions before each generation reads them, readiness,
// and staying in the group on shutdown so that a restart keeps the
// partitions (kafka-go has no static membership).
func (s *ScaleOut) Attach(c *Consumer) {
	c.balancers = []kafka.GroupBalancer{StickyBalancer{Holdings: s.Holdings}}
	c.onAssign = s.assign
	c.ready = s.Ready
	c.stayInGroup = true
	s.consumer = c
}

// Holdings returns the entity-partitions the stage-1 store holds with the
// sequence number of their state.
func (s *ScaleOut) Holdings() map[int]int64 {
	s.holdMu.Lock()
	defer s.holdMu.Unlock()
	out := make(map[int]int64, len(s.localSeq))
	for p, q := range s.localSeq {
		out[p] = q
	}
	return out
}

// Ready reports whether stage 2 has caught up with the deltas topic as it
// was at start and no restore runs.
func (s *ScaleOut) Ready() bool {
	select {
	case <-s.initDone:
	default:
		return false
	}
	return s.caughtUp.Load() && !s.restoring.Load()
}

// Run runs both stages and the consumer until ctx is done. Stage 2 keeps
// reading until stage 1 has made its last flush, so that it can decide the
// last marker.
func (s *ScaleOut) Run(ctx context.Context) error {
	if s.consumer == nil {
		return errors.New("scale-out: no consumer attached")
	}
	if err := s.init(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	inner, cancelInner := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelInner()
	ig, ictx := errgroup.WithContext(inner)
	ig.Go(func() error { return s.readDeltas(ictx) })
	ig.Go(func() error { return s.segments.Run(ictx) })

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.consumer.Run(gctx) })
	g.Go(func() error { return s.entities.Run(gctx) })
	g.Go(func() error {
		select {
		case <-gctx.Done():
			return nil
		case <-s.fenced:
			return ErrFenced
		}
	})
	err := g.Wait()
	cancelInner()
	return errors.Join(err, ig.Wait())
}

func (s *ScaleOut) fence() { s.fenceOnce.Do(func() { close(s.fenced) }) }

func appliedMeta(tp store.TopicPartition) string {
	return "scale_applied/" + tp.Topic + "/" + strconv.Itoa(tp.Partition)
}
func seqMeta(ep int) string   { return "scale_seq/" + strconv.Itoa(ep) }
func segPosMeta(q int) string { return "scale_segpos/" + strconv.Itoa(q) }
func histMeta(ep int, seq int64) string {
	return "scale_hist/" + strconv.Itoa(ep) + "/" + strconv.FormatInt(seq, 10)
}

// init creates the deltas topic when missing, learns the partition count
// of the input and loads the acceptance state. It retries until it
// succeeds or ctx is done.
func (s *ScaleOut) init(ctx context.Context) error {
	backoff := time.Second
	for {
		err := s.tryInit(ctx)
		if err == nil {
			return nil
		}
		s.logger.Warn("scale-out start failed; retrying", "err", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

func (s *ScaleOut) tryInit(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := s.client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{
		Topic:             s.topic,
		NumPartitions:     1,
		ReplicationFactor: s.cfg.ScaleOut.ReplicationFactor,
		ConfigEntries: []kafka.ConfigEntry{
			{ConfigName: "retention.ms", ConfigValue: "-1"},
			{ConfigName: "max.message.bytes", ConfigValue: strconv.Itoa(deltasMaxBytes)},
		},
	}}})
	if err != nil {
		return fmt.Errorf("create topic %q: %w", s.topic, err)
	}
	if err := resp.Errors[s.topic]; err != nil && !errors.Is(err, kafka.TopicAlreadyExists) {
		return fmt.Errorf("create topic %q: %w", s.topic, err)
	}
	first := s.cfg.Kafka.Topics[0].Name
	md, err := s.client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{first, s.topic}})
	if err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	var parts int
	for _, t := range md.Topics {
		if t.Name == first {
			if t.Error != nil {
				return fmt.Errorf("topic %q: %w", first, t.Error)
			}
			parts = len(t.Partitions)
		}
	}
	if parts == 0 {
		return fmt.Errorf("topic %q has no partitions yet", first)
	}
	end, err := s.deltasEnd(ctx)
	if err != nil {
		return err
	}

	p1, p2 := s.entities, s.segments
	s.holdMu.Lock()
	for ep := range parts {
		q, ok, err := p1.st.Meta(seqMeta(ep))
		if err != nil {
			s.holdMu.Unlock()
			return err
		}
		if ok {
			s.localSeq[ep] = q
		}
	}
	s.holdMu.Unlock()
	p2.mu.Lock()
	defer p2.mu.Unlock()
	for ep := range parts {
		q, ok, err := p2.st.Meta(seqMeta(ep))
		if err != nil {
			return err
		}
		if ok {
			s.seq[ep] = q
		}
		for _, t := range s.cfg.Kafka.Topics {
			tp := store.TopicPartition{Topic: t.Name, Partition: ep}
			off, ok, err := p2.st.Meta(appliedMeta(tp))
			if err != nil {
				return err
			}
			if ok {
				s.applied[tp] = off
			}
		}
	}
	next := p2.partition(s.topic, 0).next
	found := false
	for q := range parts {
		off, ok, err := p2.st.Meta(segPosMeta(q))
		if err != nil {
			return err
		}
		if ok {
			s.segPos[q], found = off, true
		}
	}
	if !found && next > 0 {
		// A store of the release that kept every segment: all of them
		// are up to date.
		for q := range parts {
			s.segPos[q] = next
		}
	}
	// Nothing is held before the first generation's restore.
	p2.sumsMu.Lock()
	for _, sg := range p2.segmentList {
		sg.frozen = true
	}
	p2.sumsMu.Unlock()
	s.heldView.Store(&map[int]bool{})
	pos := max(next, 0)
	s.readPos.Store(pos)
	s.startEnd = end
	s.caughtUp.Store(pos >= end)
	s.parts.Store(int64(parts))
	close(s.initDone)
	s.logger.Info("scale-out mode", "deltas_topic", s.topic, "partitions", parts, "deltas_offset", pos, "deltas_end", end)
	return nil
}

// deltasEnd returns the end offset of the deltas topic.
func (s *ScaleOut) deltasEnd(ctx context.Context) (int64, error) {
	resp, err := s.client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{s.topic: {kafka.LastOffsetOf(0)}}})
	if err != nil {
		return 0, fmt.Errorf("end offset of %q: %w", s.topic, err)
	}
	parts := resp.Topics[s.topic]
	if len(parts) == 0 {
		return 0, fmt.Errorf("end offset of %q: no answer", s.topic)
	}
	if parts[0].Error != nil {
		return 0, fmt.Errorf("end offset of %q: %w", s.topic, parts[0].Error)
	}
	return parts[0].LastOffset, nil
}

func (s *ScaleOut) newDeltasReader() *kafka.Reader {
	return kafka.NewReader(kafka.ReaderConfig{
		Brokers:         s.cfg.Kafka.Brokers,
		Topic:           s.topic,
		Partition:       0,
		Dialer:          s.dialer,
		MinBytes:        1,
		MaxBytes:        deltasMaxBytes + 1<<20,
		MaxWait:         readerMaxWait,
		ReadLagInterval: -1, // see readPartition
		ReadBackoffMin:  50 * time.Millisecond,
		ReadBackoffMax:  2 * time.Second,
		Logger:          kafkaLogger(s.logger, slog.LevelDebug),
		ErrorLogger:     kafkaLogger(s.logger, slog.LevelWarn),
	})
}

// readDeltas is stage 2's input: every marker of the deltas topic, in
// order, from the offset stored with stage 2's state.
func (s *ScaleOut) readDeltas(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := s.readDeltasFrom(ctx, s.readPos.Load())
		if ctx.Err() != nil {
			return nil
		}
		s.logger.Warn("reading the deltas topic failed; retrying", "err", err, "backoff", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
	return nil
}

func (s *ScaleOut) readDeltasFrom(ctx context.Context, pos int64) error {
	r := s.newDeltasReader()
	defer r.Close()
	if err := r.SetOffset(pos); err != nil {
		return err
	}
	p2 := s.segments
	var dec markerDecoder
	for {
		msg, err := r.FetchMessage(ctx)
		if err != nil {
			return err
		}
		// The deltas of a marker that will be rejected are not decoded,
		// and those of one that will be accepted are decoded outside
		// stage 2's mutex: only this goroutine changes what decides it.
		m, rest, err := dec.header(msg.Value)
		if err == nil && s.accepts(msg.Offset, m) {
			err = dec.deltas(rest)
		}
		if err != nil {
			// Skipped when its header is unreadable, rejected when its
			// deltas are.
			s.logger.Error("unreadable marker", "offset", msg.Offset, "err", err)
		}
		s.applyMarker(msg.Offset, m, err == nil)
		s.readPos.Store(msg.Offset + 1)
		if !s.caughtUp.Load() {
			s.remaining.Store(max(s.startEnd-msg.Offset-1, 0))
		}
		if !s.caughtUp.Load() && msg.Offset+1 >= s.startEnd {
			s.caughtUp.Store(true)
			s.logger.Info("stage 2 caught up with the deltas topic", "offset", msg.Offset+1)
		}
		if p2.pending.Load() >= 2*p2.pendingLimit {
			_ = p2.flush(ctx, false, 2*p2.pendingLimit)
		}
	}
}

// prepareMarker builds the marker of a stage-1 flush from what the flush
// writes. It runs under the stage-1 processor's mutex.
func (s *ScaleOut) prepareMarker(f *inflight, _ *store.Batch) {
	s.outgoing = nil
	p := s.entities
	var parts []markerPart
	for _, fp := range f.parts {
		if fp.next >= 0 && fp.next != fp.part.stored {
			parts = append(parts, markerPart{Topic: fp.part.tp.Topic, Partition: fp.part.tp.Partition, From: fp.part.stored, To: fp.next})
		}
	}
	if len(parts) == 0 {
		// Flags changed with no new input (a quiet partition, the end of a
		// catch-up): a marker of empty ranges of the partitions this
		// replica owns carries them, accepted or fenced like any other.
		s.flagsMu.Lock()
		flags := len(s.flagsOut) > 0
		s.flagsMu.Unlock()
		owned := s.owned.Load()
		if !flags || owned == nil {
			return
		}
		for _, fp := range f.parts {
			if fp.next >= 0 && (*owned)[fp.part.tp.Partition] {
				parts = append(parts, markerPart{Topic: fp.part.tp.Topic, Partition: fp.part.tp.Partition, From: fp.next, To: fp.next})
			}
		}
		if len(parts) == 0 {
			return
		}
	}
	m := &marker{
		Writer: s.writer, Seq: s.nextSeq.Add(1), Parts: parts,
		Clock: p.clock, LastEvent: p.lastEvent, HistoryStart: f.historyStart, HasHistory: f.hasHistory,
	}
	for _, sg := range f.segments {
		ms := markerSegment{Breakdown: sg.breakdown, Labels: sg.labels, Totals: slices.Clone(sg.totalsFlushing)}
		// Not sorted: under the mutex, sorting the thousands of buckets
		// of a catch-up flush costs more than the byte or two per bucket
		// it would save in the record.
		ms.Buckets = make([]int64, 0, sg.flushing.n)
		ms.Vecs = make([]int64, 0, sg.flushing.n*p.layout.vecLen)
		for b, v := range sg.flushing.all() {
			ms.Buckets = append(ms.Buckets, b)
			ms.Vecs = append(ms.Vecs, v...)
		}
		m.Segments = append(m.Segments, ms)
	}
	for _, h := range f.hist {
		m.Hist = append(m.Hist, slices.Clone(h))
	}
	s.flagsMu.Lock()
	for k, st := range s.flagsOut {
		m.Status = append(m.Status, st)
		delete(s.flagsOut, k)
	}
	s.flagsMu.Unlock()
	t := p.entities
	for _, idx := range f.dirty {
		e := t.rec(idx)
		key := t.key(e)
		var view store.Entity
		dims := p.combos[e.combo].dims
		t.view(idx, dims, &view)
		me := markerEntity{
			Partition: int(binary.BigEndian.Uint32(key)), ID: slices.Clone(key[4:]),
			LastSeen: view.LastSeen, Reached: slices.Clone(view.Reached), Seen: slices.Clone(view.Seen),
		}
		for i, id := range dims {
			me.Dims = append(me.Dims, p.dict.value(i, id))
		}
		m.entities = append(m.entities, me)
	}
	s.outgoing = m
}

// sendMarker produces the marker of a stage-1 flush and waits for stage 2
// to decide it; the flush commits only an accepted marker. A rejected one
// fences this replica.
func (s *ScaleOut) sendMarker(ctx context.Context, b *store.Batch) error {
	m := s.outgoing
	s.outgoing = nil
	if m == nil {
		return nil
	}
	data, err := encodeMarker(m)
	if err != nil {
		return err
	}
	k := markerKey{m.Writer, m.Seq}
	ch := make(chan decision, 1)
	s.waitMu.Lock()
	s.waiters[k] = ch
	s.waitMu.Unlock()
	defer func() {
		s.waitMu.Lock()
		delete(s.waiters, k)
		s.waitMu.Unlock()
	}()
	// Once produced, a marker may be accepted whatever happens to this
	// flush: its fate must be learnt before anything else is flushed, or
	// the next marker would repeat its offsets and be rejected. So the
	// marker is seen through to its decision even when ctx ends, within a
	// bound; a marker whose fate stays unknown fences this replica, and
	// the restart restores from what stage 2 decided.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	backoff := 100 * time.Millisecond
	for {
		resp, err := s.client.Produce(ctx, &kafka.ProduceRequest{
			Topic: s.topic, Partition: 0, RequiredAcks: kafka.RequireAll, Compression: kafka.Snappy,
			Records: kafka.NewRecordReader(kafka.Record{Value: kafka.NewBytes(data)}),
		})
		if err == nil {
			err = resp.Error
		}
		if err == nil {
			break
		}
		// Producing the same marker again is harmless: only its first
		// copy can continue its partitions.
		s.logger.Warn("producing a marker failed; retrying", "topic", s.topic, "bytes", len(data), "err", err)
		select {
		case <-ctx.Done():
			s.fence()
			return fmt.Errorf("produce marker: %w (%w)", err, ErrFenced)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	var d decision
	select {
	case d = <-ch:
	case <-ctx.Done():
		s.fence()
		return fmt.Errorf("wait for the marker's decision: %w (%w)", ctx.Err(), ErrFenced)
	}
	if !d.accepted && m.flagsOnly() {
		// Its partitions moved on without this replica, which is fenced
		// by its next marker with records if it is a zombie; the flags
		// were only a hint for the next owner.
		s.logger.Debug("a marker of flags only was rejected", "parts", m.Parts)
		return nil
	}
	if !d.accepted {
		s.logger.Error("a marker of this replica was rejected: another replica continued its partitions", "parts", m.Parts)
		s.fence()
		return ErrFenced
	}
	s.holdMu.Lock()
	for ep, q := range d.seqs {
		b.SetMeta(seqMeta(ep), q)
		s.localSeq[ep] = q
	}
	s.holdMu.Unlock()
	return nil
}

// accepts reports whether applyMarker would accept the marker m read at
// offset off.
func (s *ScaleOut) accepts(off int64, m *marker) bool {
	p := s.segments
	p.mu.Lock()
	defer p.mu.Unlock()
	part := p.partition(s.topic, 0)
	return (part.next < 0 || off >= part.next) && s.continues(m)
}

// continues reports whether every input range of m starts where the
// accepted markers left its partition. It runs under stage 2's mutex.
func (s *ScaleOut) continues(m *marker) bool {
	for _, mp := range m.Parts {
		from, seen := s.applied[store.TopicPartition{Topic: mp.Topic, Partition: mp.Partition}]
		if !seen {
			from = -1
		}
		if from != mp.From {
			return false
		}
	}
	return len(m.Parts) > 0
}

// applyMarker decides a marker read at offset off and, when it continues
// the partitions it covers, applies its deltas to stage 2. Every replica
// reads the same markers in the same order and so decides the same. m is
// nil when its header is unreadable; readable is false when its deltas
// are, and then it is rejected.
func (s *ScaleOut) applyMarker(off int64, m *marker, readable bool) {
	p := s.segments
	p.mu.Lock()
	part := p.partition(s.topic, 0)
	if part.next >= 0 && off < part.next {
		p.mu.Unlock()
		return
	}
	part.next = off + 1
	part.counts.consumed++
	if m == nil {
		p.mu.Unlock()
		return
	}
	ok := readable && s.continues(m)
	d := decision{accepted: ok}
	if ok {
		part.counts.applied++
		d.seqs = map[int]int64{}
		for _, mp := range m.Parts {
			s.applied[store.TopicPartition{Topic: mp.Topic, Partition: mp.Partition}] = mp.To
			if _, done := d.seqs[mp.Partition]; !done {
				s.seq[mp.Partition]++
				d.seqs[mp.Partition] = s.seq[mp.Partition]
				s.histPend = append(s.histPend, histEntry{mp.Partition, s.seq[mp.Partition], off})
			}
		}
		s.applyDeltas(m, func(q int) bool { return s.held[q] }, false)
	} else {
		part.counts.duplicate++
	}
	p.mu.Unlock()
	s.waitMu.Lock()
	ch := s.waiters[markerKey{m.Writer, m.Seq}]
	s.waitMu.Unlock()
	if ch != nil {
		select {
		case ch <- d:
		default: // a second copy of a marker already decided
		}
	}
}

// applyDeltas adds an accepted marker's deltas to stage 2's pending state,
// as ApplyBatch does for events, for the segments of the segment-partitions
// want accepts. A restore also takes the flags the marker carries for them,
// and skips the buckets stage 2 has deleted since. It runs under stage 2's
// mutex.
func (s *ScaleOut) applyDeltas(m *marker, want func(q int) bool, restore bool) {
	p := s.segments
	l := p.layout
	for i := range m.Segments {
		ms := &m.Segments[i]
		if len(ms.Vecs) != len(ms.Buckets)*l.vecLen || len(ms.Totals) != l.stages {
			continue // another configuration
		}
		seg := s.segmentOf(ms.Breakdown, ms.Labels, want)
		if seg == nil {
			continue
		}
		for j, b := range ms.Buckets {
			if restore && b < p.deletedBefore {
				continue
			}
			v := seg.lookup(p, b, false)
			for k, x := range ms.Vecs[j*l.vecLen : (j+1)*l.vecLen] {
				v[k] += x
			}
		}
		for j, x := range ms.Totals {
			seg.totalsDelta[j] += x
		}
	}
	if want(s.segmentPart("all", 0, nil)) {
		for t, h := range m.Hist {
			if t < len(p.histDelta) && len(h) == len(p.histDelta[t]) {
				for i, x := range h {
					p.histDelta[t][i] += x
				}
			}
		}
	}
	for _, st := range m.Status {
		if !restore {
			break
		}
		seg := s.segmentOf(st.Breakdown, st.Labels, want)
		if seg == nil || len(st.Flags) != len(seg.status) {
			continue
		}
		p.sumsMu.Lock()
		for i, f := range st.Flags {
			setStatus(seg, i, f == 1, &p.statusDirty)
		}
		p.sumsMu.Unlock()
	}
	p.clock = max(p.clock, m.Clock)
	p.lastEvent = max(p.lastEvent, m.LastEvent)
	if m.HasHistory && (!p.hasHistory || m.HistoryStart < p.historyStart) {
		p.historyStart, p.hasHistory = m.HistoryStart, true
	}
}

// segmentOf returns stage 2's segment of a breakdown and its labels when
// want accepts its segment-partition, creating it (frozen unless held); nil
// otherwise or when the breakdown is not of this configuration. It runs
// under stage 2's mutex.
func (s *ScaleOut) segmentOf(breakdown int, labels []string, want func(q int) bool) *segment {
	p := s.segments
	if breakdown < 0 || breakdown >= len(p.breakdownDims) || len(labels) != len(p.breakdownDims[breakdown]) {
		return nil
	}
	q := s.segmentPart(s.bdNames[breakdown], len(labels), func(i int) string { return labels[i] })
	if !want(q) {
		return nil
	}
	key := append(s.keyBuf[:0], byte(breakdown))
	for j, dim := range p.breakdownDims[breakdown] {
		id, _ := p.dict.id(dim, []byte(labels[j]), false)
		key = binary.BigEndian.AppendUint32(key, id)
	}
	s.keyBuf = key
	if seg, ok := p.segments[store.Segment(key)]; ok {
		return seg
	}
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	seg := p.segmentFor(key)
	seg.frozen = !s.held[q]
	return seg
}

// prepareAccepted writes stage 2's acceptance state into its flush's
// batch, with the deltas it goes with. It runs under stage 2's mutex.
func (s *ScaleOut) prepareAccepted(f *inflight, b *store.Batch) {
	p := s.segments
	next := p.partition(s.topic, 0).next
	for q := range int(s.parts.Load()) {
		pos := s.segPos[q] // 0: none of its segments yet
		if s.held[q] {
			pos = max(next, 0)
		}
		b.SetMeta(segPosMeta(q), pos)
	}
	// The flags of the held segments go to this replica's next marker, for
	// whoever holds their partition next.
	p.sumsMu.Lock()
	s.flagsMu.Lock()
	for _, sg := range f.statusDirty {
		if !sg.frozen {
			st := markerStatus{Breakdown: sg.breakdown, Labels: sg.labels}
			for _, on := range sg.status {
				f := int64(0)
				if on {
					f = 1
				}
				st.Flags = append(st.Flags, f)
			}
			s.flagsOut[string(sg.key)] = st
		}
	}
	s.flagsMu.Unlock()
	p.sumsMu.Unlock()
	for tp, off := range s.applied {
		b.SetMeta(appliedMeta(tp), off)
	}
	for ep, q := range s.seq {
		b.SetMeta(seqMeta(ep), q)
	}
	// Entries below the stored deltas offset were committed before.
	stored := s.segments.partition(s.topic, 0).stored
	keep := s.histPend[:0]
	for _, h := range s.histPend {
		if h.off >= stored {
			keep = append(keep, h)
			b.SetMeta(histMeta(h.ep, h.seq), h.off)
		}
	}
	s.histPend = keep
}

// histOffset returns the deltas offset of the accepted marker number seq
// of entity-partition ep. It runs under stage 2's mutex.
func (s *ScaleOut) histOffset(ep int, seq int64) (int64, error) {
	for _, h := range s.histPend {
		if h.ep == ep && h.seq == seq {
			return h.off, nil
		}
	}
	off, ok, err := s.segments.st.Meta(histMeta(ep, seq))
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("no deltas offset for marker %d of partition %d", seq, ep)
	}
	return off, nil
}

// restorePlan is what a newly assigned entity-partition needs: the entity
// states of the accepted markers at offsets, and then these input offsets.
type restorePlan struct {
	ep      int
	seq     int64
	offsets []int64
	applied map[string]int64
}

// assign runs before a generation reads its partitions: it waits for stage
// 2 to catch up with the deltas topic, then brings the stage-1 state of
// every assigned entity-partition to what the accepted markers say.
func (s *ScaleOut) assign(ctx context.Context, tps []store.TopicPartition) error {
	select {
	case <-s.initDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	s.restoring.Store(true)
	defer s.restoring.Store(false)
	owned := map[int]bool{}
	for _, tp := range tps {
		owned[tp.Partition] = true
	}
	s.owned.Store(&owned)

	end, err := s.deltasEnd(ctx)
	if err != nil {
		return err
	}
	for s.readPos.Load() < end {
		s.remaining.Store(end - s.readPos.Load())
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}

	var plans []*restorePlan
	p2 := s.segments
	p2.mu.Lock()
	clock := p2.clock
	for ep := range owned {
		s.holdMu.Lock()
		local := s.localSeq[ep]
		s.holdMu.Unlock()
		target := s.seq[ep]
		if local >= target {
			if local > target {
				s.logger.Warn("local state of a partition is ahead of the deltas topic", "partition", ep, "local", local, "accepted", target)
			}
			continue
		}
		pl := &restorePlan{ep: ep, seq: target, applied: map[string]int64{}}
		for q := local + 1; q <= target; q++ {
			off, err := s.histOffset(ep, q)
			if err != nil {
				p2.mu.Unlock()
				return err
			}
			pl.offsets = append(pl.offsets, off)
		}
		for _, t := range s.cfg.Kafka.Topics {
			if off, ok := s.applied[store.TopicPartition{Topic: t.Name, Partition: ep}]; ok {
				pl.applied[t.Name] = off
			}
		}
		plans = append(plans, pl)
	}
	p2.mu.Unlock()

	p1 := s.entities
	if len(plans) > 0 {
		start := time.Now()
		states, read, size, err := s.readEntityStates(ctx, plans)
		if err != nil {
			return err
		}
		if err := s.installStates(plans, states); err != nil {
			return err
		}
		n := 0
		for _, st := range states {
			n += len(st)
		}
		s.logger.Info("restored partitions from the deltas topic", "partitions", len(plans), "entities", n, "records_read", read, "bytes_read", size, "took", time.Since(start).Round(time.Millisecond))
	}
	if err := s.restoreSegments(ctx, owned); err != nil {
		return err
	}
	p1.mu.Lock()
	if p1.eventClock {
		p1.clock = max(p1.clock, clock)
	}
	p1.mu.Unlock()
	s.remaining.Store(0)
	return nil
}

// restoreSegments makes stage 2 hold the segment-partitions in owned and
// no other. It freezes those it no longer owns, and brings the segments of
// each newly owned one up to the accepted markers, reading the deltas topic
// from where its state of them stops (the start of the topic for one never
// held). A partition is held (markers apply to it) once the restore has
// read up to stage 2's position, and exported once what the restore added
// is flushed.
func (s *ScaleOut) restoreSegments(ctx context.Context, owned map[int]bool) error {
	p := s.segments
	p.mu.Lock()
	next := max(p.partition(s.topic, 0).next, 0)
	for q := range s.held {
		if !owned[q] {
			delete(s.held, q)
			s.segPos[q] = next
		}
	}
	want := map[int]bool{}
	from := int64(math.MaxInt64)
	for q := range owned {
		if !s.held[q] {
			want[q] = true
			from = min(from, s.segPos[q])
		}
	}
	// Also thaws what a restore whose last flush failed left held but
	// frozen.
	s.setFrozen()
	p.mu.Unlock()
	if len(want) == 0 {
		return nil
	}

	start := time.Now()
	r := s.newDeltasReader()
	defer r.Close()
	if err := r.SetOffset(from); err != nil {
		return err
	}
	var (
		dec              markerDecoder
		read, size, used int64
	)
	pos := from
	for {
		p.mu.Lock()
		if next := max(p.partition(s.topic, 0).next, 0); pos < next {
			p.mu.Unlock()
			s.remaining.Store(next - pos)
		} else {
			for q := range want {
				s.held[q] = true
				delete(s.segPos, q)
			}
			p.mu.Unlock()
			break
		}
		msg, err := r.FetchMessage(ctx)
		if err != nil {
			return fmt.Errorf("restore segments from %q: %w", s.topic, err)
		}
		read++
		size += int64(len(msg.Value))
		pos = msg.Offset + 1
		m, rest, err := dec.header(msg.Value)
		accepted := false
		if err == nil {
			p.mu.Lock()
			accepted, err = s.acceptedAt(msg.Offset, m)
			p.mu.Unlock()
			if err != nil {
				return err
			}
		}
		// Stage 2 rejected a marker whose deltas are unreadable.
		accepted = accepted && dec.deltas(rest) == nil
		p.mu.Lock()
		if accepted {
			s.applyDeltas(m, func(q int) bool { return want[q] && s.segPos[q] <= msg.Offset }, true)
			used++
		}
		for q := range want {
			s.segPos[q] = max(s.segPos[q], pos)
		}
		p.mu.Unlock()
		if p.pending.Load() >= 2*p.pendingLimit {
			if err := p.flush(ctx, false, 2*p.pendingLimit); err != nil {
				return err
			}
		}
	}
	if err := p.flush(ctx, false, 0); err != nil {
		return err
	}
	p.mu.Lock()
	s.setFrozen()
	p.mu.Unlock()
	s.logger.Info("restored segments from the deltas topic", "partitions", len(want), "records_read", read, "markers_applied", used, "bytes_read", size, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// setFrozen freezes the segments of the segment-partitions stage 2 does not
// hold and exports those it holds. The segments it thaws are evaluated at
// the current positions (their flags, restored, carry the hysteresis), since
// the windows may not move again before they are scraped. It runs under
// stage 2's mutex.
func (s *ScaleOut) setFrozen() {
	p := s.segments
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	var thawed []*segment
	for _, sg := range p.segmentList {
		q := s.segmentPart(s.bdNames[sg.breakdown], len(sg.labels), func(i int) string { return sg.labels[i] })
		frozen := !s.held[q]
		if sg.frozen && !frozen {
			thawed = append(thawed, sg)
		}
		sg.frozen = frozen
	}
	if p.positioned {
		p.evaluateSegments(thawed)
	}
	held := maps.Clone(s.held)
	s.heldView.Store(&held)
}

// acceptedAt reports whether stage 2 accepted the marker m it read at
// deltas offset off: the accepted markers of an entity-partition are
// numbered in offset order (histOffset), so a binary search over those of
// m's first partition finds it. It runs under stage 2's mutex.
func (s *ScaleOut) acceptedAt(off int64, m *marker) (bool, error) {
	if len(m.Parts) == 0 {
		return false, nil
	}
	ep := m.Parts[0].Partition
	n := int(s.seq[ep])
	var err error
	i := sort.Search(n, func(i int) bool {
		o, e := s.histOffset(ep, int64(i)+1)
		if e != nil {
			err = e
			return true
		}
		return o >= off
	})
	if err != nil || i == n {
		return false, err
	}
	o, err := s.histOffset(ep, int64(i)+1)
	return o == off, err
}

// readEntityStates reads the markers the plans need and keeps, per
// entity-partition and entity, the newest state.
func (s *ScaleOut) readEntityStates(ctx context.Context, plans []*restorePlan) (states map[int]map[string]*markerEntity, read, size int64, err error) {
	need := map[int64][]int{} // offset -> entity-partitions
	lo, hi := int64(math.MaxInt64), int64(-1)
	for _, pl := range plans {
		for _, off := range pl.offsets {
			need[off] = append(need[off], pl.ep)
			lo, hi = min(lo, off), max(hi, off)
		}
	}
	states = map[int]map[string]*markerEntity{}
	for _, pl := range plans {
		states[pl.ep] = map[string]*markerEntity{}
	}
	r := s.newDeltasReader()
	defer r.Close()
	if err := r.SetOffset(lo); err != nil {
		return nil, 0, 0, err
	}
	var dec markerDecoder
	for {
		s.remaining.Store(hi - lo - read + 1)
		msg, err := r.FetchMessage(ctx)
		if err != nil {
			return nil, read, size, fmt.Errorf("restore from %q: %w", s.topic, err)
		}
		read++
		size += int64(len(msg.Value))
		if eps, ok := need[msg.Offset]; ok {
			es, err := dec.entities(msg.Value, func(p int) bool { return slices.Contains(eps, p) })
			if err != nil {
				return nil, read, size, err
			}
			for i := range es {
				e := &es[i]
				states[e.Partition][string(e.ID)] = e
			}
		}
		if msg.Offset >= hi {
			return states, read, size, nil
		}
	}
}

// installStates writes the restored entity states and the partitions' new
// offsets to the stage-1 store in one batch, and drops the cached states
// of those partitions.
func (s *ScaleOut) installStates(plans []*restorePlan, states map[int]map[string]*markerEntity) error {
	p := s.entities
	p.loadFilter()
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	eps := map[int]bool{}
	for _, pl := range plans {
		eps[pl.ep] = true
	}
	t := p.entities
	t.each(func(idx uint32, r *entityRec) {
		k := t.key(r)
		if r.flags&recDirty == 0 && eps[int(binary.BigEndian.Uint32(k))] {
			t.remove(idx, xxhash.Sum64(k))
		}
	})
	b := p.st.NewBatch()
	var key []byte
	for _, pl := range plans {
		for id, me := range states[pl.ep] {
			if len(me.Reached) != len(p.cfg.Funnel.Stages) || len(me.Dims) != len(p.cfg.Segments.Dimensions) {
				continue
			}
			e := store.Entity{LastSeen: me.LastSeen, Reached: me.Reached, Seen: me.Seen}
			for i, v := range me.Dims {
				dim, overflow := p.dict.id(i, []byte(v), false)
				if overflow {
					p.overflowDelta[i]++
				}
				e.Dims = append(e.Dims, dim)
			}
			b.SetEntity(pl.ep, []byte(id), &e)
			key = binary.BigEndian.AppendUint32(key[:0], uint32(pl.ep))
			key = append(key, id...)
			h := xxhash.Sum64(key)
			if !p.known.mayContain(h) {
				p.entityCount++
			}
			// Even a false positive of the filter goes to a rebuild's
			// log: the rebuilt filter may not have it.
			p.markKnown(h)
		}
		for topic, off := range pl.applied {
			b.SetOffset(topic, pl.ep, off)
		}
		b.SetMeta(seqMeta(pl.ep), pl.seq)
	}
	for _, v := range p.dict.fresh {
		b.SetDictValue(p.dict.dims[v.dim], v.value, v.id)
	}
	b.SetMeta(metaEntities, p.entityCount)
	if err := b.Commit(); err != nil {
		return fmt.Errorf("store restored partitions: %w", err)
	}
	s.holdMu.Lock()
	for _, pl := range plans {
		s.localSeq[pl.ep] = pl.seq
		for topic, off := range pl.applied {
			part := p.partition(topic, pl.ep)
			part.next, part.stored = off, off
		}
	}
	s.holdMu.Unlock()
	p.askRebuild()
	return nil
}

// exported reports whether this replica exports a segment: the replica
// holding its segment-partition does.
func (s *ScaleOut) exported(breakdown string, labels []Label) bool {
	held := s.heldView.Load()
	if held == nil {
		return false
	}
	return (*held)[s.segmentPart(breakdown, len(labels), func(i int) string { return labels[i].Value })]
}

// segmentPart returns the segment-partition of a segment, given its
// breakdown's name and its n label values: xxhash(breakdown, labels) mod
// P, P the input topics' partition count. The replica holding
// entity-partition q holds segment-partition q.
func (s *ScaleOut) segmentPart(breakdown string, n int, label func(i int) string) int {
	parts := s.parts.Load()
	if parts == 0 {
		return -1
	}
	h := xxhash.New()
	_, _ = h.WriteString(breakdown)
	for i := range n {
		_, _ = h.WriteString("\x00")
		_, _ = h.WriteString(label(i))
	}
	return int(h.Sum64() % uint64(parts))
}

// scaleCollector exports stage 1's operational series, stage 2's
// per-segment series of the exported segments, and the mode's own gauges.
type scaleCollector struct{ s *ScaleOut }

func (c scaleCollector) Describe(chan<- *prometheus.Desc) {}

func (c scaleCollector) Collect(ch chan<- prometheus.Metric) {
	start := time.Now()
	s := c.s
	s.entities.metrics.collectOperational(ch)
	s.segments.metrics.collectSegments(ch)
	ch <- prometheus.MustNewConstMetric(s.restoreDesc, prometheus.GaugeValue, float64(s.remaining.Load()))
	n := 0
	if o := s.owned.Load(); o != nil {
		n = len(*o)
	}
	ch <- prometheus.MustNewConstMetric(s.ownedDesc, prometheus.GaugeValue, float64(n))
	s.entities.metrics.collectDuration.Observe(time.Since(start).Seconds())
}
