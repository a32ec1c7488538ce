package traffic_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/funnelwatch/funnelwatch/processor/traffic"
)

// newCluster starts a kfake broker on 127.0.0.1 that creates topics with
// three partitions on first use.
func newCluster(t *testing.T) string {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()[0]
}

// readTopic reads every record of the topic's partitions.
func readTopic(t *testing.T, ctx context.Context, addr, topic string, partitions int) [][]kafka.Message {
	t.Helper()
	out := make([][]kafka.Message, partitions)
	for p := range partitions {
		conn, err := kafka.DialLeader(ctx, "tcp", addr, topic, p)
		if err != nil {
			t.Fatal(err)
		}
		last, err := conn.ReadLastOffset()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Seek(0, kafka.SeekAbsolute); err != nil {
			t.Fatal(err)
		}
		for int64(len(out[p])) < last {
			if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
				t.Fatal(err)
			}
			batch := conn.ReadBatch(1, 16<<20)
			for {
				m, err := batch.ReadMessage()
				if err != nil {
					break
				}
				out[p] = append(out[p], m)
			}
			if err := batch.Close(); err != nil {
				t.Fatalf("partition %d: %v", p, err)
			}
		}
		conn.Close()
	}
	return out
}

func TestStreamToKafka(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr := newCluster(t)
	w := &kafka.Writer{
		Addr:                   kafka.TCP(addr),
		Topic:                  "funnel-events",
		Balancer:               &kafka.Hash{},
		AllowAutoTopicCreation: true,
		BatchSize:              2000,
		BatchTimeout:           5 * time.Millisecond,
		RequiredAcks:           kafka.RequireOne,
	}
	defer w.Close()

	cfg := traffic.DefaultConfig(monday)
	cfg.InvalidRatio = 0.01
	const count = 5000
	var progress []traffic.Progress
	err := newModel(t, cfg).Stream(ctx, w, traffic.StreamOptions{
		Backfill:  3 * time.Hour,
		Count:     count,
		BatchSize: 1000,
		Progress:  func(p traffic.Progress) { progress = append(progress, p) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(progress) == 0 || !progress[len(progress)-1].Done || progress[len(progress)-1].Records != count {
		t.Fatalf("progress %+v; want a last report with Done and %d records", progress, count)
	}

	// What the model generates, by entity.
	want := map[string][]record{}
	n := 0
	enough := errors.New("enough")
	err = newModel(t, cfg).Generate(monday.Add(3*time.Hour), func(r traffic.Record) error {
		if n++; n > count {
			return enough
		}
		want[string(r.Key)] = append(want[string(r.Key)], record{string(r.Key), string(r.Value), r.Time})
		return nil
	})
	if !errors.Is(err, enough) {
		t.Fatalf("three hours of history have %d records; the test wants more than %d", n, count)
	}

	got := readTopic(t, ctx, addr, "funnel-events", 3)
	total := 0
	partitionOf := map[string]int{}
	byEntity := map[string][]record{}
	for p, msgs := range got {
		total += len(msgs)
		for _, m := range msgs {
			k := string(m.Key)
			if q, ok := partitionOf[k]; ok && q != p {
				t.Fatalf("entity %s on partitions %d and %d; want one", k, q, p)
			}
			partitionOf[k] = p
			if c, err := decode(m.Value); err == nil && c.Entity != "" && c.Entity != k {
				t.Fatalf("record keyed %s has entity %s; want the key", k, c.Entity)
			}
			byEntity[k] = append(byEntity[k], record{k, string(m.Value), m.Time.UTC()})
		}
	}
	if total != count {
		t.Fatalf("topic holds %d records; want %d", total, count)
	}
	if len(partitionOf) < 100 {
		t.Fatalf("%d entities; want many", len(partitionOf))
	}
	for k, w := range want {
		g := byEntity[k]
		if len(g) != len(w) {
			t.Fatalf("entity %s: %d records in the topic; want %d", k, len(g), len(w))
		}
		for i := range w {
			if g[i].value != w[i].value || !g[i].time.Equal(w[i].time) {
				t.Fatalf("entity %s record %d: %s at %v; want %s at %v (the record timestamp is the event time)", k, i, g[i].value, g[i].time, w[i].value, w[i].time)
			}
		}
	}
}

// memWriter keeps what it is given; the Writer interface is the
// consumer-side contract, and this is a second, trivial producer of it.
type memWriter struct {
	mu   sync.Mutex
	msgs []kafka.Message
}

func (w *memWriter) WriteMessages(_ context.Context, msgs ...kafka.Message) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, m := range msgs {
		m.Key = append([]byte(nil), m.Key...)
		m.Value = append([]byte(nil), m.Value...)
		w.msgs = append(w.msgs, m)
	}
	return nil
}

func TestStreamPacing(t *testing.T) {
	tests := []struct {
		name     string
		opts     traffic.StreamOptions
		minSim   time.Duration // simulated time reached, after Start
		maxSim   time.Duration
		minCount int
		maxCount int
	}{
		{
			// An hour of history at once, then a simulated hour a second.
			name:   "backfill and speed",
			opts:   traffic.StreamOptions{Backfill: time.Hour, Speed: 3600, Duration: time.Second},
			minSim: time.Hour + 30*time.Minute, maxSim: 2*time.Hour + 10*time.Minute,
		},
		{
			name:     "rate",
			opts:     traffic.StreamOptions{Rate: 2000, Duration: time.Second},
			minCount: 1000, maxCount: 2100,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := &memWriter{}
			m := newModel(t, traffic.DefaultConfig(monday))
			var last traffic.Progress
			tt.opts.Progress = func(p traffic.Progress) { last = p }
			start := time.Now()
			if err := m.Stream(context.Background(), w, tt.opts); err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el < tt.opts.Duration || el > tt.opts.Duration+time.Second {
				t.Errorf("Stream took %v; want about %v", el, tt.opts.Duration)
			}
			if !last.Done || last.Records != int64(len(w.msgs)) {
				t.Errorf("last progress %+v; want Done with %d records", last, len(w.msgs))
			}
			if tt.maxSim > 0 {
				if sim := last.SimTime.Sub(monday); sim < tt.minSim || sim > tt.maxSim {
					t.Errorf("simulated time reached start+%v; want [%v, %v]", sim, tt.minSim, tt.maxSim)
				}
			}
			if tt.maxCount > 0 && (len(w.msgs) < tt.minCount || len(w.msgs) > tt.maxCount) {
				t.Errorf("%d records; want [%d, %d]", len(w.msgs), tt.minCount, tt.maxCount)
			}
			for i := 1; i < len(w.msgs); i++ {
				if d := w.msgs[i-1].Time.Sub(w.msgs[i].Time); d > traffic.MaxDuplicateDelay {
					t.Fatalf("record %d at %v, %v before its predecessor", i, w.msgs[i].Time, d)
				}
			}
		})
	}
}

func TestStreamStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	m := newModel(t, traffic.DefaultConfig(monday))
	err := m.Stream(ctx, &memWriter{}, traffic.StreamOptions{Speed: 60})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stream() = %v; want the context's error", err)
	}
}

func TestStreamOptionsValidate(t *testing.T) {
	err := traffic.StreamOptions{Backfill: -1, Speed: -1, Rate: -2, Count: -3, Duration: -4, BatchSize: -5}.Validate()
	if err == nil {
		t.Fatal("Validate() = nil; want errors")
	}
	for _, w := range []string{"backfill", "speed", "rate", "count", "duration", "batch size"} {
		if !strings.Contains(err.Error(), w+":") {
			t.Errorf("Validate() = %q; want it to name %s", err, w)
		}
	}
	if err := (traffic.StreamOptions{}).Validate(); err != nil {
		t.Errorf("zero options: Validate() = %v; want nil", err)
	}
}
