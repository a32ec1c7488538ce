package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
)

// runBroker runs the embedded Kafka broker (kfake) on its own, so that
// `generate` and `run` can be tried without a Kafka cluster, and so that
// tests can run the broker outside a race-instrumented test process.
func runBroker(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("broker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		listen     = fs.String("listen-address", "127.0.0.1:9092", "address to listen on")
		partitions = fs.Int("partitions", 6, "partitions of automatically created topics")
		dataDir    = fs.String("data.dir", "", "directory to persist topics and groups in (empty: memory only)")
		minSession = fs.Duration("group.min-session-timeout", 6*time.Second, "shortest session timeout a consumer group member may ask for (Kafka's group.min.session.timeout.ms)")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	opts := []kfake.Opt{
		kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(*partitions),
		kfake.ListenFn(func(string, string) (net.Listener, error) { return l, nil }),
		kfake.GroupMinSessionTimeout(*minSession),
	}
	if *dataDir != "" {
		if err := os.MkdirAll(*dataDir, 0o755); err != nil {
			return fmt.Errorf("broker: %w", err)
		}
		opts = append(opts, kfake.DataDir(*dataDir))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		l.Close()
		return fmt.Errorf("broker: %w", err)
	}
	defer c.Close()
	fmt.Fprintf(stdout, "kafka broker (kfake) listening on %s\n", l.Addr())
	<-ctx.Done()
	return nil
}
