package processor

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/funnelwatch/funnelwatch/store"
)

func sampleMarker() *marker {
	return &marker{
		Writer: 0xfeedfacecafebeef, Seq: 42,
		Parts: []markerPart{
			{Topic: "events", Partition: 0, From: -1, To: 100},
			{Topic: "leads", Partition: 3, From: 1 << 40, To: 1<<40 + 7},
		},
		Clock: 1_763_900_000_000, LastEvent: 1_763_899_999_123, HistoryStart: 1_760_000_000_000, HasHistory: true,
		Segments: []markerSegment{
			{Breakdown: 0, Totals: []int64{5, 3, -1}, Buckets: []int64{490_000, 490_001, 490_007}, Vecs: []int64{1, 2, 3, 0, 0, 0, -7, math.MaxInt64, math.MinInt64}},
			{Breakdown: 2, Labels: []string{"paid_search", "emea"}, Totals: []int64{0, 0, 0}, Buckets: []int64{7, -3}, Vecs: []int64{9, 9}},
			{Breakdown: 1, Labels: []string{""}},
		},
		Hist: [][]int64{{1, 2, 3, 1_000_000}, nil, {-5}},
		Status: []markerStatus{
			{Breakdown: 2, Labels: []string{"paid_search", "emea"}, Flags: []int64{1, 0, 0}},
			{Breakdown: 0, Flags: []int64{0, 0, 0}},
		},
		entities: []markerEntity{
			{Partition: 0, ID: []byte("contact-1"), LastSeen: 1_763_899_999_123, Reached: []int64{1_763_899_000_000, 1_763_899_999_123, store.NotReached}, Seen: []uint64{1, math.MaxUint64}, Dims: []string{"paid_search", "emea"}},
			{Partition: 0, ID: []byte("contact-2"), LastSeen: 5, Reached: []int64{math.MaxInt64, math.MinInt64 + 1, 6}},
			{Partition: 3, ID: []byte{0, 0xff}, LastSeen: math.MinInt64, Reached: []int64{store.NotReached, math.MaxInt64, 0}, Dims: []string{""}},
			{Partition: 5},
		},
	}
}

func TestMarkerRoundTrip(t *testing.T) {
	unsorted := sampleMarker()
	unsorted.entities = []markerEntity{
		{Partition: 2, ID: []byte("a")},
		{Partition: 1, ID: []byte("b")},
		{Partition: 2, ID: []byte("c")},
		{Partition: -1, ID: []byte("d")},
	}
	sorted := sampleMarker()
	sorted.entities = []markerEntity{
		{Partition: -1, ID: []byte("d")},
		{Partition: 1, ID: []byte("b")},
		{Partition: 2, ID: []byte("a")},
		{Partition: 2, ID: []byte("c")},
	}
	realistic := benchMarker(5, 50, 300)
	realisticSorted := *realistic
	realisticSorted.entities = slices.Clone(realistic.entities)
	slices.SortStableFunc(realisticSorted.entities, cmpPartition)
	for _, tc := range []struct {
		name    string
		m, want *marker
	}{
		{"empty", &marker{}, &marker{}},
		{"header only", &marker{Writer: math.MaxUint64, Seq: math.MaxUint64, Clock: math.MinInt64, LastEvent: math.MaxInt64, HistoryStart: -1}, nil},
		{"full", sampleMarker(), nil},
		// The decoder gives the entity states grouped by partition, in
		// ascending order.
		{"entities grouped", unsorted, sorted},
		{"realistic", realistic, &realisticSorted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.want
			if want == nil {
				want = tc.m
			}
			b, err := encodeMarker(tc.m)
			if err != nil {
				t.Fatal(err)
			}
			got, err := decodeMarker(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("decodeMarker(encodeMarker(m)) = %+v; want %+v", got, want)
			}
		})
	}
}

// TestMarkerVersion1: records of version 1 (no flags), which the previous
// release writes, decode and re-encode byte for byte; flags cannot be
// written in them.
func TestMarkerVersion1(t *testing.T) {
	m := sampleMarker()
	m.Status, m.version = nil, 1
	b, err := encodeMarker(m)
	if err != nil {
		t.Fatal(err)
	}
	if b[0] != 1 {
		t.Fatalf("got version %d; want 1", b[0])
	}
	got, err := decodeMarker(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Errorf("decodeMarker(version 1) = %+v; want %+v", got, m)
	}
	again, err := encodeMarker(got)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, b) {
		t.Errorf("re-encoded version 1 record differs:\n got %x\nwant %x", again, b)
	}
	m.Status = sampleMarker().Status
	if _, err := encodeMarker(m); err == nil {
		t.Error("encodeMarker(version 1 with flags) succeeded; want an error")
	}
}

// TestMarkerEncodeInvalid: a segment whose vectors do not divide into its
// buckets cannot be encoded.
func TestMarkerEncodeInvalid(t *testing.T) {
	for _, sg := range []markerSegment{
		{Buckets: []int64{1, 2}, Vecs: []int64{1, 2, 3}},
		{Vecs: []int64{1}},
	} {
		if _, err := encodeMarker(&marker{Segments: []markerSegment{sg}}); err == nil {
			t.Errorf("encodeMarker(segment %+v) succeeded; want an error", sg)
		}
	}
}

// normalize makes the empty slices of m nil: a decoder that reuses its
// memory leaves them empty.
func normalize(m *marker) *marker {
	c := *m
	c.entities = nil
	c.Parts = slices.Clip(c.Parts)
	if len(c.Parts) == 0 {
		c.Parts = nil
	}
	c.Segments = nil
	for _, s := range m.Segments {
		for _, f := range []*[]int64{&s.Buckets, &s.Vecs, &s.Totals} {
			if len(*f) == 0 {
				*f = nil
			} else {
				*f = slices.Clip(*f)
			}
		}
		if len(s.Labels) == 0 {
			s.Labels = nil
		} else {
			s.Labels = slices.Clip(s.Labels)
		}
		c.Segments = append(c.Segments, s)
	}
	c.Hist = nil
	for _, h := range m.Hist {
		if len(h) == 0 {
			h = nil
		}
		c.Hist = append(c.Hist, slices.Clip(h))
	}
	c.Status = nil
	for _, st := range m.Status {
		if len(st.Labels) == 0 {
			st.Labels = nil
		}
		if len(st.Flags) == 0 {
			st.Flags = nil
		}
		st.Labels, st.Flags = slices.Clip(st.Labels), slices.Clip(st.Flags)
		c.Status = append(c.Status, st)
	}
	return &c
}

// TestMarkerDecoderReuse: stage 2's decoder, reusing its memory from
// record to record, decodes each as a new decoder does.
func TestMarkerDecoderReuse(t *testing.T) {
	var d markerDecoder
	for i, m := range []*marker{benchMarker(3, 30, 100), sampleMarker(), {}, benchMarker(4, 20, 10), sampleMarker(), benchMarker(1, 200, 1)} {
		b, err := encodeMarker(m)
		if err != nil {
			t.Fatal(err)
		}
		want, err := decodeMarker(b)
		if err != nil {
			t.Fatal(err)
		}
		got, r, err := d.header(b)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.deltas(r); err != nil {
			t.Fatal(err)
		}
		if g, w := normalize(got), normalize(want); !reflect.DeepEqual(g, w) {
			t.Errorf("marker %d: reused decoder = %+v; want %+v", i, g, w)
		}
	}
}

func TestMarkerEntitiesOfPartitions(t *testing.T) {
	m := sampleMarker()
	b, err := encodeMarker(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, eps := range [][]int{nil, {0}, {3}, {0, 5}, {0, 3, 5}, {1, 2}} {
		var d markerDecoder
		got, err := d.entities(b, func(p int) bool { return slices.Contains(eps, p) })
		if err != nil {
			t.Fatal(err)
		}
		var want []markerEntity
		for _, e := range m.entities {
			if slices.Contains(eps, e.Partition) {
				want = append(want, e)
			}
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("entities of partitions %v = %+v; want %+v", eps, got, want)
		}
	}
}

// TestMarkerDecodeInvalid: every malformed record is an error, never a
// panic or an allocation its size does not pay for.
func TestMarkerDecodeInvalid(t *testing.T) {
	good, err := encodeMarker(sampleMarker())
	if err != nil {
		t.Fatal(err)
	}
	t.Run("truncated", func(t *testing.T) {
		for i := range len(good) {
			if _, err := decodeMarker(good[:i]); err == nil {
				t.Errorf("decodeMarker(record[:%d]) succeeded; want an error", i)
			}
			var d markerDecoder
			if _, err := d.entities(good[:i], func(int) bool { return true }); err == nil {
				t.Errorf("entities(record[:%d]) succeeded; want an error", i)
			}
		}
	})
	t.Run("version", func(t *testing.T) {
		for _, v := range []byte{0, markerVersion + 1, 255} {
			b := slices.Clone(good)
			b[0] = v
			_, err := decodeMarker(b)
			if err == nil || !strings.Contains(err.Error(), "version "+strconv.Itoa(int(v))) {
				t.Errorf("decodeMarker(version %d) = %v; want an error naming the version", v, err)
			}
		}
	})

	// header builds the start of a record up to its parts count.
	header := func(parts uint64) []byte {
		b := []byte{markerVersion}
		b = binary.LittleEndian.AppendUint64(b, 1)
		b = append(b, 1, 0, 0, 0, 0)
		return binary.AppendUvarint(b, parts)
	}
	section := func(b []byte, n uint32, body ...byte) []byte {
		b = binary.LittleEndian.AppendUint32(b, n)
		return append(b, body...)
	}
	sec := func(b []byte, body ...byte) []byte { return section(b, uint32(len(body)), body...) }
	deltas := func(body ...byte) []byte { return sec(header(0), body...) }
	ents := func(body ...byte) []byte { return sec(deltas(0, 0, 0), body...) }
	uv := binary.AppendUvarint
	for _, tc := range []struct {
		name      string
		b         []byte
		truncated bool // errMarkerTruncated
	}{
		{"empty", nil, false},
		{"huge parts count", header(math.MaxUint64), true},
		{"parts count over the bytes left", append(header(3), 1, 'a', 0, 0, 0), true},
		{"huge deltas section", section(header(0), math.MaxUint32), true},
		{"deltas section past the end", section(header(0), 10, 0, 0), true},
		{"huge segments count", deltas(uv(nil, math.MaxUint64)...), true},
		{"huge label", deltas(append([]byte{1, 0, 1}, uv(nil, 1<<62)...)...), true},
		{"huge buckets count", deltas(append(append([]byte{1, 0, 0, 0}, uv(nil, 1<<40)...), uv(nil, 1<<40)...)...), true},
		{"buckets of their width over the bytes left", deltas(1, 0, 0, 0, 2, 1, 0, 0, 0), true},
		{"width over the bytes left", deltas(1, 0, 0, 0, 1, 100, 0, 0), true},
		{"huge histogram", deltas(append([]byte{0, 1}, uv(nil, math.MaxUint64)...)...), true},
		{"bad varint", deltas(0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01), true},
		{"huge flags count", deltas(append([]byte{0, 0}, uv(nil, math.MaxUint64)...)...), true},
		{"flags over the bytes left", deltas(0, 0, 1, 0, 0, 5, 0), true},
		{"missing entities section", deltas(0, 0, 0), true},
		{"trailing bytes in deltas", sec(deltas(0, 0, 0, 9)), false},
		{"trailing bytes after the record", append(ents(), 0), false},
		{"has history not a boolean", append(append([]byte{markerVersion}, make([]byte, 12)...), 2, 0), false},
		{"huge entities count", ents(append([]byte{2}, sec(nil, uv(nil, math.MaxUint64)...)...)...), true},
		{"huge entity id", ents(append([]byte{2}, sec(nil, append([]byte{1}, uv(nil, 1<<60)...)...)...)...), true},
		{"huge group", ents(append([]byte{2}, section(nil, math.MaxUint32)...)...), true},
		{"groups out of order", ents(append(append([]byte{4}, sec(nil, 0)...), append([]byte{2}, sec(nil, 0)...)...)...), false},
		{"same group twice", ents(append(append([]byte{4}, sec(nil, 0)...), append([]byte{4}, sec(nil, 0)...)...)...), false},
		{"trailing bytes in a group", ents(append([]byte{2}, sec(nil, 0, 0)...)...), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeMarker(tc.b)
			if err == nil {
				t.Fatalf("decodeMarker(%x) succeeded; want an error", tc.b)
			}
			if got := errors.Is(err, errMarkerTruncated); got != tc.truncated {
				t.Errorf("decodeMarker(%x) = %v; truncated or oversized %v, want %v", tc.b, err, got, tc.truncated)
			}
		})
	}
}

func FuzzDecodeMarker(f *testing.F) {
	v1 := sampleMarker()
	v1.Status, v1.version = nil, 1
	for _, m := range []*marker{{}, sampleMarker(), benchMarker(2, 3, 2), v1} {
		b, err := encodeMarker(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add([]byte{markerVersion + 1})
	var reused markerDecoder
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMarker(b)
		if err != nil {
			return
		}
		enc, err := encodeMarker(m)
		if err != nil {
			t.Fatalf("encodeMarker(decodeMarker(b)) failed: %v", err)
		}
		// Every field is written in its shortest form and empty groups
		// are dropped: a record never grows.
		if len(enc) > len(b) {
			t.Errorf("re-encoded to %d bytes from %d", len(enc), len(b))
		}
		m2, err := decodeMarker(enc)
		if err != nil {
			t.Fatalf("decodeMarker(encodeMarker(decodeMarker(b))) failed: %v", err)
		}
		if !reflect.DeepEqual(m2, m) {
			t.Errorf("decode, encode, decode = %+v; want %+v", m2, m)
		}

		// Stage 2's decoder, whatever it decoded before, agrees.
		got, r, err := reused.header(b)
		if err != nil {
			t.Fatalf("header of a decodable record: %v", err)
		}
		if err := reused.deltas(r); err != nil {
			t.Fatalf("deltas of a decodable record: %v", err)
		}
		if g, w := normalize(got), normalize(m); !reflect.DeepEqual(g, w) {
			t.Errorf("reused decoder = %+v; want %+v", g, w)
		}
		// A restore of some partitions gets exactly their entities.
		even := func(p int) bool { return p%2 == 0 }
		es, err := reused.entities(b, even)
		if err != nil {
			t.Fatalf("entities of a decodable record: %v", err)
		}
		var want []markerEntity
		for _, e := range m.entities {
			if even(e.Partition) {
				want = append(want, e)
			}
		}
		if !reflect.DeepEqual(es, want) {
			t.Errorf("entities of even partitions = %+v; want %+v", es, want)
		}
	})
}

// benchMarker returns a marker like those of a catch-up flush: segments
// segments of buckets buckets (18 counters each: 4 stages, 3 steps) and
// entities changed entities over 6 partitions, interleaved as a flush
// lists them.
func benchMarker(segments, buckets, entities int) *marker {
	const vecLen, stages = 18, 4
	rng := rand.New(rand.NewPCG(1, 2))
	m := &marker{
		Writer: rng.Uint64(), Seq: 1234,
		Clock: 1_763_900_000_000, LastEvent: 1_763_899_999_000, HistoryStart: 1_760_000_000_000, HasHistory: true,
	}
	for p := range 6 {
		m.Parts = append(m.Parts, markerPart{Topic: "events", Partition: p, From: int64(p) * 1e6, To: int64(p)*1e6 + 80_000})
	}
	for s := range segments {
		sg := markerSegment{Breakdown: s % 7, Totals: make([]int64, stages)}
		if n := s % 7 % 3; n > 0 {
			sg.Labels = []string{"source-" + strconv.Itoa(s%10), "region-" + strconv.Itoa(s%5)}[:n]
		}
		first := int64(489_000 + rng.IntN(100))
		for b := range buckets {
			sg.Buckets = append(sg.Buckets, first+int64(b)+int64(rng.IntN(2)))
			for k := range vecLen {
				var x int64
				switch {
				case rng.IntN(3) == 0:
				case k >= 2*stages && k < 3*stages:
					x = rng.Int64N(5_000_000) // values, in thousandths
				default:
					x = rng.Int64N(40)
				}
				sg.Vecs = append(sg.Vecs, x)
			}
		}
		for i := range sg.Totals {
			sg.Totals[i] = rng.Int64N(10_000)
		}
		m.Segments = append(m.Segments, sg)
	}
	for range 3 {
		h := make([]int64, 40)
		for i := range h {
			h[i] = rng.Int64N(1000)
		}
		m.Hist = append(m.Hist, h)
	}
	for i := range entities {
		last := m.LastEvent - rng.Int64N(3e9)
		e := markerEntity{
			Partition: i % 6, ID: []byte("contact-" + strconv.Itoa(rng.IntN(1e7))), LastSeen: last,
			Reached: []int64{last - rng.Int64N(2e9), store.NotReached, store.NotReached, store.NotReached},
			Dims:    []string{"source-" + strconv.Itoa(rng.IntN(10)), "region-" + strconv.Itoa(rng.IntN(5))},
		}
		for j := 1; j < stages && rng.IntN(2) == 0; j++ {
			e.Reached[j] = last - rng.Int64N(1e8)
		}
		for range 1 + rng.IntN(4) {
			e.Seen = append(e.Seen, rng.Uint64())
		}
		m.entities = append(m.entities, e)
	}
	return m
}

// gobEncodeMarker and gobDecodeMarker are the encoding this package used
// before the versioned one, kept to compare them.
func gobEncodeMarker(m *marker) ([]byte, error) {
	var ents bytes.Buffer
	if len(m.entities) > 0 {
		if err := gob.NewEncoder(&ents).Encode(m.entities); err != nil {
			return nil, err
		}
	}
	buf := bytes.NewBuffer(binary.AppendUvarint(nil, uint64(ents.Len())))
	buf.Write(ents.Bytes())
	if err := gob.NewEncoder(buf).Encode(m); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func gobSplitMarker(b []byte) (ents, rest []byte) {
	n, k := binary.Uvarint(b)
	return b[k : k+int(n)], b[k+int(n):]
}

// BenchmarkMarker encodes and decodes a catch-up marker (125 segments ×
// 300 buckets, 10,000 entities): "encode" is stage 1's work per flush,
// "deltas" stage 2's on every replica per marker (the header and the
// deltas, not the entity states), "entities" a restore's (the entity
// states of one partition in six, or of all).
func BenchmarkMarker(b *testing.B) {
	m := benchMarker(125, 300, 10_000)
	rec, err := encodeMarker(m)
	if err != nil {
		b.Fatal(err)
	}
	gobRec, err := gobEncodeMarker(m)
	if err != nil {
		b.Fatal(err)
	}
	one := func(p int) bool { return p == 0 }
	all := func(int) bool { return true }
	report := func(b *testing.B, size int) {
		b.SetBytes(int64(size))
		b.ReportMetric(float64(size), "bytes/marker")
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "markers/s")
	}
	b.Run("codec=v1/op=encode", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, len(rec))
		for b.Loop() {
			if _, err := appendMarker(buf[:0], m); err != nil {
				b.Fatal(err)
			}
		}
		report(b, len(rec))
	})
	b.Run("codec=v1/op=deltas", func(b *testing.B) {
		b.ReportAllocs()
		var d markerDecoder
		for b.Loop() {
			_, r, err := d.header(rec)
			if err == nil {
				err = d.deltas(r)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		report(b, len(rec))
	})
	for _, tc := range []struct {
		name string
		want func(int) bool
	}{{"one", one}, {"all", all}} {
		b.Run("codec=v1/op=entities/partitions="+tc.name, func(b *testing.B) {
			b.ReportAllocs()
			var d markerDecoder
			for b.Loop() {
				if _, err := d.entities(rec, tc.want); err != nil {
					b.Fatal(err)
				}
			}
			report(b, len(rec))
		})
	}
	b.Run("codec=gob/op=encode", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := gobEncodeMarker(m); err != nil {
				b.Fatal(err)
			}
		}
		report(b, len(gobRec))
	})
	b.Run("codec=gob/op=deltas", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, rest := gobSplitMarker(gobRec)
			var got marker
			if err := gob.NewDecoder(bytes.NewReader(rest)).Decode(&got); err != nil {
				b.Fatal(err)
			}
		}
		report(b, len(gobRec))
	})
	// gob decodes every partition's states to restore one.
	b.Run("codec=gob/op=entities/partitions=all", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ents, _ := gobSplitMarker(gobRec)
			var es []markerEntity
			if err := gob.NewDecoder(bytes.NewReader(ents)).Decode(&es); err != nil {
				b.Fatal(err)
			}
		}
		report(b, len(gobRec))
	})
}
