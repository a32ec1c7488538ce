package processor

import (
	"runtime"
	"slices"
	"strconv"
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
	windowEvents, windowEntities, windowValue, flowRatio       *prometheus.Desc
	cohortEntered, cohortConverted, cohortRatio                *prometheus.Desc
	baseEntered, baseConverted, baseRatio, zscore, degraded    *prometheus.Desc
	volBaseline, volZ, volDegraded, eventsTotal, timeToConvert *prometheus.Desc
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
		{"funnel_consumption_paused", "1 while the last flush failed: consumption waits until a flush succeeds (the store's disk is full or failing, or the dead-letter topic cannot be written).", nil},
	} {
		m.descs[d.name] = prometheus.NewDesc(d.name, d.help, d.labels, nil)
	}
	for _, b := range p.cfg.Segments.Breakdowns {
		base := append([]string{"breakdown"}, b...)
		with := func(extra ...string) []string { return append(append([]string(nil), base...), extra...) }
		nd := func(name, help string, labels []string) *prometheus.Desc {
			return prometheus.NewDesc(name, help, labels, nil)
		}
		m.seg = append(m.seg, segmentDescs{
			windowEvents:    nd("funnel_window_events", "Accepted non-duplicate events of a stage with time in the window.", with("step", "window")),
			windowEntities:  nd("funnel_window_entities", "Entities that reached a stage in the window.", with("step", "window")),
			windowValue:     nd("funnel_window_value", "Sum of the value of a stage's events in the window.", with("step", "window")),
			flowRatio:       nd("funnel_window_conversion_ratio", "Flow ratio entities(to)/entities(from) over the window.", with("from", "to", "window")),
			cohortEntered:   nd("funnel_cohort_entered", "Entities that entered the step's cohort in the window's mature entry buckets.", with("from", "to", "window")),
			cohortConverted: nd("funnel_cohort_converted", "Cohort entities that converted within the step's horizon.", with("from", "to", "window")),
			cohortRatio:     nd("funnel_cohort_conversion_ratio", "Cohort conversion ratio converted/entered.", with("from", "to", "window")),
			baseEntered:     nd("funnel_baseline_cohort_entered", "Cohort entered over the same window 1..K weeks earlier, pooled.", with("from", "to", "window")),
			baseConverted:   nd("funnel_baseline_cohort_converted", "Cohort converted over the same window 1..K weeks earlier, pooled.", with("from", "to", "window")),
			baseRatio:       nd("funnel_baseline_cohort_conversion_ratio", "Pooled baseline cohort conversion ratio.", with("from", "to", "window")),
			zscore:          nd("funnel_conversion_zscore", "Two-proportion z-score of the cohort ratio against the baseline.", with("from", "to", "window")),
			degraded:        nd("funnel_conversion_degraded", "1 while the step's conversion is degraded for the segment.", with("from", "to", "window")),
			volBaseline:     nd("funnel_volume_baseline_entities", "Mean entities of the first stage over the same window 1..K weeks earlier.", with("step", "window")),
			volZ:            nd("funnel_volume_zscore", "Poisson z-score of the first stage's entities against the baseline.", with("step", "window")),
			volDegraded:     nd("funnel_volume_degraded", "1 while the first stage's volume is degraded for the segment.", with("step", "window")),
			eventsTotal:     nd("funnel_events_total", "All-time accepted non-duplicate events of a stage.", with("step")),
			timeToConvert:   nd("funnel_time_to_convert_seconds", "Time from reaching a step's from stage to reaching its to stage, for conversions within the horizon.", with("from", "to")),
		})
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
	gauge("funnel_consumption_paused", b2f(p.stalled.Load()))
}

func (m *metrics) collectSegments(ch chan<- prometheus.Metric) {
	snap := m.p.Snapshot()
	hist := m.p.histograms()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	bdIndex := map[string]int{}
	for i, b := range m.p.cfg.Segments.Breakdowns {
		bdIndex[BreakdownName(b)] = i
	}
	var lv []string
	for _, s := range snap.Segments {
		if m.keep != nil && !m.keep(s.Breakdown, s.Labels) {
			continue
		}
		d := &m.seg[bdIndex[s.Breakdown]]
		base := append(lv[:0], s.Breakdown)
		for _, l := range s.Labels {
			base = append(base, l.Value)
		}
		labels := func(extra ...string) []string { return append(base[:len(base):len(base)], extra...) }
		for _, w := range s.Windows {
			for st, stage := range snap.Stages {
				gauge(d.windowEvents, float64(w.Events[st]), labels(stage, w.Window)...)
				gauge(d.windowEntities, float64(w.Entities[st]), labels(stage, w.Window)...)
				gauge(d.windowValue, w.Value[st], labels(stage, w.Window)...)
			}
		}
		for _, f := range s.Flows {
			if f.Ratio != nil {
				gauge(d.flowRatio, *f.Ratio, labels(f.From, f.To, f.Window)...)
			}
		}
		for _, c := range s.Cohorts {
			l := labels(c.From, c.To, c.Window)
			gauge(d.cohortEntered, float64(c.Entered), l...)
			gauge(d.cohortConverted, float64(c.Converted), l...)
			if c.Ratio != nil {
				gauge(d.cohortRatio, *c.Ratio, l...)
			}
		}
		for _, a := range s.Alerts {
			l := labels(a.From, a.To, a.Window)
			if !slices.Contains(snap.Windows, a.Window) {
				// The alert window is not a configured window: export the
				// current cohort it is judged on anyway.
				gauge(d.cohortEntered, float64(a.Entered), l...)
				gauge(d.cohortConverted, float64(a.Converted), l...)
				if a.Ratio != nil {
					gauge(d.cohortRatio, *a.Ratio, l...)
				}
			}
			if a.BaselineEntered != nil {
				gauge(d.baseEntered, float64(*a.BaselineEntered), l...)
				gauge(d.baseConverted, float64(*a.BaselineConverted), l...)
				if a.BaselineRatio != nil {
					gauge(d.baseRatio, *a.BaselineRatio, l...)
				}
			}
			if a.Z != nil {
				gauge(d.zscore, *a.Z, l...)
			}
			gauge(d.degraded, b2f(a.Degraded), l...)
		}
		v := s.Volume
		l := labels(v.Step, v.Window)
		if v.Baseline != nil {
			gauge(d.volBaseline, *v.Baseline, l...)
		}
		if v.Z != nil {
			gauge(d.volZ, *v.Z, l...)
		}
		gauge(d.volDegraded, b2f(v.Degraded), l...)
		for st, stage := range snap.Stages {
			ch <- prometheus.MustNewConstMetric(d.eventsTotal, prometheus.CounterValue, float64(s.EventsTotal[st]), labels(stage)...)
		}
	}
	// Time to convert is kept for the overall breakdown only: per segment it
	// would cost 16 series per step and segment.
	if all, ok := bdIndex["all"]; ok && (m.keep == nil || m.keep("all", nil)) {
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
