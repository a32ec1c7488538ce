package traffic

import (
	"math"
	"time"
)

// source is one traffic source of the model: its share of visitors and how
// well its visitors convert. The per-segment numbers are these times the
// region's multipliers, so segments differ by more than an order of
// magnitude in volume and by a factor of ten in visit→lead probability.
type source struct {
	name       string
	visitors   float64  // new visitors per hour, all regions, weekday mean, scale 1
	lead       float64  // P(visitor ever becomes a lead)
	deal       float64  // P(lead ever becomes a deal)
	repeat     float64  // P(visitor comes back at least once)
	dealMedian float64  // median deal amount
	campaigns  []string // campaign attribute values; empty: the source has none
}

// region is one region of the model with its share of every source's
// visitors, its conversion multipliers and the fixed UTC offset its daily
// curve follows (no daylight saving time: the model is synthetic).
type region struct {
	name   string
	share  float64
	lead   float64
	deal   float64
	offset time.Duration
}

var sources = [...]source{
	{name: "paid_search", visitors: 1800, lead: 0.12, deal: 0.18, repeat: 0.30, dealMedian: 6000, campaigns: []string{"brand", "generic", "competitor"}},
	{name: "organic", visitors: 1500, lead: 0.07, deal: 0.22, repeat: 0.35, dealMedian: 8000},
	{name: "social", visitors: 700, lead: 0.03, deal: 0.10, repeat: 0.20, dealMedian: 3000, campaigns: []string{"spring_promo", "retargeting"}},
	{name: "email", visitors: 300, lead: 0.15, deal: 0.25, repeat: 0.45, dealMedian: 9000, campaigns: []string{"newsletter", "nurture", "webinar"}},
	{name: "referral", visitors: 150, lead: 0.10, deal: 0.35, repeat: 0.40, dealMedian: 15000, campaigns: []string{"partners"}},
	{name: "display", visitors: 400, lead: 0.012, deal: 0.08, repeat: 0.15, dealMedian: 4000, campaigns: []string{"awareness", "retargeting"}},
}

var regions = [...]region{
	{name: "na", share: 0.50, lead: 1.0, deal: 1.0, offset: -5 * time.Hour},
	{name: "emea", share: 0.30, lead: 0.9, deal: 1.1, offset: 1 * time.Hour},
	{name: "apac", share: 0.15, lead: 0.8, deal: 0.9, offset: 8 * time.Hour},
	{name: "latam", share: 0.05, lead: 1.1, deal: 0.8, offset: -3 * time.Hour},
}

const (
	numSources  = len(sources)
	numRegions  = len(regions)
	numSegments = numSources * numRegions

	// Daily curve: 1 + dailyAmplitude·cos(2π(h − peakHour)/24) in local
	// time, so the night trough (02:00) is half the mean and the afternoon
	// peak (14:00) one and a half times it.
	dailyAmplitude = 0.5
	peakHour       = 14
	// weekendFactor multiplies Saturday and Sunday (local time).
	weekendFactor = 0.7

	// quickLeadShare is the share of leads that come minutes after the
	// first visit, inside the default 1h visit→lead horizon; the rest come
	// more than an hour later.
	quickLeadShare = 0.9
	// partialShare is the share of first visits whose segment lacks the
	// region (a failed geo lookup): the processor attributes them to
	// region "unknown".
	partialShare = 0.01
)

// Delay ranges of the lifecycle of a visitor, all measured in event time.
const (
	// MinQuickLeadDelay and MaxQuickLeadDelay bound the delay from the
	// first visit to a quick lead (log-normal, median 4m).
	MinQuickLeadDelay = 20 * time.Second
	MaxQuickLeadDelay = 55 * time.Minute
	// MinLateLeadDelay and MaxLateLeadDelay bound the delay from the first
	// visit to a late lead: minutes after a return visit, or log-uniform
	// in this range when the visitor has no return visit in it.
	MinLateLeadDelay = time.Hour + time.Minute
	MaxLateLeadDelay = 72*time.Hour + MaxQuickLeadDelay
	// MinRepeatDelay and MaxRepeatDelay bound the delay from the first
	// visit to a return visit (log-uniform).
	MinRepeatDelay = 5 * time.Minute
	MaxRepeatDelay = 7 * 24 * time.Hour
	// MinDealDelay and MaxDealDelay bound the delay from the lead to the
	// deal (log-normal, median 6 days).
	MinDealDelay = 24 * time.Hour
	MaxDealDelay = 25 * 24 * time.Hour
	// MaxDuplicateDelay bounds how much later a duplicate delivery of a
	// record arrives.
	MaxDuplicateDelay = 30 * time.Second

	// maxRepeats caps the return visits of one visitor.
	maxRepeats = 6
	// repeatAgain is P(another return visit | one more already happened).
	repeatAgain = 0.4
)

// Segment is one segment of the model (a source in a region) with its
// static parameters at scale 1.
type Segment struct {
	// Source and Region are the segment attributes every first visit
	// carries (source, region).
	Source, Region string
	// Campaigns are the values of the campaign attribute visitors of this
	// segment carry; empty for organic traffic.
	Campaigns []string
	// VisitorsPerHour is the weekday mean of new visitors per hour at
	// scale 1 (the weekly mean is 0.914 times this, see Seasonality).
	VisitorsPerHour float64
	// LeadProbability is P(a visitor ever becomes a lead).
	LeadProbability float64
	// DealProbability is P(a lead ever becomes a deal).
	DealProbability float64
	// RepeatProbability is P(a visitor comes back at least once).
	RepeatProbability float64
	// MedianDealValue is the median `value` of a deal (log-normal).
	MedianDealValue float64
	// UTCOffset is the fixed offset of the region's local time, which the
	// daily and weekly seasonality follow.
	UTCOffset time.Duration
}

// Segments returns the segments of the model in a fixed order (sources ×
// regions).
func Segments() []Segment {
	out := make([]Segment, 0, numSegments)
	for s := range numSegments {
		out = append(out, segmentOf(s))
	}
	return out
}

func segmentOf(s int) Segment {
	src, reg := &sources[s/numRegions], &regions[s%numRegions]
	return Segment{
		Source:            src.name,
		Region:            reg.name,
		Campaigns:         src.campaigns,
		VisitorsPerHour:   src.visitors * reg.share,
		LeadProbability:   math.Min(1, src.lead*reg.lead),
		DealProbability:   math.Min(1, src.deal*reg.deal),
		RepeatProbability: src.repeat,
		MedianDealValue:   src.dealMedian,
		UTCOffset:         reg.offset,
	}
}

// Seasonality returns the factor the visitor rate of a region is multiplied
// by at t: a smooth daily curve in the region's local time (0.5 at 02:00,
// 1.5 at 14:00, mean 1) times 0.7 on local Saturdays and Sundays. It
// returns 0 for an unknown region.
func Seasonality(regionName string, t time.Time) float64 {
	for r := range regions {
		if regions[r].name == regionName {
			return seasonality(r, t.UnixMilli())
		}
	}
	return 0
}

func seasonality(r int, ms int64) float64 {
	local := ms + regions[r].offset.Milliseconds()
	const day = 24 * 60 * 60 * 1000
	days := floorDiv(local, day)
	hour := float64(local-days*day) / (60 * 60 * 1000)
	f := 1 + dailyAmplitude*math.Cos(2*math.Pi*(hour-peakHour)/24)
	// 1970-01-01 was a Thursday: day 2 is Saturday, day 3 Sunday.
	if wd := floorMod(days, 7); wd == 2 || wd == 3 {
		f *= weekendFactor
	}
	return f
}

// SegmentRate is what the model is expected to produce for one segment
// around one instant.
type SegmentRate struct {
	Source, Region string
	// VisitorsPerHour is the rate of new visitors (first visits, that is
	// entities entering the visit→lead cohort) per hour at the instant,
	// after scale, seasonality and any volume drop. A share of 1% of them
	// carry no region and are attributed to region "unknown".
	VisitorsPerHour float64
	// LeadProbability is P(a visitor first touching at the instant ever
	// becomes a lead), after any conversion drop.
	LeadProbability float64
	// LeadWithinHour is P(lead within 1h of the first visit): the expected
	// visit→lead cohort conversion ratio at the default 1h horizon.
	LeadWithinHour float64
	// DealProbability is P(a lead ever becomes a deal); every deal comes
	// 1–25 days after its lead, inside the default 30d horizon.
	DealProbability float64
}

// Rates returns the expected rates of every segment (in Segments order)
// for visitors first touching at t under c: the numbers the processor's
// cohorts should converge to, for tests and for sizing demos.
func (c Config) Rates(t time.Time) []SegmentRate {
	scale := c.scale()
	ms := t.UnixMilli()
	out := make([]SegmentRate, 0, numSegments)
	for s := range numSegments {
		seg := segmentOf(s)
		r := SegmentRate{
			Source:          seg.Source,
			Region:          seg.Region,
			VisitorsPerHour: seg.VisitorsPerHour * scale * seasonality(s%numRegions, ms),
			LeadProbability: seg.LeadProbability,
			DealProbability: seg.DealProbability,
		}
		if d := c.Drop; d != nil && !t.Before(d.At) && d.matchesSegment(seg.Source, seg.Region) {
			// A drop constrained to campaigns hits only their share.
			share := d.campaignShare(seg.Campaigns)
			if d.Volume {
				r.VisitorsPerHour *= 1 - share + share*d.Factor
			} else {
				r.LeadProbability = (1-share)*r.LeadProbability + share*math.Min(1, r.LeadProbability*d.Factor)
			}
		}
		r.LeadWithinHour = r.LeadProbability * quickLeadShare
		out = append(out, r)
	}
	return out
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}

func floorMod(a, b int64) int64 { return a - floorDiv(a, b)*b }
