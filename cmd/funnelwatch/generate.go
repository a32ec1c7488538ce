package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"github.com/segmentio/kafka-go"

	"github.com/funnelwatch/funnelwatch/processor/traffic"
)

// generateFlags are the flags of funnelwatch generate.
type generateFlags struct {
	brokers, topic, start         string
	rate, speed                   float64
	count                         int64
	duration, backfill, dropAfter durationFlag
	seed                          int64
	scale, duplicates, invalid    float64
	dropSegment                   string
	dropFactor                    float64
	dropVolume                    bool
}

func (f *generateFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.brokers, "brokers", "127.0.0.1:9092", "Kafka bootstrap brokers, comma-separated")
	fs.StringVar(&f.topic, "topic", "funnel-events", "topic to write to (created if the broker allows it)")
	fs.Float64Var(&f.rate, "rate", 0, "most records per real second after the backfill (0: no cap)")
	fs.Var(&f.duration, "duration", "stop after this much real time, backfill included (0: until interrupted)")
	fs.Int64Var(&f.count, "count", 0, "stop after this many records (0: until interrupted)")
	fs.Float64Var(&f.speed, "speed", 1, "simulated seconds per real second after the backfill (0: as fast as possible)")
	fs.Var(&f.backfill, "backfill", "simulated history to write first, as fast as possible, e.g. 5w or 840h")
	fs.StringVar(&f.start, "start", "", "simulated start time, RFC 3339 (default: now minus the backfill)")
	fs.Int64Var(&f.seed, "seed", traffic.DefaultSeed, "random seed: the same seed and start give the same records")
	fs.Float64Var(&f.scale, "scale", 1, "multiplies the visitor rate of every segment")
	fs.Float64Var(&f.duplicates, "duplicates", traffic.DefaultDuplicateRatio, "probability that a record with an id is delivered twice")
	fs.Float64Var(&f.invalid, "invalid", 0, "probability that a record is followed by an invalid one")
	fs.StringVar(&f.dropSegment, "drop.segment", "", "segment whose visit→lead conversion drops, e.g. source=paid_search,region=na (empty: no drop)")
	fs.Float64Var(&f.dropFactor, "drop.factor", traffic.DefaultDropFactor, "factor the dropped segment's visit→lead probability (or volume) is multiplied by")
	fs.Var(&f.dropAfter, "drop.after", "real time after the live start when the drop begins (simulated time with --speed 0)")
	fs.BoolVar(&f.dropVolume, "drop.volume", false, "drop the segment's visit volume instead of its conversion")
}

// durationFlag is a duration in Prometheus syntax (5w, 35d, 90s) or Go
// syntax (1h30m, 1.5s).
type durationFlag time.Duration

func (d *durationFlag) String() string {
	if d == nil || *d == 0 {
		return "0s"
	}
	return model.Duration(*d).String()
}

func (d *durationFlag) Set(s string) error {
	if v, err := model.ParseDuration(s); err == nil {
		*d = durationFlag(v)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration such as 90s, 1h30m or 5w", s)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative", s)
	}
	*d = durationFlag(v)
	return nil
}

// config turns the flags into the model's configuration and the stream's
// options; now is the real clock.
func (f *generateFlags) config(now time.Time) (traffic.Config, traffic.StreamOptions, error) {
	var errs []error
	backfill := time.Duration(f.backfill)
	start := now.Add(-backfill).Truncate(time.Millisecond)
	if f.start != "" {
		if t, err := time.Parse(time.RFC3339Nano, f.start); err != nil {
			errs = append(errs, fmt.Errorf("--start: %q is not an RFC 3339 time", f.start))
		} else {
			start = t
		}
	}
	cfg := traffic.Config{
		Seed:           f.seed,
		Start:          start,
		Scale:          f.scale,
		DuplicateRatio: f.duplicates,
		InvalidRatio:   f.invalid,
	}
	if f.scale == 0 {
		// The model reads 0 as 1; on the command line it is a mistake.
		errs = append(errs, errors.New("--scale: 0 is not > 0"))
	}
	if f.dropSegment != "" {
		seg, err := traffic.ParseSegment(f.dropSegment)
		if err != nil {
			errs = append(errs, fmt.Errorf("--drop.segment: %w", err))
			seg = map[string]string{"source": "paid_search"} // validate the rest
		}
		// The live phase starts at start+backfill in simulated time;
		// the drop comes --drop.after of real time later.
		after := time.Duration(f.dropAfter)
		if f.speed > 0 {
			after = time.Duration(float64(after) * f.speed)
		}
		cfg.Drop = &traffic.Drop{Segment: seg, Factor: f.dropFactor, At: start.Add(backfill + after), Volume: f.dropVolume}
	}
	opts := traffic.StreamOptions{
		Backfill: backfill,
		Speed:    f.speed,
		Rate:     f.rate,
		Count:    f.count,
		Duration: time.Duration(f.duration),
	}
	// The messages name the flags: model field names would puzzle.
	for _, err := range []error{cfg.Validate(), opts.Validate()} {
		if err != nil {
			errs = append(errs, flagNames(err))
		}
	}
	return cfg, opts, errors.Join(errs...)
}

// flagNames rewrites the field names of traffic's validation errors into the
// flags that set them.
func flagNames(err error) error {
	r := strings.NewReplacer(
		"drop.segment:", "--drop.segment:", "drop.factor:", "--drop.factor:",
		"duplicate ratio:", "--duplicates:", "invalid ratio:", "--invalid:",
		"scale:", "--scale:", "speed:", "--speed:", "rate:", "--rate:", "count:", "--count:",
		"backfill:", "--backfill:", "duration:", "--duration:", "start:", "--start:",
	)
	return errors.New(r.Replace(err.Error()))
}

// newTrafficWriter returns a kafka-go Writer tuned for throughput that keeps
// each entity's records on one partition, in order.
func newTrafficWriter(brokers []string, topic string) *kafka.Writer {
	return &kafka.Writer{
		Addr:                   kafka.TCP(brokers...),
		Topic:                  topic,
		Balancer:               &kafka.Hash{},
		AllowAutoTopicCreation: true,
		BatchSize:              5000,
		BatchBytes:             1 << 20,
		BatchTimeout:           5 * time.Millisecond,
		RequiredAcks:           kafka.RequireOne,
		WriteTimeout:           10 * time.Second,
	}
}

// runGenerate writes synthetic funnel traffic into a Kafka topic.
func runGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f generateFlags
	f.register(fs)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: funnelwatch generate [flags]

Writes synthetic funnel events (visits, leads, deals of 24 segments with daily
and weekly seasonality) into a Kafka topic: a simulated history first
(--backfill), then live traffic paced by --speed. See docs/demo.md.

Flags:`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("generate: unexpected arguments %q", fs.Args())
	}
	var brokers []string
	for b := range strings.SplitSeq(f.brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			brokers = append(brokers, b)
		}
	}
	if len(brokers) == 0 {
		return errors.New("generate: --brokers: empty")
	}
	if f.topic == "" {
		return errors.New("generate: --topic: empty")
	}
	cfg, opts, err := f.config(time.Now())
	if err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	m, err := traffic.New(cfg)
	if err != nil {
		return fmt.Errorf("generate: %w", err)
	}

	fmt.Fprintf(stderr, "generate: topic %s at %s, simulated start %s, backfill %s, speed %gx\n",
		f.topic, strings.Join(brokers, ","), cfg.Start.UTC().Format(time.RFC3339), model.Duration(opts.Backfill), opts.Speed)
	if d := cfg.Drop; d != nil {
		what := "visit→lead conversion"
		if d.Volume {
			what = "visit volume"
		}
		fmt.Fprintf(stderr, "generate: %s of %s drops to %g× at simulated %s\n", what, f.dropSegment, d.Factor, d.At.UTC().Format(time.RFC3339))
	}

	w := newTrafficWriter(brokers, f.topic)
	var prev traffic.Progress
	var last traffic.Progress
	opts.Progress = func(p traffic.Progress) {
		last = p
		if p.Done {
			return
		}
		rate := float64(p.Records-prev.Records) / (p.Elapsed - prev.Elapsed).Seconds()
		fmt.Fprintf(stderr, "%-8s %9.0f events/s  total %10d  simulated %s\n", p.Phase, rate, p.Records, p.SimTime.UTC().Format(time.RFC3339))
		prev = p
	}
	err = m.Stream(ctx, w, opts)
	if cerr := w.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close writer: %w", cerr)
	}
	// Being interrupted is the normal end of an unlimited run.
	if err != nil && !(errors.Is(err, context.Canceled) && ctx.Err() != nil) {
		return fmt.Errorf("generate: %w", err)
	}
	var rate float64
	if s := last.Elapsed.Seconds(); s > 0 {
		rate = float64(last.Records) / s
	}
	fmt.Fprintf(stdout, "wrote %d records (%.1f MB) to %s in %s (%.0f/s), simulated %s to %s\n",
		last.Records, float64(last.Bytes)/1e6, f.topic, last.Elapsed.Round(time.Millisecond), rate,
		cfg.Start.UTC().Format(time.RFC3339), last.SimTime.UTC().Format(time.RFC3339))
	return nil
}
