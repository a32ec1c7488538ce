package processor

import (
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/cespare/xxhash/v2"
	"github.com/valyala/fastjson"
)

// Reason is the outcome of one record: applied, duplicate, late, or invalid
// for a named reason (SPEC §2.2). Every consumed record ends in exactly one.
type Reason uint8

// Outcomes. The invalid reasons are the ones from ReasonMalformedJSON on.
const (
	Applied Reason = iota
	Duplicate
	Late
	ReasonMalformedJSON
	ReasonTooLarge
	ReasonMissingEntity
	ReasonBadEntity
	ReasonMissingType
	ReasonUnknownType
	ReasonBadTime
	ReasonFutureTime
	ReasonBadValue
	numReasons
)

var reasonNames = [numReasons]string{
	Applied:             "applied",
	Duplicate:           "duplicate",
	Late:                "late",
	ReasonMalformedJSON: "malformed_json",
	ReasonTooLarge:      "too_large",
	ReasonMissingEntity: "missing_entity",
	ReasonBadEntity:     "bad_entity",
	ReasonMissingType:   "missing_type",
	ReasonUnknownType:   "unknown_type",
	ReasonBadTime:       "bad_time",
	ReasonFutureTime:    "future_time",
	ReasonBadValue:      "bad_value",
}

// String returns the reason label used in funnel_events_invalid_total.
func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Invalid reports whether r is an invalid-record reason.
func (r Reason) Invalid() bool { return r >= ReasonMalformedJSON && r < numReasons }

// InvalidReasons lists every invalid-record reason.
func InvalidReasons() []Reason {
	var rs []Reason
	for r := ReasonMalformedJSON; r < numReasons; r++ {
		rs = append(rs, r)
	}
	return rs
}

const (
	// maxEntityBytes bounds entity ids: they are part of every store key
	// of the entity.
	maxEntityBytes = 512
	// maxAbsValue bounds |value| so that sums of values kept in thousandths
	// fit an int64 for millions of events per bucket.
	maxAbsValue = 1e12
	// valueScale is the fixed-point scale of stored values: sums are exact
	// (and so equal after any crash) up to a thousandth.
	valueScale = 1000
)

// Event is a decoded record. Its byte slices point into memory owned by the
// Decoder (or copied into a batch) and must not be kept.
type Event struct {
	Stage int
	// Entity is the entity id.
	Entity []byte
	// ID is a hash of the event id; HasID is false when the event had none.
	ID    uint64
	HasID bool
	// Time is the event time in Unix milliseconds.
	Time int64
	// Value is the event's value in thousandths.
	Value int64
	// Dims holds the raw value of each configured dimension, nil when
	// absent; Invalid has bit i set when dimension i is present but not a
	// usable value (an object, an array, invalid UTF-8, too long).
	Dims    [][]byte
	Invalid uint32
}

// Decoder turns record values into Events according to the events section
// of the config. A Decoder is not safe for concurrent use; make one per
// goroutine with NewDecoder.
type Decoder struct {
	p        fastjson.Parser
	maxBytes int
	id       []string
	typ      []string
	entity   []string
	time     []string
	value    []string
	dims     [][]string
	types    map[string]int
	scratch  []byte
}

// NewDecoder returns a decoder for cfg, which must be valid.
func NewDecoder(cfg *Config) *Decoder {
	f := cfg.Events.Fields
	d := &Decoder{
		maxBytes: cfg.Events.MaxRecordBytes,
		id:       pointer(f.ID),
		typ:      pointer(f.Type),
		entity:   pointer(f.Entity),
		time:     pointer(f.Time),
		value:    pointer(f.Value),
		types:    map[string]int{},
	}
	for i, s := range cfg.Funnel.Stages {
		d.types[s] = i
	}
	for name, stage := range cfg.Events.TypeNames {
		for i, s := range cfg.Funnel.Stages {
			if s == stage {
				d.types[name] = i
			}
		}
	}
	seg := pointer(f.Segment)
	for _, dim := range cfg.Segments.Dimensions {
		if p, ok := cfg.Events.DimensionFields[dim]; ok {
			d.dims = append(d.dims, pointer(p))
		} else if seg != nil {
			d.dims = append(d.dims, append(seg[:len(seg):len(seg)], dim))
		} else {
			d.dims = append(d.dims, nil)
		}
	}
	return d
}

// pointer splits a JSON pointer (RFC 6901) into the keys fastjson takes. An
// empty pointer means the field is not mapped.
func pointer(p string) []string {
	if p == "" {
		return nil
	}
	keys := strings.Split(p[1:], "/")
	for i, k := range keys {
		keys[i] = strings.ReplaceAll(strings.ReplaceAll(k, "~1", "/"), "~0", "~")
	}
	return keys
}

// Decode decodes a record value into ev. topicStage is the stage every
// record of the topic has, or -1; recordTime is the Kafka record timestamp,
// used when the event has no time. It returns Applied when ev is usable, or
// the invalid reason. ev's slices are valid until the next call.
func (d *Decoder) Decode(value []byte, topicStage int, recordTime time.Time, ev *Event) Reason {
	if len(value) > d.maxBytes {
		return ReasonTooLarge
	}
	v, err := d.p.ParseBytes(value)
	if err != nil || v.Type() != fastjson.TypeObject {
		return ReasonMalformedJSON
	}
	d.scratch = d.scratch[:0]

	ent := lookup(v, d.entity)
	switch {
	case ent == nil || ent.Type() == fastjson.TypeNull:
		return ReasonMissingEntity
	case ent.Type() == fastjson.TypeString:
		ev.Entity = ent.GetStringBytes()
	case ent.Type() == fastjson.TypeNumber:
		d.scratch = ent.MarshalTo(d.scratch)
		ev.Entity = d.scratch
	default:
		return ReasonBadEntity
	}
	if len(ev.Entity) == 0 {
		return ReasonMissingEntity
	}
	if len(ev.Entity) > maxEntityBytes {
		return ReasonBadEntity
	}

	if topicStage >= 0 {
		ev.Stage = topicStage
	} else {
		t := lookup(v, d.typ)
		if t == nil || t.Type() == fastjson.TypeNull {
			return ReasonMissingType
		}
		if t.Type() != fastjson.TypeString {
			return ReasonUnknownType
		}
		stage, ok := d.types[string(t.GetStringBytes())]
		if !ok {
			return ReasonUnknownType
		}
		ev.Stage = stage
	}

	ev.HasID, ev.ID = false, 0
	if id := lookup(v, d.id); id != nil {
		switch id.Type() {
		case fastjson.TypeString:
			if b := id.GetStringBytes(); len(b) > 0 {
				ev.HasID, ev.ID = true, xxhash.Sum64(b)
			}
		case fastjson.TypeNumber:
			ev.HasID, ev.ID = true, xxhash.Sum64(id.MarshalTo(nil))
		}
	}

	tv := lookup(v, d.time)
	switch {
	case tv == nil || tv.Type() == fastjson.TypeNull:
		if recordTime.IsZero() || recordTime.UnixMilli() <= 0 {
			return ReasonBadTime
		}
		ev.Time = recordTime.UnixMilli()
	case tv.Type() == fastjson.TypeString:
		t, err := time.Parse(time.RFC3339Nano, string(tv.GetStringBytes()))
		if err != nil || t.UnixMilli() <= 0 {
			return ReasonBadTime
		}
		ev.Time = t.UnixMilli()
	default:
		return ReasonBadTime
	}

	ev.Value = 0
	if vv := lookup(v, d.value); vv != nil && vv.Type() != fastjson.TypeNull {
		f, err := vv.Float64()
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) > maxAbsValue {
			return ReasonBadValue
		}
		ev.Value = int64(math.Round(f * valueScale))
	}

	ev.Dims = ev.Dims[:0]
	ev.Invalid = 0
	for i, keys := range d.dims {
		dv := lookup(v, keys)
		var b []byte
		switch {
		case dv == nil || dv.Type() == fastjson.TypeNull:
		case dv.Type() == fastjson.TypeString:
			b = dv.GetStringBytes()
			if b == nil {
				b = []byte{}
			}
		case dv.Type() == fastjson.TypeNumber || dv.Type() == fastjson.TypeTrue || dv.Type() == fastjson.TypeFalse:
			b = dv.MarshalTo(nil)
		default:
			b = []byte{}
			ev.Invalid |= 1 << i
		}
		if b != nil && (len(b) > maxValueBytes || !utf8.Valid(b)) {
			ev.Invalid |= 1 << i
		}
		ev.Dims = append(ev.Dims, b)
	}
	return Applied
}

// maxValueBytes is the longest dimension value used verbatim (SPEC §3).
const maxValueBytes = 128

func lookup(v *fastjson.Value, keys []string) *fastjson.Value {
	if keys == nil {
		return nil
	}
	return v.Get(keys...)
}
