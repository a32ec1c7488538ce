package processor_test

import (
	"strings"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/processor"
)

// TestReplayIsDeterministic replays the same history with a very short and
// a long flush interval. On the event clock degradation is evaluated at
// every bucket boundary, so its hysteresis, and every other series, must
// not depend on when flushes happened.
func TestReplayIsDeterministic(t *testing.T) {
	end := time.Date(2026, 11, 20, 16, 0, 0, 0, time.UTC)
	lines := pageScenario(end, end.Add(-150*time.Minute), pageSegment{source: "paid_search", region: "emea", lead: 0.04})
	brokers := startBroker(t)
	produce(t, brokers, "events", lines)

	run := func(flush time.Duration) string {
		cfg, err := processor.ParseConfig([]byte(`
kafka: {topics: [{name: events}]}
time: {clock: event, max_future: 8d}
`))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Kafka.Brokers = brokers
		cfg.Kafka.Group = "replay-" + flush.String()
		cfg.FlushInterval = processor.Duration(flush)
		st := processor.MemStore(t)
		r := startRunner(t, cfg, st, time.Now)
		r.waitConsumed(t, len(lines))
		got := exposition(t, r.reg, segmentSeries...)
		r.stop(t)
		return got
	}
	fast, slow := run(10*time.Millisecond), run(2*time.Second)
	if !strings.Contains(fast, "funnel_conversion_degraded{breakdown=\"source+region\",from=\"visit\",region=\"emea\",source=\"paid_search\",to=\"lead\",window=\"1h\"} 1") {
		t.Fatalf("the scenario does not degrade paid_search/emea, so it proves nothing")
	}
	if fast != slow {
		t.Errorf("the same replay differs with the flush interval:\n%s", diffLines(fast, slow))
	}
}
