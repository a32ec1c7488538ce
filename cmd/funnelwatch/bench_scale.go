package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/funnelwatch/funnelwatch/processor"
)

// benchScaleOut measures the scale-out mode: replicas `funnelwatch run`
// processes of one group consume the preloaded topic; the rate is the
// records over the time until every partition's stored offset reached its
// end. After the last run one replica is SIGKILLed and the time the others
// take to restore its partitions from the deltas topic is reported.
func benchScaleOut(ctx context.Context, stdout io.Writer, exe string, brokers []string, dir string, partitions, events, runs, replicas int) error {
	var raw, fw []float64
	for i := range runs {
		r, err := rawConsume(ctx, brokers, partitions, events)
		if err != nil {
			return err
		}
		raw = append(raw, r)
		cfg, err := benchConfig(brokers, filepath.Join(dir, strconv.Itoa(i)), i)
		if err != nil {
			return err
		}
		cfg.ScaleOut.Enabled = true
		cfg.Log.Level = "info"
		start := time.Now()
		var procs []*fwProcess
		logs := &syncBuffer{}
		stopAll := func() {
			for _, p := range procs {
				_ = p.stop()
			}
		}
		for k := range replicas {
			c := cfg
			c.Store.Dir = filepath.Join(dir, strconv.Itoa(i), "replica-"+strconv.Itoa(k))
			p, err := startFW(exe, c, logs)
			if err != nil {
				stopAll()
				return err
			}
			procs = append(procs, p)
		}
		if err := waitStored(ctx, procs, events, 10*time.Minute); err != nil {
			stopAll()
			return err
		}
		el := time.Since(start)
		fw = append(fw, float64(events)/el.Seconds())
		var cpu float64
		for _, p := range procs {
			cpu += procCPU(p.cmd.Process.Pid)
		}
		fmt.Fprintf(stdout, "run %d: kafka-go %.0f events/s, %d replicas %.0f events/s (ratio %.2f); cpu %.1fs over all replicas\n",
			i+1, r, replicas, fw[len(fw)-1], fw[len(fw)-1]/r, cpu)
		if i == runs-1 && replicas > 1 {
			// Kill one replica: the others restore its partitions.
			before := strings.Count(logs.String(), "restored partitions")
			lines := len(restoreLine.FindAllString(logs.String(), -1))
			t0 := time.Now()
			_ = procs[0].cmd.Process.Kill()
			<-procs[0].done
			procs[0].done <- nil
			rest := procs[1:]
			deadline := time.Now().Add(2 * time.Minute)
			for strings.Count(logs.String(), "restored partitions") == before || !allReady(rest) {
				if time.Now().After(deadline) {
					stopAll()
					return fmt.Errorf("bench: no restore within 2 minutes of killing a replica")
				}
				time.Sleep(20 * time.Millisecond)
			}
			fmt.Fprintf(stdout, "SIGKILL of a replica: the others ready again after %s (session timeout %s included)\n",
				time.Since(t0).Round(time.Millisecond), time.Duration(cfg.Kafka.SessionTimeout))
			for _, l := range restoreLine.FindAllString(logs.String(), -1)[lines:] {
				fmt.Fprintf(stdout, "  %s\n", l)
			}
			procs = rest
		}
		stopAll()
	}
	mr, mf := median(raw), median(fw)
	fmt.Fprintf(stdout, "\nraw kafka-go consumption       %10.0f events/s (median of %d)\n%d replicas, scale-out         %10.0f events/s (median of %d)\nratio                          %10.2f\n",
		mr, len(raw), replicas, mf, len(fw), mf/mr)
	return nil
}

var restoreLine = regexp.MustCompile(`restored (partitions|segments) from the deltas topic[^\n]*`)

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startFW starts `funnelwatch run` with cfg on a free port, logging to w.
func startFW(exe string, cfg processor.Config, w io.Writer) (*fwProcess, error) {
	if err := os.MkdirAll(cfg.Store.Dir, 0o755); err != nil {
		return nil, err
	}
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
	file := cfg.Store.Dir + ".yaml"
	if err := os.WriteFile(file, b, 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "run", "--config.file", file, "--log.format", "logfmt")
	cmd.Stderr = w
	p := &fwProcess{cmd: cmd, cfg: cfg, addr: addr, done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start funnelwatch run: %w", err)
	}
	go func() { p.done <- cmd.Wait() }()
	return p, nil
}

func allReady(ps []*fwProcess) bool {
	for _, p := range ps {
		if !get200(p.url("/readyz")) {
			return false
		}
	}
	return true
}

// waitStored waits until, over the replicas, the largest stored offset of
// every partition adds up to n.
func waitStored(ctx context.Context, ps []*fwProcess, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		best := map[string]float64{}
		for _, p := range ps {
			mfs, err := scrapeFamilies(p.url("/metrics"))
			if err != nil {
				continue
			}
			for _, m := range mfs["funnel_stored_offset"].GetMetric() {
				var key string
				for _, lp := range m.GetLabel() {
					key += lp.GetValue() + "/"
				}
				best[key] = max(best[key], m.GetGauge().GetValue())
			}
		}
		total := 0.0
		for _, v := range best {
			total += v
		}
		if total >= float64(n) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bench: stored offsets reach %.0f of %d after %s", total, n, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
