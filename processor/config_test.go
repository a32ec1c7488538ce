package processor_test

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/funnelwatch/funnelwatch/processor"
)

const (
	day  = 24 * time.Hour
	week = 7 * day
)

func dur(d time.Duration) processor.Duration { return processor.Duration(d) }

func parse(t *testing.T, src string) processor.Config {
	t.Helper()
	cfg, err := processor.ParseConfig([]byte(src))
	if err != nil {
		t.Fatalf("ParseConfig(%q): %v", src, err)
	}
	return cfg
}

func boolp(b bool) *bool { return &b }

// TestDefaultConfig checks that every key of SPEC §7 takes its documented
// default when the file is empty, including the values Validate derives.
func TestDefaultConfig(t *testing.T) {
	for _, src := range []string{"", "# only a comment\n", "{}"} {
		cfg := parse(t, src)
		for _, c := range []struct {
			key       string
			got, want any
		}{
			{"kafka.brokers", cfg.Kafka.Brokers, []string{"127.0.0.1:9092"}},
			{"kafka.group", cfg.Kafka.Group, "funnelwatch"},
			{"kafka.topics", cfg.Kafka.Topics, []processor.TopicConfig{{Name: "funnel-events"}}},
			{"kafka.dead_letter_topic", cfg.Kafka.DeadLetterTopic, ""},
			{"kafka.tls", cfg.Kafka.TLS, processor.TLSConfig{}},
			{"kafka.sasl", cfg.Kafka.SASL, processor.SASLConfig{}},
			{"kafka.session_timeout", cfg.Kafka.SessionTimeout, dur(30 * time.Second)},
			{"kafka.heartbeat_interval", cfg.Kafka.HeartbeatInterval, dur(3 * time.Second)},
			{"kafka.rebalance_timeout", cfg.Kafka.RebalanceTimeout, dur(30 * time.Second)},
			{"events.fields", cfg.Events.Fields, processor.FieldsConfig{ID: "/id", Type: "/type", Entity: "/entity", Time: "/time", Value: "/value", Segment: "/segment"}},
			{"events.dimension_fields", len(cfg.Events.DimensionFields), 0},
			{"events.type_names", len(cfg.Events.TypeNames), 0},
			{"events.max_record_bytes", cfg.Events.MaxRecordBytes, 65536},
			{"funnel.stages", cfg.Funnel.Stages, []string{"visit", "lead", "deal"}},
			{"funnel.steps", cfg.Funnel.Steps, []processor.StepConfig{
				{From: "visit", To: "lead", Horizon: dur(time.Hour), AlertWindow: dur(time.Hour)},
				{From: "lead", To: "deal", Horizon: dur(30 * day), AlertWindow: dur(week)},
				{From: "visit", To: "deal", Horizon: dur(30 * day), AlertWindow: dur(week), Alert: boolp(false)},
			}},
			{"segments.dimensions", cfg.Segments.Dimensions, []string{"source", "region"}},
			{"segments.breakdowns", cfg.Segments.Breakdowns, [][]string{{}, {"source"}, {"region"}, {"source", "region"}}},
			{"segments.max_values", cfg.Segments.MaxValues, 100},
			{"windows", cfg.Windows, []processor.Duration{dur(time.Hour), dur(day), dur(week)}},
			{"time.bucket", cfg.Time.Bucket, dur(time.Minute)},
			{"time.clock", cfg.Time.Clock, processor.ClockWall},
			{"time.grace", cfg.Time.Grace, dur(5 * time.Minute)},
			{"time.max_future", cfg.Time.MaxFuture, dur(time.Hour)},
			// 4 baseline weeks + 30d horizon + 5m grace + 1w window + 1m bucket.
			{"time.retention", cfg.Time.Retention, dur(4*week + 30*day + 5*time.Minute + week + time.Minute)},
			{"time.entity_ttl", cfg.Time.EntityTTL, dur(90 * day)},
			{"alerts", cfg.Alerts, processor.AlertsConfig{BaselineWeeks: 4, MinEntered: 30, MinExpected: 10, ZOn: 3, ZOff: 1, MinDrop: 0.2}},
			{"store.dir", cfg.Store.Dir, "./data"},
			{"store.entity_cache", cfg.Store.EntityCache, 500_000},
			{"flush_interval", cfg.FlushInterval, dur(time.Second)},
			{"web.listen_address", cfg.Web.ListenAddress, ":9470"},
			{"web.config_file", cfg.Web.ConfigFile, ""},
			{"log.level", cfg.Log.Level, "info"},
			{"log.format", cfg.Log.Format, "json"},
		} {
			if !reflect.DeepEqual(c.got, c.want) {
				t.Errorf("source %q: %s = %#v; want %#v", src, c.key, c.got, c.want)
			}
		}
	}
}

// TestDefaultConfigGolden pins the whole effective default configuration,
// as check-config prints it, and checks that it parses back to itself.
func TestDefaultConfigGolden(t *testing.T) {
	cfg := parse(t, "")
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "testdata/default-config.golden", string(out))

	// Printed and parsed again (maps come back empty rather than nil), it
	// is the same configuration.
	again, err := yaml.Marshal(parse(t, string(out)))
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(out) {
		t.Errorf("the effective default config does not parse back to itself:\n%s", diffLines(string(out), string(again)))
	}
}

// TestConfigDerived checks the values Validate derives from other keys.
func TestConfigDerived(t *testing.T) {
	for _, tc := range []struct {
		name string
		src  string
		want func(processor.Config) (got, want any)
	}{
		{
			name: "two stages: one step ending in the last stage",
			src:  "funnel: {stages: [signup, paid]}",
			want: func(c processor.Config) (any, any) {
				return c.Funnel.Steps, []processor.StepConfig{{From: "signup", To: "paid", Horizon: dur(30 * day), AlertWindow: dur(week)}}
			},
		},
		{
			name: "longer funnel: consecutive pairs plus first to last without alert",
			src:  "funnel: {stages: [visit, mql, sql, deal]}",
			want: func(c processor.Config) (any, any) {
				return c.Funnel.Steps, []processor.StepConfig{
					{From: "visit", To: "mql", Horizon: dur(time.Hour), AlertWindow: dur(time.Hour)},
					{From: "mql", To: "sql", Horizon: dur(time.Hour), AlertWindow: dur(time.Hour)},
					{From: "sql", To: "deal", Horizon: dur(30 * day), AlertWindow: dur(week)},
					{From: "visit", To: "deal", Horizon: dur(30 * day), AlertWindow: dur(week), Alert: boolp(false)},
				}
			},
		},
		{
			name: "explicit steps are kept; a horizon of a day or more defaults the alert window to a week",
			src:  "funnel: {steps: [{from: visit, to: lead, horizon: 2d}, {from: lead, to: deal, horizon: 2h, alert_window: 3h, alert: true}]}",
			want: func(c processor.Config) (any, any) {
				return c.Funnel.Steps, []processor.StepConfig{
					{From: "visit", To: "lead", Horizon: dur(2 * day), AlertWindow: dur(week)},
					{From: "lead", To: "deal", Horizon: dur(2 * time.Hour), AlertWindow: dur(3 * time.Hour), Alert: boolp(true)},
				}
			},
		},
		{
			name: "no dimensions: the overall breakdown only",
			src:  "segments: {dimensions: []}",
			want: func(c processor.Config) (any, any) { return c.Segments.Breakdowns, [][]string{{}} },
		},
		{
			name: "one dimension: no combination breakdown",
			src:  "segments: {dimensions: [campaign]}",
			want: func(c processor.Config) (any, any) { return c.Segments.Breakdowns, [][]string{{}, {"campaign"}} },
		},
		{
			name: "three dimensions: overall, each, and all together",
			src:  "segments: {dimensions: [source, region, industry]}",
			want: func(c processor.Config) (any, any) {
				return c.Segments.Breakdowns, [][]string{{}, {"source"}, {"region"}, {"industry"}, {"source", "region", "industry"}}
			},
		},
		{
			name: "explicit breakdowns are kept",
			src:  "segments: {breakdowns: [[region], []]}",
			want: func(c processor.Config) (any, any) { return c.Segments.Breakdowns, [][]string{{"region"}, {}} },
		},
		{
			name: "max_future with the event clock",
			src:  "time: {clock: event}",
			want: func(c processor.Config) (any, any) { return c.Time.MaxFuture, dur(day) },
		},
		{
			name: "max_future with the wall clock",
			src:  "time: {clock: wall}",
			want: func(c processor.Config) (any, any) { return c.Time.MaxFuture, dur(time.Hour) },
		},
		{
			name: "explicit max_future is kept",
			src:  "time: {clock: event, max_future: 90s}",
			want: func(c processor.Config) (any, any) { return c.Time.MaxFuture, dur(90 * time.Second) },
		},
		{
			name: "retention follows baseline weeks, horizons, windows and grace",
			src:  "alerts: {baseline_weeks: 2}\nfunnel: {steps: [{from: visit, to: lead, horizon: 2h, alert_window: 1h}]}\nwindows: [1h, 2d]\ntime: {grace: 10m, bucket: 5m}",
			want: func(c processor.Config) (any, any) {
				return c.Time.Retention, dur(2*week + 2*time.Hour + 10*time.Minute + 2*day + 5*time.Minute)
			},
		},
		{
			name: "explicit retention at least the minimum is kept",
			src:  "time: {retention: 400d}",
			want: func(c processor.Config) (any, any) { return c.Time.Retention, dur(400 * day) },
		},
		{
			name: "lists replace the defaults, maps and structs merge",
			src:  "kafka: {brokers: [b1:9092, b2:9092], tls: {enabled: true}}\nevents: {fields: {entity: /userId}}",
			want: func(c processor.Config) (any, any) {
				return []any{c.Kafka.Brokers, c.Kafka.Group, c.Kafka.TLS.Enabled, c.Events.Fields.Entity, c.Events.Fields.Type},
					[]any{[]string{"b1:9092", "b2:9092"}, "funnelwatch", true, "/userId", "/type"}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, want := tc.want(parse(t, tc.src))
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %#v; want %#v", got, want)
			}
		})
	}
}

// TestConfigDurations checks the Prometheus duration syntax everywhere a
// duration is taken.
func TestConfigDurations(t *testing.T) {
	for _, tc := range []struct {
		src  string
		want time.Duration
	}{
		{"90s", 90 * time.Second},
		{"1m", time.Minute},
		{"1h30m", 90 * time.Minute},
		{"7d", week},
		{"1w", week},
		{"2w3d", 17 * day},
		{"1y", 365 * day},
		{"500ms", 500 * time.Millisecond},
	} {
		cfg := parse(t, "flush_interval: "+tc.src+"\ntime: {entity_ttl: "+tc.src+"}")
		if got := processor.D(cfg.FlushInterval); got != tc.want {
			t.Errorf("flush_interval %s = %v; want %v", tc.src, got, tc.want)
		}
		if got := processor.D(cfg.Time.EntityTTL); got != tc.want {
			t.Errorf("time.entity_ttl %s = %v; want %v", tc.src, got, tc.want)
		}
	}

	// The window label is the canonical form, whatever the spelling.
	cfg := parse(t, "windows: [60m, 24h, 7d, 14d]")
	var labels []string
	for _, w := range cfg.Windows {
		labels = append(labels, processor.WindowLabel(processor.D(w)))
	}
	if want := []string{"1h", "1d", "1w", "2w"}; !reflect.DeepEqual(labels, want) {
		t.Errorf("window labels = %q; want %q", labels, want)
	}
}

// TestConfigStrict checks that decoding errors name what is wrong: an
// unknown key by its name, a malformed duration by its key.
func TestConfigStrict(t *testing.T) {
	for _, tc := range []struct {
		src  string
		want []string
	}{
		{"kafak: {}", []string{"kafak"}},
		{"kafka: {broker: [a:1]}", []string{"broker"}},
		{"kafka: {topics: [{name: x, typ: deal}]}", []string{"typ"}},
		{"kafka: {tls: {enable: true}}", []string{"enable"}},
		{"events: {fields: {user: /u}}", []string{"user"}},
		{"funnel: {steps: [{from: visit, to: lead, window: 1h}]}", []string{"window"}},
		{"time: {buckets: 1m}", []string{"buckets"}},
		{"alerts: {zon: 2}", []string{"zon"}},
		{"web: {listen: x}", []string{"listen"}},
		{"a: 1\nb: 2", []string{"field a", "field b"}},
		{"time: {bucket: 5x}", []string{"time.bucket", `"5x"`}},
		{"time: {bucket: -1m}", []string{"time.bucket", `"-1m"`}},
		{"windows: [1h, 2q]", []string{"windows[1]", `"2q"`}},
		{"funnel: {steps: [{from: visit, to: lead, horizon: 1x}]}", []string{"funnel.steps[0].horizon"}},
		{"time: {grace: 5 minutes}\nflush_interval: soon", []string{"time.grace", "flush_interval"}},
		{"alerts: {z_on: abc}", []string{"abc", "float64"}},
		{"kafka: [1, 2]", []string{"line 1", "KafkaConfig"}},
		{"windows: {a: 1}", []string{"line 1", "Duration"}},
		{"\tfoo: bar", []string{"yaml"}},
	} {
		_, err := processor.ParseConfig([]byte(tc.src))
		if err == nil {
			t.Errorf("ParseConfig(%q) = nil error; want one mentioning %q", tc.src, tc.want)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("ParseConfig(%q) = %q; want it to mention %q", tc.src, err, w)
			}
		}
	}
}

// TestValidate checks each validation rule on its own: the error names the
// key.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		src string
		key string
	}{
		{"kafka: {brokers: []}", "kafka.brokers"},
		{"kafka: {group: ''}", "kafka.group"},
		{"kafka: {topics: []}", "kafka.topics"},
		{"kafka: {topics: [{name: ''}]}", "kafka.topics[0].name"},
		{"kafka: {topics: [{name: a}, {name: a}]}", "kafka.topics[1].name"},
		{"kafka: {topics: [{name: a, type: sale}]}", "kafka.topics[0].type"},
		{"kafka: {topics: [{name: a}], dead_letter_topic: a}", "kafka.dead_letter_topic"},
		{"kafka: {sasl: {mechanism: GSSAPI}}", "kafka.sasl.mechanism"},
		{"kafka: {sasl: {mechanism: PLAIN, password_env: P}}", "kafka.sasl.username"},
		{"kafka: {sasl: {mechanism: SCRAM-SHA-512, username: u}}", "kafka.sasl.password_env"},
		{"kafka: {tls: {enabled: true, cert_file: c.pem}}", "kafka.tls"},
		{"kafka: {session_timeout: 0s}", "kafka.session_timeout"},
		{"kafka: {heartbeat_interval: 30s}", "kafka.heartbeat_interval"},
		{"kafka: {rebalance_timeout: 0s}", "kafka.rebalance_timeout"},
		{"scale_out: {enabled: true, replication_factor: 0}", "scale_out.replication_factor"},
		{"kafka: {topics: [{name: a}]}\nscale_out: {deltas_topic: a}", "scale_out.deltas_topic"},
		{"kafka: {group: g, dead_letter_topic: g-deltas}", "scale_out.deltas_topic"},
		{"events: {fields: {id: id}}", "events.fields.id"},
		{"events: {fields: {time: time}}", "events.fields.time"},
		{"events: {fields: {entity: ''}}", "events.fields.entity"},
		{"events: {dimension_fields: {campaign: /c}}", "events.dimension_fields.campaign"},
		{"events: {dimension_fields: {source: utm_source}}", "events.dimension_fields.source"},
		{"events: {type_names: {Lead Created: leads}}", "events.type_names.Lead Created"},
		{"events: {max_record_bytes: 0}", "events.max_record_bytes"},
		{"funnel: {stages: [visit]}", "funnel.stages"},
		{"funnel: {stages: [visit, '', deal]}", "funnel.stages[1]"},
		{"funnel: {stages: [visit, deal, visit]}", "funnel.stages[2]"},
		{"funnel: {steps: [{from: vist, to: lead}]}", "funnel.steps[0].from"},
		{"funnel: {steps: [{from: visit, to: led}]}", "funnel.steps[0].to"},
		{"funnel: {steps: [{from: deal, to: visit}]}", "funnel.steps[0]"},
		{"funnel: {steps: [{from: visit, to: lead}, {from: visit, to: lead}]}", "funnel.steps[1]"},
		{"funnel: {steps: [{from: visit, to: lead, alert_window: 90s}]}", "funnel.steps[0].alert_window"},
		{"segments: {dimensions: [utm-source]}", "segments.dimensions[0]"},
		{"segments: {dimensions: [__name]}", "segments.dimensions[0]"},
		{"segments: {dimensions: [window]}", "segments.dimensions[0]"},
		{"segments: {dimensions: [step]}", "segments.dimensions[0]"},
		{"segments: {dimensions: [instance]}", "segments.dimensions[0]"},
		{"segments: {dimensions: [source, source]}", "segments.dimensions[1]"},
		{"segments: {breakdowns: [[campaign]]}", "segments.breakdowns[0]"},
		{"segments: {breakdowns: [[source], [source]]}", "segments.breakdowns[1]"},
		{"segments: {max_values: 0}", "segments.max_values"},
		{"windows: []", "windows"},
		{"windows: [1h, 1h]", "windows[1]"},
		{"windows: [0s]", "windows[0]"},
		{"windows: [90s]", "windows[0]"},
		{"time: {bucket: 0s}", "time.bucket"},
		{"time: {bucket: 11m}", "time.bucket"},
		{"time: {clock: kafka}", "time.clock"},
		{"time: {retention: 1d}", "time.retention"},
		{"time: {entity_ttl: 0s}", "time.entity_ttl"},
		{"alerts: {baseline_weeks: 0}", "alerts.baseline_weeks"},
		{"alerts: {baseline_weeks: 53}", "alerts.baseline_weeks"},
		{"alerts: {min_entered: 0}", "alerts.min_entered"},
		{"alerts: {min_expected: -1}", "alerts.min_expected"},
		{"alerts: {z_on: 0}", "alerts.z_on"},
		{"alerts: {z_off: 4}", "alerts.z_off"},
		{"alerts: {z_off: -1}", "alerts.z_off"},
		{"alerts: {min_drop: 1}", "alerts.min_drop"},
		{"alerts: {min_drop: -0.1}", "alerts.min_drop"},
		{"store: {dir: ''}", "store.dir"},
		{"store: {entity_cache: 10}", "store.entity_cache"},
		{"flush_interval: 1ms", "flush_interval"},
		{"web: {listen_address: ''}", "web.listen_address"},
		{"log: {level: verbose}", "log.level"},
		{"log: {format: xml}", "log.format"},
	} {
		_, err := processor.ParseConfig([]byte(tc.src))
		if err == nil {
			t.Errorf("ParseConfig(%q) = nil error; want one naming %s", tc.src, tc.key)
			continue
		}
		if !strings.Contains(err.Error(), tc.key+":") {
			t.Errorf("ParseConfig(%q) = %q; want it to name %s", tc.src, err, tc.key)
		}
	}
}

// TestValidateReportsEveryProblem checks that one run of Validate reports
// every bad key, not just the first.
func TestValidateReportsEveryProblem(t *testing.T) {
	src := `
kafka: {group: "", topics: [{name: events, type: sale}], sasl: {mechanism: PLAIN}}
events: {fields: {entity: userId}, max_record_bytes: -1}
funnel: {steps: [{from: deal, to: visit}]}
segments: {dimensions: [source, le], max_values: 0}
windows: [1h, 61s]
time: {clock: sundial, entity_ttl: 0s}
alerts: {z_on: 1, z_off: 2, min_drop: 2}
flush_interval: 0s
log: {level: loud, format: xml}
`
	_, err := processor.ParseConfig([]byte(src))
	if err == nil {
		t.Fatal("ParseConfig = nil error; want every problem")
	}
	keys := []string{
		"kafka.group", "kafka.topics[0].type", "kafka.sasl.username", "kafka.sasl.password_env",
		"events.fields.entity", "events.max_record_bytes", "funnel.steps[0]",
		"segments.dimensions[1]", "segments.max_values", "windows[1]", "time.clock",
		"time.entity_ttl", "alerts.z_off", "alerts.min_drop", "flush_interval", "log.level", "log.format",
	}
	for _, k := range keys {
		if !strings.Contains(err.Error(), k+":") {
			t.Errorf("error does not name %s:\n%v", k, err)
		}
	}
	if got := len(strings.Split(err.Error(), "\n")); got < len(keys) {
		t.Errorf("error has %d lines; want at least %d, one per problem:\n%v", got, len(keys), err)
	}
}

// TestValidateIdempotent checks that validating an effective config again
// (as the command does after applying flags) changes nothing.
func TestValidateIdempotent(t *testing.T) {
	for _, src := range []string{"", "funnel: {stages: [a, b, c, d]}\ntime: {clock: event}", "segments: {dimensions: []}"} {
		cfg := parse(t, src)
		again := cfg
		again.Funnel.Steps = append([]processor.StepConfig(nil), cfg.Funnel.Steps...)
		if err := again.Validate(); err != nil {
			t.Fatalf("Validate on an effective config: %v", err)
		}
		if !reflect.DeepEqual(again, cfg) {
			t.Errorf("source %q: Validate changed a valid config:\ngot  %+v\nwant %+v", src, again, cfg)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	if _, err := processor.LoadConfig("testdata/does-not-exist.yaml"); err == nil {
		t.Error("LoadConfig of a missing file = nil error")
	}
	cfg, err := processor.LoadConfig("testdata/scenarios/attribution.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Time.Clock != processor.ClockEvent || cfg.Kafka.Topics[0].Name != "events" {
		t.Errorf("LoadConfig read %+v; want the scenario's config", cfg)
	}
}

// TestDocsConfigExamples checks that every YAML example in
// docs/configuration.md is a valid configuration.
func TestDocsConfigExamples(t *testing.T) {
	b, err := os.ReadFile("../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllSubmatch(b, -1)
	if len(blocks) < 5 {
		t.Fatalf("found %d YAML examples in docs/configuration.md; want at least 5", len(blocks))
	}
	for _, m := range blocks {
		if _, err := processor.ParseConfig(m[1]); err != nil {
			t.Errorf("example in docs/configuration.md does not parse: %v\n%s", err, m[1])
		}
	}
}
