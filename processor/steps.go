package processor

import (
	"fmt"

	"github.com/funnelwatch/funnelwatch/store"
)

// stepChunk is how many bucket boundaries step reads the store for at once:
// it bounds the memory of the buckets read ahead.
const stepChunk = 1024

// edgeBucket is one stored bucket of one segment that enters or leaves a
// range during a step.
type edgeBucket struct {
	b   int64
	seg *segment
	v   store.Vector
}

// step moves the ranges from their current positions through every bucket
// boundary from `from` to `to` (bucket indexes), evaluating degradation at
// each boundary. Each range edge is read from the store once per chunk of
// boundaries, so crossing a long gap in a replay costs a few scans, not a
// few scans per bucket.
func (p *Processor) step(from, to int64) error {
	// Start from the positions just before the first boundary, so that a
	// chunk reads only the buckets its boundaries move over.
	if err := p.advance((from - 1) * p.bucketMs); err != nil {
		return err
	}
	for c := from; c <= to; c += stepChunk {
		if err := p.stepThrough(c, min(c+stepChunk-1, to)); err != nil {
			return err
		}
	}
	return nil
}

func (p *Processor) stepThrough(first, last int64) error {
	l := p.layout
	type edge struct {
		adds, subs []edgeBucket
	}
	edges := make([]edge, len(l.ranges))
	read := func(lo, hi int64) ([]edgeBucket, error) {
		var out []edgeBucket
		err := p.st.Buckets(lo, hi, func(b int64, key []byte, v store.Vector) {
			out = append(out, edgeBucket{b: b, seg: p.segmentFor(key), v: append(store.Vector(nil), v...)})
		})
		return out, err
	}
	for r, spec := range l.ranges {
		lo, hi := spec.bounds(last*p.bucketMs, l.bucket)
		old := p.positions[r]
		if !p.positioned || lo < old.lo || hi < old.hi {
			// Not positioned yet, or moving back: take the jump at once.
			if err := p.advance(last * p.bucketMs); err != nil {
				return err
			}
			p.evaluate()
			return nil
		}
		var err error
		if hi > old.hi {
			if edges[r].adds, err = read(old.hi+1, hi); err != nil {
				return fmt.Errorf("step windows: %w", err)
			}
		}
		if lo > old.lo {
			if edges[r].subs, err = read(old.lo, lo-1); err != nil {
				return fmt.Errorf("step windows: %w", err)
			}
		}
	}
	vl := l.vecLen
	apply := func(r int, e edgeBucket, sign int64) {
		sums := e.seg.sums[r*vl : (r+1)*vl]
		for i, x := range e.v {
			if i < vl {
				sums[i] += sign * x
			}
		}
	}
	for b := first; b <= last; b++ {
		for r, spec := range l.ranges {
			lo, hi := spec.bounds(b*p.bucketMs, l.bucket)
			e := &edges[r]
			for len(e.adds) > 0 && e.adds[0].b <= hi {
				apply(r, e.adds[0], +1)
				e.adds = e.adds[1:]
			}
			for len(e.subs) > 0 && e.subs[0].b < lo {
				apply(r, e.subs[0], -1)
				e.subs = e.subs[1:]
			}
			p.positions[r] = position{max(lo, p.positions[r].lo), max(hi, p.positions[r].hi)}
		}
		p.evaluate()
	}
	return nil
}
