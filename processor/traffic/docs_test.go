package traffic_test

import (
	"bytes"
	"flag"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/processor/traffic"
)

var update = flag.Bool("update", false, "rewrite the generated parts of docs/demo.md")

const (
	demoDoc    = "../../docs/demo.md"
	tableBegin = "<!-- BEGIN generated segment table: go test ./processor/traffic -run TestDocs -update -->\n"
	tableEnd   = "<!-- END generated segment table -->\n"
)

// segmentTable renders the model's segments and their expected rates at
// the default scale as a Markdown table.
func segmentTable() string {
	cfg := traffic.DefaultConfig(monday)
	lo := make([]float64, 24)
	hi := make([]float64, 24)
	for i := range lo {
		lo[i] = math.Inf(1)
	}
	for h := range 7 * 24 {
		for i, r := range cfg.Rates(monday.Add(time.Duration(h)*time.Hour + 30*time.Minute)) {
			lo[i], hi[i] = min(lo[i], r.VisitorsPerHour), max(hi[i], r.VisitorsPerHour)
		}
	}
	rates := cfg.Rates(monday)
	var b strings.Builder
	b.WriteString("| source | region | visitors/h (weekday mean) | quietest–busiest hour | visit→lead | within 1h | lead→deal | median deal | campaigns |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|---|\n")
	for i, s := range traffic.Segments() {
		camps := strings.Join(s.Campaigns, ", ")
		if camps == "" {
			camps = "–"
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f–%.0f | %.3f | %.3f | %.3f | %.0f | %s |\n",
			s.Source, s.Region, s.VisitorsPerHour, lo[i], hi[i], s.LeadProbability, rates[i].LeadWithinHour, s.DealProbability, s.MedianDealValue, camps)
	}
	return b.String()
}

// TestDocsSegmentTable keeps the table in docs/demo.md equal to the model.
func TestDocsSegmentTable(t *testing.T) {
	doc, err := os.ReadFile(demoDoc)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(doc, []byte(tableBegin))
	j := bytes.Index(doc, []byte(tableEnd))
	if i < 0 || j < i {
		t.Fatalf("%s: no %q … %q markers", demoDoc, strings.TrimSpace(tableBegin), strings.TrimSpace(tableEnd))
	}
	got := string(doc[i+len(tableBegin) : j])
	want := segmentTable()
	if got == want {
		return
	}
	if *update {
		out := append(append(append([]byte{}, doc[:i+len(tableBegin)]...), want...), doc[j:]...)
		if err := os.WriteFile(demoDoc, out, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Errorf("%s: the segment table differs from the model; run go test ./processor/traffic -run TestDocs -update\ngot:\n%s\nwant:\n%s", demoDoc, got, want)
}
