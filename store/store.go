// Package store owns funnelwatch's Pebble database: the key layout, the
// encodings of every value, and the batches that make a flush atomic.
//
// Everything a flush produces — bucket counters, totals, entity states,
// dictionary entries, process counters and the next offset of every
// partition — goes into one Batch and is committed at once, which is what
// makes the processor's state exactly-once across crashes.
//
// A Store is safe for concurrent use; a Batch is not.
package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	iofs "io/fs"
	"log/slog"
	"math"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Options configures Open.
type Options struct {
	// FS is the filesystem; nil means the OS filesystem. Tests use
	// vfs.NewMem().
	FS vfs.FS
	// Logger receives Pebble's messages; nil discards them.
	Logger *slog.Logger
	// CacheBytes is the size of Pebble's block cache; 0 means 32 MiB.
	CacheBytes int64
	// ReadOnly opens the store without writing to it (for inspect).
	ReadOnly bool
	// MinFreeBytes is the free space the store's filesystem must keep:
	// Open and Batch.Commit refuse with ErrNoSpace below it. 0 means
	// DefaultMinFreeBytes. Filesystems that cannot report their free space
	// (vfs.NewMem) are not checked.
	MinFreeBytes int64
}

// DefaultMinFreeBytes is the default Options.MinFreeBytes: room for a
// memtable flush (an sstable of up to the 32 MiB memtable) and the WAL of
// the next memtable.
const DefaultMinFreeBytes = 64 << 20

// ErrNoSpace is returned by Open and Batch.Commit while the store's
// filesystem has less free space than Options.MinFreeBytes. Nothing was
// written; the same commit can be retried once space returns.
//
// Pebble treats a failed WAL or MANIFEST write as fatal (its commit
// pipeline cannot recover in the process), and on a full disk its Open
// retries the flush of the recovered WAL forever. Refusing before Pebble
// writes turns a filling disk into a pause instead of a crash loop.
var ErrNoSpace = errors.New("not enough free disk space")

// Store is an open Pebble database with funnelwatch's key layout. Close it
// when done.
type Store struct {
	db      *pebble.DB
	dir     string
	fs      vfs.FS
	minFree uint64
}

// Open opens or creates the store in dir.
func Open(dir string, o Options) (*Store, error) {
	if o.CacheBytes == 0 {
		o.CacheBytes = 32 << 20
	}
	cache := pebble.NewCache(o.CacheBytes)
	defer cache.Unref()
	opts := &pebble.Options{
		FS:       o.FS,
		Cache:    cache,
		Merger:   vectorMerger,
		Logger:   pebbleLogger{o.Logger},
		ReadOnly: o.ReadOnly,
		// Two memtables of 32 MiB (the one written and the one being
		// flushed, or kept by Pebble for reuse) were a fifth of the heap
		// at the end of the default bench.
		MemTableSize: 16 << 20,
		// Every flush writes entity states keyed all over the key space,
		// so every L0 compaction rewrites most of the base level. Waiting
		// for more L0 sublevels than Pebble's four makes that rarer: eight
		// took 9% off the default bench's replay CPU with 32 MiB
		// memtables, and sixteen with 16 MiB ones keep that CPU for 30-45
		// MiB less peak RSS (docs/performance.md); a read checks up to
		// sixteen L0 tables, each behind a bloom filter. Writes stall at
		// 64 sublevels, above the threshold as Pebble requires.
		L0CompactionThreshold: 16,
		L0StopWritesThreshold: 64,
	}
	if o.FS == nil {
		opts.FS = vfs.Default
	}
	if o.MinFreeBytes <= 0 {
		o.MinFreeBytes = DefaultMinFreeBytes
	}
	s := &Store{dir: dir, fs: opts.FS, minFree: uint64(o.MinFreeBytes)}
	if !o.ReadOnly {
		if err := s.checkSpace(0); err != nil {
			return nil, fmt.Errorf("open store %q: %w", dir, err)
		}
	}
	// Most entity lookups are for entities seen for the first time: bloom
	// filters answer those without reading data blocks.
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("open store %q: %w", dir, err)
	}
	s.db = db
	if err := s.convertLegacyBuckets(o.ReadOnly, o.Logger, convertBatchBytes); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open store %q: %w", dir, err)
	}
	return s, nil
}

// convertBatchBytes is about the size of each batch the conversion of an
// earlier version's buckets commits.
const convertBatchBytes = 4 << 20

// convertLegacyBuckets rewrites the buckets of a store of an earlier
// version, one key per bucket, as bucket groups, in batches of about
// batchBytes. Each batch sets whole groups and deletes the legacy keys
// they came from, so a conversion that
// stops half way (a crash) goes on from where it stopped at the next Open.
// A read-only store cannot be converted and is refused.
func (s *Store) convertLegacyBuckets(readOnly bool, log *slog.Logger, batchBytes int) error {
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixLegacyBucket}, UpperBound: []byte{prefixLegacyBucket + 1}})
	if err != nil {
		return fmt.Errorf("convert buckets: %w", err)
	}
	defer iter.Close()
	if !iter.First() {
		return iter.Error()
	}
	if readOnly {
		return errors.New("the store holds buckets in the layout of an earlier version: open it read-write once (funnelwatch run) to convert them")
	}
	start := time.Now()
	var (
		groups  = map[string][]byte{} // segment -> value of the current group
		pending []string              // segments of groups, in the order met
		batch   = s.db.NewBatch()
		from    = []byte{prefixLegacyBucket} // the legacy keys the batch replaces start here
		group   int64
		size    int
		keys    int
		vec     Vector
	)
	defer func() { batch.Close() }()
	endGroup := func() {
		for _, seg := range pending {
			v := groups[seg]
			_ = batch.Set(groupKey(group, Segment(seg)), v, nil)
			size += len(v)
			delete(groups, seg)
		}
		pending = pending[:0]
	}
	// commit deletes the legacy keys from `from` to `to`, whose groups the
	// batch sets, and starts the next batch.
	commit := func(to []byte) error {
		_ = batch.DeleteRange(from, to, nil)
		if err := batch.Commit(pebble.Sync); err != nil {
			return fmt.Errorf("convert buckets: %w", err)
		}
		batch.Close()
		batch, from, size = s.db.NewBatch(), to, 0
		return nil
	}
	for ; iter.Valid(); iter.Next() {
		b, seg, err := parseLegacyBucketKey(iter.Key())
		if err != nil {
			return err
		}
		v, err := iter.ValueAndErr()
		if err == nil {
			vec, err = DecodeVector(vec[:0], v)
		}
		if err != nil {
			return fmt.Errorf("convert bucket %d: %w", b, err)
		}
		g, off := groupOf(b)
		if keys > 0 && g != group {
			endGroup()
			if size >= batchBytes {
				if err := commit(slices.Clone(iter.Key()[:9])); err != nil {
					return err
				}
			}
		}
		group = g
		val, ok := groups[string(seg)]
		if !ok {
			pending = append(pending, string(seg))
		}
		groups[string(seg)] = appendGroupEntry(val, off, vec)
		keys++
	}
	if err := iter.Error(); err != nil {
		return fmt.Errorf("convert buckets: %w", err)
	}
	endGroup()
	if err := commit([]byte{prefixLegacyBucket + 1}); err != nil {
		return err
	}
	if log != nil {
		log.Info("converted the store's buckets to bucket groups", "buckets", keys, "duration", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// checkSpace returns ErrNoSpace when writing n more bytes would leave less
// than the reserve free. The directory may not exist yet (first Open): its
// closest existing parent is on the same filesystem in every deployment
// that matters (a volume mounted at or above it).
func (s *Store) checkSpace(n int) error {
	path := s.dir
	for {
		u, err := s.fs.GetDiskUsage(path)
		switch {
		case err == nil:
			if u.AvailBytes < s.minFree+uint64(n) {
				return fmt.Errorf("%w: %d bytes free, %d needed (%d reserved for the store's own flushes)",
					ErrNoSpace, u.AvailBytes, s.minFree+uint64(n), s.minFree)
			}
			return nil
		case errors.Is(err, vfs.ErrUnsupported):
			return nil
		case errors.Is(err, iofs.ErrNotExist) && s.fs.PathDir(path) != path:
			path = s.fs.PathDir(path)
		default:
			// Not knowing the free space must not stop the store: Pebble
			// reports the write errors there are.
			return nil
		}
	}
}

// LowOnSpace reports whether less than the reserve is free on the store's
// disk: the next commit would fail with ErrNoSpace.
func (s *Store) LowOnSpace() bool { return errors.Is(s.checkSpace(0), ErrNoSpace) }

// Close flushes nothing (every Batch is committed synchronously) and
// releases the database.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close store %q: %w", s.dir, err)
	}
	return nil
}

// DiskBytes is the size of the store's files: sstables, write-ahead logs,
// manifests and options, as a directory listing shows them. Pebble's own
// DiskSpaceUsage is not used: it counts the live write-ahead log at the
// size it had when it was created, so a store that has not flushed a
// memtable yet reported a few KiB while holding tens of MiB. Directories
// (another store's, such as the scale-out segment store) are not counted.
// DiskBytes is safe for concurrent use.
func (s *Store) DiskBytes() uint64 {
	names, err := s.fs.List(s.dir)
	if err != nil {
		return s.db.Metrics().DiskSpaceUsage()
	}
	var n uint64
	for _, name := range names {
		fi, err := s.fs.Stat(s.fs.PathJoin(s.dir, name))
		if err != nil || fi.IsDir() {
			continue // removed since the listing (a compaction), or a directory
		}
		n += uint64(fi.Size())
	}
	return n
}

// Batch collects the writes of one flush. Commit applies all of them
// atomically or none. A Batch is not safe for concurrent use.
type Batch struct {
	s   *Store
	b   *pebble.Batch
	buf []byte

	// The bucket group AddBucket is filling, if groupOpen: its key, its
	// value, and the last bucket added to it.
	groupOpen bool
	groupKey  []byte
	groupVal  []byte
	groupLast int64
}

// NewBatch returns an empty batch.
func (s *Store) NewBatch() *Batch { return &Batch{s: s, b: s.db.NewBatch()} }

// Commit applies the batch durably (the WAL is synced) and closes it. It
// returns an error wrapping ErrNoSpace, having written nothing, while the
// filesystem is short of free space (see Options.MinFreeBytes).
func (b *Batch) Commit() error {
	defer b.b.Close()
	b.endGroup()
	if err := b.s.checkSpace(b.b.Len()); err != nil {
		return fmt.Errorf("commit batch: %w", err)
	}
	if err := b.b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("commit batch: %w", err)
	}
	return nil
}

// Close discards an uncommitted batch.
func (b *Batch) Close() { b.b.Close() }

// Len is the size of the batch in bytes.
func (b *Batch) Len() int {
	n := b.b.Len()
	if b.groupOpen {
		n += len(b.groupKey) + len(b.groupVal)
	}
	return n
}

func (b *Batch) vec(v Vector) []byte {
	b.buf = AppendVector(b.buf[:0], v)
	return b.buf
}

// SetOffset records the next offset to read of a partition.
func (b *Batch) SetOffset(topic string, partition int, next int64) {
	_ = b.b.Set(offsetKey(topic, partition), binary.BigEndian.AppendUint64(nil, uint64(next)), nil)
}

// AddCounter adds delta to a process counter.
func (b *Batch) AddCounter(scope uint32, name, label string, delta int64) {
	_ = b.b.Merge(counterKey(scope, name, label), b.vec(Vector{delta}), nil)
}

// SetDictValue assigns id to a value of a dimension.
func (b *Batch) SetDictValue(dim, value string, id uint32) {
	_ = b.b.Set(dictKey(dim, value), binary.BigEndian.AppendUint32(nil, id), nil)
}

// SetEntity stores the state of an entity.
func (b *Batch) SetEntity(partition int, entity []byte, e *Entity) {
	// Key and value share the scratch buffer: Set copies both.
	b.buf = AppendEntityKey(b.buf[:0], partition, entity)
	k := len(b.buf)
	b.buf = AppendEntity(b.buf, e)
	_ = b.b.Set(b.buf[:k], b.buf[k:], nil)
}

// DeleteEntity removes the state of an entity.
func (b *Batch) DeleteEntity(partition int, entity []byte) {
	_ = b.b.Delete(AppendEntityKey(nil, partition, entity), nil)
}

// AddBucket adds v to the counters of a segment's bucket.
//
// Consecutive calls for the same segment and bucket group (64 buckets, see
// the key layout) in increasing bucket order write one merge operand: a
// flush that adds its buckets segment by segment and in order per segment
// writes a key per segment and group instead of one per bucket. Any other
// order is correct too, at one operand per run.
func (b *Batch) AddBucket(bucket int64, seg Segment, v Vector) {
	g, off := groupOf(bucket)
	if !b.groupOpen || bucket <= b.groupLast || readI64(b.groupKey[1:9]) != g || string(b.groupKey[9:]) != string(seg) {
		b.endGroup()
		b.groupKey = appendI64(append(b.groupKey[:0], prefixBucket), g)
		b.groupKey = append(b.groupKey, seg...)
		b.groupOpen = true
	}
	b.groupVal = appendGroupEntry(b.groupVal, off, v)
	b.groupLast = bucket
}

// endGroup writes the bucket group AddBucket was filling.
func (b *Batch) endGroup() {
	if !b.groupOpen {
		return
	}
	// Merge copies key and value into the batch.
	_ = b.b.Merge(b.groupKey, b.groupVal, nil)
	b.groupOpen, b.groupVal = false, b.groupVal[:0]
}

// DeleteBucketsBefore deletes the buckets older than the given one, of
// every segment, a bucket group at a time: the buckets before it in its
// own group (up to 63) stay until a later call passes the group. Every
// reader reads a range of buckets, so they are never seen by one that
// starts at or after the given bucket.
func (b *Batch) DeleteBucketsBefore(bucket int64) {
	b.endGroup()
	g, _ := groupOf(bucket)
	_ = b.b.DeleteRange([]byte{prefixBucket}, groupKey(g, ""), nil)
}

// AddTotals adds v to a segment's all-time totals.
func (b *Batch) AddTotals(seg Segment, v Vector) {
	_ = b.b.Merge(append([]byte{prefixTotals}, seg...), b.vec(v), nil)
}

// AddHistogram adds v to the time-to-convert histogram of a step.
func (b *Batch) AddHistogram(step int, v Vector) {
	_ = b.b.Merge([]byte{prefixHist, byte(step)}, b.vec(v), nil)
}

// SetStatus stores a segment's status vector (its degradation flags).
func (b *Batch) SetStatus(seg Segment, v Vector) {
	_ = b.b.Set(append([]byte{prefixStatus}, seg...), b.vec(v), nil)
}

// SetMeta stores a named integer.
func (b *Batch) SetMeta(name string, x int64) {
	_ = b.b.Set(metaKey(name), appendI64(nil, x), nil)
}

// Meta returns a named integer and whether it is set.
func (s *Store) Meta(name string) (int64, bool, error) {
	v, closer, err := s.db.Get(metaKey(name))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("get meta %q: %w", name, err)
	}
	defer closer.Close()
	if len(v) != 8 {
		return 0, false, fmt.Errorf("meta %q: %w", name, errCorrupt)
	}
	return readI64(v), true, nil
}

// Entity reads the state of an entity into e and reports whether it exists.
// key is scratch space for the key; the possibly grown slice is returned.
func (s *Store) Entity(key []byte, partition int, entity []byte, e *Entity) ([]byte, bool, error) {
	key = AppendEntityKey(key[:0], partition, entity)
	v, closer, err := s.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return key, false, nil
	}
	if err != nil {
		return key, false, fmt.Errorf("get entity: %w", err)
	}
	defer closer.Close()
	return key, true, DecodeEntity(e, v)
}

// Offsets returns the next offset to read of every stored partition.
func (s *Store) Offsets() (map[TopicPartition]int64, error) {
	out := map[TopicPartition]int64{}
	err := s.scan([]byte{prefixOffset}, func(k, v []byte) error {
		k = k[1:]
		if len(k) < 5 || k[len(k)-5] != 0 || len(v) != 8 {
			return fmt.Errorf("offset key %x: %w", k, errCorrupt)
		}
		tp := TopicPartition{Topic: string(k[:len(k)-5]), Partition: int(binary.BigEndian.Uint32(k[len(k)-4:]))}
		out[tp] = int64(binary.BigEndian.Uint64(v))
		return nil
	})
	return out, err
}

// TopicPartition names a partition of a topic.
type TopicPartition struct {
	Topic     string
	Partition int
}

// Counters calls fn for every process counter.
func (s *Store) Counters(fn func(scope uint32, name, label string, value int64)) error {
	var vec Vector
	return s.scan([]byte{prefixCounter}, func(k, v []byte) error {
		k = k[1:]
		if len(k) < 5 {
			return fmt.Errorf("counter key %x: %w", k, errCorrupt)
		}
		scope := binary.BigEndian.Uint32(k)
		name, label, ok := cut(k[4:])
		var err error
		if vec, err = DecodeVector(vec[:0], v); err != nil || !ok || len(vec) != 1 {
			return fmt.Errorf("counter %x: %w", k, errCorrupt)
		}
		fn(scope, name, label, vec[0])
		return nil
	})
}

func cut(b []byte) (string, string, bool) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), string(b[i+1:]), true
		}
	}
	return "", "", false
}

// Dictionary calls fn for every dimension value with its id.
func (s *Store) Dictionary(fn func(dim, value string, id uint32)) error {
	return s.scan([]byte{prefixDict}, func(k, v []byte) error {
		dim, value, ok := cut(k[1:])
		if !ok || len(v) != 4 {
			return fmt.Errorf("dictionary key %x: %w", k, errCorrupt)
		}
		fn(dim, value, binary.BigEndian.Uint32(v))
		return nil
	})
}

// Totals calls fn for the all-time totals of every segment. v is only valid
// during the call.
func (s *Store) Totals(fn func(seg Segment, v Vector)) error {
	var vec Vector
	return s.scan([]byte{prefixTotals}, func(k, v []byte) error {
		var err error
		if !validSegment(k[1:]) {
			return fmt.Errorf("totals key %x: %w", k, errCorrupt)
		}
		if vec, err = DecodeVector(vec[:0], v); err != nil {
			return fmt.Errorf("totals %x: %w", k, err)
		}
		fn(Segment(k[1:]), vec)
		return nil
	})
}

// Statuses calls fn for the stored status of every segment.
func (s *Store) Statuses(fn func(seg Segment, v Vector)) error {
	var vec Vector
	return s.scan([]byte{prefixStatus}, func(k, v []byte) error {
		var err error
		if !validSegment(k[1:]) {
			return fmt.Errorf("status key %x: %w", k, errCorrupt)
		}
		if vec, err = DecodeVector(vec[:0], v); err != nil {
			return fmt.Errorf("status %x: %w", k, err)
		}
		fn(Segment(k[1:]), vec)
		return nil
	})
}

// Histograms calls fn for the time-to-convert histogram of every step.
func (s *Store) Histograms(fn func(step int, v Vector)) error {
	var vec Vector
	return s.scan([]byte{prefixHist}, func(k, v []byte) error {
		var err error
		if len(k) != 2 {
			return fmt.Errorf("histogram key %x: %w", k, errCorrupt)
		}
		if vec, err = DecodeVector(vec[:0], v); err != nil {
			return fmt.Errorf("histogram %x: %w", k, err)
		}
		fn(int(k[1]), vec)
		return nil
	})
}

// Buckets calls fn for every segment's bucket in [lo, hi]: group by group
// (64 buckets), within a group segment by segment in key order, and each
// segment's buckets in increasing order. A caller that needs every
// segment's bucket b before any bucket after b uses a BucketCursor. seg and
// v are only valid during the call.
func (s *Store) Buckets(lo, hi int64, fn func(bucket int64, seg []byte, v Vector)) error {
	var vec Vector
	return s.EncodedBuckets(lo, hi, func(b int64, seg, enc []byte) error {
		var err error
		if vec, err = DecodeBucketVector(vec, enc); err != nil {
			return fmt.Errorf("bucket %d: %w", b, err)
		}
		fn(b, seg, vec)
		return nil
	})
}

// EncodedBuckets is Buckets without decoding the vectors: fn gets each as
// DecodeBucketVector reads it, so that the caller can decode it elsewhere. seg
// and enc are only valid during the call; an error of fn ends the scan and
// is returned.
func (s *Store) EncodedBuckets(lo, hi int64, fn func(bucket int64, seg, enc []byte) error) error {
	iter, err := s.groupIter(lo, hi)
	if err != nil || iter == nil {
		return err
	}
	for iter.First(); iter.Valid(); iter.Next() {
		if err := visitGroup(iter, lo, hi, fn); err != nil {
			iter.Close()
			return err
		}
	}
	if err := iter.Close(); err != nil {
		return fmt.Errorf("scan buckets: %w", err)
	}
	return nil
}

// groupIter returns an iterator over the bucket groups holding [lo, hi],
// or nil when the range is empty.
func (s *Store) groupIter(lo, hi int64) (*pebble.Iterator, error) {
	if hi < lo {
		return nil, nil
	}
	glo, _ := groupOf(lo)
	ghi, _ := groupOf(hi)
	upper := []byte{prefixBucket + 1}
	if ghi < math.MaxInt64 {
		upper = groupKey(ghi+1, "")
	}
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: groupKey(glo, ""), UpperBound: upper})
	if err != nil {
		return nil, fmt.Errorf("scan buckets: %w", err)
	}
	return iter, nil
}

// visitGroup calls fn for the buckets in [lo, hi] of the group under iter.
func visitGroup(iter *pebble.Iterator, lo, hi int64, fn func(bucket int64, seg, enc []byte) error) error {
	g, seg, err := parseGroupKey(iter.Key())
	if err != nil {
		return err
	}
	v, err := iter.ValueAndErr()
	if err != nil {
		return fmt.Errorf("bucket group %d: %w", g, err)
	}
	r := newGroupReader(v)
	for {
		off, enc, ok, err := r.next()
		if err != nil {
			return fmt.Errorf("bucket group %d: %w", g, err)
		}
		if !ok {
			return nil
		}
		b := g<<groupBits | int64(off)
		if b < lo || b > hi {
			continue
		}
		if err := fn(b, seg, enc); err != nil {
			return err
		}
	}
}

// Entities calls fn for entity states in key order, starting at the key
// after `after` (nil: the first), until fn returns false or limit entities
// were visited. It returns the key of the last visited entity, or nil when
// the scan reached the end.
func (s *Store) Entities(after []byte, limit int, fn func(key []byte, partition int, entity []byte, e *Entity) bool) ([]byte, error) {
	lower := []byte{prefixEntity}
	if after != nil {
		lower = append(slices.Clip(after), 0)
	}
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: []byte{prefixEntity + 1}})
	if err != nil {
		return nil, fmt.Errorf("scan entities: %w", err)
	}
	var e Entity
	var last []byte
	n := 0
	for iter.First(); iter.Valid() && n < limit; iter.Next() {
		k := iter.Key()
		if len(k) < 5 {
			iter.Close()
			return nil, fmt.Errorf("entity key %x: %w", k, errCorrupt)
		}
		v, err := iter.ValueAndErr()
		if err == nil {
			err = DecodeEntity(&e, v)
		}
		if err != nil {
			iter.Close()
			return nil, fmt.Errorf("entity %x: %w", k, err)
		}
		n++
		last = append(last[:0], k...)
		if !fn(k, int(binary.BigEndian.Uint32(k[1:5])), k[5:], &e) {
			break
		}
	}
	reachedEnd := !iter.Valid()
	if err := iter.Close(); err != nil {
		return nil, fmt.Errorf("scan entities: %w", err)
	}
	if reachedEnd && n < limit {
		return nil, nil
	}
	return last, nil
}

// EntityKeys calls fn with the key of every stored entity (as made by
// AppendEntityKey), stopping early when ctx is done. key is only valid
// during the call. It reads the store as of the call: entities stored
// meanwhile may be missed.
func (s *Store) EntityKeys(ctx context.Context, fn func(key []byte)) error {
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixEntity}, UpperBound: []byte{prefixEntity + 1}})
	if err != nil {
		return fmt.Errorf("scan entity keys: %w", err)
	}
	n := 0
	for iter.First(); iter.Valid(); iter.Next() {
		if n++; n%4096 == 0 && ctx.Err() != nil {
			iter.Close()
			return fmt.Errorf("scan entity keys: %w", ctx.Err())
		}
		fn(iter.Key())
	}
	if err := iter.Close(); err != nil {
		return fmt.Errorf("scan entity keys: %w", err)
	}
	return nil
}

func (s *Store) scan(prefix []byte, fn func(k, v []byte) error) error {
	iter, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return fmt.Errorf("scan %q: %w", prefix, err)
	}
	for iter.First(); iter.Valid(); iter.Next() {
		v, err := iter.ValueAndErr()
		if err == nil {
			err = fn(iter.Key(), v)
		}
		if err != nil {
			iter.Close()
			return err
		}
	}
	if err := iter.Close(); err != nil {
		return fmt.Errorf("scan %q: %w", prefix, err)
	}
	return nil
}

// pebbleLogger sends Pebble's messages to slog at debug (info) and error
// level; Pebble logs every flush and compaction at info, which is noise for
// an operator.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	if p.l != nil {
		p.l.Debug(fmt.Sprintf(format, args...), "component", "pebble")
	}
}

func (p pebbleLogger) Errorf(format string, args ...any) {
	if p.l != nil {
		p.l.Error(fmt.Sprintf(format, args...), "component", "pebble")
	}
}

// Fatalf logs and panics: Pebble calls it on errors it cannot recover from
// in the process (a failed WAL or MANIFEST write), and it must not return,
// or Pebble would report a failed commit as done. The process ends; a
// restart resumes exactly from what the store holds.
func (p pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if p.l != nil {
		p.l.Error("store failed; exiting", "component", "pebble", "err", msg)
	}
	panic("pebble: " + msg)
}
