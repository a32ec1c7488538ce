package traffic

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/segmentio/kafka-go"
)

// Writer is where Stream writes records; *kafka.Writer satisfies it. The
// Writer should balance by key (kafka.Hash) so that one entity's records
// stay on one partition, in order.
type Writer interface {
	WriteMessages(ctx context.Context, msgs ...kafka.Message) error
}

// StreamOptions configures Stream.
type StreamOptions struct {
	// Backfill is the simulated history generated first, as fast as the
	// Writer takes it and ignoring Rate: the stream's [Position,
	// Position+Backfill). Set Config.Start to now − Backfill for a history
	// that ends now.
	Backfill time.Duration
	// Speed is how many simulated seconds pass per real second after the
	// backfill: 1 is real time, 60 a simulated minute per second. 0 runs
	// the simulated time as fast as the Writer (and Rate) allow.
	Speed float64
	// Rate caps the records written per real second after the backfill;
	// 0 is no cap. A cap below the model's rate at Speed makes the
	// simulated time fall behind.
	Rate float64
	// Count stops the stream after that many records; 0 is no limit.
	Count int64
	// Duration stops the stream after that much real time, backfill
	// included; 0 is no limit.
	Duration time.Duration
	// BatchSize is the most records per WriteMessages call (default 5000).
	BatchSize int
	// Progress, when set, is called about every ProgressInterval (default
	// 1s) and once more, with Done set, when Stream returns.
	Progress         func(Progress)
	ProgressInterval time.Duration
	// Now is the real clock (default time.Now).
	Now func() time.Time
}

// Progress reports how far a Stream got.
type Progress struct {
	// Phase is "backfill" or "live".
	Phase string
	// Records and Bytes count what the Writer accepted (key and value
	// bytes).
	Records, Bytes int64
	// SimTime is the simulated time generated up to.
	SimTime time.Time
	// Elapsed is the real time since Stream began.
	Elapsed time.Duration
	// Done is set on the last call.
	Done bool
}

const defaultBatchSize = 5000

// Validate reports every problem of the options at once.
func (o StreamOptions) Validate() error {
	var errs []error
	if o.Backfill < 0 {
		errs = append(errs, fmt.Errorf("backfill: %v is negative", o.Backfill))
	}
	if !(o.Speed >= 0) || math.IsInf(o.Speed, 0) {
		errs = append(errs, fmt.Errorf("speed: %v is not a finite number ≥ 0", o.Speed))
	}
	if !(o.Rate >= 0) || math.IsInf(o.Rate, 0) {
		errs = append(errs, fmt.Errorf("rate: %v is not a finite number ≥ 0", o.Rate))
	}
	if o.Count < 0 {
		errs = append(errs, fmt.Errorf("count: %d is negative", o.Count))
	}
	if o.Duration < 0 {
		errs = append(errs, fmt.Errorf("duration: %v is negative", o.Duration))
	}
	if o.BatchSize < 0 {
		errs = append(errs, fmt.Errorf("batch size: %d is negative", o.BatchSize))
	}
	if o.ProgressInterval < 0 {
		errs = append(errs, fmt.Errorf("progress interval: %v is negative", o.ProgressInterval))
	}
	return errors.Join(errs...)
}

// liveTick is how often the live phase catches up with the simulated
// clock: short enough that records leave within a fraction of a second.
const liveTick = 50 * time.Millisecond

// errStop ends Generate from emit when a stop condition is met.
var errStop = errors.New("stop")

// Stream writes the model's records to w: the backfill first, then the live
// stream paced by Speed and Rate, until Count records, Duration or the end
// of ctx. It returns nil when a stop condition is met and ctx.Err() when
// ctx ends first.
func (m *Model) Stream(ctx context.Context, w Writer, opts StreamOptions) error {
	if err := opts.Validate(); err != nil {
		return fmt.Errorf("stream options: %w", err)
	}
	if opts.BatchSize == 0 {
		opts.BatchSize = defaultBatchSize
	}
	if opts.ProgressInterval == 0 {
		opts.ProgressInterval = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &streamer{m: m, w: w, o: opts, phase: "backfill"}
	s.start = opts.Now()
	s.lastProgress = s.start
	s.batch = make([]kafka.Message, 0, min(opts.BatchSize, 1<<16))
	defer s.report(true)
	err := s.run(ctx)
	if errors.Is(err, errStop) {
		return nil
	}
	return err
}

type streamer struct {
	m     *Model
	w     Writer
	o     StreamOptions
	phase string

	batch []kafka.Message
	arena []byte

	records, bytes int64 // accepted by the Writer
	queued         int64 // generated, including the batch
	start          time.Time
	lastProgress   time.Time
	liveStart      time.Time
	liveQueued     int64     // queued before the live phase
	simTime        time.Time // of the last record queued
}

func (s *streamer) run(ctx context.Context) error {
	if s.o.Backfill > 0 {
		if err := s.m.Generate(s.m.Position().Add(s.o.Backfill), func(r Record) error { return s.emit(ctx, r) }); err != nil {
			return s.finish(ctx, err)
		}
		if err := s.flush(ctx); err != nil {
			return err
		}
	}
	s.phase = "live"
	s.liveStart = s.o.Now()
	s.liveQueued = s.queued
	simOrigin := s.m.Position()
	emit := func(r Record) error { return s.emit(ctx, r) }
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		now := s.o.Now()
		if err := s.checkDuration(now); err != nil {
			return s.finish(ctx, err)
		}
		// Unpaced, an hour at a time: emit flushes full batches and checks
		// the stop conditions in between.
		target := s.m.Position().Add(time.Hour)
		if s.o.Speed > 0 {
			target = simOrigin.Add(time.Duration(float64(now.Sub(s.liveStart)) * s.o.Speed))
		}
		if err := s.m.Generate(target, emit); err != nil {
			return s.finish(ctx, err)
		}
		if err := s.flush(ctx); err != nil {
			return err
		}
		s.maybeReport(s.o.Now())
		if s.o.Speed > 0 {
			if err := sleep(ctx, liveTick); err != nil {
				return err
			}
		}
	}
}

// finish flushes what is batched when a stop condition ended Generate.
func (s *streamer) finish(ctx context.Context, err error) error {
	if !errors.Is(err, errStop) {
		return err
	}
	if ferr := s.flush(ctx); ferr != nil {
		return ferr
	}
	return err
}

func (s *streamer) emit(ctx context.Context, r Record) error {
	if s.o.Count > 0 && s.queued >= s.o.Count {
		return errStop
	}
	if s.queued%256 == 0 {
		now := s.o.Now()
		if err := s.checkDuration(now); err != nil {
			return err
		}
		s.maybeReport(now)
	}
	if s.phase == "live" && s.o.Rate > 0 {
		if err := s.limit(ctx); err != nil {
			return err
		}
	}
	a := len(s.arena)
	s.arena = append(s.arena, r.Key...)
	b := len(s.arena)
	s.arena = append(s.arena, r.Value...)
	s.batch = append(s.batch, kafka.Message{Key: s.arena[a:b:b], Value: s.arena[b:], Time: r.Time})
	s.queued++
	if r.Time.After(s.simTime) {
		s.simTime = r.Time
	}
	if len(s.batch) >= s.o.BatchSize {
		return s.flush(ctx)
	}
	return nil
}

// limit waits until the next record fits under Rate, writing what is
// batched first so that a slow rate does not hold records back.
func (s *streamer) limit(ctx context.Context) error {
	due := s.liveStart.Add(time.Duration(float64(s.queued-s.liveQueued) / s.o.Rate * float64(time.Second)))
	wait := due.Sub(s.o.Now())
	if wait <= 0 {
		return nil
	}
	if err := s.flush(ctx); err != nil {
		return err
	}
	if s.o.Duration > 0 {
		if left := s.start.Add(s.o.Duration).Sub(s.o.Now()); left < wait {
			if err := sleep(ctx, left); err != nil {
				return err
			}
			return errStop
		}
	}
	return sleep(ctx, wait)
}

func (s *streamer) checkDuration(now time.Time) error {
	if s.o.Duration > 0 && now.Sub(s.start) >= s.o.Duration {
		return errStop
	}
	return nil
}

func (s *streamer) flush(ctx context.Context) error {
	if len(s.batch) == 0 {
		return nil
	}
	if err := s.w.WriteMessages(ctx, s.batch...); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("write %d records: %w", len(s.batch), err)
	}
	s.records += int64(len(s.batch))
	for i := range s.batch {
		s.bytes += int64(len(s.batch[i].Key) + len(s.batch[i].Value))
	}
	clear(s.batch) // drop references into the arena
	s.batch = s.batch[:0]
	s.arena = s.arena[:0]
	return nil
}

func (s *streamer) maybeReport(now time.Time) {
	if now.Sub(s.lastProgress) >= s.o.ProgressInterval {
		s.lastProgress = now
		s.report(false)
	}
}

func (s *streamer) report(done bool) {
	if s.o.Progress == nil {
		return
	}
	sim := s.m.Position()
	if s.simTime.After(sim) {
		sim = s.simTime
	}
	s.o.Progress(Progress{
		Phase:   s.phase,
		Records: s.records,
		Bytes:   s.bytes,
		SimTime: sim,
		Elapsed: s.o.Now().Sub(s.start),
		Done:    done,
	})
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
