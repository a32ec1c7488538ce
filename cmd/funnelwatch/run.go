package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/segmentio/kafka-go"
	"golang.org/x/sync/errgroup"
	"gopkg.in/yaml.v3"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

// version and revision are stamped at build time:
// go build -ldflags "-X main.version=v1.2.3 -X main.revision=abc123".
var version, revision string

func buildRevision() string {
	if revision != "" {
		return revision
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return ""
}

// configFlags are the process-level settings that flags override (SPEC §7).
type configFlags struct {
	file, listen, webConfig, storeDir, brokers, logLevel, logFormat string
}

func (c *configFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.file, "config.file", "", "path of funnelwatch.yaml (defaults apply to every key it leaves out)")
	fs.StringVar(&c.listen, "web.listen-address", "", "override web.listen_address")
	fs.StringVar(&c.webConfig, "web.config.file", "", "exporter-toolkit web config file for TLS and basic auth (overrides web.config_file)")
	fs.StringVar(&c.storeDir, "store.dir", "", "override store.dir")
	fs.StringVar(&c.brokers, "kafka.brokers", "", "override kafka.brokers (comma-separated)")
	fs.StringVar(&c.logLevel, "log.level", "", "override log.level (debug, info, warn, error)")
	fs.StringVar(&c.logFormat, "log.format", "", "override log.format (json, logfmt)")
}

// load reads the config file (or the defaults), applies the flags and
// validates the result.
func (c *configFlags) load() (processor.Config, error) {
	var b []byte
	if c.file != "" {
		var err error
		if b, err = os.ReadFile(c.file); err != nil {
			return processor.Config{}, fmt.Errorf("read config: %w", err)
		}
	}
	return c.parse(b)
}

func (c *configFlags) parse(b []byte) (processor.Config, error) {
	cfg, err := processor.ParseConfig(b)
	if err != nil && c.file != "" {
		err = fmt.Errorf("config %q: %w", c.file, err)
	}
	if err != nil {
		return cfg, err
	}
	if c.listen != "" {
		cfg.Web.ListenAddress = c.listen
	}
	if c.webConfig != "" {
		cfg.Web.ConfigFile = c.webConfig
	}
	if c.storeDir != "" {
		cfg.Store.Dir = c.storeDir
	}
	if c.brokers != "" {
		cfg.Kafka.Brokers = strings.Split(c.brokers, ",")
	}
	if c.logLevel != "" {
		cfg.Log.Level = c.logLevel
	}
	if c.logFormat != "" {
		cfg.Log.Format = c.logFormat
	}
	return cfg, cfg.Validate()
}

func newLogger(w io.Writer, cfg processor.LogConfig) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func runRun(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf configFlags
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	logger := newLogger(stderr, cfg.Log)
	if _, ok := os.LookupEnv("GOGC"); !ok {
		debug.SetGCPercent(defaultGCPercent)
	}
	return serve(ctx, cfg, logger, nil)
}

// defaultGCPercent is the GOGC of funnelwatch run when the environment
// sets none. Much of the heap is pointer-free (Pebble's memtables and
// block cache, the small evaluation columns; the entity table and the
// large columns are mapped outside it), so a collection has little to
// mark: collecting after 25% growth instead of Go's 100% cut the peak RSS
// of a catch-up by a third for a few percent of CPU, and 35% gives back
// nothing measurable of that CPU now (docs/performance.md, Memory).
// Prometheus lowers its GOGC for the same reason.
const defaultGCPercent = 25

// memoryLimitEvery is how often limitMemory follows the mapped memory: it
// grows with the entity cache and the columns, over minutes.
const memoryLimitEvery = time.Second

// limitMemory keeps the Go runtime's soft memory limit at limit (the
// GOMEMLIMIT the deployment derives from the container's limit) minus
// mapped(), the memory the processors map outside the Go heap, which the
// runtime does not count: otherwise the runtime would collect harder only
// once the Go heap alone reached the limit, after the kernel had killed
// the process. It leaves the Go runtime at least half the limit, below
// which collecting harder would only burn CPU. It checks every interval
// and returns when ctx is done, with the limit set back to limit.
func limitMemory(ctx context.Context, limit int64, mapped func() int64, every time.Duration) error {
	defer debug.SetMemoryLimit(limit)
	t := time.NewTicker(every)
	defer t.Stop()
	set := int64(-1)
	for {
		// Moves below a MiB are not worth the runtime's work of setting it.
		if want := max(limit-mapped(), limit/2); set < 0 || max(want-set, set-want) >= 1<<20 {
			debug.SetMemoryLimit(want)
			set = want
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// serve runs the processor, the consumer and the web server until ctx is
// done. When l is not nil the web server uses it instead of listening on
// the configured address.
func serve(ctx context.Context, cfg processor.Config, logger *slog.Logger, l net.Listener) error {
	st, err := store.Open(cfg.Store.Dir, store.Options{Logger: logger})
	if err != nil {
		return err
	}
	defer st.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := processor.Options{Logger: logger, Registerer: reg, Version: version, Revision: buildRevision()}
	if cfg.Kafka.DeadLetterTopic != "" {
		transport, err := cfg.Kafka.Transport()
		if err != nil {
			return err
		}
		w := &kafka.Writer{
			Addr:                   kafka.TCP(cfg.Kafka.Brokers...),
			Transport:              transport,
			AllowAutoTopicCreation: true,
			RequiredAcks:           kafka.RequireAll,
			BatchTimeout:           10 * time.Millisecond,
		}
		defer w.Close()
		opts.DeadLetter = w
	}
	if cfg.ScaleOut.Enabled {
		return serveScaleOut(ctx, cfg, logger, l, st, reg, opts)
	}
	start := time.Now()
	p, err := processor.New(cfg, st, opts)
	if err != nil {
		return err
	}
	logger.Info("store loaded", "dir", cfg.Store.Dir, "took", time.Since(start).Round(time.Millisecond))
	c, err := processor.NewConsumer(cfg, p, logger)
	if err != nil {
		return err
	}
	srv := processor.NewServer(cfg.Web, p, c, reg, logger)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	if limit := debug.SetMemoryLimit(-1); limit < math.MaxInt64 {
		g.Go(func() error { return limitMemory(gctx, limit, p.MappedBytes, memoryLimitEvery) })
	}
	g.Go(func() error {
		if l != nil {
			return srv.Serve(gctx, l)
		}
		return srv.Run(gctx)
	})
	logger.Info("funnelwatch running", "version", version, "listen", cfg.Web.ListenAddress, "brokers", cfg.Kafka.Brokers, "group", cfg.Kafka.Group)
	err = g.Wait()
	logger.Info("funnelwatch stopped")
	return err
}

// serveScaleOut is serve in the scale-out mode (docs/scaling.md): stage 1
// in the store directory, stage 2 in its "segments" subdirectory.
func serveScaleOut(ctx context.Context, cfg processor.Config, logger *slog.Logger, l net.Listener, st *store.Store, reg *prometheus.Registry, opts processor.Options) error {
	segDir := filepath.Join(cfg.Store.Dir, "segments")
	st2, err := store.Open(segDir, store.Options{Logger: logger})
	if err != nil {
		return err
	}
	defer st2.Close()
	start := time.Now()
	so, err := processor.NewScaleOut(cfg, st, st2, opts)
	if err != nil {
		return err
	}
	logger.Info("stores loaded", "dir", cfg.Store.Dir, "segments_dir", segDir, "took", time.Since(start).Round(time.Millisecond))
	c, err := processor.NewConsumer(cfg, so.Entities(), logger)
	if err != nil {
		return err
	}
	so.Attach(c)
	srv := processor.NewServer(cfg.Web, so.Segments(), c, reg, logger)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return so.Run(gctx) })
	if limit := debug.SetMemoryLimit(-1); limit < math.MaxInt64 {
		mapped := func() int64 { return so.Entities().MappedBytes() + so.Segments().MappedBytes() }
		g.Go(func() error { return limitMemory(gctx, limit, mapped, memoryLimitEvery) })
	}
	g.Go(func() error {
		if l != nil {
			return srv.Serve(gctx, l)
		}
		return srv.Run(gctx)
	})
	logger.Info("funnelwatch running (scale-out)", "version", version, "listen", cfg.Web.ListenAddress, "brokers", cfg.Kafka.Brokers, "group", cfg.Kafka.Group, "deltas_topic", cfg.ScaleOut.Topic(cfg.Kafka.Group))
	err = g.Wait()
	logger.Info("funnelwatch stopped")
	return err
}

func runCheckConfig(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("check-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf configFlags
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("print config: %w", err)
	}
	fmt.Fprintf(stdout, "# configuration is valid; effective values including defaults:\n%s", out)
	return nil
}

func runInspect(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf configFlags
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	if _, err := os.Stat(cfg.Store.Dir); err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	st, err := store.Open(cfg.Store.Dir, store.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer st.Close()
	return processor.Inspect(stdout, cfg, st)
}
