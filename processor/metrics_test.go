package processor_test

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/funnelwatch/funnelwatch/processor"
)

// collectors is a Registerer that keeps what is registered, so that a test
// can call Collect itself and see the order of the series.
type collectors []prometheus.Collector

func (c *collectors) Register(x prometheus.Collector) error { *c = append(*c, x); return nil }
func (c *collectors) MustRegister(xs ...prometheus.Collector) {
	for _, x := range xs {
		_ = c.Register(x)
	}
}
func (c *collectors) Unregister(prometheus.Collector) bool { return false }

// TestCollectSendsSorted checks that the processor sends each per-segment
// family's series (thousands of them, where the registry's sort is
// expensive; the other families have a handful) in the order the registry sorts them into (number of
// labels, then label values in label-name order), so that the registry's
// sort finds them sorted. Dimension names that sort before "breakdown" and
// after "window" move the dimension labels to either end.
func TestCollectSendsSorted(t *testing.T) {
	for _, dims := range [][]string{{"source", "region"}, {"app", "zone"}, {"zone", "app"}} {
		t.Run(strings.Join(dims, ","), func(t *testing.T) {
			cfg := benchConfig(t)
			cfg.Segments.Dimensions = dims
			cfg.Segments.Breakdowns = [][]string{{}, {dims[0]}, {dims[1]}, dims}
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			var regs collectors
			p, err := processor.New(cfg, diskStore(t), processor.Options{Registerer: &regs})
			if err != nil {
				t.Fatal(err)
			}
			b := &processor.Batch{Topic: "events"}
			start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC).UnixMilli()
			// Values that sort differently as strings and as numbers.
			for i := range 60 {
				id := []byte("e-" + strconv.Itoa(i))
				d0, d1 := []byte("v"+strconv.Itoa(i%12)), []byte(strconv.Itoa(i%5*7))
				for st := range 1 + i%3 {
					b.Records = append(b.Records, processor.Record{Offset: int64(len(b.Records)), Reason: processor.Applied, Event: processor.Event{
						Stage: st, Entity: id, Time: start + int64(i)*3600_000 + int64(st)*60_000, HasID: true, ID: uint64(len(b.Records)),
						Dims: [][]byte{d0, d1},
					}})
				}
			}
			p.ApplyBatch(b)
			if err := p.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}

			ch := make(chan prometheus.Metric, 1<<16)
			for _, c := range regs {
				c.Collect(ch)
			}
			close(ch)
			families := map[string][]*dto.Metric{}
			for m := range ch {
				var pb dto.Metric
				if err := m.Write(&pb); err != nil {
					t.Fatal(err)
				}
				name := m.Desc().String()
				name = name[strings.Index(name, `fqName: "`)+9:]
				name = name[:strings.IndexByte(name, '"')]
				families[name] = append(families[name], &pb)
			}
			if len(families["funnel_window_events"]) == 0 {
				t.Fatalf("no funnel_window_events series among %d families", len(families))
			}
			for name, ms := range families {
				perSegment := slices.ContainsFunc(ms[0].GetLabel(), func(lp *dto.LabelPair) bool { return lp.GetName() == "breakdown" })
				if !perSegment || name == "funnel_time_to_convert_seconds" {
					continue // a handful of series: sorting them costs nothing
				}
				for i := 1; i < len(ms); i++ {
					if !less(ms[i-1], ms[i]) {
						t.Errorf("%s: series %d %v sent after %v; want the registry's order", name, i, ms[i].GetLabel(), ms[i-1].GetLabel())
						break
					}
				}
			}
		})
	}
}

// less is the registry's order of the series of a family: by number of
// labels, then by label values in label-name order.
func less(a, b *dto.Metric) bool {
	if len(a.Label) != len(b.Label) {
		return len(a.Label) < len(b.Label)
	}
	for i, lp := range a.Label {
		if va, vb := lp.GetValue(), b.Label[i].GetValue(); va != vb {
			return va < vb
		}
	}
	return false
}
