package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/processor/traffic"
)

// demoTopic is the topic the demo's generator writes and its processor reads.
const demoTopic = "funnel-events"

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dataDir  = fs.String("data.dir", "funnelwatch-demo", "where the embedded broker and the store keep their data; a restart continues from it")
		fresh    = fs.Bool("fresh", false, "delete the data dir first and start over with a new history")
		listen   = fs.String("web.listen-address", "127.0.0.1:9470", "address of the page, /metrics and the API")
		logLevel = fs.String("log.level", "warn", "log level of the processor (debug, info, warn, error)")
		f        = generateFlags{speed: 120, backfill: durationFlag(36 * 24 * time.Hour), dropAfter: durationFlag(30 * time.Second)}
	)
	fs.Float64Var(&f.speed, "speed", f.speed, "simulated seconds per real second of live traffic")
	fs.Var(&f.backfill, "backfill", "simulated history written first, as fast as possible (baselines need 4 weeks)")
	fs.Float64Var(&f.scale, "scale", 0.5, "multiplies the visitor rate of every segment (0.5 keeps the history to ~3M records)")
	fs.Int64Var(&f.seed, "seed", traffic.DefaultSeed, "random seed of the traffic model")
	fs.StringVar(&f.dropSegment, "drop.segment", "source=paid_search,region=na", "segment whose visit→lead conversion drops (empty: none)")
	fs.Float64Var(&f.dropFactor, "drop.factor", traffic.DefaultDropFactor, "factor the segment's visit→lead probability is multiplied by")
	fs.Var(&f.dropAfter, "drop.after", "real time after live traffic starts when the drop begins")
	fs.BoolVar(&f.dropVolume, "drop.volume", false, "drop the segment's visit volume instead of its conversion")
	if err := fs.Parse(args); err != nil {
		return err
	}
	f.duplicates = traffic.DefaultDuplicateRatio
	f.invalid = 0.001

	if *fresh {
		if err := os.RemoveAll(*dataDir); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(*dataDir, "kafka"), 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	// A restart continues the simulated time where it stopped, without a
	// new backfill: the broker and the store keep what they had.
	posFile := filepath.Join(*dataDir, "position")
	if b, err := os.ReadFile(posFile); err == nil {
		if t, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b))); err == nil {
			f.start = t.Format(time.RFC3339Nano)
			f.backfill = 0
		}
	}
	now := time.Now()
	tcfg, opts, err := f.config(now)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	model, err := traffic.New(tcfg)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}

	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(6),
		kfake.DataDir(filepath.Join(*dataDir, "kafka")))
	if err != nil {
		return fmt.Errorf("demo: start the embedded broker: %w", err)
	}
	defer cluster.Close()
	brokers := cluster.ListenAddrs()

	cfg := processor.DefaultConfig()
	cfg.Kafka.Brokers = brokers
	cfg.Kafka.Topics = []processor.TopicConfig{{Name: demoTopic}}
	cfg.Kafka.SessionTimeout = processor.Duration(6 * time.Second)
	cfg.Kafka.HeartbeatInterval = processor.Duration(time.Second)
	cfg.Time.Clock = processor.ClockEvent
	cfg.Store.Dir = filepath.Join(*dataDir, "store")
	cfg.Web.ListenAddress = *listen
	cfg.Log = processor.LogConfig{Level: *logLevel, Format: "logfmt"}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	url := "http://" + l.Addr().String()
	fmt.Fprintf(stdout, `funnelwatch demo
  page     %s/
  metrics  %s/metrics
  api      %s/api/v1/segments
  broker   %s (topic %s)
  data     %s
`, url, url, url, strings.Join(brokers, ","), demoTopic, *dataDir)
	if opts.Backfill > 0 {
		fmt.Fprintf(stdout, "Writing %s of history, then live traffic at %gx; ", processor.Duration(opts.Backfill), opts.Speed)
	} else {
		fmt.Fprintf(stdout, "Continuing from %s at %gx; ", tcfg.Start.UTC().Format(time.RFC3339), opts.Speed)
	}
	if d := tcfg.Drop; d != nil {
		fmt.Fprintf(stdout, "%s's visit→lead conversion drops to %g× at simulated %s.\n", f.dropSegment, d.Factor, d.At.UTC().Format("Jan 2 15:04"))
	} else {
		fmt.Fprintln(stdout, "no drop is injected.")
	}
	fmt.Fprintln(stdout, "Ctrl-C stops everything; run it again to continue.")

	w := newTrafficWriter(brokers, demoTopic)
	defer w.Close()
	var progress traffic.Progress
	opts.Progress = func(p traffic.Progress) {
		progress = p
		_ = os.WriteFile(posFile, []byte(p.SimTime.UTC().Format(time.RFC3339Nano)+"\n"), 0o644)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return serve(gctx, cfg, newLogger(stderr, cfg.Log), l)
	})
	g.Go(func() error {
		err := model.Stream(gctx, w, opts)
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	})
	g.Go(func() error {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-gctx.Done():
				return nil
			case <-t.C:
				fmt.Fprintln(stdout, summaryLine(url, progress))
			}
		}
	})
	err = g.Wait()
	fmt.Fprintln(stdout, "stopped")
	return err
}

// summaryLine is the demo's one-line status, read from its own API as any
// tool would.
func summaryLine(url string, p traffic.Progress) string {
	line := fmt.Sprintf("%s %s | written %d", p.Phase, p.SimTime.UTC().Format("Mon Jan 2 15:04"), p.Records)
	resp, err := http.Get(url + "/api/v1/segments")
	if err != nil {
		return line + " | processor not answering: " + err.Error()
	}
	defer resp.Body.Close()
	var snap processor.Snapshot
	if err := json.NewDecoder(resp.Body).Decode(&snap); err != nil {
		return line + " | " + err.Error()
	}
	line += fmt.Sprintf(" | clock %s | %d segments", snap.Clock.Format("Mon Jan 2 15:04"), len(snap.Segments))
	var degraded []string
	for _, s := range snap.Segments {
		if !s.Degraded {
			continue
		}
		name := s.Breakdown
		if len(s.Labels) > 0 {
			var parts []string
			for _, l := range s.Labels {
				parts = append(parts, l.Value)
			}
			name = strings.Join(parts, "/")
		}
		for _, a := range s.Alerts {
			if a.Degraded && a.Ratio != nil && a.BaselineRatio != nil {
				name += fmt.Sprintf(" (%s→%s %.1f%% vs %.1f%%)", a.From, a.To, 100**a.Ratio, 100**a.BaselineRatio)
			}
		}
		if s.Volume.Degraded {
			name += " (volume)"
		}
		degraded = append(degraded, name)
	}
	if len(degraded) == 0 {
		return line + " | nothing degraded"
	}
	return line + " | DEGRADED: " + strings.Join(degraded, ", ")
}
