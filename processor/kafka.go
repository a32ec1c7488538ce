package processor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl"
	"github.com/segmentio/kafka-go/sasl/plain"
	"github.com/segmentio/kafka-go/sasl/scram"
)

// TLSConfig returns the TLS client configuration, or nil when TLS is off.
func (c KafkaConfig) TLSConfig() (*tls.Config, error) {
	t := c.TLS
	if !t.Enabled {
		return nil, nil
	}
	cfg := &tls.Config{InsecureSkipVerify: t.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("kafka.tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("kafka.tls.ca_file %q: no certificate found", t.CAFile)
		}
		cfg.RootCAs = pool
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("kafka.tls client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// SASLMechanism returns the SASL mechanism, or nil when SASL is off. The
// password is read from the environment variable the config names, so it is
// never part of the config, a log line or a metric.
func (c KafkaConfig) SASLMechanism() (sasl.Mechanism, error) {
	s := c.SASL
	if s.Mechanism == "" {
		return nil, nil
	}
	password, ok := os.LookupEnv(s.PasswordEnv)
	if !ok {
		return nil, fmt.Errorf("kafka.sasl.password_env: environment variable %q is not set", s.PasswordEnv)
	}
	switch s.Mechanism {
	case "PLAIN":
		return plain.Mechanism{Username: s.Username, Password: password}, nil
	case "SCRAM-SHA-256":
		return scram.Mechanism(scram.SHA256, s.Username, password)
	case "SCRAM-SHA-512":
		return scram.Mechanism(scram.SHA512, s.Username, password)
	}
	return nil, fmt.Errorf("kafka.sasl.mechanism: unsupported %q", s.Mechanism)
}

// Dialer returns a kafka-go dialer with the configured TLS and SASL.
func (c KafkaConfig) Dialer() (*kafka.Dialer, error) {
	t, err := c.TLSConfig()
	if err != nil {
		return nil, err
	}
	m, err := c.SASLMechanism()
	if err != nil {
		return nil, err
	}
	return &kafka.Dialer{Timeout: 10 * time.Second, DualStack: true, TLS: t, SASLMechanism: m}, nil
}

// Transport returns a kafka-go transport (for Writer and Client) with the
// configured TLS and SASL.
func (c KafkaConfig) Transport() (*kafka.Transport, error) {
	t, err := c.TLSConfig()
	if err != nil {
		return nil, err
	}
	m, err := c.SASLMechanism()
	if err != nil {
		return nil, err
	}
	return &kafka.Transport{DialTimeout: 10 * time.Second, TLS: t, SASL: m, Dial: (&net.Dialer{Timeout: 10 * time.Second}).DialContext}, nil
}

// readerMaxWait is the MaxWait of every kafka-go reader. kafka-go sets the
// connection's read deadline MaxWait after a fetch is sent and asks the
// broker to hold the fetch until that deadline less a round trip of
// min(1s, MaxWait/4). With 500ms a broker busy for more than 125ms (a
// producer starting at full speed, a collection) answers after the deadline:
// the reader drops the connection, backs off and redials, and the records
// that arrived meanwhile wait seconds. 1.5s leaves 1s for the answer and
// still polls a quiet partition every 0.5s; it delays nothing, since a fetch
// with MinBytes 1 returns as soon as a record arrives.
const readerMaxWait = 1500 * time.Millisecond

// kafkaLogger adapts slog to kafka-go's Logger.
func kafkaLogger(l *slog.Logger, level slog.Level) kafka.LoggerFunc {
	return func(msg string, args ...any) {
		l.Log(context.Background(), level, fmt.Sprintf(msg, args...), "component", "kafka")
	}
}
