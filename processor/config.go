package processor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"gopkg.in/yaml.v3"
)

// Config is the whole configuration of funnelwatch (funnelwatch.yaml). The
// zero value is not usable: start from DefaultConfig, or use LoadConfig,
// which applies defaults and validates.
type Config struct {
	Kafka         KafkaConfig    `yaml:"kafka"`
	Events        EventsConfig   `yaml:"events"`
	Funnel        FunnelConfig   `yaml:"funnel"`
	Segments      SegmentsConfig `yaml:"segments"`
	Windows       []Duration     `yaml:"windows"`
	Time          TimeConfig     `yaml:"time"`
	Alerts        AlertsConfig   `yaml:"alerts"`
	Store         StoreConfig    `yaml:"store"`
	FlushInterval Duration       `yaml:"flush_interval"`
	Web           WebConfig      `yaml:"web"`
	Log           LogConfig      `yaml:"log"`
	// ScaleOut makes several replicas compute exact numbers together
	// (docs/scaling.md); off by default.
	ScaleOut ScaleOutConfig `yaml:"scale_out"`
}

// KafkaConfig says where the events come from.
type KafkaConfig struct {
	Brokers         []string      `yaml:"brokers"`
	Group           string        `yaml:"group"`
	Topics          []TopicConfig `yaml:"topics"`
	DeadLetterTopic string        `yaml:"dead_letter_topic"`
	TLS             TLSConfig     `yaml:"tls"`
	SASL            SASLConfig    `yaml:"sasl"`
	// SessionTimeout is how long the group waits for a silent member
	// before reassigning its partitions (after a crash, say).
	SessionTimeout Duration `yaml:"session_timeout"`
	// HeartbeatInterval must be well below SessionTimeout.
	HeartbeatInterval Duration `yaml:"heartbeat_interval"`
	// RebalanceTimeout is how long a rebalance waits for members to rejoin.
	RebalanceTimeout Duration `yaml:"rebalance_timeout"`
}

// TopicConfig is one consumed topic. When Type is set every record of the
// topic is an event of that stage and the record's own type is ignored.
type TopicConfig struct {
	Name string `yaml:"name"`
	Type string `yaml:"type"`
}

// TLSConfig enables TLS to the brokers.
type TLSConfig struct {
	Enabled            bool   `yaml:"enabled"`
	CAFile             string `yaml:"ca_file"`
	CertFile           string `yaml:"cert_file"`
	KeyFile            string `yaml:"key_file"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// SASLConfig enables SASL authentication. The password is read from the
// environment variable PasswordEnv so that it never appears in the file.
type SASLConfig struct {
	Mechanism   string `yaml:"mechanism"`
	Username    string `yaml:"username"`
	PasswordEnv string `yaml:"password_env"`
}

// EventsConfig maps the records' JSON onto the canonical event.
type EventsConfig struct {
	// Fields are JSON pointers (RFC 6901) to the canonical fields.
	Fields FieldsConfig `yaml:"fields"`
	// DimensionFields maps a dimension to a JSON pointer, overriding the
	// lookup of the dimension under Fields.Segment.
	DimensionFields map[string]string `yaml:"dimension_fields"`
	// TypeNames maps producer type names onto stages.
	TypeNames      map[string]string `yaml:"type_names"`
	MaxRecordBytes int               `yaml:"max_record_bytes"`
}

// FieldsConfig holds the JSON pointer of each canonical field.
type FieldsConfig struct {
	ID      string `yaml:"id"`
	Type    string `yaml:"type"`
	Entity  string `yaml:"entity"`
	Time    string `yaml:"time"`
	Value   string `yaml:"value"`
	Segment string `yaml:"segment"`
}

// FunnelConfig names the stages and the steps between them.
type FunnelConfig struct {
	Stages []string     `yaml:"stages"`
	Steps  []StepConfig `yaml:"steps"`
}

// StepConfig is one conversion step. Zero fields take defaults derived from
// the stages (see DefaultConfig and Validate).
type StepConfig struct {
	From        string   `yaml:"from"`
	To          string   `yaml:"to"`
	Horizon     Duration `yaml:"horizon"`
	AlertWindow Duration `yaml:"alert_window"`
	// Alert turns degradation detection on for the step; nil means on,
	// except for the first-to-last step of a funnel of three or more stages.
	Alert *bool `yaml:"alert"`
}

// Alerting reports whether degradation detection is on for the step.
func (s StepConfig) Alerting() bool { return s.Alert == nil || *s.Alert }

// SegmentsConfig names the segment dimensions and how they are broken down.
type SegmentsConfig struct {
	Dimensions []string   `yaml:"dimensions"`
	Breakdowns [][]string `yaml:"breakdowns"`
	MaxValues  int        `yaml:"max_values"`
}

// TimeConfig sets the bucket size, the clock and the time limits.
type TimeConfig struct {
	Bucket    Duration `yaml:"bucket"`
	Clock     string   `yaml:"clock"`
	Grace     Duration `yaml:"grace"`
	MaxFuture Duration `yaml:"max_future"`
	Retention Duration `yaml:"retention"`
	EntityTTL Duration `yaml:"entity_ttl"`
}

// Clock names.
const (
	ClockWall  = "wall"
	ClockEvent = "event"
)

// AlertsConfig tunes degradation detection (SPEC §3, docs/alerting.md).
type AlertsConfig struct {
	BaselineWeeks int     `yaml:"baseline_weeks"`
	MinEntered    int     `yaml:"min_entered"`
	MinExpected   float64 `yaml:"min_expected"`
	ZOn           float64 `yaml:"z_on"`
	ZOff          float64 `yaml:"z_off"`
	MinDrop       float64 `yaml:"min_drop"`
}

// StoreConfig locates the store and bounds its memory.
type StoreConfig struct {
	Dir string `yaml:"dir"`
	// EntityCache is how many entity states are kept in memory between
	// flushes; the rest are read from Pebble when their next event comes.
	EntityCache int `yaml:"entity_cache"`
}

// WebConfig configures the HTTP server.
type WebConfig struct {
	ListenAddress string `yaml:"listen_address"`
	// ConfigFile is an exporter-toolkit web config file (TLS, basic auth).
	ConfigFile string `yaml:"config_file"`
}

// LogConfig configures the logger.
type LogConfig struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// Duration is a duration in Prometheus syntax (90s, 1h, 7d, 1w).
type Duration = model.Duration

// D returns the time.Duration of a Duration.
func D(d Duration) time.Duration { return time.Duration(d) }

const (
	day  = 24 * time.Hour
	week = 7 * day
)

// DefaultConfig returns the configuration used for every key a file leaves
// out. Steps are derived from the stages by Validate when none are given.
func DefaultConfig() Config {
	return Config{
		Kafka: KafkaConfig{
			Brokers: []string{"127.0.0.1:9092"},
			Group:   "funnelwatch",
			Topics:  []TopicConfig{{Name: "funnel-events"}},

			SessionTimeout:    Duration(30 * time.Second),
			HeartbeatInterval: Duration(3 * time.Second),
			RebalanceTimeout:  Duration(30 * time.Second),
		},
		Events: EventsConfig{
			Fields:         FieldsConfig{ID: "/id", Type: "/type", Entity: "/entity", Time: "/time", Value: "/value", Segment: "/segment"},
			MaxRecordBytes: 65536,
		},
		Funnel:        FunnelConfig{Stages: []string{"visit", "lead", "deal"}},
		Segments:      SegmentsConfig{Dimensions: []string{"source", "region"}, MaxValues: 100},
		Windows:       []Duration{Duration(time.Hour), Duration(day), Duration(week)},
		Time:          TimeConfig{Bucket: Duration(time.Minute), Clock: ClockWall, Grace: Duration(5 * time.Minute), EntityTTL: Duration(90 * day)},
		Alerts:        AlertsConfig{BaselineWeeks: 4, MinEntered: 30, MinExpected: 10, ZOn: 3, ZOff: 1, MinDrop: 0.2},
		Store:         StoreConfig{Dir: "./data", EntityCache: 500_000},
		FlushInterval: Duration(time.Second),
		Web:           WebConfig{ListenAddress: ":9470"},
		Log:           LogConfig{Level: "info", Format: "json"},
		ScaleOut:      ScaleOutConfig{ReplicationFactor: -1},
	}
}

// LoadConfig reads a YAML configuration strictly (an unknown key is an
// error naming it), fills in defaults and validates it.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	cfg, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %q: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig is LoadConfig on the bytes of a file.
func ParseConfig(b []byte) (Config, error) {
	cfg := DefaultConfig()
	// yaml.v3 replaces lists rather than merging them into the defaults.
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("parse: %w", keyedDurationErrors(b, err))
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// keyedDurationErrors names the key and line of every malformed duration in
// the document b. yaml.v3 passes the error of a type's own UnmarshalYAML
// through bare ("unknown unit "x" in duration "5x""), which would leave the
// user searching the file. It returns err when no duration is at fault.
func keyedDurationErrors(b []byte, err error) error {
	var doc yaml.Node
	if yaml.Unmarshal(b, &doc) != nil {
		return err
	}
	var errs []error
	walkDurations(&doc, reflect.TypeFor[Config](), "", &errs)
	if len(errs) == 0 {
		return err
	}
	return errors.Join(errs...)
}

func walkDurations(n *yaml.Node, t reflect.Type, key string, errs *[]error) {
	for n.Kind == yaml.DocumentNode || n.Kind == yaml.AliasNode {
		if n.Kind == yaml.AliasNode {
			n = n.Alias
		} else if len(n.Content) == 1 {
			n = n.Content[0]
		} else {
			return
		}
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case t == reflect.TypeFor[Duration]():
		if n.Kind != yaml.ScalarNode {
			return
		}
		if _, err := model.ParseDuration(n.Value); err != nil {
			*errs = append(*errs, fmt.Errorf("%s: line %d: %w", key, n.Line, err))
		}
	case t.Kind() == reflect.Struct && n.Kind == yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			name := n.Content[i].Value
			for j := 0; j < t.NumField(); j++ {
				if tag, _, _ := strings.Cut(t.Field(j).Tag.Get("yaml"), ","); tag == name {
					walkDurations(n.Content[i+1], t.Field(j).Type, strings.TrimPrefix(key+"."+name, "."), errs)
				}
			}
		}
	case t.Kind() == reflect.Slice && n.Kind == yaml.SequenceNode:
		for i, c := range n.Content {
			walkDurations(c, t.Elem(), fmt.Sprintf("%s[%d]", key, i), errs)
		}
	}
}

var (
	labelNameRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
	// reservedLabels are the labels funnelwatch puts on per-segment series
	// itself, plus the ones Prometheus attaches on scrape.
	reservedLabels = []string{"breakdown", "step", "from", "to", "window", "le", "job", "instance", "topic", "partition", "reason", "dimension"}
)

// Validate fills in the values derived from others (steps, breakdowns,
// retention, max_future) and reports every problem at once, each naming its
// key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}

	if len(c.Kafka.Brokers) == 0 {
		bad("kafka.brokers", "at least one broker is required")
	}
	if c.Kafka.Group == "" {
		bad("kafka.group", "must not be empty")
	}
	if len(c.Kafka.Topics) == 0 {
		bad("kafka.topics", "at least one topic is required")
	}
	seenTopic := map[string]bool{}
	for i, t := range c.Kafka.Topics {
		key := fmt.Sprintf("kafka.topics[%d]", i)
		if t.Name == "" {
			bad(key+".name", "must not be empty")
		}
		if seenTopic[t.Name] {
			bad(key+".name", "topic %q is listed twice", t.Name)
		}
		seenTopic[t.Name] = true
		if t.Type != "" && !slices.Contains(c.Funnel.Stages, t.Type) {
			bad(key+".type", "%q is not a stage of funnel.stages", t.Type)
		}
		if t.Name != "" && t.Name == c.Kafka.DeadLetterTopic {
			bad("kafka.dead_letter_topic", "must not be a consumed topic")
		}
	}
	switch c.Kafka.SASL.Mechanism {
	case "", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512":
	default:
		bad("kafka.sasl.mechanism", "%q is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512", c.Kafka.SASL.Mechanism)
	}
	if c.Kafka.SASL.Mechanism != "" {
		if c.Kafka.SASL.Username == "" {
			bad("kafka.sasl.username", "required with a SASL mechanism")
		}
		if c.Kafka.SASL.PasswordEnv == "" {
			bad("kafka.sasl.password_env", "required with a SASL mechanism")
		}
	}
	if c.Kafka.SessionTimeout <= 0 {
		bad("kafka.session_timeout", "must be positive")
	}
	if c.Kafka.HeartbeatInterval <= 0 || c.Kafka.HeartbeatInterval >= c.Kafka.SessionTimeout {
		bad("kafka.heartbeat_interval", "must be positive and below kafka.session_timeout")
	}
	if c.Kafka.RebalanceTimeout <= 0 {
		bad("kafka.rebalance_timeout", "must be positive")
	}
	if (c.Kafka.TLS.CertFile == "") != (c.Kafka.TLS.KeyFile == "") {
		bad("kafka.tls", "cert_file and key_file go together")
	}

	f := c.Events.Fields
	for _, p := range []struct{ key, ptr string }{
		{"events.fields.id", f.ID}, {"events.fields.type", f.Type}, {"events.fields.entity", f.Entity},
		{"events.fields.time", f.Time}, {"events.fields.value", f.Value}, {"events.fields.segment", f.Segment},
	} {
		if p.ptr != "" && !strings.HasPrefix(p.ptr, "/") {
			bad(p.key, "%q is not a JSON pointer (it must start with /)", p.ptr)
		}
	}
	if f.Entity == "" {
		bad("events.fields.entity", "must not be empty")
	}
	for dim, ptr := range c.Events.DimensionFields {
		if !slices.Contains(c.Segments.Dimensions, dim) {
			bad("events.dimension_fields."+dim, "%q is not in segments.dimensions", dim)
		}
		if !strings.HasPrefix(ptr, "/") {
			bad("events.dimension_fields."+dim, "%q is not a JSON pointer", ptr)
		}
	}
	for name, stage := range c.Events.TypeNames {
		if !slices.Contains(c.Funnel.Stages, stage) {
			bad("events.type_names."+name, "%q is not a stage of funnel.stages", stage)
		}
	}
	if c.Events.MaxRecordBytes <= 0 {
		bad("events.max_record_bytes", "must be positive")
	}

	stages := c.Funnel.Stages
	if len(stages) < 2 {
		bad("funnel.stages", "at least two stages are required")
	}
	if len(stages) > 32 {
		bad("funnel.stages", "at most 32 stages are supported")
	}
	for i, s := range stages {
		if s == "" {
			bad(fmt.Sprintf("funnel.stages[%d]", i), "must not be empty")
		}
		if slices.Index(stages, s) != i {
			bad(fmt.Sprintf("funnel.stages[%d]", i), "%q is listed twice", s)
		}
	}
	if len(c.Funnel.Steps) == 0 && len(stages) >= 2 {
		for i := 0; i+1 < len(stages); i++ {
			c.Funnel.Steps = append(c.Funnel.Steps, StepConfig{From: stages[i], To: stages[i+1]})
		}
		if len(stages) > 2 {
			off := false
			c.Funnel.Steps = append(c.Funnel.Steps, StepConfig{From: stages[0], To: stages[len(stages)-1], Alert: &off})
		}
	}
	if len(c.Funnel.Steps) > 32 {
		bad("funnel.steps", "at most 32 steps are supported")
	}
	for i := range c.Funnel.Steps {
		s := &c.Funnel.Steps[i]
		key := fmt.Sprintf("funnel.steps[%d]", i)
		fi, ti := slices.Index(stages, s.From), slices.Index(stages, s.To)
		if fi < 0 {
			bad(key+".from", "%q is not a stage", s.From)
		}
		if ti < 0 {
			bad(key+".to", "%q is not a stage", s.To)
		}
		if fi >= 0 && ti >= 0 && fi >= ti {
			bad(key, "%s comes after %s in funnel.stages", s.From, s.To)
		}
		for j := 0; j < i; j++ {
			if c.Funnel.Steps[j].From == s.From && c.Funnel.Steps[j].To == s.To {
				bad(key, "step %s->%s is listed twice", s.From, s.To)
			}
		}
		if s.Horizon == 0 {
			s.Horizon = Duration(time.Hour)
			if len(stages) > 0 && s.To == stages[len(stages)-1] {
				s.Horizon = Duration(30 * day)
			}
		}
		if s.AlertWindow == 0 {
			s.AlertWindow = Duration(time.Hour)
			if D(s.Horizon) >= day {
				s.AlertWindow = Duration(week)
			}
		}
		if s.Horizon < 0 {
			bad(key+".horizon", "must be positive")
		}
		c.checkBuckets(bad, key+".alert_window", s.AlertWindow)
	}

	dims := c.Segments.Dimensions
	if len(dims) > 16 {
		bad("segments.dimensions", "at most 16 dimensions are supported")
	}
	for i, d := range dims {
		key := fmt.Sprintf("segments.dimensions[%d]", i)
		switch {
		case !labelNameRE.MatchString(d) || strings.HasPrefix(d, "__"):
			bad(key, "%q is not a valid Prometheus label name", d)
		case slices.Contains(reservedLabels, d):
			bad(key, "%q clashes with a label funnelwatch or Prometheus sets", d)
		case slices.Index(dims, d) != i:
			bad(key, "%q is listed twice", d)
		}
	}
	if c.Segments.Breakdowns == nil {
		c.Segments.Breakdowns = [][]string{{}}
		for _, d := range dims {
			c.Segments.Breakdowns = append(c.Segments.Breakdowns, []string{d})
		}
		if len(dims) > 1 {
			c.Segments.Breakdowns = append(c.Segments.Breakdowns, slices.Clone(dims))
		}
	}
	if len(c.Segments.Breakdowns) == 0 {
		bad("segments.breakdowns", "at least one breakdown is required ([] is the overall one)")
	}
	if len(c.Segments.Breakdowns) > 64 {
		bad("segments.breakdowns", "at most 64 breakdowns are supported")
	}
	seenBreakdown := map[string]bool{}
	for i, b := range c.Segments.Breakdowns {
		key := fmt.Sprintf("segments.breakdowns[%d]", i)
		for _, d := range b {
			if !slices.Contains(dims, d) {
				bad(key, "%q is not in segments.dimensions", d)
			}
		}
		name := BreakdownName(b)
		if seenBreakdown[name] {
			bad(key, "breakdown %s is listed twice", name)
		}
		seenBreakdown[name] = true
	}
	if c.Segments.MaxValues < 1 {
		bad("segments.max_values", "must be at least 1")
	}

	t := &c.Time
	if t.Bucket <= 0 {
		bad("time.bucket", "must be positive")
	} else if week%D(t.Bucket) != 0 {
		bad("time.bucket", "%s does not divide a week (baselines shift by whole weeks)", t.Bucket)
	}
	if len(c.Windows) == 0 {
		bad("windows", "at least one window is required")
	}
	for i, w := range c.Windows {
		c.checkBuckets(bad, fmt.Sprintf("windows[%d]", i), w)
		if slices.Index(c.Windows, w) != i {
			bad(fmt.Sprintf("windows[%d]", i), "%s is listed twice", w)
		}
	}
	switch t.Clock {
	case ClockWall, ClockEvent:
	default:
		bad("time.clock", "%q is not %q or %q", t.Clock, ClockWall, ClockEvent)
	}
	if t.Grace < 0 {
		bad("time.grace", "must not be negative")
	}
	if t.MaxFuture < 0 {
		bad("time.max_future", "must not be negative")
	}
	if t.MaxFuture == 0 {
		t.MaxFuture = Duration(time.Hour)
		if t.Clock == ClockEvent {
			t.MaxFuture = Duration(day)
		}
	}
	if t.EntityTTL <= 0 {
		bad("time.entity_ttl", "must be positive")
	}

	a := c.Alerts
	if a.BaselineWeeks < 1 || a.BaselineWeeks > 52 {
		bad("alerts.baseline_weeks", "must be between 1 and 52")
	}
	if a.MinEntered < 1 {
		bad("alerts.min_entered", "must be at least 1")
	}
	if a.MinExpected < 0 {
		bad("alerts.min_expected", "must not be negative")
	}
	if a.ZOn <= 0 {
		bad("alerts.z_on", "must be positive")
	}
	if a.ZOff < 0 || a.ZOff > a.ZOn {
		bad("alerts.z_off", "must be between 0 and z_on")
	}
	if a.MinDrop < 0 || a.MinDrop >= 1 {
		bad("alerts.min_drop", "must be in [0, 1)")
	}

	if min := c.minRetention(); t.Retention == 0 {
		t.Retention = Duration(min)
	} else if D(t.Retention) < min {
		bad("time.retention", "%s is shorter than the %s the windows, horizons and baselines need", t.Retention, Duration(min))
	}

	if c.Store.Dir == "" {
		bad("store.dir", "must not be empty")
	}
	if c.Store.EntityCache < 1000 {
		bad("store.entity_cache", "must be at least 1000")
	}
	if c.FlushInterval < Duration(10*time.Millisecond) {
		bad("flush_interval", "must be at least 10ms")
	}
	if c.Web.ListenAddress == "" {
		bad("web.listen_address", "must not be empty")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "logfmt", "text":
	default:
		bad("log.format", "%q is not json, logfmt or text", c.Log.Format)
	}
	errs = append(errs, c.ScaleOut.validate(c)...)
	return errors.Join(errs...)
}

func (c *Config) checkBuckets(bad func(string, string, ...any), key string, d Duration) {
	if d <= 0 {
		bad(key, "must be positive")
		return
	}
	if c.Time.Bucket > 0 && d%c.Time.Bucket != 0 {
		bad(key, "%s is not a multiple of time.bucket %s", d, c.Time.Bucket)
	}
}

// minRetention is how far back buckets must be kept for every window, cohort
// and baseline: the baseline weeks, plus the longest horizon and grace (the
// newest mature cohort bucket is that far behind now), plus the longest
// window.
func (c *Config) minRetention() time.Duration {
	var horizon, window time.Duration
	for _, s := range c.Funnel.Steps {
		horizon = max(horizon, D(s.Horizon))
		window = max(window, D(s.AlertWindow))
	}
	for _, w := range c.Windows {
		window = max(window, D(w))
	}
	return time.Duration(max(c.Alerts.BaselineWeeks, 0))*week + horizon + D(c.Time.Grace) + window + D(c.Time.Bucket)
}

// BreakdownName is the value of the breakdown label of a breakdown: its
// dimensions joined by "+", or "all" for the overall breakdown.
func BreakdownName(dims []string) string {
	if len(dims) == 0 {
		return "all"
	}
	return strings.Join(dims, "+")
}
