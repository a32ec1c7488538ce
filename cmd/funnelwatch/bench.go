package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/processor/traffic"
	"github.com/funnelwatch/funnelwatch/store"
)

// runBench measures funnelwatch end to end against the raw consumption
// rate of kafka-go on the same embedded broker, in the same run.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		events     = fs.Int("events", 2_000_000, "events to preload from the demo's traffic model")
		partitions = fs.Int("partitions", 6, "partitions of the topic")
		runs       = fs.Int("runs", 3, "measurements of each side; the median is reported")
		scale      = fs.Float64("scale", 8, "traffic model scale (more segments' traffic per simulated hour)")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile of the funnelwatch runs to this file")
		dir        = fs.String("dir", "", "directory for the stores (default: a temporary one)")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "funnelwatch-bench")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(*partitions))
	if err != nil {
		return fmt.Errorf("bench: start broker: %w", err)
	}
	defer cluster.Close()
	brokers := cluster.ListenAddrs()

	fmt.Fprintf(stdout, "preloading %d events into %d partitions...\n", *events, *partitions)
	start := time.Now()
	history := 35 * 24 * time.Hour
	model, err := traffic.New(traffic.Config{Seed: 1, Start: time.Now().Add(-history).Truncate(time.Hour), Scale: *scale, DuplicateRatio: traffic.DefaultDuplicateRatio})
	if err != nil {
		return err
	}
	w := newTrafficWriter(brokers, demoTopic)
	err = model.Stream(ctx, w, traffic.StreamOptions{Backfill: history, Count: int64(*events)})
	w.Close()
	if err != nil {
		return fmt.Errorf("bench: preload: %w", err)
	}
	fmt.Fprintf(stdout, "preloaded in %s\n", time.Since(start).Round(time.Millisecond))

	var raw, fw []float64
	var last benchResult
	for i := 0; i < *runs; i++ {
		r, err := rawConsume(ctx, brokers, *partitions, *events)
		if err != nil {
			return err
		}
		raw = append(raw, r)
		var prof io.Writer
		if *cpuProfile != "" && i == *runs-1 {
			f, err := os.Create(*cpuProfile)
			if err != nil {
				return err
			}
			defer f.Close()
			prof = f
		}
		res, err := funnelwatchConsume(ctx, brokers, filepath.Join(*dir, strconv.Itoa(i)), *events, prof)
		if err != nil {
			return err
		}
		fw = append(fw, res.rate)
		last = res
		fmt.Fprintf(stdout, "run %d: kafka-go %.0f events/s, funnelwatch %.0f events/s (ratio %.2f; first record after %s)\n", i+1, r, res.rate, res.rate/r, res.firstRecord.Round(time.Millisecond))
	}
	mr, mf := median(raw), median(fw)
	fmt.Fprintf(stdout, `
raw kafka-go consumption   %10.0f events/s (median of %d)
funnelwatch end to end     %10.0f events/s (median of %d)
ratio                      %10.2f
cpu seconds (last run)     %10.2f
peak RSS of this process   %10.0f MiB (includes the embedded broker's %d records)
store size (last run)      %10.1f MiB
segments                   %10d
/metrics scrape            %10s (%d bytes)
`, mr, len(raw), mf, len(fw), mf/mr, last.cpu, peakRSSMiB(), *events, float64(last.storeBytes)/(1<<20), last.segments, last.scrape.Round(time.Microsecond), last.scrapeBytes)
	return nil
}

type benchResult struct {
	rate        float64
	firstRecord time.Duration
	cpu         float64
	storeBytes  uint64
	segments    int
	scrape      time.Duration
	scrapeBytes int
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// rawConsume reads every partition to its end with kafka-go readers set up
// like funnelwatch's, counting records and doing nothing else.
func rawConsume(ctx context.Context, brokers []string, partitions, n int) (float64, error) {
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	counts := make([]int, partitions)
	for p := 0; p < partitions; p++ {
		g.Go(func() error {
			r := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, Topic: demoTopic, Partition: p, MinBytes: 1, MaxBytes: 16 << 20,
				MaxWait: 500 * time.Millisecond, QueueCapacity: 4096})
			defer r.Close()
			hwm := int64(-1)
			for {
				m, err := r.FetchMessage(gctx)
				if err != nil {
					return err
				}
				counts[p]++
				hwm = m.HighWaterMark
				if m.Offset+1 >= hwm {
					return nil
				}
			}
		})
	}
	if err := g.Wait(); err != nil {
		return 0, fmt.Errorf("raw consume: %w", err)
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	if total < n {
		return 0, fmt.Errorf("raw consume: read %d of %d records", total, n)
	}
	return float64(total) / time.Since(start).Seconds(), nil
}

// funnelwatchConsume runs the processor and consumer on a fresh store until
// n records are applied and flushed.
func funnelwatchConsume(ctx context.Context, brokers []string, dir string, n int, prof io.Writer) (benchResult, error) {
	cfg := processor.DefaultConfig()
	cfg.Kafka.Brokers = brokers
	cfg.Kafka.Group = "bench-" + filepath.Base(dir) + strconv.FormatInt(time.Now().UnixNano(), 36)
	cfg.Kafka.Topics = []processor.TopicConfig{{Name: demoTopic}}
	cfg.Time.Clock = processor.ClockEvent
	cfg.Store.Dir = dir
	if err := cfg.Validate(); err != nil {
		return benchResult{}, err
	}
	st, err := store.Open(dir, store.Options{CacheBytes: 256 << 20})
	if err != nil {
		return benchResult{}, err
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return benchResult{}, err
	}
	c, err := processor.NewConsumer(cfg, p, nil)
	if err != nil {
		return benchResult{}, err
	}
	if prof != nil {
		if err := pprof.StartCPUProfile(prof); err != nil {
			return benchResult{}, err
		}
		defer pprof.StopCPUProfile()
	}
	cpu0 := cpuSeconds()
	start := time.Now()
	runCtx, cancel := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	var res benchResult
	for {
		c := consumedTotal(reg)
		if c > 0 && res.firstRecord == 0 {
			res.firstRecord = time.Since(start)
		}
		if c >= n {
			break
		}
		if ctx.Err() != nil {
			cancel()
			_ = g.Wait()
			return res, ctx.Err()
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := p.Flush(ctx); err != nil {
		cancel()
		_ = g.Wait()
		return res, err
	}
	elapsed := time.Since(start)
	res.rate = float64(n) / elapsed.Seconds()
	res.cpu = cpuSeconds() - cpu0
	res.segments = len(p.Snapshot().Segments)
	srv := processor.NewServer(cfg.Web, p, nil, reg, nil)
	rec := &countingWriter{header: http.Header{}}
	t0 := time.Now()
	srv.Handler().ServeHTTP(rec, mustRequest("/metrics"))
	res.scrape, res.scrapeBytes = time.Since(t0), rec.n
	cancel()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		return res, err
	}
	res.storeBytes = st.DiskBytes()
	return res, nil
}

func consumedTotal(g prometheus.Gatherer) int {
	mfs, _ := g.Gather()
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

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func peakRSSMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
			return kb / 1024
		}
	}
	return 0
}

type countingWriter struct {
	header http.Header
	n      int
}

func (c *countingWriter) Header() http.Header         { return c.header }
func (c *countingWriter) Write(b []byte) (int, error) { c.n += len(b); return len(b), nil }
func (c *countingWriter) WriteHeader(int)             {}

func mustRequest(path string) *http.Request {
	r, err := http.NewRequest(http.MethodGet, path, nil)
	if err != nil {
		panic(err)
	}
	return r
}
