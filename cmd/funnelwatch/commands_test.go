package main

import (
	"bytes"
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestCheckConfig runs check-config on a good and a bad file: the bad one
// fails naming every wrong key at once.
func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(good, []byte("windows: [1h, 7d]\ntime: {clock: event}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("segments: {dimensions: [step]}\ntime: {bucket: 7m, clock: sundial}\nalerts: {z_on: -1}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		wantErr []string
		wantOut []string
	}{
		{"good", []string{"--config.file", good}, nil, []string{"configuration is valid", "clock: event", "window", "1w"}},
		{"bad", []string{"--config.file", bad}, []string{"segments.dimensions[0]", "time.bucket", "time.clock", "alerts.z_on"}, nil},
		{"flag override", []string{"--config.file", good, "--log.level", "loud"}, []string{"log.level"}, nil},
		{"unknown key", []string{"--config.file", writeFile(t, dir, "unknown.yaml", "kafka: {brokerz: [x]}\n")}, []string{"brokerz"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := dispatch(context.Background(), append([]string{"check-config"}, tt.args...), &out, &errOut)
			if (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("got error %v; want error %v", err, tt.wantErr != nil)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output does not contain %q:\n%s", w, out.String())
				}
			}
		})
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestInspect consumes a few records with the binary, stops it, and
// inspects the store offline.
func TestInspect(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	brokers := startBroker(t, 1)
	produceMessages(t, brokers, "events", syntheticEvents(2000, 3))
	dir := t.TempDir()
	addr := freePort(t)
	cfg := writeConfig(t, dir, brokers, "inspect", addr, "")
	logs := &lockedBuffer{}
	p := startProc(t, cfg, addr, logs)
	runToEnd(t, p, 2000)
	p.terminate(t)

	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := dispatch(ctx, []string{"inspect", "--config.file", cfg}, &out, &errOut); err != nil {
		t.Fatalf("inspect: %v\n%s", err, errOut.String())
	}
	for _, w := range []string{"clock", "entities", "events  0  2000  2000", "source+region", "all"} {
		if !strings.Contains(strings.Join(strings.Fields(out.String()), "  "), strings.Join(strings.Fields(w), "  ")) {
			t.Errorf("inspect output does not contain %q:\n%s", w, out.String())
		}
	}
}

// TestBenchCommand runs a tiny `funnelwatch bench` end to end: it must
// report both sides of the comparison and the figures docs/performance.md
// quotes. The freshness phase is left out: it measures live traffic for a
// fixed time and needs a machine that is not running the rest of the suite.
func TestBenchCommand(t *testing.T) {
	benchOutputs(t, []string{"--freshness", "0"},
		"raw kafka-go consumption", "funnelwatch end to end", "ratio", "cpu seconds", "peak RSS of funnelwatch run",
		"store size", "/metrics scrape", "client_golang, same series", "restart to correct /metrics",
		"kafka-go side cpu", "broker cpu beside funnelwatch")
}

// TestBenchFreshness runs the freshness phase of `funnelwatch bench` at a
// low fixed rate (--freshness-rate), which a machine busy with the rest
// of the suite still keeps up with: the records must show in /metrics.
func TestBenchFreshness(t *testing.T) {
	benchOutputs(t, []string{"--freshness", "3s", "--freshness-rate", "2000"},
		"freshness: 2000 events/s of live traffic for 3s", "records to /metrics: p50 ")
}

// benchOutputs runs `funnelwatch bench` on 20,000 events, one run, with
// args, and checks that its output contains each of wants.
func benchOutputs(t *testing.T, args []string, wants ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args = append([]string{"bench", "--events", "20000", "--runs", "1", "--dir", t.TempDir()}, args...)
	out, err := exec.CommandContext(ctx, binary(t), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, out)
	}
	for _, want := range wants {
		if !strings.Contains(string(out), want) {
			t.Errorf("output does not contain %q:\n%s", want, out)
		}
	}
}

// TestRunMemoryLimit checks that funnelwatch run lowers the Go runtime's
// memory limit, set by GOMEMLIMIT as the deployment sets it, by the memory
// it maps outside the Go heap, and leaves it alone without GOMEMLIMIT.
func TestRunMemoryLimit(t *testing.T) {
	brokers := startBroker(t, 1)
	env := environWithout("GOMEMLIMIT")
	const limit = 1 << 30
	for _, tc := range []struct {
		name  string
		env   []string
		limit float64 // 0: none
	}{
		{"GOMEMLIMIT set", append(slices.Clip(env), "GOMEMLIMIT=1GiB"), limit},
		{"no GOMEMLIMIT", env, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := freePort(t)
			logs := &lockedBuffer{}
			p := startProcEnv(t, writeConfig(t, t.TempDir(), brokers, "memlimit", addr, ""), addr, logs, tc.env)
			// The entity table maps its hash slots when it is made.
			waitFor(t, 30*time.Second, "serve /metrics", func() bool { return metricValue(addr, "funnel_memory_mapped_bytes") > 0 })
			mapped := metricValue(addr, "funnel_memory_mapped_bytes")
			want := float64(math.MaxInt64)
			if tc.limit > 0 {
				want = tc.limit - mapped
			}
			// Exactly: with no traffic nothing is mapped after the start.
			if got := metricValue(addr, "go_gc_gomemlimit_bytes"); got != want {
				t.Errorf("go_gc_gomemlimit_bytes = %.0f with %.0f bytes mapped; want %.0f", got, mapped, want)
			}
			p.terminate(t)
		})
	}
}

// TestLimitMemory checks limitMemory's floor of half the limit and that
// it sets the limit back when it returns.
func TestLimitMemory(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	const limit = 1 << 30
	var mapped atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- limitMemory(ctx, limit, mapped.Load, time.Millisecond) }()
	for _, tc := range []struct {
		mapped, want int64
	}{
		{0, limit},
		{100 << 20, limit - 100<<20},
		{100<<20 + 1<<19, limit - 100<<20}, // less than a MiB more: unchanged
		{limit, limit / 2},
	} {
		mapped.Store(tc.mapped)
		// Long enough for a move that should not happen.
		time.Sleep(20 * time.Millisecond)
		var got int64
		for range 2000 {
			if got = debug.SetMemoryLimit(-1); got == tc.want {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if got != tc.want {
			t.Errorf("mapped %d: limit %d; want %d", tc.mapped, got, tc.want)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := debug.SetMemoryLimit(-1); got != limit {
		t.Errorf("limit %d after return; want %d", got, limit)
	}
}

// environWithout returns the environment without the variable name.
func environWithout(name string) []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, name+"=") })
}

// TestRunGCPercent checks that funnelwatch run collects at its own GOGC
// unless the environment sets one.
func TestRunGCPercent(t *testing.T) {
	brokers := startBroker(t, 1)
	env := environWithout("GOGC")
	for _, tc := range []struct {
		name string
		env  []string
		want float64
	}{
		{"default", env, defaultGCPercent},
		{"GOGC set", append(slices.Clip(env), "GOGC=100"), 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := freePort(t)
			logs := &lockedBuffer{}
			p := startProcEnv(t, writeConfig(t, t.TempDir(), brokers, "gogc", addr, ""), addr, logs, tc.env)
			waitFor(t, 30*time.Second, "serve /metrics", func() bool { return metricValue(addr, "go_gc_gogc_percent") >= 0 })
			if got := metricValue(addr, "go_gc_gogc_percent"); got != tc.want {
				t.Errorf("go_gc_gogc_percent = %v; want %v", got, tc.want)
			}
			p.terminate(t)
		})
	}
}
