package store_test

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"github.com/funnelwatch/funnelwatch/store"
)

func TestVectorRoundTrip(t *testing.T) {
	for _, v := range []store.Vector{
		nil,
		{0},
		{1, -1, 63, -64, 64, -65},
		{math.MaxInt64, math.MinInt64, 0, math.MaxInt32, math.MinInt32},
		make(store.Vector, 1000),
	} {
		b := store.AppendVector(nil, v)
		got, err := store.DecodeVector(nil, b)
		if err != nil {
			t.Fatalf("DecodeVector(AppendVector(%v)): %v", v, err)
		}
		if !slices.Equal(got, v) {
			t.Errorf("DecodeVector(AppendVector(%v)) = %v", v, got)
		}
	}
}

// TestVectorEncodingSize pins the compactness the merge-heavy key kinds
// rely on: a length byte and one byte per small counter.
func TestVectorEncodingSize(t *testing.T) {
	for _, tc := range []struct {
		v    store.Vector
		want int
	}{
		{nil, 1},
		{store.Vector{0, 1, -1, 63, -64}, 6},
		{store.Vector{64}, 3},
		{store.Vector{math.MinInt64}, 11},
	} {
		if got := len(store.AppendVector(nil, tc.v)); got != tc.want {
			t.Errorf("len(AppendVector(%v)) = %d; want %d", tc.v, got, tc.want)
		}
	}
}

func TestDecodeVectorAppends(t *testing.T) {
	dst := store.Vector{7}
	got, err := store.DecodeVector(dst, store.AppendVector(nil, store.Vector{1, 2}))
	if err != nil {
		t.Fatal(err)
	}
	if want := (store.Vector{7, 1, 2}); !slices.Equal(got, want) {
		t.Errorf("DecodeVector appended to {7}: %v; want %v", got, want)
	}
}

func TestDecodeVectorCorrupt(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"missing elements", []byte{3, 2}},
		{"trailing bytes", []byte{1, 2, 2}},
		{"truncated varint", []byte{1, 0x80}},
		{"overlong length", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}},
		{"length beyond the limit", binary.AppendUvarint(nil, 1<<16+1)},
		{"huge length without elements", binary.AppendUvarint(nil, math.MaxUint64)},
		{"varint overflow", []byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
	} {
		if v, err := store.DecodeVector(nil, tc.b); err == nil {
			t.Errorf("%s: DecodeVector(%x) = %v; want an error", tc.name, tc.b, v)
		}
	}
}

func TestVectorAdd(t *testing.T) {
	for _, tc := range []struct {
		v, o, want store.Vector
	}{
		{nil, nil, nil},
		{nil, store.Vector{1, 2}, store.Vector{1, 2}},
		{store.Vector{1, 2, 3}, store.Vector{10}, store.Vector{11, 2, 3}},
		{store.Vector{1}, store.Vector{-1, 5}, store.Vector{0, 5}},
	} {
		if got := slices.Clone(tc.v).Add(tc.o); !slices.Equal(got, tc.want) {
			t.Errorf("%v.Add(%v) = %v; want %v", tc.v, tc.o, got, tc.want)
		}
	}
}

func entityEqual(a, b *store.Entity) bool {
	return a.LastSeen == b.LastSeen && slices.Equal(a.Dims, b.Dims) && slices.Equal(a.Reached, b.Reached) && slices.Equal(a.Seen, b.Seen)
}

func TestEntityRoundTrip(t *testing.T) {
	for _, e := range []store.Entity{
		{},
		{LastSeen: 1793606400000, Dims: []uint32{0, 3, math.MaxUint32}, Reached: []int64{1793606400000, store.NotReached, store.NotReached}, Seen: []uint64{0, 1, math.MaxUint64}},
		{LastSeen: -1, Reached: []int64{math.MaxInt64}},
		{Seen: make([]uint64, 16), Dims: make([]uint32, 16), Reached: make([]int64, 32)},
	} {
		b := store.AppendEntity(nil, &e)
		// Decode into a used entity: its slices are reused, not appended to.
		got := store.Entity{LastSeen: 5, Dims: []uint32{9, 9, 9, 9}, Reached: []int64{9}, Seen: []uint64{9, 9}}
		if err := store.DecodeEntity(&got, b); err != nil {
			t.Fatalf("DecodeEntity(AppendEntity(%+v)): %v", e, err)
		}
		if !entityEqual(&got, &e) {
			t.Errorf("DecodeEntity(AppendEntity(%+v)) = %+v", e, got)
		}
	}
}

// TestDecodeEntityV1 checks that states written by versions before
// entityVersion 2, whose reach times were plain varints, still decode.
func TestDecodeEntityV1(t *testing.T) {
	want := store.Entity{LastSeen: 1793606400000, Dims: []uint32{3, 0}, Reached: []int64{1793606000000, store.NotReached}, Seen: []uint64{42}}
	v1 := []byte{1}
	v1 = binary.AppendVarint(v1, want.LastSeen)
	v1 = append(v1, 2, 3, 0, 2)
	v1 = binary.AppendVarint(v1, want.Reached[0])
	v1 = binary.AppendVarint(v1, want.Reached[1])
	v1 = append(v1, 1)
	v1 = binary.LittleEndian.AppendUint64(v1, 42)
	var got store.Entity
	if err := store.DecodeEntity(&got, v1); err != nil || !entityEqual(&got, &want) {
		t.Fatalf("DecodeEntity(%x) = %+v, %v; want %+v", v1, got, err, want)
	}
	if n, n1 := len(store.AppendEntity(nil, &want)), len(v1); n >= n1-10 {
		t.Errorf("encoded in %d bytes, version 1 in %d; want 10 fewer at least (NotReached in one byte)", n, n1)
	}
}

// FuzzReachedCode checks that ReachedCode and ReachedTime are inverse
// bijections for any last-seen time, and that NotReached is code 0.
func FuzzReachedCode(f *testing.F) {
	f.Add(int64(1793606400000), int64(1793606000000), uint64(7))
	f.Add(int64(math.MinInt64), int64(math.MaxInt64), uint64(math.MaxUint64))
	f.Add(int64(0), store.NotReached, uint64(0))
	f.Fuzz(func(t *testing.T, lastSeen, r int64, c uint64) {
		if got := store.ReachedTime(lastSeen, store.ReachedCode(lastSeen, r)); got != r {
			t.Errorf("ReachedTime(%d, ReachedCode(%d, %d)) = %d", lastSeen, lastSeen, r, got)
		}
		if got := store.ReachedCode(lastSeen, store.ReachedTime(lastSeen, c)); got != c {
			t.Errorf("ReachedCode(%d, ReachedTime(%d, %d)) = %d", lastSeen, lastSeen, c, got)
		}
		if got := store.ReachedCode(lastSeen, store.NotReached); got != 0 {
			t.Errorf("ReachedCode(%d, NotReached) = %d; want 0", lastSeen, got)
		}
	})
}

func TestDecodeEntityCorrupt(t *testing.T) {
	valid := store.AppendEntity(nil, &store.Entity{LastSeen: 1, Dims: []uint32{1}, Reached: []int64{1}, Seen: []uint64{1}})
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"unknown version", append([]byte{3}, valid[1:]...)},
		{"truncated", valid[:len(valid)-1]},
		{"trailing bytes", append(slices.Clone(valid), 0)},
		{"dimension id beyond uint32", append([]byte{1, 0, 1}, binary.AppendUvarint(nil, math.MaxUint32+1)...)},
		{"list longer than the limit", append([]byte{1, 0}, binary.AppendUvarint(nil, 1<<10+1)...)},
		{"list longer than the input", []byte{1, 0, 0, 0, 5, 1, 2}},
	} {
		var e store.Entity
		if err := store.DecodeEntity(&e, tc.b); err == nil {
			t.Errorf("%s: DecodeEntity(%x) = %+v; want an error", tc.name, tc.b, e)
		}
	}
}

// FuzzVector checks that decoding never panics, that what decodes encodes
// to something that decodes the same, and that any vector round-trips.
func FuzzVector(f *testing.F) {
	f.Add(store.AppendVector(nil, store.Vector{1, -2, math.MaxInt64}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if v, err := store.DecodeVector(nil, b); err == nil {
			enc := store.AppendVector(nil, v)
			again, err := store.DecodeVector(nil, enc)
			if err != nil {
				t.Fatalf("DecodeVector(AppendVector(%v)): %v", v, err)
			}
			if !slices.Equal(again, v) {
				t.Fatalf("decode∘encode∘decode(%x) = %v; want %v", b, again, v)
			}
			if enc2 := store.AppendVector(nil, again); string(enc2) != string(enc) {
				t.Fatalf("encoding is not canonical: %x then %x", enc, enc2)
			}
		}

		// The input read as int64s is a vector: it must round-trip.
		var v store.Vector
		for i := 0; i+8 <= len(b); i += 8 {
			v = append(v, int64(binary.LittleEndian.Uint64(b[i:])))
		}
		got, err := store.DecodeVector(nil, store.AppendVector(nil, v))
		if err != nil || !slices.Equal(got, v) {
			t.Fatalf("DecodeVector(AppendVector(%v)) = %v, %v", v, got, err)
		}
	})
}

// FuzzEntity checks the same properties for entity states.
func FuzzEntity(f *testing.F) {
	f.Add(store.AppendEntity(nil, &store.Entity{LastSeen: 1793606400000, Dims: []uint32{3, 0}, Reached: []int64{1793606400000, store.NotReached}, Seen: []uint64{42}}))
	f.Add([]byte{1})
	f.Add([]byte{1, 2, 0, 2, 4, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var e store.Entity
		if err := store.DecodeEntity(&e, b); err == nil {
			enc := store.AppendEntity(nil, &e)
			var again store.Entity
			if err := store.DecodeEntity(&again, enc); err != nil {
				t.Fatalf("DecodeEntity(AppendEntity(%+v)): %v", e, err)
			}
			if !entityEqual(&again, &e) {
				t.Fatalf("decode∘encode∘decode(%x) = %+v; want %+v", b, again, e)
			}
			if enc2 := store.AppendEntity(nil, &again); string(enc2) != string(enc) {
				t.Fatalf("encoding is not canonical: %x then %x", enc, enc2)
			}
		}

		// An entity built from the input must round-trip: the first bytes
		// set the list lengths (within the decoder's limits), the rest fill
		// them.
		if len(b) < 3 {
			return
		}
		var src store.Entity
		nd, nr, ns := int(b[0]%20), int(b[1]%40), int(b[2]%20)
		r := b[3:]
		next := func() uint64 {
			var x [8]byte
			n := copy(x[:], r)
			r = r[n:]
			return binary.LittleEndian.Uint64(x[:])
		}
		src.LastSeen = int64(next())
		for range nd {
			src.Dims = append(src.Dims, uint32(next()))
		}
		for range nr {
			src.Reached = append(src.Reached, int64(next()))
		}
		for range ns {
			src.Seen = append(src.Seen, next())
		}
		var got store.Entity
		if err := store.DecodeEntity(&got, store.AppendEntity(nil, &src)); err != nil || !entityEqual(&got, &src) {
			t.Fatalf("DecodeEntity(AppendEntity(%+v)) = %+v, %v", src, got, err)
		}
	})
}
