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

// kafkaLogger adapts slog to kafka-go's Logger.
func kafkaLogger(l *slog.Logger, level slog.Level) kafka.LoggerFunc {
	return func(msg string, args ...any) {
		l.Log(context.Background(), level, fmt.Sprintf(msg, args...), "component", "kafka")
	}
}
