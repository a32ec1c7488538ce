package processor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/segmentio/kafka-go"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/store"
)

// Consumer reads the configured topics as a Kafka consumer group and feeds
// the Processor. Each generation's partitions start at the offset stored
// with the state, not at the group's committed offset: the group commit
// only follows the store, for lag tools.
type Consumer struct {
	cfg    Config
	p      *Processor
	logger *slog.Logger
	dialer *kafka.Dialer
	client *kafka.Client
	joined atomic.Bool

	// Set by ScaleOut.Attach in the scale-out mode: the group's balancers,
	// a call that prepares the assigned partitions before they are read,
	// more readiness, and staying in the group on shutdown.
	balancers   []kafka.GroupBalancer
	onAssign    func(ctx context.Context, tps []store.TopicPartition) error
	ready       func() bool
	stayInGroup bool
}

// NewConsumer returns a consumer for the processor p.
func NewConsumer(cfg Config, p *Processor, logger *slog.Logger) (*Consumer, error) {
	dialer, err := cfg.Kafka.Dialer()
	if err != nil {
		return nil, err
	}
	transport, err := cfg.Kafka.Transport()
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Consumer{
		cfg:    cfg,
		p:      p,
		logger: logger,
		dialer: dialer,
		client: &kafka.Client{Addr: kafka.TCP(cfg.Kafka.Brokers...), Transport: transport, Timeout: 10 * time.Second},
	}, nil
}

// Ready reports whether the consumer is in a group generation and has
// caught up with what its partitions held when they were assigned.
func (c *Consumer) Ready() bool {
	return c.joined.Load() && c.p.CaughtUp() && (c.ready == nil || c.ready())
}

// Joined reports whether the consumer is in a group generation.
func (c *Consumer) Joined() bool { return c.joined.Load() }

// Run consumes until ctx is done. Broker trouble never ends it: the group
// rejoins with backoff and Ready reports false meanwhile.
func (c *Consumer) Run(ctx context.Context) error {
	topics := make([]string, 0, len(c.cfg.Kafka.Topics))
	for _, t := range c.cfg.Kafka.Topics {
		topics = append(topics, t.Name)
	}
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID:                    c.cfg.Kafka.Group,
		Brokers:               c.cfg.Kafka.Brokers,
		Dialer:                c.dialer,
		Topics:                topics,
		WatchPartitionChanges: true,
		HeartbeatInterval:     D(c.cfg.Kafka.HeartbeatInterval),
		SessionTimeout:        D(c.cfg.Kafka.SessionTimeout),
		RebalanceTimeout:      D(c.cfg.Kafka.RebalanceTimeout),
		JoinGroupBackoff:      2 * time.Second,
		GroupBalancers:        c.balancers,
		StartOffset:           kafka.FirstOffset,
		Logger:                kafkaLogger(c.logger, slog.LevelDebug),
		ErrorLogger:           kafkaLogger(c.logger, slog.LevelWarn),
	})
	if err != nil {
		return fmt.Errorf("consumer group: %w", err)
	}
	if !c.stayInGroup {
		// In the scale-out mode the member does not leave: its partitions
		// wait for it for the session timeout, so that a restart keeps
		// them instead of moving their state twice.
		defer cg.Close()
	}
	backoff := time.Second
	for {
		gen, err := cg.Next(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			c.logger.Warn("joining the consumer group failed; retrying", "group", c.cfg.Kafka.Group, "err", err, "backoff", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		c.runGeneration(ctx, gen)
	}
}

// runGeneration consumes the generation's partitions until the generation
// ends (a rebalance) or ctx is done, then flushes and commits so that the
// next generation starts from exactly what was applied.
func (c *Consumer) runGeneration(ctx context.Context, gen *kafka.Generation) {
	var tps []store.TopicPartition
	for topic, parts := range gen.Assignments {
		for _, pa := range parts {
			tps = append(tps, store.TopicPartition{Topic: topic, Partition: pa.ID})
		}
	}
	slices.SortFunc(tps, func(a, b store.TopicPartition) int {
		if a.Topic != b.Topic {
			return cmpString(a.Topic, b.Topic)
		}
		return a.Partition - b.Partition
	})
	c.logger.Info("joined consumer group", "group", gen.GroupID, "generation", gen.ID, "partitions", len(tps))
	c.p.SetAssignment(c.highWatermarks(ctx, tps))
	c.joined.Store(true)
	done := make(chan struct{})
	gen.Start(func(genCtx context.Context) {
		defer close(done)
		gctx, cancel := context.WithCancel(genCtx)
		defer cancel()
		stop := context.AfterFunc(ctx, cancel)
		defer stop()
		read := tps
		if c.onAssign != nil {
			if err := c.prepareAssignment(gctx, tps); err != nil {
				read = nil // the generation ended before the partitions were ready
			}
		}
		g, gctx := errgroup.WithContext(gctx)
		for _, tp := range read {
			g.Go(func() error { return c.readPartition(gctx, tp) })
		}
		g.Go(func() error {
			t := time.NewTicker(D(c.cfg.FlushInterval))
			defer t.Stop()
			for {
				select {
				case <-gctx.Done():
					return nil
				case <-t.C:
					if err := gen.CommitOffsets(c.p.StoredOffsets(tps)); err != nil {
						c.logger.Debug("committing offsets to the group failed", "err", err)
					}
				}
			}
		})
		if err := g.Wait(); err != nil {
			c.logger.Error("partition reader failed; rejoining", "err", err)
		}
		c.joined.Store(false)
		// Flush before the partitions can be assigned again, so that they
		// resume from what the store holds. Then commit while the
		// generation may still be valid (it is on shutdown).
		if err := c.p.Flush(context.WithoutCancel(ctx)); err != nil {
			c.logger.Error("flush at the end of a generation failed", "err", err)
		}
		if err := gen.CommitOffsets(c.p.StoredOffsets(tps)); err != nil {
			c.logger.Debug("final offset commit failed", "err", err)
		}
	})
	<-done
	c.p.SetAssignment(nil)
}

// prepareAssignment calls onAssign until it succeeds or ctx is done.
func (c *Consumer) prepareAssignment(ctx context.Context, tps []store.TopicPartition) error {
	backoff := time.Second
	for {
		err := c.onAssign(ctx, tps)
		if err == nil || ctx.Err() != nil {
			return err
		}
		c.logger.Warn("preparing the assigned partitions failed; retrying", "err", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// highWatermarks asks the brokers for the end offset of each partition, so
// readiness can wait for the initial catch-up. On error it returns zero
// targets: readiness then follows the group alone.
func (c *Consumer) highWatermarks(ctx context.Context, tps []store.TopicPartition) map[store.TopicPartition]int64 {
	out := make(map[store.TopicPartition]int64, len(tps))
	req := &kafka.ListOffsetsRequest{Topics: map[string][]kafka.OffsetRequest{}}
	for _, tp := range tps {
		out[tp] = 0
		req.Topics[tp.Topic] = append(req.Topics[tp.Topic], kafka.LastOffsetOf(tp.Partition))
	}
	if len(tps) == 0 {
		return out
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.client.ListOffsets(ctx, req)
	if err != nil {
		c.logger.Warn("listing end offsets failed", "err", err)
		return out
	}
	for topic, parts := range resp.Topics {
		for _, po := range parts {
			if po.Error == nil {
				out[store.TopicPartition{Topic: topic, Partition: po.Partition}] = po.LastOffset
			}
		}
	}
	return out
}

const (
	// maxBatch bounds the records handed to the processor at once.
	maxBatch = 2048
	// batchLinger is how long a partial batch waits for more records.
	batchLinger = 20 * time.Millisecond
)

// readPartition reads one partition from the processor's next offset,
// decodes records in this goroutine (so decoding runs in parallel across
// partitions) and applies them in batches.
func (c *Consumer) readPartition(ctx context.Context, tp store.TopicPartition) error {
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers:   c.cfg.Kafka.Brokers,
		Topic:     tp.Topic,
		Partition: tp.Partition,
		Dialer:    c.dialer,
		MinBytes:  1,
		MaxBytes:  16 << 20,
		MaxWait:   readerMaxWait,
		// The lag comes from the high watermarks of the fetches
		// (funnel_consumer_lag_records); kafka-go's own check would dial every
		// partition's leader once a minute for nothing.
		ReadLagInterval: -1,
		QueueCapacity:   4096,
		ReadBackoffMin:  100 * time.Millisecond,
		ReadBackoffMax:  5 * time.Second,
		Logger:          kafkaLogger(c.logger, slog.LevelDebug),
		ErrorLogger:     kafkaLogger(c.logger, slog.LevelWarn),
	})
	defer r.Close()
	start := kafka.FirstOffset
	if next, ok := c.p.NextOffset(tp.Topic, tp.Partition); ok {
		start = next
	}
	if err := r.SetOffset(start); err != nil {
		return fmt.Errorf("seek %s/%d to %d: %w", tp.Topic, tp.Partition, start, err)
	}
	c.logger.Debug("reading partition", "topic", tp.Topic, "partition", tp.Partition, "offset", start)

	dec := NewDecoder(&c.cfg)
	stage := c.p.topicStage[tp.Topic]
	b := &Batch{Topic: tp.Topic, Partition: tp.Partition}
	// A partial batch lingers for batchLinger, so that a quiet partition's
	// records are applied promptly and a busy one's in large batches.
	var linger lingerContext
	defer linger.stop()
	fetchCtx := ctx
	apply := func() {
		linger.stop()
		fetchCtx = ctx
		for c.p.Stalled() && ctx.Err() == nil {
			// The store cannot take writes: hold the records rather than
			// piling up state that could not be written.
			select {
			case <-ctx.Done():
			case <-time.After(D(c.cfg.FlushInterval)):
			}
		}
		if ctx.Err() != nil {
			return // unapplied records are read again from the stored offset
		}
		c.p.ApplyBatch(b)
		b.Reset()
	}
	for {
		m, err := r.FetchMessage(fetchCtx)
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, context.DeadlineExceeded):
			apply()
			continue
		case err != nil:
			return fmt.Errorf("fetch %s/%d: %w", tp.Topic, tp.Partition, err)
		}
		b.Add(dec, stage, &m)
		if len(b.Records) == 1 {
			fetchCtx = linger.start(ctx, batchLinger)
		}
		if len(b.Records) >= maxBatch {
			apply()
		}
	}
}

// lingerContext is a context with a timeout that is stopped early once the
// batch it bounds is applied.
type lingerContext struct{ cancel context.CancelFunc }

func (l *lingerContext) start(ctx context.Context, d time.Duration) context.Context {
	l.stop()
	ctx, l.cancel = context.WithTimeout(ctx, d)
	return ctx
}

func (l *lingerContext) stop() {
	if l.cancel != nil {
		l.cancel()
		l.cancel = nil
	}
}
