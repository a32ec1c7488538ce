package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
)

// Key layout. Every key starts with a one-byte prefix naming its kind; the
// prefixes sort the kinds apart so each can be scanned or range-deleted on
// its own.
//
//	m <name>                                  meta value (clock, history start)
//	o <topic> 0x00 <partition u32>            next offset to read (u64)
//	c <scope u32> <name> 0x00 <label>         process counter (Vector, merged)
//	d <dimension> 0x00 <value>                dictionary id of a value (u32)
//	e <partition u32> <entity>                entity state (Entity)
//	B <group i64> <segment>                   a segment's buckets group*64 … group*64+63 (bucket group, merged)
//	t <segment>                               all-time totals (Vector, merged)
//	h <step u8>                               time-to-convert histogram (Vector, merged)
//	g <segment>                               segment status (Vector)
//
// Buckets are keyed time-major so that moving a window edge is one scan over
// a few buckets of every segment, and retention is one range deletion. A
// key holds a group of 64 consecutive buckets of one segment (a bucket
// group, see appendGroupEntry): at a few events per segment and minute, a
// key per bucket made Pebble write, flush and compact a key per increment,
// which was most of a replay's CPU (docs/performance.md). Stores of earlier
// versions keyed each bucket on its own under prefix b; Open converts them.
// Integers are big-endian; signed ones have their sign bit flipped so that
// byte order equals numeric order.
const (
	prefixMeta    = 'm'
	prefixOffset  = 'o'
	prefixCounter = 'c'
	prefixDict    = 'd'
	prefixEntity  = 'e'
	prefixBucket  = 'B'
	// prefixLegacyBucket keyed one bucket of one segment (b <bucket i64>
	// <segment>, a Vector); only the conversion in Open reads it.
	prefixLegacyBucket = 'b'
	prefixTotals       = 't'
	prefixHist         = 'h'
	prefixStatus       = 'g'
)

// GlobalScope is the counter scope of counters that belong to no partition.
const GlobalScope = math.MaxUint32

// Segment is the encoded identity of one segment of one breakdown: the
// breakdown's index followed by the dictionary id of each of its dimensions'
// values. It is opaque to the store and compared as bytes.
type Segment string

// MakeSegment encodes a segment of breakdown b with the given value ids.
func MakeSegment(b int, ids []uint32) Segment {
	buf := make([]byte, 1, 1+4*len(ids))
	buf[0] = byte(b)
	for _, id := range ids {
		buf = binary.BigEndian.AppendUint32(buf, id)
	}
	return Segment(buf)
}

// Breakdown returns the breakdown index of s.
func (s Segment) Breakdown() int { return int(s[0]) }

// IDs returns the value ids of s.
func (s Segment) IDs() []uint32 {
	ids := make([]uint32, 0, (len(s)-1)/4)
	for i := 1; i+4 <= len(s); i += 4 {
		ids = append(ids, binary.BigEndian.Uint32([]byte(s[i:i+4])))
	}
	return ids
}

func validSegment(b []byte) bool { return len(b) >= 1 && (len(b)-1)%4 == 0 }

func appendI64(dst []byte, x int64) []byte {
	return binary.BigEndian.AppendUint64(dst, uint64(x)^(1<<63))
}

func readI64(b []byte) int64 { return int64(binary.BigEndian.Uint64(b) ^ (1 << 63)) }

func metaKey(name string) []byte { return append([]byte{prefixMeta}, name...) }

func offsetKey(topic string, partition int) []byte {
	k := append([]byte{prefixOffset}, topic...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint32(k, uint32(partition))
}

func counterKey(scope uint32, name, label string) []byte {
	k := binary.BigEndian.AppendUint32([]byte{prefixCounter}, scope)
	k = append(k, name...)
	k = append(k, 0)
	return append(k, label...)
}

func dictKey(dim, value string) []byte {
	k := append([]byte{prefixDict}, dim...)
	k = append(k, 0)
	return append(k, value...)
}

// AppendEntityKey appends the key of an entity's state to dst.
func AppendEntityKey(dst []byte, partition int, entity []byte) []byte {
	dst = append(dst, prefixEntity)
	dst = binary.BigEndian.AppendUint32(dst, uint32(partition))
	return append(dst, entity...)
}

// groupBits is log2 of the buckets in a bucket group.
const groupBits = 6

// groupOf returns the group of a bucket and the bucket's offset in it.
// The shift rounds down, so negative buckets group like positive ones.
func groupOf(bucket int64) (int64, int) { return bucket >> groupBits, int(bucket & (1<<groupBits - 1)) }

func groupKey(group int64, seg Segment) []byte {
	k := appendI64(append(make([]byte, 0, 9+len(seg)), prefixBucket), group)
	return append(k, seg...)
}

func parseGroupKey(k []byte) (int64, []byte, error) {
	if len(k) < 9 || k[0] != prefixBucket || !validSegment(k[9:]) {
		return 0, nil, fmt.Errorf("bucket key %x: %w", k, errCorrupt)
	}
	return readI64(k[1:9]), k[9:], nil
}

func parseLegacyBucketKey(k []byte) (int64, []byte, error) {
	if len(k) < 9 || k[0] != prefixLegacyBucket || !validSegment(k[9:]) {
		return 0, nil, fmt.Errorf("legacy bucket key %x: %w", k, errCorrupt)
	}
	return readI64(k[1:9]), k[9:], nil
}

func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}
