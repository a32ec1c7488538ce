package deploy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

// TestAlertingEndToEnd runs the whole alerting path on loopback: a kfake
// broker, funnelwatch, a real Prometheus evaluating the shipped rules
// against funnelwatch's /metrics, and a real Alertmanager with the shipped
// configuration. One segment's conversion drops with enough volume, a small
// segment drops without enough volume, the rest stay stable; exactly one
// FunnelConversionDegraded alert, for the dropping segment, must reach
// Alertmanager.
func TestAlertingEndToEnd(t *testing.T) {
	promBin := lookBinary(t, "prometheus")
	amBin := lookBinary(t, "alertmanager", "prometheus-alertmanager")

	// The broker and the events.
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	brokers := cluster.ListenAddrs()
	msgs := alertScenario()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: "funnel-events", Balancer: &kafka.Hash{}, AllowAutoTopicCreation: true,
		BatchTimeout: time.Millisecond, BatchSize: 5000, RequiredAcks: kafka.RequireOne}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	for sent := 0; sent < len(msgs); {
		chunk := msgs[sent:min(len(msgs), sent+20000)]
		if err := w.WriteMessages(ctx, chunk...); err != nil {
			if ctx.Err() != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		sent += len(chunk)
	}

	// funnelwatch, in process, serving on loopback.
	cfg := processor.DefaultConfig()
	cfg.Kafka.Brokers = brokers
	cfg.Time.Clock = processor.ClockEvent
	// The history is five three-hour slots a week apart: let the event
	// clock jump the gaps.
	cfg.Time.MaxFuture = processor.Duration(8 * 24 * time.Hour)
	cfg.FlushInterval = processor.Duration(200 * time.Millisecond)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open("", store.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	c, err := processor.NewConsumer(cfg, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	fwListener := listen(t)
	srv := processor.NewServer(cfg.Web, p, c, reg, nil)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	g.Go(func() error { return srv.Serve(gctx, fwListener) })
	defer func() {
		cancel()
		if err := g.Wait(); err != nil {
			t.Errorf("funnelwatch: %v", err)
		}
	}()

	// Alertmanager with the shipped configuration.
	dir := t.TempDir()
	amAddr := freeAddr(t)
	startProcess(t, amBin, "--config.file=alertmanager/alertmanager.yml", "--storage.path="+filepath.Join(dir, "am"),
		"--web.listen-address="+amAddr, "--cluster.listen-address=")

	// Prometheus with the shipped rules. The only change is a shorter
	// `for:`, so the test does not wait 15 minutes of wall time.
	rules, err := os.ReadFile("rules/funnelwatch.rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rules = regexp.MustCompile(`(?m)^(\s+for:) \S+$`).ReplaceAll(rules, []byte("$1 2s"))
	rulesPath := filepath.Join(dir, "rules.yaml")
	if err := os.WriteFile(rulesPath, rules, 0o644); err != nil {
		t.Fatal(err)
	}
	promCfg := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [%q]
alerting:
  alertmanagers: [{static_configs: [{targets: [%q]}]}]
scrape_configs:
  - job_name: funnelwatch
    static_configs: [{targets: [%q]}]
`, rulesPath, amAddr, fwListener.Addr().String())
	promCfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(promCfgPath, []byte(promCfg), 0o644); err != nil {
		t.Fatal(err)
	}
	promAddr := freeAddr(t)
	startProcess(t, promBin, "--config.file="+promCfgPath, "--storage.tsdb.path="+filepath.Join(dir, "prom"),
		"--web.listen-address="+promAddr)

	// Wait for the alert to reach Alertmanager, then give any wrong alert
	// time to show up too.
	var alerts []amAlert
	deadline := time.Now().Add(3 * time.Minute)
	for {
		alerts = amAlerts(t, amAddr)
		if len(named(alerts, "FunnelConversionDegraded")) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no FunnelConversionDegraded alert reached Alertmanager within 3 minutes; alerts: %+v", alerts)
		}
		time.Sleep(time.Second)
	}
	time.Sleep(10 * time.Second)
	alerts = amAlerts(t, amAddr)

	conv := named(alerts, "FunnelConversionDegraded")
	if len(conv) != 1 {
		t.Fatalf("got %d FunnelConversionDegraded alerts, want exactly 1: %+v", len(conv), conv)
	}
	a := conv[0]
	for k, want := range map[string]string{
		"breakdown": "source+region", "source": "paid_search", "region": "emea",
		"from": "visit", "to": "lead", "window": "1h", "severity": "warning", "job": "funnelwatch",
	} {
		if got := a.Labels[k]; got != want {
			t.Errorf("alert label %s = %q, want %q", k, got, want)
		}
	}
	for _, s := range []string{`source="paid_search"`, `region="emea"`, "visit→lead", "baseline", "z = -"} {
		if !strings.Contains(a.Annotations["description"], s) {
			t.Errorf("description %q does not mention %q", a.Annotations["description"], s)
		}
	}
	if !strings.Contains(a.Annotations["summary"], "paid_search") {
		t.Errorf("summary %q does not name the segment", a.Annotations["summary"])
	}
	if !strings.HasSuffix(a.Annotations["runbook_url"], "docs/runbook.md#funnelconversiondegraded") {
		t.Errorf("runbook_url = %q", a.Annotations["runbook_url"])
	}
	if v := named(alerts, "FunnelVolumeDrop"); len(v) != 0 {
		t.Errorf("unexpected FunnelVolumeDrop alerts: %+v", v)
	}
}

// alertScenario is three hours of traffic at the same time of the week in
// each of the five last weeks. Segments: paid_search/emea (300 visits an
// hour) converts 30% of visits to leads until the last three hours, then
// 10%; paid_search/na and organic/emea (3000 an hour each) convert 30%
// throughout, which keeps the parent segments (source=paid_search,
// region=emea, all) within their baselines; email/apac (20 an hour)
// converts 30% and then 0%, too small to judge. A last event moves the
// event clock far enough for the last hour's cohorts to mature.
func alertScenario() []kafka.Message {
	type seg struct {
		source, region string
		perHour        int
		before, after  float64
	}
	segs := []seg{
		{"paid_search", "emea", 300, 0.3, 0.1},
		{"paid_search", "na", 3000, 0.3, 0.3},
		{"organic", "emea", 3000, 0.3, 0.3},
		{"email", "apac", 20, 0.3, 0},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	final := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	type timed struct {
		at  time.Time
		msg kafka.Message
	}
	var evs []timed
	event := func(typ, ent string, at time.Time, s *seg) {
		v := fmt.Sprintf(`{"id":"%s-%d","type":%q,"entity":%q,"time":%q`, typ, len(evs), typ, ent, at.Format(time.RFC3339Nano))
		if s != nil {
			v += fmt.Sprintf(`,"segment":{"source":%q,"region":%q}`, s.source, s.region)
		}
		evs = append(evs, timed{at, kafka.Message{Key: []byte(ent), Value: []byte(v + "}")}})
	}
	for k := 4; k >= 0; k-- {
		start := final.Add(-time.Duration(k) * 7 * 24 * time.Hour)
		for i := range segs {
			s := &segs[i]
			p := s.before
			if k == 0 {
				p = s.after
			}
			visits := 3 * s.perHour
			for v := 0; v < visits; v++ {
				at := start.Add(time.Duration(v) * 3 * time.Hour / time.Duration(visits))
				ent := fmt.Sprintf("%s-%s-%d-%d", s.source, s.region, k, v)
				event("visit", ent, at, s)
				if rng.Float64() < p {
					event("lead", ent, at.Add(time.Duration(1+rng.IntN(20))*time.Minute), nil)
				}
			}
		}
	}
	event("visit", "clock-tick", final.Add(4*time.Hour+10*time.Minute), &segs[1])
	// In time order, so the event clock moves forward as a producer's would.
	slices.SortStableFunc(evs, func(a, b timed) int { return a.at.Compare(b.at) })
	msgs := make([]kafka.Message, len(evs))
	for i, e := range evs {
		msgs[i] = e.msg
	}
	return msgs
}

type amAlert struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func amAlerts(t *testing.T, addr string) []amAlert {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/api/v2/alerts")
	if err != nil {
		return nil // not up yet
	}
	defer resp.Body.Close()
	var alerts []amAlert
	if err := json.NewDecoder(resp.Body).Decode(&alerts); err != nil {
		t.Fatalf("decode alerts: %v", err)
	}
	return alerts
}

func named(alerts []amAlert, name string) []amAlert {
	var out []amAlert
	for _, a := range alerts {
		if a.Labels["alertname"] == name {
			out = append(out, a)
		}
	}
	return out
}

func lookBinary(t *testing.T, names ...string) string {
	t.Helper()
	for _, n := range names {
		if p, err := exec.LookPath(n); err == nil {
			return p
		}
	}
	t.Fatalf("none of %v is installed (CI installs them with apt-get)", names)
	return ""
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// freeAddr returns a loopback address that was free a moment ago, for a
// process that takes its listen address as a flag.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startProcess starts a server process and stops it when the test ends.
func startProcess(t *testing.T, bin string, args ...string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(bin), out.String())
		}
	})
}
