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
	"runtime"
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

// produceMessages writes msgs to topic, each acknowledged by the broker
// (kafka-go's writer does not wait for acks by default): records written
// just before a fault must not be lost on the producer's side.
func produceMessages(t testing.TB, brokers []string, topic string, msgs []kafka.Message) {
	t.Helper()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{}, AllowAutoTopicCreation: true,
		BatchTimeout: time.Millisecond, BatchSize: 5000, BatchBytes: 4 << 20, RequiredAcks: kafka.RequireAll}
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

// writeConfig writes the configuration of a test process to dir: the
// broker, group, store in dir and listen address given, and extra YAML,
// whose top-level keys replace those of the same name here.
func writeConfig(t testing.TB, dir string, brokers []string, group, listen, extra string) string {
	t.Helper()
	base := fmt.Sprintf(`kafka:
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
`, strings.Join(brokers, ", "), group, filepath.Join(dir, "store"), listen)
	var cfg strings.Builder
	skip := false
	for _, l := range strings.SplitAfter(base, "\n") {
		if !strings.HasPrefix(l, " ") {
			key, _, _ := strings.Cut(l, ":")
			skip = key != "" && (strings.HasPrefix(extra, key+":") || strings.Contains(extra, "\n"+key+":"))
		}
		if !skip {
			cfg.WriteString(l)
		}
	}
	cfg.WriteString(extra)
	path := filepath.Join(dir, "funnelwatch.yaml")
	if err := os.WriteFile(path, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func startProc(t testing.TB, cfgPath, addr string, logw io.Writer) *proc {
	t.Helper()
	return startProcEnv(t, cfgPath, addr, logw, nil)
}

// startProcEnv is startProc with env in place of the test's environment
// when not nil.
func startProcEnv(t testing.TB, cfgPath, addr string, logw io.Writer, env []string) *proc {
	t.Helper()
	cmd := exec.Command(binary(t), "run", "--config.file", cfgPath)
	cmd.Stdout, cmd.Stderr, cmd.Env = logw, logw, env
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
	return sumOf(lines, "funnel_records_consumed_total")
}

// sumOf sums the values of the series of family name in scraped lines.
func sumOf(lines []string, name string) int {
	n := 0.0
	for _, l := range lines {
		if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
			f, _ := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
			n += f
		}
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
	var prev []string
	for {
		if consumedOf(p.addr) >= n {
			// Consumed is not yet stored: the series are final once a
			// flush stored every offset and moved the windows, which
			// a loaded machine can delay well past flush_interval. Two
			// equal scrapes after that make sure the flush is over.
			lines, err := scrape(p.addr, finalSeries...)
			if err != nil {
				t.Fatal(err)
			}
			// The stored offsets sum to the records stored when every
			// partition started at offset 0.
			if sumOf(lines, "funnel_stored_offset") >= n && slices.Equal(lines, prev) {
				return lines
			}
			prev = lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d of %d records after 120s", consumedOf(p.addr), n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// killKind is where in a funnelwatch process's life a SIGKILL landed, as
// seen from outside: by the broker (is the group rebalancing?) and by the
// kernel (is a thread writing the store's write-ahead log?).
type killKind int

const (
	killConsuming killKind = iota // consuming, nothing else observed
	killFlush                     // a thread in a write or sync of the store's WAL: a flush committing
	killJoin                      // right after start, the group rebalancing for it: the initial join
	killRebalance                 // while consuming, the group rebalancing because another member joined
	numKillKinds
)

func (k killKind) String() string {
	return [...]string{"consuming", "flush", "initial join", "rebalance"}[k]
}

// TestCrashRecovery SIGKILLs funnelwatch 24 times while it consumes, at
// moments of four kinds (plain consumption, inside a flush, during the
// initial group join, during a rebalance caused by another member joining),
// restarts it on the same store each time, and expects final numbers equal
// to a run without faults: nothing lost, nothing counted twice.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const (
		n     = 200_000
		kills = 24
		// minPerKind kills of each kind must have been observed.
		minPerKind = 3
	)
	start := time.Now()
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
	cleanTook := time.Since(start)

	dir := t.TempDir()
	storeDir := filepath.Join(dir, "store")
	addr = freePort(t)
	// Short flushes, many of them: more kills land inside one.
	cfg := writeConfig(t, dir, brokers, "faulty", addr, "flush_interval: 50ms\n")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 2))
	var landed [numKillKinds]int
	for i := range kills {
		// Plain, flush, join, rebalance, in turn; the progress targets
		// spread the kills over the whole input.
		aim := killKind(i % int(numKillKinds))
		target := (i + 1) * n * 9 / 10 / kills
		p := startProc(t, cfg, addr, logs)
		var kind killKind
		switch aim {
		case killJoin:
			// Joining takes a while after a kill: the group waits for the
			// dead member until its session timeout. Kill anywhere in
			// that rebalance.
			time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
			kind = killConsuming
			if waitRebalancing(t, brokers, "faulty", 10*time.Second) {
				time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
				if strings.HasSuffix(groupState(t, brokers, "faulty"), "Rebalance") {
					kind = killJoin
				}
			}
			p.kill()
		default:
			waitProgress(t, p, target, brokers, "faulty")
			switch aim {
			case killConsuming:
				time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
				p.kill()
				kind = killConsuming
			case killFlush:
				kind = killConsuming
				if walWriteSeen(t, p.cmd.Process.Pid, storeDir, 5*time.Second) {
					kind = killFlush
				}
				p.kill() // at once: the write was seen microseconds ago
			case killRebalance:
				kind = rebalanceKill(t, p, brokers, "faulty", rng)
			}
		}
		landed[kind]++
	}
	final := startProc(t, cfg, addr, logs)
	got := runToEnd(t, final, n)
	final.terminate(t)
	t.Logf("%d SIGKILLs while consuming %d records (%v; the run without faults took %v): %d consuming, %d in a flush, %d during the initial join, %d during a rebalance",
		kills, n, time.Since(start).Round(time.Second), cleanTook.Round(time.Second),
		landed[killConsuming], landed[killFlush], landed[killJoin], landed[killRebalance])
	for k := killFlush; k < numKillKinds; k++ {
		if landed[k] < minPerKind {
			t.Errorf("%d kills landed %s; want at least %d", landed[k], k, minPerKind)
		}
	}
	if d := diff(want, got); d != "" {
		t.Errorf("final series differ from the run without faults:\n%s", d)
	}
}

// waitProgress waits until p consumed target records.
func waitProgress(t testing.TB, p *proc, target int, brokers []string, group string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	last, lastAt := -1, time.Now()
	for c := consumedOf(p.addr); c < target; c = consumedOf(p.addr) {
		if c != last {
			last, lastAt = c, time.Now()
		}
		if time.Since(lastAt) > 15*time.Second {
			removeStaleMembers(t, brokers, group)
			lastAt = time.Now()
			if d := lastAt.Add(30 * time.Second); d.After(deadline) {
				deadline = d
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no progress to %d records after restart (at %d); the group: %+v", target, c, describeGroup(t, brokers, group))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// removeStaleMembers makes every member leave a group that has more than
// one while only one funnelwatch runs. kfake can keep the member of a
// process SIGKILLed during its join in a Stable group past its session
// timeout (seen: 60 s with a 1 s timeout), holding partitions nobody
// reads; Kafka expires it. The live process rejoins.
func removeStaleMembers(t testing.TB, brokers []string, group string) {
	t.Helper()
	g := describeGroup(t, brokers, group)
	if len(g.Members) < 2 {
		return
	}
	t.Logf("no progress for 15s; removing the group's %d members, of which only one can be alive: %+v", len(g.Members), g)
	req := &kafka.LeaveGroupRequest{GroupID: group}
	for _, m := range g.Members {
		req.Members = append(req.Members, kafka.LeaveGroupRequestMember{ID: m.MemberID})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := (&kafka.Client{Addr: kafka.TCP(brokers...)}).LeaveGroup(ctx, req)
	if err == nil {
		err = resp.Error
	}
	if err != nil {
		t.Fatalf("remove the members of group %s: %v", group, err)
	}
}

// groupState asks the broker for the state of a consumer group: Stable,
// PreparingRebalance, CompletingRebalance, Empty or Dead.
func groupState(t testing.TB, brokers []string, group string) string {
	t.Helper()
	return describeGroup(t, brokers, group).GroupState
}

// describeGroup asks the broker for a consumer group's state, members and
// their assignments.
func describeGroup(t testing.TB, brokers []string, group string) kafka.DescribeGroupsResponseGroup {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := &kafka.Client{Addr: kafka.TCP(brokers...)}
	resp, err := c.DescribeGroups(ctx, &kafka.DescribeGroupsRequest{GroupIDs: []string{group}})
	if err != nil {
		t.Fatalf("describe group %s: %v", group, err)
	}
	if len(resp.Groups) != 1 || resp.Groups[0].Error != nil {
		t.Fatalf("describe group %s: %+v", group, resp.Groups)
	}
	return resp.Groups[0]
}

// rebalanceKill has another member join p's consumer group, so that the
// broker revokes and reassigns the partitions, and SIGKILLs p while the
// group rebalances. The intruder is a plain kafka-go group member that
// never reads or commits; it leaves the group after the kill. It returns
// killRebalance when the broker reported the group rebalancing both before
// and right after the kill was decided.
func rebalanceKill(t testing.TB, p *proc, brokers []string, group string, rng *rand.Rand) killKind {
	t.Helper()
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID: group, Brokers: brokers, Topics: []string{"events"},
		SessionTimeout: time.Second, HeartbeatInterval: 200 * time.Millisecond, RebalanceTimeout: 3 * time.Second,
		JoinGroupBackoff: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	joined := make(chan struct{})
	go func() {
		defer close(joined)
		_, _ = cg.Next(ctx) // the generation is never started: no reads, no commits
	}()
	defer func() {
		cancel()
		<-joined
		_ = cg.Close()
	}()
	kind := killConsuming
	if waitRebalancing(t, brokers, group, 10*time.Second) {
		// Anywhere in the rebalance: funnelwatch stopping its readers,
		// flushing, rejoining.
		time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
		if strings.HasSuffix(groupState(t, brokers, group), "Rebalance") {
			kind = killRebalance
		}
	}
	p.kill()
	return kind
}

// waitRebalancing waits up to timeout for the broker to report the group
// rebalancing (PreparingRebalance or CompletingRebalance).
func waitRebalancing(t testing.TB, brokers []string, group string, timeout time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if st := groupState(t, brokers, group); strings.HasSuffix(st, "Rebalance") {
			return true
		}
		time.Sleep(2 * time.Millisecond)
	}
	return false
}

// walWriteSeen watches the threads of process pid for up to timeout and
// reports whether one was seen inside a write or sync system call on a
// write-ahead log (*.log) under storeDir: the store committing a batch,
// which is what a flush does. It returns as soon as one is seen.
func walWriteSeen(t testing.TB, pid int, storeDir string, timeout time.Duration) bool {
	t.Helper()
	// x86-64 system call numbers: write, pwrite64, writev, pwritev, fsync,
	// fdatasync, sync_file_range.
	calls := map[int]bool{1: true, 18: true, 20: true, 296: true, 74: true, 75: true, 277: true}
	if runtime.GOARCH == "arm64" {
		calls = map[int]bool{64: true, 68: true, 66: true, 70: true, 82: true, 83: true, 84: true}
	} else if runtime.GOARCH != "amd64" {
		t.Fatalf("walWriteSeen knows the system call numbers of amd64 and arm64, not %s", runtime.GOARCH)
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return false
		}
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/syscall", pid, task.Name()))
			if err != nil {
				continue
			}
			f := strings.Fields(string(b))
			if len(f) < 2 {
				continue // running in user space
			}
			nr, err := strconv.Atoi(f[0])
			if err != nil || !calls[nr] {
				continue
			}
			fd, err := strconv.ParseInt(strings.TrimPrefix(f[1], "0x"), 16, 64)
			if err != nil {
				continue
			}
			target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
			if err == nil && strings.HasPrefix(target, storeDir) && strings.HasSuffix(target, ".log") {
				return true
			}
		}
	}
	return false
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
