package processor

import (
	"errors"
	"fmt"
	"slices"

	"github.com/funnelwatch/funnelwatch/store"
)

// On the event clock degradation is evaluated at every bucket boundary the
// clock crosses, so that a replay gives the same flags whatever the flush
// timing. A flush during a catch-up crosses thousands of boundaries, and
// evaluate reads only the ranges of alerting steps and of volume detection
// (evalRanges): step moves those through every boundary, the others jump
// to the final position once (advance).
//
// The ranges share edges: a range [lo, hi] that moves with the clock is the
// buckets up to hi minus the buckets up to lo-1, and both hi and lo-1 are
// "a base position minus k buckets", the base being the bucket of now (flow
// and volume ranges) or the newest mature cohort bucket of a step. A tap is
// one such edge. It reads the buckets it passes over with one store cursor
// per flush, in order, and adds each to the ranges it is the upper edge of
// and subtracts it from those it is the lower edge of: every stored bucket
// is read once per edge however far the flush moves, and nothing is held
// in memory but the cursors.

// tap is an edge shared by ranges: the buckets up to base(now) - k.
type tap struct {
	cohort bool
	lag    int64 // ms
	k      int64 // buckets
	subs   []tapSub
	pos    int64 // buckets up to pos are in the subscribers' sums
	cur    *store.BucketCursor
	// groups are the column groups the subscribers read, and ops how an
	// entry of each adds to their sums (see stepColumns).
	groups []int
	ops    [][]colOp
	// off is, while stepping, the boundary less the tap's position.
	off int64
}

// tapSub is a range a tap adds to (sign +1, its upper edge) or subtracts
// from (-1, its lower edge).
type tapSub struct {
	r    int
	sign int64
}

// rewind sets the tap's position to the edge of its first range at the
// ranges' current positions: what that range's sums already hold.
func (t *tap) rewind(positions []position) {
	s := t.subs[0]
	if pos := positions[s.r]; s.sign > 0 {
		t.pos = pos.hi
	} else {
		t.pos = pos.lo - 1
	}
}

// at is the tap's position at time now (ms).
func (t *tap) at(now, bucket int64) int64 {
	return rangeSpec{cohort: t.cohort, lag: t.lag, shift: t.k, width: 1}.hi(now, bucket)
}

// hi is the upper bound of r at now.
func (r rangeSpec) hi(now, bucket int64) int64 {
	_, hi := r.bounds(now, bucket)
	return hi
}

// evalTaps returns the ranges evaluate reads and their edges.
func (l *layout) evalTaps() ([]int, []*tap) {
	var ranges []int
	for _, sl := range l.steps {
		if sl.alerting {
			ranges = append(ranges, sl.cohort[sl.window])
			ranges = append(ranges, sl.baseline...)
		}
	}
	ranges = append(ranges, l.volume.current)
	ranges = append(ranges, l.volume.baseline...)
	slices.Sort(ranges)
	ranges = slices.Compact(ranges)
	type key struct {
		cohort bool
		lag, k int64
	}
	index := map[key]*tap{}
	var taps []*tap
	sub := func(k key, s tapSub) {
		t, ok := index[k]
		if !ok {
			t = &tap{cohort: k.cohort, lag: k.lag, k: k.k}
			index[k] = t
			taps = append(taps, t)
		}
		t.subs = append(t.subs, s)
	}
	for _, r := range ranges {
		spec := l.ranges[r]
		lag := int64(0)
		if spec.cohort {
			lag = spec.lag
		}
		sub(key{spec.cohort, lag, spec.shift}, tapSub{r, +1})
		sub(key{spec.cohort, lag, spec.shift + spec.width}, tapSub{r, -1})
	}
	return ranges, taps
}

// step moves the ranges from their current positions through every bucket
// boundary from `from` to `to` (bucket indexes), evaluating degradation at
// each boundary. The ranges evaluate does not read are left where they
// were before the first boundary: the caller moves every range to the
// clock afterwards.
func (p *Processor) step(from, to int64) error {
	// Start from the positions just before the first boundary, so that the
	// taps read only the buckets the boundaries move over.
	if err := p.advance((from - 1) * p.bucketMs); err != nil {
		return fmt.Errorf("advance windows: %w", err)
	}
	if from > to {
		return nil
	}
	if p.stepColumns(from, to) {
		return nil
	}
	l := p.layout
	bucket := p.bucketMs
	var errs []error
	for _, t := range p.evalTaps {
		t.rewind(p.positions)
		t.cur = nil
		if end := t.at(to*bucket, bucket); end > t.pos {
			c, err := p.st.NewBucketCursor(t.pos+1, end)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			t.cur = c
		}
	}
	defer func() {
		for _, t := range p.evalTaps {
			if t.cur != nil {
				t.cur.Close()
				t.cur = nil
			}
		}
	}()
	if len(errs) > 0 {
		return fmt.Errorf("step windows: %w", errors.Join(errs...))
	}
	vl := l.vecLen
	for b := from; b <= to; b++ {
		now := b * bucket
		for _, t := range p.evalTaps {
			c := t.cur
			if c == nil {
				continue
			}
			target := t.at(now, bucket)
			for c.Valid() && c.Bucket() <= target {
				seg := p.segmentFor(c.Segment())
				v := c.Vector()
				for _, s := range t.subs {
					sums := seg.sums[s.r*vl : (s.r+1)*vl]
					for _, i := range p.cols.need[s.r] {
						if i < len(v) {
							sums[i] += s.sign * v[i]
						}
					}
				}
				c.Next()
			}
			t.pos = target
		}
		for _, r := range p.evalRanges {
			lo, hi := l.ranges[r].bounds(now, bucket)
			p.positions[r] = position{lo, hi}
		}
		p.evaluate()
	}
	for _, t := range p.evalTaps {
		if t.cur != nil {
			err := t.cur.Close()
			t.cur = nil
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("step windows: %w", errors.Join(errs...))
	}
	return nil
}
