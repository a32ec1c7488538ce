package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"
	"gopkg.in/yaml.v3"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/processor/traffic"
	"github.com/funnelwatch/funnelwatch/store"
)

// benchRecordsPerHour is the traffic model's mean records per simulated
// hour at scale 1 (see traffic.Config.Scale): with it, --events and
// --history give the scale.
const benchRecordsPerHour = 7000

// runBench measures funnelwatch end to end against the raw consumption
// rate of kafka-go on the same embedded broker, in the same run: every run
// reads the preloaded topic once with bare kafka-go readers and once with
// funnelwatch, and the medians are compared. funnelwatch runs as a separate
// `funnelwatch run` process (so its CPU time and peak RSS are its own, not
// the broker's), or in the bench process with --in-process (for
// --cpuprofile).
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		events     = fs.Int("events", 2_000_000, "events to preload from the demo's traffic model")
		history    = durationFlag(35 * 24 * time.Hour)
		partitions = fs.Int("partitions", 6, "partitions of the topic")
		runs       = fs.Int("runs", 3, "measurements of each side; the median is reported")
		scale      = fs.Float64("scale", 0, "traffic model scale (0: the one that spreads --events over --history)")
		inProcess  = fs.Bool("in-process", false, "run funnelwatch in the bench process instead of a separate `funnelwatch run`")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile of the last funnelwatch run to this file (implies --in-process)")
		memProfile = fs.String("memprofile", "", "write a heap profile at the end of the last funnelwatch run to this file (implies --in-process)")
		freshness  = durationFlag(20 * time.Second)
		freshRate  = fs.Float64("freshness-rate", 0, "events/s of the live traffic of --freshness (0: half the measured rate); to compare builds at the same rate")
		dir        = fs.String("dir", "", "directory for the stores (default: a temporary one)")
		replicas   = fs.Int("replicas", 0, "run this many `funnelwatch run` processes in the scale-out mode (docs/scaling.md) instead of one without it")
	)
	fs.Var(&history, "history", "event time the preloaded events span")
	fs.Var(&freshness, "freshness", "after the runs, produce live traffic at half the measured rate for this long and measure how long records take to show in /metrics (0: skip)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cpuProfile != "" || *memProfile != "" {
		*inProcess = true
	}
	if !*inProcess {
		// The broker holds every preloaded record: a GOMEMLIMIT in the
		// environment is meant for the funnelwatch child, which inherits
		// it, not for this process.
		debug.SetMemoryLimit(math.MaxInt64)
	}
	if *scale == 0 {
		*scale = float64(*events) / (benchRecordsPerHour * time.Duration(history).Hours())
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "funnelwatch-bench")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(*partitions))
	if err != nil {
		return fmt.Errorf("bench: start broker: %w", err)
	}
	defer cluster.Close()
	brokers := cluster.ListenAddrs()

	fmt.Fprintf(stdout, "preloading %d events (%s of event time, scale %.3g) into %d partitions...\n", *events, model.Duration(history), *scale, *partitions)
	start := time.Now()
	histStart := time.Now().Add(-time.Duration(history)).Truncate(time.Hour)
	m, err := traffic.New(traffic.Config{Seed: 1, Start: histStart, Scale: *scale, DuplicateRatio: traffic.DefaultDuplicateRatio})
	if err != nil {
		return err
	}
	w := newTrafficWriter(brokers, demoTopic)
	var simEnd time.Time
	err = m.Stream(ctx, w, traffic.StreamOptions{Backfill: time.Duration(history), Count: int64(*events), Progress: func(p traffic.Progress) { simEnd = p.SimTime }})
	w.Close()
	if err != nil {
		return fmt.Errorf("bench: preload: %w", err)
	}
	fmt.Fprintf(stdout, "preloaded in %s: %s of event time\n", time.Since(start).Round(time.Millisecond), model.Duration(simEnd.Sub(histStart).Round(time.Hour)))

	if *replicas > 0 {
		return benchScaleOut(ctx, stdout, exe, brokers, *dir, *partitions, *events, *runs, *replicas)
	}
	var raw, fw []float64
	var last benchResult
	// The bench process's CPU while the baseline reads: the broker and the
	// readers, which share the machine as funnelwatch and the broker do.
	var rawCPU float64
	for i := 0; i < *runs; i++ {
		cpu0 := procCPU(os.Getpid())
		r, err := rawConsume(ctx, brokers, *partitions, *events)
		if err != nil {
			return err
		}
		rawCPU = procCPU(os.Getpid()) - cpu0
		raw = append(raw, r)
		cfg, err := benchConfig(brokers, filepath.Join(*dir, strconv.Itoa(i)), i)
		if err != nil {
			return err
		}
		var res benchResult
		if *inProcess {
			var prof io.Writer
			if *cpuProfile != "" && i == *runs-1 {
				f, err := os.Create(*cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				prof = f
			}
			var mem string
			if i == *runs-1 {
				mem = *memProfile
			}
			res, err = funnelwatchInProcess(ctx, cfg, *events, prof, mem)
		} else {
			keep := i == *runs-1
			res, err = funnelwatchProcess(ctx, exe, cfg, *events, keep)
		}
		if err != nil {
			return err
		}
		fw = append(fw, res.rate)
		last = res
		fmt.Fprintf(stdout, "run %d: kafka-go %.0f events/s, funnelwatch %.0f events/s (ratio %.2f); cpu %.1fs, peak RSS %.0f MiB\n",
			i+1, r, res.rate, res.rate/r, res.cpu, res.peakRSS)
	}
	mr, mf := median(raw), median(fw)
	rss := "peak RSS of funnelwatch run"
	if *inProcess {
		rss = "peak RSS of this process (with the broker)"
	}
	fmt.Fprintf(stdout, `
raw kafka-go consumption       %10.0f events/s (median of %d)
funnelwatch end to end         %10.0f events/s (median of %d)
ratio                          %10.2f
cpu seconds (last run)         %10.2f (%.2f µs per event)
%-30s %10.0f MiB (at the end: resident %.0f MiB, Go heap in use %.0f, from the OS %.0f, mapped outside it %.0f)
store size (last run)          %10.1f MiB
segments                       %10d
/metrics scrape (median of 5)  %10s (%d series, %d bytes)
client_golang, same series     %10s (ratio %.2f)
`, mr, len(raw), mf, len(fw), mf/mr, last.cpu, last.cpu/float64(*events)*1e6, rss, last.peakRSS, last.resident, last.heap, last.goSys, last.mapped,
		float64(last.storeBytes)/(1<<20), last.segments, last.scrape.Round(time.Microsecond), last.series, last.scrapeBytes,
		last.baseline.Round(time.Microsecond), float64(last.scrape)/float64(last.baseline))
	ev := float64(*events)
	fmt.Fprintf(stdout, "kafka-go side cpu (last run)   %10.2f (%.2f µs per event, %.1f cores: the broker and the readers)\n",
		rawCPU, rawCPU/ev*1e6, rawCPU/(ev/raw[len(raw)-1]))
	if !*inProcess {
		fmt.Fprintf(stdout, "broker cpu beside funnelwatch  %10.2f (%.2f µs per event: this process until funnelwatch was ready)\n", last.brokerCPU, last.brokerCPU/ev*1e6)
	}
	if last.proc == nil {
		return nil
	}
	restart, proc, err := measureRestart(ctx, exe, last.proc)
	if err != nil {
		return err
	}
	defer proc.stop()
	fmt.Fprintf(stdout, "restart to correct /metrics        %10s (last run's store, no replay)\n", restart.Round(time.Millisecond))
	if freshness == 0 {
		return nil
	}
	last.proc = proc
	rate := mf / 2
	if *freshRate > 0 {
		rate = *freshRate
	}
	fmt.Fprintf(stdout, "\nfreshness: %.0f events/s of live traffic for %s...\n", rate, model.Duration(freshness))
	// Live traffic in real time (the event clock follows the wall clock)
	// at the scale that gives the rate.
	// A fresh model has no returning visitors yet and follows the daily
	// curve: scale it up and cap it at the rate.
	live, err := traffic.New(traffic.Config{Seed: 2, Start: time.Now(), Scale: 3 * rate / benchRecordsPerHour * 3600, DuplicateRatio: traffic.DefaultDuplicateRatio})
	if err != nil {
		return err
	}
	lat, err := measureFreshness(ctx, last.proc, brokers, *partitions, live, rate, time.Duration(freshness))
	if err != nil {
		return err
	}
	if len(lat) == 0 {
		return errors.New("bench: freshness: no record was seen in /metrics")
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration {
		return lat[min(len(lat)-1, int(f*float64(len(lat))))].Round(time.Millisecond)
	}
	fmt.Fprintf(stdout, "records to /metrics: p50 %s, p99 %s, max %s (%d records, %.0f/s; flush_interval %s)\n",
		q(0.5), q(0.99), lat[len(lat)-1].Round(time.Millisecond), len(lat), float64(len(lat))/time.Duration(freshness).Seconds(),
		model.Duration(processor.D(last.proc.cfg.FlushInterval)))
	if got := float64(len(lat)) / time.Duration(freshness).Seconds(); got < 0.9*rate {
		// The producer shares the machine: the latencies then hold at a
		// lower rate than the one the figure is meant for.
		fmt.Fprintf(stdout, "note: the producer reached %.0f of the %.0f events/s asked; run again for the figure at half the rate\n", got, rate)
	}
	return nil
}

// benchConfig is the configuration of the benchmark: the defaults with the
// event clock (the preloaded history ends now, but replaying it must not
// depend on the wall clock) and the traffic model's three attributes as
// dimensions in seven breakdowns, about 200 segments.
func benchConfig(brokers []string, dir string, run int) (processor.Config, error) {
	cfg := processor.DefaultConfig()
	cfg.Kafka.Brokers = brokers
	cfg.Kafka.Group = "bench-" + strconv.Itoa(run) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	cfg.Kafka.Topics = []processor.TopicConfig{{Name: demoTopic}}
	cfg.Time.Clock = processor.ClockEvent
	cfg.Segments.Dimensions = []string{"source", "region", "campaign"}
	cfg.Segments.Breakdowns = [][]string{{}, {"source"}, {"region"}, {"campaign"}, {"source", "region"}, {"source", "campaign"}, {"source", "region", "campaign"}}
	cfg.Store.Dir = dir
	cfg.Web.ListenAddress = "127.0.0.1:0"
	cfg.Log.Level = "warn"
	return cfg, cfg.Validate()
}

type benchResult struct {
	rate float64 // records per second, from start to all applied
	cpu  float64 // seconds
	// brokerCPU is the bench process's CPU seconds while funnelwatch ran
	// in its own process: the broker serving it, and polling /readyz.
	brokerCPU   float64
	peakRSS     float64 // MiB
	storeBytes  uint64
	segments    int
	series      int
	scrape      time.Duration
	scrapeBytes int
	baseline    time.Duration // client_golang exposing the same series
	// MiB resident, in use by the Go heap, obtained by the Go runtime
	// from the OS, and mapped outside it (the entity table and the large
	// columns), at the end.
	resident, heap, goSys, mapped float64
	proc                          *fwProcess // still running, for the freshness phase
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
	// The clock stops at the last record, not when the readers have
	// closed: Close waits for a fetch in flight, up to its MaxWait.
	ends := make([]time.Time, partitions)
	for p := 0; p < partitions; p++ {
		g.Go(func() error {
			r := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, Topic: demoTopic, Partition: p, MinBytes: 1, MaxBytes: 16 << 20,
				MaxWait: 1500 * time.Millisecond, ReadLagInterval: -1, QueueCapacity: 4096}) // as processor's readers
			defer r.Close()
			for {
				m, err := r.FetchMessage(gctx)
				if err != nil {
					return err
				}
				counts[p]++
				if m.Offset+1 >= m.HighWaterMark {
					ends[p] = time.Now()
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
	return float64(total) / slices.MaxFunc(ends, time.Time.Compare).Sub(start).Seconds(), nil
}

// fwProcess is a `funnelwatch run` child process.
type fwProcess struct {
	cmd  *exec.Cmd
	cfg  processor.Config
	addr string // of its web server
	done chan error
}

func (p *fwProcess) url(path string) string { return "http://" + p.addr + path }

// stop ends the process with SIGTERM, as Kubernetes does.
func (p *fwProcess) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		return err
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		return <-p.done
	}
}

// funnelwatchProcess runs `funnelwatch run` on a fresh store until all n
// records are applied, then measures its CPU time, peak RSS and scrape.
// With keep the process is left running in the result.
func funnelwatchProcess(ctx context.Context, exe string, cfg processor.Config, n int, keep bool) (res benchResult, err error) {
	start, cpu0 := time.Now(), procCPU(os.Getpid())
	p, err := startFunnelwatch(exe, cfg)
	if err != nil {
		return res, err
	}
	defer func() {
		if !keep || err != nil {
			if serr := p.stop(); err == nil && serr != nil {
				err = fmt.Errorf("funnelwatch run: %w", serr)
			}
		}
	}()
	// Ready means: joined, and every partition applied up to the end it
	// had when assigned, i.e. the whole preload.
	for !get200(p.url("/readyz")) {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case err := <-p.done:
			p.done <- err
			return res, fmt.Errorf("funnelwatch run exited: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	res.rate = float64(n) / time.Since(start).Seconds()
	res.cpu, res.peakRSS = procCPU(p.cmd.Process.Pid), procPeakRSS(p.cmd.Process.Pid)
	res.brokerCPU = procCPU(os.Getpid()) - cpu0
	// Wait for the flush that stores the last offsets, then scrape.
	deadline := time.Now().Add(30 * time.Second)
	for {
		mfs, err := scrapeFamilies(p.url("/metrics"))
		if err == nil && sumFamily(mfs, "funnel_stored_offset") >= float64(n) {
			res.storeBytes = uint64(sumFamily(mfs, "funnel_store_disk_bytes"))
			res.resident = sumFamily(mfs, "process_resident_memory_bytes") / (1 << 20)
			res.heap = sumFamily(mfs, "go_memstats_heap_inuse_bytes") / (1 << 20)
			res.mapped = sumFamily(mfs, "funnel_memory_mapped_bytes") / (1 << 20)
			res.goSys = sumFamily(mfs, "go_memstats_sys_bytes") / (1 << 20)
			break
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("the stored offsets did not reach %d in 30s (%v)", n, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := measureScrape(&res, p.url("/metrics")); err != nil {
		return res, err
	}
	if keep {
		res.proc = p
	}
	return res, nil
}

// startFunnelwatch writes cfg next to its store, with a free web port, and
// starts `funnelwatch run` on it.
func startFunnelwatch(exe string, cfg processor.Config) (*fwProcess, error) {
	if err := os.MkdirAll(cfg.Store.Dir, 0o755); err != nil {
		return nil, err
	}
	// A free port, so that the child's address is known.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg.Web.ListenAddress = addr
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	file := filepath.Join(filepath.Dir(cfg.Store.Dir), filepath.Base(cfg.Store.Dir)+".yaml")
	if err := os.WriteFile(file, b, 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "run", "--config.file", file)
	cmd.Stderr = os.Stderr
	p := &fwProcess{cmd: cmd, cfg: cfg, addr: addr, done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start funnelwatch run: %w", err)
	}
	go func() { p.done <- cmd.Wait() }()
	return p, nil
}

// segmentPrefixes name the per-segment counts, which a restart must serve
// again exactly as before. The outputs of degradation detection (baseline,
// z-score, degraded) are left out: on the event clock they are evaluated
// at bucket boundaries, so before the restart they can predate records
// applied since the last boundary, while the restart evaluates them on the
// final state.
var segmentPrefixes = []string{"funnel_window_", "funnel_cohort_", "funnel_events_total", "funnel_time_to_convert_seconds"}

// segmentExposition returns the per-segment lines of a scrape, sorted.
func segmentExposition(url string) ([]string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, pre := range segmentPrefixes {
			if strings.HasPrefix(l, pre) {
				out = append(out, l)
				break
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// measureRestart stops p gracefully, starts `funnelwatch run` again on its
// store and returns the time from that start until /metrics serves the
// per-segment series p served before it stopped, with the new process.
func measureRestart(ctx context.Context, exe string, p *fwProcess) (time.Duration, *fwProcess, error) {
	want, err := segmentExposition(p.url("/metrics"))
	if err != nil {
		return 0, nil, err
	}
	if err := p.stop(); err != nil {
		return 0, nil, fmt.Errorf("stop funnelwatch run: %w", err)
	}
	start := time.Now()
	q, err := startFunnelwatch(exe, p.cfg)
	if err != nil {
		return 0, nil, err
	}
	for {
		got, err := segmentExposition(q.url("/metrics"))
		if err == nil && slices.Equal(got, want) {
			return time.Since(start), q, nil
		}
		if time.Since(start) > time.Minute {
			q.stop()
			if err == nil {
				err = fmt.Errorf("per-segment lines differ:\n%s", lineDiff(want, got, 20))
			}
			return 0, nil, fmt.Errorf("restart: correct metrics not served within a minute: %w", err)
		}
		select {
		case <-ctx.Done():
			q.stop()
			return 0, nil, ctx.Err()
		case err := <-q.done:
			q.done <- err
			return 0, nil, fmt.Errorf("funnelwatch run exited after a restart: %v", err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// lineDiff lists up to n lines of want missing from got (-) and of got
// missing from want (+); both are sorted.
func lineDiff(want, got []string, n int) string {
	var out []string
	i, j := 0, 0
	for (i < len(want) || j < len(got)) && len(out) < n {
		switch {
		case j == len(got) || (i < len(want) && want[i] < got[j]):
			out = append(out, "- "+want[i])
			i++
		case i == len(want) || got[j] < want[i]:
			out = append(out, "+ "+got[j])
			j++
		default:
			i++
			j++
		}
	}
	return strings.Join(out, "\n")
}

func get200(url string) bool {
	resp, err := http.Get(url)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// scrapeFamilies scrapes and parses a text exposition.
func scrapeFamilies(url string) (map[string]*dto.MetricFamily, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	return parser.TextToMetricFamilies(resp.Body)
}

func sumFamily(mfs map[string]*dto.MetricFamily, name string) float64 {
	var n float64
	for _, m := range mfs[name].GetMetric() {
		n += m.GetGauge().GetValue() + m.GetCounter().GetValue() + m.GetUntyped().GetValue()
	}
	return n
}

// measureScrape times /metrics (median of 5) and client_golang serving
// the same series as constant metrics over HTTP (median of 5), and counts
// the segments.
func measureScrape(res *benchResult, url string) error {
	mfs, err := scrapeFamilies(url)
	if err != nil {
		return err
	}
	segs := map[string]bool{}
	for _, m := range mfs["funnel_events_total"].GetMetric() {
		var id []string
		for _, lp := range m.GetLabel() {
			if lp.GetName() != "step" {
				id = append(id, lp.GetName()+"="+lp.GetValue())
			}
		}
		segs[strings.Join(id, ",")] = true
	}
	res.segments = len(segs)
	var fams []*dto.MetricFamily
	for _, mf := range mfs {
		fams = append(fams, mf)
		res.series += len(mf.GetMetric())
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newConstCollector(fams))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	defer srv.Close()
	timed := func(url string) (time.Duration, int, error) {
		var ds []float64
		n := 0
		for range 5 {
			t0 := time.Now()
			resp, err := http.Get(url)
			if err != nil {
				return 0, 0, err
			}
			k, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			ds = append(ds, float64(time.Since(t0)))
			n = int(k)
		}
		return time.Duration(median(ds)), n, nil
	}
	if res.scrape, res.scrapeBytes, err = timed(url); err != nil {
		return err
	}
	res.baseline, _, err = timed("http://" + l.Addr().String() + "/metrics")
	return err
}

// constCollector serves fixed series the way a typical exporter does:
// MustNewConstMetric for every series at every scrape.
type constCollector struct{ series []constSeries }

type constSeries struct {
	desc   *prometheus.Desc
	typ    prometheus.ValueType
	value  float64
	labels []string
	hist   *dto.Histogram
}

func newConstCollector(mfs []*dto.MetricFamily) *constCollector {
	c := &constCollector{}
	for _, mf := range mfs {
		descs := map[string]*prometheus.Desc{}
		for _, m := range mf.GetMetric() {
			var names, values []string
			for _, lp := range m.GetLabel() {
				names = append(names, lp.GetName())
				values = append(values, lp.GetValue())
			}
			key := strings.Join(names, ",")
			if descs[key] == nil {
				descs[key] = prometheus.NewDesc(mf.GetName(), mf.GetHelp(), names, nil)
			}
			s := constSeries{desc: descs[key], labels: values}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				s.typ, s.value = prometheus.CounterValue, m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				s.typ, s.value = prometheus.GaugeValue, m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				s.hist = m.GetHistogram()
			default:
				s.typ, s.value = prometheus.UntypedValue, m.GetUntyped().GetValue()
			}
			c.series = append(c.series, s)
		}
	}
	return c
}

func (c *constCollector) Describe(chan<- *prometheus.Desc) {}

func (c *constCollector) Collect(ch chan<- prometheus.Metric) {
	for i := range c.series {
		s := &c.series[i]
		if s.hist != nil {
			buckets := map[float64]uint64{}
			for _, b := range s.hist.GetBucket() {
				buckets[b.GetUpperBound()] = b.GetCumulativeCount()
			}
			ch <- prometheus.MustNewConstHistogram(s.desc, s.hist.GetSampleCount(), s.hist.GetSampleSum(), buckets, s.labels...)
			continue
		}
		ch <- prometheus.MustNewConstMetric(s.desc, s.typ, s.value, s.labels...)
	}
}

// measureFreshness streams the live traffic of m for d and returns, for every record, the time from the producer's
// acknowledgement to the first scrape whose funnel_stored_offset (moved by
// the flush that also moves the windows) covers it. Scrapes come every half
// flush interval, so a latency is at most that much above the true one.
func measureFreshness(ctx context.Context, p *fwProcess, brokers []string, partitions int, m *traffic.Model, rate float64, d time.Duration) ([]time.Duration, error) {
	type ack struct {
		at     time.Time
		counts []int64 // per partition, cumulative
	}
	base := make([]int64, partitions)
	mfs, err := scrapeFamilies(p.url("/metrics"))
	if err != nil {
		return nil, err
	}
	for _, mm := range mfs["funnel_stored_offset"].GetMetric() {
		if i := partitionLabel(mm); i < partitions {
			base[i] = int64(mm.GetGauge().GetValue())
		}
	}
	acks := make(chan ack, 1024)
	w := &ackWriter{w: newTrafficWriter(brokers, demoTopic), partitions: partitions, counts: make([]int64, partitions), acks: func(at time.Time, c []int64) {
		acks <- ack{at, c}
	}}
	w.w.BatchTimeout = time.Millisecond
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(acks)
		defer w.w.Close()
		// About 50 acknowledged writes a second whatever the rate: one
		// write waits for its acknowledgement, so small batches cap the
		// rate far below the one asked for.
		return m.Stream(gctx, w, traffic.StreamOptions{Speed: 1, Rate: rate, Duration: d, BatchSize: max(100, int(rate/50))})
	})
	var lat []time.Duration
	g.Go(func() error {
		var pending []ack
		prev := make([]int64, partitions) // counts of the last visible ack
		// A scrape of the whole exposition costs the process tens of
		// milliseconds of CPU: polling much faster than flushes happen
		// would measure the poller's load. Every half flush interval
		// overstates a latency by at most that much.
		tick := time.NewTicker(max(100*time.Millisecond, processor.D(p.cfg.FlushInterval)/2))
		defer tick.Stop()
		for {
			select {
			case a, ok := <-acks:
				if ok {
					pending = append(pending, a)
				} else {
					acks = nil
				}
				continue
			case <-gctx.Done():
				return nil
			case <-tick.C:
			}
			if acks == nil && len(pending) == 0 {
				return nil
			}
			mfs, err := scrapeFamilies(p.url("/metrics"))
			if err != nil {
				return err
			}
			now := time.Now()
			stored := make([]int64, partitions)
			for _, mm := range mfs["funnel_stored_offset"].GetMetric() {
				if i := partitionLabel(mm); i < partitions {
					stored[i] = int64(mm.GetGauge().GetValue()) - base[i]
				}
			}
			// An acknowledged batch is visible once every partition's
			// stored offset covers what had been written to it.
			for len(pending) > 0 {
				a := pending[0]
				covered := true
				for i, c := range a.counts {
					covered = covered && stored[i] >= c
				}
				if !covered {
					break
				}
				var k int64
				for i, c := range a.counts {
					k += c - prev[i]
				}
				prev = a.counts
				for range k {
					lat = append(lat, now.Sub(a.at))
				}
				pending = pending[1:]
			}
			if acks == nil && len(pending) > 0 && now.Sub(pending[len(pending)-1].at) > 60*time.Second {
				return fmt.Errorf("freshness: %d batches not visible after 60s", len(pending))
			}
		}
	})
	return lat, g.Wait()
}

func partitionLabel(m *dto.Metric) int {
	for _, lp := range m.GetLabel() {
		if lp.GetName() == "partition" {
			i, err := strconv.Atoi(lp.GetValue())
			if err == nil {
				return i
			}
		}
	}
	return 1 << 30
}

// ackWriter counts the records acknowledged per partition, computing each
// record's partition with the writer's balancer.
type ackWriter struct {
	w          *kafka.Writer
	partitions int
	counts     []int64
	acks       func(at time.Time, counts []int64)
}

func (a *ackWriter) WriteMessages(ctx context.Context, msgs ...kafka.Message) error {
	if err := a.w.WriteMessages(ctx, msgs...); err != nil {
		return err
	}
	parts := make([]int, a.partitions)
	for i := range parts {
		parts[i] = i
	}
	var h kafka.Hash
	for _, m := range msgs {
		a.counts[h.Balance(m, parts...)]++
	}
	a.acks(time.Now(), slices.Clone(a.counts))
	return nil
}

// funnelwatchInProcess runs the processor and consumer in this process on
// a fresh store until n records are applied and flushed.
func funnelwatchInProcess(ctx context.Context, cfg processor.Config, n int, prof io.Writer, memProfile string) (benchResult, error) {
	st, err := store.Open(cfg.Store.Dir, store.Options{})
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
	cpu0 := procCPU(os.Getpid())
	start := time.Now()
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	var res benchResult
	for !c.Ready() {
		if ctx.Err() != nil {
			cancel()
			_ = g.Wait()
			return res, ctx.Err()
		}
		time.Sleep(10 * time.Millisecond)
	}
	res.rate = float64(n) / time.Since(start).Seconds()
	res.cpu = procCPU(os.Getpid()) - cpu0
	if err := p.Flush(ctx); err != nil {
		cancel()
		_ = g.Wait()
		return res, err
	}
	srv := httpServer(processor.NewServer(cfg.Web, p, nil, reg, nil).Handler())
	defer srv.close()
	if err := measureScrape(&res, srv.url+"/metrics"); err != nil {
		return res, err
	}
	res.peakRSS = procPeakRSS(os.Getpid())
	if memProfile != "" {
		f, err := os.Create(memProfile)
		if err != nil {
			return res, err
		}
		err = pprof.Lookup("heap").WriteTo(f, 0)
		f.Close()
		if err != nil {
			return res, err
		}
	}
	cancel()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		return res, err
	}
	res.storeBytes = st.DiskBytes()
	return res, nil
}

type testServer struct {
	url string
	srv *http.Server
}

func (s *testServer) close() { s.srv.Close() }

func httpServer(h http.Handler) *testServer {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	return &testServer{url: "http://" + l.Addr().String(), srv: srv}
}

// procCPU is the user and system CPU seconds of a process so far.
func procCPU(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name may hold spaces: the fields start after ')'.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	const ticks = 100 // USER_HZ on Linux
	return (utime + stime) / ticks
}

// procPeakRSS is a process's peak resident set size (VmHWM) in MiB.
func procPeakRSS(pid int) float64 {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, "VmHWM:") {
			kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
			return kb / 1024
		}
	}
	return 0
}
