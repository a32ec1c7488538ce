package store_test

import (
	"math/rand/v2"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/store"
)

// BenchmarkEntityStates writes entity states the way flushes do, and
// nothing else: batches in key order, committed with a sync, of entities
// drawn from 1.26 million (the default bench's), on the OS filesystem so
// that memtable flushes and compactions run as they do in funnelwatch run.
// A batch holds 5,500 states (a catch-up flush of the default bench) or
// 600,000 (a one-second flush at 1.5 million events/s of the core
// benchmark's records, whose 1.5 million hold 612,000 entities).
// cpu-µs/state counts the whole process's CPU over the run, Pebble's
// background flushes and compactions included: it is the store's floor
// for what processing spends per entity state (docs/performance.md).
func BenchmarkEntityStates(b *testing.B) {
	for _, n := range []int{5_500, 600_000} {
		b.Run("batch="+strconv.Itoa(n), func(b *testing.B) { benchEntityStates(b, n) })
	}
}

func benchEntityStates(b *testing.B, perBatch int) {
	const entities = 1_260_000
	st, err := store.Open(b.TempDir(), store.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = st.Close() }()
	// The keys, ids scattered over the key space, made and sorted before
	// the clock starts: a batch draws indices into them and sorts those.
	type key struct {
		part int
		id   []byte
	}
	keys := make([]key, entities)
	for n := range keys {
		keys[n] = key{n % 6, strconv.AppendInt([]byte("user-"), int64(n)*2654435761%1_000_000_007, 10)}
	}
	slices.SortFunc(keys, func(x, y key) int {
		if x.part != y.part {
			return x.part - y.part
		}
		return slices.Compare(x.id, y.id)
	})
	rng := rand.New(rand.NewPCG(1, 2))
	batch := make([]int, perBatch)
	e := store.Entity{Dims: []uint32{3, 17, 250}, Reached: []int64{0, store.NotReached, store.NotReached}}
	now := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	b.ReportAllocs()
	cpu0 := cpuTime(b)
	start := time.Now()
	states := 0
	for b.Loop() {
		for i := range batch {
			batch[i] = rng.IntN(entities)
		}
		slices.Sort(batch)
		wb := st.NewBatch()
		for _, n := range batch {
			now += 10
			e.LastSeen, e.Reached[0] = now, now-int64(rng.IntN(3_600_000))
			e.Seen = append(e.Seen[:0], rng.Uint64())
			wb.SetEntity(keys[n].part, keys[n].id, &e)
		}
		if err := wb.Commit(); err != nil {
			b.Fatal(err)
		}
		states += perBatch
	}
	b.ReportMetric(float64(states)/time.Since(start).Seconds(), "states/s")
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(time.Microsecond)/float64(states), "cpu-µs/state")
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
