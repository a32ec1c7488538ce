package processor

import (
	"bytes"
	"runtime"
	"sync/atomic"

	"github.com/funnelwatch/funnelwatch/store"
)

// entityTable is the in-memory cache of entity states. It is built for a
// million entities and more: states live in fixed-size records in pages
// (no pointers, so the garbage collector never scans them, and no
// allocation per entity), keys in one byte arena, and an open-addressing
// hash table maps keys to records. An entity takes about 100 bytes with
// the default funnel (record, reach times, key, slot and, for the third
// of entities with more than one event, a block of seen ids); see
// docs/performance.md. All of these live outside the Go heap (mem), so
// that they do not raise the heap's collection goal.
type entityTable struct {
	stages int
	mem    *offHeap
	// slots hold, per slot, the low 32 bits of the key's hash (the slot it
	// belongs to) in the high half and the record index + 1 in the low
	// half; 0 is an empty slot. Linear probing, deletion by backward
	// shift, so lookups never meet tombstones.
	slots []uint64
	mask  uint64
	live  int

	recs    [][]entityRec // pages of entityPage records
	reached [][]int64     // pages of entityPage × stages reach times
	nrecs   int           // records ever allocated (live and free)
	free    []uint32      // free record indices

	keys    []byte // key of every record: partition (4 bytes) then entity id
	garbage int    // bytes of keys no live record uses

	// Seen ids beyond the inline one live in blocks: those of an entity
	// with up to smallSeen of them in a small block, with more in a block
	// of maxSeenIDs. An entity's count of ids tells which (see seen).
	small, blocks         []uint64
	freeSmall, freeBlocks []uint32
}

const (
	entityPageBits = 12
	entityPage     = 1 << entityPageBits
	// inlineSeen event ids fit in the record, smallSeen in a small
	// block: at the end of the default bench 60% of the cached entities
	// had one id, 30% two to four, 1.5% more. Four inline ids took 32
	// of a record's 56 bytes.
	inlineSeen = 1
	smallSeen  = 4
	// maxLoad is the most live entries per slot, in 1/16.
	maxLoad16 = 11
)

// entityRec is one cached entity state.
type entityRec struct {
	lastSeen int64
	seen     [inlineSeen]uint64
	keyOff   uint32
	keyLen   uint16
	nSeen    uint8
	flags    uint8
	// combo is the index of the entity's dimension values and segments
	// in Processor.combos.
	combo uint32
	// block is the index + 1 of the record's block of seen ids (a small
	// block while nSeen <= smallSeen), 0 when they are inline.
	block uint32
}

const (
	recLive  = 1 << iota
	recDirty // changed since the last flush
	// recState is set when the entity has a state (a segment and reach
	// times); a record read from a store written under another funnel
	// has none and starts afresh.
	recState
)

// newEntityTable returns an empty table for a funnel of the given number
// of stages, counting the bytes it maps in mapped. Its memory goes back to
// the system once it is garbage.
func newEntityTable(stages int, mapped *atomic.Int64) *entityTable {
	t := &entityTable{stages: stages, mem: newOffHeap(mapped)}
	runtime.AddCleanup(t, (*offHeap).release, t.mem)
	t.resize(1 << 10)
	return t
}

// rec returns the record with index i.
func (t *entityTable) rec(i uint32) *entityRec {
	return &t.recs[i>>entityPageBits][i&(entityPage-1)]
}

// reachedOf returns the reach times of record i.
func (t *entityTable) reachedOf(i uint32) []int64 {
	off := int(i&(entityPage-1)) * t.stages
	return t.reached[i>>entityPageBits][off : off+t.stages : off+t.stages]
}

// key returns the key of record r (partition, then entity id).
func (t *entityTable) key(r *entityRec) []byte {
	return t.keys[r.keyOff : r.keyOff+uint32(r.keyLen)]
}

// seen returns the seen ids of record r, oldest first.
func (t *entityTable) seen(r *entityRec) []uint64 {
	n := int(r.nSeen)
	switch {
	case r.block == 0:
		return r.seen[:n]
	case n <= smallSeen:
		off := int(r.block-1) * smallSeen
		return t.small[off : off+n]
	default:
		off := int(r.block-1) * maxSeenIDs
		return t.blocks[off : off+n]
	}
}

// addSeen remembers an event id, forgetting the oldest beyond maxSeenIDs.
func (t *entityTable) addSeen(r *entityRec, id uint64) {
	switch r.nSeen {
	case inlineSeen:
		// To a small block.
		b := t.newBlock(&t.small, &t.freeSmall, smallSeen)
		copy(t.small[int(b-1)*smallSeen:], r.seen[:])
		r.block = b
	case smallSeen:
		// To a block of maxSeenIDs.
		b := t.newBlock(&t.blocks, &t.freeBlocks, maxSeenIDs)
		copy(t.blocks[int(b-1)*maxSeenIDs:], t.seen(r))
		t.freeSmall = append(t.freeSmall, r.block)
		r.block = b
	}
	if r.block == 0 {
		r.seen[r.nSeen] = id
		r.nSeen++
		return
	}
	if int(r.nSeen) >= maxSeenIDs {
		b := t.seen(r)
		copy(b, b[1:])
		r.nSeen--
	}
	r.nSeen++
	b := t.seen(r)
	b[len(b)-1] = id
}

// setSeen replaces the seen ids of r.
func (t *entityTable) setSeen(r *entityRec, ids []uint64) {
	t.clearSeen(r)
	for _, id := range ids {
		t.addSeen(r, id)
	}
}

func (t *entityTable) clearSeen(r *entityRec) {
	switch {
	case r.block == 0:
	case r.nSeen <= smallSeen:
		t.freeSmall = append(t.freeSmall, r.block)
	default:
		t.freeBlocks = append(t.freeBlocks, r.block)
	}
	r.block, r.nSeen = 0, 0
}

// newBlock returns the index + 1 of a free block of size ids in blocks.
func (t *entityTable) newBlock(blocks *[]uint64, free *[]uint32, size int) uint32 {
	if n := len(*free); n > 0 {
		b := (*free)[n-1]
		*free = (*free)[:n-1]
		return b
	}
	*blocks = offHeapGrow(t.mem, *blocks, size)
	*blocks = (*blocks)[:len(*blocks)+size]
	return uint32(len(*blocks) / size)
}

// find returns the index of the record with the given key and hash.
func (t *entityTable) find(key []byte, h uint64) (uint32, bool) {
	tag := uint64(uint32(h)) << 32
	for i := h & t.mask; ; i = (i + 1) & t.mask {
		s := t.slots[i]
		if s == 0 {
			return 0, false
		}
		if s&^0xffffffff == tag {
			idx := uint32(s) - 1
			if bytes.Equal(t.key(t.rec(idx)), key) {
				return idx, true
			}
		}
	}
}

// insert adds a record for key, which must not be in the table, and
// returns its index. The record is live and otherwise zero.
func (t *entityTable) insert(key []byte, h uint64) uint32 {
	if (t.live+1)*16 > len(t.slots)*maxLoad16 {
		t.resize(2 * len(t.slots))
	}
	var idx uint32
	if n := len(t.free); n > 0 {
		idx = t.free[n-1]
		t.free = t.free[:n-1]
	} else {
		idx = uint32(t.nrecs)
		if t.nrecs%entityPage == 0 {
			t.recs = append(t.recs, offHeapSlice[entityRec](t.mem, entityPage))
			t.reached = append(t.reached, offHeapSlice[int64](t.mem, entityPage*t.stages))
		}
		t.nrecs++
	}
	if t.garbage > 1<<20 && t.garbage > len(t.keys)/4 {
		t.compactKeys()
	}
	r := t.rec(idx)
	*r = entityRec{keyOff: uint32(len(t.keys)), keyLen: uint16(len(key)), flags: recLive}
	t.keys = offHeapGrow(t.mem, t.keys, len(key))
	t.keys = append(t.keys, key...)
	t.place(uint64(uint32(h))<<32 | uint64(idx+1))
	t.live++
	return idx
}

// place puts a slot value into the first empty slot from its home.
func (t *entityTable) place(s uint64) {
	for i := (s >> 32) & t.mask; ; i = (i + 1) & t.mask {
		if t.slots[i] == 0 {
			t.slots[i] = s
			return
		}
	}
}

func (t *entityTable) resize(n int) {
	old := t.slots
	t.slots = offHeapSlice[uint64](t.mem, n)
	t.mask = uint64(n - 1)
	for _, s := range old {
		if s != 0 {
			t.place(s)
		}
	}
	offHeapFree(t.mem, old)
}

// remove deletes record idx, whose key hashes to h.
func (t *entityTable) remove(idx uint32, h uint64) {
	want := uint64(uint32(h))<<32 | uint64(idx+1)
	i := h & t.mask
	for t.slots[i] != want {
		i = (i + 1) & t.mask
	}
	// Backward shift: move later entries of the run into the hole when
	// the hole lies between their home and their slot.
	for {
		t.slots[i] = 0
		j := i
		for {
			j = (j + 1) & t.mask
			s := t.slots[j]
			if s == 0 {
				goto done
			}
			home := (s >> 32) & t.mask
			// The entry at j may move to i unless its home lies in (i, j].
			if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
				t.slots[i] = s
				i = j
				break
			}
		}
	}
done:
	r := t.rec(idx)
	t.clearSeen(r)
	t.garbage += int(r.keyLen)
	*r = entityRec{}
	t.free = append(t.free, idx)
	t.live--
}

// compactKeys rewrites the key arena without the keys of removed records.
func (t *entityTable) compactKeys() {
	keys := offHeapSlice[byte](t.mem, len(t.keys)-t.garbage+len(t.keys)/8)[:0]
	for i := range t.nrecs {
		r := t.rec(uint32(i))
		if r.flags&recLive == 0 {
			continue
		}
		k := t.key(r)
		r.keyOff = uint32(len(keys))
		keys = append(keys, k...)
	}
	offHeapFree(t.mem, t.keys)
	t.keys, t.garbage = keys, 0
}

// each calls fn for every live record.
func (t *entityTable) each(fn func(idx uint32, r *entityRec)) {
	for i := range t.nrecs {
		r := t.rec(uint32(i))
		if r.flags&recLive != 0 {
			fn(uint32(i), r)
		}
	}
}

// view fills e with record idx's state; e's slices point into the table
// and combo dims, valid until the table changes.
func (t *entityTable) view(idx uint32, dims []uint32, e *store.Entity) {
	r := t.rec(idx)
	e.LastSeen = r.lastSeen
	if r.flags&recState == 0 {
		e.Dims, e.Reached = e.Dims[:0], e.Reached[:0]
	} else {
		e.Dims, e.Reached = dims, t.reachedOf(idx)
	}
	e.Seen = t.seen(r)
}
