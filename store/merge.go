package store

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// vectorMerger adds Vectors, and bucket groups bucket by bucket. Addition
// is associative and commutative, so Pebble may combine operands in any
// grouping during reads and compactions.
//
// Every read of a bucket group, total or counter goes through a merge, most
// of them with a single operand: the merger keeps that operand's bytes as
// they are and only decodes when a second one comes, and its state is
// pooled (Finish hands it back through the Closer), so that a read
// allocates nothing.
//
// The name stays that of the first version, which only added Vectors:
// Pebble refuses to open a store with a merger of another name, and the
// keys of that version (Vectors under prefixLegacyBucket) still merge as
// they did until Open converts them.
var vectorMerger = &pebble.Merger{
	Name: "funnelwatch.vector_add.v1",
	Merge: func(key, value []byte) (pebble.ValueMerger, error) {
		if len(key) > 0 && key[0] == prefixBucket {
			m := groupAdderPool.Get().(*groupAdder)
			m.raw = append(m.raw[:0], value...)
			m.present = 0
			m.decoded = false
			return m, nil
		}
		m := adderPool.Get().(*vectorAdder)
		m.raw = append(m.raw[:0], value...)
		m.sum = m.sum[:0]
		m.decoded = false
		return m, nil
	},
}

var (
	adderPool      = sync.Pool{New: func() any { return &vectorAdder{} }}
	groupAdderPool = sync.Pool{New: func() any { return &groupAdder{} }}
)

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

// groupAdder adds bucket groups: the Vectors of the same offset add up, the
// others are kept.
type groupAdder struct {
	raw     []byte // the only operand so far, encoded, while !decoded
	decoded bool
	present uint64 // the offsets in sums
	sums    [1 << groupBits]Vector
	out     []byte
}

func (m *groupAdder) add(value []byte) error {
	if !m.decoded {
		if err := m.addGroup(m.raw); err != nil {
			return err
		}
		m.decoded = true
	}
	return m.addGroup(value)
}

func (m *groupAdder) addGroup(value []byte) error {
	r := newGroupReader(value)
	for {
		off, ok, err := r.nextOffset()
		if err != nil || !ok {
			return err
		}
		if m.present&(1<<off) == 0 {
			m.present |= 1 << off
			m.sums[off] = m.sums[off][:0]
		}
		if _, err := r.addVector(&m.sums[off]); err != nil {
			return err
		}
	}
}

func (m *groupAdder) MergeNewer(value []byte) error { return m.add(value) }
func (m *groupAdder) MergeOlder(value []byte) error { return m.add(value) }

func (m *groupAdder) Finish(bool) ([]byte, io.Closer, error) {
	if !m.decoded {
		return m.raw, m, nil
	}
	m.out = m.out[:0]
	for p := m.present; p != 0; p &= p - 1 {
		off := bits.TrailingZeros64(p)
		m.out = appendGroupEntry(m.out, off, m.sums[off])
	}
	return m.out, m, nil
}

// Close returns the merger to the pool once Pebble is done with the
// result of Finish.
func (m *groupAdder) Close() error {
	groupAdderPool.Put(m)
	return nil
}
