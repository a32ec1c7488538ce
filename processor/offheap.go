package processor

import (
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"
)

// offHeap holds arrays mapped outside the Go heap for one owner: the
// entity table, or a processor's evaluation columns. The collector's
// pacing counts only the Go heap: with GOGC=25 every byte on it may take
// a quarter more before a collection, and an array outgrown on it stays
// until one. The entity table's pages, arenas and hash slots and the
// large columns are most of the processor's memory, hold no pointers and
// live long, so they are mapped here instead; a mapping is returned to
// the system when freed, and all of them when the owner is garbage (see
// release).
//
// Only pointer-free types may live here: the collector does not scan
// this memory. A slice of it must not be used after it is freed, nor
// after its owner is garbage. An offHeap is safe for concurrent use (the
// goroutines that fold a flush into the columns share one).
type offHeap struct {
	mu   sync.Mutex
	maps map[unsafe.Pointer]int // start of every live mapping → its length
	// bytes counts the bytes mapped; it may be shared by several offHeaps
	// and read concurrently.
	bytes *atomic.Int64
}

// newOffHeap returns an offHeap that adds the bytes it maps to bytes.
func newOffHeap(bytes *atomic.Int64) *offHeap {
	return &offHeap{maps: make(map[unsafe.Pointer]int), bytes: bytes}
}

// offHeapSlice returns a zeroed slice of n Ts outside the Go heap. T must
// hold no pointers.
func offHeapSlice[T any](h *offHeap, n int) []T {
	if n == 0 {
		return nil
	}
	var z T
	b, err := mapMem(n * int(unsafe.Sizeof(z)))
	if err != nil {
		// Out of address space or over the mapping limit: as fatal as
		// the Go heap running out.
		panic(fmt.Sprintf("map %d bytes outside the Go heap: %v", n*int(unsafe.Sizeof(z)), err))
	}
	p := unsafe.Pointer(unsafe.SliceData(b))
	h.mu.Lock()
	h.maps[p] = len(b)
	h.mu.Unlock()
	h.bytes.Add(int64(len(b)))
	return unsafe.Slice((*T)(p), n)
}

// offHeapFree returns s, a whole slice from offHeapSlice or offHeapGrow,
// to the system.
func offHeapFree[T any](h *offHeap, s []T) {
	if cap(s) == 0 {
		return
	}
	p := unsafe.Pointer(unsafe.SliceData(s[:1]))
	h.mu.Lock()
	n, ok := h.maps[p]
	delete(h.maps, p)
	h.mu.Unlock()
	if !ok {
		panic("offHeapFree: not a mapping of this offHeap")
	}
	h.bytes.Add(-int64(n))
	unmapMem(unsafe.Slice((*byte)(p), n))
}

// offHeapHolds reports whether s starts a mapping of h.
func offHeapHolds[T any](h *offHeap, s []T) bool {
	if cap(s) == 0 {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.maps[unsafe.Pointer(unsafe.SliceData(s[:1]))]
	return ok
}

// offHeapGrow returns s with room for at least n more elements, moved
// to a mapping of twice the capacity when it has not. Pages of a
// mapping count in the resident set only once written, so the room is
// free until used.
func offHeapGrow[T any](h *offHeap, s []T, n int) []T {
	if cap(s)-len(s) >= n {
		return s
	}
	var z T
	c := max(2*cap(s), len(s)+n, 64<<10/int(unsafe.Sizeof(z)))
	d := offHeapSlice[T](h, c)[:len(s)]
	copy(d, s)
	offHeapFree(h, s)
	return d
}

// release returns every mapping to the system. The owner registers it
// with runtime.AddCleanup, so that it runs once the owner is garbage.
func (h *offHeap) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for p, n := range h.maps {
		h.bytes.Add(-int64(n))
		unmapMem(unsafe.Slice((*byte)(p), n))
	}
	clear(h.maps)
}
