package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Vector is a list of signed counters. Vectors are the values of every key
// that is only ever added to (bucket counters, totals, histograms, process
// counters): the store combines them with an associative merge operator, so
// a flush writes deltas and never reads the previous value.
type Vector []int64

// AppendVector appends the encoding of v to dst: a uvarint length followed by
// one zigzag varint per element. Small counts take one byte each.
func AppendVector(dst []byte, v Vector) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(v)))
	for _, x := range v {
		dst = binary.AppendVarint(dst, x)
	}
	return dst
}

// errCorrupt is wrapped by every decoding error.
var errCorrupt = errors.New("corrupt value")

// maxVectorLen bounds decoded vectors so that a corrupt length cannot make a
// decoder allocate without bound.
const maxVectorLen = 1 << 16

// DecodeVector decodes an encoding made by AppendVector, appending to dst
// (which may be nil) and returning the result.
func DecodeVector(dst Vector, b []byte) (Vector, error) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > maxVectorLen {
		return dst, fmt.Errorf("vector length: %w", errCorrupt)
	}
	b = b[k:]
	for i := uint64(0); i < n; i++ {
		if len(b) > 0 && b[0] < 0x80 {
			// Most elements are small: a one-byte varint decoded inline
			// (zigzag, as binary.Varint does) cut decoding at start-up,
			// which reads every bucket of the ranges' span, by half.
			u := uint64(b[0])
			dst = append(dst, int64(u>>1)^-int64(u&1))
			b = b[1:]
			continue
		}
		x, k := binary.Varint(b)
		if k <= 0 {
			return dst, fmt.Errorf("vector element %d: %w", i, errCorrupt)
		}
		dst = append(dst, x)
		b = b[k:]
	}
	if len(b) != 0 {
		return dst, fmt.Errorf("vector: %d trailing bytes: %w", len(b), errCorrupt)
	}
	return dst, nil
}

// Add adds o to v element-wise, growing v to the length of o, and returns v.
func (v Vector) Add(o Vector) Vector {
	for len(v) < len(o) {
		v = append(v, 0)
	}
	for i, x := range o {
		v[i] += x
	}
	return v
}

// Entity is the per-entity state: the segment frozen at first touch, the
// time each stage was first reached, and the ids of the most recent events
// for deduplication.
type Entity struct {
	// LastSeen is the event time (Unix ms) of the newest accepted event.
	LastSeen int64
	// Dims holds the dictionary id of each configured dimension's value.
	Dims []uint32
	// Reached holds, per configured stage, the event time (Unix ms) at
	// which the entity first reached it, or NotReached.
	Reached []int64
	// Seen holds hashes of the most recent event ids, oldest first.
	Seen []uint64
}

// NotReached marks a stage the entity has not reached. Event times before
// 1970 are rejected by the decoder, so the value cannot collide with a real
// time.
const NotReached int64 = math.MinInt64

// Entity states are written with entityVersion. Version 1 wrote reach
// times as varints, 10 bytes for NotReached, which most of them are (63%
// in the default bench, a quarter of the entity states' bytes). Version 2
// writes each as its ReachedCode. Both decode.
const (
	entityV1      = 1
	entityVersion = 2
)

// AppendEntity appends the encoding of e to dst.
func AppendEntity(dst []byte, e *Entity) []byte {
	dst = append(dst, entityVersion)
	dst = binary.AppendVarint(dst, e.LastSeen)
	dst = binary.AppendUvarint(dst, uint64(len(e.Dims)))
	for _, d := range e.Dims {
		dst = binary.AppendUvarint(dst, uint64(d))
	}
	dst = binary.AppendUvarint(dst, uint64(len(e.Reached)))
	for _, r := range e.Reached {
		dst = binary.AppendUvarint(dst, ReachedCode(e.LastSeen, r))
	}
	dst = binary.AppendUvarint(dst, uint64(len(e.Seen)))
	for _, h := range e.Seen {
		dst = binary.LittleEndian.AppendUint64(dst, h)
	}
	return dst
}

// ReachedCode encodes the time r at which an entity reached a stage as its
// distance back from the entity's last event, lastSeen, which is small,
// with 0 for NotReached, which takes 10 bytes as a varint. The mapping is
// a bijection of the uint64s for any lastSeen, so that every time
// round-trips through ReachedTime.
func ReachedCode(lastSeen, r int64) uint64 {
	u := zigzag(lastSeen - r)
	nr := zigzag(lastSeen - NotReached)
	switch {
	case u == nr:
		return 0
	case u < nr:
		return u + 1
	default:
		return u
	}
}

// ReachedTime is the time ReachedCode encoded as c.
func ReachedTime(lastSeen int64, c uint64) int64 {
	nr := zigzag(lastSeen - NotReached)
	u := c
	switch {
	case c == 0:
		u = nr
	case c <= nr:
		u = c - 1
	}
	return lastSeen - unzigzag(u)
}

func zigzag(x int64) uint64   { return uint64(x<<1) ^ uint64(x>>63) }
func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

// maxEntityList bounds each list in a decoded entity.
const maxEntityList = 1 << 10

// DecodeEntity decodes an encoding made by AppendEntity into e, reusing its
// slices.
func DecodeEntity(e *Entity, b []byte) error {
	if len(b) == 0 || b[0] != entityV1 && b[0] != entityVersion {
		return fmt.Errorf("entity version: %w", errCorrupt)
	}
	v1 := b[0] == entityV1
	d := decoder{b: b[1:]}
	e.LastSeen = d.varint()
	n := d.count()
	e.Dims = e.Dims[:0]
	for i := 0; i < n; i++ {
		x := d.uvarint()
		if x > math.MaxUint32 {
			d.err = errCorrupt
		}
		e.Dims = append(e.Dims, uint32(x))
	}
	n = d.count()
	e.Reached = e.Reached[:0]
	for i := 0; i < n; i++ {
		if v1 {
			e.Reached = append(e.Reached, d.varint())
		} else {
			e.Reached = append(e.Reached, ReachedTime(e.LastSeen, d.uvarint()))
		}
	}
	n = d.count()
	e.Seen = e.Seen[:0]
	for i := 0; i < n; i++ {
		e.Seen = append(e.Seen, d.uint64())
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	if d.err != nil {
		return fmt.Errorf("entity: %w", d.err)
	}
	return nil
}

// decoder reads a sequence of fields and remembers the first error, so a
// decoding function checks once at the end.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	x, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[k:]
	return x
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	x, k := binary.Varint(d.b)
	if k <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[k:]
	return x
}

func (d *decoder) uint64() uint64 {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 8 {
		d.err = errCorrupt
		return 0
	}
	x := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return x
}

func (d *decoder) count() int {
	n := d.uvarint()
	if n > maxEntityList {
		d.err = errCorrupt
		return 0
	}
	return int(n)
}

// A bucket group is the value of a bucket key: the buckets of one segment
// within one group of 64 (see groupOf) that have counters, in increasing
// order, each as its offset in the group (one byte, below 64) followed by
// its Vector in the sparse form of appendSparse.

// appendGroupEntry appends bucket offset off (below 64) and v to a bucket
// group. Offsets must be appended in increasing order.
func appendGroupEntry(dst []byte, off int, v Vector) []byte {
	return appendSparse(append(dst, byte(off)), v)
}

// appendSparse appends v in the sparse form of a bucket: the number of
// non-zero elements (uvarint), then for each the gap from the previous
// one's index (uvarint, 0 for the next index) and the element (zigzag
// varint). Most of a bucket's numbers are zero (a minute of visits has no
// deals): in a store of the demo's traffic a bucket took 11 bytes in the
// sparse form against 17 as AppendVector writes it. Trailing zeros are not
// kept: every reader of buckets treats missing elements as zero.
func appendSparse(dst []byte, v Vector) []byte {
	nnz := 0
	for _, x := range v {
		if x != 0 {
			nnz++
		}
	}
	dst = binary.AppendUvarint(dst, uint64(nnz))
	prev := -1
	for i, x := range v {
		if x != 0 {
			dst = binary.AppendUvarint(dst, uint64(i-prev-1))
			dst = binary.AppendVarint(dst, x)
			prev = i
		}
	}
	return dst
}

// sparseReader reads the elements of a sparse Vector in index order.
type sparseReader struct {
	b    []byte
	left uint64
	i    int // index of the last element read, -1 before the first
}

func newSparseReader(b []byte) (sparseReader, error) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > maxVectorLen {
		return sparseReader{}, fmt.Errorf("sparse vector count: %w", errCorrupt)
	}
	return sparseReader{b: b[k:], left: n, i: -1}, nil
}

// next returns the next non-zero element and its index, and false after
// the last one.
func (r *sparseReader) next() (int, int64, bool, error) {
	if r.left == 0 {
		return 0, 0, false, nil
	}
	// Gaps and most elements take one byte: read those without the
	// general decoders, which do not inline (the merge operator of
	// Pebble's compactions spends most of its time here).
	var gap uint64
	k := 1
	if len(r.b) > 0 && r.b[0] < 0x80 {
		gap = uint64(r.b[0])
	} else {
		gap, k = binary.Uvarint(r.b)
	}
	if k <= 0 || gap >= maxVectorLen || r.i+1+int(gap) >= maxVectorLen {
		return 0, 0, false, fmt.Errorf("sparse vector index: %w", errCorrupt)
	}
	var x int64
	k2 := 1
	if rest := r.b[k:]; len(rest) > 0 && rest[0] < 0x80 {
		x = int64(rest[0]>>1) ^ -int64(rest[0]&1)
	} else {
		x, k2 = binary.Varint(rest)
	}
	if k2 <= 0 {
		return 0, 0, false, fmt.Errorf("sparse vector element: %w", errCorrupt)
	}
	r.b, r.left, r.i = r.b[k+k2:], r.left-1, r.i+1+int(gap)
	return r.i, x, true, nil
}

// addSparse adds the sparse Vector at the start of b to *v, growing *v as
// needed, or only reads it when v is nil, and returns the length of its
// encoding (b may go on after it).
func addSparse(v *Vector, b []byte) (int, error) {
	r, err := newSparseReader(b)
	if err != nil {
		return 0, err
	}
	for {
		i, x, ok, err := r.next()
		if err != nil {
			return 0, err
		}
		if !ok {
			return len(b) - len(r.b), nil
		}
		if v == nil {
			continue
		}
		for len(*v) <= i {
			*v = append(*v, 0)
		}
		(*v)[i] += x
	}
}

// DecodeBucketVector decodes a bucket's Vector as Store.EncodedBuckets
// hands it out into dst[:0] and returns it; it is as long as the bucket's
// last non-zero element needs.
func DecodeBucketVector(dst Vector, b []byte) (Vector, error) {
	dst = dst[:0]
	n, err := addSparse(&dst, b)
	if err == nil && n != len(b) {
		err = fmt.Errorf("sparse vector: %d trailing bytes: %w", len(b)-n, errCorrupt)
	}
	return dst, err
}

// groupReader reads the entries of a bucket group in order. next reports
// an offset that is not above the previous one as corrupt, so a value
// that reads to the end is a valid group.
type groupReader struct {
	b    []byte
	prev int
}

func newGroupReader(b []byte) groupReader { return groupReader{b: b, prev: -1} }

// next returns the next entry's offset and encoded Vector, and false at
// the end of the group or on an error.
func (r *groupReader) next() (off int, enc []byte, ok bool, err error) {
	if off, ok, err = r.nextOffset(); !ok {
		return 0, nil, false, err
	}
	if enc, err = r.addVector(nil); err != nil {
		return 0, nil, false, err
	}
	return off, enc, true, nil
}

// nextOffset returns the next entry's offset and leaves the reader at its
// Vector, which addVector must read next; false at the end of the group
// or on an error. With addVector it reads an entry once where next, which
// hands out the encoded Vector, reads it and its caller again.
func (r *groupReader) nextOffset() (off int, ok bool, err error) {
	if len(r.b) == 0 {
		return 0, false, nil
	}
	off = int(r.b[0])
	if off >= 1<<groupBits || off <= r.prev {
		return 0, false, fmt.Errorf("bucket group offset %d after %d: %w", off, r.prev, errCorrupt)
	}
	r.b, r.prev = r.b[1:], off
	return off, true, nil
}

// addVector adds the Vector of the entry nextOffset returned to *v (only
// reads it when v is nil) and returns its encoding. On an error *v may
// hold part of it.
func (r *groupReader) addVector(v *Vector) ([]byte, error) {
	n, err := addSparse(v, r.b)
	if err != nil {
		return nil, fmt.Errorf("bucket group offset %d: %w", r.prev, err)
	}
	enc := r.b[:n]
	r.b = r.b[n:]
	return enc, nil
}
