package main

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// segmentSeries are the per-segment series, which the replicas of the
// scale-out mode export between them.
var segmentSeries = []string{
	"funnel_window_", "funnel_cohort_", "funnel_baseline_", "funnel_conversion_", "funnel_volume_",
	"funnel_events_total", "funnel_time_to_convert_seconds",
}

// replica is one funnelwatch process of a scaled-out group, with its own
// store and address.
type replica struct {
	cfg, addr string
	p         *proc
}

func newReplica(t *testing.T, brokers []string, group string) *replica {
	t.Helper()
	dir := t.TempDir()
	addr := freePort(t)
	return &replica{cfg: writeConfig(t, dir, brokers, group, addr, "scale_out: {enabled: true}\n"), addr: addr}
}

func (r *replica) start(t *testing.T, logw *lockedBuffer) { r.p = startProc(t, r.cfg, r.addr, logw) }

// singleReplica runs one funnelwatch without the scale-out mode over the
// topic and returns its per-segment series once it consumed n records.
func singleReplica(t *testing.T, brokers []string, n int, logs *lockedBuffer) []string {
	t.Helper()
	addr := freePort(t)
	p := startProc(t, writeConfig(t, t.TempDir(), brokers, "single", addr, ""), addr, logs)
	runToEnd(t, p, n)
	want, err := scrape(addr, segmentSeries...)
	if err != nil {
		t.Fatal(err)
	}
	p.terminate(t)
	if len(want) < 100 {
		t.Fatalf("single replica exported %d per-segment series; want many", len(want))
	}
	return want
}

// union scrapes the live replicas and returns their per-segment series
// together, sorted, and the series more than one replica exports.
func union(rs []*replica) (all, dup []string, err error) {
	seen := map[string]string{}
	for _, r := range rs {
		lines, err := scrape(r.addr, segmentSeries...)
		if err != nil {
			return nil, nil, err
		}
		for _, l := range lines {
			name := l[:strings.LastIndexByte(l, ' ')]
			if other, ok := seen[name]; ok {
				dup = append(dup, fmt.Sprintf("%s (from %s and %s)", name, other, r.addr))
			}
			seen[name] = r.addr
			all = append(all, l)
		}
	}
	slices.Sort(all)
	return all, dup, nil
}

// converge waits until the replicas' union equals want with every series
// exported once.
func converge(t *testing.T, want []string, rs ...*replica) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var got, dup []string
	var err error
	for time.Now().Before(deadline) {
		got, dup, err = union(rs)
		if err == nil && len(dup) == 0 && slices.Equal(got, want) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	if len(dup) > 0 {
		t.Errorf("%d series exported by more than one replica, e.g. %s", len(dup), dup[0])
	}
	t.Fatalf("the replicas' per-segment series differ from one replica's (%d vs %d lines):\n%s", len(got), len(want), diff(want, got))
}

// TestScaleOutExact runs three replicas of the scale-out mode against one
// broker and expects the union of their per-segment series to be what one
// replica exports, each series from one replica only.
func TestScaleOutExact(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n = 40_000
	brokers := startBroker(t, 6)
	produceMessages(t, brokers, "events", syntheticEvents(n, 11))
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 12 KiB):\n%s", logs.tail(12<<10))
		}
	})
	want := singleReplica(t, brokers, n, logs)

	rs := []*replica{newReplica(t, brokers, "scaled"), newReplica(t, brokers, "scaled"), newReplica(t, brokers, "scaled")}
	for _, r := range rs {
		r.start(t, logs)
	}
	// The first replica to join may consume everything before the
	// others get their partitions: wait for every replica's share too.
	deadline := time.Now().Add(60 * time.Second)
	for {
		converge(t, want, rs...)
		var idle []string
		for _, r := range rs {
			lines, err := scrape(r.addr, segmentSeries...)
			if err != nil {
				t.Fatal(err)
			}
			if len(lines) == 0 {
				idle = append(idle, r.addr)
			}
		}
		if len(idle) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas %v export no per-segment series; want a share each", idle)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%d per-segment series equal to one replica's, each replica exporting a share", len(want))
	for _, r := range rs {
		r.p.terminate(t)
	}
}

// TestScaleOutRebalance adds a replica, SIGKILLs one and stops another
// while records keep coming, and expects exact numbers at the end.
func TestScaleOutRebalance(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n = 40_000
	brokers := startBroker(t, 6)
	msgs := syntheticEvents(n, 13)
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 16 KiB):\n%s", logs.tail(16<<10))
		}
	})
	produceMessages(t, brokers, "events", msgs[:n/2])
	a, b, c := newReplica(t, brokers, "scaled"), newReplica(t, brokers, "scaled"), newReplica(t, brokers, "scaled")
	a.start(t, logs)
	b.start(t, logs)
	time.Sleep(3 * time.Second)
	c.start(t, logs) // add a replica
	time.Sleep(3 * time.Second)
	produceMessages(t, brokers, "events", msgs[n/2:3*n/4])
	b.p.kill() // SIGKILL mid-stream
	time.Sleep(2 * time.Second)
	produceMessages(t, brokers, "events", msgs[3*n/4:])
	c.p.terminate(t) // remove a replica
	b.start(t, logs) // the killed one comes back on its store

	// The reference: one replica over the same records.
	want := singleReplica(t, brokers, n, logs)
	converge(t, want, a, b)
	out := logs.tail(1 << 24)
	restores := strings.Count(out, "restored partitions from the deltas topic")
	if restores == 0 {
		t.Errorf("no partition was restored from the deltas topic; want state moved with its partitions")
	}
	t.Logf("%d per-segment series equal to one replica's after %d restores", len(want), restores)
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "restored partitions") || strings.Contains(l, "rejected") {
			t.Log(l)
		}
	}
	a.p.terminate(t)
	b.p.terminate(t)
}

// TestScaleOutZombie stops a replica (SIGSTOP) while records flow, long
// enough for the group to give its partitions to the other, then lets it
// run again: its markers must not count, and the numbers end exact.
func TestScaleOutZombie(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n = 40_000
	brokers := startBroker(t, 4)
	msgs := syntheticEvents(n, 17)
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 16 KiB):\n%s", logs.tail(16<<10))
		}
	})
	produceMessages(t, brokers, "events", msgs[:n/4])
	a, b := newReplica(t, brokers, "scaled"), newReplica(t, brokers, "scaled")
	a.start(t, logs)
	b.start(t, logs)
	time.Sleep(3 * time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := n / 4; i < 3*n/4; i += n / 20 {
			produceMessages(t, brokers, "events", msgs[i:i+n/20])
			time.Sleep(100 * time.Millisecond)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if err := b.p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second) // past the session timeout: a takes over
	if err := b.p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	<-done
	produceMessages(t, brokers, "events", msgs[3*n/4:])
	fenced := false
	select {
	case err := <-b.p.done:
		b.p.done <- err
		fenced = true
		t.Logf("the zombie exited (%v); restarting it", err)
		b.start(t, logs)
	case <-time.After(5 * time.Second):
	}
	want := singleReplica(t, brokers, n, logs)
	converge(t, want, a, b)
	t.Logf("zombie fenced: %v; %d per-segment series equal to one replica's", fenced, len(want))
	a.p.terminate(t)
	b.p.terminate(t)
}

// TestScaleOutReadyAfterRestore starts a second replica next to one that
// has consumed everything and polls the newcomer's /readyz from its start.
// The first time it answers 200 the newcomer must have restored the
// partitions it was given, and the per-segment series it exports must
// already be final: a replica is not ready while it restores.
func TestScaleOutReadyAfterRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n = 40_000
	brokers := startBroker(t, 6)
	produceMessages(t, brokers, "events", syntheticEvents(n, 19))
	logs, newLogs := &lockedBuffer{}, &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
			t.Logf("the newcomer's logs (last 8 KiB):\n%s", newLogs.tail(8<<10))
		}
	})
	want := singleReplica(t, brokers, n, logs)
	a := newReplica(t, brokers, "scaled")
	a.start(t, logs)
	converge(t, want, a)

	b := newReplica(t, brokers, "scaled")
	b.start(t, newLogs)
	polls := 0
	deadline := time.Now().Add(60 * time.Second)
	for readyz(b.addr) != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatalf("the newcomer is not ready after 60s (%d polls)", polls)
		}
		polls++
		time.Sleep(5 * time.Millisecond)
	}
	got, err := scrape(b.addr, segmentSeries...)
	if err != nil {
		t.Fatal(err)
	}
	restored := strings.Contains(newLogs.tail(1<<20), "restored partitions from the deltas topic")
	if !restored {
		t.Errorf("the newcomer was ready before it restored any partition; want its partitions restored first")
	}
	final := map[string]bool{}
	for _, l := range want {
		final[l] = true
	}
	var early []string
	for _, l := range got {
		if !final[l] {
			early = append(early, l)
		}
	}
	if len(got) == 0 || len(early) > 0 {
		t.Errorf("when first ready the newcomer exported %d per-segment series, %d of them not final (e.g. %q); want a share, all final",
			len(got), len(early), append(early, "")[0])
	}
	t.Logf("ready after %d polls of /readyz; %d per-segment series, all final", polls, len(got))
	converge(t, want, a, b)
	a.p.terminate(t)
	b.p.terminate(t)
}
