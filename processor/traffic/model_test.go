package traffic_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/funnelwatch/funnelwatch/processor/traffic"
)

// monday is a Monday 00:00 UTC, so that weeks in the tests line up.
var monday = time.Date(2026, 11, 2, 0, 0, 0, 0, time.UTC)

// canonical is the canonical event of SPEC §2.1; decoding rejects any other
// field.
type canonical struct {
	ID      *string           `json:"id"`
	Type    string            `json:"type"`
	Entity  string            `json:"entity"`
	Time    *string           `json:"time"`
	Segment map[string]string `json:"segment"`
	Value   *float64          `json:"value"`
}

func decode(v []byte) (canonical, error) {
	var c canonical
	d := json.NewDecoder(bytes.NewReader(v))
	d.DisallowUnknownFields()
	err := d.Decode(&c)
	return c, err
}

// record is a Record that outlives the emit call.
type record struct {
	key, value string
	time       time.Time
}

func newModel(t testing.TB, cfg traffic.Config) *traffic.Model {
	t.Helper()
	m, err := traffic.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func collect(t testing.TB, m *traffic.Model, until time.Time) []record {
	t.Helper()
	var out []record
	err := m.Generate(until, func(r traffic.Record) error {
		out = append(out, record{string(r.Key), string(r.Value), r.Time})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestConfigValidate(t *testing.T) {
	ok := traffic.DefaultConfig(monday)
	tests := []struct {
		name string
		edit func(c *traffic.Config)
		want []string // substrings of the error; none: valid
	}{
		{"default", func(*traffic.Config) {}, nil},
		{"default drop", func(c *traffic.Config) { c.Drop = traffic.DefaultDrop(monday) }, nil},
		{"campaign drop", func(c *traffic.Config) {
			c.Drop = &traffic.Drop{Segment: map[string]string{"campaign": "brand"}, Factor: 0}
		}, nil},
		{"zero scale means 1", func(c *traffic.Config) { c.Scale = 0 }, nil},
		{"no start", func(c *traffic.Config) { c.Start = time.Time{} }, []string{"start: required"}},
		{"everything wrong", func(c *traffic.Config) {
			c.Scale = -1
			c.DuplicateRatio = 2
			c.InvalidRatio = math.NaN()
			c.Drop = &traffic.Drop{Segment: map[string]string{"source": "tv", "colour": "red", "region": "na"}, Factor: -1}
		}, []string{
			"scale: -1", "duplicate ratio: 2", "invalid ratio: NaN",
			`drop.segment: unknown key "colour"`, `drop.segment: unknown source "tv"`, "drop.factor: -1",
		}},
		{"empty drop segment", func(c *traffic.Config) { c.Drop = &traffic.Drop{Factor: 0.5} }, []string{"drop.segment: empty"}},
		{"volume surge", func(c *traffic.Config) {
			c.Drop = &traffic.Drop{Segment: map[string]string{"region": "na"}, Factor: 2, Volume: true}
		}, []string{"drop.factor: 2 > 1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.edit(&c)
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v; want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil; want errors %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q; want it to contain %q", err, w)
				}
			}
			if _, nerr := traffic.New(c); nerr == nil {
				t.Errorf("New() accepted an invalid config")
			}
		})
	}
}

func TestParseSegment(t *testing.T) {
	tests := []struct {
		in      string
		want    map[string]string
		wantErr bool
	}{
		{"source=paid_search,region=na", map[string]string{"source": "paid_search", "region": "na"}, false},
		{" region = emea ", map[string]string{"region": "emea"}, false},
		{"", nil, true},
		{"source", nil, true},
		{"source=", nil, true},
		{"region=na,region=emea", nil, true},
	}
	for _, tt := range tests {
		got, err := traffic.ParseSegment(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseSegment(%q) error = %v; want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if len(got) != len(tt.want) {
			t.Errorf("ParseSegment(%q) = %v; want %v", tt.in, got, tt.want)
		}
		for k, v := range tt.want {
			if got[k] != v {
				t.Errorf("ParseSegment(%q)[%q] = %q; want %q", tt.in, k, got[k], v)
			}
		}
	}
}

// digest hashes the stream up to until, generated in steps of step.
func digest(t *testing.T, cfg traffic.Config, until time.Time, step time.Duration) (sum [32]byte, n int) {
	t.Helper()
	m := newModel(t, cfg)
	h := sha256.New()
	for pos := cfg.Start; pos.Before(until); {
		pos = pos.Add(step)
		if pos.After(until) {
			pos = until
		}
		err := m.Generate(pos, func(r traffic.Record) error {
			n++
			h.Write(r.Key)
			h.Write(r.Value)
			h.Write([]byte(r.Time.Format(time.RFC3339Nano)))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	copy(sum[:], h.Sum(nil))
	return sum, n
}

func TestDeterministic(t *testing.T) {
	cfg := traffic.DefaultConfig(monday.Add(1234567 * time.Millisecond))
	cfg.InvalidRatio = 0.01
	cfg.Drop = traffic.DefaultDrop(monday.Add(3 * time.Hour))
	until := cfg.Start.Add(6 * time.Hour)

	want, n := digest(t, cfg, until, 6*time.Hour)
	if n < 10000 {
		t.Fatalf("6h gave %d records; want more than 10000", n)
	}
	for _, step := range []time.Duration{time.Hour, 1234 * time.Millisecond, 7 * time.Minute} {
		if got, gotN := digest(t, cfg, until, step); got != want || gotN != n {
			t.Errorf("in steps of %v: %d records, digest %x; want %d records, digest %x (as in one call)", step, gotN, got[:8], n, want[:8])
		}
	}
	other := cfg
	other.Seed = 2
	if got, _ := digest(t, other, until, time.Hour); got == want {
		t.Errorf("seed 2 gave the same stream as seed 1")
	}
}

func TestRecordsAreCanonical(t *testing.T) {
	cfg := traffic.DefaultConfig(monday)
	cfg.Scale = 0.25
	cfg.DuplicateRatio = 0.02
	cfg.InvalidRatio = 0.01
	// Two days: deals come a day after their leads at the earliest.
	end := monday.Add(48 * time.Hour)
	recs := collect(t, newModel(t, cfg), end)

	paths := map[string]int{}
	seen := map[string]string{} // id → value
	var last time.Time
	for i, r := range recs {
		if r.time.Before(monday) || !r.time.Before(end) {
			t.Fatalf("record %d: time %v outside the generated range", i, r.time)
		}
		if r.time.UnixNano()%int64(time.Millisecond) != 0 {
			t.Fatalf("record %d: time %v is not whole milliseconds (Kafka timestamps are)", i, r.time)
		}
		if !json.Valid([]byte(r.value)) {
			paths["invalid malformed_json"]++
			continue
		}
		c, err := decode([]byte(r.value))
		if err != nil {
			t.Fatalf("record %d %s: %v", i, r.value, err)
		}
		switch {
		case c.Entity == "":
			paths["invalid missing_entity"]++
			continue
		case c.Type != "visit" && c.Type != "lead" && c.Type != "deal":
			paths["invalid unknown_type"]++
			continue
		}
		if c.Entity != r.key {
			t.Fatalf("record %d: key %q; want the entity %q", i, r.key, c.Entity)
		}
		if c.ID != nil {
			if prev, ok := seen[*c.ID]; ok {
				if prev != r.value {
					t.Fatalf("record %d: id %s reused by a different record:\n%s\n%s", i, *c.ID, prev, r.value)
				}
				paths["duplicate"]++
				if r.time.Before(last.Add(-traffic.MaxDuplicateDelay)) {
					t.Errorf("record %d: duplicate of %v arrives after %v; want at most %v later", i, r.time, last, traffic.MaxDuplicateDelay)
				}
				continue
			}
			seen[*c.ID] = r.value
			paths["with id"]++
		} else {
			paths["without id"]++
		}
		if r.time.Before(last) {
			t.Fatalf("record %d: time %v before the previous record's %v", i, r.time, last)
		}
		last = r.time
		if c.Time != nil {
			paths["with time"]++
			tt, err := time.Parse(time.RFC3339Nano, *c.Time)
			if err != nil {
				t.Fatalf("record %d: time %q: %v", i, *c.Time, err)
			}
			if !tt.Equal(r.time) {
				t.Fatalf("record %d: time %v; want the record timestamp %v", i, tt, r.time)
			}
		} else {
			paths["without time"]++
		}
		if c.Value != nil {
			paths["with value"]++
		} else {
			paths["without value"]++
		}
		_, src := c.Segment["source"]
		_, reg := c.Segment["region"]
		switch {
		case c.Segment == nil:
			paths["without segment"]++
		case src && reg:
			paths["with segment"]++
		default:
			paths["partial segment"]++
		}
		paths["type "+c.Type]++
		if c.Type == "deal" {
			if c.Segment != nil {
				t.Errorf("record %d: deal with segment %v; want none", i, c.Segment)
			}
			if c.Value == nil || *c.Value < 100 {
				t.Errorf("record %d: deal value %v; want ≥ 100", i, c.Value)
			}
		}
	}
	for _, p := range []string{
		"with id", "without id", "with time", "without time", "with value", "without value",
		"with segment", "without segment", "partial segment", "duplicate",
		"type visit", "type lead", "type deal",
		"invalid malformed_json", "invalid missing_entity", "invalid unknown_type",
	} {
		if paths[p] == 0 {
			t.Errorf("no record %s in two days; want some (counts: %v)", p, paths)
		}
	}
	// Duplicates are drawn per record with an id, invalid records per record.
	valid := float64(paths["with id"] + paths["without id"])
	if got := float64(paths["duplicate"]) / float64(paths["with id"]); math.Abs(got-0.02) > 0.004 {
		t.Errorf("duplicate share of records with id = %.4f; want 0.02", got)
	}
	invalid := float64(paths["invalid malformed_json"] + paths["invalid missing_entity"] + paths["invalid unknown_type"])
	if got := invalid / valid; math.Abs(got-0.01) > 0.003 {
		t.Errorf("invalid records per valid record = %.4f; want 0.01", got)
	}
}

func TestDuplicatesAndInvalidChangeNothingElse(t *testing.T) {
	clean := traffic.DefaultConfig(monday)
	clean.DuplicateRatio = 0
	noisy := clean
	noisy.DuplicateRatio = 0.05
	noisy.InvalidRatio = 0.05
	until := monday.Add(3 * time.Hour)
	a := collect(t, newModel(t, clean), until)
	b := collect(t, newModel(t, noisy), until)
	// Without duplicates and invalid records, the noisy stream is the
	// clean one.
	seen := map[string]bool{}
	var filtered []record
	for _, r := range b {
		c, err := decode([]byte(r.value))
		if err != nil || c.Entity == "" || c.Type == "pageview" || (c.ID != nil && seen[*c.ID]) {
			continue
		}
		if c.ID != nil {
			seen[*c.ID] = true
		}
		filtered = append(filtered, r)
	}
	if len(filtered) != len(a) {
		t.Fatalf("noisy stream has %d valid first deliveries; want the clean stream's %d", len(filtered), len(a))
	}
	for i := range a {
		if a[i] != filtered[i] {
			t.Fatalf("record %d: noisy %+v; want clean %+v", i, filtered[i], a[i])
		}
	}
}

// lifecycle is what one visitor did.
type lifecycle struct {
	first   time.Time
	segment map[string]string
	visits  []time.Time
	leads   []time.Time
	deals   []time.Time
}

// lifecycles generates [Start, until) and returns the lifecycles of the
// visitors first touching before cohortEnd, each record once.
func lifecycles(t *testing.T, cfg traffic.Config, cohortEnd, until time.Time) map[string]*lifecycle {
	t.Helper()
	out := map[string]*lifecycle{}
	ids := map[string]bool{}
	err := newModel(t, cfg).Generate(until, func(r traffic.Record) error {
		l := out[string(r.Key)]
		if l == nil && !r.Time.Before(cohortEnd) {
			return nil
		}
		c, err := decode(r.Value)
		if err != nil {
			return err
		}
		if c.ID != nil {
			if ids[*c.ID] {
				return nil // a duplicate delivery
			}
			ids[*c.ID] = true
		}
		if l == nil {
			if c.Type != "visit" {
				return errors.New("first record of " + c.Entity + " is a " + c.Type)
			}
			l = &lifecycle{first: r.Time, segment: c.Segment}
			out[c.Entity] = l
			return nil
		}
		switch c.Type {
		case "visit":
			l.visits = append(l.visits, r.Time)
		case "lead":
			l.leads = append(l.leads, r.Time)
		case "deal":
			if c.Segment != nil {
				return errors.New("deal with a segment: " + string(r.Value))
			}
			l.deals = append(l.deals, r.Time)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestLifecycleDelays(t *testing.T) {
	cfg := traffic.DefaultConfig(monday)
	cfg.Scale = 0.1
	// Visitors of the first two days, followed until their last possible
	// deal.
	ls := lifecycles(t, cfg, monday.Add(48*time.Hour), monday.Add(48*time.Hour+traffic.MaxLateLeadDelay+traffic.MaxDealDelay))
	if len(ls) < 15000 {
		t.Fatalf("%d visitors in two days; want more than 15000", len(ls))
	}
	var quick, leads, deals, repeaters, partial int
	for e, l := range ls {
		if len(l.visits) > 0 {
			repeaters++
		}
		if _, ok := l.segment["region"]; !ok {
			partial++
		}
		for _, v := range l.visits {
			if d := v.Sub(l.first); d < traffic.MinRepeatDelay || d > traffic.MaxRepeatDelay {
				t.Errorf("%s: return visit %v after the first; want [%v, %v]", e, d, traffic.MinRepeatDelay, traffic.MaxRepeatDelay)
			}
		}
		if len(l.leads) > 1 || len(l.deals) > 1 || len(l.deals) > len(l.leads) {
			t.Fatalf("%s: %d leads, %d deals; want at most one lead and one deal after it", e, len(l.leads), len(l.deals))
		}
		if len(l.leads) == 0 {
			continue
		}
		leads++
		switch d := l.leads[0].Sub(l.first); {
		case d >= traffic.MinQuickLeadDelay && d <= traffic.MaxQuickLeadDelay:
			quick++
		case d >= traffic.MinLateLeadDelay && d <= traffic.MaxLateLeadDelay:
		default:
			t.Errorf("%s: lead %v after the first visit; want [%v, %v] or [%v, %v]", e, d,
				traffic.MinQuickLeadDelay, traffic.MaxQuickLeadDelay, traffic.MinLateLeadDelay, traffic.MaxLateLeadDelay)
		}
		if len(l.deals) == 0 {
			continue
		}
		deals++
		if d := l.deals[0].Sub(l.leads[0]); d < traffic.MinDealDelay || d > traffic.MaxDealDelay {
			t.Errorf("%s: deal %v after the lead; want [%v, %v]", e, d, traffic.MinDealDelay, traffic.MaxDealDelay)
		}
	}
	if got := float64(quick) / float64(leads); math.Abs(got-0.9) > 0.03 {
		t.Errorf("%d of %d leads within the hour (%.3f); want 0.9", quick, leads, got)
	}
	if got := float64(repeaters) / float64(len(ls)); got < 0.2 || got > 0.4 {
		t.Errorf("%.3f of visitors come back; want 0.2–0.4", got)
	}
	if got := float64(partial) / float64(len(ls)); got < 0.005 || got > 0.015 {
		t.Errorf("%.4f of first visits lack the region; want 0.01", got)
	}
	if deals == 0 || leads == 0 {
		t.Fatalf("%d leads, %d deals; want some", leads, deals)
	}
	t.Logf("%d visitors, %d leads (%d quick), %d deals", len(ls), leads, quick, deals)
}

func TestVolumeMatchesRatesAndSeasonality(t *testing.T) {
	cfg := traffic.DefaultConfig(monday)
	cfg.Scale = 0.15
	week := 7 * 24 * time.Hour
	type seg struct{ source, region string }
	got := map[seg]float64{}
	var night, day float64 // na first visits, weekdays, local 01–04 and 12–16
	var weekend, weekdays float64
	na := 5 * time.Hour
	seen := map[string]bool{}
	err := newModel(t, cfg).Generate(monday.Add(week), func(r traffic.Record) error {
		if seen[string(r.Key)] {
			return nil
		}
		seen[string(r.Key)] = true
		c, err := decode(r.Value)
		if err != nil {
			return err
		}
		got[seg{c.Segment["source"], c.Segment["region"]}]++
		if c.Segment["region"] != "na" {
			return nil
		}
		local := r.Time.Add(-na)
		switch wd := local.Weekday(); {
		case wd == time.Saturday || wd == time.Sunday:
			weekend++
		default:
			weekdays++
			if h := local.Hour(); h >= 1 && h < 4 {
				night++
			} else if h >= 12 && h < 16 {
				day++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Expected first visits: the rates integrated in steps of 5 minutes.
	want := map[seg]float64{}
	var wantNight, wantDay float64
	const step = 5 * time.Minute
	for m := monday; m.Before(monday.Add(week)); m = m.Add(step) {
		for _, r := range cfg.Rates(m.Add(step / 2)) {
			want[seg{r.Source, r.Region}] += r.VisitorsPerHour * step.Hours()
		}
		local := m.Add(-na)
		if wd := local.Weekday(); wd != time.Saturday && wd != time.Sunday {
			if h := local.Hour(); h >= 1 && h < 4 {
				wantNight += traffic.Seasonality("na", m)
			} else if h >= 12 && h < 16 {
				wantDay += traffic.Seasonality("na", m)
			}
		}
	}
	for s, w := range want {
		// 1% of first visits carry no region.
		w *= 0.99
		g := got[s]
		if sd := math.Sqrt(w); math.Abs(g-w) > 4*sd+0.01*w {
			t.Errorf("%s/%s: %v first visits in a week; want %.0f ± %.0f", s.source, s.region, g, w, 4*sd)
		}
	}
	if ratio, wantRatio := night/day, wantNight/wantDay; math.Abs(ratio-wantRatio) > 0.05 || ratio > 0.5 {
		t.Errorf("na night/day visitors = %.3f; want %.3f (a night trough)", ratio, wantRatio)
	}
	// Per day: 2 weekend days against 5 weekdays, weekends 0.7 of weekdays
	// (the offset of na moves a few weekday hours into the UTC week's end,
	// hence the tolerance).
	if ratio := (weekend / 2) / (weekdays / 5); math.Abs(ratio-0.7) > 0.06 {
		t.Errorf("na weekend/weekday visitors per day = %.3f; want 0.7", ratio)
	}
}

func TestExpectedRates(t *testing.T) {
	cfg := traffic.DefaultConfig(monday)
	drop := traffic.DefaultDrop(monday)
	segs := traffic.Segments()
	if len(segs) != 24 {
		t.Fatalf("%d segments; want 6 sources × 4 regions", len(segs))
	}
	minMean, maxMean := math.Inf(1), 0.0
	for _, s := range segs {
		minMean, maxMean = min(minMean, s.VisitorsPerHour), max(maxMean, s.VisitorsPerHour)
	}
	if maxMean/minMean < 10 {
		t.Errorf("segment sizes span %.1f×; want an order of magnitude at least", maxMean/minMean)
	}
	// Over a week, hour by hour: the demo's drop segment is big enough
	// for the alert gates (min_entered 30, min_expected 10 on the 1h
	// cohort) at every hour, the smallest segment stays far below them.
	targetMin, smallMax := math.Inf(1), 0.0
	var smallest string
	for h := range 7 * 24 {
		for _, r := range cfg.Rates(monday.Add(time.Duration(h) * time.Hour)) {
			expected := r.VisitorsPerHour * r.LeadWithinHour
			if r.Source == drop.Segment["source"] && r.Region == drop.Segment["region"] {
				targetMin = min(targetMin, r.VisitorsPerHour)
				if expected < 30 {
					t.Errorf("hour %d: %s/%s expects %.1f leads within the hour; want ≥ 30", h, r.Source, r.Region, expected)
				}
			}
			if r.Source == "referral" && r.Region == "latam" {
				smallMax = max(smallMax, expected)
				smallest = r.Source + "/" + r.Region
			}
		}
	}
	if targetMin < 300 {
		t.Errorf("drop segment: %.0f visitors an hour at the quietest hour; want ≥ 300", targetMin)
	}
	if smallMax >= 2 {
		t.Errorf("%s: %.2f expected leads within the hour at the busiest hour; want < 2", smallest, smallMax)
	}
	// A drop from its instant on, on its segment only.
	cfg.Drop = traffic.DefaultDrop(monday.Add(time.Hour))
	before, after := cfg.Rates(monday), cfg.Rates(monday.Add(time.Hour))
	for i := range before {
		b, a := before[i], after[i]
		want := b.LeadProbability
		if a.Source == "paid_search" && a.Region == "na" {
			want *= traffic.DefaultDropFactor
		}
		if math.Abs(a.LeadProbability-want) > 1e-12 || math.Abs(a.LeadWithinHour-0.9*want) > 1e-12 {
			t.Errorf("%s/%s after the drop: lead %v, within the hour %v; want %v, %v", a.Source, a.Region, a.LeadProbability, a.LeadWithinHour, want, 0.9*want)
		}
	}
}

func TestDrop(t *testing.T) {
	for _, volume := range []bool{false, true} {
		name := "conversion"
		if volume {
			name = "volume"
		}
		t.Run(name, func(t *testing.T) {
			at := monday.Add(18 * time.Hour)
			base := traffic.DefaultConfig(monday)
			base.Scale = 0.5
			dropped := base
			dropped.Drop = traffic.DefaultDrop(at)
			dropped.Drop.Volume = volume
			until := monday.Add(36 * time.Hour)
			a := collect(t, newModel(t, base), until)
			b := collect(t, newModel(t, dropped), until)

			// The dropped stream is the base stream without records of
			// visitors the drop hits: the rest is byte for byte the same.
			hit := map[string]bool{} // entity → first touch in the target after at
			firstSeen := map[string]bool{}
			for _, r := range a {
				if firstSeen[r.key] {
					continue
				}
				firstSeen[r.key] = true
				// First visits without a region (1%) may be hit too.
				if c := classify(r.value); !r.time.Before(at) && (c == target || c == ambiguous) {
					hit[r.key] = true
				}
			}
			j := 0
			for _, r := range a {
				if j < len(b) && b[j] == r {
					j++
					continue
				}
				if !hit[r.key] {
					t.Fatalf("record %s missing from the dropped stream; its visitor is not hit by the drop", r.value)
				}
				if !volume && strings.Contains(r.value, `"type":"visit"`) {
					t.Fatalf("visit %s missing: a conversion drop keeps visits", r.value)
				}
			}
			if j != len(b) {
				t.Fatalf("dropped stream has %d records not in the base stream", len(b)-j)
			}

			// The generated visit→lead ratio within the hour falls by the
			// factor in the target only.
			type key struct {
				class int
				after bool
			}
			measure := func(recs []record) map[key][2]float64 {
				first := map[string]time.Time{}
				cls := map[string]key{}
				led := map[string]bool{}
				out := map[key][2]float64{}
				for _, r := range recs {
					t0, ok := first[r.key]
					if !ok {
						first[r.key] = r.time
						k := key{class: classify(r.value), after: !r.time.Before(at)}
						cls[r.key] = k
						if r.time.Before(until.Add(-time.Hour)) {
							v := out[k]
							v[0]++
							out[k] = v
						}
						continue
					}
					if strings.Contains(r.value, `"type":"lead"`) && !led[r.key] && r.time.Sub(t0) <= time.Hour && t0.Before(until.Add(-time.Hour)) {
						led[r.key] = true
						v := out[cls[r.key]]
						v[1]++
						out[cls[r.key]] = v
					}
				}
				return out
			}
			ma, mb := measure(a), measure(b)
			for k, va := range ma {
				vb := mb[k]
				ra, rb := va[1]/va[0], vb[1]/vb[0]
				switch {
				case k.class == ambiguous:
				case k.class == target && k.after && !volume:
					if want := ra * traffic.DefaultDropFactor; math.Abs(rb-want) > 0.35*want {
						t.Errorf("target after the drop: visit→lead %.4f (%v/%v); want about %.4f", rb, vb[1], vb[0], want)
					}
				case k.class == target && k.after && volume:
					if want := va[0] * traffic.DefaultDropFactor; math.Abs(vb[0]-want) > 0.1*want {
						t.Errorf("target after the volume drop: %v visitors; want about %.0f", vb[0], want)
					}
					if math.Abs(rb-ra) > 0.2*ra {
						t.Errorf("target after the volume drop: visit→lead %.4f; want about %.4f as before", rb, ra)
					}
				default:
					if va != vb {
						t.Errorf("%+v: %v visitors, %v leads within the hour; want %v, %v as without the drop", k, vb[0], vb[1], va[0], va[1])
					}
				}
			}
			if ra := ma[key{target, false}]; ra[0] < 3000 || math.Abs(ra[1]/ra[0]-0.108) > 0.015 {
				t.Errorf("target before the drop: %v visitors, visit→lead %.4f; want > 3000, about 0.108", ra[0], ra[1]/ra[0])
			}
		})
	}
}

// Classes of a first visit for TestDrop.
const (
	other = iota
	target
	ambiguous // paid_search without a region
)

func classify(firstVisit string) int {
	if !strings.Contains(firstVisit, `"source":"paid_search"`) {
		return other
	}
	switch {
	case strings.Contains(firstVisit, `"region":"na"`):
		return target
	case !strings.Contains(firstVisit, `"region"`):
		return ambiguous
	}
	return other
}

func TestPendingIsBounded(t *testing.T) {
	cfg := traffic.DefaultConfig(monday)
	cfg.Scale = 0.25
	m := newModel(t, cfg)
	var pending []int
	var emitted int
	for _, days := range []int{7, 14, 21, 28, 35} {
		if err := m.Generate(monday.Add(time.Duration(days)*24*time.Hour), func(traffic.Record) error { emitted++; return nil }); err != nil {
			t.Fatal(err)
		}
		pending = append(pending, m.Pending())
	}
	// The longest lifecycle is about 28 days: from then on the queue is
	// as long every week (same weekday, same hour).
	if d := math.Abs(float64(pending[4]-pending[3])) / float64(pending[3]); d > 0.05 {
		t.Errorf("pending after 4 and 5 weeks: %d, %d; want the same within 5%%", pending[3], pending[4])
	}
	if bound := 40000; pending[4] > bound {
		t.Errorf("pending after 5 weeks: %d; want at most %d at scale 0.25", pending[4], bound)
	}
	t.Logf("pending by week %v after %d records", pending, emitted)
}

func TestGenerateStopsOnEmitError(t *testing.T) {
	m := newModel(t, traffic.DefaultConfig(monday))
	stop := errors.New("stop")
	var got []record
	emit := func(r traffic.Record) error {
		got = append(got, record{string(r.Key), string(r.Value), r.Time})
		if len(got)%100 == 0 {
			return stop
		}
		return nil
	}
	until := monday.Add(time.Hour)
	for {
		err := m.Generate(until, emit)
		if err == nil {
			break
		}
		if !errors.Is(err, stop) {
			t.Fatal(err)
		}
	}
	want := collect(t, newModel(t, traffic.DefaultConfig(monday)), until)
	if len(got) != len(want) {
		t.Fatalf("resuming after emit errors gave %d records; want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("record %d: %+v; want %+v", i, got[i], want[i])
		}
	}
	if !m.Position().Equal(until) {
		t.Errorf("Position() = %v; want %v", m.Position(), until)
	}
}

func BenchmarkGenerate(b *testing.B) {
	m := newModel(b, traffic.DefaultConfig(monday))
	// Warm up: a month of history, so that the queues are full.
	pos := monday.Add(28 * 24 * time.Hour)
	if err := m.Generate(pos, func(traffic.Record) error { return nil }); err != nil {
		b.Fatal(err)
	}
	var n, bytes int
	emit := func(r traffic.Record) error {
		n++
		bytes += len(r.Key) + len(r.Value)
		return nil
	}
	b.ReportAllocs()
	for b.Loop() {
		pos = pos.Add(time.Hour)
		if err := m.Generate(pos, emit); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(bytes)/float64(n), "B/event")
}
