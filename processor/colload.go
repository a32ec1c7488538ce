package processor

import (
	"github.com/funnelwatch/funnelwatch/store"
)

// The start-up scan (loadRanges) reads every bucket of the ranges' span,
// in bucket order, and fills the columns from it: tens of megabytes for a
// few weeks of one-minute buckets. Appending to each column grew it by a
// quarter at a time, copying and clearing it about four times over (an
// eighth of a start-up's CPU), and left up to a quarter of it unused. So
// the scan appends each column's entries to chunks of its own instead,
// which it never copies, and colLoaded then copies them once into a column
// of the exact size.

// Chunks hold from minChunkEntries to maxChunkEntries entries, doubling,
// so that the many sparse segments take little and the dense ones few
// chunks.
const (
	minChunkEntries = 16
	maxChunkEntries = 4096
)

// colLoad adds bucket b of the start-up scan to the segment's column
// chunks; it is colAddGroup for every group, for buckets that come in
// increasing order, each once. It reports false when the columns cannot be
// used, as colAddGroup does.
func (p *Processor) colLoad(s *segment, b int64, v store.Vector) bool {
	if s.fill == nil {
		s.fill = make([][][]int16, len(p.cols.groups))
	}
	for g := range p.cols.groups {
		grp := &p.cols.groups[g]
		if b < grp.from {
			continue // below every range that reads the group
		}
		if !grp.holds(v) {
			continue
		}
		c := &s.cols[g]
		if len(s.fill[g]) == 0 {
			c.base, c.wideOff = b, grp.wideOff
		}
		if !c.fits(b) {
			if grp.wideOff {
				return false // a span of more than 2^31 buckets
			}
			p.colWiden(g)
		}
		stride := grp.stride
		chunks := s.fill[g]
		if p.colBytes.Add(wordBytes*int64(stride)) > p.colBudget {
			return false
		}
		n := len(chunks)
		if n == 0 || len(chunks[n-1]) == cap(chunks[n-1]) {
			entries := minChunkEntries
			if n > 0 {
				entries = min(2*cap(chunks[n-1])/stride, maxChunkEntries)
			}
			chunks = append(chunks, make([]int16, 0, entries*stride))
			s.fill[g] = chunks
			n++
		}
		k := len(chunks[n-1])
		ch := chunks[n-1][:k+stride]
		entry := column{data: ch}
		// setBucket's work, on c's base: an entry carrying the base and
		// width made the restart 20% slower.
		if off := b - c.base; c.wideOff {
			entry.setInt32(k+stride-2, int32(off))
		} else {
			ch[k+stride-1] = int16(uint16(off))
		}
		for slot, i := range grp.idx {
			var d int64
			if i < len(v) {
				d = v[i]
			}
			at, two := k+grp.at[slot], grp.two[slot]
			if two && entry.setNumber32(at, d) || !two && entry.setNumber16(at, d) {
				continue
			}
			if s.wide == nil {
				s.wide = map[wideKey]int64{}
			}
			s.wide[wideKey{g, slot, b}] = d
		}
		chunks[n-1] = ch
	}
	return true
}

// colLoaded moves the chunks colLoad filled into the columns, each sized
// to its entries.
func (p *Processor) colLoaded() {
	for _, s := range p.segmentList {
		for g, chunks := range s.fill {
			n := 0
			for _, ch := range chunks {
				n += len(ch)
			}
			if n == 0 {
				continue
			}
			data := p.colMem.alloc(0, n)
			for _, ch := range chunks {
				data = append(data, ch...)
				p.colMem.free(ch)
			}
			c := &s.cols[g]
			p.colMem.free(c.data)
			c.data, c.start = data, 0
		}
		s.fill = nil
	}
}
