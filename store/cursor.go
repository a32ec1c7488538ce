package store

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// BucketCursor walks the buckets of every segment in [lo, hi] in bucket
// order, so that a caller can consume them in steps (up to one bucket,
// then up to the next) with one Pebble iterator. Moving every window of a
// flush by many buckets takes one cursor per window edge instead of one
// iterator per edge and bucket.
//
// A bucket group (64 buckets of one segment) is one key, so the cursor
// reads every segment's key of a group and hands out their buckets sorted
// by bucket; it holds one group of every segment at a time.
type BucketCursor struct {
	iter   *pebble.Iterator
	lo, hi int64
	valid  bool
	err    error

	// The current group's buckets in bucket order, entries[i] current;
	// their segments and encoded vectors are in segs and encs.
	entries []cursorEntry
	i       int
	segs    []byte
	encs    []byte
	vec     Vector
}

type cursorEntry struct {
	bucket         int64
	segFrom, segTo int
	encFrom, encTo int
	order          int // position in the group's keys, for a stable sort
}

// NewBucketCursor returns a cursor on the first bucket in [lo, hi]. It
// reads a consistent view: what was committed when it was made.
func (s *Store) NewBucketCursor(lo, hi int64) (*BucketCursor, error) {
	c := &BucketCursor{lo: lo, hi: hi}
	iter, err := s.groupIter(lo, hi)
	if err != nil || iter == nil {
		return c, err
	}
	c.iter = iter
	if iter.First() {
		c.fill()
	}
	c.load()
	return c, nil
}

// fill reads the group under the iterator and the keys of the same group
// after it, leaving the iterator on the next group's first key or past the
// end.
func (c *BucketCursor) fill() {
	c.entries, c.segs, c.encs, c.i = c.entries[:0], c.segs[:0], c.encs[:0], 0
	g, _, err := parseGroupKey(c.iter.Key())
	for err == nil {
		err = visitGroup(c.iter, c.lo, c.hi, func(b int64, seg, enc []byte) error {
			e := cursorEntry{bucket: b, segFrom: len(c.segs), encFrom: len(c.encs), order: len(c.entries)}
			c.segs = append(c.segs, seg...)
			c.encs = append(c.encs, enc...)
			e.segTo, e.encTo = len(c.segs), len(c.encs)
			c.entries = append(c.entries, e)
			return nil
		})
		if err != nil || !c.iter.Next() {
			break
		}
		var next int64
		if next, _, err = parseGroupKey(c.iter.Key()); err == nil && next != g {
			break
		}
	}
	if err != nil {
		c.err = err
		return
	}
	slices.SortFunc(c.entries, func(x, y cursorEntry) int {
		if x.bucket != y.bucket {
			return cmp.Compare(x.bucket, y.bucket)
		}
		return cmp.Compare(x.order, y.order)
	})
}

// load decodes the current entry, reading the next group when the current
// one is used up; it sets valid.
func (c *BucketCursor) load() {
	for c.err == nil && c.i == len(c.entries) && c.iter != nil && c.iter.Valid() {
		c.fill()
	}
	c.valid = c.err == nil && c.i < len(c.entries)
	if !c.valid {
		return
	}
	e := &c.entries[c.i]
	var err error
	if c.vec, err = DecodeBucketVector(c.vec, c.encs[e.encFrom:e.encTo]); err != nil {
		c.err = fmt.Errorf("bucket %d: %w", e.bucket, err)
		c.valid = false
	}
}

// Valid reports whether the cursor is on a bucket; false at the end or
// after an error (see Close).
func (c *BucketCursor) Valid() bool { return c.valid }

// Bucket returns the current bucket.
func (c *BucketCursor) Bucket() int64 { return c.entries[c.i].bucket }

// Segment returns the segment of the current bucket; it is only valid
// until Next.
func (c *BucketCursor) Segment() []byte {
	e := &c.entries[c.i]
	return c.segs[e.segFrom:e.segTo]
}

// Vector returns the counters of the current bucket; it is only valid
// until Next.
func (c *BucketCursor) Vector() Vector { return c.vec }

// Next moves to the next bucket.
func (c *BucketCursor) Next() {
	if !c.valid {
		return
	}
	c.i++
	c.load()
}

// Close releases the cursor and returns the first error it met.
func (c *BucketCursor) Close() error {
	if c.iter == nil {
		return c.err
	}
	err := c.iter.Close()
	c.iter = nil
	if c.err != nil {
		return c.err
	}
	if err != nil {
		return fmt.Errorf("scan buckets: %w", err)
	}
	return nil
}
