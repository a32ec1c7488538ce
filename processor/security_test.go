package processor_test

// Security: Kafka TLS (server-verified and mutual) and SASL (PLAIN,
// SCRAM-SHA-256, SCRAM-SHA-512) against a real kfake broker configured for
// each mode, the dead-letter writer over the same connection settings,
// credentials that the broker refuses, and TLS and basic auth on the web
// endpoints through an exporter-toolkit web config file.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sync/errgroup"

	"github.com/funnelwatch/funnelwatch/processor"
	"github.com/funnelwatch/funnelwatch/store"
)

// testPKI is a certificate authority made for one test, with its files in
// a temporary directory.
type testPKI struct {
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	caFile string
	pool   *x509.CertPool
}

// newPKI makes a self-signed ECDSA P-256 CA valid for an hour and writes
// its certificate to DIR/NAME-ca.crt.
func newPKI(t testing.TB, name string) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name + " test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{dir: t.TempDir(), cert: cert, key: key, pool: x509.NewCertPool()}
	p.pool.AddCert(cert)
	p.caFile = filepath.Join(p.dir, name+"-ca.crt")
	writePEM(t, p.caFile, "CERTIFICATE", der)
	return p
}

// issue signs a certificate for 127.0.0.1 and localhost with the given
// extended key usage and writes DIR/NAME.crt and DIR/NAME.key.
func (p *testPKI) issue(t testing.TB, name string, usage x509.ExtKeyUsage) (certFile, keyFile string, pair tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	pair, err = tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, pair
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// lockedLog collects log output from several goroutines.
type lockedLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedLog) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedLog) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startSecureRunner is startRunner with a debug logger writing to logs and
// a dead-letter writer built the way `funnelwatch run` builds it: from
// KafkaConfig.Transport, so it shares the consumer's TLS and SASL. done is
// closed when the consumer's Run has returned.
func startSecureRunner(t testing.TB, cfg processor.Config, logs io.Writer) (r *runner, done <-chan struct{}) {
	t.Helper()
	st, err := store.Open("", store.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	reg := prometheus.NewRegistry()
	opts := processor.Options{Registerer: reg, Logger: logger}
	if cfg.Kafka.DeadLetterTopic != "" {
		transport, err := cfg.Kafka.Transport()
		if err != nil {
			t.Fatal(err)
		}
		w := &kafka.Writer{Addr: kafka.TCP(cfg.Kafka.Brokers...), Transport: transport, AllowAutoTopicCreation: true,
			RequiredAcks: kafka.RequireAll, BatchTimeout: 10 * time.Millisecond}
		t.Cleanup(func() { w.Close() })
		opts.DeadLetter = w
	}
	p, err := processor.New(cfg, st, opts)
	if err != nil {
		t.Fatal(err)
	}
	c, err := processor.NewConsumer(cfg, p, logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	finished := make(chan struct{})
	g.Go(func() error { return p.Run(gctx) })
	g.Go(func() error {
		defer close(finished)
		return c.Run(gctx)
	})
	r = &runner{p: p, c: c, reg: reg, cancel: cancel, g: g}
	// Cleanups run last in first out: stop the runner, close the store,
	// then the dead-letter writer, which the final flush may still use.
	t.Cleanup(func() { st.Close() })
	t.Cleanup(func() { r.stop(t) })
	return r, finished
}

// produceWith writes lines to topic with the TLS and SASL of k.
func produceWith(t testing.TB, k processor.KafkaConfig, topic string, lines [][]byte) {
	t.Helper()
	transport, err := k.Transport()
	if err != nil {
		t.Fatal(err)
	}
	w := &kafka.Writer{Addr: kafka.TCP(k.Brokers...), Topic: topic, Transport: transport, AllowAutoTopicCreation: true, BatchTimeout: time.Millisecond, RequiredAcks: kafka.RequireOne}
	defer w.Close()
	msgs := make([]kafka.Message, 0, len(lines))
	for _, l := range lines {
		msgs = append(msgs, kafka.Message{Key: entityOf(l), Value: l})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		err := w.WriteMessages(ctx, msgs...)
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("produce: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // topic creation in progress
	}
}

// readFirstRecord reads the first record of partition 0 of topic with the
// TLS and SASL of k.
func readFirstRecord(t testing.TB, k processor.KafkaConfig, topic string) kafka.Message {
	t.Helper()
	dialer, err := k.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: k.Brokers, Topic: topic, Partition: 0, Dialer: dialer, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := r.FetchMessage(ctx)
	if err != nil {
		t.Fatalf("read %s: %v", topic, err)
	}
	return m
}

func recordHeader(m kafka.Message, key string) string {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// securityEvents are four valid events of two entities and one record
// without an entity, which goes to the dead-letter topic.
var securityEvents = [][]byte{
	[]byte(`{"id":"1","type":"visit","entity":"a","time":"2026-11-02T12:00:00Z","segment":{"source":"ads","region":"emea"}}`),
	[]byte(`{"id":"2","type":"lead","entity":"a","time":"2026-11-02T12:10:00Z"}`),
	[]byte(`{"id":"3","type":"visit","entity":"b","time":"2026-11-02T12:20:00Z","segment":{"source":"seo","region":"na"}}`),
	[]byte(`{"id":"4","type":"deal","entity":"a","time":"2026-11-02T12:30:00Z","value":100}`),
	[]byte(`{"id":"5","type":"visit","time":"2026-11-02T12:40:00Z"}`),
}

// securityConfig is the default configuration on brokers, with one topic,
// a dead-letter topic, a short flush interval and the event clock, so that
// whatever the date the test runs, no event is late.
func securityConfig(t testing.TB, brokers []string) processor.Config {
	t.Helper()
	cfg := processor.DefaultConfig()
	cfg.Kafka.Brokers = brokers
	cfg.Kafka.Topics = []processor.TopicConfig{{Name: "events"}}
	cfg.Kafka.DeadLetterTopic = "events-dead-letter"
	cfg.Time.Clock = processor.ClockEvent
	cfg.FlushInterval = processor.Duration(50 * time.Millisecond)
	return cfg
}

// TestKafkaSecurity consumes through a broker that requires TLS, a client
// certificate, SASL or TLS with SASL, and writes the invalid record to the
// dead-letter topic through the same.
func TestKafkaSecurity(t *testing.T) {
	ca := newPKI(t, "kafka")
	_, _, serverPair := ca.issue(t, "broker", x509.ExtKeyUsageServerAuth)
	clientCert, clientKey, _ := ca.issue(t, "funnelwatch", x509.ExtKeyUsageClientAuth)
	serverTLS := &tls.Config{Certificates: []tls.Certificate{serverPair}, MinVersion: tls.VersionTLS12}
	mutualTLS := &tls.Config{Certificates: []tls.Certificate{serverPair}, MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool}

	const password = "kafka-Secr3t-7c1f"
	// Set here: a test that sets the environment cannot be parallel, but
	// its subtests can.
	t.Setenv("FUNNELWATCH_TEST_KAFKA_PASSWORD", password)
	tests := []struct {
		name   string
		broker []kfake.Opt
		tls    processor.TLSConfig
		sasl   string
	}{
		{name: "TLS", broker: []kfake.Opt{kfake.TLS(serverTLS)},
			tls: processor.TLSConfig{Enabled: true, CAFile: ca.caFile}},
		{name: "MutualTLS", broker: []kfake.Opt{kfake.TLS(mutualTLS)},
			tls: processor.TLSConfig{Enabled: true, CAFile: ca.caFile, CertFile: clientCert, KeyFile: clientKey}},
		{name: "SASL_PLAIN", sasl: "PLAIN"},
		{name: "SASL_SCRAM-SHA-256", sasl: "SCRAM-SHA-256"},
		{name: "SASL_SCRAM-SHA-512", sasl: "SCRAM-SHA-512"},
		{name: "TLS_SASL_SCRAM-SHA-512", broker: []kfake.Opt{kfake.TLS(serverTLS)}, sasl: "SCRAM-SHA-512",
			tls: processor.TLSConfig{Enabled: true, CAFile: ca.caFile}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			opts := tt.broker
			if tt.sasl != "" {
				opts = append(opts, kfake.EnableSASL(), kfake.Superuser(tt.sasl, "funnelwatch", password))
			}
			cfg := securityConfig(t, startBroker(t, opts...))
			cfg.Kafka.TLS = tt.tls
			if tt.sasl != "" {
				cfg.Kafka.SASL = processor.SASLConfig{Mechanism: tt.sasl, Username: "funnelwatch", PasswordEnv: "FUNNELWATCH_TEST_KAFKA_PASSWORD"}
			}
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			produceWith(t, cfg.Kafka, "events", securityEvents)

			var logs lockedLog
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("log:\n%s", logs.String())
				}
			})
			r, _ := startSecureRunner(t, cfg, &logs)
			r.waitConsumed(t, len(securityEvents))
			waitConsumerReady(t, r.c)

			got := exposition(t, r.reg, "funnel_records_consumed_total", "funnel_events_applied_total", "funnel_events_invalid_total{reason=\"missing_entity\"}")
			want := `funnel_events_applied_total{topic="events"} 4
funnel_events_invalid_total{reason="missing_entity"} 1
funnel_records_consumed_total{partition="0",topic="events"} 5
`
			if got != want {
				t.Errorf("got metrics\n%swant\n%s", got, want)
			}

			m := readFirstRecord(t, cfg.Kafka, cfg.Kafka.DeadLetterTopic)
			if got, want := recordHeader(m, "funnelwatch-reason"), "missing_entity"; got != want {
				t.Errorf("dead letter funnelwatch-reason %q; want %q", got, want)
			}
			if got, want := string(m.Value), string(securityEvents[4]); got != want {
				t.Errorf("dead letter value %s; want %s", got, want)
			}
			r.stop(t)
			l := logs.String()
			if strings.Contains(l, password) {
				t.Errorf("the SASL password is in the log:\n%s", l)
			}
			// The offset client (kafka.Client, built from Transport, for
			// readiness) connected too, and nothing failed for good.
			// Transient warnings (a rebalance on a loaded machine) are fine.
			for _, bad := range []string{"listing end offsets failed", "level=ERROR"} {
				if strings.Contains(l, bad) {
					t.Errorf("the log has %q:\n%s", bad, l)
				}
			}
		})
	}
}

// waitConsumerReady waits for the consumer to be in a generation and caught up.
func waitConsumerReady(t testing.TB, c *processor.Consumer) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !c.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("consumer not ready after 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKafkaSecurityRefused runs against brokers that refuse the client:
// a wrong SASL password, a mutual-TLS broker without a client certificate
// and a broker whose certificate is not signed by the configured CA. The
// processor must keep running, never become ready, consume nothing and log
// why, without the password.
func TestKafkaSecurityRefused(t *testing.T) {
	ca := newPKI(t, "kafka")
	_, _, serverPair := ca.issue(t, "broker", x509.ExtKeyUsageServerAuth)
	other := newPKI(t, "other")
	serverTLS := &tls.Config{Certificates: []tls.Certificate{serverPair}, MinVersion: tls.VersionTLS12}
	mutualTLS := &tls.Config{Certificates: []tls.Certificate{serverPair}, MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool}

	const (
		right = "right-Passw0rd-91d2"
		wrong = "wrong-Passw0rd-5e8a"
	)
	t.Setenv("FUNNELWATCH_TEST_KAFKA_PASSWORD", wrong)
	tests := []struct {
		name    string
		broker  []kfake.Opt
		tls     processor.TLSConfig
		sasl    string
		wantLog string
	}{
		{name: "WrongPassword", broker: []kfake.Opt{kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-512", "funnelwatch", right)},
			sasl: "SCRAM-SHA-512", wantLog: "SASL Authentication"},
		{name: "WrongPasswordPLAIN", broker: []kfake.Opt{kfake.EnableSASL(), kfake.Superuser("PLAIN", "funnelwatch", right)},
			sasl: "PLAIN", wantLog: "SASL Authentication"},
		{name: "NoClientCertificate", broker: []kfake.Opt{kfake.TLS(mutualTLS)},
			tls: processor.TLSConfig{Enabled: true, CAFile: ca.caFile}, wantLog: "certificate required"},
		{name: "UnknownCA", broker: []kfake.Opt{kfake.TLS(serverTLS)},
			tls: processor.TLSConfig{Enabled: true, CAFile: other.caFile}, wantLog: "x509: certificate signed by unknown authority"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := securityConfig(t, startBroker(t, tt.broker...))
			cfg.Kafka.TLS = tt.tls
			if tt.sasl != "" {
				cfg.Kafka.SASL = processor.SASLConfig{Mechanism: tt.sasl, Username: "funnelwatch", PasswordEnv: "FUNNELWATCH_TEST_KAFKA_PASSWORD"}
			}
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			var logs lockedLog
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("log:\n%s", logs.String())
				}
			})
			r, done := startSecureRunner(t, cfg, &logs)
			// Wait for a second failed join: the first retry after backoff.
			const failed = "joining the consumer group failed; retrying"
			deadline := time.Now().Add(10 * time.Second)
			for l := logs.String(); !strings.Contains(l, tt.wantLog) || strings.Count(l, failed) < 2; l = logs.String() {
				if time.Now().After(deadline) {
					t.Fatalf("no two log lines %q with %q after 10s:\n%s", failed, tt.wantLog, l)
				}
				time.Sleep(50 * time.Millisecond)
			}
			select {
			case <-done:
				t.Fatal("the consumer stopped; want it to keep retrying")
			default:
			}
			if r.c.Ready() || r.c.Joined() {
				t.Errorf("Ready %v Joined %v; want both false", r.c.Ready(), r.c.Joined())
			}
			if n := consumed(t, r.reg); n != 0 {
				t.Errorf("consumed %d records; want 0", n)
			}
			r.stop(t)
			l := logs.String()
			for _, secret := range []string{right, wrong} {
				if strings.Contains(l, secret) {
					t.Errorf("the log holds password %q:\n%s", secret, l)
				}
			}
		})
	}
}

// TestKafkaSecurityConfigErrors checks the errors of unusable TLS and SASL
// settings: they name the key and never hold the password.
func TestKafkaSecurityConfigErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FUNNELWATCH_TEST_SET", "Secr3t-in-env")
	tests := []struct {
		name string
		tls  processor.TLSConfig
		sasl processor.SASLConfig
		want string
	}{
		{name: "MissingCA", tls: processor.TLSConfig{Enabled: true, CAFile: filepath.Join(dir, "missing.crt")}, want: "kafka.tls.ca_file"},
		{name: "CANotPEM", tls: processor.TLSConfig{Enabled: true, CAFile: notPEM}, want: "no certificate found"},
		{name: "BadClientPair", tls: processor.TLSConfig{Enabled: true, CertFile: notPEM, KeyFile: notPEM}, want: "kafka.tls client certificate"},
		{name: "UnsetPasswordEnv", sasl: processor.SASLConfig{Mechanism: "PLAIN", Username: "u", PasswordEnv: "FUNNELWATCH_TEST_UNSET"},
			want: `environment variable "FUNNELWATCH_TEST_UNSET" is not set`},
		{name: "Mechanism", sasl: processor.SASLConfig{Mechanism: "GSSAPI", Username: "u", PasswordEnv: "FUNNELWATCH_TEST_SET"},
			want: `unsupported "GSSAPI"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := processor.KafkaConfig{Brokers: []string{"127.0.0.1:1"}, TLS: tt.tls, SASL: tt.sasl}
			_, errDialer := k.Dialer()
			_, errTransport := k.Transport()
			for _, err := range []error{errDialer, errTransport} {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Errorf("got error %v; want one containing %q", err, tt.want)
				} else if strings.Contains(err.Error(), "Secr3t-in-env") {
					t.Errorf("error %q holds the password", err)
				}
			}
		})
	}
}

// writeWebConfig writes an exporter-toolkit web config file and returns its
// path. Relative cert_file and key_file are resolved against its directory.
func writeWebConfig(t testing.TB, dir, content string) string {
	t.Helper()
	path := filepath.Join(dir, "web-config.yml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestWebTLSAndBasicAuth serves the endpoints with web config files for
// TLS, basic auth and both, and checks what plain HTTP, HTTPS, no
// credentials, wrong credentials and the right ones get. exporter-toolkit
// puts basic auth in front of every path, /healthz and /readyz included
// (docs/security.md says how probes authenticate).
func TestWebTLSAndBasicAuth(t *testing.T) {
	ca := newPKI(t, "web")
	_, _, _ = ca.issue(t, "server", x509.ExtKeyUsageServerAuth) // DIR/server.crt, DIR/server.key
	const user, password = "prometheus", "web-Passw0rd-3b7e"
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	tlsPart := "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
	authPart := fmt.Sprintf("basic_auth_users:\n  %s: %s\n", user, hash)

	st := processor.MemStore(t)
	cfg, err := processor.ParseConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, st, processor.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}

	trusting := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool}}}
	plain := &http.Client{Timeout: 30 * time.Second}
	paths := []string{"/metrics", "/healthz", "/readyz", "/api/v1/segments", "/"}
	type request struct {
		scheme, user, password string
		want                   int // 0: the request must fail
	}
	tests := []struct {
		name     string
		config   string
		requests []request
	}{
		{name: "TLSAndBasicAuth", config: tlsPart + authPart, requests: []request{
			{scheme: "http", want: http.StatusBadRequest}, // "Client sent an HTTP request to an HTTPS server."
			{scheme: "http", user: user, password: password, want: http.StatusBadRequest},
			{scheme: "https", want: http.StatusUnauthorized},
			{scheme: "https", user: user, password: "wrong", want: http.StatusUnauthorized},
			{scheme: "https", user: "nobody", password: password, want: http.StatusUnauthorized},
			{scheme: "https", user: user, password: password, want: http.StatusOK},
		}},
		{name: "TLS", config: tlsPart, requests: []request{
			{scheme: "http", want: http.StatusBadRequest},
			{scheme: "https", want: http.StatusOK},
		}},
		{name: "BasicAuth", config: authPart, requests: []request{
			{scheme: "https", want: 0},
			{scheme: "http", want: http.StatusUnauthorized},
			{scheme: "http", user: user, password: password, want: http.StatusOK},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfgFile := writeWebConfig(t, ca.dir, tt.config)
			defer os.Remove(cfgFile)
			var logs lockedLog
			logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			srv := processor.NewServer(processor.WebConfig{ConfigFile: cfgFile}, p, nil, reg, logger)
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error, 1)
			go func() { errc <- srv.Serve(ctx, l) }()
			defer func() {
				cancel()
				if err := <-errc; err != nil {
					t.Errorf("serve: %v", err)
				}
			}()

			for _, rq := range tt.requests {
				for _, path := range paths {
					url := rq.scheme + "://" + l.Addr().String() + path
					req, err := http.NewRequest(http.MethodGet, url, nil)
					if err != nil {
						t.Fatal(err)
					}
					if rq.user != "" {
						req.SetBasicAuth(rq.user, rq.password)
					}
					c := plain
					if rq.scheme == "https" {
						c = trusting
					}
					resp, err := c.Do(req)
					if rq.want == 0 {
						if err == nil {
							resp.Body.Close()
							t.Errorf("GET %s (user %q) got %s; want the request to fail", url, rq.user, resp.Status)
						}
						continue
					}
					if err != nil {
						t.Errorf("GET %s (user %q): %v", url, rq.user, err)
						continue
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != rq.want {
						t.Errorf("GET %s (user %q password %q) got %s; want %d", url, rq.user, rq.password, resp.Status, rq.want)
					}
					if rq.want != http.StatusOK && bytes.Contains(body, []byte("funnel_")) {
						t.Errorf("GET %s (user %q) without access served metrics", url, rq.user)
					}
					if rq.want == http.StatusOK && path == "/metrics" && !bytes.Contains(body, []byte("funnel_build_info")) {
						t.Errorf("GET %s: no funnel_build_info in\n%s", url, body)
					}
				}
			}
			if tt.config == tlsPart+authPart {
				// The server's certificate is verified: a client that
				// does not trust the CA fails the handshake.
				_, err := plain.Get("https://" + l.Addr().String() + "/healthz")
				var unknown x509.UnknownAuthorityError
				if !errors.As(err, &unknown) {
					t.Errorf("HTTPS from a client without the CA: got %v; want an unknown authority error", err)
				}
			}
			if strings.Contains(logs.String(), password) {
				t.Errorf("the web password is in the log:\n%s", logs.String())
			}
		})
	}
}
