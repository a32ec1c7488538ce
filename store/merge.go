package store

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// vectorMerger adds Vectors. Addition is associative and commutative, so
// Pebble may combine operands in any grouping during reads and compactions.
//
// Every read of a bucket, total or counter goes through a merge, most of
// them with a single operand: the merger keeps that operand's bytes as
// they are and only decodes when a second one comes, and its state is
// pooled (Finish hands it back through the Closer), so that a read
// allocates nothing.
var vectorMerger = &pebble.Merger{
	Name: "funnelwatch.vector_add.v1",
	Merge: func(_, value []byte) (pebble.ValueMerger, error) {
		m := adderPool.Get().(*vectorAdder)
		m.raw = append(m.raw[:0], value...)
		m.sum = m.sum[:0]
		m.decoded = false
		return m, nil
	},
}

var adderPool = sync.Pool{New: func() any { return &vectorAdder{} }}

type vectorAdder struct {
	raw     []byte // the only operand so far, encoded, while !decoded
	sum     Vector
	decoded bool
	out     []byte
}

func (m *vectorAdder) add(value []byte) error {
	if !m.decoded {
		var err error
		if m.sum, err = DecodeVector(m.sum[:0], m.raw); err != nil {
			return err
		}
		m.decoded = true
	}
	return addEncoded(&m.sum, value)
}

// addEncoded adds the vector encoded in b to *v element-wise, growing *v to
// its length.
func addEncoded(v *Vector, b []byte) error {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > maxVectorLen {
		return fmt.Errorf("vector length: %w", errCorrupt)
	}
	b = b[k:]
	for uint64(len(*v)) < n {
		*v = append(*v, 0)
	}
	s := *v
	for i := range n {
		x, k := binary.Varint(b)
		if k <= 0 {
			return fmt.Errorf("vector element %d: %w", i, errCorrupt)
		}
		s[i] += x
		b = b[k:]
	}
	if len(b) != 0 {
		return fmt.Errorf("vector: %d trailing bytes: %w", len(b), errCorrupt)
	}
	return nil
}

func (m *vectorAdder) MergeNewer(value []byte) error { return m.add(value) }
func (m *vectorAdder) MergeOlder(value []byte) error { return m.add(value) }

func (m *vectorAdder) Finish(bool) ([]byte, io.Closer, error) {
	if !m.decoded {
		// A single operand is its own sum. A corrupt one goes through as
		// it is: every reader decodes what it reads and reports it.
		return m.raw, m, nil
	}
	m.out = AppendVector(m.out[:0], m.sum)
	return m.out, m, nil
}

// Close returns the merger to the pool once Pebble is done with the
// result of Finish.
func (m *vectorAdder) Close() error {
	adderPool.Put(m)
	return nil
}
