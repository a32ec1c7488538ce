package deploy_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"github.com/segmentio/kafka-go"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

// exportedMetricNames returns the name of every series a funnelwatch
// process exports, taken from the registry of a real processor rather than
// from a list that could drift from the code. The processor runs on an
// in-memory store and is fed five weeks of three hours of traffic at the same
// time of the week (so seasonal baselines and z-scores exist), conversions,
// a duplicate, an invalid, a late record and a dimension overflow, so that
// every family has at least one series.
func exportedMetricNames(t *testing.T) map[string]bool {
	t.Helper()
	cfg := processor.DefaultConfig()
	cfg.Time.Clock = processor.ClockEvent
	cfg.Segments.MaxValues = 2 // the third source overflows
	// The event clock jumps a week between the weekly hours below; without
	// this the next week's events would be future_time.
	cfg.Time.MaxFuture = processor.Duration(8 * 24 * time.Hour)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open("", store.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	// cmd/funnelwatch adds the Go and process collectors next to the
	// processor's own metrics.
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg, Version: "test", Revision: "test"})
	if err != nil {
		t.Fatal(err)
	}

	topic := cfg.Kafka.Topics[0].Name
	// As the consumer does on joining its group: lag is reported for
	// assigned partitions only.
	p.SetAssignment(map[store.TopicPartition]int64{{Topic: topic, Partition: 0}: 0})
	dec := processor.NewDecoder(&cfg)
	var offset int64
	apply := func(values ...string) {
		t.Helper()
		b := &processor.Batch{Topic: topic, Partition: 0}
		for _, v := range values {
			m := kafka.Message{Topic: topic, Partition: 0, Offset: offset, Value: []byte(v), HighWaterMark: offset + 2, Time: time.Unix(0, 0)}
			b.Add(dec, -1, &m)
			offset++
		}
		p.ApplyBatch(b)
		if err := p.Flush(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	event := func(id, typ, entity string, at time.Time, source string) string {
		seg := ""
		if source != "" {
			seg = fmt.Sprintf(`,"segment":{"source":%q,"region":"emea"}`, source)
		}
		return fmt.Sprintf(`{"id":%q,"type":%q,"entity":%q,"time":%q,"value":10%s}`, id, typ, entity, at.Format(time.RFC3339Nano), seg)
	}

	final := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	for k := 4; k >= 0; k-- {
		start := final.Add(-time.Duration(k) * 7 * 24 * time.Hour)
		var week []string
		for i := range 360 {
			at := start.Add(time.Duration(i) * 30 * time.Second)
			source := []string{"paid_search", "organic"}[i%2]
			ent := fmt.Sprintf("e-%d-%d", k, i)
			week = append(week, event(ent+"-v", "visit", ent, at, source))
			if i%3 == 0 {
				week = append(week, event(ent+"-l", "lead", ent, at.Add(5*time.Minute), ""))
			}
			if i%9 == 0 {
				week = append(week, event(ent+"-d", "deal", ent, at.Add(20*time.Minute), ""))
			}
		}
		apply(week...)
	}
	apply(
		event("dup", "visit", "x", final.Add(time.Hour), "paid_search"),
		event("dup", "visit", "x", final.Add(time.Hour), "paid_search"), // duplicate
		`{"type":"visit"`, // malformed_json
		event("new", "visit", "y", final.Add(time.Hour), "email"), // third source: overflow
	)
	apply(event("old", "visit", "w", final.Add(-200*24*time.Hour), "organic")) // late

	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	names := seriesNames(families)
	// The metrics of SPEC §4.1 that the panels and rules rely on must be
	// there; if one is missing the processor did not see enough traffic, not
	// a wrong dashboard.
	for _, want := range []string{
		"funnel_window_entities", "funnel_cohort_conversion_ratio", "funnel_baseline_cohort_conversion_ratio",
		"funnel_conversion_zscore", "funnel_conversion_degraded", "funnel_volume_baseline_entities",
		"funnel_volume_degraded", "funnel_time_to_convert_seconds_bucket", "funnel_events_duplicate_total",
		"funnel_events_invalid_total", "funnel_events_late_total", "funnel_dimension_overflow_total",
		"funnel_consumer_lag_records",
		"funnel_build_info", "go_goroutines", "process_cpu_seconds_total",
	} {
		if !names[want] {
			got := make([]string, 0, len(names))
			for n := range names {
				got = append(got, n)
			}
			slices.Sort(got)
			t.Fatalf("the processor exported no %s after the scenario; it exported %q", want, got)
		}
	}
	return names
}

// seriesNames expands gathered metric families into the series names
// PromQL sees: a histogram is name_bucket, name_sum and name_count, a
// summary name, name_sum and name_count.
func seriesNames(families []*dto.MetricFamily) map[string]bool {
	names := map[string]bool{}
	for _, f := range families {
		name := f.GetName()
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			names[name+"_bucket"] = true
			names[name+"_sum"] = true
			names[name+"_count"] = true
		case dto.MetricType_SUMMARY:
			names[name] = true
			names[name+"_sum"] = true
			names[name+"_count"] = true
		default:
			names[name] = true
		}
	}
	return names
}
