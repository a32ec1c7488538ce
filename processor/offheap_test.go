package processor

import (
	"slices"
	"sync/atomic"
	"testing"
)

// TestOffHeap grows a slice outside the Go heap through several mappings
// and checks that its contents move with it, that the room it gets is
// zeroed, and that freeing and releasing leave no mapping behind.
func TestOffHeap(t *testing.T) {
	var mapped atomic.Int64
	h := newOffHeap(&mapped)
	var s, want []uint64
	for i := range uint64(100_000) {
		c := cap(s)
		s = offHeapGrow(h, s, 1)
		if room := s[len(s):cap(s)]; cap(s) != c && slices.ContainsFunc(room, func(x uint64) bool { return x != 0 }) {
			t.Fatalf("after %d: room not zeroed", i)
		}
		s = append(s, i)
		want = append(want, i)
		if len(h.maps) != 1 || !offHeapHolds(h, s) {
			t.Fatalf("after %d: %d mappings, holds %v; want the slice's only", i, len(h.maps), offHeapHolds(h, s))
		}
	}
	if !slices.Equal(s, want) {
		t.Fatal("contents changed as the slice grew")
	}
	if offHeapHolds(h, s[1:]) || offHeapHolds(h, want) {
		t.Error("holds a slice that does not start a mapping")
	}
	if got, want := mapped.Load(), int64(8*cap(s)); got != want {
		t.Errorf("%d bytes mapped; want %d", got, want)
	}
	b := offHeapSlice[byte](h, 10)
	offHeapFree(h, s)
	if len(h.maps) != 1 || !offHeapHolds(h, b) {
		t.Errorf("%d mappings after freeing the grown slice; want the bytes' only", len(h.maps))
	}
	if got := mapped.Load(); got != 10 {
		t.Errorf("%d bytes mapped; want 10", got)
	}
	h.release()
	if len(h.maps) != 0 || mapped.Load() != 0 {
		t.Errorf("%d mappings of %d bytes after release; want none", len(h.maps), mapped.Load())
	}
}
