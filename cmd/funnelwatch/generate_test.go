package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
)

func TestGenerateWritesKeyedRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(3))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	addr := cluster.ListenAddrs()[0]

	const count = 3000
	var stdout, stderr bytes.Buffer
	args := []string{
		"--brokers", addr, "--topic", "trial", "--count", "3000", "--speed", "0",
		"--start", "2026-11-02T12:00:00Z", "--seed", "7",
		"--drop.segment", "source=paid_search,region=na", "--drop.after", "30m",
	}
	if err := runGenerate(ctx, args, &stdout, &stderr); err != nil {
		t.Fatalf("runGenerate: %v\nstderr:\n%s", err, stderr.String())
	}
	if got := stdout.String(); !strings.HasPrefix(got, "wrote 3000 records") {
		t.Errorf("stdout = %q; want a summary of 3000 records", got)
	}
	if got := stderr.String(); !strings.Contains(got, "drops to 0.3× at simulated 2026-11-02T12:30:00Z") {
		t.Errorf("stderr = %q; want the drop announced at 12:30", got)
	}

	partitionOf := map[string]int{}
	total := 0
	for p := range 3 {
		for _, m := range readPartition(t, ctx, addr, "trial", p) {
			total++
			k := string(m.Key)
			if q, ok := partitionOf[k]; ok && q != p {
				t.Fatalf("entity %s on partitions %d and %d; want one", k, q, p)
			}
			partitionOf[k] = p
			var ev struct {
				Entity string `json:"entity"`
				Type   string `json:"type"`
			}
			if err := json.Unmarshal(m.Value, &ev); err != nil {
				t.Fatalf("record %s: %v", m.Value, err)
			}
			if ev.Entity != k || ev.Type == "" {
				t.Fatalf("record keyed %q: %s; want a typed event of that entity", k, m.Value)
			}
			if m.Time.Before(time.Date(2026, 11, 2, 12, 0, 0, 0, time.UTC)) {
				t.Fatalf("record %s: timestamp %v before the start", m.Value, m.Time)
			}
		}
	}
	if total != count {
		t.Errorf("topic holds %d records; want %d", total, count)
	}
	if len(partitionOf) < 500 {
		t.Errorf("%d entities; want many", len(partitionOf))
	}
}

// readPartition reads every record of one partition.
func readPartition(t *testing.T, ctx context.Context, addr, topic string, p int) []kafka.Message {
	t.Helper()
	conn, err := kafka.DialLeader(ctx, "tcp", addr, topic, p)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	last, err := conn.ReadLastOffset()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Seek(0, kafka.SeekAbsolute); err != nil {
		t.Fatal(err)
	}
	var out []kafka.Message
	for int64(len(out)) < last {
		if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		batch := conn.ReadBatch(1, 16<<20)
		for {
			m, err := batch.ReadMessage()
			if err != nil {
				break
			}
			out = append(out, m)
		}
		if err := batch.Close(); err != nil {
			t.Fatalf("partition %d: %v", p, err)
		}
	}
	return out
}

func TestGenerateFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []string // substrings of the error
	}{
		{"unknown flag", []string{"--nope"}, []string{"flag provided but not defined: -nope"}},
		{"bad duration", []string{"--backfill", "soon"}, []string{`"soon" is not a duration`}},
		{"arguments", []string{"extra"}, []string{`unexpected arguments ["extra"]`}},
		{"empty brokers", []string{"--brokers", " , "}, []string{"--brokers: empty"}},
		{"bad start", []string{"--start", "yesterday"}, []string{`--start: "yesterday"`}},
		{"many at once", []string{"--scale", "0", "--duplicates", "2", "--speed", "-1", "--drop.segment", "source=tv", "--drop.factor", "-1"}, []string{
			"--scale: 0", "--duplicates: 2", "--speed: -1", `--drop.segment: unknown source "tv"`, "--drop.factor: -1",
		}},
		{"bad segment", []string{"--drop.segment", "paid_search"}, []string{`--drop.segment: segment "paid_search": "paid_search" is not key=value`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := runGenerate(context.Background(), tt.args, &stdout, &stderr)
			if err == nil {
				t.Fatalf("runGenerate(%q) = nil; want an error", tt.args)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("runGenerate(%q) = %q; want it to contain %q", tt.args, err, w)
				}
			}
		})
	}
}

func TestGenerateFlagsConfig(t *testing.T) {
	var f generateFlags
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	f.register(fs)
	if err := fs.Parse([]string{"--backfill", "5w", "--speed", "60", "--drop.segment", "region=emea", "--drop.after", "2m", "--drop.volume"}); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	cfg, opts, err := f.config(now)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Add(-35 * 24 * time.Hour); !cfg.Start.Equal(want) {
		t.Errorf("start %v; want now − 5w = %v", cfg.Start, want)
	}
	if opts.Backfill != 35*24*time.Hour || opts.Speed != 60 {
		t.Errorf("options %+v; want backfill 5w, speed 60", opts)
	}
	// 2 real minutes at 60× are 2 simulated hours after the live start,
	// which is now.
	if d := cfg.Drop; d == nil || !d.At.Equal(now.Add(2*time.Hour)) || !d.Volume || d.Segment["region"] != "emea" || d.Factor != 0.3 {
		t.Errorf("drop %+v; want a volume drop of region=emea to 0.3× at %v", cfg.Drop, now.Add(2*time.Hour))
	}
}
