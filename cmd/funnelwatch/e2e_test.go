package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
)

// These tests run the real binary, built once per test run.
var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "funnelwatch-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "funnelwatch")
		cmd := exec.Command("go", "build", "-o", binPath, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// startBroker runs `funnelwatch broker` as its own process: kfake inside
// a race-instrumented test process is too slow to keep a consumer group
// alive.
func startBroker(t testing.TB, partitions int) []string {
	t.Helper()
	addr := freePort(t)
	cmd := exec.Command(binary(t), "broker", "--listen-address", addr, "--partitions", strconv.Itoa(partitions), "--group.min-session-timeout", "200ms")
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.tail(1<<10), "listening") {
		if time.Now().After(deadline) {
			t.Fatalf("broker did not start: %s", out.tail(1<<10))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return []string{addr}
}

func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// syntheticEvents makes n deterministic events over ~n/2 seconds of event
// time: visits first-touching a segment, repeat visits with other
// attributes, leads and deals without attributes, and a few duplicates.
func syntheticEvents(n int, seed uint64) []kafka.Message {
	rng := rand.New(rand.NewPCG(seed, 1))
	sources := []string{"ads", "seo", "social", "email"}
	regions := []string{"emea", "na", "apac"}
	base := time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC)
	msgs := make([]kafka.Message, 0, n)
	for i := 0; len(msgs) < n; i++ {
		ent := fmt.Sprintf("ent-%d", rng.IntN(n/6+1))
		ts := base.Add(time.Duration(i) * 500 * time.Millisecond).Format(time.RFC3339Nano)
		var v string
		switch r := rng.IntN(100); {
		case r < 70:
			v = fmt.Sprintf(`{"id":"v-%d","type":"visit","entity":%q,"time":%q,"segment":{"source":%q,"region":%q}}`,
				i, ent, ts, sources[rng.IntN(len(sources))], regions[rng.IntN(len(regions))])
		case r < 90:
			v = fmt.Sprintf(`{"id":"l-%d","type":"lead","entity":%q,"time":%q}`, i, ent, ts)
		case r < 97:
			v = fmt.Sprintf(`{"id":"d-%d","type":"deal","entity":%q,"time":%q,"value":%d}`, i, ent, ts, 100+rng.IntN(5000))
		case r < 99 && len(msgs) > 0:
			msgs = append(msgs, msgs[rng.IntN(len(msgs))]) // a redelivery
			continue
		default:
			v = `{"type":"visit"}`
		}
		msgs = append(msgs, kafka.Message{Key: []byte(ent), Value: []byte(v)})
	}
	return msgs
}

func produceMessages(t testing.TB, brokers []string, topic string, msgs []kafka.Message) {
	t.Helper()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{}, AllowAutoTopicCreation: true,
		BatchTimeout: time.Millisecond, BatchSize: 5000, BatchBytes: 4 << 20}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for len(msgs) > 0 {
		chunk := msgs[:min(len(msgs), 20000)]
		if err := w.WriteMessages(ctx, chunk...); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("produce: %v", err)
			}
			time.Sleep(100 * time.Millisecond) // the topic is being created
			continue
		}
		msgs = msgs[len(chunk):]
	}
}

// proc is one funnelwatch process.
type proc struct {
	cmd  *exec.Cmd
	addr string
	done chan error
}

func writeConfig(t testing.TB, dir string, brokers []string, group, listen, extra string) string {
	t.Helper()
	cfg := fmt.Sprintf(`kafka:
  brokers: [%s]
  group: %s
  topics: [{name: events}]
  session_timeout: 1s
  heartbeat_interval: 200ms
  rebalance_timeout: 3s
time: {clock: event}
store: {dir: %s}
flush_interval: 100ms
web: {listen_address: %q}
log: {level: info, format: logfmt}
%s`, strings.Join(brokers, ", "), group, filepath.Join(dir, "store"), listen, extra)
	path := filepath.Join(dir, "funnelwatch.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func startProc(t testing.TB, cfgPath, addr string, logw io.Writer) *proc {
	t.Helper()
	cmd := exec.Command(binary(t), "run", "--config.file", cfgPath)
	cmd.Stdout, cmd.Stderr = logw, logw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, addr: addr, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) kill() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		p.done <- nil
	}
}

func (p *proc) terminate(t testing.TB) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("funnelwatch exited with %v after SIGTERM", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("funnelwatch did not stop within 30s of SIGTERM")
	}
}

// scrape returns the exposition lines of the given metric name prefixes,
// sorted, or an error when the process does not answer.
func scrape(addr string, prefixes ...string) ([]string, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var lines []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
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
	return lines, sc.Err()
}

func consumedOf(addr string) int {
	lines, err := scrape(addr, "funnel_records_consumed_total")
	if err != nil {
		return -1
	}
	n := 0.0
	for _, l := range lines {
		f, _ := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		n += f
	}
	return int(n)
}

// finalSeries are compared between a run with faults and one without.
var finalSeries = []string{
	"funnel_window_", "funnel_cohort_", "funnel_events_total", "funnel_time_to_convert_seconds",
	"funnel_records_consumed_total", "funnel_events_applied_total", "funnel_events_invalid_total",
	"funnel_events_duplicate_total", "funnel_events_late_total", "funnel_entities_tracked",
	"funnel_stored_offset", "funnel_clock_timestamp_seconds", "funnel_dimension_overflow_total",
}

// runToEnd waits until the process consumed n records and its stored
// offsets cover them, then returns the final series.
func runToEnd(t testing.TB, p *proc, n int) []string {
	t.Helper()
	deadline := time.Now().Add(120 * time.Second)
	for {
		if consumedOf(p.addr) >= n {
			// One more flush interval makes the stored offsets final.
			time.Sleep(500 * time.Millisecond)
			lines, err := scrape(p.addr, finalSeries...)
			if err != nil {
				t.Fatal(err)
			}
			return lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d of %d records after 120s", consumedOf(p.addr), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCrashRecovery SIGKILLs funnelwatch at random moments while it
// consumes, restarts it on the same store each time, and expects final
// numbers equal to a run without faults: nothing lost, nothing counted
// twice.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n = 300_000
	brokers := startBroker(t, 3)
	produceMessages(t, brokers, "events", syntheticEvents(n, 7))
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})

	cleanDir := t.TempDir()
	addr := freePort(t)
	clean := startProc(t, writeConfig(t, cleanDir, brokers, "clean", addr, ""), addr, logs)
	want := runToEnd(t, clean, n)
	clean.terminate(t)

	dir := t.TempDir()
	addr = freePort(t)
	cfg := writeConfig(t, dir, brokers, "faulty", addr, "")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	kills := 0
	for progress := 0; kills < 8; {
		p := startProc(t, cfg, addr, logs)
		target := progress + 15_000 + rng.IntN(25_000)
		if target >= n {
			p.kill()
			break
		}
		deadline := time.Now().Add(60 * time.Second)
		for c := consumedOf(addr); c < target; c = consumedOf(addr) {
			if time.Now().After(deadline) {
				t.Fatalf("no progress to %d records after restart (at %d)", target, c)
			}
			time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
		}
		// Anywhere from just after the check to a few flushes later.
		time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
		p.kill()
		kills++
		progress = target
	}
	if kills < 5 {
		t.Fatalf("only %d kills happened", kills)
	}
	final := startProc(t, cfg, addr, logs)
	got := runToEnd(t, final, n)
	final.terminate(t)
	t.Logf("%d SIGKILLs while consuming %d records", kills, n)
	if d := diff(want, got); d != "" {
		t.Errorf("final series differ from the run without faults:\n%s", d)
	}
}

func diff(want, got []string) string {
	var out []string
	for _, l := range want {
		if !slices.Contains(got, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range got {
		if !slices.Contains(want, l) {
			out = append(out, "+ "+l)
		}
	}
	if len(out) > 40 {
		out = append(out[:40], fmt.Sprintf("... and %d more", len(out)-40))
	}
	return strings.Join(out, "\n")
}

// lockedBuffer collects the logs of the processes a test starts.
type lockedBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	return len(p), nil
}

func (b *lockedBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf[max(0, len(b.buf)-n):])
}
