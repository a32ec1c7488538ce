package processor_test

import (
	"context"
	"fmt"
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
// The replay ends with one segment degraded and others in the hysteresis
// band (their flags stay on only because they were on); the first replica
// stops, a second one on empty stores takes over, and then a record moves
// the clock across bucket boundaries, so that the new owner evaluates
// again. Its per-segment series must equal those of one replica without
// the scale-out mode that consumed the same records in the same order: one
// partition, since the flags' history depends on how partitions interleave
// (TestReplayIsDeterministic).
func TestScaleOutFlagsMove(t *testing.T) {
	end := time.Date(2026, 11, 20, 16, 0, 0, 0, time.UTC)
	lines := pageScenario(end, end.Add(-150*time.Minute), pageSegment{source: "paid_search", region: "emea", lead: 0.04})
	tick := fmt.Appendf(nil, `{"id":"tick","type":"visit","entity":"tick","time":%q,"segment":{"source":"email","region":"amer"}}`,
		end.Add(5*time.Minute).Format(time.RFC3339))
	brokers := startBroker(t, kfake.GroupMinSessionTimeout(time.Second))
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

	// settle waits until a replica consumed n records and its series stop
	// changing: stage 2 applies the last markers, and the flags reach the
	// deltas topic with the next marker after a stage-2 flush.
	settle := func(reg prometheus.Gatherer, n int) string {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for consumed(t, reg) < n {
			if time.Now().After(deadline) {
				t.Fatalf("consumed %d of %d records after 60s", consumed(t, reg), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
		last := ""
		for {
			time.Sleep(20 * time.Duration(cfg.FlushInterval))
			got := exposition(t, reg, scaledSeries...)
			if got == last {
				return got
			}
			last = got
		}
	}

	// The reference: one replica without the scale-out mode, which reads
	// the tick, as the new owner does, after every other record.
	single := cfg
	single.ScaleOut.Enabled = false
	single.Kafka.Group = "single"
	r := startRunner(t, single, processor.MemStore(t), time.Now)
	r.waitConsumed(t, len(lines))

	_, regA, stopA := startScaleOut(t, cfg)
	if got := settle(regA, len(lines)); !strings.Contains(got, degraded) {
		t.Fatalf("the scenario does not degrade paid_search/emea, so it proves nothing")
	}
	stopA()

	b, regB, _ := startScaleOut(t, cfg)
	deadline := time.Now().Add(60 * time.Second)
	for !b.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("the replica that took over is not ready after 60s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	produce(t, brokers, "events", [][]byte{tick})
	got := settle(regB, 1)
	want := settle(r.reg, len(lines)+1)
	if got != want {
		t.Errorf("the replica that took over exports:\n%s", diffLines(want, got))
	}
}
