package processor_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/processor"
)

// TestKcatInterop produces the attribution scenario with kcat, an
// independent Kafka client (librdkafka), and expects the same exposition as
// the golden file made from records produced by kafka-go.
func TestKcatInterop(t *testing.T) {
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		t.Fatalf("kcat is required (apt-get install kcat): %v", err)
	}
	const base = "testdata/scenarios/attribution"
	b, err := os.ReadFile(base + ".yaml")
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

	// kcat -K splits each line into key and value at the first tab.
	var in bytes.Buffer
	for _, l := range lines {
		in.Write(entityOf(l))
		in.WriteByte('\t')
		in.Write(l)
		in.WriteByte('\n')
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, kcat, "-P", "-b", strings.Join(brokers, ","), "-t", cfg.Kafka.Topics[0].Name,
		"-K", "\t", "-X", "allow.auto.create.topics=true", "-X", "topic.partitioner=murmur2_random")
	cmd.Stdin = &in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kcat: %v\n%s", err, out)
	}

	st := processor.MemStore(t)
	wall := time.Date(2026, 11, 2, 13, 30, 0, 0, time.UTC)
	r := startRunner(t, cfg, st, func() time.Time { return wall })
	r.waitConsumed(t, len(lines))
	got := exposition(t, r.reg, segmentSeries...)
	r.stop(t)
	want, err := os.ReadFile(base + ".golden")
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("records produced by kcat give a different exposition:\n%s", diffLines(string(want), got))
	}
}
