package processor

import (
	"slices"
	"time"
)

// layout is everything derived from the config that the hot path and the
// exposition index by: the positions of counters in a bucket vector and the
// bucket ranges whose sums every segment keeps.
//
// A bucket vector holds, for S stages and T steps:
//
//	[0, S)        events per stage
//	[S, 2S)       entities reaching each stage
//	[2S, 3S)      sum of values per stage, in thousandths
//	[3S, 3S+2T)   per step: entered, converted (credited to the entry bucket)
type layout struct {
	stages  int
	steps   []stepLayout
	bucket  int64 // ms
	week    int64 // buckets
	vecLen  int
	ranges  []rangeSpec
	flow    map[time.Duration]int // window -> range
	volume  volumeLayout
	windows []time.Duration // the configured windows, in order
	// firstStage is the stage volume detection watches.
	firstStage int
}

type stepLayout struct {
	from, to int
	horizon  int64 // ms
	alerting bool
	window   time.Duration // alert window
	cohort   map[time.Duration]int
	baseline []int // range per k = 1..K
	// hist is the step's index among histograms (every step has one).
	statusIdx int // index into a segment's degraded flags, -1 when not alerting
}

type volumeLayout struct {
	window   time.Duration
	current  int
	baseline []int
}

// rangeSpec is a range of buckets that moves with the clock: the width most
// recent buckets up to the bucket of now (flow windows), or up to the newest
// mature cohort bucket (lag = horizon + grace), shifted back by shift
// buckets (baselines).
type rangeSpec struct {
	cohort bool
	lag    int64 // ms
	width  int64 // buckets
	shift  int64 // buckets
}

func (r rangeSpec) bounds(now, bucket int64) (lo, hi int64) {
	if r.cohort {
		hi = floorDiv(now-r.lag, bucket) - 1
	} else {
		hi = floorDiv(now, bucket)
	}
	hi -= r.shift
	return hi - r.width + 1, hi
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}

func (l *layout) events(stage int) int   { return stage }
func (l *layout) entities(stage int) int { return l.stages + stage }
func (l *layout) value(stage int) int    { return 2*l.stages + stage }
func (l *layout) entered(step int) int   { return 3*l.stages + 2*step }
func (l *layout) converted(step int) int { return 3*l.stages + 2*step + 1 }

// colClass is the class of vector index i in the columns: indices of one
// class whose ranges are the same share a column group. The events and
// entities of a stage are counted together, but the stages' counts, the
// sums of values and the entered and converted of a step each have a
// class of their own, since most buckets hold only some of them.
func (l *layout) colClass(i int) int {
	if i < 2*l.stages {
		return i % l.stages
	}
	return i
}

func newLayout(cfg *Config) *layout {
	stages := cfg.Funnel.Stages
	l := &layout{
		stages:  len(stages),
		bucket:  D(cfg.Time.Bucket).Milliseconds(),
		vecLen:  3*len(stages) + 2*len(cfg.Funnel.Steps),
		flow:    map[time.Duration]int{},
		windows: make([]time.Duration, len(cfg.Windows)),
	}
	l.week = week.Milliseconds() / l.bucket
	index := map[rangeSpec]int{}
	add := func(r rangeSpec) int {
		if i, ok := index[r]; ok {
			return i
		}
		index[r] = len(l.ranges)
		l.ranges = append(l.ranges, r)
		return len(l.ranges) - 1
	}
	width := func(d time.Duration) int64 { return d.Milliseconds() / l.bucket }
	for i, w := range cfg.Windows {
		l.windows[i] = D(w)
		l.flow[D(w)] = add(rangeSpec{width: width(D(w))})
	}
	K := cfg.Alerts.BaselineWeeks
	grace := D(cfg.Time.Grace).Milliseconds()
	nAlerting := 0
	for _, s := range cfg.Funnel.Steps {
		sl := stepLayout{
			from:      slices.Index(stages, s.From),
			to:        slices.Index(stages, s.To),
			horizon:   D(s.Horizon).Milliseconds(),
			alerting:  s.Alerting(),
			window:    D(s.AlertWindow),
			cohort:    map[time.Duration]int{},
			statusIdx: -1,
		}
		lag := sl.horizon + grace
		for _, w := range cfg.Windows {
			sl.cohort[D(w)] = add(rangeSpec{cohort: true, lag: lag, width: width(D(w))})
		}
		if sl.alerting {
			sl.cohort[sl.window] = add(rangeSpec{cohort: true, lag: lag, width: width(sl.window)})
			for k := 1; k <= K; k++ {
				sl.baseline = append(sl.baseline, add(rangeSpec{cohort: true, lag: lag, width: width(sl.window), shift: int64(k) * l.week}))
			}
			sl.statusIdx = nAlerting
			nAlerting++
		}
		l.steps = append(l.steps, sl)
	}
	// Volume detection watches the first stage of the funnel over the
	// first step's alert window.
	l.firstStage = 0
	vw := D(cfg.Funnel.Steps[0].AlertWindow)
	l.volume = volumeLayout{window: vw, current: add(rangeSpec{width: width(vw)})}
	for k := 1; k <= K; k++ {
		l.volume.baseline = append(l.volume.baseline, add(rangeSpec{width: width(vw), shift: int64(k) * l.week}))
	}
	return l
}

// alertingSteps is the number of steps with degradation detection on; a
// segment's status vector holds one flag per alerting step, then the
// volume flag.
func (l *layout) alertingSteps() int {
	n := 0
	for _, s := range l.steps {
		if s.alerting {
			n++
		}
	}
	return n
}
