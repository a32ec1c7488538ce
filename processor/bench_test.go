package processor_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/processor/traffic"
	"github.com/funnelwatch/funnelwatch/store"
)

// The benchmarks of this file measure the processing core without Kafka:
// decoding, applying pre-decoded batches, flushing, rendering /metrics and
// restarting. Their input is the traffic model of `funnelwatch bench` (see
// docs/performance.md): the first poolEvents records of five weeks of
// traffic, about 1.2 million distinct entities.
//
//	go test ./processor -run '^$' -bench . -benchtime 10s
//
// Timings depend on the machine and on what else runs on it: compare runs
// side by side (benchstat), never with fixed thresholds.

const (
	// poolEvents and poolScale give the default benchmark of
	// `funnelwatch bench`: 2M records over five weeks of event time.
	poolEvents = 2_000_000
	poolScale  = 0.34
	poolSpan   = 35 * 24 * time.Hour
)

// poolStart is a fixed Monday, so that every run sees the same records.
var poolStart = time.Date(2026, 9, 7, 0, 0, 0, 0, time.UTC)

// eventPool holds decoded records in a compact form without pointers (so
// that the garbage collector does not scan two million of them), from which
// batches are filled without allocating.
type eventPool struct {
	events   []poolEvent
	entities []byte   // entity ids, back to back
	dims     [][]byte // distinct dimension values; index 0 is absent
	distinct int      // distinct entities
	span     int64    // event time covered, ms
}

type poolEvent struct {
	entOff  uint32
	entLen  uint16
	stage   uint8
	reason  processor.Reason
	hasID   bool
	invalid uint8
	dims    [2]uint8
	id      uint64
	time    int64
	value   int64
}

var (
	poolOnce sync.Once
	pool     *eventPool
	poolErr  error
)

// benchConfig is the default configuration on the event clock (so that
// runs are reproducible), reading topic "events".
func benchConfig(tb testing.TB) processor.Config {
	tb.Helper()
	cfg := processor.DefaultConfig()
	cfg.Kafka.Topics = []processor.TopicConfig{{Name: "events"}}
	cfg.Time.Clock = processor.ClockEvent
	if err := cfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	return cfg
}

// loadPool generates and decodes the pool once per test binary.
func loadPool(tb testing.TB) *eventPool {
	tb.Helper()
	poolOnce.Do(func() { pool, poolErr = buildPool(benchConfig(tb), poolEvents) })
	if poolErr != nil {
		tb.Fatal(poolErr)
	}
	return pool
}

func buildPool(cfg processor.Config, n int) (*eventPool, error) {
	m, err := traffic.New(traffic.Config{Seed: traffic.DefaultSeed, Start: poolStart, Scale: poolScale, DuplicateRatio: traffic.DefaultDuplicateRatio})
	if err != nil {
		return nil, err
	}
	dec := processor.NewDecoder(&cfg)
	p := &eventPool{dims: [][]byte{nil}, events: make([]poolEvent, 0, n)}
	dimIndex := map[string]uint8{}
	seen := make(map[uint64]struct{}, n)
	var ev processor.Event
	var first int64
	errFull := fmt.Errorf("pool full")
	err = m.Generate(poolStart.Add(poolSpan), func(r traffic.Record) error {
		if len(p.events) == n {
			return errFull
		}
		pe := poolEvent{reason: dec.Decode(r.Value, -1, r.Time, &ev)}
		if pe.reason == processor.Applied {
			pe.entOff, pe.entLen = uint32(len(p.entities)), uint16(len(ev.Entity))
			p.entities = append(p.entities, ev.Entity...)
			seen[xxhash.Sum64(ev.Entity)] = struct{}{}
			pe.stage, pe.hasID, pe.id, pe.time, pe.value = uint8(ev.Stage), ev.HasID, ev.ID, ev.Time, ev.Value
			pe.invalid = uint8(ev.Invalid)
			for i, d := range ev.Dims {
				if d == nil {
					continue
				}
				k, ok := dimIndex[string(d)]
				if !ok {
					k = uint8(len(p.dims))
					dimIndex[string(d)] = k
					p.dims = append(p.dims, slices.Clone(d))
				}
				pe.dims[i] = k
			}
			if first == 0 {
				first = pe.time
			}
			p.span = max(p.span, pe.time-first)
		}
		p.events = append(p.events, pe)
		return nil
	})
	if err != nil && err != errFull {
		return nil, err
	}
	p.distinct = len(seen)
	return p, nil
}

// feeder fills batches from the pool, cycling through it. Each cycle
// continues the previous one in event time, with other entity and event
// ids, so that a long benchmark is a long stream of the model's traffic:
// new entities keep coming, come back over their lifecycle, and expire.
type feeder struct {
	pool     *eventPool
	entities []byte // the pool's, with a mark of the cycle
	batch    processor.Batch
	dims     [][2][]byte
	i        int   // next pool event
	cycle    int64 // completed cycles
	offset   int64 // next offset
	shift    int64 // ms added per cycle
}

func newFeeder(p *eventPool, size int) *feeder {
	f := &feeder{pool: p, entities: slices.Clone(p.entities), dims: make([][2][]byte, size), shift: p.span + time.Minute.Milliseconds()}
	f.batch = processor.Batch{Topic: "events", Records: make([]processor.Record, 0, size)}
	return f
}

// remappedPool returns a copy of p whose entity ids are folded onto n
// distinct ones (same length, so that the key sizes stay the model's),
// keeping each entity's events together.
func remappedPool(p *eventPool, n int) *eventPool {
	q := *p
	q.entities = slices.Clone(p.entities)
	seen := map[uint64]struct{}{}
	for _, pe := range p.events {
		if pe.entLen == 0 {
			continue
		}
		id := q.entities[pe.entOff : pe.entOff+uint32(pe.entLen)]
		k := xxhash.Sum64(p.entities[pe.entOff:pe.entOff+uint32(pe.entLen)]) % uint64(n)
		// "u-" and then the folded id in hex, padded to the id's length.
		for i := len(id) - 1; i >= 2; i-- {
			id[i] = "0123456789abcdef"[k&15]
			k >>= 4
		}
		seen[xxhash.Sum64(id)] = struct{}{}
	}
	q.distinct = len(seen)
	return &q
}

// add appends the next record; it reports whether the batch is full.
func (f *feeder) add() bool {
	pe := &f.pool.events[f.i]
	n := len(f.batch.Records)
	f.batch.Records = f.batch.Records[:n+1]
	r := &f.batch.Records[n]
	r.Offset, r.Reason = f.offset, pe.reason
	f.offset++
	if pe.reason == processor.Applied {
		d := &f.dims[n]
		d[0], d[1] = f.pool.dims[pe.dims[0]], f.pool.dims[pe.dims[1]]
		r.Event = processor.Event{
			Stage:   int(pe.stage),
			Entity:  f.entities[pe.entOff : pe.entOff+uint32(pe.entLen)],
			ID:      pe.id ^ uint64(f.cycle),
			HasID:   pe.hasID,
			Time:    pe.time + f.cycle*f.shift,
			Value:   pe.value,
			Dims:    d[:],
			Invalid: uint32(pe.invalid),
		}
	}
	if f.i++; f.i == len(f.pool.events) {
		f.i = 0
		f.cycle++
		// The model's entity ids all start with "u-": another first
		// letter per cycle makes them new without moving them.
		mark := byte('a' + f.cycle%20)
		for _, pe := range f.pool.events {
			if pe.entLen > 0 {
				f.entities[pe.entOff] = mark
			}
		}
	}
	return len(f.batch.Records) == cap(f.batch.Records)
}

func (f *feeder) reset() { f.batch.Records = f.batch.Records[:0] }

// apply feeds n records in batches of the feeder's size.
func (f *feeder) apply(p *processor.Processor, n int) {
	for range n {
		if f.add() {
			p.ApplyBatch(&f.batch)
			f.reset()
		}
	}
	if len(f.batch.Records) > 0 {
		p.ApplyBatch(&f.batch)
		f.reset()
	}
}

// diskStore opens a store in a temporary directory: Pebble's in-memory
// file system grows its files by copying, which would dominate a flush.
func diskStore(tb testing.TB) *store.Store {
	tb.Helper()
	st, err := store.Open(tb.TempDir(), store.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	return st
}

// BenchmarkDecode decodes the model's records (JSON to Event), one record
// per iteration.
func BenchmarkDecode(b *testing.B) {
	cfg := benchConfig(b)
	m, err := traffic.New(traffic.Config{Seed: traffic.DefaultSeed, Start: poolStart, Scale: poolScale, DuplicateRatio: traffic.DefaultDuplicateRatio})
	if err != nil {
		b.Fatal(err)
	}
	type raw struct {
		value []byte
		time  time.Time
	}
	var recs []raw
	if err := m.Generate(poolStart.Add(3*24*time.Hour), func(r traffic.Record) error {
		recs = append(recs, raw{slices.Clone(r.Value), r.Time})
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	dec := processor.NewDecoder(&cfg)
	var ev processor.Event
	var n, size int
	b.ReportAllocs()
	for b.Loop() {
		r := &recs[n%len(recs)]
		if dec.Decode(r.value, -1, r.time, &ev) != processor.Applied {
			b.Fatal("record not applied")
		}
		size += len(r.value)
		n++
	}
	b.SetBytes(int64(size / n))
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkApply measures the processing core: ApplyBatch over pre-decoded
// batches of 2048 records (the consumer's batch size), with a Flush every
// flush_interval of real time as Processor.Run does, on a store on disk.
// One iteration is one record.
//
// The entities=N cases fold the model's entity ids onto N distinct ones
// and apply up to two pool cycles' worth of records before timing, so that
// every entity exists when the timed records come (the pool holds about
// 1.2 million distinct entities in 2 million records). The default
// store.entity_cache (500,000) holds the smaller cases entirely; with 1M
// entities, cache=all holds every entity in memory, which isolates the
// cost of reading evicted entities back from the store.
//
// The records replay five weeks of event time about 10,000 times faster
// than real time on the event clock, so every flush also steps the
// alerting windows through thousands of bucket boundaries (see
// docs/performance.md): this is the catch-up case, the most expensive one.
func BenchmarkApply(b *testing.B) {
	p := loadPool(b)
	b.Logf("pool: %d records, %d distinct entities, %s of event time", len(p.events), p.distinct, time.Duration(p.span)*time.Millisecond)
	for _, bc := range []struct {
		name     string
		entities int
		cache    int
	}{
		{"entities=10k", 10_000, 0},
		{"entities=100k", 100_000, 0},
		{"entities=1M", 1_000_000, 0},
		{"entities=1M/cache=all", 1_000_000, 4 << 20},
	} {
		b.Run(bc.name, func(b *testing.B) {
			cfg := benchConfig(b)
			if bc.cache > 0 {
				cfg.Store.EntityCache = bc.cache
			}
			proc, err := processor.New(cfg, diskStore(b), processor.Options{})
			if err != nil {
				b.Fatal(err)
			}
			f := newFeeder(remappedPool(p, bc.entities), 2048)
			ctx := context.Background()
			// Warm up: every entity seen once, the cache full.
			for done := 0; done < min(len(p.events), 2*bc.entities); done += 100_000 {
				f.apply(proc, 100_000)
				if err := proc.Flush(ctx); err != nil {
					b.Fatal(err)
				}
			}
			interval := processor.D(cfg.FlushInterval)
			flushes := 0
			last := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				if !f.add() {
					continue
				}
				proc.ApplyBatch(&f.batch)
				f.reset()
				if time.Since(last) >= interval {
					if err := proc.Flush(ctx); err != nil {
						b.Fatal(err)
					}
					flushes++
					last = time.Now()
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
			b.ReportMetric(float64(flushes), "flushes")
		})
	}
}

// BenchmarkFlush measures one Flush after a flush interval's worth of
// records at a given rate, on a store holding the first week of the pool.
// One iteration is one flush; applying the records is not timed.
func BenchmarkFlush(b *testing.B) {
	p := loadPool(b)
	for _, perFlush := range []int{1_000, 10_000, 100_000} {
		b.Run("events="+strconv.Itoa(perFlush), func(b *testing.B) {
			cfg := benchConfig(b)
			proc, err := processor.New(cfg, diskStore(b), processor.Options{})
			if err != nil {
				b.Fatal(err)
			}
			f := newFeeder(p, 2048)
			ctx := context.Background()
			warm := len(p.events) / 5 // about a week
			for done := 0; done < warm; done += perFlush * 10 {
				f.apply(proc, perFlush*10)
				if err := proc.Flush(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				f.apply(proc, perFlush)
				b.StartTimer()
				if err := proc.Flush(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*perFlush), "ns/event")
		})
	}
}

// segmentsConfig is a configuration with 24 sources and 39 regions and
// every breakdown: (24+1)·(39+1) = 1000 segments.
func segmentsConfig(tb testing.TB) processor.Config {
	tb.Helper()
	cfg := benchConfig(tb)
	cfg.Segments.MaxValues = 100
	return cfg
}

const (
	segSources = 24
	segRegions = 39
)

// withSegments returns a processor with (segSources+1)·(segRegions+1)
// segments across every breakdown, each with 36 days of traffic.
func withSegments(tb testing.TB, reg prometheus.Registerer, segSources, segRegions int) *processor.Processor {
	tb.Helper()
	cfg := segmentsConfig(tb)
	proc, err := processor.New(cfg, diskStore(tb), processor.Options{Registerer: reg})
	if err != nil {
		tb.Fatal(err)
	}
	var sources, regions [][]byte
	for i := range segSources {
		sources = append(sources, []byte("source_"+strconv.Itoa(i)))
	}
	for i := range segRegions {
		regions = append(regions, []byte("region_"+strconv.Itoa(i)))
	}
	stages := len(cfg.Funnel.Stages)
	b := &processor.Batch{Topic: "events"}
	var off int64
	ctx := context.Background()
	start := poolStart.UnixMilli()
	const days = 36
	entity := 0
	for day := range days {
		b.Records = b.Records[:0]
		for s := range segSources {
			for r := range segRegions {
				// One visitor per segment and day, converting to
				// lead one day in two and to deal one day in four.
				entity++
				id := []byte("e-" + strconv.Itoa(entity))
				t := start + int64(day)*24*3600_000 + int64(s*segRegions+r)*1000
				for st := range stages {
					if st > 0 && (day+s+r)%(2*st) != 0 {
						break
					}
					b.Records = append(b.Records, processor.Record{Offset: off, Reason: processor.Applied, Event: processor.Event{
						Stage: st, Entity: id, Time: t + int64(st)*60_000, HasID: true, ID: uint64(off),
						Dims: [][]byte{sources[s], regions[r]},
					}})
					off++
				}
			}
		}
		proc.ApplyBatch(b)
		if err := proc.Flush(ctx); err != nil {
			tb.Fatal(err)
		}
	}
	if n := len(proc.Snapshot().Segments); n != (segSources+1)*(segRegions+1) {
		tb.Fatalf("%d segments; want %d", n, (segSources+1)*(segRegions+1))
	}
	return proc
}

// discardResponse is an http.ResponseWriter that counts the body.
type discardResponse struct {
	header http.Header
	n      int
}

func (d *discardResponse) Header() http.Header         { return d.header }
func (d *discardResponse) Write(b []byte) (int, error) { d.n += len(b); return len(b), nil }
func (d *discardResponse) WriteHeader(int)             {}

// BenchmarkCollect renders /metrics for 100 and 1000 segments across every
// breakdown (funnelwatch), next to client_golang exposing the same series
// as constant metrics built at scrape time (client_golang): the same
// registry, handler and text encoder, so the difference is what
// funnelwatch's Collector adds. One iteration is one scrape.
func BenchmarkCollect(b *testing.B) {
	for _, sc := range []struct{ sources, regions int }{{9, 9}, {segSources, segRegions}} {
		b.Run(fmt.Sprintf("segments=%d", (sc.sources+1)*(sc.regions+1)), func(b *testing.B) {
			benchmarkCollect(b, sc.sources, sc.regions)
		})
	}
}

func benchmarkCollect(b *testing.B, sources, regions int) {
	reg := prometheus.NewRegistry()
	withSegments(b, reg, sources, regions)
	mfs, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	base := prometheus.NewRegistry()
	c := newConstCollector(mfs)
	base.MustRegister(c)
	req, err := http.NewRequest(http.MethodGet, "/metrics", nil)
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		g    prometheus.Gatherer
	}{{"funnelwatch", reg}, {"client_golang", base}} {
		b.Run(bc.name, func(b *testing.B) {
			h := promhttp.HandlerFor(bc.g, promhttp.HandlerOpts{})
			w := &discardResponse{header: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				w.n = 0
				h.ServeHTTP(w, req)
			}
			b.ReportMetric(float64(c.series), "series")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*c.series), "ns/series")
			b.SetBytes(int64(w.n))
		})
	}
}

// constCollector exposes fixed series the way a typical exporter does:
// MustNewConstMetric for each series at every scrape.
type constCollector struct {
	series  int
	metrics []constSeries
}

type constSeries struct {
	desc   *prometheus.Desc
	typ    prometheus.ValueType
	value  float64
	labels []string
	hist   *dto.Histogram
}

func newConstCollector(mfs []*dto.MetricFamily) *constCollector {
	c := &constCollector{}
	for _, mf := range mfs {
		descs := map[string]*prometheus.Desc{}
		for _, m := range mf.GetMetric() {
			var names, values []string
			for _, lp := range m.GetLabel() {
				names = append(names, lp.GetName())
				values = append(values, lp.GetValue())
			}
			key := fmt.Sprint(names)
			d, ok := descs[key]
			if !ok {
				d = prometheus.NewDesc(mf.GetName(), mf.GetHelp(), names, nil)
				descs[key] = d
			}
			s := constSeries{desc: d, labels: values}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				s.typ, s.value = prometheus.CounterValue, m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				s.typ, s.value = prometheus.GaugeValue, m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				s.hist = m.GetHistogram()
			default:
				s.typ, s.value = prometheus.UntypedValue, m.GetUntyped().GetValue()
			}
			c.metrics = append(c.metrics, s)
			c.series++
		}
	}
	return c
}

func (c *constCollector) Describe(chan<- *prometheus.Desc) {}

func (c *constCollector) Collect(ch chan<- prometheus.Metric) {
	for i := range c.metrics {
		s := &c.metrics[i]
		if s.hist != nil {
			buckets := map[float64]uint64{}
			for _, bk := range s.hist.GetBucket() {
				buckets[bk.GetUpperBound()] = bk.GetCumulativeCount()
			}
			ch <- prometheus.MustNewConstHistogram(s.desc, s.hist.GetSampleCount(), s.hist.GetSampleSum(), buckets, s.labels...)
			continue
		}
		ch <- prometheus.MustNewConstMetric(s.desc, s.typ, s.value, s.labels...)
	}
}

// scrape renders the registry's per-segment series as the text format.
func scrape(tb testing.TB, g prometheus.Gatherer) string {
	tb.Helper()
	return exposition(tb, g, segmentSeries...)
}

// TestRestartServesSameMetrics checks that a processor reopened on a
// closed store serves exactly the per-segment series it served before,
// without reading any record again.
func TestRestartServesSameMetrics(t *testing.T) {
	p, err := buildPool(benchConfig(t), 100_000)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	want := buildStore(t, dir, p, len(p.events))
	got, _, _ := restart(t, dir)
	if got != want {
		t.Errorf("exposition after a restart differs:\n%s", diffLines(want, got))
	}
}

// buildStore applies the first n records of the pool to a store in dir,
// flushing once per 100,000 records, closes it and returns the exposition.
func buildStore(tb testing.TB, dir string, p *eventPool, n int) string {
	tb.Helper()
	st, err := store.Open(dir, store.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	proc, err := processor.New(benchConfig(tb), st, processor.Options{Registerer: reg})
	if err != nil {
		tb.Fatal(err)
	}
	f := newFeeder(p, 2048)
	for done := 0; done < n; done += 100_000 {
		f.apply(proc, min(100_000, n-done))
		if err := proc.Flush(context.Background()); err != nil {
			tb.Fatal(err)
		}
	}
	return scrape(tb, reg)
}

// restart opens the store in dir, builds a processor and scrapes it once,
// returning the exposition and the time from opening to the scrape's end;
// then it builds the entity filter, which New leaves to the consuming
// path, and returns the time that took too.
func restart(tb testing.TB, dir string) (exposition string, took, filter time.Duration) {
	tb.Helper()
	start := time.Now()
	st, err := store.Open(dir, store.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	proc, err := processor.New(benchConfig(tb), st, processor.Options{Registerer: reg})
	if err != nil {
		tb.Fatal(err)
	}
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	w := &discardResponse{header: http.Header{}}
	req, _ := http.NewRequest(http.MethodGet, "/metrics", nil)
	h.ServeHTTP(w, req)
	took = time.Since(start)
	start = time.Now()
	processor.LoadFilter(proc)
	filter = time.Since(start)
	return scrape(tb, reg), took, filter
}

// BenchmarkRestart measures the time from store.Open to the end of the
// first scrape, which must equal the last scrape before the restart, on a
// store holding the first week of the pool (history=1w, about 300,000
// entities) or all of it (history=5w: about 1.2 million entities and five
// weeks of buckets). One iteration is one restart; the store is built
// once, before timing. s/filter is the time the entity filter takes after
// that (New leaves it to the consuming path: Run builds it while /metrics
// already serves, and no record is applied before it is complete).
func BenchmarkRestart(b *testing.B) {
	p := loadPool(b)
	for _, hc := range []struct {
		name   string
		events int
	}{{"history=1w", len(p.events) / 5}, {"history=5w", len(p.events)}} {
		b.Run(hc.name, func(b *testing.B) {
			dir := b.TempDir()
			want := buildStore(b, dir, p, hc.events)
			st, err := store.Open(dir, store.Options{})
			if err != nil {
				b.Fatal(err)
			}
			size := st.DiskBytes()
			st.Close()
			entities := map[uint64]struct{}{}
			for _, pe := range p.events[:hc.events] {
				if pe.entLen > 0 {
					entities[xxhash.Sum64(p.entities[pe.entOff:pe.entOff+uint32(pe.entLen)])] = struct{}{}
				}
			}
			var total, filters time.Duration
			n := 0
			for b.Loop() {
				got, took, filter := restart(b, dir)
				if got != want {
					b.Fatalf("exposition after a restart differs:\n%s", diffLines(want, got))
				}
				total += took
				filters += filter
				n++
			}
			b.ReportMetric(total.Seconds()/float64(n), "s/restart")
			b.ReportMetric(filters.Seconds()/float64(n), "s/filter")
			// After the loop: b.Loop's first call clears reported metrics.
			b.ReportMetric(float64(size)/(1<<20), "store-MiB")
			b.ReportMetric(float64(len(entities)), "entities")
		})
	}
}

// BenchmarkEvaluate runs degradation and volume detection once over 100
// and 1000 segments (every breakdown) with the default three steps, two of
// them alerting with four baseline weeks: what a flush does at every
// bucket boundary on the event clock. One iteration is one evaluation of
// every segment.
func BenchmarkEvaluate(b *testing.B) {
	for _, sc := range []struct{ sources, regions int }{{9, 9}, {segSources, segRegions}} {
		segs := (sc.sources + 1) * (sc.regions + 1)
		b.Run(fmt.Sprintf("segments=%d", segs), func(b *testing.B) {
			proc := withSegments(b, nil, sc.sources, sc.regions)
			b.ReportAllocs()
			for b.Loop() {
				processor.Evaluate(proc)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*segs), "ns/segment")
		})
	}
}
