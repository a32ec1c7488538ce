// Package traffic is a deterministic model of marketing/sales funnel traffic
// that produces canonical funnelwatch events (SPEC §2.1) for demos, trials
// and load tests.
//
// Visitors arrive per segment (a traffic source in a region) as a Poisson
// process whose rate follows a daily curve and weaker weekends in the
// region's local time. Each visitor's whole lifecycle is drawn when it first
// touches: return visits over the following hours and days (carrying other
// or no attributes), maybe a lead minutes after the first visit (sometimes
// hours later, after a return visit), maybe a deal days after the lead
// (carrying no segment, as CRM deals do, and a value). Records exercise every
// path of the canonical decoder: with and without id, time, value and
// segment, partial segments, duplicate deliveries and, on request, invalid
// records. A Drop lowers the visit→lead probability (or the visit volume) of
// one segment from a given instant on, to watch the degradation signal fire.
//
// The model is a pure function of its Config: the same seed, start and
// options give the same bytes, however Generate calls split the time range.
// Every visitor draws from its own random stream, so a drop changes the
// outcomes of the visitors it hits and nothing else.
package traffic

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// Config configures a Model. The zero value of every field but Start is
// usable; DefaultConfig returns the recommended values.
type Config struct {
	// Seed selects the random streams; the same seed gives the same
	// records.
	Seed int64
	// Start is the event time the stream begins at. Required.
	Start time.Time
	// Scale multiplies the visitor rate of every segment (0 means 1).
	// At scale 1 the model produces about 4,400 visitors and 7,000 records
	// per hour on average.
	Scale float64
	// DuplicateRatio is the probability that a record with an id is
	// delivered a second time, unchanged, up to 30s later.
	DuplicateRatio float64
	// InvalidRatio is the probability that a record is followed by an
	// invalid one (malformed JSON, no entity or an unknown type), for
	// trying bad-input handling. 0 by default.
	InvalidRatio float64
	// Drop, when set, lowers one segment's conversion or volume.
	Drop *Drop
}

// Drop multiplies the visit→lead probability of the visitors of a segment
// that first touch at or after At by Factor; with Volume it multiplies the
// visitor rate of the segment instead (Factor ≤ 1), so the segment goes
// quiet.
type Drop struct {
	// Segment selects the visitors hit: every key must match. Keys are
	// source, region and campaign; values must exist in the model.
	Segment map[string]string
	// Factor multiplies the probability (capped at 1) or the rate.
	Factor float64
	// At is the event time the drop starts at (zero: from the start).
	At time.Time
	// Volume makes the drop lower the visitor rate rather than the
	// visit→lead probability.
	Volume bool
}

// Defaults of the model and of the demo's drop.
const (
	DefaultSeed           = 1
	DefaultDuplicateRatio = 0.01
	DefaultDropFactor     = 0.3
)

// DefaultConfig returns the recommended configuration starting at start:
// seed 1, scale 1, 1% duplicate deliveries, no invalid records, no drop.
func DefaultConfig(start time.Time) Config {
	return Config{Seed: DefaultSeed, Start: start, Scale: 1, DuplicateRatio: DefaultDuplicateRatio}
}

// DefaultDrop returns the demo's drop: the visit→lead probability of
// source=paid_search, region=na (the biggest segment, several hundred
// visitors an hour at all hours) falls to 30% from at on.
func DefaultDrop(at time.Time) *Drop {
	return &Drop{
		Segment: map[string]string{"source": "paid_search", "region": "na"},
		Factor:  DefaultDropFactor,
		At:      at,
	}
}

// ParseSegment parses a segment selector written as comma-separated
// key=value pairs, e.g. "source=paid_search,region=na".
func ParseSegment(s string) (map[string]string, error) {
	out := make(map[string]string)
	for kv := range strings.SplitSeq(s, ",") {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" || v == "" {
			return nil, fmt.Errorf("segment %q: %q is not key=value", s, kv)
		}
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("segment %q: key %q repeated", s, k)
		}
		out[k] = v
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("segment %q: empty", s)
	}
	return out, nil
}

// Validate reports every problem of the configuration at once.
func (c Config) Validate() error {
	var errs []error
	if c.Start.IsZero() {
		errs = append(errs, errors.New("start: required"))
	}
	if !(c.Scale >= 0) || math.IsInf(c.Scale, 0) {
		errs = append(errs, fmt.Errorf("scale: %v is not a finite number ≥ 0", c.Scale))
	}
	if !(c.DuplicateRatio >= 0 && c.DuplicateRatio <= 1) {
		errs = append(errs, fmt.Errorf("duplicate ratio: %v is not in [0, 1]", c.DuplicateRatio))
	}
	if !(c.InvalidRatio >= 0 && c.InvalidRatio <= 1) {
		errs = append(errs, fmt.Errorf("invalid ratio: %v is not in [0, 1]", c.InvalidRatio))
	}
	if d := c.Drop; d != nil {
		if len(d.Segment) == 0 {
			errs = append(errs, errors.New("drop.segment: empty"))
		}
		for _, k := range slices.Sorted(maps.Keys(d.Segment)) {
			v := d.Segment[k]
			var known []string
			switch k {
			case "source":
				for i := range sources {
					known = append(known, sources[i].name)
				}
			case "region":
				for i := range regions {
					known = append(known, regions[i].name)
				}
			case "campaign":
				for i := range sources {
					known = append(known, sources[i].campaigns...)
				}
			default:
				errs = append(errs, fmt.Errorf("drop.segment: unknown key %q (want source, region or campaign)", k))
				continue
			}
			if !slices.Contains(known, v) {
				errs = append(errs, fmt.Errorf("drop.segment: unknown %s %q (want one of %s)", k, v, strings.Join(known, ", ")))
			}
		}
		switch {
		case !(d.Factor >= 0) || math.IsInf(d.Factor, 0):
			errs = append(errs, fmt.Errorf("drop.factor: %v is not a finite number ≥ 0", d.Factor))
		case d.Volume && d.Factor > 1:
			errs = append(errs, fmt.Errorf("drop.factor: %v > 1 with a volume drop", d.Factor))
		}
	}
	return errors.Join(errs...)
}

func (c Config) scale() float64 {
	if c.Scale == 0 {
		return 1
	}
	return c.Scale
}

func (d *Drop) matchesSegment(source, region string) bool {
	if v, ok := d.Segment["source"]; ok && v != source {
		return false
	}
	if v, ok := d.Segment["region"]; ok && v != region {
		return false
	}
	return true
}

// campaignShare is the share of a segment's visitors (campaigns drawn
// uniformly) whose campaign matches the drop.
func (d *Drop) campaignShare(campaigns []string) float64 {
	want, ok := d.Segment["campaign"]
	if !ok {
		return 1
	}
	if len(campaigns) == 0 {
		return 0
	}
	n := 0
	for _, c := range campaigns {
		if c == want {
			n++
		}
	}
	return float64(n) / float64(len(campaigns))
}

// Record is one Kafka record of the stream.
type Record struct {
	// Key is the entity id, so that one entity's records stay on one
	// partition. Invalid records carry their entity's key too.
	Key []byte
	// Value is the JSON event.
	Value []byte
	// Time is the Kafka record timestamp: the event time (also when the
	// JSON carries no time, so the decoder falls back to it, and for a
	// duplicate delivery, which keeps its original's timestamp).
	Time time.Time
}

// Model produces the records of one stream. It is not safe for concurrent
// use.
type Model struct {
	cfg      Config
	visitors [numSegments]float64 // per minute, before seasonality
	drop     compiledDrop

	rng        *rand.Rand // arrivals
	epcg       rand.PCG   // per-entity stream, reseeded per visitor
	er         *rand.Rand
	entitySalt uint64 // seeds the per-visitor streams
	idSalt     uint64 // entity ids
	eventSalt  uint64 // event ids

	// Scheduled records wait in one of two places: records due within
	// nearMinutes of the current minute in a ring of per-minute buckets,
	// later ones in a heap, from which they move to their bucket as it
	// comes near. Most records (first visits, quick leads, duplicates)
	// never touch the heap.
	near    [nearMinutes][]event
	far     eventHeap
	pending int

	startMs    int64
	tick       int64 // minute (unix ms / 60000) being emitted
	drawn      bool  // the arrivals of tick are drawn and its bucket sorted
	cursor     int   // next record of tick's bucket
	position   time.Time
	nextEntity uint64
	recordNo   uint64 // records scheduled for the visitor being spawned

	buf []byte
	enc encoder
}

type compiledDrop struct {
	active   bool
	atMs     int64
	factor   float64
	volume   bool
	segment  [numSegments]bool
	campaign string // "" when not constrained
}

const (
	// nearMinutes is the ring of per-minute buckets: longer than the
	// quick leads' delay, so that they skip the heap.
	nearMinutes = 64

	minuteMs = int64(time.Minute / time.Millisecond)
	hourMs   = int64(time.Hour / time.Millisecond)
)

// New returns a model producing the stream that cfg describes.
func New(cfg Config) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("traffic config: %w", err)
	}
	seed := uint64(cfg.Seed)
	m := &Model{
		cfg:        cfg,
		rng:        rand.New(rand.NewPCG(mix(seed^0x9e3779b97f4a7c15), mix(seed+1))),
		entitySalt: mix(seed + 2),
		idSalt:     mix(seed + 3),
		eventSalt:  mix(seed + 4),
		startMs:    cfg.Start.UnixMilli(),
		position:   cfg.Start,
	}
	m.er = rand.New(&m.epcg)
	m.tick = floorDiv(m.startMs, minuteMs)
	for s := range numSegments {
		m.visitors[s] = segmentOf(s).VisitorsPerHour * cfg.scale() / 60
	}
	if d := cfg.Drop; d != nil {
		m.drop = compiledDrop{active: true, atMs: d.At.UnixMilli(), factor: d.Factor, volume: d.Volume, campaign: d.Segment["campaign"]}
		if d.At.IsZero() {
			m.drop.atMs = math.MinInt64
		}
		for s := range numSegments {
			m.drop.segment[s] = d.matchesSegment(sources[s/numRegions].name, regions[s%numRegions].name)
		}
	}
	return m, nil
}

// Position returns the time up to which the stream has been generated: the
// until of the last Generate call that completed, or Config.Start.
func (m *Model) Position() time.Time { return m.position }

// Pending returns how many records are scheduled for later: the return
// visits, leads, deals and duplicates of visitors already generated. It is
// bounded by the visitor rate times the longest lifecycle (about 28 days),
// not by the length of the stream.
func (m *Model) Pending() int { return m.pending }

// Generate calls emit for every record of the stream delivered before until
// and not yet emitted, in order of delivery time (the event time, but for
// duplicates, which arrive up to 30s after their original). Consecutive
// calls continue one stream. Key and Value are only valid during the call
// to emit: copy them to keep them. If emit returns an error, Generate
// returns it; the record counts as emitted and a later call continues after
// it.
func (m *Model) Generate(until time.Time, emit func(Record) error) error {
	u := until.UnixMilli()
	if until.After(time.UnixMilli(u)) {
		u++ // records strictly before until, at millisecond precision
	}
loop:
	for {
		if m.drawn {
			b := m.near[slot(m.tick)]
			for m.cursor < len(b) {
				e := &b[m.cursor]
				if e.at >= u {
					break loop
				}
				m.cursor++
				m.pending--
				if err := emit(m.encode(e)); err != nil {
					return err
				}
			}
			// Keep the bucket's capacity: the ring is small and every
			// minute's bucket fills alike.
			clear(b)
			m.near[slot(m.tick)] = b[:0]
			m.tick++
			m.cursor = 0
			m.drawn = false
		}
		// Every record before this minute is out: draw the minute's
		// arrivals, unless nothing of it is wanted yet.
		if m.tick*minuteMs >= u {
			break
		}
		horizon := (m.tick + nearMinutes) * minuteMs
		for len(m.far) > 0 && m.far[0].at < horizon {
			e := m.far.pop()
			i := slot(floorDiv(e.at, minuteMs))
			m.near[i] = append(m.near[i], e)
		}
		m.arrivals(m.tick * minuteMs)
		slices.SortFunc(m.near[slot(m.tick)], func(a, b event) int {
			if a.at != b.at {
				return cmp.Compare(a.at, b.at)
			}
			return cmp.Compare(a.id, b.id)
		})
		m.drawn = true
	}
	if until.After(m.position) {
		m.position = until
	}
	return nil
}

// arrivals draws the visitors first touching in the minute starting at
// tick and schedules their lifecycles.
func (m *Model) arrivals(tick int64) {
	var season [numRegions]float64
	for r := range numRegions {
		season[r] = seasonality(r, tick+minuteMs/2)
	}
	for s := range numSegments {
		n := poisson(m.rng, m.visitors[s]*season[s%numRegions])
		for range n {
			at := tick + int64(m.rng.IntN(int(minuteMs)))
			thin := m.rng.Float64()
			// The index is taken before anything can skip the visitor,
			// so that every other visitor keeps its stream.
			idx := m.nextEntity
			m.nextEntity++
			if at < m.startMs {
				continue
			}
			m.spawn(idx, s, at, thin)
		}
	}
}

// Event kinds.
const (
	kindVisit uint8 = iota
	kindLead
	kindDeal
	kindInvalid
)

// Segment attribute modes of a record.
const (
	attrNone     uint8 = iota
	attrFull           // source, campaign (if any), region of the visitor
	attrNoRegion       // source and campaign: the geo lookup failed
	attrOther          // another source (alt) in the same region
	attrCampaign       // the campaign alone
)

// Invalid record variants (attr of a kindInvalid event).
const (
	invalidMalformed uint8 = iota
	invalidNoEntity
	invalidUnknownType
	numInvalid
)

// Record flags.
const (
	flagID uint8 = 1 << iota
	flagTime
	flagValue
)

// event is one scheduled record, kept small because thousands wait in the
// heap at any time.
type event struct {
	at     int64  // delivery time, unix ms: the order with id
	id     uint64 // visitor index<<8 | record number (+128 if invalid): tie-breaker and event id
	entity uint64 // visitor index
	value  uint32
	lag    uint32 // delivery time − event time, ms (duplicates)
	kind   uint8
	seg    uint8
	attr   uint8
	alt    uint8 // attrOther: the source shown; kindInvalid: the kind
	camp   uint8 // campaign index + 1, 0 for none
	flags  uint8
}

// spawn draws the lifecycle of visitor idx of segment s first touching at
// t0 and schedules its records.
func (m *Model) spawn(idx uint64, s int, t0 int64, thin float64) {
	r := m.er
	m.recordNo = 0
	m.epcg.Seed(mix(idx^m.entitySalt), mix(idx+m.entitySalt))
	src := &sources[s/numRegions]
	var camp uint8
	if len(src.campaigns) > 0 {
		camp = uint8(1 + r.IntN(len(src.campaigns)))
	}
	hit := m.dropHits(s, camp, t0)
	if hit && m.drop.volume && thin >= m.drop.factor {
		return
	}
	base := event{at: t0, entity: idx, seg: uint8(s), camp: camp}

	first := base
	first.kind = kindVisit
	first.attr = attrFull
	first.flags = visitFlags(r)
	if r.Float64() < partialShare {
		first.attr = attrNoRegion
	}
	m.schedule(r, first)

	var repeats [maxRepeats]int64
	n := 0
	if r.Float64() < src.repeat {
		n = 1
		for n < maxRepeats && r.Float64() < repeatAgain {
			n++
		}
	}
	for i := range n {
		repeats[i] = logUniform(r, MinRepeatDelay, MaxRepeatDelay)
	}
	slices.Sort(repeats[:n])
	for i := range n {
		v := base
		v.kind = kindVisit
		v.at = t0 + repeats[i]
		u := r.Float64()
		alt := (s/numRegions + 1 + r.IntN(numSources-1)) % numSources
		switch {
		case u < 0.40:
			v.attr = attrNone
		case u < 0.65:
			v.attr = attrFull
		case u < 0.85:
			v.attr, v.alt = attrOther, uint8(alt)
		case camp != 0:
			v.attr = attrCampaign
		}
		v.flags = visitFlags(r)
		m.schedule(r, v)
	}

	seg := segmentOf(s)
	p := seg.LeadProbability
	if hit && !m.drop.volume {
		p = math.Min(1, p*m.drop.factor)
	}
	uLead := r.Float64()
	quick := r.Float64() < quickLeadShare
	quickDelay := truncLogNormal(r, 4*time.Minute, 0.9, MinQuickLeadDelay, MaxQuickLeadDelay)
	lateDelay := logUniform(r, MinLateLeadDelay, 72*time.Hour)
	if uLead >= p {
		return
	}
	delay := quickDelay
	if !quick {
		delay = lateDelay
		// A late lead usually follows a return visit.
		for _, d := range repeats[:n] {
			if d >= MinLateLeadDelay.Milliseconds() && d <= 72*hourMs {
				delay = d + quickDelay
				break
			}
		}
	}
	lead := base
	lead.kind = kindLead
	lead.at = t0 + delay
	lead.flags = flagID
	if r.Float64() < 0.95 {
		lead.flags |= flagTime
	}
	if r.Float64() < 0.3 {
		lead.flags |= flagValue // a lead score of 0, as some CRMs send
	}
	if r.Float64() < 0.5 {
		lead.attr = attrFull
	}
	m.schedule(r, lead)

	if r.Float64() >= seg.DealProbability {
		return
	}
	deal := base
	deal.kind = kindDeal
	deal.at = lead.at + truncLogNormal(r, 6*24*time.Hour, 0.6, MinDealDelay, MaxDealDelay)
	deal.attr = attrNone
	deal.flags = flagID | flagValue
	if r.Float64() < 0.97 {
		deal.flags |= flagTime
	}
	v := seg.MedianDealValue * math.Exp(0.8*r.NormFloat64())
	deal.value = uint32(max(100, math.Round(min(v, 1e9)/10)*10))
	m.schedule(r, deal)
}

func visitFlags(r *rand.Rand) uint8 {
	var f uint8
	if r.Float64() < 0.85 {
		f |= flagID
	}
	if r.Float64() < 0.9 {
		f |= flagTime
	}
	return f
}

func (m *Model) dropHits(s int, camp uint8, t0 int64) bool {
	d := &m.drop
	if !d.active || t0 < d.atMs || !d.segment[s] {
		return false
	}
	if d.campaign == "" {
		return true
	}
	return camp != 0 && sources[s/numRegions].campaigns[camp-1] == d.campaign
}

// schedule queues e with its duplicate delivery and invalid companion, if
// drawn. It always draws the same numbers from r, so the ratios change
// nothing else of the stream.
func (m *Model) schedule(r *rand.Rand, e event) {
	e.id = e.entity<<8 | m.recordNo
	m.recordNo++
	m.push(e)
	uDup, uLag := r.Float64(), r.Float64()
	uInvalid, variant := r.Float64(), r.IntN(int(numInvalid))
	if e.flags&flagID != 0 && uDup < m.cfg.DuplicateRatio {
		d := e
		lag := 1 + int64(uLag*float64(MaxDuplicateDelay.Milliseconds()-1))
		d.at += lag
		d.lag = uint32(lag)
		m.push(d)
	}
	if uInvalid < m.cfg.InvalidRatio {
		inv := e
		inv.kind, inv.alt, inv.attr = kindInvalid, e.kind, uint8(variant)
		// Its own id, outside the numbers of valid records (fewer
		// than 128 a visitor), so that it shifts no other id.
		inv.id = e.id | 0x80
		m.push(inv)
	}
}

// push queues e in its minute's bucket when near, else in the heap.
func (m *Model) push(e event) {
	m.pending++
	if minute := floorDiv(e.at, minuteMs); minute < m.tick+nearMinutes {
		i := slot(minute)
		m.near[i] = append(m.near[i], e)
		return
	}
	m.far.push(e)
}

// slot is the ring bucket of a minute (unix ms / 60000).
func slot(minute int64) int { return int(floorMod(minute, nearMinutes)) }

// eventHeap is a binary min-heap of events by (at, id).
type eventHeap []event

func (h eventHeap) less(i, j int) bool {
	return h[i].at < h[j].at || (h[i].at == h[j].at && h[i].id < h[j].id)
}

func (h *eventHeap) push(e event) {
	*h = append(*h, e)
	q := *h
	i := len(q) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !q.less(i, p) {
			break
		}
		q[i], q[p] = q[p], q[i]
		i = p
	}
}

func (h *eventHeap) pop() event {
	q := *h
	top := q[0]
	n := len(q) - 1
	q[0] = q[n]
	q = q[:n]
	i := 0
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		c := l
		if r := l + 1; r < n && q.less(r, l) {
			c = r
		}
		if !q.less(c, i) {
			break
		}
		q[i], q[c] = q[c], q[i]
		i = c
	}
	*h = q
	return top
}
