package processor

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/funnelwatch/funnelwatch/store"
)

// marker is what one flush of stage 1 tells every replica: the input it
// covers, the per-segment deltas it produced (with dimension values, since
// dictionary ids are local) and the new states of the entities it changed.
type marker struct {
	Writer, Seq  uint64
	Parts        []markerPart
	Clock        int64
	LastEvent    int64
	HistoryStart int64
	HasHistory   bool
	Segments     []markerSegment
	Hist         [][]int64
	// Status holds the degradation flags of the segments whose flags the
	// writer's stage 2 changed since its previous marker, for the segments
	// it exports: a replica that takes over their partition starts from
	// them (version 2 on).
	Status []markerStatus
	// entities are in a section of their own (see appendMarker).
	entities []markerEntity
	// version is the version of a decoded record older than
	// markerVersion, so that it re-encodes as it was read; 0 means
	// markerVersion.
	version byte
}

// markerPart is the range of an input partition a marker covers: From is
// the next offset stored before it (-1: never consumed), To the one after.
type markerPart struct {
	Topic     string
	Partition int
	From, To  int64
}

type markerSegment struct {
	Breakdown int
	Labels    []string
	Buckets   []int64
	Vecs      []int64 // len(Buckets) vectors, flattened
	Totals    []int64
}

// flagsOnly reports whether m covers no records: a marker sent only for
// its flags.
func (m *marker) flagsOnly() bool {
	for _, p := range m.Parts {
		if p.From != p.To {
			return false
		}
	}
	return true
}

// markerStatus is a segment's degradation flags (1 = degraded), in the
// order of segment.status.
type markerStatus struct {
	Breakdown int
	Labels    []string
	Flags     []int64
}

type markerEntity struct {
	Partition int
	ID        []byte
	LastSeen  int64
	Reached   []int64
	Seen      []uint64
	Dims      []string
}

// markerVersion is the version of the marker records this build writes,
// and the newest it reads. A new version is rolled out readers first
// (docs/scaling.md#marker-format): a decoder reads every version up to its
// own. Version 2 added the segments' flags (marker.Status).
const markerVersion = 2

// A marker record (docs/scaling.md#marker-format) is, in order:
//
//	version   byte
//	header    writer (8 bytes), seq, clock, last event, history start,
//	          has history (byte), parts (topic, partition, from, to)
//	deltas    4-byte length, then segments (breakdown, labels, totals,
//	          buckets with their vectors), histograms and (version 2 on)
//	          flags (breakdown, labels, flags)
//	entities  4-byte length, then groups of one entity-partition in
//	          ascending order: partition, 4-byte length, entities
//
// Counts and unsigned numbers are uvarints, signed ones zigzag varints,
// strings and byte strings a uvarint length and their bytes, fixed-width
// numbers little-endian. The header comes first so that stage 2 decides a
// marker before decoding its deltas; the sections are length-prefixed so
// that stage 2 skips the entity states it never uses, and a restore decodes
// only the groups of the partitions it restores.

// encodeMarker encodes m as a marker record.
func encodeMarker(m *marker) ([]byte, error) {
	// Most values take one to three bytes: the estimate spares the
	// copies of growing a record of megabytes from nothing.
	n := 64 + 32*len(m.entities)
	for _, s := range m.Segments {
		n += 32 + 2*len(s.Vecs) + 2*len(s.Buckets)
	}
	return appendMarker(make([]byte, 0, n), m)
}

// appendMarker appends the record of m to dst.
func appendMarker(dst []byte, m *marker) ([]byte, error) {
	version := m.version
	if version == 0 {
		version = markerVersion
	}
	if version < 2 && len(m.Status) > 0 {
		return nil, fmt.Errorf("encode marker: version %d has no flags", version)
	}
	dst = append(dst, version)
	dst = binary.LittleEndian.AppendUint64(dst, m.Writer)
	dst = binary.AppendUvarint(dst, m.Seq)
	dst = binary.AppendVarint(dst, m.Clock)
	dst = binary.AppendVarint(dst, m.LastEvent)
	dst = binary.AppendVarint(dst, m.HistoryStart)
	if m.HasHistory {
		dst = append(dst, 1)
	} else {
		dst = append(dst, 0)
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.Parts)))
	for _, p := range m.Parts {
		dst = appendString(dst, p.Topic)
		dst = binary.AppendVarint(dst, int64(p.Partition))
		dst = binary.AppendVarint(dst, p.From)
		dst = binary.AppendVarint(dst, p.To)
	}

	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst = binary.AppendUvarint(dst, uint64(len(m.Segments)))
	for i := range m.Segments {
		s := &m.Segments[i]
		width := 0
		if len(s.Buckets) > 0 {
			width = len(s.Vecs) / len(s.Buckets)
		}
		if len(s.Vecs) != width*len(s.Buckets) {
			return nil, fmt.Errorf("encode marker: segment %d has %d values for %d buckets", i, len(s.Vecs), len(s.Buckets))
		}
		dst = appendSegmentName(dst, s.Breakdown, s.Labels)
		dst = appendVarints(dst, s.Totals)
		dst = binary.AppendUvarint(dst, uint64(len(s.Buckets)))
		dst = binary.AppendUvarint(dst, uint64(width))
		// Buckets as differences from the previous one: a byte when they
		// come in order, the bytes of the span of buckets otherwise.
		prev := int64(0)
		for j, b := range s.Buckets {
			dst = binary.AppendVarint(dst, b-prev)
			prev = b
			for _, x := range s.Vecs[j*width : (j+1)*width] {
				dst = binary.AppendVarint(dst, x)
			}
		}
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.Hist)))
	for _, h := range m.Hist {
		dst = appendVarints(dst, h)
	}
	if version >= 2 {
		dst = binary.AppendUvarint(dst, uint64(len(m.Status)))
		for _, st := range m.Status {
			dst = appendSegmentName(dst, st.Breakdown, st.Labels)
			dst = appendVarints(dst, st.Flags)
		}
	}
	dst, err := endSection(dst, start)
	if err != nil {
		return nil, err
	}

	start = len(dst)
	dst = append(dst, 0, 0, 0, 0)
	es := m.entities
	// A flush lists its entities in table order: they are grouped by
	// sorting their indexes, not the states themselves.
	order := make([]int32, len(es))
	for i := range order {
		order[i] = int32(i)
	}
	if !slices.IsSortedFunc(es, cmpPartition) {
		slices.SortFunc(order, func(a, b int32) int {
			return cmp.Or(cmp.Compare(es[a].Partition, es[b].Partition), cmp.Compare(a, b))
		})
	}
	for i := 0; i < len(order); {
		p := es[order[i]].Partition
		j := i + 1
		for j < len(order) && es[order[j]].Partition == p {
			j++
		}
		dst = binary.AppendVarint(dst, int64(p))
		group := len(dst)
		dst = append(dst, 0, 0, 0, 0)
		dst = binary.AppendUvarint(dst, uint64(j-i))
		for _, k := range order[i:j] {
			dst = appendEntity(dst, &es[k])
		}
		if dst, err = endSection(dst, group); err != nil {
			return nil, err
		}
		i = j
	}
	return endSection(dst, start)
}

func cmpPartition(a, b markerEntity) int { return cmp.Compare(a.Partition, b.Partition) }

func appendEntity(dst []byte, e *markerEntity) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(e.ID)))
	dst = append(dst, e.ID...)
	dst = binary.AppendVarint(dst, e.LastSeen)
	dst = binary.AppendUvarint(dst, uint64(len(e.Reached)))
	for _, r := range e.Reached {
		dst = binary.AppendUvarint(dst, store.ReachedCode(e.LastSeen, r))
	}
	dst = binary.AppendUvarint(dst, uint64(len(e.Seen)))
	for _, h := range e.Seen {
		dst = binary.LittleEndian.AppendUint64(dst, h)
	}
	dst = binary.AppendUvarint(dst, uint64(len(e.Dims)))
	for _, d := range e.Dims {
		dst = appendString(dst, d)
	}
	return dst
}

// endSection writes the length of the section that starts with its 4-byte
// length at start.
func endSection(dst []byte, start int) ([]byte, error) {
	n := len(dst) - start - 4
	if n > math.MaxUint32 {
		return nil, fmt.Errorf("encode marker: section of %d bytes", n)
	}
	binary.LittleEndian.PutUint32(dst[start:], uint32(n))
	return dst, nil
}

func appendSegmentName(dst []byte, breakdown int, labels []string) []byte {
	dst = binary.AppendVarint(dst, int64(breakdown))
	dst = binary.AppendUvarint(dst, uint64(len(labels)))
	for _, l := range labels {
		dst = appendString(dst, l)
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

func appendVarints(dst []byte, xs []int64) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(xs)))
	for _, x := range xs {
		dst = binary.AppendVarint(dst, x)
	}
	return dst
}

func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

// errMarkerTruncated is the cause of a decoding error where a field
// claims more bytes than the record has left.
var errMarkerTruncated = errors.New("truncated or oversized field")

// markerReader reads the fields of a record. Every count and length is
// checked against the bytes left before anything is allocated for it. The
// first error sticks: later reads return zero values.
type markerReader struct {
	b   []byte
	err error
}

func (r *markerReader) fail(what string, cause error) {
	if r.err == nil {
		r.err = fmt.Errorf("%s: %w", what, cause)
	}
	r.b = nil
}

func (r *markerReader) uvarint() uint64 {
	if len(r.b) > 0 && r.b[0] < 0x80 {
		x := uint64(r.b[0])
		r.b = r.b[1:]
		return x
	}
	return r.uvarintSlow()
}

func (r *markerReader) uvarintSlow() uint64 {
	x, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("varint", errMarkerTruncated)
		return 0
	}
	r.b = r.b[n:]
	return x
}

func (r *markerReader) varint() int64 { return unzigzag(r.uvarint()) }

// varints fills dst with the next len(dst) varints. Stage 2 spends its
// decoding in here: the loop keeps the bytes left in a register.
func (r *markerReader) varints(dst []int64) {
	b := r.b
	for i := range dst {
		if len(b) > 0 && b[0] < 0x80 {
			dst[i] = unzigzag(uint64(b[0]))
			b = b[1:]
			continue
		}
		u, n := binary.Uvarint(b)
		if n <= 0 {
			clear(dst[i:])
			r.fail("varint", errMarkerTruncated)
			return
		}
		dst[i] = unzigzag(u)
		b = b[n:]
	}
	r.b = b
}

func (r *markerReader) int(what string) int {
	x := r.varint()
	if int64(int(x)) != x {
		r.fail(what, fmt.Errorf("%d out of range", x))
		return 0
	}
	return int(x)
}

func (r *markerReader) byte() byte {
	if len(r.b) == 0 {
		r.fail("byte", errMarkerTruncated)
		return 0
	}
	x := r.b[0]
	r.b = r.b[1:]
	return x
}

func (r *markerReader) fixed64() uint64 {
	if len(r.b) < 8 {
		r.fail("fixed64", errMarkerTruncated)
		return 0
	}
	x := binary.LittleEndian.Uint64(r.b)
	r.b = r.b[8:]
	return x
}

// count reads the number of elements that follow, each at least size
// bytes long.
func (r *markerReader) count(what string, size int) int {
	n := r.uvarint()
	if n > uint64(len(r.b)/size) {
		r.fail(fmt.Sprintf("%s count %d with %d bytes left", what, n, len(r.b)), errMarkerTruncated)
		return 0
	}
	return int(n)
}

// bytes returns the next byte string, aliasing the record.
func (r *markerReader) bytes(what string) []byte {
	n := r.count(what, 1)
	b := r.b[:n:n]
	r.b = r.b[n:]
	return b
}

// section returns a reader of the next length-prefixed section and skips
// it.
func (r *markerReader) section(what string) markerReader {
	if len(r.b) < 4 {
		r.fail(what+" length", errMarkerTruncated)
		return markerReader{}
	}
	n := binary.LittleEndian.Uint32(r.b)
	if uint64(n) > uint64(len(r.b)-4) {
		r.fail(fmt.Sprintf("%s of %d bytes with %d left", what, n, len(r.b)-4), errMarkerTruncated)
		return markerReader{}
	}
	s := markerReader{b: r.b[4 : 4+n]}
	r.b = r.b[4+n:]
	return s
}

// done checks that the reader used up its bytes.
func (r *markerReader) done(what string) {
	if r.err == nil && len(r.b) > 0 {
		r.fail(what, fmt.Errorf("%d trailing bytes", len(r.b)))
	}
}

// resize returns s with length n, reusing its backing array, and the
// elements in it, when it is large enough.
func resize[T any](s []T, n int) []T {
	if n <= cap(s) {
		return s[:n]
	}
	s = s[:cap(s)]
	return append(s, make([]T, n-len(s))...)
}

// maxInterned and maxInternedLen bound the strings a markerDecoder keeps
// (16 MiB at most): labels, dimension values and topics repeat from marker
// to marker, but a hostile or unusual log must not grow it without end.
const (
	maxInterned    = 1 << 16
	maxInternedLen = 256
)

// markerDecoder decodes marker records. Stage 2 applies markers one at a
// time: a decoder decodes each into the same marker, reusing its memory,
// and the strings that repeat from marker to marker are allocated once.
type markerDecoder struct {
	m    marker
	strs map[string]string
}

func (d *markerDecoder) str(r *markerReader, what string) string {
	b := r.bytes(what)
	if s, ok := d.strs[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(d.strs) < maxInterned && len(s) <= maxInternedLen {
		if d.strs == nil {
			d.strs = map[string]string{}
		}
		d.strs[s] = s
	}
	return s
}

// header decodes the version and the header of a record into the
// decoder's marker, which it returns with a reader of the sections that
// follow. The marker's deltas are those of the previous record until
// deltas decodes them.
func (d *markerDecoder) header(b []byte) (*marker, markerReader, error) {
	if len(b) == 0 {
		return nil, markerReader{}, errors.New("decode marker: empty record")
	}
	switch v := b[0]; {
	case v == 0:
		return nil, markerReader{}, errors.New("decode marker: version 0 does not exist: not a marker record")
	case v > markerVersion:
		return nil, markerReader{}, fmt.Errorf("decode marker: version %d is newer than this build reads (1 to %d): upgrade it", v, markerVersion)
	}
	r := markerReader{b: b[1:]}
	m := &d.m
	m.version = b[0]
	if m.version == markerVersion {
		m.version = 0
	}
	m.Writer = r.fixed64()
	m.Seq = r.uvarint()
	m.Clock = r.varint()
	m.LastEvent = r.varint()
	m.HistoryStart = r.varint()
	switch r.byte() {
	case 0:
		m.HasHistory = false
	case 1:
		m.HasHistory = true
	default:
		r.fail("has history", errors.New("not a boolean"))
	}
	m.Parts = resize(m.Parts, r.count("parts", 4))
	for i := range m.Parts {
		p := &m.Parts[i]
		p.Topic = d.str(&r, "topic")
		p.Partition = r.int("partition")
		p.From = r.varint()
		p.To = r.varint()
	}
	if r.err != nil {
		return nil, markerReader{}, fmt.Errorf("decode marker header: %w", r.err)
	}
	return m, r, nil
}

// ints decodes a count and as many signed numbers into dst's memory.
func (r *markerReader) ints(dst []int64, what string) []int64 {
	dst = resize(dst, r.count(what, 1))
	r.varints(dst)
	return dst
}

// segmentName decodes a segment's breakdown and label values, the latter
// into labels' memory.
func (d *markerDecoder) segmentName(r *markerReader, labels []string) (int, []string) {
	breakdown := r.int("breakdown")
	labels = resize(labels, r.count("labels", 1))
	for j := range labels {
		labels[j] = d.str(r, "label")
	}
	return breakdown, labels
}

// deltas decodes the deltas section, from the reader header returned,
// into the decoder's marker.
func (d *markerDecoder) deltas(r markerReader) error {
	s := r.section("deltas")
	m := &d.m
	m.Segments = resize(m.Segments, s.count("segments", 5))
	for i := range m.Segments {
		sg := &m.Segments[i]
		sg.Breakdown, sg.Labels = d.segmentName(&s, sg.Labels)
		sg.Totals = s.ints(sg.Totals, "totals")
		n := s.count("buckets", 1)
		width := s.count("vector width", 1)
		if n > len(s.b)/(1+width) {
			s.fail(fmt.Sprintf("%d buckets of %d values with %d bytes left", n, width, len(s.b)), errMarkerTruncated)
			n = 0
		}
		sg.Buckets = resize(sg.Buckets, n)
		sg.Vecs = resize(sg.Vecs, n*width)
		prev := int64(0)
		for j := range sg.Buckets {
			prev += s.varint()
			sg.Buckets[j] = prev
			s.varints(sg.Vecs[j*width : (j+1)*width])
		}
	}
	m.Hist = resize(m.Hist, s.count("histograms", 1))
	for i := range m.Hist {
		m.Hist[i] = s.ints(m.Hist[i], "histogram")
	}
	m.Status = m.Status[:0]
	if m.version == 0 || m.version >= 2 {
		m.Status = resize(m.Status, s.count("flags", 3))
		for i := range m.Status {
			st := &m.Status[i]
			st.Breakdown, st.Labels = d.segmentName(&s, st.Labels)
			st.Flags = s.ints(st.Flags, "flags")
		}
	}
	s.done("deltas")
	r.section("entities")
	r.done("marker")
	if err := errors.Join(s.err, r.err); err != nil {
		return fmt.Errorf("decode marker: %w", err)
	}
	return nil
}

// entities decodes the header of a record and the states of the entities
// of the partitions want accepts, skipping the other partitions' groups
// and the deltas. The states are newly allocated.
func (d *markerDecoder) entities(b []byte, want func(int) bool) ([]markerEntity, error) {
	_, r, err := d.header(b)
	if err != nil {
		return nil, err
	}
	return d.entitySection(r, want)
}

// entitySection decodes the entity states of the partitions want accepts
// from the reader header returned.
func (d *markerDecoder) entitySection(r markerReader, want func(int) bool) ([]markerEntity, error) {
	r.section("deltas")
	s := r.section("entities")
	r.done("marker")
	var (
		out   []markerEntity
		ints  []int64
		seens []uint64
		prev  int64 = math.MinInt64
		first       = true
	)
	for len(s.b) > 0 && s.err == nil {
		p := s.int("partition")
		g := s.section("group")
		if !first && int64(p) <= prev {
			s.fail("group", fmt.Errorf("partition %d after %d", p, prev))
			break
		}
		first, prev = false, int64(p)
		if !want(p) {
			continue
		}
		n := g.count("entities", 5)
		out = slices.Grow(out, n)
		for range n {
			e := markerEntity{Partition: p}
			if id := g.bytes("entity id"); len(id) > 0 {
				e.ID = slices.Clone(id)
			}
			e.LastSeen = g.varint()
			if k := g.count("reached", 1); k > 0 {
				ints, e.Reached = carve(ints, k)
				for j := range e.Reached {
					e.Reached[j] = store.ReachedTime(e.LastSeen, g.uvarint())
				}
			}
			if k := g.count("seen", 8); k > 0 {
				seens, e.Seen = carve(seens, k)
				for j := range e.Seen {
					e.Seen[j] = g.fixed64()
				}
			}
			if k := g.count("dimensions", 1); k > 0 {
				e.Dims = make([]string, k)
				for j := range e.Dims {
					e.Dims[j] = d.str(&g, "dimension value")
				}
			}
			out = append(out, e)
		}
		g.done("group")
		if g.err != nil {
			s.fail(fmt.Sprintf("partition %d", p), g.err)
		}
	}
	if err := errors.Join(s.err, r.err); err != nil {
		return nil, fmt.Errorf("decode marker entities: %w", err)
	}
	return out, nil
}

// carve extends arena by k elements, allocating a new chunk when it is
// full: the entities of a restore share a few large arrays rather than
// holding one each. The last k elements are the new ones; the caller
// slices them with their capacity capped.
func carve[T any](arena []T, k int) (grown, piece []T) {
	if len(arena)+k > cap(arena) {
		arena = make([]T, 0, max(k, 4096))
	}
	n := len(arena)
	arena = arena[:n+k]
	return arena, arena[n : n+k : n+k]
}

// decodeMarker decodes a whole record into a new marker, entity states
// included.
func decodeMarker(b []byte) (*marker, error) {
	var d markerDecoder
	m, r, err := d.header(b)
	if err != nil {
		return nil, err
	}
	if err := d.deltas(r); err != nil {
		return nil, err
	}
	if m.entities, err = d.entitySection(r, func(int) bool { return true }); err != nil {
		return nil, err
	}
	return m, nil
}
