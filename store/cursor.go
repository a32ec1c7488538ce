package store

import (
	"fmt"
	"math"

	"github.com/cockroachdb/pebble/v2"
)

// BucketCursor walks the buckets of every segment in [lo, hi] in bucket
// order, one key at a time, so that a caller can consume them in steps
// (up to one bucket, then up to the next) with one Pebble iterator. Moving
// every window of a flush by many buckets takes one cursor per window edge
// instead of one iterator per edge and bucket.
type BucketCursor struct {
	iter   *pebble.Iterator
	valid  bool
	bucket int64
	seg    []byte
	vec    Vector
	err    error
}

// NewBucketCursor returns a cursor on the first bucket key in [lo, hi]. It
// reads a consistent view: what was committed when it was made.
func (s *Store) NewBucketCursor(lo, hi int64) (*BucketCursor, error) {
	c := &BucketCursor{}
	if hi < lo {
		return c, nil
	}
	opts := &pebble.IterOptions{LowerBound: bucketKey(lo, ""), UpperBound: []byte{prefixBucket + 1}}
	if hi < math.MaxInt64 {
		opts.UpperBound = bucketKey(hi+1, "")
	}
	iter, err := s.db.NewIter(opts)
	if err != nil {
		return nil, fmt.Errorf("scan buckets: %w", err)
	}
	c.iter = iter
	c.valid = iter.First()
	c.load()
	return c, nil
}

func (c *BucketCursor) load() {
	if !c.valid {
		return
	}
	b, seg, err := parseBucketKey(c.iter.Key())
	if err == nil {
		var v []byte
		if v, err = c.iter.ValueAndErr(); err == nil {
			c.vec, err = DecodeVector(c.vec[:0], v)
		}
	}
	if err != nil {
		c.err = fmt.Errorf("bucket %x: %w", c.iter.Key(), err)
		c.valid = false
		return
	}
	c.bucket, c.seg = b, seg
}

// Valid reports whether the cursor is on a key; false at the end or after
// an error (see Close).
func (c *BucketCursor) Valid() bool { return c.valid }

// Bucket returns the bucket of the current key.
func (c *BucketCursor) Bucket() int64 { return c.bucket }

// Segment returns the segment of the current key; it is only valid until
// Next.
func (c *BucketCursor) Segment() []byte { return c.seg }

// Vector returns the counters of the current key; it is only valid until
// Next.
func (c *BucketCursor) Vector() Vector { return c.vec }

// Next moves to the next key.
func (c *BucketCursor) Next() {
	if !c.valid {
		return
	}
	c.valid = c.iter.Next()
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
