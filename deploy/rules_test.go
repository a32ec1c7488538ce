// Package deploy_test checks the alerting artefacts under deploy/ with the
// real tools that consume them: promtool for the Prometheus rules and their
// unit tests, amtool for the Alertmanager configuration and its routing, and
// a real Alertmanager for the inhibition rules.
//
// The tools are required: a missing binary fails the test rather than
// skipping it, because CI installs them (Debian: prometheus,
// prometheus-alertmanager).
package deploy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	rulesFile        = "rules/funnelwatch.rules.yaml"
	ruleTestsGlob    = "rules/tests/*.yaml"
	alertmanagerFile = "alertmanager/alertmanager.yml"
	runbookFile      = "../docs/runbook.md"
	runbookURLPrefix = "https://github.com/funnelwatch/funnelwatch/blob/main/docs/runbook.md#"

	// toolTimeout bounds every promtool and amtool invocation.
	toolTimeout = time.Minute
)

// lookTool returns the path of the first of names found in PATH and fails
// the test when none is installed.
func lookTool(t *testing.T, names ...string) string {
	t.Helper()
	for _, name := range names {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	t.Fatalf("none of %q found in PATH; install them (Debian: apt-get install prometheus prometheus-alertmanager)", names)
	return ""
}

// runTool runs a tool to completion with a bounded time and returns its
// standard output. It fails the test, showing both streams, when the tool
// exits non-zero.
func runTool(t *testing.T, tool string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), toolTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(tool), strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func TestRulesCheck(t *testing.T) {
	promtool := lookTool(t, "promtool")
	runTool(t, promtool, "check", "rules", rulesFile)
}

func TestRulesUnitTests(t *testing.T) {
	promtool := lookTool(t, "promtool")
	files, err := filepath.Glob(ruleTestsGlob)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no rule unit tests match %s", ruleTestsGlob)
	}
	runTool(t, promtool, append([]string{"test", "rules"}, files...)...)
}

// alertRule is what TestRulesAlertsAreComplete needs of one alerting rule.
type alertRule struct {
	name string
	body string // the rule's lines, from "- alert:" to the next rule
}

var alertLine = regexp.MustCompile(`^\s*- alert:\s*(\S+)\s*$`)

// readAlertRules splits the rule file into its alerting rules. It relies on
// the file's layout (one "- alert:" line a rule, recording rules first),
// which promtool check rules validates separately.
func readAlertRules(t *testing.T) []alertRule {
	t.Helper()
	data, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rules []alertRule
	inAlert := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch m := alertLine.FindStringSubmatch(line); {
		case m != nil:
			rules = append(rules, alertRule{name: m[1]})
			inAlert = true
		case strings.HasPrefix(trimmed, "- record:"), strings.HasPrefix(trimmed, "- name:"):
			// A recording rule or a new group ends the current alert.
			inAlert = false
		case inAlert:
			rules[len(rules)-1].body += line + "\n"
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(rules) == 0 {
		t.Fatalf("no alerting rules in %s", rulesFile)
	}
	return rules
}

// TestRulesAlertsAreComplete checks what promtool does not: every alert has
// a severity, a summary, a description and a runbook_url whose anchor exists
// in the runbook, and every alert has promtool unit tests both for firing
// and for staying silent.
func TestRulesAlertsAreComplete(t *testing.T) {
	runbook, err := os.ReadFile(runbookFile)
	if err != nil {
		t.Fatal(err)
	}
	anchors := markdownAnchors(string(runbook))

	fires, silent := ruleTestCoverage(t)
	for _, r := range readAlertRules(t) {
		for _, key := range []string{"severity:", "summary:", "description:", "runbook_url:"} {
			if !strings.Contains(r.body, key) {
				t.Errorf("alert %s: no %s", r.name, strings.TrimSuffix(key, ":"))
			}
		}
		wantURL := runbookURLPrefix + strings.ToLower(r.name)
		if !strings.Contains(r.body, "runbook_url: "+wantURL+"\n") {
			t.Errorf("alert %s: runbook_url is not %s", r.name, wantURL)
		}
		if !anchors[strings.ToLower(r.name)] {
			t.Errorf("alert %s: %s has no section with anchor #%s", r.name, runbookFile, strings.ToLower(r.name))
		}
		if !fires[r.name] {
			t.Errorf("alert %s: no unit test in %s expects it to fire", r.name, ruleTestsGlob)
		}
		if !silent[r.name] {
			t.Errorf("alert %s: no unit test in %s expects it to stay silent", r.name, ruleTestsGlob)
		}
	}
}

var alertnameLine = regexp.MustCompile(`^\s*alertname:\s*(\S+)\s*$`)

// ruleTestCoverage reports, per alert name, whether some alert_rule_test
// case expects it to fire (exp_alerts follows) and whether some case
// expects it to stay silent (no exp_alerts).
func ruleTestCoverage(t *testing.T) (fires, silent map[string]bool) {
	t.Helper()
	files, err := filepath.Glob(ruleTestsGlob)
	if err != nil {
		t.Fatal(err)
	}
	fires, silent = map[string]bool{}, map[string]bool{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(data), "\n")
		for i, line := range lines {
			m := alertnameLine.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			next := ""
			if i+1 < len(lines) {
				next = strings.TrimSpace(lines[i+1])
			}
			if strings.HasPrefix(next, "exp_alerts:") {
				fires[m[1]] = true
			} else {
				silent[m[1]] = true
			}
		}
	}
	return fires, silent
}

// markdownAnchors returns the GitHub anchors of the headings of a Markdown
// document: lower case, spaces to dashes, punctuation dropped.
func markdownAnchors(doc string) map[string]bool {
	anchors := map[string]bool{}
	for line := range strings.SplitSeq(doc, "\n") {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(title) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || ('a' <= r && r <= 'z') || ('0' <= r && r <= '9'):
				b.WriteRune(r)
			}
		}
		anchors[b.String()] = true
	}
	return anchors
}

func TestAlertmanagerConfig(t *testing.T) {
	amtool := lookTool(t, "amtool")
	runTool(t, amtool, "check-config", alertmanagerFile)
}

func TestAlertmanagerRoutes(t *testing.T) {
	amtool := lookTool(t, "amtool")
	tests := []struct {
		name   string
		labels []string
		want   string
	}{
		{
			name:   "overall conversion drop pages the funnel owners",
			labels: []string{"alertname=FunnelConversionDegraded", "severity=critical", "breakdown=all", "from=visit", "to=lead", "window=1h"},
			want:   "funnel-pager",
		},
		{
			name:   "segment conversion drop goes to the funnel chat",
			labels: []string{"alertname=FunnelConversionDegraded", "severity=warning", "breakdown=source", "source=paid_search", "from=visit", "to=lead", "window=1h"},
			want:   "funnel-chat",
		},
		{
			name:   "overall volume drop pages the funnel owners",
			labels: []string{"alertname=FunnelVolumeDrop", "severity=critical", "breakdown=all", "step=visit", "window=1h"},
			want:   "funnel-pager",
		},
		{
			name:   "segment volume drop goes to the funnel chat",
			labels: []string{"alertname=FunnelVolumeDrop", "severity=warning", "breakdown=source+region", "source=newsletter", "region=emea", "step=visit", "window=1h"},
			want:   "funnel-chat",
		},
		{
			name:   "funnelwatch down pages the platform team",
			labels: []string{"alertname=FunnelwatchDown", "severity=critical", "job=funnelwatch", "instance=fw-0:9470"},
			want:   "platform-pager",
		},
		{
			name:   "funnelwatch absent pages the platform team",
			labels: []string{"alertname=FunnelwatchAbsent", "severity=critical"},
			want:   "platform-pager",
		},
		{
			name:   "consumer lag goes to the platform chat",
			labels: []string{"alertname=FunnelwatchConsumerLagGrowing", "severity=warning", "job=funnelwatch", "instance=fw-0:9470", "topic=funnel-events"},
			want:   "platform-chat",
		},
		{
			name:   "invalid records go to the platform chat",
			labels: []string{"alertname=FunnelwatchInvalidRecordsHigh", "severity=warning", "job=funnelwatch", "instance=fw-0:9470"},
			want:   "platform-chat",
		},
		{
			name:   "stalled clock goes to the platform chat",
			labels: []string{"alertname=FunnelwatchClockStalled", "severity=warning", "job=funnelwatch", "instance=fw-0:9470"},
			want:   "platform-chat",
		},
		{
			name:   "anything else falls through to the default receiver",
			labels: []string{"alertname=NodeDown", "severity=critical"},
			want:   "default",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"config", "routes", "test", "--config.file=" + alertmanagerFile}, tt.labels...)
			got := strings.TrimSpace(runTool(t, amtool, args...))
			if got != tt.want {
				t.Errorf("amtool config routes test %s: got receiver %q; want %q", strings.Join(tt.labels, " "), got, tt.want)
			}
		})
	}
}

// inhibitionCase is one alert posted to Alertmanager, with the cases that
// may inhibit it. Alertmanager records one inhibitor only (that of the first
// matching inhibit rule), so an alert with several parents must be inhibited
// by one of them.
type inhibitionCase struct {
	name        string
	labels      map[string]string
	inhibitedBy []string
}

// TestAlertmanagerInhibition runs a real Alertmanager with the example
// configuration, posts parent and child alerts through its v2 API, and checks
// which alert inhibits which.
func TestAlertmanagerInhibition(t *testing.T) {
	binary := lookTool(t, "alertmanager", "prometheus-alertmanager")

	common := map[string]string{"namespace": "monitoring", "job": "funnelwatch", "instance": "fw-0:9470"}
	conv := func(severity, breakdown, from, to, window string, extra ...string) map[string]string {
		l := map[string]string{"alertname": "FunnelConversionDegraded", "severity": severity, "breakdown": breakdown, "from": from, "to": to, "window": window}
		for i := 0; i+1 < len(extra); i += 2 {
			l[extra[i]] = extra[i+1]
		}
		return l
	}
	vol := func(severity, breakdown string, extra ...string) map[string]string {
		l := map[string]string{"alertname": "FunnelVolumeDrop", "severity": severity, "breakdown": breakdown, "step": "visit", "window": "1h"}
		for i := 0; i+1 < len(extra); i += 2 {
			l[extra[i]] = extra[i+1]
		}
		return l
	}
	cases := []inhibitionCase{
		// breakdown="all" inhibits every other breakdown of the same step.
		{name: "all visit→lead", labels: conv("critical", "all", "visit", "lead", "1h")},
		{name: "source visit→lead", labels: conv("warning", "source", "visit", "lead", "1h", "source", "paid_search"), inhibitedBy: []string{"all visit→lead"}},
		{name: "source+region visit→lead", labels: conv("warning", "source+region", "visit", "lead", "1h", "source", "organic", "region", "apac"), inhibitedBy: []string{"all visit→lead"}},
		{name: "source visit→lead other job", labels: conv("warning", "source", "visit", "lead", "1h", "source", "paid_search", "job", "funnelwatch-staging")},
		{name: "volume all fw-0", labels: vol("critical", "all")},
		{name: "volume source", labels: vol("warning", "source", "source", "paid_search"), inhibitedBy: []string{"volume all fw-0"}},
		// A conversion parent does not inhibit volume alerts.
		{name: "all visit→lead fw-2", labels: conv("critical", "all", "visit", "lead", "1h", "instance", "fw-2:9470")},
		{name: "volume source fw-2", labels: vol("warning", "source", "source", "paid_search", "instance", "fw-2:9470")},
		// source and region parents inhibit their source+region children only.
		{name: "source=paid_search lead→deal", labels: conv("warning", "source", "lead", "deal", "1w", "source", "paid_search")},
		{name: "region=emea lead→deal", labels: conv("warning", "region", "lead", "deal", "1w", "region", "emea")},
		{name: "paid_search/apac lead→deal", labels: conv("warning", "source+region", "lead", "deal", "1w", "source", "paid_search", "region", "apac"), inhibitedBy: []string{"source=paid_search lead→deal"}},
		{name: "organic/emea lead→deal", labels: conv("warning", "source+region", "lead", "deal", "1w", "source", "organic", "region", "emea"), inhibitedBy: []string{"region=emea lead→deal"}},
		{name: "paid_search/emea lead→deal", labels: conv("warning", "source+region", "lead", "deal", "1w", "source", "paid_search", "region", "emea"), inhibitedBy: []string{"source=paid_search lead→deal", "region=emea lead→deal"}},
		{name: "organic/apac lead→deal", labels: conv("warning", "source+region", "lead", "deal", "1w", "source", "organic", "region", "apac")},
		{name: "source=referral lead→deal", labels: conv("warning", "source", "lead", "deal", "1w", "source", "referral")},
		// FunnelwatchDown inhibits the funnel alerts of its own instance, and
		// a parent segment on another instance inhibits nothing here.
		{name: "down fw-1", labels: map[string]string{"alertname": "FunnelwatchDown", "severity": "critical", "instance": "fw-1:9470"}},
		{name: "volume all fw-1", labels: vol("critical", "all", "instance", "fw-1:9470"), inhibitedBy: []string{"down fw-1"}},
	}
	for i := range cases {
		for k, v := range common {
			if _, ok := cases[i].labels[k]; !ok {
				cases[i].labels[k] = v
			}
		}
	}

	base := startAlertmanager(t, binary)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	postAlerts(ctx, t, base, cases)

	// The inhibitor learns about source alerts asynchronously, so poll
	// until the view settles or the deadline passes.
	for {
		problems := inhibitionProblems(cases,
			inhibitions(ctx, t, base, "inhibited=true"),
			inhibitions(ctx, t, base, "inhibited=false"))
		if len(problems) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			for _, p := range problems {
				t.Error(p)
			}
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// inhibitionProblems compares what Alertmanager lists with and without
// inhibited alerts against the cases and describes every difference.
func inhibitionProblems(cases []inhibitionCase, all, uninhibited map[string][]string) []string {
	var problems []string
	for _, c := range cases {
		by, listed := all[c.name]
		switch {
		case !listed:
			problems = append(problems, fmt.Sprintf("alert %q: not listed by GET /api/v2/alerts?inhibited=true", c.name))
		case len(c.inhibitedBy) == 0 && len(by) > 0:
			problems = append(problems, fmt.Sprintf("alert %q: got inhibited by %q; want not inhibited", c.name, by))
		case len(c.inhibitedBy) > 0 && len(by) == 0:
			problems = append(problems, fmt.Sprintf("alert %q: got not inhibited; want inhibited by one of %q", c.name, c.inhibitedBy))
		case len(c.inhibitedBy) > 0:
			for _, parent := range by {
				if !slices.Contains(c.inhibitedBy, parent) {
					problems = append(problems, fmt.Sprintf("alert %q: got inhibited by %q; want one of %q", c.name, parent, c.inhibitedBy))
				}
			}
		}
		_, listed = uninhibited[c.name]
		if want := len(c.inhibitedBy) == 0; listed != want {
			problems = append(problems, fmt.Sprintf("alert %q: listed by GET /api/v2/alerts?inhibited=false: got %t; want %t", c.name, listed, want))
		}
	}
	return problems
}

// lockedBuffer collects a child process's output; the process writes while
// the test may read it for a failure message.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startAlertmanager runs Alertmanager with the example configuration on a
// free loopback port, clustering off and storage in a temporary directory,
// waits until it is ready and returns its base URL. The process is killed
// when the test ends.
func startAlertmanager(t *testing.T, binary string) string {
	t.Helper()
	config, err := filepath.Abs(alertmanagerFile)
	if err != nil {
		t.Fatal(err)
	}
	// Reserve a free port and release it for Alertmanager; another process
	// could take it in between, which shows up as Alertmanager exiting.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	var output lockedBuffer
	cmd := exec.Command(binary,
		"--config.file="+config,
		"--storage.path="+t.TempDir(),
		"--web.listen-address="+addr,
		"--cluster.listen-address=",
		"--log.level=debug",
	)
	cmd.Stdout = &output
	cmd.Stderr = &output
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", binary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("alertmanager output:\n%s", output.String())
		}
	})

	base := "http://" + addr
	deadline := time.After(20 * time.Second)
	for {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, base+"/-/ready", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := httpClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return base
			}
		}
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("alertmanager exited before it was ready: %v\n%s", err, output.String())
		case <-deadline:
			t.Fatalf("alertmanager not ready on %s after 20s\n%s", addr, output.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

// postAlerts posts the cases as firing alerts; the case name travels as an
// annotation, which plays no part in routing or inhibition.
func postAlerts(ctx context.Context, t *testing.T, base string, cases []inhibitionCase) {
	t.Helper()
	type postableAlert struct {
		Labels       map[string]string `json:"labels"`
		Annotations  map[string]string `json:"annotations"`
		StartsAt     time.Time         `json:"startsAt"`
		EndsAt       time.Time         `json:"endsAt"`
		GeneratorURL string            `json:"generatorURL"`
	}
	now := time.Now()
	var alerts []postableAlert
	for _, c := range cases {
		alerts = append(alerts, postableAlert{
			Labels:       c.labels,
			Annotations:  map[string]string{"case": c.name},
			StartsAt:     now.Add(-time.Minute),
			EndsAt:       now.Add(time.Hour),
			GeneratorURL: "http://127.0.0.1:9090/graph",
		})
	}
	body, err := json.Marshal(alerts)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/api/v2/alerts", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatalf("POST /api/v2/alerts: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var msg bytes.Buffer
		_, _ = msg.ReadFrom(resp.Body)
		t.Fatalf("POST /api/v2/alerts: %s: %s", resp.Status, msg.String())
	}
}

// inhibitions lists the alerts GET /api/v2/alerts returns for query, as case
// name to the sorted case names of the alerts inhibiting it.
func inhibitions(ctx context.Context, t *testing.T, base, query string) map[string][]string {
	t.Helper()
	type gettableAlert struct {
		Annotations map[string]string `json:"annotations"`
		Fingerprint string            `json:"fingerprint"`
		Status      struct {
			State       string   `json:"state"`
			InhibitedBy []string `json:"inhibitedBy"`
		} `json:"status"`
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v2/alerts?"+query, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatalf("GET /api/v2/alerts?%s: %v", query, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/v2/alerts?%s: %s", query, resp.Status)
	}
	var alerts []gettableAlert
	if err := json.NewDecoder(resp.Body).Decode(&alerts); err != nil {
		t.Fatalf("decode GET /api/v2/alerts?%s: %v", query, err)
	}
	byFingerprint := map[string]string{}
	for _, a := range alerts {
		byFingerprint[a.Fingerprint] = a.Annotations["case"]
	}
	// Parents are always listed by the inhibited=true query (which includes
	// uninhibited alerts too); with inhibited=false the inhibitors of an
	// excluded alert do not matter.
	got := map[string][]string{}
	for _, a := range alerts {
		by := []string{}
		for _, fp := range a.Status.InhibitedBy {
			name, ok := byFingerprint[fp]
			if !ok {
				name = fmt.Sprintf("unknown fingerprint %s", fp)
			}
			by = append(by, name)
		}
		slices.Sort(by)
		if len(by) == 0 {
			by = nil
		}
		got[a.Annotations["case"]] = by
	}
	return got
}
