package processor

import (
	"math"
	"sort"
	"time"

	"github.com/prometheus/common/model"
)

// Snapshot is every per-segment number at one moment, as served by
// /api/v1/segments and rendered by the page and the Collector. Counts are
// exact integers; a ratio is nil when its denominator is 0.
type Snapshot struct {
	// Clock is the processor clock (SPEC §3) the numbers are computed at.
	Clock    time.Time      `json:"clock"`
	Stages   []string       `json:"stages"`
	Windows  []string       `json:"windows"`
	Steps    []SnapshotStep `json:"steps"`
	Segments []SegmentView  `json:"segments"`
}

// SnapshotStep describes a configured step.
type SnapshotStep struct {
	From        string `json:"from"`
	To          string `json:"to"`
	Horizon     string `json:"horizon"`
	Alerting    bool   `json:"alerting"`
	AlertWindow string `json:"alert_window,omitempty"`
}

// Label is one dimension of a segment.
type Label struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// SegmentView holds the numbers of one segment of one breakdown.
type SegmentView struct {
	// ID identifies the segment in Trend.
	ID        string  `json:"id"`
	Breakdown string  `json:"breakdown"`
	Labels    []Label `json:"labels"`
	// Degraded is true when any alerting step or the volume is degraded.
	Degraded bool `json:"degraded"`
	// EventsTotal is the all-time number of events per stage.
	EventsTotal []int64      `json:"events_total"`
	Windows     []WindowView `json:"windows"`
	Cohorts     []CohortView `json:"cohorts"`
	Alerts      []AlertView  `json:"alerts"`
	Volume      VolumeView   `json:"volume"`
	Flows       []FlowView   `json:"flows"`
	worst       float64
}

// WindowView holds the flow-window counts of one window, per stage.
type WindowView struct {
	Window   string    `json:"window"`
	Events   []int64   `json:"events"`
	Entities []int64   `json:"entities"`
	Value    []float64 `json:"value"`
}

// FlowView is a point-in-time flow ratio of one step over one window.
type FlowView struct {
	From   string   `json:"from"`
	To     string   `json:"to"`
	Window string   `json:"window"`
	Ratio  *float64 `json:"ratio"`
}

// CohortView holds the cohort numbers of one step over one window of
// mature entry buckets.
type CohortView struct {
	From      string   `json:"from"`
	To        string   `json:"to"`
	Window    string   `json:"window"`
	Entered   int64    `json:"entered"`
	Converted int64    `json:"converted"`
	Ratio     *float64 `json:"ratio"`
}

// AlertView is the degradation evaluation of one alerting step.
type AlertView struct {
	From      string   `json:"from"`
	To        string   `json:"to"`
	Window    string   `json:"window"`
	Entered   int64    `json:"entered"`
	Converted int64    `json:"converted"`
	Ratio     *float64 `json:"ratio"`
	// Baseline fields are absent while there is less history than one
	// shifted window.
	BaselineWeeks     int      `json:"baseline_weeks"`
	BaselineEntered   *int64   `json:"baseline_entered,omitempty"`
	BaselineConverted *int64   `json:"baseline_converted,omitempty"`
	BaselineRatio     *float64 `json:"baseline_ratio,omitempty"`
	Z                 *float64 `json:"z,omitempty"`
	Degraded          bool     `json:"degraded"`
}

// VolumeView is the volume evaluation of the first stage.
type VolumeView struct {
	Step     string   `json:"step"`
	Window   string   `json:"window"`
	Entities int64    `json:"entities"`
	Baseline *float64 `json:"baseline,omitempty"`
	Z        *float64 `json:"z,omitempty"`
	Degraded bool     `json:"degraded"`
}

func ratio(num, den int64) *float64 {
	if den == 0 {
		return nil
	}
	r := float64(num) / float64(den)
	return &r
}

// WindowLabel is the canonical Prometheus form of a window (1h, 1d, 1w).
func WindowLabel(d time.Duration) string { return model.Duration(d).String() }

// Snapshot returns the current numbers of every segment: degraded segments
// first (worst z first), then by breakdown and labels.
func (p *Processor) Snapshot() *Snapshot {
	p.mu.Lock()
	clock := p.clockNow()
	p.mu.Unlock()
	// The segments' numbers change only at a flush, under sumsMu: a
	// snapshot does not hold up ApplyBatch.
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	l := p.layout
	cfg := &p.cfg
	snap := &Snapshot{Clock: time.UnixMilli(clock).UTC(), Stages: cfg.Funnel.Stages}
	for _, w := range l.windows {
		snap.Windows = append(snap.Windows, WindowLabel(w))
	}
	for _, s := range cfg.Funnel.Steps {
		st := SnapshotStep{From: s.From, To: s.To, Horizon: s.Horizon.String(), Alerting: s.Alerting()}
		if st.Alerting {
			st.AlertWindow = s.AlertWindow.String()
		}
		snap.Steps = append(snap.Steps, st)
	}
	stages := cfg.Funnel.Stages
	for _, s := range p.segmentList {
		if s.frozen {
			continue
		}
		v := SegmentView{Labels: []Label{}, ID: segmentID(string(s.key)), Breakdown: BreakdownName(cfg.Segments.Breakdowns[s.breakdown]), EventsTotal: append([]int64(nil), s.totals...), worst: math.Inf(1)}
		for i, d := range cfg.Segments.Breakdowns[s.breakdown] {
			v.Labels = append(v.Labels, Label{Name: d, Value: s.labels[i]})
		}
		for _, w := range l.windows {
			r := l.flow[w]
			wv := WindowView{Window: WindowLabel(w)}
			for st := range stages {
				wv.Events = append(wv.Events, s.sum(l, r, l.events(st)))
				wv.Entities = append(wv.Entities, s.sum(l, r, l.entities(st)))
				wv.Value = append(wv.Value, float64(s.sum(l, r, l.value(st)))/valueScale)
			}
			v.Windows = append(v.Windows, wv)
			for _, sl := range l.steps {
				v.Flows = append(v.Flows, FlowView{From: stages[sl.from], To: stages[sl.to], Window: wv.Window,
					Ratio: ratio(s.sum(l, r, l.entities(sl.to)), s.sum(l, r, l.entities(sl.from)))})
			}
		}
		for t, sl := range l.steps {
			for _, w := range l.windows {
				r := sl.cohort[w]
				n, x := s.sum(l, r, l.entered(t)), s.sum(l, r, l.converted(t))
				v.Cohorts = append(v.Cohorts, CohortView{From: stages[sl.from], To: stages[sl.to], Window: WindowLabel(w), Entered: n, Converted: x, Ratio: ratio(x, n)})
			}
			if !sl.alerting {
				continue
			}
			e := s.eval[t]
			a := AlertView{From: stages[sl.from], To: stages[sl.to], Window: WindowLabel(sl.window), Entered: e.n, Converted: e.x,
				Ratio: ratio(e.x, e.n), Degraded: s.status[sl.statusIdx]}
			if e.available {
				n0, x0 := e.n0, e.x0
				a.BaselineWeeks = e.weeksUsed
				a.BaselineEntered, a.BaselineConverted = &n0, &x0
				a.BaselineRatio = ratio(x0, n0)
			}
			if e.zOK {
				z := e.z
				a.Z = &z
				if a.Degraded {
					v.worst = min(v.worst, z)
				}
			}
			v.Degraded = v.Degraded || a.Degraded
			v.Alerts = append(v.Alerts, a)
		}
		vol := VolumeView{Step: stages[l.firstStage], Window: WindowLabel(l.volume.window), Entities: s.vol.n, Degraded: s.status[len(s.status)-1]}
		if s.vol.available {
			lambda := s.vol.lambda
			vol.Baseline = &lambda
		}
		if s.vol.zOK {
			z := s.vol.z
			vol.Z = &z
			if vol.Degraded {
				v.worst = min(v.worst, z)
			}
		}
		v.Degraded = v.Degraded || vol.Degraded
		v.Volume = vol
		snap.Segments = append(snap.Segments, v)
	}
	sort.SliceStable(snap.Segments, func(i, j int) bool {
		a, b := &snap.Segments[i], &snap.Segments[j]
		if a.Degraded != b.Degraded {
			return a.Degraded
		}
		if a.worst != b.worst {
			return a.worst < b.worst
		}
		if a.Breakdown != b.Breakdown {
			return len(a.Labels) < len(b.Labels) || (len(a.Labels) == len(b.Labels) && a.Breakdown < b.Breakdown)
		}
		for k := range a.Labels {
			if a.Labels[k].Value != b.Labels[k].Value {
				return a.Labels[k].Value < b.Labels[k].Value
			}
		}
		return false
	})
	return snap
}
