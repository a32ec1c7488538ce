package traffic

import (
	"strconv"
	"time"
)

var kindNames = [...]string{kindVisit: "visit", kindLead: "lead", kindDeal: "deal"}

// unknownType is the type of the invalid records that name no stage.
const unknownType = "pageview"

// encoder keeps what formatting times needs between records.
type encoder struct {
	day    int64    // unix day of prefix
	prefix [11]byte // "2006-01-02T" of day
	valid  bool
}

// encode renders e into the model's buffer, key first, and returns the
// record; the slices are valid until the next call.
func (m *Model) encode(e *event) Record {
	b := append(m.buf[:0], "u-"...)
	b = appendHex64(b, mix(e.entity+m.idSalt))
	k := len(b)
	t := e.at - int64(e.lag)
	if e.kind == kindInvalid {
		b = m.appendInvalid(b, e, k, t)
	} else {
		b = m.appendEvent(b, e, kindNames[e.kind], true, k, t)
	}
	m.buf = b
	return Record{Key: b[:k:k], Value: b[k:], Time: time.UnixMilli(t)}
}

// appendEvent appends the canonical JSON of e; the entity id is b[:k].
func (m *Model) appendEvent(b []byte, e *event, typ string, entity bool, k int, t int64) []byte {
	b = append(b, '{')
	if e.flags&flagID != 0 {
		b = append(b, `"id":"e-`...)
		b = appendHex64(b, mix(e.id+m.eventSalt))
		b = append(b, `",`...)
	}
	b = append(b, `"type":"`...)
	b = append(b, typ...)
	b = append(b, '"')
	if entity {
		b = append(b, `,"entity":"`...)
		b = append(b, b[:k]...)
		b = append(b, '"')
	}
	if e.flags&flagTime != 0 {
		b = append(b, `,"time":"`...)
		b = m.enc.appendTime(b, t)
		b = append(b, '"')
	}
	if e.attr != attrNone {
		src, reg := &sources[int(e.seg)/numRegions], &regions[int(e.seg)%numRegions]
		b = append(b, `,"segment":{`...)
		switch e.attr {
		case attrFull, attrNoRegion:
			b = append(b, `"source":"`...)
			b = append(b, src.name...)
			b = append(b, '"')
			if e.camp != 0 {
				b = append(b, `,"campaign":"`...)
				b = append(b, src.campaigns[e.camp-1]...)
				b = append(b, '"')
			}
			if e.attr == attrFull {
				b = append(b, `,"region":"`...)
				b = append(b, reg.name...)
				b = append(b, '"')
			}
		case attrOther:
			b = append(b, `"source":"`...)
			b = append(b, sources[e.alt].name...)
			b = append(b, `","region":"`...)
			b = append(b, reg.name...)
			b = append(b, '"')
		case attrCampaign:
			b = append(b, `"campaign":"`...)
			b = append(b, src.campaigns[e.camp-1]...)
			b = append(b, '"')
		}
		b = append(b, '}')
	}
	if e.flags&flagValue != 0 {
		b = append(b, `,"value":`...)
		b = strconv.AppendUint(b, uint64(e.value), 10)
	}
	return append(b, '}')
}

// appendInvalid appends an invalid record of the variant e.attr built from
// the event it accompanies (kind e.alt).
func (m *Model) appendInvalid(b []byte, e *event, k int, t int64) []byte {
	ev := *e
	ev.flags |= flagID | flagTime
	switch e.attr {
	case invalidMalformed:
		b = m.appendEvent(b, &ev, kindNames[e.alt], true, k, t)
		// Any proper prefix of a JSON object is malformed.
		return b[:k+(len(b)-k)*2/3]
	case invalidNoEntity:
		ev.attr = attrNone
		return m.appendEvent(b, &ev, kindNames[e.alt], false, k, t)
	default:
		return m.appendEvent(b, &ev, unknownType, true, k, t)
	}
}

const hexDigits = "0123456789abcdef"

func appendHex64(b []byte, x uint64) []byte {
	var d [16]byte
	for i := 15; i >= 0; i-- {
		d[i] = hexDigits[x&0xf]
		x >>= 4
	}
	return append(b, d[:]...)
}

// appendTime appends t (unix ms) as RFC 3339 UTC with milliseconds,
// e.g. 2026-11-20T10:15:00.250Z; the date is computed once a day.
func (c *encoder) appendTime(b []byte, t int64) []byte {
	const dayMs = 24 * hourMs
	day := floorDiv(t, dayMs)
	if !c.valid || day != c.day {
		c.day, c.valid = day, true
		copy(c.prefix[:], time.UnixMilli(day*dayMs).UTC().AppendFormat(nil, "2006-01-02T"))
	}
	b = append(b, c.prefix[:]...)
	ms := t - day*dayMs
	h, mi, s, f := ms/hourMs, ms/minuteMs%60, ms/1000%60, ms%1000
	return append(b,
		byte('0'+h/10), byte('0'+h%10), ':',
		byte('0'+mi/10), byte('0'+mi%10), ':',
		byte('0'+s/10), byte('0'+s%10), '.',
		byte('0'+f/100), byte('0'+f/10%10), byte('0'+f%10), 'Z')
}
