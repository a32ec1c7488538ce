package processor

import (
	"math/bits"
)

// entityFilter is a Bloom filter over the keys of stored entities. Most
// events of a busy funnel come from entities seen for the first time; the
// filter answers "certainly new" for them without a store lookup. False
// positives only cost that lookup. It takes 10 bits per entity (about 1%
// false positives) and is rebuilt twice as large when it fills up.
type entityFilter struct {
	bits     []uint64
	mask     uint64
	n        int // keys added
	capacity int
}

const (
	filterBitsPerKey = 10
	filterHashes     = 7
	minFilterKeys    = 1 << 20
)

func newEntityFilter(capacity int) *entityFilter {
	capacity = max(capacity, minFilterKeys)
	nbits := uint64(1) << bits.Len64(uint64(capacity*filterBitsPerKey-1))
	return &entityFilter{bits: make([]uint64, nbits/64), mask: nbits - 1, capacity: capacity}
}

// saturatedFilter returns a filter that may contain every key and is
// full, so that the next flush rebuilds it.
func saturatedFilter() *entityFilter {
	f := newEntityFilter(minFilterKeys)
	for i := range f.bits {
		f.bits[i] = ^uint64(0)
	}
	f.n = f.capacity + 1
	return f
}

// full reports whether the filter holds more keys than it was sized for.
func (f *entityFilter) full() bool { return f.n > f.capacity }

func (f *entityFilter) add(h uint64) {
	h1, h2 := h, h>>33|h<<31|1
	for i := uint64(0); i < filterHashes; i++ {
		b := (h1 + i*h2) & f.mask
		f.bits[b/64] |= 1 << (b % 64)
	}
	f.n++
}

func (f *entityFilter) mayContain(h uint64) bool {
	h1, h2 := h, h>>33|h<<31|1
	for i := uint64(0); i < filterHashes; i++ {
		b := (h1 + i*h2) & f.mask
		if f.bits[b/64]&(1<<(b%64)) == 0 {
			return false
		}
	}
	return true
}
