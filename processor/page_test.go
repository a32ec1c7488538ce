package processor_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/net/html"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

const chromiumPath = "/usr/bin/chromium"

// pageSegment is one segment of the page scenario: visitors per hour at
// the daily peak and the visit→lead probability.
type pageSegment struct {
	source, region string
	perHour        float64
	lead           float64
}

// pageScenario is the traffic the page test feeds: six source×region
// segments with a daily curve, the day up to end plus the hours the
// baseline compares with in the four previous weeks, and a visit→lead drop
// in one segment from dropFrom on. It returns the records in event-time order; the
// last one is at end, which is the processor clock afterwards.
func pageScenario(end, dropFrom time.Time, drop pageSegment) [][]byte {
	segs := []pageSegment{
		{"paid_search", "emea", 300, 0.15},
		{"paid_search", "amer", 160, 0.12},
		{"organic", "emea", 120, 0.10},
		{"organic", "amer", 160, 0.10},
		{"email", "emea", 60, 0.20},
		{"email", "amer", 60, 0.20},
	}
	type span struct{ from, to time.Time }
	// The page's sparklines show the last 24 full hours. The baseline needs
	// the cohort window (entries from 2h05m to 1h05m before the clock, SPEC
	// §3) and the volume window (the last hour) shifted by 1..4 weeks.
	spans := []span{{end.Add(-24 * time.Hour), end}}
	for k := 4; k >= 1; k-- {
		shift := time.Duration(k) * 7 * 24 * time.Hour
		spans = append(spans, span{end.Add(-shift - 150*time.Minute), end.Add(-shift)})
	}
	slices.SortFunc(spans, func(a, b span) int { return a.from.Compare(b.from) })

	type event struct {
		at   time.Time
		line []byte
	}
	var evs []event
	rng := rand.New(rand.NewPCG(7, 11))
	add := func(at time.Time, typ, entity string, seg *pageSegment, value float64) {
		if at.After(end) {
			return
		}
		m := map[string]any{"id": fmt.Sprintf("%s-%s-%d", entity, typ, len(evs)), "type": typ, "entity": entity, "time": at.UTC().Format(time.RFC3339Nano)}
		if seg != nil {
			m["segment"] = map[string]string{"source": seg.source, "region": seg.region}
		}
		if value > 0 {
			m["value"] = value
		}
		b, _ := json.Marshal(m)
		evs = append(evs, event{at, b})
	}
	visitor := 0
	for _, sp := range spans {
		for minute := sp.from; minute.Before(sp.to); minute = minute.Add(time.Minute) {
			// Daily curve: quiet at night, peak at 12:00 UTC.
			hour := float64(minute.Hour()) + float64(minute.Minute())/60
			curve := max(0.15, 0.55+0.45*math.Sin(math.Pi*(hour-6)/12))
			for i := range segs {
				s := &segs[i]
				for range poisson(rng, s.perHour*curve/60) {
					visitor++
					id := fmt.Sprintf("v%d", visitor)
					at := minute.Add(time.Duration(rng.Float64() * float64(time.Minute)))
					add(at, "visit", id, s, 0)
					if rng.Float64() < 0.1 { // a return visit, without attributes
						add(at.Add(time.Duration(rng.Float64()*3*float64(time.Hour))), "visit", id, nil, 0)
					}
					p := s.lead
					if s.source == drop.source && s.region == drop.region && !at.Before(dropFrom) {
						p = drop.lead
					}
					if rng.Float64() >= p {
						continue
					}
					lead := at.Add(time.Duration(min(rng.ExpFloat64()*8, 55) * float64(time.Minute)))
					add(lead, "lead", id, nil, 0)
					if rng.Float64() < 0.15 {
						add(lead.Add(time.Duration((1+rng.Float64()*20)*float64(time.Hour))), "deal", id, nil, float64(1000+rng.IntN(20000)))
					}
				}
			}
		}
	}
	add(end, "visit", "clock", &segs[0], 0)
	slices.SortStableFunc(evs, func(a, b event) int { return a.at.Compare(b.at) })
	lines := make([][]byte, len(evs))
	for i, e := range evs {
		lines[i] = e.line
	}
	return lines
}

// poisson draws from a Poisson distribution with a small mean (Knuth).
func poisson(rng *rand.Rand, mean float64) int {
	l, k, p := math.Exp(-mean), 0, 1.0
	for {
		p *= rng.Float64()
		if p <= l {
			return k
		}
		k++
	}
}

// TestPage renders the page in headless Chromium against a real server
// whose processor consumed, through a real broker, a month of baseline and a
// day in which paid_search/emea's visit→lead conversion collapses, and
// checks what a person sees. With -update it saves a screenshot to
// docs/page.png for the README.
func TestPage(t *testing.T) {
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("chromium is required for the page test (apt-get install chromium): %v", err)
	}
	start := time.Now()
	cfg, err := processor.ParseConfig([]byte(`
kafka: {topics: [{name: events}]}
segments: {dimensions: [source, region], breakdowns: [[], [source], [region], [source, region]]}
# The scenario jumps a week at a time between the baseline hours; with the
# default 24h a jump would make every later event future_time.
time: {clock: event, max_future: 8d}
`))
	if err != nil {
		t.Fatal(err)
	}
	brokers := startBroker(t)
	cfg.Kafka.Brokers = brokers
	cfg.FlushInterval = processor.Duration(50 * time.Millisecond)

	end := time.Date(2026, 11, 20, 16, 0, 0, 0, time.UTC)
	lines := pageScenario(end, end.Add(-150*time.Minute), pageSegment{source: "paid_search", region: "emea", lead: 0.04})
	produce(t, brokers, "events", lines)
	t.Logf("%d records produced in %v", len(lines), time.Since(start).Round(time.Millisecond))

	st, err := store.Open("", store.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last in, first out: the runner stops before the store closes.
	t.Cleanup(func() { st.Close() })
	r := startRunner(t, cfg, st, time.Now)
	r.waitConsumed(t, len(lines))
	t.Logf("consumed in %v", time.Since(start).Round(time.Millisecond))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return processor.NewServer(cfg.Web, r.p, nil, r.reg, nil).Serve(gctx, l) })
	defer func() {
		cancel()
		if err := g.Wait(); err != nil {
			t.Errorf("server: %v", err)
		}
	}()
	url := "http://" + l.Addr().String() + "/"

	snap := r.p.Snapshot()
	ids := map[string]string{} // segment name → id
	for _, s := range snap.Segments {
		var vals []string
		for _, l := range s.Labels {
			vals = append(vals, l.Value)
		}
		ids[s.Breakdown+":"+strings.Join(vals, "/")] = s.ID
	}
	degraded := 0
	for _, s := range snap.Segments {
		if s.Degraded {
			degraded++
		}
	}

	// One run dumps the DOM and takes the screenshot for the README.
	png := filepath.Join(t.TempDir(), "page.png")
	dom := chromium(t, "--dump-dom", "--screenshot="+png, "--window-size=1280,900", "--hide-scrollbars", url)
	doc, err := html.Parse(bytes.NewReader(dom))
	if err != nil {
		t.Fatal(err)
	}

	if got, want := text(byID(doc, "status")), fmt.Sprintf("%d segments, %d degraded", len(snap.Segments), degraded); got != want {
		t.Errorf("status: got %q; want %q", got, want)
	}
	if got, want := text(byID(doc, "clock")), "2026-11-20 16:00:00 UTC"; got != want {
		t.Errorf("clock: got %q; want %q", got, want)
	}
	rows := findAll(doc, func(n *html.Node) bool { return n.Data == "tr" && attr(n, "data-segment") != "" })
	if got, want := len(rows), len(snap.Segments); got != want {
		t.Fatalf("rows: got %d; want %d (one per segment)", got, want)
	}
	row := func(name string) *html.Node {
		t.Helper()
		id, ok := ids[name]
		if !ok {
			t.Fatalf("no segment %s in the snapshot", name)
		}
		for _, n := range rows {
			if attr(n, "data-segment") == id {
				return n
			}
		}
		t.Fatalf("segment %s is not on the page", name)
		return nil
	}

	dropped := row("source+region:paid_search/emea")
	if got := attr(dropped, "data-degraded"); got != "true" {
		t.Errorf("paid_search/emea: data-degraded=%q; want true", got)
	}
	if got := text(first(t, dropped, hasClass("badge"))); got != "degraded" {
		t.Errorf("paid_search/emea badge: got %q; want degraded", got)
	}
	line := text(first(t, dropped, func(n *html.Node) bool { return attr(n, "data-step") == "visit-lead" }))
	if !strings.HasPrefix(line, "▼ visit → lead (cohort, 1h): ") || !strings.Contains(line, "baseline, z = −") {
		t.Errorf("paid_search/emea visit→lead line: got %q; want the dropped rate vs the baseline with a negative z", line)
	}
	if got, want := attr(rows[0], "data-degraded"), "true"; got != want {
		t.Errorf("first row: data-degraded=%q; want %q (degraded segments are listed first)", got, want)
	}

	stable := row("source+region:organic/amer")
	if got := attr(stable, "data-degraded"); got != "false" {
		t.Errorf("organic/amer: data-degraded=%q; want false", got)
	}
	if got := text(first(t, stable, hasClass("badge"))); got != "ok" {
		t.Errorf("organic/amer badge: got %q; want ok", got)
	}
	if got := len(findAll(stable, func(n *html.Node) bool { return n.Data == "svg" })); got != 2 {
		t.Errorf("organic/amer: %d sparklines; want 2", got)
	}
	if got := text(first(t, row("all:"), hasClass("seg-name"))); got != "All traffic" {
		t.Errorf("overall segment name: got %q; want All traffic", got)
	}

	// The breakdown filter offers every breakdown.
	var opts []string
	for _, o := range findAll(byID(doc, "breakdown"), func(n *html.Node) bool { return n.Data == "option" }) {
		opts = append(opts, attr(o, "value"))
	}
	if want := []string{"*", "source+region", "source", "region", "all"}; !sameSet(opts, want) {
		t.Errorf("breakdown options: got %q; want %q", opts, want)
	}

	// The filter in the fragment applies on load.
	dom = chromium(t, "--dump-dom", url+"#breakdown=region&window=1h")
	doc, err = html.Parse(bytes.NewReader(dom))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range findAll(doc, func(n *html.Node) bool { return n.Data == "tr" && attr(n, "data-segment") != "" }) {
		if got := attr(n, "data-breakdown"); got != "region" {
			t.Errorf("filtered to region: row of breakdown %q", got)
		}
	}
	if got, want := text(byID(doc, "funnel-head")), "Entities per stage, last 1h"; got != want {
		t.Errorf("funnel header: got %q; want %q", got, want)
	}

	b, err := os.ReadFile(png)
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Fatalf("screenshot %s is not a PNG", png)
	}
	if *update {
		if err := os.WriteFile(filepath.Join("..", "docs", "page.png"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("done in %v", time.Since(start).Round(time.Millisecond))
}

// chromium runs headless Chromium on a throwaway profile and returns its
// standard output.
func chromium(t *testing.T, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--user-data-dir=" + t.TempDir(), "--virtual-time-budget=5000",
		"--enable-logging=stderr", "--v=0"}
	cmd := exec.CommandContext(ctx, chromiumPath, append(base, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	// Console messages (script errors above all) help when an assertion
	// fails; Chromium's own chatter does not.
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(l, ":CONSOLE") {
			t.Logf("chromium console: %s", l)
		}
	}
	return stdout.Bytes()
}

func findAll(root *html.Node, match func(*html.Node) bool) []*html.Node {
	var out []*html.Node
	if root == nil {
		return nil
	}
	for n := range root.Descendants() {
		if n.Type == html.ElementNode && match(n) {
			out = append(out, n)
		}
	}
	return out
}

// first returns the first element under root that matches, failing the
// test when there is none.
func first(t *testing.T, root *html.Node, match func(*html.Node) bool) *html.Node {
	t.Helper()
	n := findAll(root, match)
	if len(n) == 0 {
		t.Fatalf("no such element in the page")
	}
	return n[0]
}

func byID(doc *html.Node, id string) *html.Node {
	if n := findAll(doc, func(n *html.Node) bool { return attr(n, "id") == id }); len(n) > 0 {
		return n[0]
	}
	return nil
}

func hasClass(c string) func(*html.Node) bool {
	return func(n *html.Node) bool { return slices.Contains(strings.Fields(attr(n, "class")), c) }
}

func attr(n *html.Node, key string) string {
	for _, a := range n.Attr {
		if a.Key == key {
			return a.Val
		}
	}
	return ""
}

// text is the node's text content with whitespace collapsed.
func text(n *html.Node) string {
	if n == nil {
		return ""
	}
	var b strings.Builder
	for d := range n.Descendants() {
		if d.Type == html.TextNode {
			b.WriteString(d.Data)
		}
	}
	return strings.Join(strings.Fields(b.String()), " ")
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
