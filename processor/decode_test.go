package processor_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/funnelwatch/funnelwatch/processor"
)

// recordTime is the Kafka record timestamp the decoder tests pass.
var recordTime = time.Date(2026, 11, 2, 9, 0, 0, 0, time.UTC)

// mappedConfig maps a Segment-style producer onto the canonical event:
// every field by JSON pointer, one dimension through an RFC 6901 escape
// ("~1" is "/", "~0" is "~") and one through an array index.
const mappedConfig = `
events:
  fields: {id: /messageId, type: /event, entity: /userId, time: /timestamp, value: /properties/revenue, segment: /context/traits}
  dimension_fields: {source: /properties/utm~1source, region: /context/geo~0loc/0/region}
  type_names: {"Page Viewed": visit, "Lead Created": lead, "Deal Won": deal}
`

func newDecoder(t testing.TB, src string) *processor.Decoder {
	t.Helper()
	cfg, err := processor.ParseConfig([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return processor.NewDecoder(&cfg)
}

// absent marks a dimension that is not in the event (a nil value), as
// opposed to an empty string.
const absent = "\x00absent"

// decoded is what the tests compare of an Event.
type decoded struct {
	stage   int
	entity  string
	hasID   bool
	time    time.Time
	value   int64
	dims    []string
	invalid uint32
}

func summarize(ev *processor.Event) decoded {
	d := decoded{stage: ev.Stage, entity: string(ev.Entity), hasID: ev.HasID, time: time.UnixMilli(ev.Time).UTC(), value: ev.Value, invalid: ev.Invalid}
	for _, v := range ev.Dims {
		if v == nil {
			d.dims = append(d.dims, absent)
		} else {
			d.dims = append(d.dims, string(v))
		}
	}
	return d
}

func (d decoded) equal(o decoded) bool {
	if d.stage != o.stage || d.entity != o.entity || d.hasID != o.hasID || !d.time.Equal(o.time) ||
		d.value != o.value || d.invalid != o.invalid || len(d.dims) != len(o.dims) {
		return false
	}
	for i := range d.dims {
		if d.dims[i] != o.dims[i] {
			return false
		}
	}
	return true
}

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

// TestDecodeApplied checks the events the decoder accepts, in the canonical
// shape and mapped by the config.
func TestDecodeApplied(t *testing.T) {
	canonical := newDecoder(t, "")
	mapped := newDecoder(t, mappedConfig)
	const (
		visit = 0
		lead  = 1
		deal  = 2
	)
	t0 := at("2026-11-02T08:00:00Z")
	for _, tc := range []struct {
		name       string
		dec        *processor.Decoder
		topicStage int
		in         string
		want       decoded
	}{
		{
			name: "the canonical event of SPEC §2.1",
			dec:  canonical, topicStage: -1,
			in:   `{"id":"e-9f2c","type":"lead","entity":"contact-42","time":"2026-11-20T10:15:00.250Z","segment":{"source":"paid_search","campaign":"bf-2026","region":"emea"},"value":0}`,
			want: decoded{stage: lead, entity: "contact-42", hasID: true, time: at("2026-11-20T10:15:00.250Z"), dims: []string{"paid_search", "emea"}},
		},
		{
			name: "only the required fields: time from the record, no id, no value, dimensions absent",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1"}`,
			want: decoded{stage: visit, entity: "v1", time: recordTime, dims: []string{absent, absent}},
		},
		{
			name: "null time, id, value and dimensions are absent",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":null,"id":null,"value":null,"segment":{"source":null,"region":null}}`,
			want: decoded{stage: visit, entity: "v1", time: recordTime, dims: []string{absent, absent}},
		},
		{
			name: "a numeric entity and id are used as written",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"deal","entity":42,"id":7,"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "42", hasID: true, time: t0, dims: []string{absent, absent}},
		},
		{
			name: "a numeric entity keeps its spelling",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"deal","entity":1.5e3,"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "1.5e3", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "an empty or non-scalar id is no id",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","id":"","time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "an object id is no id",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","id":{"a":1},"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "a time with an offset and nanoseconds is kept to the millisecond",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T10:00:00.123456789+02:00"}`,
			want: decoded{stage: visit, entity: "v1", time: at("2026-11-02T08:00:00.123Z"), dims: []string{absent, absent}},
		},
		{
			name: "the last representable year",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"9999-12-31T23:59:59.999Z"}`,
			want: decoded{stage: visit, entity: "v1", time: at("9999-12-31T23:59:59.999Z"), dims: []string{absent, absent}},
		},
		{
			name: "one millisecond after the epoch",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"1970-01-01T00:00:00.001Z"}`,
			want: decoded{stage: visit, entity: "v1", time: time.UnixMilli(1).UTC(), dims: []string{absent, absent}},
		},
		{
			name: "values are kept in thousandths",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"deal","entity":"a1","value":1234.5678,"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "a1", time: t0, value: 1234568, dims: []string{absent, absent}},
		},
		{
			name: "negative values",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"deal","entity":"a1","value":-25,"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "a1", time: t0, value: -25000, dims: []string{absent, absent}},
		},
		{
			name: "the largest value",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"deal","entity":"a1","value":-1e12,"time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "a1", time: t0, value: -1e15, dims: []string{absent, absent}},
		},
		{
			name: "the topic's type wins over the record's",
			dec:  canonical, topicStage: deal,
			in:   `{"type":"visit","entity":"a1","time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "a1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "with a topic type the record needs none",
			dec:  canonical, topicStage: deal,
			in:   `{"entity":"a1","time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "a1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "with a topic type even an unknown record type is fine",
			dec:  canonical, topicStage: lead,
			in:   `{"type":"Form Submitted","entity":"a1","time":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: lead, entity: "a1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "scalar dimension values are used as written",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"source":12.50,"region":true}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{"12.50", "true"}},
		},
		{
			name: "an empty dimension value is present, not absent",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"source":""}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{"", absent}},
		},
		{
			name: "a segment that is not an object has no dimensions",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":"paid"}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "control characters and label injection are valid UTF-8, kept verbatim",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"source":"a\",b=\"c","region":"x\n\t\u0001\u0000}"}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{`a",b="c`, "x\n\t\x01\x00}"}},
		},
		{
			name: "a value of exactly 128 bytes is used",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"source":"` + strings.Repeat("é", 64) + `"}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{strings.Repeat("é", 64), absent}},
		},
		{
			name: "a value over 128 bytes is invalid",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"region":"` + strings.Repeat("x", 129) + `"}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{absent, strings.Repeat("x", 129)}, invalid: 1 << 1},
		},
		{
			name: "invalid UTF-8 is invalid",
			dec:  canonical, topicStage: -1,
			in:   "{\"type\":\"visit\",\"entity\":\"v1\",\"time\":\"2026-11-02T08:00:00Z\",\"segment\":{\"source\":\"a\xffb\"}}",
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{"a\xffb", absent}, invalid: 1 << 0},
		},
		{
			name: "object and array values are invalid",
			dec:  canonical, topicStage: -1,
			in:   `{"type":"visit","entity":"v1","time":"2026-11-02T08:00:00Z","segment":{"source":{"name":"x"},"region":["emea"]}}`,
			want: decoded{stage: visit, entity: "v1", time: t0, dims: []string{"", ""}, invalid: 1<<0 | 1<<1},
		},
		{
			name: "mapped: JSON pointers, escapes, array index, type names",
			dec:  mapped, topicStage: -1,
			in: `{"messageId":"m-1","event":"Lead Created","userId":"u-7","timestamp":"2026-11-02T08:00:00Z",
				"properties":{"revenue":9.99,"utm/source":"newsletter","utm":{"source":"wrong"}},
				"context":{"geo~loc":[{"region":"apac"}],"traits":{"source":"ignored"}}}`,
			want: decoded{stage: lead, entity: "u-7", hasID: true, time: t0, value: 9990, dims: []string{"newsletter", "apac"}},
		},
		{
			name: "mapped: the configured stage names still work",
			dec:  mapped, topicStage: -1,
			in:   `{"event":"deal","userId":"u-7","timestamp":"2026-11-02T08:00:00Z"}`,
			want: decoded{stage: deal, entity: "u-7", time: t0, dims: []string{absent, absent}},
		},
		{
			name: "mapped: the canonical fields are not looked at",
			dec:  mapped, topicStage: -1,
			in:   `{"event":"Page Viewed","userId":"u-7","entity":"e-1","time":"2020-01-01T00:00:00Z","value":5,"segment":{"source":"x"}}`,
			want: decoded{stage: visit, entity: "u-7", time: recordTime, dims: []string{absent, absent}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ev processor.Event
			if r := tc.dec.Decode([]byte(tc.in), tc.topicStage, recordTime, &ev); r != processor.Applied {
				t.Fatalf("Decode = %v; want applied", r)
			}
			if got := summarize(&ev); !got.equal(tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// TestDecodeIDs checks that the same event id hashes alike, whatever the
// record around it, and different ids differently.
func TestDecodeIDs(t *testing.T) {
	d := newDecoder(t, "")
	id := func(in string) uint64 {
		var ev processor.Event
		if r := d.Decode([]byte(in), -1, recordTime, &ev); r != processor.Applied || !ev.HasID {
			t.Fatalf("Decode(%s) = %v, has id %v; want applied with an id", in, r, ev.HasID)
		}
		return ev.ID
	}
	a := id(`{"id":"e-1","type":"visit","entity":"a"}`)
	if b := id(`{"entity":"b","type":"lead","id":"e-1","value":3}`); b != a {
		t.Errorf("id e-1 hashed to %x and %x; want the same", a, b)
	}
	if c := id(`{"id":"e-2","type":"visit","entity":"a"}`); c == a {
		t.Errorf("ids e-1 and e-2 both hashed to %x", a)
	}
}

// TestDecodeInvalid checks every invalid reason the decoder gives.
func TestDecodeInvalid(t *testing.T) {
	canonical := newDecoder(t, "")
	small := newDecoder(t, "events: {max_record_bytes: 100}")
	noSegment := `"type":"visit","time":"2026-11-02T08:00:00Z"`
	for _, tc := range []struct {
		name       string
		dec        *processor.Decoder
		in         string
		recordTime time.Time
		want       processor.Reason
	}{
		{"empty record", canonical, ``, recordTime, processor.ReasonMalformedJSON},
		{"not JSON", canonical, `visit a1`, recordTime, processor.ReasonMalformedJSON},
		{"truncated", canonical, `{"entity":"a1","type":"vis`, recordTime, processor.ReasonMalformedJSON},
		{"trailing garbage", canonical, `{"entity":"a1","type":"visit"} {}`, recordTime, processor.ReasonMalformedJSON},
		{"an array", canonical, `[{"entity":"a1","type":"visit"}]`, recordTime, processor.ReasonMalformedJSON},
		{"a string", canonical, `"visit"`, recordTime, processor.ReasonMalformedJSON},
		{"null", canonical, `null`, recordTime, processor.ReasonMalformedJSON},
		{"deep nesting", canonical, `{"entity":"a1","type":"visit","x":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`, recordTime, processor.ReasonMalformedJSON},
		{"single quotes", canonical, `{'entity':'a1','type':'visit'}`, recordTime, processor.ReasonMalformedJSON},
		{"too large", small, `{"entity":"a1",` + noSegment + `,"pad":"` + strings.Repeat("x", 100) + `"}`, recordTime, processor.ReasonTooLarge},
		{"too large even when malformed", small, strings.Repeat("{", 101), recordTime, processor.ReasonTooLarge},
		{"no entity", canonical, `{` + noSegment + `}`, recordTime, processor.ReasonMissingEntity},
		{"null entity", canonical, `{"entity":null,` + noSegment + `}`, recordTime, processor.ReasonMissingEntity},
		{"empty entity", canonical, `{"entity":"",` + noSegment + `}`, recordTime, processor.ReasonMissingEntity},
		{"object entity", canonical, `{"entity":{"id":1},` + noSegment + `}`, recordTime, processor.ReasonBadEntity},
		{"array entity", canonical, `{"entity":["a"],` + noSegment + `}`, recordTime, processor.ReasonBadEntity},
		{"boolean entity", canonical, `{"entity":true,` + noSegment + `}`, recordTime, processor.ReasonBadEntity},
		{"a 1 MB entity", canonical, `{"entity":"` + strings.Repeat("k", 1<<20) + `",` + noSegment + `}`, recordTime, processor.ReasonTooLarge},
		{"a 64 kB entity", canonical, `{"entity":"` + strings.Repeat("k", 65000) + `",` + noSegment + `}`, recordTime, processor.ReasonBadEntity},
		{"entity over 512 bytes", canonical, `{"entity":"` + strings.Repeat("e", 513) + `",` + noSegment + `}`, recordTime, processor.ReasonBadEntity},
		{"no type", canonical, `{"entity":"a1","time":"2026-11-02T08:00:00Z"}`, recordTime, processor.ReasonMissingType},
		{"null type", canonical, `{"entity":"a1","type":null}`, recordTime, processor.ReasonMissingType},
		{"not a stage", canonical, `{"entity":"a1","type":"purchase"}`, recordTime, processor.ReasonUnknownType},
		{"stages are case-sensitive", canonical, `{"entity":"a1","type":"Visit"}`, recordTime, processor.ReasonUnknownType},
		{"numeric type", canonical, `{"entity":"a1","type":1}`, recordTime, processor.ReasonUnknownType},
		{"empty type", canonical, `{"entity":"a1","type":""}`, recordTime, processor.ReasonUnknownType},
		{"not RFC 3339", canonical, `{"entity":"a1","type":"visit","time":"2026-11-02 08:00:00"}`, recordTime, processor.ReasonBadTime},
		{"a date", canonical, `{"entity":"a1","type":"visit","time":"2026-11-02"}`, recordTime, processor.ReasonBadTime},
		{"epoch milliseconds", canonical, `{"entity":"a1","type":"visit","time":1793606400000}`, recordTime, processor.ReasonBadTime},
		{"epoch milliseconds as a string", canonical, `{"entity":"a1","type":"visit","time":"1793606400000"}`, recordTime, processor.ReasonBadTime},
		{"the epoch", canonical, `{"entity":"a1","type":"visit","time":"1970-01-01T00:00:00Z"}`, recordTime, processor.ReasonBadTime},
		{"before the epoch", canonical, `{"entity":"a1","type":"visit","time":"1969-12-31T23:59:59Z"}`, recordTime, processor.ReasonBadTime},
		{"year 0001", canonical, `{"entity":"a1","type":"visit","time":"0001-01-01T00:00:00Z"}`, recordTime, processor.ReasonBadTime},
		{"year 10000", canonical, `{"entity":"a1","type":"visit","time":"10000-01-01T00:00:00Z"}`, recordTime, processor.ReasonBadTime},
		{"an impossible offset", canonical, `{"entity":"a1","type":"visit","time":"2026-11-02T08:00:00+25:00"}`, recordTime, processor.ReasonBadTime},
		{"an object time", canonical, `{"entity":"a1","type":"visit","time":{}}`, recordTime, processor.ReasonBadTime},
		{"no time and no record timestamp", canonical, `{"entity":"a1","type":"visit"}`, time.Time{}, processor.ReasonBadTime},
		{"no time and a record timestamp at the epoch", canonical, `{"entity":"a1","type":"visit"}`, time.Unix(0, 0), processor.ReasonBadTime},
		{"no time and a record timestamp before the epoch", canonical, `{"entity":"a1","type":"visit"}`, time.Unix(-1, 0), processor.ReasonBadTime},
		{"a string value", canonical, `{"entity":"a1","type":"deal","value":"12"}`, recordTime, processor.ReasonBadValue},
		{"a boolean value", canonical, `{"entity":"a1","type":"deal","value":true}`, recordTime, processor.ReasonBadValue},
		{"an object value", canonical, `{"entity":"a1","type":"deal","value":{"amount":1}}`, recordTime, processor.ReasonBadValue},
		{"NaN", canonical, `{"entity":"a1","type":"deal","value":NaN}`, recordTime, processor.ReasonBadValue},
		{"nan", canonical, `{"entity":"a1","type":"deal","value":nan}`, recordTime, processor.ReasonBadValue},
		{"infinity", canonical, `{"entity":"a1","type":"deal","value":inf}`, recordTime, processor.ReasonBadValue},
		{"negative infinity", canonical, `{"entity":"a1","type":"deal","value":-Inf}`, recordTime, processor.ReasonBadValue},
		{"overflowing float", canonical, `{"entity":"a1","type":"deal","value":1e400}`, recordTime, processor.ReasonBadValue},
		{"over 1e12", canonical, `{"entity":"a1","type":"deal","value":1000000000000.5}`, recordTime, processor.ReasonBadValue},
		{"huge negative", canonical, `{"entity":"a1","type":"deal","value":-9223372036854775808000}`, recordTime, processor.ReasonBadValue},
		{"huge integer", canonical, `{"entity":"a1","type":"deal","value":123456789012345678901234567890}`, recordTime, processor.ReasonBadValue},
		{"not a number", canonical, `{"entity":"a1","type":"deal","value":1.2.3}`, recordTime, processor.ReasonBadValue},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ev processor.Event
			got := tc.dec.Decode([]byte(tc.in), -1, tc.recordTime, &ev)
			if got != tc.want {
				t.Errorf("Decode(%.80q) = %v; want %v", tc.in, got, tc.want)
			}
			if !got.Invalid() {
				t.Errorf("%v.Invalid() = false; want true", got)
			}
		})
	}
}

// TestReasons checks the reason labels of funnel_events_invalid_total.
func TestReasons(t *testing.T) {
	var got []string
	for _, r := range processor.InvalidReasons() {
		got = append(got, r.String())
	}
	want := []string{"malformed_json", "too_large", "missing_entity", "bad_entity", "missing_type", "unknown_type", "bad_time", "future_time", "bad_value"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("InvalidReasons = %q; want %q", got, want)
	}
	for _, r := range []processor.Reason{processor.Applied, processor.Duplicate, processor.Late} {
		if r.Invalid() {
			t.Errorf("%v.Invalid() = true; want false", r)
		}
	}
	if got := processor.Reason(200).String(); got != "unknown" {
		t.Errorf("Reason(200).String() = %q; want unknown", got)
	}
}

// TestDecodeReuse checks that decoding into the same Event resets what the
// previous record set.
func TestDecodeReuse(t *testing.T) {
	d := newDecoder(t, "")
	var ev processor.Event
	first := `{"id":"x","type":"deal","entity":"a1","value":5,"time":"2026-11-02T08:00:00Z","segment":{"source":{},"region":"emea"}}`
	if r := d.Decode([]byte(first), -1, recordTime, &ev); r != processor.Applied {
		t.Fatalf("Decode(first) = %v", r)
	}
	if r := d.Decode([]byte(`{"type":"visit","entity":"b2"}`), -1, recordTime, &ev); r != processor.Applied {
		t.Fatalf("Decode(second) = %v", r)
	}
	want := decoded{stage: 0, entity: "b2", time: recordTime, dims: []string{absent, absent}}
	if got := summarize(&ev); !got.equal(want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

// TestReservedDimensionValues is a regression test: a producer's literal
// "unknown", "invalid" or "other" used to get a dictionary id of its own
// and so a second segment with the same labels as the reserved one, and the
// duplicate series failed every scrape of /metrics.
func TestReservedDimensionValues(t *testing.T) {
	cfg, err := processor.ParseConfig([]byte("kafka: {topics: [{name: events}]}\nsegments: {dimensions: [source], max_values: 1}\ntime: {clock: event}"))
	if err != nil {
		t.Fatal(err)
	}
	st := processor.MemStore(t)
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	b := &processor.Batch{Topic: "events"}
	d := processor.NewDecoder(&cfg)
	for i, source := range []string{`"unknown"`, `null`, `"invalid"`, `"\u00ff\u00ff` + strings.Repeat("x", 130) + `"`, `"paid"`, `"other"`, `"organic"`} {
		v := `{"type":"visit","entity":"e` + string(rune('a'+i)) + `","time":"2026-11-02T09:00:00Z","segment":{"source":` + source + `}}`
		b.Add(d, -1, &kafka.Message{Offset: int64(i), Value: []byte(v), Time: recordTime})
	}
	p.ApplyBatch(b)
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "funnel_window_entities" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["breakdown"] == "source" && l["step"] == "visit" && l["window"] == "1h" {
				got[l["source"]] = m.GetGauge().GetValue()
			}
		}
	}
	// max_values 1: "paid" takes the only slot, "organic" overflows.
	want := map[string]float64{"unknown": 2, "invalid": 2, "paid": 1, "other": 2}
	if len(got) != len(want) {
		t.Errorf("segments = %v; want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("entities of source=%q = %v; want %v (all: %v)", k, got[k], v, got)
		}
	}
}

// FuzzDecode checks that no record makes the decoder panic or produce an
// event that breaks the processor's invariants.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"id":"e-9f2c","type":"lead","entity":"contact-42","time":"2026-11-20T10:15:00.250Z","segment":{"source":"paid_search","region":"emea"},"value":0}`), false, int8(-1), recordTime.UnixMilli())
	f.Add([]byte(`{"messageId":"m-1","event":"Lead Created","userId":"u-7","properties":{"revenue":9.99,"utm/source":"x"},"context":{"geo~loc":[{"region":"apac"}]}}`), true, int8(-1), recordTime.UnixMilli())
	// Megabyte inputs are in TestDecodeInvalid rather than here: the
	// fuzzer spends minutes minimizing anything new it finds from them.
	f.Add([]byte(`{"type":"visit","entity":"a","segment":{"source":"`+strings.Repeat(`\ud800`, 1000)+`"}}`), false, int8(-1), int64(1))

	decoders := map[bool]*processor.Decoder{false: newDecoder(f, ""), true: newDecoder(f, mappedConfig)}
	f.Fuzz(func(t *testing.T, value []byte, mapped bool, topicStage int8, recordMs int64) {
		stage := -1
		if topicStage >= 0 {
			stage = int(topicStage) % 3
		}
		var ev processor.Event
		r := decoders[mapped].Decode(value, stage, time.UnixMilli(recordMs), &ev)
		if r != processor.Applied {
			if !r.Invalid() {
				t.Fatalf("Decode = %v; want applied or an invalid reason", r)
			}
			if r == processor.ReasonFutureTime {
				t.Fatalf("Decode = %v: the future is the processor's to judge", r)
			}
			return
		}
		if len(ev.Entity) == 0 || len(ev.Entity) > 512 {
			t.Errorf("entity of %d bytes", len(ev.Entity))
		}
		if ev.Time <= 0 {
			t.Errorf("time %d; want > 0", ev.Time)
		}
		if ev.Value > 1e15 || ev.Value < -1e15 {
			t.Errorf("value %d thousandths; want |value| <= 1e15", ev.Value)
		}
		if len(ev.Dims) != 2 {
			t.Errorf("%d dimensions; want 2", len(ev.Dims))
		}
		if ev.Stage < 0 || ev.Stage >= 3 {
			t.Errorf("stage %d; want one of the 3 stages", ev.Stage)
		}
		if stage >= 0 && ev.Stage != stage {
			t.Errorf("stage %d; want the topic's %d", ev.Stage, stage)
		}
		if ev.Invalid>>2 != 0 {
			t.Errorf("invalid bits %b beyond the 2 dimensions", ev.Invalid)
		}
		for i, v := range ev.Dims {
			if ev.Invalid&(1<<i) == 0 && v != nil && len(v) > 128 {
				t.Errorf("dimension %d: %d bytes not flagged invalid", i, len(v))
			}
		}
	})
}
