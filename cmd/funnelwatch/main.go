// Command funnelwatch turns funnel events on Kafka into per-segment
// conversion rates, cohort conversion rates and degradation signals served as
// Prometheus metrics.
//
// Usage:
//
//	funnelwatch run          --config.file funnelwatch.yaml
//	funnelwatch demo         embedded broker, synthetic traffic, live page
//	funnelwatch generate     synthetic events into any Kafka cluster
//	funnelwatch check-config --config.file funnelwatch.yaml
//	funnelwatch inspect      --store.dir ./data
//	funnelwatch bench        end-to-end benchmark against an embedded broker
//	funnelwatch broker       the embedded Kafka broker alone
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// command is one subcommand. run receives the arguments after the
// subcommand name and returns when ctx is cancelled or the work is done.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() map[string]command {
	return map[string]command{
		"run":          {"consume events and serve metrics", runRun},
		"demo":         {"embedded broker, synthetic traffic and the page, all on loopback", runDemo},
		"generate":     {"write synthetic funnel events into a Kafka topic", runGenerate},
		"check-config": {"validate a configuration file and print it with defaults", runCheckConfig},
		"inspect":      {"print what a store holds, offline", runInspect},
		"bench":        {"measure end-to-end throughput against raw kafka-go", runBench},
		"broker":       {"run the embedded Kafka broker (kfake) alone, for trials without a cluster", runBroker},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "funnelwatch:", err)
		os.Exit(1)
	}
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		return flag.ErrHelp
	}
	c, ok := cmds[args[0]]
	if !ok {
		usage(stderr, cmds)
		return fmt.Errorf("unknown command %q", args[0])
	}
	return c.run(ctx, args[1:], stdout, stderr)
}

func usage(w io.Writer, cmds map[string]command) {
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w, "usage: funnelwatch <command> [flags]")
	fmt.Fprintln(w)
	for _, n := range names {
		fmt.Fprintf(w, "  %-13s %s\n", n, cmds[n].summary)
	}
}
