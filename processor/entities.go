package processor

import (
	"bytes"

	"github.com/funnelwatch/funnelwatch/store"
)

// entityTable is the in-memory cache of entity states. It is built for a
// million entities and more: states live in fixed-size records in pages
// (no pointers, so the garbage collector never scans them, and no
// allocation per entity), keys in one byte arena, and an open-addressing
// hash table maps keys to records. An entity takes about 120 bytes with
// the default funnel (record, reach times, key and slot); see
// docs/performance.md.
type entityTable struct {
	stages int
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

	// blocks hold the seen ids of entities with more than inlineSeen of
	// them, maxSeenIDs per block.
	blocks     []uint64
	freeBlocks []uint32
}

const (
	entityPageBits = 12
	entityPage     = 1 << entityPageBits
	// inlineSeen event ids fit in the record: most entities have a few
	// events.
	inlineSeen = 4
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
	// block is the index + 1 of the record's block of seen ids, 0 when
	// they are inline.
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

func newEntityTable(stages int) *entityTable {
	t := &entityTable{stages: stages}
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
	if r.block != 0 {
		off := int(r.block-1) * maxSeenIDs
		return t.blocks[off : off+int(r.nSeen)]
	}
	return r.seen[:r.nSeen]
}

// addSeen remembers an event id, forgetting the oldest beyond maxSeenIDs.
func (t *entityTable) addSeen(r *entityRec, id uint64) {
	if r.block == 0 && r.nSeen < inlineSeen {
		r.seen[r.nSeen] = id
		r.nSeen++
		return
	}
	if r.block == 0 {
		r.block = t.newBlock()
		copy(t.blocks[int(r.block-1)*maxSeenIDs:], r.seen[:r.nSeen])
	}
	b := t.blocks[int(r.block-1)*maxSeenIDs : int(r.block)*maxSeenIDs]
	if int(r.nSeen) >= maxSeenIDs {
		copy(b, b[1:])
		r.nSeen = maxSeenIDs - 1
	}
	b[r.nSeen] = id
	r.nSeen++
}

// setSeen replaces the seen ids of r.
func (t *entityTable) setSeen(r *entityRec, ids []uint64) {
	t.clearSeen(r)
	for _, id := range ids {
		t.addSeen(r, id)
	}
}

func (t *entityTable) clearSeen(r *entityRec) {
	if r.block != 0 {
		t.freeBlocks = append(t.freeBlocks, r.block)
		r.block = 0
	}
	r.nSeen = 0
}

func (t *entityTable) newBlock() uint32 {
	if n := len(t.freeBlocks); n > 0 {
		b := t.freeBlocks[n-1]
		t.freeBlocks = t.freeBlocks[:n-1]
		return b
	}
	t.blocks = append(t.blocks, make([]uint64, maxSeenIDs)...)
	return uint32(len(t.blocks) / maxSeenIDs)
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
			t.recs = append(t.recs, make([]entityRec, entityPage))
			t.reached = append(t.reached, make([]int64, entityPage*t.stages))
		}
		t.nrecs++
	}
	if t.garbage > 1<<20 && t.garbage > len(t.keys)/4 {
		t.compactKeys()
	}
	r := t.rec(idx)
	*r = entityRec{keyOff: uint32(len(t.keys)), keyLen: uint16(len(key)), flags: recLive}
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
	t.slots = make([]uint64, n)
	t.mask = uint64(n - 1)
	for _, s := range old {
		if s != 0 {
			t.place(s)
		}
	}
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
	keys := make([]byte, 0, len(t.keys)-t.garbage+len(t.keys)/8)
	for i := range t.nrecs {
		r := t.rec(uint32(i))
		if r.flags&recLive == 0 {
			continue
		}
		k := t.key(r)
		r.keyOff = uint32(len(keys))
		keys = append(keys, k...)
	}
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
