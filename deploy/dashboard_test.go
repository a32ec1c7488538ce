package deploy_test

// The Grafana dashboard and the PromQL of dashboard and rules: every
// expression parses, every metric it reads is one funnelwatch exports (or a
// recording rule of the rule file), and every rate uses $__rate_interval.

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

// grafanaDashboard is the part of Grafana's classic dashboard model the tests
// read.
type grafanaDashboard struct {
	UID           string `json:"uid"`
	Title         string `json:"title"`
	SchemaVersion int    `json:"schemaVersion"`
	Templating    struct {
		List []grafanaVariable `json:"list"`
	} `json:"templating"`
	Annotations struct {
		List []struct {
			Name       string      `json:"name"`
			Expr       string      `json:"expr"`
			Datasource *grafanaRef `json:"datasource"`
		} `json:"list"`
	} `json:"annotations"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaTarget struct {
	RefID      string      `json:"refId"`
	Expr       string      `json:"expr"`
	Datasource *grafanaRef `json:"datasource"`
}

type grafanaVariable struct {
	Name       string      `json:"name"`
	Type       string      `json:"type"`
	Query      any         `json:"query"`
	Datasource *grafanaRef `json:"datasource"`
	Multi      bool        `json:"multi"`
	IncludeAll bool        `json:"includeAll"`
	AllValue   string      `json:"allValue"`
}

// queryString returns the variable's query, whether Grafana stored it as a
// string or as a query object.
func (v grafanaVariable) queryString() string {
	switch q := v.Query.(type) {
	case string:
		return q
	case map[string]any:
		s, _ := q["query"].(string)
		return s
	}
	return ""
}

type grafanaPanel struct {
	ID          int                      `json:"id"`
	Type        string                   `json:"type"`
	Title       string                   `json:"title"`
	Datasource  *grafanaRef              `json:"datasource"`
	GridPos     struct{ H, W, X, Y int } `json:"gridPos"`
	FieldConfig struct {
		Defaults struct {
			Unit string `json:"unit"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
	Options struct {
		SortBy []struct {
			DisplayName string `json:"displayName"`
			Desc        bool   `json:"desc"`
		} `json:"sortBy"`
	} `json:"options"`
	Targets []grafanaTarget `json:"targets"`
	// Panels holds the panels of a collapsed row.
	Panels []grafanaPanel `json:"panels"`
}

func loadDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardSource)
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardSource, err)
	}
	return d
}

// panels returns every panel, those inside collapsed rows included.
func (d grafanaDashboard) panels() []grafanaPanel {
	var out []grafanaPanel
	for _, p := range d.Panels {
		out = append(out, p)
		out = append(out, p.Panels...)
	}
	return out
}

const datasourceUID = "${datasource}"

func TestDashboardModel(t *testing.T) {
	d := loadDashboard(t)
	if d.SchemaVersion < 39 {
		t.Errorf("schemaVersion %d, want at least 39", d.SchemaVersion)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("uid %q title %q: both are needed for stable links and provisioning", d.UID, d.Title)
	}

	vars := map[string]grafanaVariable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
	}
	if ds := vars["datasource"]; ds.Type != "datasource" || ds.queryString() != "prometheus" {
		t.Errorf("variable datasource %+v, want type datasource with query prometheus", ds)
	}
	for _, name := range []string{"breakdown", "source", "region"} {
		v, ok := vars[name]
		if !ok {
			t.Errorf("no variable %s", name)
			continue
		}
		q := v.queryString()
		if v.Type != "query" || !strings.HasPrefix(q, "label_values(") || !strings.HasSuffix(q, ", "+name+")") {
			t.Errorf("variable %s: type %q query %q, want label_values(…, %s)", name, v.Type, q, name)
		}
		if v.Datasource == nil || v.Datasource.UID != datasourceUID {
			t.Errorf("variable %s datasource %+v, want %s", name, v.Datasource, datasourceUID)
		}
	}
	for _, name := range []string{"source", "region"} {
		if v := vars[name]; !v.Multi || !v.IncludeAll || v.AllValue != ".*" {
			// ".*" also matches series without the label, which is what
			// every breakdown that lacks the dimension has.
			t.Errorf("variable %s: multi %v includeAll %v allValue %q, want true, true, \".*\"", name, v.Multi, v.IncludeAll, v.AllValue)
		}
	}

	ids := map[int]string{}
	var boxes []grafanaPanel
	for _, p := range d.panels() {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panels %q and %q share id %d", prev, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q gridPos %+v outside the 24-column grid", p.Title, g)
		}
		for _, o := range boxes {
			og := o.GridPos
			if g.X < og.X+og.W && og.X < g.X+g.W && g.Y < og.Y+og.H && og.Y < g.Y+g.H {
				t.Errorf("panels %q and %q overlap", p.Title, o.Title)
			}
		}
		boxes = append(boxes, p)
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != datasourceUID {
			t.Errorf("panel %q datasource %+v, want uid %s", p.Title, p.Datasource, datasourceUID)
		}
		if p.FieldConfig.Defaults.Unit == "" {
			t.Errorf("panel %q has no unit", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no queries", p.Title)
		}
		for _, q := range p.Targets {
			if q.Expr == "" || q.RefID == "" {
				t.Errorf("panel %q: query %q without expr or refId", p.Title, q.RefID)
			}
			if q.Datasource == nil || q.Datasource.UID != datasourceUID {
				t.Errorf("panel %q query %s datasource %+v, want uid %s", p.Title, q.RefID, q.Datasource, datasourceUID)
			}
		}
	}
}

// TestDashboardContent checks that the panels the runbook and the alerts
// refer to exist and read what they should.
func TestDashboardContent(t *testing.T) {
	d := loadDashboard(t)
	used := map[string]bool{}
	quantile := false
	for _, p := range d.panels() {
		for _, q := range p.Targets {
			expr := mustParse(t, p.Title, q.Expr)
			for _, vs := range vectorSelectors(expr) {
				used[vs.Name] = true
				if p.Type == "timeseries" && perSegment(vs.Name) {
					checkSegmentMatchers(t, p.Title, vs)
				}
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if c, ok := n.(*parser.Call); ok && c.Func.Name == "histogram_quantile" &&
					strings.Contains(c.String(), "funnel_time_to_convert_seconds_bucket") {
					quantile = true
				}
				return nil
			})
		}
	}
	for _, name := range []string{
		"funnel_cohort_conversion_ratio", "funnel_baseline_cohort_conversion_ratio",
		"funnel_window_conversion_ratio", "funnel_conversion_zscore", "funnel_conversion_degraded",
		"funnel_window_entities", "funnel_window_events", "funnel_time_to_convert_seconds_bucket",
		"funnel_events_invalid_total", "funnel_events_late_total", "funnel_events_duplicate_total",
		"funnel_consumer_lag_records", "funnel_store_disk_bytes",
	} {
		if !used[name] {
			t.Errorf("no panel reads %s", name)
		}
	}
	if !quantile {
		t.Errorf("no histogram_quantile over funnel_time_to_convert_seconds_bucket")
	}

	// The degraded segments: a table sorted worst (lowest z-score) first.
	var found bool
	for _, p := range d.panels() {
		if p.Type != "table" || !slices.ContainsFunc(p.Targets, func(q grafanaTarget) bool {
			return strings.Contains(q.Expr, "funnel_conversion_zscore") && strings.Contains(q.Expr, "funnel_conversion_degraded")
		}) {
			continue
		}
		found = true
		if len(p.Options.SortBy) != 1 || p.Options.SortBy[0].Desc {
			t.Errorf("table %q sortBy %+v, want one ascending column (z-score, worst first)", p.Title, p.Options.SortBy)
		}
		if !strings.HasPrefix(p.Targets[0].Expr, "sort(") {
			t.Errorf("table %q first query %q, want sort(…) (ascending)", p.Title, p.Targets[0].Expr)
		}
	}
	if !found {
		t.Errorf("no table of degraded segments (funnel_conversion_zscore of funnel_conversion_degraded == 1)")
	}
}

// perSegment reports whether a metric carries the breakdown labels.
func perSegment(name string) bool {
	for _, p := range []string{"funnel_window_", "funnel_cohort_", "funnel_baseline_", "funnel_conversion_", "funnel_volume_"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// checkSegmentMatchers checks that a per-segment series in a graph follows
// the breakdown and segment variables.
func checkSegmentMatchers(t *testing.T, panel string, vs *parser.VectorSelector) {
	t.Helper()
	want := map[string]string{"breakdown": `="` + varValue + `"`, "source": `=~"` + varValue + `"`, "region": `=~"` + varValue + `"`}
	for _, m := range vs.LabelMatchers {
		if w, ok := want[m.Name]; ok && m.Type.String()+`"`+m.Value+`"` == w {
			delete(want, m.Name)
		}
	}
	if len(want) > 0 {
		t.Errorf("panel %q: %s does not follow the variables breakdown=\"$breakdown\", source=~\"$source\", region=~\"$region\"", panel, vs)
	}
}

// rateInterval stands for $__rate_interval when parsing, so that range
// selectors using it can be told from hard-coded ranges.
const rateInterval = 4242 * time.Second

// varValue stands for every other dashboard variable when parsing.
const varValue = "VAR"

var (
	rateIntervalVar = regexp.MustCompile(`\$\{?__rate_interval\}?`)
	builtinVar      = regexp.MustCompile(`\$\{?__[a-z_]+\}?`)
	dashboardVar    = regexp.MustCompile(`\$\{[a-zA-Z0-9_]+(:[a-z]+)?\}|\$[a-zA-Z0-9_]+`)
	labelValuesCall = regexp.MustCompile(`^label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\)$`)
)

// substituteVars replaces Grafana variables so the expression parses.
func substituteVars(expr string) string {
	expr = rateIntervalVar.ReplaceAllString(expr, fmt.Sprintf("%ds", int(rateInterval.Seconds())))
	expr = builtinVar.ReplaceAllString(expr, "5m")
	return dashboardVar.ReplaceAllString(expr, varValue)
}

var promqlParser = parser.NewParser(parser.Options{})

func mustParse(t *testing.T, where, expr string) parser.Expr {
	t.Helper()
	e, err := promqlParser.ParseExpr(substituteVars(expr))
	if err != nil {
		t.Fatalf("%s: %q does not parse: %v", where, expr, err)
	}
	return e
}

// vectorSelectors returns every series selector in e.
func vectorSelectors(e parser.Expr) []*parser.VectorSelector {
	var out []*parser.VectorSelector
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			if vs.Name == "" {
				for _, m := range vs.LabelMatchers {
					if m.Name == model.MetricNameLabel && m.Type == labels.MatchEqual {
						vs.Name = m.Value
					}
				}
			}
			out = append(out, vs)
		}
		return nil
	})
	return out
}

// promqlExpr is one PromQL expression and where it comes from.
type promqlExpr struct {
	where, expr string
	dashboard   bool
}

// dashboardExprs returns the PromQL of every query, annotation and variable
// of the dashboard.
func dashboardExprs(t *testing.T) []promqlExpr {
	t.Helper()
	d := loadDashboard(t)
	var out []promqlExpr
	for _, p := range d.panels() {
		for _, q := range p.Targets {
			out = append(out, promqlExpr{fmt.Sprintf("panel %q query %s", p.Title, q.RefID), q.Expr, true})
		}
	}
	for _, a := range d.Annotations.List {
		if a.Expr != "" {
			out = append(out, promqlExpr{fmt.Sprintf("annotation %q", a.Name), a.Expr, true})
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValuesCall.FindStringSubmatch(v.queryString())
		if m == nil {
			t.Errorf("variable %s query %q is not label_values(selector, label)", v.Name, v.queryString())
			continue
		}
		out = append(out, promqlExpr{fmt.Sprintf("variable %s", v.Name), m[1], true})
	}
	return out
}

// ruleFile is the part of a Prometheus rule file the tests read.
type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Record string `json:"record"`
			Alert  string `json:"alert"`
			Expr   string `json:"expr"`
		} `json:"rules"`
	} `json:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(ruleSource)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatalf("%s: %v", ruleSource, err)
	}
	if len(rf.Groups) == 0 {
		t.Fatalf("%s has no rule groups", ruleSource)
	}
	return rf
}

// TestPromQL parses every expression of the dashboard and the rules and
// checks the metric names against what funnelwatch exports.
func TestPromQL(t *testing.T) {
	known := exportedMetricNames(t)
	// Series Prometheus makes itself.
	for _, name := range []string{"up", "ALERTS", "ALERTS_FOR_STATE"} {
		known[name] = true
	}
	exprs := dashboardExprs(t)
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			name := r.Record + r.Alert
			exprs = append(exprs, promqlExpr{fmt.Sprintf("rule %s/%s", g.Name, name), r.Expr, false})
			if r.Record != "" {
				known[r.Record] = true
			}
		}
	}

	unknown := map[string][]string{}
	for _, e := range exprs {
		expr := mustParse(t, e.where, e.expr)
		for _, vs := range vectorSelectors(expr) {
			if vs.Name == "" {
				t.Errorf("%s: selector %s names no metric", e.where, vs)
			} else if !known[vs.Name] {
				unknown[vs.Name] = append(unknown[vs.Name], e.where)
			}
		}
		if !e.dashboard {
			continue
		}
		parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
			switch n := n.(type) {
			case *parser.MatrixSelector:
				if n.Range != rateInterval || n.RangeExpr != nil {
					t.Errorf("%s: range [%s] in %q; use [$__rate_interval]", e.where, n.Range, e.expr)
				}
			case *parser.SubqueryExpr:
				t.Errorf("%s: subquery in %q; dashboards use $__rate_interval ranges only", e.where, e.expr)
			}
			return nil
		})
	}
	names := make([]string, 0, len(unknown))
	for name := range unknown {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		t.Errorf("%s is not a metric funnelwatch exports (used by %s)", name, strings.Join(unknown[name], "; "))
	}
}

// TestPromQLCheckerCatchesMistakes makes sure the checks above are not
// vacuous.
func TestPromQLCheckerCatchesMistakes(t *testing.T) {
	tests := []struct {
		expr      string
		wantNames []string
		wantRange time.Duration
	}{
		{`sum(rate(funnel_events_total{job=~"$job"}[$__rate_interval]))`, []string{"funnel_events_total"}, rateInterval},
		{`rate(funnel_events_total[5m])`, []string{"funnel_events_total"}, 5 * time.Minute},
		{`{__name__="funnel_store_disk_bytes", job="${job}"}`, []string{"funnel_store_disk_bytes"}, 0},
		{`funnel_cohort_conversion_ratio{breakdown="$breakdown", source=~"${source:regex}"} and on() vector(1)`, []string{"funnel_cohort_conversion_ratio"}, 0},
	}
	for _, tt := range tests {
		e := mustParse(t, "test", tt.expr)
		var names []string
		for _, vs := range vectorSelectors(e) {
			if vs.Name != "" {
				names = append(names, vs.Name)
			}
		}
		if !slices.Equal(names, tt.wantNames) {
			t.Errorf("%q: names %q, want %q", tt.expr, names, tt.wantNames)
		}
		var got time.Duration
		parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
			if m, ok := n.(*parser.MatrixSelector); ok {
				got = m.Range
			}
			return nil
		})
		if got != tt.wantRange {
			t.Errorf("%q: range %s, want %s", tt.expr, got, tt.wantRange)
		}
	}
	if _, err := promqlParser.ParseExpr(substituteVars(`sum(rate(x[$__rate_interval])`)); err == nil {
		t.Errorf("unbalanced parenthesis parsed")
	}
}
