package main

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
)

// These tests hold the bounds of SPEC §5 against the real binary and a
// broker process: the values of a dimension are capped whatever the
// producers send, memory stays bounded by the configuration however many
// entities there are, and the store stops growing once event time passes
// the retention and entity TTL. The broker runs in its own process, so the
// memory measured (VmHWM of /proc/<pid>/status) is funnelwatch's alone.
// docs/reliability.md lists the figures.

// limitsConfig is the configuration the limit tests share, apart from what
// each one sets in extra: a store whose entity cache is far smaller than the
// entities fed, so that the memory bound is the configuration's and not the
// input's.
const limitsConfig = `store: {dir: %s, entity_cache: 100000}
flush_interval: 200ms
`

// goMemLimit is the GOMEMLIMIT the funnelwatch processes run with, as the
// deployment sets it from the container's memory limit; rssBound is the
// peak resident memory allowed to them. docs/reliability.md ("Memory and
// cardinality") derives both from the configuration above and the store's
// fixed sizes: about 150 MiB live at 5 million entities (32 MiB block
// cache, two 16 MiB memtables, 100,000 cached entities, a 16 MiB entity
// filter plus the old one while it is rebuilt, three partition readers'
// queues), under a limit of 256 MiB, plus 64 MiB for what the limit does
// not cover: the mapped binary, and overshoot (the limit is soft).
const (
	goMemLimit = 256 << 20
	rssBound   = goMemLimit + 64<<20
)

// procMemory returns VmHWM (the peak) and VmRSS of a process, in bytes.
func procMemory(t testing.TB, pid int) (peak, rss int64) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read the memory of process %d: %v", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (name != "VmHWM" && name != "VmRSS") {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			t.Fatalf("parse %s of process %d: %q", name, pid, v)
		}
		if name == "VmHWM" {
			peak = kb << 10
		} else {
			rss = kb << 10
		}
	}
	if peak == 0 || rss == 0 {
		t.Fatalf("no VmHWM or VmRSS in /proc/%d/status", pid)
	}
	return peak, rss
}

// produceGenerated produces the n records gen makes, in order, in large
// acknowledged batches without holding them all in memory. Records of one
// key keep their order (one partition, written in sequence). Batches stay
// at 1 MiB, well below what the broker refuses (a 16 MiB batch is), which
// would go unnoticed without acknowledgements.
func produceGenerated(t testing.TB, brokers []string, topic string, n int, gen func(i int) kafka.Message) {
	t.Helper()
	w := &kafka.Writer{Addr: kafka.TCP(brokers...), Topic: topic, Balancer: &kafka.Hash{}, AllowAutoTopicCreation: true,
		RequiredAcks: kafka.RequireOne, BatchTimeout: 5 * time.Millisecond, BatchSize: 10_000, BatchBytes: 1 << 20}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const chunk = 30_000
	msgs := make([]kafka.Message, 0, chunk)
	for i := 0; i < n; {
		msgs = msgs[:0]
		for j := i; j < min(n, i+chunk); j++ {
			msgs = append(msgs, gen(j))
		}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("produce: %v", err)
			}
			time.Sleep(100 * time.Millisecond) // the topic is being created
			continue
		}
		i += len(msgs)
	}
}

// waitConsumed waits until p consumed n records and one more flush wrote
// them.
func waitConsumed(t testing.TB, p *proc, n int, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("consume %d records", n), func() bool { return consumedOf(p.addr) >= n })
	time.Sleep(500 * time.Millisecond)
}

// limitsProc starts funnelwatch on its own topic of brokers with the
// shared limits configuration plus extra, and returns it with its store
// directory.
func limitsProc(t *testing.T, brokers []string, topic, extra string) (*proc, string) {
	t.Helper()
	dir := t.TempDir()
	storeDir := filepath.Join(dir, "store")
	addr := freePort(t)
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})
	cfg := writeConfig(t, dir, brokers, topic, addr, fmt.Sprintf(limitsConfig, storeDir)+
		fmt.Sprintf("kafka:\n  brokers: [%s]\n  group: %s\n  topics: [{name: %s}]\n  session_timeout: 1s\n  heartbeat_interval: 200ms\n  rebalance_timeout: 3s\n",
			strings.Join(brokers, ", "), topic, topic)+extra)
	return startProc(t, cfg, addr, logs), storeDir
}

// dirBytes is the size of the files under dir: all of them, and the
// sstables alone (the data, without the write-ahead logs Pebble
// preallocates and recycles).
func dirBytes(t testing.TB, dir string) (all, sst int64) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return nil // removed meanwhile (a compaction)
		}
		all += info.Size()
		if strings.HasSuffix(path, ".sst") {
			sst += info.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("size of %s: %v", dir, err)
	}
	return all, sst
}

// seriesLabelValues returns the distinct values of label in the series of
// metric whose labels include all of match.
func seriesLabelValues(t testing.TB, addr, metric, label string, match ...string) map[string]bool {
	t.Helper()
	lines, err := scrape(addr, metric+"{")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, l := range lines {
		if !strings.HasPrefix(l, metric+"{") || !containsAll(l, match) {
			continue
		}
		i := strings.Index(l, label+`="`)
		if i < 0 {
			continue
		}
		v := l[i+len(label)+2:]
		out[v[:strings.IndexByte(v, '"')]] = true
	}
	return out
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

var limitsBase = time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC) // a Monday

func eventTime(d time.Duration) string { return limitsBase.Add(d).Format(time.RFC3339Nano) }

// TestLimits feeds one funnelwatch process per bound, all on one broker
// process.
func TestLimits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary; produces millions of records")
	}
	brokers := startBroker(t, 3)
	// As deployed (deploy/): the Go runtime is told the container's memory
	// limit. Only the funnelwatch processes started from here on read it.
	t.Setenv("GOMEMLIMIT", strconv.Itoa(goMemLimit))

	// A million distinct values of one dimension: the dictionary admits
	// max_values of them, first come; every first touch with another new
	// value is segment "other" and counted as an overflow.
	t.Run("DimensionValues", func(t *testing.T) {
		const (
			maxValues = 100
			// Of n records after the first maxValues (each a new value of a
			// new entity, all admitted), one in ten is a new entity with an
			// admitted value, one in ten a lead of the entity before it
			// with a new value (not a first touch: its segment is frozen),
			// eight in ten new entities with new values: overflows.
			n            = 1_111_000
			wantValues   = maxValues + n*9/10 // distinct values sent
			wantOverflow = n * 8 / 10
			wantEntities = maxValues + n*9/10
		)
		start := time.Now()
		p, _ := limitsProc(t, brokers, "values", "segments: {dimensions: [source], breakdowns: [[], [source]], max_values: 100}\n")
		produceGenerated(t, brokers, "values", maxValues, func(i int) kafka.Message {
			ent := fmt.Sprintf("a%d", i)
			return kafka.Message{Key: []byte(ent), Value: fmt.Appendf(nil, `{"type":"visit","entity":%q,"time":%q,"segment":{"source":"v%d"}}`, ent, eventTime(0), i)}
		})
		waitConsumed(t, p, maxValues, 60*time.Second)
		produceGenerated(t, brokers, "values", n, func(i int) kafka.Message {
			ts := eventTime(time.Duration(i) * 50 * time.Millisecond)
			var v []byte
			ent := fmt.Sprintf("b%d", i)
			switch i % 10 {
			case 0:
				v = fmt.Appendf(nil, `{"type":"visit","entity":%q,"time":%q,"segment":{"source":"v%d"}}`, ent, ts, i/10%maxValues)
			case 1:
				ent = fmt.Sprintf("b%d", i-1)
				v = fmt.Appendf(nil, `{"type":"lead","entity":%q,"time":%q,"segment":{"source":"w%d"}}`, ent, ts, i)
			default:
				v = fmt.Appendf(nil, `{"type":"visit","entity":%q,"time":%q,"segment":{"source":"w%d"}}`, ent, ts, i)
			}
			return kafka.Message{Key: []byte(ent), Value: v}
		})
		produced := time.Since(start)
		waitConsumed(t, p, maxValues+n, 3*time.Minute)
		peak, rss := procMemory(t, p.cmd.Process.Pid)
		values := seriesLabelValues(t, p.addr, "funnel_events_total", "source", `breakdown="source"`)
		overflow := metricValue(p.addr, "funnel_dimension_overflow_total")
		entities := metricValue(p.addr, "funnel_entities_tracked")
		series, err := scrape(p.addr, "funnel_")
		if err != nil {
			t.Fatal(err)
		}
		p.terminate(t)
		t.Logf("%d distinct values of source in %d records (produced in %v, all consumed in %v): %d source values exported, overflow %v, %v entities, %d funnel_ series; peak RSS %d MiB, RSS at the end %d MiB",
			wantValues, maxValues+n, produced.Round(time.Second), time.Since(start).Round(time.Second), len(values), overflow, entities, len(series), peak>>20, rss>>20)

		if len(values) != maxValues+1 || !values["other"] {
			t.Errorf("breakdown=source exports %d source values; want the %d first ones plus other", len(values), maxValues)
		}
		for i := range maxValues {
			if !values[fmt.Sprintf("v%d", i)] {
				t.Errorf("source v%d (admitted first) is not exported", i)
			}
		}
		if overflow != wantOverflow {
			t.Errorf("funnel_dimension_overflow_total = %v; want %d (first touches with a value not admitted)", overflow, wantOverflow)
		}
		if entities != wantEntities {
			t.Errorf("funnel_entities_tracked = %v; want %d", entities, wantEntities)
		}
		if peak > rssBound {
			t.Errorf("peak RSS %d MiB; want at most %d MiB", peak>>20, rssBound>>20)
		}
	})

	// Five million entities, each seen once, through a cache of 100,000:
	// memory is bounded by the configuration, not by the entities.
	t.Run("EntityMemory", func(t *testing.T) {
		const n = 5_000_000
		start := time.Now()
		p, storeDir := limitsProc(t, brokers, "entities", "segments: {dimensions: [source], breakdowns: [[], [source]]}\n")
		sources := []string{"ads", "seo", "social", "email"}
		// Built by hand rather than with fmt: under the race detector (CI)
		// formatting five million records would take minutes.
		var sec int
		ts := eventTime(0)
		produceGenerated(t, brokers, "entities", n, func(i int) kafka.Message {
			if i/100 != sec { // a hundred records a second of event time
				sec = i / 100
				ts = eventTime(time.Duration(sec) * time.Second)
			}
			key := strconv.AppendInt(nil, int64(i), 10)
			v := make([]byte, 0, 96)
			v = append(v, `{"type":"visit","entity":"`...)
			v = append(v, key...)
			v = append(v, `","time":"`...)
			v = append(v, ts...)
			v = append(v, `","segment":{"source":"`...)
			v = append(v, sources[i%len(sources)]...)
			v = append(v, `"}}`...)
			return kafka.Message{Key: key, Value: v}
		})
		produced := time.Since(start)
		waitConsumed(t, p, n, 4*time.Minute)
		peak, rss := procMemory(t, p.cmd.Process.Pid)
		entities := metricValue(p.addr, "funnel_entities_tracked")
		disk := metricValue(p.addr, "funnel_store_disk_bytes")
		heap := metricValue(p.addr, "go_memstats_heap_inuse_bytes")
		goSys := metricValue(p.addr, "go_memstats_sys_bytes")
		goal := metricValue(p.addr, "go_memstats_next_gc_bytes")
		p.terminate(t)
		all, sst := dirBytes(t, storeDir)
		t.Logf("%d entities (produced in %v, all consumed in %v): funnel_entities_tracked %v; peak RSS %d MiB, RSS at the end %d MiB (Go heap in use %.0f MiB, next GC at %.0f MiB, from the OS %.0f MiB); store %d MiB (sstables %d MiB, funnel_store_disk_bytes %.0f MiB)",
			n, produced.Round(time.Second), time.Since(start).Round(time.Second), entities, peak>>20, rss>>20, heap/(1<<20), goal/(1<<20), goSys/(1<<20), all>>20, sst>>20, disk/(1<<20))
		if entities != n {
			t.Errorf("funnel_entities_tracked = %v; want %d", entities, n)
		}
		if peak > rssBound {
			t.Errorf("peak RSS %d MiB; want at most %d MiB", peak>>20, rssBound>>20)
		}
	})

	// Ten weeks of event time with a retention of about eight days and an
	// entity TTL of one day: the store must stop growing once the
	// retention has passed, and expired entities must leave it.
	t.Run("DiskOverTenWeeks", func(t *testing.T) {
		const (
			weeks = 10
			// perHour new entities visit every hour of event time; half of
			// them become leads, a quarter deals, within the hour.
			perHour = 100
		)
		start := time.Now()
		p, storeDir := limitsProc(t, brokers, "weeks", `segments: {dimensions: [source, region], max_values: 20}
funnel:
  stages: [visit, lead, deal]
  steps: [{from: visit, to: lead, horizon: 1h, alert_window: 1h}, {from: lead, to: deal, horizon: 1h, alert_window: 1h}]
windows: [1h, 1d]
alerts: {baseline_weeks: 1}
time: {clock: event, entity_ttl: 1d}
`)
		sources := []string{"ads", "seo", "social", "email", "partner", "direct"}
		regions := []string{"emea", "na", "apac", "latam"}
		type sample struct {
			disk, all, sst int64
			entities       float64
		}
		var samples []sample
		consumed := 0
		for w := range weeks {
			var msgs []kafka.Message
			for h := w * 7 * 24; h < (w+1)*7*24; h++ {
				for e := range perHour {
					ent := fmt.Sprintf("h%d-%d", h, e)
					at := time.Duration(h)*time.Hour + time.Duration(e)*time.Hour/perHour
					msgs = append(msgs, kafka.Message{Key: []byte(ent), Value: fmt.Appendf(nil, `{"type":"visit","entity":%q,"time":%q,"segment":{"source":%q,"region":%q}}`,
						ent, eventTime(at), sources[(h+e)%len(sources)], regions[e%len(regions)])})
					if e%2 == 0 {
						msgs = append(msgs, kafka.Message{Key: []byte(ent), Value: fmt.Appendf(nil, `{"type":"lead","entity":%q,"time":%q}`, ent, eventTime(at+10*time.Minute))})
					}
					if e%4 == 0 {
						msgs = append(msgs, kafka.Message{Key: []byte(ent), Value: fmt.Appendf(nil, `{"type":"deal","entity":%q,"time":%q,"value":100}`, ent, eventTime(at+20*time.Minute))})
					}
				}
			}
			produceGenerated(t, brokers, "weeks", len(msgs), func(i int) kafka.Message { return msgs[i] })
			consumed += len(msgs)
			waitConsumed(t, p, consumed, 2*time.Minute)
			all, sst := dirBytes(t, storeDir)
			samples = append(samples, sample{int64(metricValue(p.addr, "funnel_store_disk_bytes")), all, sst, metricValue(p.addr, "funnel_entities_tracked")})
		}
		var report []string
		for w, s := range samples {
			report = append(report, fmt.Sprintf("week %2d: funnel_store_disk_bytes %6.1f MiB, files %6.1f MiB, sstables %6.1f MiB, entities %v",
				w+1, float64(s.disk)/(1<<20), float64(s.all)/(1<<20), float64(s.sst)/(1<<20), s.entities))
		}
		t.Logf("%d weeks of event time, %d records, in %v:\n%s", weeks, consumed, time.Since(start).Round(time.Second), strings.Join(report, "\n"))

		// Then three quiet days, one event a day (the event clock refuses
		// events more than max_future, a day, ahead): every entity but the
		// last two has expired.
		for d := 1; d <= 3; d++ {
			produceGenerated(t, brokers, "weeks", 1, func(int) kafka.Message {
				ent := fmt.Sprintf("quiet%d", d)
				return kafka.Message{Key: []byte(ent), Value: fmt.Appendf(nil, `{"type":"visit","entity":%q,"time":%q}`, ent, eventTime(weeks*7*24*time.Hour+time.Duration(d)*23*time.Hour))}
			})
		}
		consumed += 3
		waitConsumed(t, p, consumed, time.Minute)
		var left float64
		waitFor(t, 30*time.Second, "expired entities deleted", func() bool {
			left = metricValue(p.addr, "funnel_entities_tracked")
			return left == 2
		})
		peak, _ := procMemory(t, p.cmd.Process.Pid)
		p.terminate(t)
		t.Logf("three quiet days later: funnel_entities_tracked %v; peak RSS %d MiB", left, peak>>20)

		// The data (sstables) must plateau once the retention (8 days) has
		// passed: at this scale they are a few MiB and move with
		// compactions, so compare the largest of weeks 6 to 10 with the
		// largest of weeks 2 to 5. Without deletion they would grow by a
		// week's worth every week. The rest of the store is its write-ahead
		// log, which grows until the 16 MiB memtable is flushed and is then
		// recycled: bounded by the memtable size, not by time.
		maxSST := func(from, to int) int64 {
			return slices.MaxFunc(samples[from-1:to], func(a, b sample) int { return cmp.Compare(a.sst, b.sst) }).sst
		}
		// The 4 MiB allow for flushed memtables not compacted yet (seen:
		// 6.6 MiB in week 9 against 2.1 MiB at most in weeks 2 to 5, then
		// 3.6 MiB in week 10): at this scale compactions move the
		// sstables by as much as a few weeks of buckets.
		early, late := maxSST(2, 5), maxSST(6, weeks)
		if late > 2*early+4<<20 {
			t.Errorf("sstables reached %d bytes in weeks 6 to 10; want at most 2 × %d (the largest in weeks 2 to 5) + 4 MiB", late, early)
		}
		const walBound = 2*16<<20 + 4<<20 // two memtables' logs, the manifest and options
		for w, s := range samples {
			if s.disk-s.sst > walBound {
				t.Errorf("week %d: funnel_store_disk_bytes %d is %d bytes more than the sstables; want at most %d", w+1, s.disk, s.disk-s.sst, walBound)
			}
		}
		t.Logf("sstables: largest %.1f MiB in weeks 2-5, %.1f MiB in weeks 6-10; funnel_store_disk_bytes after week 10 / after week 4 = %.2f",
			float64(early)/(1<<20), float64(late)/(1<<20), float64(samples[weeks-1].disk)/float64(samples[3].disk))
		// An entity lives a day past its last event, plus the time the
		// sweep takes to reach it.
		for w, s := range samples {
			if s.entities > 2*24*perHour {
				t.Errorf("week %d: funnel_entities_tracked = %v; want at most 2 days of entities (%d)", w+1, s.entities, 2*24*perHour)
			}
		}
		if peak > rssBound {
			t.Errorf("peak RSS %d MiB; want at most %d MiB", peak>>20, rssBound>>20)
		}
	})
}
