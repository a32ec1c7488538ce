package processor_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/segmentio/kafka-go"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
)

// hostileCase is one record of the hostile corpus with the outcome SPEC
// §2.2 gives it.
type hostileCase struct {
	Name       string  `json:"name"`
	Want       string  `json:"want"`
	Value      *string `json:"value"`
	ValueB64   string  `json:"value_b64"`
	key, value []byte
	tombstone  bool
}

const hostileDir = "../testdata/hostile/"

// loadHostile reads the committed corpus, then adds the cases too large to
// commit, generated for cfg's max_record_bytes, and a valid record last.
func loadHostile(t *testing.T, maxBytes int) []hostileCase {
	t.Helper()
	f, err := os.Open(hostileDir + "records.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cases []hostileCase
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var c hostileCase
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			t.Fatalf("records.jsonl line %d: %v", len(cases)+1, err)
		}
		switch {
		case c.Value != nil:
			c.value = []byte(*c.Value)
		case c.ValueB64 != "":
			if c.value, err = base64.StdEncoding.DecodeString(c.ValueB64); err != nil {
				t.Fatalf("case %q: %v", c.Name, err)
			}
		default:
			t.Fatalf("case %q has neither value nor value_b64", c.Name)
		}
		cases = append(cases, c)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}

	const tm = `"time":"2026-11-02T13:00:00Z"`
	padded := func(entity string, size int) []byte {
		v := fmt.Appendf(nil, `{"type":"visit","entity":%q,%s,"pad":"`, entity, tm)
		v = append(v, bytes.Repeat([]byte("p"), size-len(v)-2)...)
		return append(v, `"}`...)
	}
	mb := strings.Repeat("e", 1_000_000)
	gen := []hostileCase{
		{Name: "record of max_record_bytes (kept)", Want: "applied", value: padded("h-max", maxBytes)},
		{Name: "record one byte over max_record_bytes", Want: "too_large", value: padded("h-max1", maxBytes+1)},
		{Name: "entity of 1 MB", Want: "too_large", value: fmt.Appendf(nil, `{"type":"visit","entity":%q,%s}`, mb, tm)},
		{Name: "key of 1 MB (keys are not read)", Want: "applied", key: []byte(mb), value: fmt.Appendf(nil, `{"type":"visit","entity":"h-bigkey",%s}`, tm)},
		{Name: "entity of 512 bytes (kept)", Want: "applied", value: fmt.Appendf(nil, `{"type":"visit","entity":%q,%s}`, strings.Repeat("f", 512), tm)},
		{Name: "entity of 513 bytes", Want: "bad_entity", value: fmt.Appendf(nil, `{"type":"visit","entity":%q,%s}`, strings.Repeat("f", 513), tm)},
		{Name: "30,000 levels of nesting", Want: "malformed_json",
			value: fmt.Appendf(nil, `{"type":"visit","entity":"h-deep",%s,"x":%s%s}`, tm, strings.Repeat("[", 30000), strings.Repeat("]", 30000))},
		{Name: "250 levels of nesting in a label (invalid value)", Want: "applied",
			value: fmt.Appendf(nil, `{"type":"visit","entity":"h-deeplabel",%s,"segment":{"source":%s%s}}`, tm, strings.Repeat("[", 250), strings.Repeat("]", 250))},
		{Name: "tombstone (null value)", Want: "malformed_json", tombstone: true},
		{Name: "valid record after the bad ones", Want: "applied", value: fmt.Appendf(nil, `{"type":"visit","entity":"h-last",%s,"segment":{"source":"sentinel"}}`, tm)},
	}
	return append(cases, gen...)
}

// TestHostileInput produces the hostile corpus (testdata/hostile) through a
// real broker and checks SPEC §2.2: every record ends in exactly one
// outcome, the expected one; invalid records reach the dead-letter topic
// with their reason; nothing crashes; the partition is not blocked (the
// valid record after the bad ones is applied); and /metrics stays valid
// Prometheus text, with injected label values escaped, never breaking out
// of their label.
func TestHostileInput(t *testing.T) {
	b, err := os.ReadFile(hostileDir + "funnelwatch.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := processor.ParseConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	brokers := startBroker(t)
	cfg.Kafka.Brokers = brokers
	cfg.FlushInterval = processor.Duration(50 * time.Millisecond)
	cases := loadHostile(t, cfg.Events.MaxRecordBytes)
	topic := cfg.Kafka.Topics[0].Name

	// One partition, in order; the header names the case, so that the
	// offsets can be matched to cases whatever the producer did.
	msgs := make([]kafka.Message, len(cases))
	recordTime := time.Date(2026, 11, 2, 9, 0, 0, 0, time.UTC)
	for i, c := range cases {
		msgs[i] = kafka.Message{Key: c.key, Value: c.value, Time: recordTime, Headers: []kafka.Header{{Key: "case", Value: []byte(strconv.Itoa(i))}}}
		if c.tombstone {
			msgs[i].Value = nil
		}
	}
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, AllowAutoTopicCreation: true, RequiredAcks: kafka.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		if err := w.WriteMessages(ctx, msgs...); err == nil {
			break
		} else if ctx.Err() != nil {
			t.Fatalf("produce: %v", err)
		}
		time.Sleep(100 * time.Millisecond) // topic creation in progress
	}
	caseAt := readCaseOffsets(t, brokers, topic, len(cases))

	st := processor.MemStore(t)
	dlq := &kafka.Writer{Addr: kafka.TCP(brokers...), AllowAutoTopicCreation: true, RequiredAcks: kafka.RequireAll, BatchTimeout: 10 * time.Millisecond}
	defer dlq.Close()
	reg := prometheus.NewRegistry()
	wall := time.Date(2026, 11, 2, 13, 30, 0, 0, time.UTC)
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg, Now: func() time.Time { return wall }, DeadLetter: dlq})
	if err != nil {
		t.Fatal(err)
	}
	c, err := processor.NewConsumer(cfg, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(runCtx)
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	defer func() {
		stop()
		if err := g.Wait(); err != nil {
			t.Errorf("processor: %v", err)
		}
	}()

	deadline := time.Now().Add(60 * time.Second)
	for consumed(t, reg) < len(cases) {
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d of %d records after 60s: the partition is blocked", consumed(t, reg), len(cases))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}

	// Outcomes: each reason's counter equals the cases that want it, and
	// they add up to the records consumed.
	want := map[string]int{}
	invalid := 0
	for _, c := range cases {
		want[c.Want]++
		if !oneOf(c.Want, "applied", "duplicate", "late") {
			invalid++
		}
	}
	srv := processor.NewServer(cfg.Web, p, c, reg, nil)
	mfs := scrapeAndParse(t, srv.Handler())
	got := map[string]int{}
	total := 0
	for _, m := range mfs["funnel_events_invalid_total"].GetMetric() {
		if v := int(m.GetCounter().GetValue()); v > 0 {
			got[labelOf(m, "reason")] = v
			total += v
		}
	}
	for name, outcome := range map[string]string{"funnel_events_applied_total": "applied", "funnel_events_duplicate_total": "duplicate", "funnel_events_late_total": "late"} {
		for _, m := range mfs[name].GetMetric() {
			if v := int(m.GetCounter().GetValue()); v > 0 {
				got[outcome] += v
				total += v
			}
		}
	}
	if n := consumed(t, reg); total != n || n != len(cases) {
		t.Errorf("outcomes add up to %d, consumed %d; want both %d (every record in exactly one outcome)", total, n, len(cases))
	}
	for outcome, n := range want {
		if got[outcome] != n {
			t.Errorf("outcome %s: got %d records; want %d", outcome, got[outcome], n)
		}
	}
	for outcome, n := range got {
		if want[outcome] == 0 {
			t.Errorf("outcome %s: got %d records; want none", outcome, n)
		}
	}

	// Each invalid record, and only those, reached the dead-letter topic
	// once, unchanged, with its own reason.
	seen := map[int]bool{}
	for _, m := range readAll(t, brokers, cfg.Kafka.DeadLetterTopic, invalid) {
		var reason, source string
		for _, h := range m.Headers {
			switch h.Key {
			case "funnelwatch-reason":
				reason = string(h.Value)
			case "funnelwatch-source":
				source = string(h.Value)
			}
		}
		off, err := strconv.ParseInt(source[strings.LastIndexByte(source, '/')+1:], 10, 64)
		i, ok := caseAt[off]
		if err != nil || !ok || !strings.HasPrefix(source, topic+"/0/") {
			t.Errorf("dead letter with source %q matches no record", source)
			continue
		}
		c := cases[i]
		if seen[i] {
			t.Errorf("case %q: dead-lettered twice", c.Name)
		}
		seen[i] = true
		if reason != c.Want {
			t.Errorf("case %q: dead-lettered as %s; want %s", c.Name, reason, c.Want)
		}
		if !bytes.Equal(m.Value, c.value) || !bytes.Equal(m.Key, c.key) {
			t.Errorf("case %q: the dead letter's key or value differs from the record's", c.Name)
		}
	}
	for i, c := range cases {
		if !seen[i] && !oneOf(c.Want, "applied", "duplicate", "late") {
			t.Errorf("case %q: not dead-lettered; want %s", c.Name, c.Want)
		}
	}

	// The partition moved past every record: the stored offset is the end.
	for _, m := range mfs["funnel_stored_offset"].GetMetric() {
		if v := int(m.GetGauge().GetValue()); labelOf(m, "topic") == topic && v != len(cases) {
			t.Errorf("stored offset %d; want %d (past the last record)", v, len(cases))
		}
	}

	// Every label value exported is valid UTF-8; the injected ones come
	// back verbatim from the parser, so they stayed inside their label.
	for name := range mfs {
		if !strings.HasPrefix(name, "funnel_") {
			t.Errorf("unexpected metric family %q in the exposition", name)
		}
	}
	values := map[string]map[string]bool{"source": {}, "region": {}}
	for _, m := range mfs["funnel_window_events"].GetMetric() {
		for _, l := range m.GetLabel() {
			if !utf8.ValidString(l.GetValue()) {
				t.Errorf("label %s=%q is not valid UTF-8", l.GetName(), l.GetValue())
			}
			if values[l.GetName()] != nil {
				values[l.GetName()][l.GetValue()] = true
			}
		}
	}
	for _, l := range []struct{ dim, value string }{
		{"source", `a",b="c`},
		{"source", "a\nfunnel_x 1"},
		{"source", "a\nfunnel_y 1"},
		{"region", "}\n# HELP funnel_x x\nfunnel_x{a=\"b\"} 1"},
		{"source", `back\slash\`},
		{"source", "x\x00\x01\x1b[31m\r\t"},
		{"source", "δοκιμή 🚀"},
		{"region", "مرحبا"},
		{"source", strings.Repeat("s", 128)},
		{"source", "42"},
		{"source", "false"},
		{"source", "invalid"},
		{"source", "sentinel"},
	} {
		if !values[l.dim][l.value] {
			t.Errorf("no funnel_window_events series with %s=%q", l.dim, l.value)
		}
	}

	// The JSON API survives the same values.
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/segments", nil))
	if rec.Code != http.StatusOK || !json.Valid(rec.Body.Bytes()) {
		t.Errorf("/api/v1/segments: status %d, valid JSON %v", rec.Code, json.Valid(rec.Body.Bytes()))
	}
}

// oneOf reports whether s is one of in.
func oneOf(s string, in ...string) bool {
	for _, x := range in {
		if s == x {
			return true
		}
	}
	return false
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// scrapeAndParse gets /metrics in the text format Prometheus negotiates
// first and parses it strictly; the OpenMetrics rendering must succeed too.
func scrapeAndParse(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics: status %d: %s", rec.Code, rec.Body)
	}
	body := rec.Body.String()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics is not valid Prometheus text: %v", err)
	}
	req = httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "application/openmetrics-text;version=1.0.0")
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK || !strings.HasSuffix(rec.Body.String(), "# EOF\n") {
		t.Errorf("/metrics as OpenMetrics: status %d, complete %v", rec.Code, strings.HasSuffix(rec.Body.String(), "# EOF\n"))
	}
	return mfs
}

// readAll reads n records of partition 0 of a topic from the start.
func readAll(t *testing.T, brokers []string, topic string, n int) []kafka.Message {
	t.Helper()
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: brokers, Topic: topic, Partition: 0, MaxBytes: 16 << 20, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []kafka.Message
	for len(out) < n {
		m, err := r.ReadMessage(ctx)
		if err != nil {
			t.Fatalf("read %s: %d of %d records: %v", topic, len(out), n, err)
		}
		out = append(out, m)
	}
	return out
}

// readCaseOffsets maps the offset of each produced record to its case.
func readCaseOffsets(t *testing.T, brokers []string, topic string, n int) map[int64]int {
	t.Helper()
	out := map[int64]int{}
	for _, m := range readAll(t, brokers, topic, n) {
		for _, h := range m.Headers {
			if h.Key == "case" {
				i, err := strconv.Atoi(string(h.Value))
				if err != nil {
					t.Fatal(err)
				}
				out[m.Offset] = i
			}
		}
	}
	if len(out) != n {
		t.Fatalf("%d records carry a case header; want %d", len(out), n)
	}
	return out
}
