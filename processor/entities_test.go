package processor

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/funnelwatch/funnelwatch/store"
)

// TestEntityTable checks the cache's hash table against a map through
// inserts and removals, with keys crafted to collide in their slot and
// long enough that the key arena is compacted, and that the table keeps
// no mapping it does not use.
func TestEntityTable(t *testing.T) {
	tab := newEntityTable(3, new(atomic.Int64))
	want := map[string]uint32{}
	rng := rand.New(rand.NewPCG(1, 2))
	// hash returns h with few distinct low bits, so many keys share a home
	// slot and runs wrap around the table.
	hash := func(k string) uint64 { return xxhash.Sum64String(k) & 0xffff_ffff_0000_00ff }
	pad := strings.Repeat("x", 600)
	inserted := 0
	for i := range 20_000 {
		k := fmt.Sprintf("k%d%s", rng.IntN(5000), pad)
		if idx, ok := want[k]; ok && i%3 == 0 {
			tab.remove(idx, hash(k))
			delete(want, k)
			continue
		}
		idx, ok := tab.find([]byte(k), hash(k))
		if _, exists := want[k]; exists != ok {
			t.Fatalf("step %d: find(%q) = %v; want %v", i, k, ok, exists)
		}
		if !ok {
			idx = tab.insert([]byte(k), hash(k))
			tab.rec(idx).lastSeen = int64(i)
			want[k] = idx
			inserted += len(k)
		}
		if got := string(tab.key(tab.rec(idx))); got != k {
			t.Fatalf("step %d: key of record %d = %q; want %q", i, idx, got, k)
		}
	}
	if tab.live != len(want) {
		t.Errorf("live = %d; want %d", tab.live, len(want))
	}
	for k, idx := range want {
		if got, ok := tab.find([]byte(k), hash(k)); !ok || got != idx {
			t.Errorf("find(%q) = %d, %v; want %d", k, got, ok, idx)
		}
	}
	n := 0
	tab.each(func(uint32, *entityRec) { n++ })
	if n != len(want) {
		t.Errorf("each visited %d records; want %d", n, len(want))
	}
	if len(tab.keys) >= inserted {
		t.Errorf("key arena of %d bytes after inserting %d: never compacted, the test misses a path", len(tab.keys), inserted)
	}
	// The record and reach time pages, the slots and the key arena.
	if got, want := len(tab.mem.maps), 2*len(tab.recs)+2; got != want {
		t.Errorf("%d mappings; want %d", got, want)
	}
}

// TestEntitySeen checks that an entity remembers its last maxSeenIDs event
// ids, oldest first, inline and in a block.
func TestEntitySeen(t *testing.T) {
	tab := newEntityTable(3, new(atomic.Int64))
	idx := tab.insert([]byte("x"), 1)
	r := tab.rec(idx)
	var want []uint64
	for id := range uint64(40) {
		tab.addSeen(r, id)
		want = append(want, id)
		if len(want) > maxSeenIDs {
			want = want[1:]
		}
		if got := tab.seen(r); !slices.Equal(got, want) {
			t.Fatalf("after %d ids: seen = %v; want %v", id+1, got, want)
		}
	}
	tab.clearSeen(r)
	if got := tab.seen(r); len(got) != 0 {
		t.Errorf("seen after clearSeen = %v", got)
	}
	if len(tab.freeBlocks) != 1 || len(tab.freeSmall) != 1 {
		t.Errorf("%d free blocks, %d free small blocks; want one of each back", len(tab.freeBlocks), len(tab.freeSmall))
	}

	// Many entities growing, replaced (setSeen, as when a state is read
	// back) and cleared in turn share the blocks without overwriting
	// each other's ids, and every block comes back.
	tab = newEntityTable(3, new(atomic.Int64))
	rng := rand.New(rand.NewPCG(3, 4))
	recs := make([]*entityRec, 50)
	wants := make([][]uint64, len(recs))
	for i := range recs {
		recs[i] = tab.rec(tab.insert(fmt.Appendf(nil, "e%d", i), uint64(i)))
	}
	id := uint64(0)
	for step := range 20_000 {
		i := rng.IntN(len(recs))
		r := recs[i]
		switch rng.IntN(20) {
		case 0:
			tab.clearSeen(r)
			wants[i] = nil
		case 1:
			ids := make([]uint64, rng.IntN(maxSeenIDs+1))
			for k := range ids {
				id++
				ids[k] = id
			}
			tab.setSeen(r, ids)
			wants[i] = ids
		default:
			id++
			tab.addSeen(r, id)
			wants[i] = append(wants[i], id)
			if len(wants[i]) > maxSeenIDs {
				wants[i] = wants[i][1:]
			}
		}
		for j, r := range recs {
			if got := tab.seen(r); !slices.Equal(got, wants[j]) {
				t.Fatalf("step %d: entity %d: seen = %v; want %v", step, j, got, wants[j])
			}
		}
	}
	for _, r := range recs {
		tab.clearSeen(r)
	}
	if got, want := len(tab.freeSmall), len(tab.small)/smallSeen; got != want {
		t.Errorf("%d small blocks free of %d", got, want)
	}
	if got, want := len(tab.freeBlocks), len(tab.blocks)/maxSeenIDs; got != want {
		t.Errorf("%d blocks free of %d", got, want)
	}
	// The record and reach time pages, the slots, the key arena and the
	// two block arenas.
	if got, want := len(tab.mem.maps), 2*len(tab.recs)+4; got != want {
		t.Errorf("%d mappings; want %d", got, want)
	}
}

// TestWindowSumsMatchStore replays more than the retention with flushes of
// very different sizes and checks after each flush that the running sums
// equal what a restart computes from the store: windows moved by many
// buckets at once, and buckets deleted past retention, must leave no trace.
func TestWindowSumsMatchStore(t *testing.T) {
	p, _ := eventClockProcessor(t, 1000)
	rng := rand.New(rand.NewPCG(3, 4))
	sources := [][]byte{[]byte("ads"), []byte("seo"), []byte("mail")}
	start := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
	span := (80 * 24 * time.Hour).Milliseconds() // beyond the 65-day retention
	var off int64
	b := &Batch{Topic: "events"}
	ctx := context.Background()
	for tm := start; tm < start+span; {
		b.Records = b.Records[:0]
		// Flushes a few minutes to a few days of event time apart.
		next := tm + 10*60_000 + rng.Int64N(3*24*3600_000)/int64(1+rng.IntN(20))
		for ; tm < next; tm += rng.Int64N(20 * 60_000) {
			ent := binary.BigEndian.AppendUint32(nil, rng.Uint32N(3000))
			// Some events are late: up to 40 days behind.
			evt := tm
			if rng.IntN(20) == 0 {
				evt -= rng.Int64N(40 * 24 * 3600_000)
			}
			b.Records = append(b.Records, Record{Offset: off, Event: Event{
				Stage: rng.IntN(3), Entity: ent, Time: evt, Value: rng.Int64N(5000),
				Dims: [][]byte{sources[rng.IntN(3)], nil},
			}})
			off++
		}
		p.ApplyBatch(b)
		if err := p.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		got := map[string][]int64{}
		for _, s := range p.segmentList {
			got[string(s.key)] = slices.Clone(s.sums)
		}
		if err := p.loadRanges(p.clockNow()); err != nil {
			t.Fatal(err)
		}
		for _, s := range p.segmentList {
			if !slices.Equal(got[string(s.key)], s.sums) {
				t.Fatalf("clock %s: sums of segment %x differ from the store's:\n got %v\nwant %v",
					time.UnixMilli(p.clock).UTC(), s.key, got[string(s.key)], s.sums)
			}
		}
	}
}

// TestPendingBoundsEntities applies many new entities without a timed
// flush: the dirty entity states count against the pending budget, so
// ApplyBatch flushes before the states a flush writes (and a scale-out
// marker carries) outgrow it, and Run is asked to flush early.
func TestPendingBoundsEntities(t *testing.T) {
	p, st := eventClockProcessor(t, 0)
	p.pendingLimit = 64 << 10
	// Batches of the consumer's size, larger than what the budget holds:
	// it is checked within a batch.
	const entities, perBatch = 6000, 2000
	tm := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
	b := &Batch{Topic: "events"}
	maxDirty := 0
	for off := int64(0); off < entities; {
		b.Records = b.Records[:0]
		for range perBatch {
			b.Records = append(b.Records, Record{Offset: off, Event: Event{
				Entity: fmt.Appendf(nil, "u-%d", off), Time: tm, Dims: [][]byte{[]byte("ads"), nil},
			}})
			off++
		}
		p.ApplyBatch(b)
		maxDirty = max(maxDirty, len(p.dirty))
	}
	// Every entity costs at least its reach times and seen ids.
	minCost := 8 * int64(len(p.cfg.Funnel.Stages)+maxSeenIDs+2)
	if limit := int(2*p.pendingLimit/minCost) + applyChunk; maxDirty > limit {
		t.Errorf("got up to %d dirty entities between flushes; want at most %d", maxDirty, limit)

	}
	select {
	case <-p.flushNow:
	default:
		t.Error("got no early flush request; want one once the pending states reached the limit")
	}
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	n := 0
	if _, err := st.Entities(nil, entities+1, func([]byte, int, []byte, *store.Entity) bool { n++; return true }); err != nil {
		t.Fatal(err)
	}
	if n != entities {
		t.Errorf("got %d stored entities; want %d", n, entities)
	}
}

// eventClockProcessor returns a processor of the default configuration on
// the event clock, consuming "events", on a store in memory; entityCache 0
// keeps the default cache size.
func eventClockProcessor(t *testing.T, entityCache int) (*Processor, *store.Store) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Kafka.Topics = []TopicConfig{{Name: "events"}}
	cfg.Time.Clock = ClockEvent
	if entityCache > 0 {
		cfg.Store.EntityCache = entityCache
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	st := MemStore(t)
	p, err := New(cfg, st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return p, st
}

// TestFilterAfterRestart checks that a processor reopened on a store
// builds its entity filter before it applies the first record (New leaves
// it out): every stored entity is in it, and records of stored entities
// find their states instead of counting as new entities.
func TestFilterAfterRestart(t *testing.T) {
	p, st := eventClockProcessor(t, 0)
	const entities = 300
	tm := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
	batch := func(stage int, off int64) *Batch {
		b := &Batch{Topic: "events"}
		for i := range entities {
			b.Records = append(b.Records, Record{Offset: off + int64(i), Event: Event{
				Stage: stage, Entity: fmt.Appendf(nil, "u-%d", i), Time: tm + int64(stage)*60_000, Dims: [][]byte{[]byte("ads"), nil},
			}})
		}
		return b
	}
	p.ApplyBatch(batch(0, 0))
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}

	q, err := New(p.cfg, st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if q.known != nil {
		t.Fatal("got an entity filter right after New; want it left to the first batch or Run")
	}
	q.ApplyBatch(batch(1, entities))
	if q.known == nil {
		t.Fatal("got no entity filter after a batch")
	}
	if err := st.EntityKeys(context.Background(), func(key []byte) {
		if !q.known.mayContain(xxhash.Sum64(key[1:])) {
			t.Errorf("stored entity %q is not in the filter", key[5:])
		}
	}); err != nil {
		t.Fatal(err)
	}
	if q.entityCount != entities {
		t.Errorf("got %d entities after the second stage of the same ones; want %d", q.entityCount, entities)
	}
}

// TestFilterRebuild checks that a full entity filter is rebuilt with every
// stored entity in it although the rebuild's store scan holds no lock:
// entities cached when it begins and stored only after the scan, and new
// entities stored during it, both evicted before it ends, are in the new
// filter. Then a rebuild runs concurrently with batches and flushes.
func TestFilterRebuild(t *testing.T) {
	ctx := context.Background()
	p, st := eventClockProcessor(t, 1000)
	tm := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
	off := int64(0)
	apply := func(prefix string, n int, minute int64) {
		b := &Batch{Topic: "events"}
		for i := range n {
			b.Records = append(b.Records, Record{Offset: off, Event: Event{
				Entity: fmt.Appendf(nil, "%s-%d", prefix, i), Time: tm + minute*60_000, Dims: [][]byte{[]byte("ads"), nil},
			}})
			off++
		}
		p.ApplyBatch(b)
	}
	flush := func() {
		t.Helper()
		if err := p.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	checkStored := func(when string) {
		t.Helper()
		missing := 0
		if err := st.EntityKeys(ctx, func(key []byte) {
			if !p.known.mayContain(xxhash.Sum64(key[1:])) {
				missing++
			}
		}); err != nil {
			t.Fatal(err)
		}
		if missing > 0 {
			t.Errorf("%s: %d stored entities are not in the rebuilt filter", when, missing)
		}
		if p.known.full() {
			t.Errorf("%s: got a full filter after the rebuild", when)
		}
	}

	apply("a", 3000, 0)
	flush()
	p.mu.Lock()
	p.known = saturatedFilter()
	p.mu.Unlock()
	apply("b", 1000, 1) // cached, not stored, when the rebuild begins
	n, ok := p.beginRebuild()
	if !ok {
		t.Fatal("got no rebuild of a full filter")
	}
	f, err := p.scanFilter(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	apply("c", 2000, 2) // new during the rebuild
	flush()             // stores b and c, and evicts all of b, most of c
	if p.entities.live > 1000 {
		t.Fatalf("got %d cached entities; want the cache's 1000 at most, so that the scan's misses are evicted", p.entities.live)
	}
	p.endRebuild(f, nil)
	checkStored("stepwise")

	p.mu.Lock()
	p.known = saturatedFilter()
	p.mu.Unlock()
	done := make(chan error)
	go func() { done <- p.rebuildFilter(ctx) }()
	for i := range 5 {
		apply(fmt.Sprint("d", i), 500, 3+int64(i))
		flush()
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	checkStored("concurrent")
}

// TestSortDirty checks that sortDirty puts the changed entities of several
// partitions in the store's key order, keys sharing their first eight
// bytes included, and keeps every one.
func TestSortDirty(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Kafka.Topics = []TopicConfig{{Name: "events"}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC).UnixMilli()
	p, err := New(cfg, MemStore(t), Options{Now: func() time.Time { return time.UnixMilli(now) }})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for part := range 3 {
		b := &Batch{Topic: "events", Partition: part}
		for i := range 500 {
			// Long ids with a common prefix, short ones, and ids that are
			// prefixes of others.
			id := fmt.Appendf(nil, "%d", rng.IntN(1000))
			if rng.IntN(2) == 0 {
				id = fmt.Appendf(nil, "user-%d", rng.IntN(100000))
			}
			b.Records = append(b.Records, Record{Offset: int64(i), Event: Event{Entity: id, Time: now}})
		}
		p.ApplyBatch(b)
	}
	before := slices.Clone(p.dirty)
	if len(before) < 1000 {
		t.Fatalf("%d entities changed; want more than 1000: the test misses its point", len(before))
	}
	p.sortDirty()
	key := func(idx uint32) []byte { return p.entities.key(p.entities.rec(idx)) }
	for i := 1; i < len(p.dirty); i++ {
		if bytes.Compare(key(p.dirty[i-1]), key(p.dirty[i])) >= 0 {
			t.Fatalf("dirty %d (%q) not before dirty %d (%q)", i-1, key(p.dirty[i-1]), i, key(p.dirty[i]))
		}
	}
	slices.Sort(before)
	got := slices.Sorted(slices.Values(p.dirty))
	if !slices.Equal(got, before) {
		t.Errorf("sorted %d records; want the %d changed ones", len(got), len(before))
	}
}
