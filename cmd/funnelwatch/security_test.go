package main

// Security of the real binary: with SASL to the brokers and basic auth on
// the web endpoints (--web.config.file), no secret reaches a log line, an
// endpoint or check-config's output; a refused password keeps the process
// up and unready; and `funnelwatch run` writes nothing outside store.dir.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl/scram"
	"github.com/twmb/franz-go/pkg/kfake"
	"golang.org/x/crypto/bcrypt"
)

const (
	secUser     = "funnelwatch"
	secWebUser  = "prometheus"
	secPassEnv  = "FUNNELWATCH_KAFKA_PASSWORD"
	secDLQTopic = "events-dead-letter"
)

// secretSetup is a SASL/SCRAM-SHA-512 broker in this process and the files
// of a funnelwatch that uses it, each kind of file in its own directory so
// the test can tell where the process wrote.
type secretSetup struct {
	brokers                []string
	kafkaPassword, webPass string
	cfgFile, webFile       string
	conf, store            string
	home, tmp, cwd         string
	transport              *kafka.Transport
	dialer                 *kafka.Dialer
}

// distinctive returns a password that cannot occur by chance in a log.
func distinctive(t testing.TB, prefix string) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + hex.EncodeToString(b)
}

func newSecretSetup(t testing.TB) *secretSetup {
	t.Helper()
	s := &secretSetup{kafkaPassword: distinctive(t, "kafka-pw-"), webPass: distinctive(t, "web-pw-")}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(2),
		kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-512", secUser, s.kafkaPassword))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	s.brokers = c.ListenAddrs()
	mech, err := scram.Mechanism(scram.SHA512, secUser, s.kafkaPassword)
	if err != nil {
		t.Fatal(err)
	}
	s.transport = &kafka.Transport{SASL: mech}
	s.dialer = &kafka.Dialer{Timeout: 10 * time.Second, SASLMechanism: mech}

	root := t.TempDir()
	for _, d := range []*string{&s.conf, &s.store, &s.home, &s.tmp, &s.cwd} {
		var err error
		if *d, err = os.MkdirTemp(root, "d"); err != nil {
			t.Fatal(err)
		}
	}
	s.store = filepath.Join(s.store, "store") // created by funnelwatch
	config := fmt.Sprintf(`kafka:
  brokers: [%s]
  topics: [{name: events}]
  dead_letter_topic: %s
  sasl: {mechanism: SCRAM-SHA-512, username: %s, password_env: %s}
time: {clock: event}
flush_interval: 100ms
log: {level: debug, format: json}
`, strings.Join(s.brokers, ", "), secDLQTopic, secUser, secPassEnv)
	s.cfgFile = filepath.Join(s.conf, "funnelwatch.yaml")
	if err := os.WriteFile(s.cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(s.webPass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	web := fmt.Sprintf("basic_auth_users:\n  %s: %s\n", secWebUser, hash)
	s.webFile = filepath.Join(s.conf, "web-config.yml")
	if err := os.WriteFile(s.webFile, []byte(web), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// env is the whole environment of the process: HOME, TMPDIR and the
// password, nothing inherited.
func (s *secretSetup) env(password string) []string {
	return []string{"HOME=" + s.home, "TMPDIR=" + s.tmp, secPassEnv + "=" + password}
}

// start runs `funnelwatch run` in s.cwd with debug logging, the web config
// file and the given password.
func (s *secretSetup) start(t testing.TB, password string, logs io.Writer) *proc {
	t.Helper()
	addr := freePort(t)
	cmd := exec.Command(binary(t), "run", "--config.file", s.cfgFile, "--web.config.file", s.webFile,
		"--web.listen-address", addr, "--store.dir", s.store, "--log.level", "debug")
	cmd.Dir = s.cwd
	cmd.Env = s.env(password)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, addr: addr, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() { p.kill() })
	return p
}

// get fetches a path with basic auth unless user is empty.
func (s *secretSetup) get(addr, path, user string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, "", err
	}
	if user != "" {
		req.SetBasicAuth(user, s.webPass)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// consumedWithAuth sums funnel_records_consumed_total, or -1.
func (s *secretSetup) consumedWithAuth(addr string) int {
	code, body, err := s.get(addr, "/metrics", secWebUser)
	if err != nil || code != http.StatusOK {
		return -1
	}
	n := 0.0
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, "funnel_records_consumed_total{") {
			f, _ := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
			n += f
		}
	}
	return int(n)
}

// TestRunSecretsNeverLeak runs funnelwatch with SASL and basic auth, debug
// logging on, consumes valid and invalid records and checks that neither
// password is in the logs, in any endpoint's output or in check-config's
// output; that basic auth from --web.config.file guards the endpoints; and
// that the dead-letter writer authenticates like the consumer.
func TestRunSecretsNeverLeak(t *testing.T) {
	t.Parallel()
	s := newSecretSetup(t)
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})

	msgs := []kafka.Message{
		{Key: []byte("a"), Value: []byte(`{"id":"1","type":"visit","entity":"a","time":"2026-11-02T12:00:00Z","segment":{"source":"ads","region":"emea"}}`)},
		{Key: []byte("a"), Value: []byte(`{"id":"2","type":"lead","entity":"a","time":"2026-11-02T12:10:00Z"}`)},
		{Key: []byte("b"), Value: []byte(`{"id":"3","type":"visit","entity":"b","time":"2026-11-02T12:20:00Z","segment":{"source":"seo","region":"na"}}`)},
		{Key: []byte("c"), Value: []byte(`{"id":"4","type":"visit","entity":"c","time":"not a time"}`)},
	}
	w := &kafka.Writer{Addr: kafka.TCP(s.brokers...), Topic: "events", Transport: s.transport, Balancer: &kafka.Hash{},
		AllowAutoTopicCreation: true, BatchTimeout: time.Millisecond, RequiredAcks: kafka.RequireOne}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		err := w.WriteMessages(ctx, msgs...)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("produce: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // the topic is being created
	}

	p := s.start(t, s.kafkaPassword, logs)
	deadline := time.Now().Add(30 * time.Second)
	for s.consumedWithAuth(p.addr) < len(msgs) {
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d records after 30s; want %d", s.consumedWithAuth(p.addr), len(msgs))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if code, _, _ := s.get(p.addr, "/readyz", secWebUser); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("not ready after 20s")
		}
	}

	// Every endpoint, with and without credentials.
	var outputs strings.Builder
	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/api/v1/segments", "/api/v1/trends", "/"} {
		code, _, err := s.get(p.addr, path, "")
		if err != nil || code != http.StatusUnauthorized {
			t.Errorf("GET %s without credentials: %d %v; want 401", path, code, err)
		}
		code, body, err := s.get(p.addr, path, secWebUser)
		if err != nil || code != http.StatusOK {
			t.Errorf("GET %s with credentials: %d %v; want 200", path, code, err)
		}
		fmt.Fprintf(&outputs, "%s\n%s\n", path, body)
	}
	if !strings.Contains(outputs.String(), `funnel_events_invalid_total{reason="bad_time"} 1`) {
		t.Errorf("/metrics lacks funnel_events_invalid_total{reason=\"bad_time\"} 1")
	}

	// The dead-letter writer authenticated too.
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: s.brokers, Topic: secDLQTopic, Partition: 0, Dialer: s.dialer, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	dead, err := r.FetchMessage(rctx)
	if err != nil {
		t.Fatalf("read %s: %v", secDLQTopic, err)
	}
	var reason string
	for _, h := range dead.Headers {
		if h.Key == "funnelwatch-reason" {
			reason = string(h.Value)
		}
	}
	if reason != "bad_time" || string(dead.Value) != string(msgs[3].Value) {
		t.Errorf("dead letter reason %q value %s; want bad_time and %s", reason, dead.Value, msgs[3].Value)
	}

	p.terminate(t)

	// check-config prints the effective configuration: the name of the
	// password's variable, never its value.
	cmd := exec.Command(binary(t), "check-config", "--config.file", s.cfgFile, "--web.config.file", s.webFile)
	cmd.Dir, cmd.Env = s.cwd, s.env(s.kafkaPassword)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("check-config: %v\n%s", err, out)
	}
	if want := "password_env: " + secPassEnv; !strings.Contains(string(out), want) {
		t.Errorf("check-config output lacks %q:\n%s", want, out)
	}

	l := logs.tail(1 << 30)
	for _, want := range []string{`"level":"DEBUG"`, `"component":"kafka"`, "joined consumer group"} {
		if !strings.Contains(l, want) {
			t.Errorf("the logs lack %s: debug logging was not on", want)
		}
	}
	for name, text := range map[string]string{"logs": l, "endpoints": outputs.String(), "check-config": string(out)} {
		for _, secret := range []string{s.kafkaPassword, s.webPass} {
			if strings.Contains(text, secret) {
				t.Errorf("the %s hold a password (%s…)", name, secret[:8])
			}
		}
	}
	checkWrites(t, s)
}

// checkWrites asserts that the process wrote into store.dir and nowhere
// else it could: its working directory, HOME, TMPDIR and the directory of
// its configuration hold exactly what they held before.
func checkWrites(t *testing.T, s *secretSetup) {
	t.Helper()
	for dir, want := range map[string][]string{
		s.cwd: nil, s.home: nil, s.tmp: nil,
		s.conf: {"funnelwatch.yaml", "web-config.yml"},
	} {
		var got []string
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || path == dir {
				return err
			}
			rel, _ := filepath.Rel(dir, path)
			got = append(got, rel)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s holds %v after the run; want %v", dir, got, want)
		}
	}
	entries, err := os.ReadDir(s.store)
	if err != nil || len(entries) == 0 {
		t.Errorf("store.dir %s: %d entries, %v; want the store", s.store, len(entries), err)
	}
}

// TestRunWrongKafkaPassword runs funnelwatch with a password the broker
// refuses: the process keeps running and serving metrics, /readyz says 503,
// and the logs say why without the password.
func TestRunWrongKafkaPassword(t *testing.T) {
	t.Parallel()
	s := newSecretSetup(t)
	wrong := distinctive(t, "wrong-pw-")
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("funnelwatch logs (last 8 KiB):\n%s", logs.tail(8<<10))
		}
	})
	p := s.start(t, wrong, logs)
	const failed = "joining the consumer group failed; retrying"
	deadline := time.Now().Add(20 * time.Second)
	for strings.Count(logs.tail(1<<30), failed) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no two %q log lines after 20s", failed)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code, _, err := s.get(p.addr, "/readyz", secWebUser); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz: %d %v; want 503", code, err)
	}
	if n := s.consumedWithAuth(p.addr); n != 0 {
		t.Errorf("consumed %d (-1: /metrics failed); want 0 and /metrics serving", n)
	}
	select {
	case err := <-p.done:
		p.done <- err
		t.Fatalf("funnelwatch exited (%v); want it to keep retrying", err)
	default:
	}
	p.terminate(t)
	l := logs.tail(1 << 30)
	if !strings.Contains(l, "SASL Authentication failed") {
		t.Errorf("the logs do not say that SASL authentication failed")
	}
	if strings.Contains(l, wrong) {
		t.Errorf("the logs hold the password")
	}
}
