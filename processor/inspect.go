package processor

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/funnelwatch/funnelwatch/store"
)

// Inspect prints what a store holds — clock, offsets, counters, entities
// and every segment's totals and current degradation — without consuming.
// It only reads, so it is safe on a copy or backup of a store (not on a
// store a running funnelwatch has open: Pebble locks it).
func Inspect(w io.Writer, cfg Config, st *store.Store) error {
	p, err := New(cfg, st, Options{})
	if err != nil {
		return err
	}
	snap := p.Snapshot()
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "clock\t%s\t(%s)\n", snap.Clock.Format(time.RFC3339), cfg.Time.Clock)
	if p.hasHistory {
		fmt.Fprintf(tw, "history starts\t%s\n", time.UnixMilli(p.historyStart*p.bucketMs).UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(tw, "last event\t%s\n", time.UnixMilli(p.lastEvent).UTC().Format(time.RFC3339))
	fmt.Fprintf(tw, "entities\t%d\n", p.entityCount)
	fmt.Fprintf(tw, "disk bytes\t%d\n", st.DiskBytes())
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "TOPIC\tPARTITION\tSTORED OFFSET\tCONSUMED\tAPPLIED\tDUPLICATE\tLATE\tINVALID")
	tps := make([]store.TopicPartition, 0, len(p.parts))
	for tp := range p.parts {
		tps = append(tps, tp)
	}
	sort.Slice(tps, func(i, j int) bool {
		if tps[i].Topic != tps[j].Topic {
			return tps[i].Topic < tps[j].Topic
		}
		return tps[i].Partition < tps[j].Partition
	})
	for _, tp := range tps {
		c := p.parts[tp].counts
		var invalid int64
		for _, x := range c.invalid {
			invalid += x
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", tp.Topic, tp.Partition, p.parts[tp].stored, c.consumed, c.applied, c.duplicate, c.late, invalid)
	}
	fmt.Fprintln(tw)
	fmt.Fprintf(tw, "SEGMENT\tEVENTS TOTAL (%s)\tDEGRADED\n", strings.Join(snap.Stages, ", "))
	for _, s := range snap.Segments {
		name := s.Breakdown
		for _, l := range s.Labels {
			name += fmt.Sprintf(" %s=%s", l.Name, l.Value)
		}
		var degraded []string
		for _, a := range s.Alerts {
			if a.Degraded {
				degraded = append(degraded, a.From+"->"+a.To)
			}
		}
		if s.Volume.Degraded {
			degraded = append(degraded, "volume")
		}
		fmt.Fprintf(tw, "%s\t%v\t%s\n", name, s.EventsTotal, strings.Join(degraded, ","))
	}
	return tw.Flush()
}
