package processor

import (
	"fmt"
	"slices"
)

// ScaleOutConfig turns on the scale-out mode (docs/scaling.md): the
// replicas of a consumer group share their per-segment work through a
// deltas topic so that every number is exact at any replica count.
type ScaleOutConfig struct {
	// Enabled turns the mode on. Off, one replica computes everything, as
	// without this section.
	Enabled bool `yaml:"enabled"`
	// DeltasTopic is the internal topic of markers; empty means
	// "<kafka.group>-deltas". funnelwatch creates it (one partition) when
	// it is missing.
	DeltasTopic string `yaml:"deltas_topic"`
	// ReplicationFactor of the deltas topic when funnelwatch creates it;
	// -1 means the broker's default.
	ReplicationFactor int `yaml:"replication_factor"`
}

// Topic is the deltas topic's name.
func (s ScaleOutConfig) Topic(group string) string {
	if s.DeltasTopic != "" {
		return s.DeltasTopic
	}
	return group + "-deltas"
}

func (s ScaleOutConfig) validate(c *Config) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("scale_out.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if s.ReplicationFactor == 0 || s.ReplicationFactor < -1 {
		bad("replication_factor", "must be -1 (the broker's default) or at least 1, not %d", s.ReplicationFactor)
	}
	topic := s.Topic(c.Kafka.Group)
	if slices.ContainsFunc(c.Kafka.Topics, func(t TopicConfig) bool { return t.Name == topic }) {
		bad("deltas_topic", "%q must not be a consumed topic", topic)
	}
	if c.Kafka.DeadLetterTopic != "" && topic == c.Kafka.DeadLetterTopic {
		bad("deltas_topic", "%q must not be the dead-letter topic", topic)
	}
	if s.Enabled && c.Store.Dir == "" {
		bad("enabled", "needs store.dir")
	}
	return errs
}
