package processor_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
)

// scaledSeries are the per-segment series, which the replicas of the
// scale-out mode export between them.
var scaledSeries = []string{
	"funnel_window_", "funnel_cohort_", "funnel_baseline_", "funnel_conversion_", "funnel_volume_",
	"funnel_events_total", "funnel_time_to_convert_seconds",
}

// startScaleOut runs a replica of the scale-out mode on in-memory stores
// until the test ends or stop is called.
func startScaleOut(t *testing.T, cfg processor.Config) (*processor.ScaleOut, *prometheus.Registry, func()) {
	t.Helper()
	reg := prometheus.NewRegistry()
	so, err := processor.NewScaleOut(cfg, processor.MemStore(t), processor.MemStore(t), processor.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	c, err := processor.NewConsumer(cfg, so.Entities(), nil)
	if err != nil {
		t.Fatal(err)
	}
	so.Attach(c)
	ctx, cancel := context.WithCancel(context.Background())
	var g errgroup.Group
	g.Go(func() error { return so.Run(ctx) })
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := g.Wait(); err != nil {
			t.Errorf("replica: %v", err)
		}
	}
	t.Cleanup(stop)
	return so, reg, stop
}

// TestScaleOutFlagsMove: a replica that takes over the partitions of
// another restores the degradation flags of their segments with their
// numbers, so that an alert does not resolve because its segment moved.
// The replay ends degraded and nothing arrives after the takeover: the
// clock does not move, so the new owner evaluates nothing again, and its
// flags can only be those the markers carried.
func TestScaleOutFlagsMove(t *testing.T) {
	end := time.Date(2026, 11, 20, 16, 0, 0, 0, time.UTC)
	lines := pageScenario(end, end.Add(-150*time.Minute), pageSegment{source: "paid_search", region: "emea", lead: 0.04})
	brokers := startBroker(t, kfake.DefaultNumPartitions(3), kfake.GroupMinSessionTimeout(time.Second))
	produce(t, brokers, "events", lines)
	cfg, err := processor.ParseConfig([]byte(`
kafka:
  topics: [{name: events}]
  group: flags
  session_timeout: 1s
  heartbeat_interval: 200ms
  rebalance_timeout: 3s
time: {clock: event, max_future: 8d}
flush_interval: 100ms
scale_out: {enabled: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Kafka.Brokers = brokers
	const degraded = `funnel_conversion_degraded{breakdown="source+region",from="visit",region="emea",source="paid_search",to="lead",window="1h"} 1`

	_, regA, stopA := startScaleOut(t, cfg)
	deadline := time.Now().Add(60 * time.Second)
	var want string
	for {
		want = exposition(t, regA, scaledSeries...)
		if consumed(t, regA) == len(lines) && strings.Contains(want, degraded) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s the first replica consumed %d of %d records; degraded flag shown: %v", consumed(t, regA), len(lines), strings.Contains(want, degraded))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Stage 2 applies the last markers, and the flag reaches the deltas
	// topic with the next one: a stage-2 flush hands it to stage 1, whose
	// next flush sends it.
	for {
		time.Sleep(20 * time.Duration(cfg.FlushInterval))
		got := exposition(t, regA, scaledSeries...)
		if got == want {
			break
		}
		want = got
	}
	stopA()

	b, regB, _ := startScaleOut(t, cfg)
	deadline = time.Now().Add(60 * time.Second)
	for {
		got := exposition(t, regB, scaledSeries...)
		if b.Ready() && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replica that took over exports (ready %v):\n%s", b.Ready(), diffLines(want, got))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
