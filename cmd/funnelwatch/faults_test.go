package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
)

// These tests inject the faults of the reliability guarantees (SPEC §5)
// into real processes: the broker frozen or killed under a consuming
// funnelwatch, and the store's disk filled. Each compares the final
// exposition with a run without faults, so "nothing lost, nothing counted
// twice" is checked to the last series. docs/reliability.md lists them.

// brokerProc is a `funnelwatch broker` process with a fixed address and
// data directory, so that a test can freeze it, kill it and start it again
// where it was.
type brokerProc struct {
	addr, dataDir string
	partitions    int
	out           *lockedBuffer
	cmd           *exec.Cmd
	done          chan struct{}
}

func startBrokerProc(t testing.TB, partitions int) *brokerProc {
	t.Helper()
	b := &brokerProc{addr: freePort(t), dataDir: t.TempDir(), partitions: partitions, out: &lockedBuffer{}}
	t.Cleanup(func() {
		if b.cmd != nil {
			_ = b.cmd.Process.Kill() // also ends a stopped process
			<-b.done
		}
		if t.Failed() {
			t.Logf("broker output (last 4 KiB):\n%s", b.out.tail(4<<10))
		}
	})
	b.start(t)
	return b
}

func (b *brokerProc) brokers() []string { return []string{b.addr} }

// start runs the broker on its address and data directory and waits until
// it listens.
func (b *brokerProc) start(t testing.TB) {
	t.Helper()
	mark := len(b.out.tail(1 << 30))
	b.cmd = exec.Command(binary(t), "broker", "--listen-address", b.addr, "--data.dir", b.dataDir,
		"--partitions", strconv.Itoa(b.partitions), "--group.min-session-timeout", "200ms")
	b.cmd.Stdout, b.cmd.Stderr = b.out, b.out
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		_ = cmd.Wait()
		close(done)
	}(b.cmd, b.done)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(b.out.tail(1 << 30)[mark:], "listening") {
		select {
		case <-b.done:
			t.Fatalf("broker exited at start: %s", b.out.tail(1<<10))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker did not start: %s", b.out.tail(1<<10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (b *brokerProc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := b.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to the broker: %v", sig, err)
	}
}

// stop ends the broker gracefully (SIGTERM), which persists its state.
func (b *brokerProc) stop(t testing.TB) {
	t.Helper()
	b.signal(t, syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		t.Fatal("broker did not stop within 30s of SIGTERM")
	}
	b.cmd = nil
}

// kill SIGKILLs the broker and waits until it is gone.
func (b *brokerProc) kill(t testing.TB) {
	t.Helper()
	b.signal(t, syscall.SIGKILL)
	<-b.done
	b.cmd = nil
}

// outage is what a watcher saw of a funnelwatch process while a fault
// lasted.
type outage struct {
	polls, notReady, scrapes int
	// firstNotReady is how long after the start of the watch /readyz first
	// returned 503.
	firstNotReady time.Duration
	scrapeErrors  []string
	exited        bool
	exitErr       error
}

// watchProc polls /readyz and /metrics of p every 100ms until the returned
// function is called, which returns what was seen.
func watchProc(p *proc) func() outage {
	client := &http.Client{Timeout: 3 * time.Second}
	stop := make(chan struct{})
	var (
		mu  sync.Mutex
		obs outage
		wg  sync.WaitGroup
	)
	get := func(path string) (int, error) {
		resp, err := client.Get("http://" + p.addr + path)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, err = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, err
	}
	start := time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case err := <-p.done:
				p.done <- err
				mu.Lock()
				obs.exited, obs.exitErr = true, err
				mu.Unlock()
				return
			case <-tick.C:
			}
			ready, rerr := get("/readyz")
			code, merr := get("/metrics")
			mu.Lock()
			obs.polls++
			if rerr == nil && ready == http.StatusServiceUnavailable {
				if obs.notReady == 0 {
					obs.firstNotReady = time.Since(start)
				}
				obs.notReady++
			}
			obs.scrapes++
			if merr != nil || code != http.StatusOK {
				obs.scrapeErrors = append(obs.scrapeErrors, fmt.Sprintf("code %d, err %v", code, merr))
			}
			mu.Unlock()
		}
	}()
	return func() outage {
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return obs
	}
}

// readyz returns the status code of /readyz, or 0 when it does not answer.
func readyz(addr string) int {
	client := &http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// brokerFaultRecords is the load of the broker fault tests: a quarter is
// produced and consumed before the fault, five eighths are being consumed
// when it happens, the last eighth is produced after it.
const brokerFaultRecords = 120_000

// testBrokerFault runs funnelwatch against a broker with a data directory,
// injects fault while funnelwatch consumes, checks what the
// process did during the outage and after it, and compares the final
// series with a run without faults.
func testBrokerFault(t *testing.T, fault func(t *testing.T, b *brokerProc)) {
	const n = brokerFaultRecords
	b := startBrokerProc(t, 3)
	msgs := syntheticEvents(n, 11)
	produceMessages(t, b.brokers(), "events", msgs[:n/4])
	// kfake writes its topic list only at start and at shutdown (a real
	// broker persists a topic when it creates it): restart it gracefully
	// once so that a SIGKILL later loses nothing.
	b.stop(t)
	b.start(t)
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})

	addr := freePort(t)
	p := startProc(t, writeConfig(t, t.TempDir(), b.brokers(), "faulty", addr, ""), addr, logs)
	t.Cleanup(func() {
		if t.Failed() && p.cmd.ProcessState == nil {
			lines, _ := scrape(addr, "funnel_records_consumed_total", "funnel_stored_offset", "funnel_consumer_lag_records", "funnel_consumption_paused")
			t.Logf("last series of the faulty process:\n%s", strings.Join(lines, "\n"))
		}
	})
	// Ready once the records there were at assignment are applied; records
	// produced later keep it ready while it consumes them.
	waitFor(t, 60*time.Second, "ready before the fault", func() bool { return readyz(addr) == http.StatusOK })
	produceMessages(t, b.brokers(), "events", msgs[n/4:7*n/8])
	deadline := time.Now().Add(60 * time.Second)
	at := consumedOf(addr)
	for ; at <= n/4; at = consumedOf(addr) {
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d records after 60s; want more than %d", at, n/4)
		}
	}
	if at >= 7*n/8 {
		t.Fatalf("consumed all %d records before the fault could be injected", at)
	}
	if code := readyz(addr); code != http.StatusOK {
		t.Fatalf("/readyz = %d before the fault; want 200", code)
	}

	stop := watchProc(p)
	start := time.Now()
	fault(t, b)
	obs := stop()
	t.Logf("fault at %d of %d records available consumed; outage %v: %d polls, /readyz 503 in %d (first after %v), %d scrapes, %d failed",
		at, 7*n/8, time.Since(start).Round(time.Second), obs.polls, obs.notReady, obs.firstNotReady.Round(100*time.Millisecond), obs.scrapes, len(obs.scrapeErrors))
	if obs.exited {
		t.Fatalf("funnelwatch exited during the outage: %v", obs.exitErr)
	}
	// The generation ends when a heartbeat fails: at once when the broker
	// is gone, within kafka-go's coordinator request timeout (5s, twice
	// when an offset commit is pending on the same connection) when it
	// does not answer.
	if obs.notReady == 0 || obs.firstNotReady > 15*time.Second {
		t.Errorf("/readyz returned 503 in %d of %d polls during the outage, first after %v; want 503 within 15s", obs.notReady, obs.polls, obs.firstNotReady)
	}
	if len(obs.scrapeErrors) > 0 {
		t.Errorf("/metrics failed %d of %d times during the outage, first: %s", len(obs.scrapeErrors), obs.scrapes, obs.scrapeErrors[0])
	}

	produceMessages(t, b.brokers(), "events", msgs[7*n/8:])
	waitFor(t, 90*time.Second, "/readyz 200 after the outage", func() bool { return readyz(addr) == http.StatusOK })
	got := runToEnd(t, p, n)
	p.terminate(t)

	cleanAddr := freePort(t)
	clean := startProc(t, writeConfig(t, t.TempDir(), b.brokers(), "clean", cleanAddr, ""), cleanAddr, logs)
	want := runToEnd(t, clean, n)
	clean.terminate(t)
	if d := diff(want, got); d != "" {
		t.Errorf("final series differ from the run without faults:\n%s", d)
	}
}

// TestBrokerStopped freezes the broker process (SIGSTOP) for 30 seconds
// while funnelwatch consumes, then resumes it (SIGCONT).
func TestBrokerStopped(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary; 30s outage")
	}
	testBrokerFault(t, func(t *testing.T, b *brokerProc) {
		b.signal(t, syscall.SIGSTOP)
		time.Sleep(30 * time.Second)
		b.signal(t, syscall.SIGCONT)
	})
}

// TestBrokerKilled SIGKILLs the broker while funnelwatch consumes and
// starts it again 10 seconds later on the same data directory and port.
func TestBrokerKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	testBrokerFault(t, func(t *testing.T, b *brokerProc) {
		b.kill(t)
		time.Sleep(10 * time.Second)
		b.start(t)
	})
}

// mountTmpfs mounts a tmpfs of size bytes on dir for the test. It needs
// root (CI runs as root); a test must not silently skip, so it fails
// otherwise.
func mountTmpfs(t *testing.T, dir string, size int64) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("mount a %d MiB tmpfs on %s (the test needs root): %v\n%s", size>>20, dir, err, out)
	}
	t.Cleanup(func() {
		for i := 0; ; i++ {
			out, err := exec.Command("umount", dir).CombinedOutput()
			if err == nil {
				return
			}
			if i == 50 {
				t.Errorf("umount %s: %v\n%s", dir, err, out)
				_ = exec.Command("umount", "-l", dir).Run()
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}

// fill creates path taking all the free space of its filesystem but leave
// bytes, and returns its size.
func fill(t *testing.T, path string, leave int64) int64 {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The running process allocates too (a WAL is preallocated in one
	// step), so the free space can shrink between statfs and fallocate:
	// measure again and retry.
	for attempt := 1; ; attempt++ {
		var st syscall.Statfs_t
		if err := syscall.Statfs(filepath.Dir(path), &st); err != nil {
			t.Fatal(err)
		}
		size := int64(st.Bavail)*st.Bsize - leave
		if size <= 0 {
			t.Fatalf("only %d bytes free on %s", int64(st.Bavail)*st.Bsize, filepath.Dir(path))
		}
		err := syscall.Fallocate(int(f.Fd()), 0, 0, size)
		if err == nil {
			return size
		}
		if !errors.Is(err, syscall.ENOSPC) || attempt == 10 {
			t.Fatalf("fallocate %d bytes (attempt %d): %v", size, attempt, err)
		}
		if err := f.Truncate(0); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metricValue sums the samples of one metric name (all label sets); -1
// when the process does not answer.
func metricValue(addr, name string) float64 {
	lines, err := scrape(addr, name+" ", name+"{")
	if err != nil {
		return -1
	}
	sum := 0.0
	for _, l := range lines {
		f, _ := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		sum += f
	}
	return sum
}

// storedOffsets returns funnel_stored_offset by partition.
func storedOffsets(t *testing.T, addr string) map[int]int64 {
	t.Helper()
	lines, err := scrape(addr, "funnel_stored_offset{")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]int64{}
	for _, l := range lines {
		i := strings.Index(l, `partition="`) + len(`partition="`)
		j := strings.IndexByte(l[i:], '"')
		part, _ := strconv.Atoi(l[i : i+j])
		v, _ := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		out[part] = int64(v)
	}
	return out
}

// groupOffsets returns the offsets a consumer group committed to Kafka.
func groupOffsets(t *testing.T, brokers []string, group string, partitions int) map[int]int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	parts := make([]int, partitions)
	for i := range parts {
		parts[i] = i
	}
	c := &kafka.Client{Addr: kafka.TCP(brokers...)}
	resp, err := c.OffsetFetch(ctx, &kafka.OffsetFetchRequest{GroupID: group, Topics: map[string][]int{"events": parts}})
	if err != nil {
		t.Fatalf("fetch the offsets of group %s: %v", group, err)
	}
	out := map[int]int64{}
	for _, p := range resp.Topics["events"] {
		if p.Error == nil && p.CommittedOffset >= 0 {
			out[p.Partition] = p.CommittedOffset
		}
	}
	return out
}

// TestStoreDiskFull puts the store on a small tmpfs and fills it while
// funnelwatch consumes: consumption must pause with an error in the log
// and funnel_consumption_paused at 1, without storing or committing to
// Kafka any offset past the state it wrote, and resume once space returns.
// A second time, the process is SIGKILLed while the disk is full: the
// restart must fail fast with a clear error rather than hang, and the
// restart after space returns must resume exactly.
func TestStoreDiskFull(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary; mounts a tmpfs")
	}
	const (
		n = 90_000
		// The tmpfs holds Pebble's preallocated WALs (35 MiB each), the
		// store's reserve (64 MiB) and a few MiB of data.
		tmpfsSize = 256 << 20
		// The filler leaves less than the reserve but enough for a commit
		// racing with it: a real disk fills gradually too.
		leave = 16 << 20
	)
	brokers := startBroker(t, 3)
	msgs := syntheticEvents(n, 13)
	produceMessages(t, brokers, "events", msgs[:n/3])
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})

	dir := t.TempDir()
	storeDir := filepath.Join(dir, "store")
	mountTmpfs(t, storeDir, tmpfsSize)
	filler := filepath.Join(storeDir, "filler")
	addr := freePort(t)
	cfg := writeConfig(t, dir, brokers, "faulty", addr, "")
	p := startProc(t, cfg, addr, logs)
	waitFor(t, 60*time.Second, "consume a ninth of the records", func() bool { return consumedOf(addr) >= n/9 })

	// expectPaused checks the process stopped consuming and stored and
	// committed nothing past what it wrote, with records pending.
	expectPaused := func(phase string, pending int) {
		t.Helper()
		waitFor(t, 15*time.Second, phase+": funnel_consumption_paused 1", func() bool { return metricValue(addr, "funnel_consumption_paused") == 1 })
		if e := metricValue(addr, "funnel_store_write_errors_total"); e < 1 {
			t.Errorf("%s: funnel_store_write_errors_total = %v; want > 0", phase, e)
		}
		if !strings.Contains(logs.tail(64<<10), "not enough free disk space") {
			t.Errorf("%s: no \"not enough free disk space\" error in the log", phase)
		}
		// A batch that passed the check before the failed flush may still
		// be applied; after that nothing moves.
		time.Sleep(500 * time.Millisecond)
		c0, s0 := consumedOf(addr), storedOffsets(t, addr)
		time.Sleep(2 * time.Second)
		c1, s1 := consumedOf(addr), storedOffsets(t, addr)
		if c1 != c0 {
			t.Errorf("%s: consumed went from %d to %d while paused", phase, c0, c1)
		}
		if c1 >= pending {
			t.Errorf("%s: consumed %d while the disk is full; want fewer than %d (records pending)", phase, c1, pending)
		}
		if fmt.Sprint(s0) != fmt.Sprint(s1) {
			t.Errorf("%s: stored offsets moved while paused: %v then %v", phase, s0, s1)
		}
		for part, off := range groupOffsets(t, brokers, "faulty", 3) {
			if off > s1[part] {
				t.Errorf("%s: partition %d: Kafka group offset %d is past the stored offset %d", phase, part, off, s1[part])
			}
		}
		t.Logf("%s: paused at %d consumed, stored offsets %v", phase, c1, s1)
	}

	// 1. The disk fills while consuming (records produced just before are
	// being read); space returns; it resumes. The records produced after
	// the fill are the ones it must not consume meanwhile.
	produceMessages(t, brokers, "events", msgs[n/3:n/2])
	size := fill(t, filler, leave)
	t.Logf("filled %s with %d MiB", storeDir, size>>20)
	produceMessages(t, brokers, "events", msgs[n/2:2*n/3])
	expectPaused("disk full", 2*n/3)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "funnel_consumption_paused 0 after space returns", func() bool { return metricValue(addr, "funnel_consumption_paused") == 0 })
	waitFor(t, 60*time.Second, "resume consuming", func() bool { return consumedOf(addr) >= 2*n/3 })

	// 2. Full again, and the process is killed meanwhile (a pod restart
	// during the outage).
	produceMessages(t, brokers, "events", msgs[2*n/3:5*n/6])
	fill(t, filler, leave)
	produceMessages(t, brokers, "events", msgs[5*n/6:])
	expectPaused("disk full again", n)
	p.kill()
	restart := &lockedBuffer{}
	r := startProc(t, cfg, addr, io.MultiWriter(logs, restart))
	select {
	case err := <-r.done:
		r.done <- err
		if err == nil || !strings.Contains(restart.tail(4<<10), "not enough free disk space") {
			t.Errorf("restart on a full disk: exit %v, output %q; want a non-zero exit naming the lack of space", err, restart.tail(1<<10))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("restart on a full disk neither served nor exited within 30s")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	final := startProc(t, cfg, addr, logs)
	got := runToEnd(t, final, n)
	final.terminate(t)

	cleanAddr := freePort(t)
	clean := startProc(t, writeConfig(t, t.TempDir(), brokers, "clean", cleanAddr, ""), cleanAddr, logs)
	want := runToEnd(t, clean, n)
	clean.terminate(t)
	if d := diff(want, got); d != "" {
		t.Errorf("final series differ from the run without faults:\n%s", d)
	}
}
