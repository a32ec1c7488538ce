package processor

import (
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the processor's own instrumented metrics plus the Collector
// that renders its state at scrape time.
type metrics struct {
	p               *Processor
	flushDuration   prometheus.Histogram
	collectDuration prometheus.Histogram
	flushErrors     prometheus.Counter
	buildInfo       prometheus.Gauge
	descs           map[string]*prometheus.Desc // operational, by name
	seg             []segmentDescs              // per breakdown
	// keep, when set, selects the segments this process exports (the
	// scale-out mode exports each segment from one replica).
	keep func(breakdown string, labels []Label) bool
}

// segmentDescs are the per-segment descriptors of one breakdown: the same
// names for every breakdown, with that breakdown's dimension labels.
type segmentDescs struct {
	fam           [numSegFams]*prometheus.Desc
	timeToConvert *prometheus.Desc
	// order lists, per family, the positions of the descriptor's variable
	// labels (breakdown, dimensions, then the family's own) in label-name
	// order: the order the registry sorts series by.
	order [numSegFams][]int
}

// segFam is a per-segment metric family but the time-to-convert
// histogram.
type segFam int

const (
	famWindowEvents segFam = iota
	famWindowEntities
	famWindowValue
	famFlowRatio
	famCohortEntered
	famCohortConverted
	famCohortRatio
	famBaseEntered
	famBaseConverted
	famBaseRatio
	famZscore
	famDegraded
	famVolBaseline
	famVolZ
	famVolDegraded
	famEventsTotal
	numSegFams
)

// segFams are the per-segment families' names, help and labels after the
// breakdown's dimensions.
var segFams = [numSegFams]struct {
	name, help string
	labels     []string
}{
	famWindowEvents:    {"funnel_window_events", "Accepted non-duplicate events of a stage with time in the window.", []string{"step", "window"}},
	famWindowEntities:  {"funnel_window_entities", "Entities that reached a stage in the window.", []string{"step", "window"}},
	famWindowValue:     {"funnel_window_value", "Sum of the value of a stage's events in the window.", []string{"step", "window"}},
	famFlowRatio:       {"funnel_window_conversion_ratio", "Flow ratio entities(to)/entities(from) over the window.", []string{"from", "to", "window"}},
	famCohortEntered:   {"funnel_cohort_entered", "Entities that entered the step's cohort in the window's mature entry buckets.", []string{"from", "to", "window"}},
	famCohortConverted: {"funnel_cohort_converted", "Cohort entities that converted within the step's horizon.", []string{"from", "to", "window"}},
	famCohortRatio:     {"funnel_cohort_conversion_ratio", "Cohort conversion ratio converted/entered.", []string{"from", "to", "window"}},
	famBaseEntered:     {"funnel_baseline_cohort_entered", "Cohort entered over the same window 1..K weeks earlier, pooled.", []string{"from", "to", "window"}},
	famBaseConverted:   {"funnel_baseline_cohort_converted", "Cohort converted over the same window 1..K weeks earlier, pooled.", []string{"from", "to", "window"}},
	famBaseRatio:       {"funnel_baseline_cohort_conversion_ratio", "Pooled baseline cohort conversion ratio.", []string{"from", "to", "window"}},
	famZscore:          {"funnel_conversion_zscore", "Two-proportion z-score of the cohort ratio against the baseline.", []string{"from", "to", "window"}},
	famDegraded:        {"funnel_conversion_degraded", "1 while the step's conversion is degraded for the segment.", []string{"from", "to", "window"}},
	famVolBaseline:     {"funnel_volume_baseline_entities", "Mean entities of the first stage over the same window 1..K weeks earlier.", []string{"step", "window"}},
	famVolZ:            {"funnel_volume_zscore", "Poisson z-score of the first stage's entities against the baseline.", []string{"step", "window"}},
	famVolDegraded:     {"funnel_volume_degraded", "1 while the first stage's volume is degraded for the segment.", []string{"step", "window"}},
	famEventsTotal:     {"funnel_events_total", "All-time accepted non-duplicate events of a stage.", []string{"step"}},
}

func newMetrics(p *Processor, o Options) *metrics {
	m := &metrics{
		p: p,
		flushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "funnel_flush_duration_seconds",
			Help:    "Time to write one flush to the store and move the windows.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		collectDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "funnel_collect_duration_seconds",
			Help:    "Time to render the per-segment series for one scrape.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		flushErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "funnel_store_write_errors_total",
			Help: "Flushes that failed to write to the store (consumption pauses until one succeeds).",
		}),
		buildInfo: prometheus.NewGauge(prometheus.GaugeOpts{
			Name:        "funnel_build_info",
			Help:        "Build information of the running funnelwatch.",
			ConstLabels: prometheus.Labels{"version": orDefault(o.Version, "dev"), "revision": orDefault(o.Revision, "unknown"), "goversion": runtime.Version()},
		}),
		descs: map[string]*prometheus.Desc{},
	}
	m.buildInfo.Set(1)
	for _, d := range []struct {
		name, help string
		labels     []string
	}{
		{"funnel_records_consumed_total", "Records consumed, whatever their outcome.", []string{"topic", "partition"}},
		{"funnel_events_applied_total", "Events applied to the state.", []string{"topic"}},
		{"funnel_events_invalid_total", "Invalid records, by reason.", []string{"reason"}},
		{"funnel_events_duplicate_total", "Events dropped because their id was seen before for the entity.", nil},
		{"funnel_events_late_total", "Events dropped because their bucket is older than the retention.", nil},
		{"funnel_dimension_overflow_total", "First touches whose new dimension value became \"other\" because the dimension was full.", []string{"dimension"}},
		{"funnel_consumer_lag_records", "Records between the next offset to apply and the partition's high watermark.", []string{"topic", "partition"}},
		{"funnel_stored_offset", "Next offset to read of a partition, as stored with the state.", []string{"topic", "partition"}},
		{"funnel_clock_timestamp_seconds", "The processor clock (now): the wall clock or the largest accepted event time.", nil},
		{"funnel_last_event_timestamp_seconds", "Event time of the newest accepted event.", nil},
		{"funnel_entities_tracked", "Entities with stored state.", nil},
		{"funnel_store_disk_bytes", "Disk space used by the store.", nil},
		{"funnel_memory_mapped_bytes", "Memory mapped outside the Go heap for the entity cache and the large evaluation columns: counted by process_resident_memory_bytes once written, not by go_memstats_*.", nil},
		{"funnel_consumption_paused", "1 while the last flush failed: consumption waits until a flush succeeds (the store's disk is full or failing, or the dead-letter topic cannot be written).", nil},
	} {
		m.descs[d.name] = prometheus.NewDesc(d.name, d.help, d.labels, nil)
	}
	for _, b := range p.cfg.Segments.Breakdowns {
		var d segmentDescs
		for f, sf := range segFams {
			labels := slices.Concat([]string{"breakdown"}, b, sf.labels)
			d.fam[f] = prometheus.NewDesc(sf.name, sf.help, labels, nil)
			order := make([]int, len(labels))
			for i := range order {
				order[i] = i
			}
			slices.SortFunc(order, func(i, j int) int { return strings.Compare(labels[i], labels[j]) })
			d.order[f] = order
		}
		d.timeToConvert = prometheus.NewDesc("funnel_time_to_convert_seconds",
			"Time from reaching a step's from stage to reaching its to stage, for conversions within the horizon.",
			slices.Concat([]string{"breakdown"}, b, []string{"from", "to"}), nil)
		m.seg = append(m.seg, d)
	}
	return m
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func (m *metrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.flushDuration, m.collectDuration, m.flushErrors, m.buildInfo, (*collector)(m)} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// collector renders the processor's state at scrape time. It is unchecked
// (Describe sends nothing) because the per-segment series of different
// breakdowns share names but not label names.
type collector metrics

func (c *collector) Describe(chan<- *prometheus.Desc) {}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	start := time.Now()
	m := (*metrics)(c)
	m.collectOperational(ch)
	m.collectSegments(ch)
	m.collectDuration.Observe(time.Since(start).Seconds())
}

func (m *metrics) collectOperational(ch chan<- prometheus.Metric) {
	p := m.p
	disk := float64(p.st.DiskBytes())
	p.mu.Lock()
	defer p.mu.Unlock()
	d := m.descs
	counter := func(name string, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d[name], prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d[name], prometheus.GaugeValue, v, labels...)
	}
	applied := map[string]int64{}
	var invalid [numReasons]int64
	var dup, late int64
	for _, t := range p.cfg.Kafka.Topics {
		applied[t.Name] = 0
	}
	for tp, part := range p.parts {
		ps := strconv.Itoa(tp.Partition)
		c := &part.counts
		counter("funnel_records_consumed_total", c.consumed, tp.Topic, ps)
		applied[tp.Topic] += c.applied
		dup += c.duplicate
		late += c.late
		for r := range invalid {
			invalid[r] += c.invalid[r]
		}
		if part.stored >= 0 {
			gauge("funnel_stored_offset", float64(part.stored), tp.Topic, ps)
		}
		if part.assigned && part.hwm >= 0 {
			lag := part.hwm - max(part.next, 0)
			gauge("funnel_consumer_lag_records", float64(max(lag, 0)), tp.Topic, ps)
		}
	}
	for t, v := range applied {
		counter("funnel_events_applied_total", v, t)
	}
	for _, r := range InvalidReasons() {
		counter("funnel_events_invalid_total", invalid[r], r.String())
	}
	counter("funnel_events_duplicate_total", dup)
	counter("funnel_events_late_total", late)
	for i, dim := range p.cfg.Segments.Dimensions {
		counter("funnel_dimension_overflow_total", p.overflow[i]+p.overflowDelta[i], dim)
	}
	gauge("funnel_clock_timestamp_seconds", float64(p.clockNow())/1000)
	gauge("funnel_last_event_timestamp_seconds", float64(p.lastEvent)/1000)
	gauge("funnel_entities_tracked", float64(p.entityCount))
	gauge("funnel_store_disk_bytes", disk)
	gauge("funnel_memory_mapped_bytes", float64(p.MappedBytes()))
	gauge("funnel_consumption_paused", b2f(p.stalled.Load()))
}

// collectSegments sends the per-segment series. The registry sorts each
// family's series by their label values before encoding them, and that
// sort took a third of a scrape of 1,000 segments when the series came in
// segment order. So they are sent family by family, already in the
// registry's order: each segment's values are read once into a row of
// slots (the layout follows the configuration, so it is the same for every
// segment), and each family's (segment, slot) pairs are sorted on integer
// ranks of their label values, which is much cheaper than the registry
// comparing strings; its own sort then finds them in order.
func (m *metrics) collectSegments(ch chan<- prometheus.Metric) {
	snap := m.p.Snapshot()
	bdIndex := map[string]int{}
	for i, b := range m.p.cfg.Segments.Breakdowns {
		bdIndex[BreakdownName(b)] = i
	}
	segs := snap.Segments
	if m.keep != nil {
		segs = slices.DeleteFunc(segs, func(s SegmentView) bool { return !m.keep(s.Breakdown, s.Labels) })
	}
	if len(segs) > 0 {
		if err := m.sendSorted(ch, snap, segs, bdIndex); err != nil {
			ch <- prometheus.NewInvalidMetric(m.seg[0].fam[famWindowEvents], err)
		}
	}

	// Time to convert is kept for the overall breakdown only: per segment it
	// would cost 16 series per step and segment.
	if all, ok := bdIndex["all"]; ok && (m.keep == nil || m.keep("all", nil)) {
		hist := m.p.histograms()
		for t, sc := range snap.Steps {
			h := hist[t]
			buckets := map[float64]uint64{}
			var cum uint64
			for i, ub := range ttcBounds {
				cum += uint64(h[i])
				buckets[ub] = cum
			}
			count := cum + uint64(h[len(ttcBounds)])
			sum := float64(h[len(ttcBounds)+1]) / 1000
			ch <- prometheus.MustNewConstHistogram(m.seg[all].timeToConvert, count, sum, buckets, "all", sc.From, sc.To)
		}
	}
}

// slot is one series of every segment's row: its family and the values of
// the family's own labels.
type slot struct {
	fam    segFam
	labels []string
}

// rows holds the values of every segment's series, one row of slots per
// segment.
type rows struct {
	layout   []slot
	inLayout bool // the row being put fills layout
	vals     []float64
	ok       []bool // false: the series is absent (a ratio of nothing)
	n        int    // slots put in the current row
	err      error
}

func (r *rows) put(f segFam, v float64, ok bool, labels ...string) {
	if r.inLayout {
		r.layout = append(r.layout, slot{f, slices.Clone(labels)})
		return
	}
	if r.n >= len(r.layout) || r.layout[r.n].fam != f {
		r.err = fmt.Errorf("per-segment series of segments differ in layout at slot %d", r.n)
		return
	}
	r.vals = append(r.vals, v)
	r.ok = append(r.ok, ok)
	r.n++
}

// row puts the series of segment s in a fixed order.
func (r *rows) row(snap *Snapshot, s *SegmentView) {
	r.n = 0
	for _, w := range s.Windows {
		for st, stage := range snap.Stages {
			r.put(famWindowEvents, float64(w.Events[st]), true, stage, w.Window)
			r.put(famWindowEntities, float64(w.Entities[st]), true, stage, w.Window)
			r.put(famWindowValue, w.Value[st], true, stage, w.Window)
		}
	}
	for _, f := range s.Flows {
		r.put(famFlowRatio, deref(f.Ratio), f.Ratio != nil, f.From, f.To, f.Window)
	}
	for _, c := range s.Cohorts {
		r.put(famCohortEntered, float64(c.Entered), true, c.From, c.To, c.Window)
		r.put(famCohortConverted, float64(c.Converted), true, c.From, c.To, c.Window)
		r.put(famCohortRatio, deref(c.Ratio), c.Ratio != nil, c.From, c.To, c.Window)
	}
	for _, a := range s.Alerts {
		if !slices.Contains(snap.Windows, a.Window) {
			// The alert window is not a configured window: export the
			// current cohort it is judged on anyway.
			r.put(famCohortEntered, float64(a.Entered), true, a.From, a.To, a.Window)
			r.put(famCohortConverted, float64(a.Converted), true, a.From, a.To, a.Window)
			r.put(famCohortRatio, deref(a.Ratio), a.Ratio != nil, a.From, a.To, a.Window)
		}
		base := a.BaselineEntered != nil
		r.put(famBaseEntered, float64(deref(a.BaselineEntered)), base, a.From, a.To, a.Window)
		r.put(famBaseConverted, float64(deref(a.BaselineConverted)), base, a.From, a.To, a.Window)
		r.put(famBaseRatio, deref(a.BaselineRatio), base && a.BaselineRatio != nil, a.From, a.To, a.Window)
		r.put(famZscore, deref(a.Z), a.Z != nil, a.From, a.To, a.Window)
		r.put(famDegraded, b2f(a.Degraded), true, a.From, a.To, a.Window)
	}
	v := s.Volume
	r.put(famVolBaseline, deref(v.Baseline), v.Baseline != nil, v.Step, v.Window)
	r.put(famVolZ, deref(v.Z), v.Z != nil, v.Step, v.Window)
	r.put(famVolDegraded, b2f(v.Degraded), true, v.Step, v.Window)
	for st, stage := range snap.Stages {
		r.put(famEventsTotal, float64(s.EventsTotal[st]), true, stage)
	}
	if !r.inLayout && r.n != len(r.layout) {
		r.err = fmt.Errorf("per-segment series of segments differ in layout: %d slots, want %d", r.n, len(r.layout))
	}
}

// sendSorted sends the series of segs family by family, each family in
// the registry's order: by number of labels, then by label values in
// label-name order.
func (m *metrics) sendSorted(ch chan<- prometheus.Metric, snap *Snapshot, segs []SegmentView, bdIndex map[string]int) error {
	r := rows{inLayout: true}
	r.row(snap, &segs[0])
	r.inLayout = false
	width := len(r.layout)
	r.vals, r.ok = make([]float64, 0, width*len(segs)), make([]bool, 0, width*len(segs))
	for i := range segs {
		r.row(snap, &segs[i])
		if r.err != nil {
			return r.err
		}
	}

	// Rank every label value: comparing ranks orders like comparing the
	// strings.
	var values []string
	for i := range segs {
		values = append(values, segs[i].Breakdown)
		for _, l := range segs[i].Labels {
			values = append(values, l.Value)
		}
	}
	for _, sl := range r.layout {
		values = append(values, sl.labels...)
	}
	slices.Sort(values)
	values = slices.Compact(values)
	rank := make(map[string]uint32, len(values))
	for i, v := range values {
		rank[v] = uint32(i)
	}

	// An item is a series of the family being sent: its segment, its
	// slot, and where its key starts in keys. A key is the number of
	// labels, then the ranks of the values in label-name order.
	type item struct{ seg, slot, key int32 }
	var (
		items []item
		keys  []uint32
		ranks []uint32
		lv    []string
	)
	key := func(it item) []uint32 { return keys[it.key : int(it.key)+1+int(keys[it.key])] }
	for f := range numSegFams {
		items = items[:0]
		keys = keys[:0]
		for i := range segs {
			s := &segs[i]
			d := &m.seg[bdIndex[s.Breakdown]]
			for j, sl := range r.layout {
				if sl.fam != f || !r.ok[i*width+j] {
					continue
				}
				ranks = append(ranks[:0], rank[s.Breakdown])
				for _, l := range s.Labels {
					ranks = append(ranks, rank[l.Value])
				}
				for _, v := range sl.labels {
					ranks = append(ranks, rank[v])
				}
				items = append(items, item{seg: int32(i), slot: int32(j), key: int32(len(keys))})
				keys = append(keys, uint32(len(ranks)))
				for _, k := range d.order[f] {
					keys = append(keys, ranks[k])
				}
			}
		}
		slices.SortFunc(items, func(a, b item) int { return slices.Compare(key(a), key(b)) })
		typ := prometheus.GaugeValue
		if f == famEventsTotal {
			typ = prometheus.CounterValue
		}
		for _, it := range items {
			s := &segs[it.seg]
			lv = append(lv[:0], s.Breakdown)
			for _, l := range s.Labels {
				lv = append(lv, l.Value)
			}
			lv = append(lv, r.layout[it.slot].labels...)
			ch <- prometheus.MustNewConstMetric(m.seg[bdIndex[s.Breakdown]].fam[f], typ, r.vals[int(it.seg)*width+int(it.slot)], lv...)
		}
	}
	return nil
}

// deref is *p, or 0 for nil.
func deref[T int64 | float64](p *T) T {
	if p == nil {
		return 0
	}
	return *p
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// histograms returns a copy of the flushed time-to-convert histograms.
func (p *Processor) histograms() [][]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([][]int64, len(p.hist))
	for t, h := range p.hist {
		out[t] = append([]int64(nil), h...)
	}
	return out
}
