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

func TestDecodeEntityCorrupt(t *testing.T) {
	valid := store.AppendEntity(nil, &store.Entity{LastSeen: 1, Dims: []uint32{1}, Reached: []int64{1}, Seen: []uint64{1}})
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"unknown version", append([]byte{2}, valid[1:]...)},
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
