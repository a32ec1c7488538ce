package processor_test

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

var update = flag.Bool("update", false, "rewrite golden files")

// startBroker starts a kfake broker on 127.0.0.1 for the test.
func startBroker(t testing.TB, opts ...kfake.Opt) []string {
	t.Helper()
	opts = append([]kfake.Opt{kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(1)}, opts...)
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

// produce writes one record per line, keyed by the line's entity when it
// has one, in order.
func produce(t testing.TB, brokers []string, topic string, lines [][]byte) {
	t.Helper()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{}, AllowAutoTopicCreation: true, BatchTimeout: time.Millisecond, BatchSize: 1000, RequiredAcks: kafka.RequireOne}
	defer w.Close()
	msgs := make([]kafka.Message, 0, len(lines))
	for _, l := range lines {
		msgs = append(msgs, kafka.Message{Key: entityOf(l), Value: l, Time: time.Date(2026, 11, 2, 9, 0, 0, 0, time.UTC)})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		err := w.WriteMessages(ctx, msgs...)
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("produce: %v", err)
		}
		time.Sleep(100 * time.Millisecond) // topic creation in progress
	}
}

func entityOf(line []byte) []byte {
	const k = `"entity":"`
	i := bytes.Index(line, []byte(k))
	if i < 0 {
		return nil
	}
	rest := line[i+len(k):]
	if j := bytes.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return nil
}

// runner runs a processor and its consumer against a broker until stopped.
type runner struct {
	p      *processor.Processor
	c      *processor.Consumer
	reg    *prometheus.Registry
	cancel context.CancelFunc
	g      *errgroup.Group
}

func startRunner(t testing.TB, cfg processor.Config, st *store.Store, now func() time.Time) *runner {
	t.Helper()
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	c, err := processor.NewConsumer(cfg, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	r := &runner{p: p, c: c, reg: reg, cancel: cancel, g: g}
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *runner) stop(t testing.TB) {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	if err := r.g.Wait(); err != nil {
		t.Errorf("runner: %v", err)
	}
}

// consumed sums funnel_records_consumed_total.
func consumed(t testing.TB, reg prometheus.Gatherer) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0.0
	for _, mf := range mfs {
		if mf.GetName() == "funnel_records_consumed_total" {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return int(n)
}

// waitConsumed waits until n records were consumed and flushed.
func (r *runner) waitConsumed(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for consumed(t, r.reg) < n {
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d records after 60s, want %d", consumed(t, r.reg), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := r.p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// exposition renders the registry as text lines, sorted, keeping the
// series whose name starts with one of prefixes.
func exposition(t testing.TB, g prometheus.Gatherer, prefixes ...string) string {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&buf, mf); err != nil {
			t.Fatal(err)
		}
	}
	var lines []string
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") {
			continue
		}
		if slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(l, p) }) {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

// segmentSeries are the series a scenario's golden file holds: every
// per-segment series and the outcome counters.
var segmentSeries = []string{
	"funnel_window_", "funnel_cohort_", "funnel_baseline_", "funnel_conversion_", "funnel_volume_",
	"funnel_events_total", "funnel_time_to_convert_seconds", "funnel_events_invalid_total",
	"funnel_events_duplicate_total", "funnel_events_late_total", "funnel_events_applied_total",
	"funnel_dimension_overflow_total", "funnel_clock_timestamp_seconds", "funnel_entities_tracked",
}

func readLines(t testing.TB, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(l)) > 0 {
			out = append(out, l)
		}
	}
	return out
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("exposition differs from %s (run with -update after checking):\n%s", path, diffLines(string(want), got))
	}
}

func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var out []string
	for _, l := range w {
		if !slices.Contains(g, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range g {
		if !slices.Contains(w, l) {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// TestScenarios feeds each testdata/scenarios/NAME.jsonl through a real
// broker with the config NAME.yaml and compares the per-segment exposition
// with NAME.golden.
func TestScenarios(t *testing.T) {
	configs, err := filepath.Glob("testdata/scenarios/*.yaml")
	if err != nil || len(configs) == 0 {
		t.Fatalf("no scenarios: %v", err)
	}
	for _, cfgPath := range configs {
		name := strings.TrimSuffix(filepath.Base(cfgPath), ".yaml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			base := strings.TrimSuffix(cfgPath, ".yaml")
			b, err := os.ReadFile(cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := processor.ParseConfig(b)
			if err != nil {
				t.Fatal(err)
			}
			brokers := startBroker(t)
			cfg.Kafka.Brokers = brokers
			cfg.FlushInterval = processor.Duration(50 * time.Millisecond)
			lines := readLines(t, base+".jsonl")
			produce(t, brokers, cfg.Kafka.Topics[0].Name, lines)

			st := processor.MemStore(t)
			wall := time.Date(2026, 11, 2, 13, 30, 0, 0, time.UTC)
			r := startRunner(t, cfg, st, func() time.Time { return wall })
			r.waitConsumed(t, len(lines))
			got := exposition(t, r.reg, segmentSeries...)
			r.stop(t)
			golden(t, base+".golden", got)
		})
	}
}

func ExampleBreakdownName() {
	fmt.Println(processor.BreakdownName(nil), processor.BreakdownName([]string{"source", "region"}))
	// Output: all source+region
}
