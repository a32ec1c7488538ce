package processor

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/exporter-toolkit/web"

	"github.com/funnelwatch/funnelwatch/store"
)

// Readiness is what /readyz asks besides the store being open.
type Readiness interface {
	Ready() bool
}

// Server serves /metrics, /healthz, /readyz, the JSON API and the page.
type Server struct {
	cfg     WebConfig
	handler http.Handler
	logger  *slog.Logger
}

// NewServer returns the HTTP server of a processor. ready may be nil (always
// ready, for tools that run without a consumer).
func NewServer(cfg WebConfig, p *Processor, ready Readiness, g prometheus.Gatherer, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorLog: slogErrorLog{logger}, EnableOpenMetrics: true}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ready != nil && !ready.Ready() {
			http.Error(w, "not ready: not in a consumer group generation or still catching up", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("GET /api/v1/segments", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, p.Snapshot())
	})
	mux.HandleFunc("GET /api/v1/trends", func(w http.ResponseWriter, r *http.Request) {
		hours := 24
		if h, err := strconv.Atoi(r.URL.Query().Get("hours")); err == nil && h > 0 && h <= 24*7 {
			hours = h
		}
		t, err := p.Trends(hours)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, t)
	})
	// The page and its assets (app.js, style.css); unknown paths are 404.
	mux.Handle("GET /", pageHandler())
	return &Server{cfg: cfg, handler: mux, logger: logger}
}

// Handler returns the server's handler, for tests.
func (s *Server) Handler() http.Handler { return s.handler }

func writeJSON(w http.ResponseWriter, v any) {
	// Marshal first: once the body has started, an error (a client gone
	// away) can no longer become a 500.
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(append(b, '\n'))
}

// Run listens on the configured address and serves until ctx is done.
func (s *Server) Run(ctx context.Context) error {
	l, err := net.Listen("tcp", s.cfg.ListenAddress)
	if err != nil {
		return fmt.Errorf("listen on %q: %w", s.cfg.ListenAddress, err)
	}
	return s.Serve(ctx, l)
}

// Serve serves on l until ctx is done, with TLS and basic auth from the
// exporter-toolkit web config file when one is configured. It closes l.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second}
	cfgFile := s.cfg.ConfigFile
	flags := &web.FlagConfig{WebConfigFile: &cfgFile}
	errc := make(chan error, 1)
	go func() { errc <- web.Serve(l, srv, flags, s.logger) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve http: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shut down http: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve http: %w", err)
	}
	return nil
}

type slogErrorLog struct{ l *slog.Logger }

func (s slogErrorLog) Println(v ...any) { s.l.Error(fmt.Sprint(v...)) }

// Trend holds hourly counts per segment over the last hours, for the page's
// sparklines: entities reaching each stage (flow) per hour.
type Trend struct {
	Start    time.Time              `json:"start"`
	Hours    int                    `json:"hours"`
	Stages   []string               `json:"stages"`
	Segments map[string]TrendSeries `json:"segments"`
}

// TrendSeries is one segment's hourly entities per stage: Entities[stage][hour].
type TrendSeries struct {
	Entities [][]int64 `json:"entities"`
}

// SegmentID is the id of a segment in Trend and SegmentView.
func segmentID(key string) string { return hex.EncodeToString([]byte(key)) }

// Trends reads the last hours of buckets (up to the processor clock) from
// the store and sums them per hour.
func (p *Processor) Trends(hours int) (*Trend, error) {
	p.mu.Lock()
	now := p.clockNow()
	p.mu.Unlock()
	hourMs := time.Hour.Milliseconds()
	end := floorDiv(now, hourMs) + 1 // exclusive, in hours
	start := end - int64(hours)
	t := &Trend{Start: time.UnixMilli(start * hourMs).UTC(), Hours: hours, Stages: p.cfg.Funnel.Stages, Segments: map[string]TrendSeries{}}
	l := p.layout
	series := map[string]TrendSeries{}
	err := p.st.Buckets(floorDiv(start*hourMs, p.bucketMs), floorDiv(end*hourMs, p.bucketMs)-1, func(b int64, key []byte, v store.Vector) {
		ts, ok := series[string(key)]
		if !ok {
			ts.Entities = make([][]int64, l.stages)
			for i := range ts.Entities {
				ts.Entities[i] = make([]int64, hours)
			}
			series[string(key)] = ts
		}
		h := floorDiv(b*p.bucketMs, hourMs) - start
		if h < 0 || h >= int64(hours) {
			return
		}
		for st := 0; st < l.stages; st++ {
			if i := l.entities(st); i < len(v) {
				ts.Entities[st][h] += v[i]
			}
		}
	})
	if err != nil {
		return nil, err
	}
	// A scaled-out replica's stage 2 keeps the segments it no longer
	// exports, frozen: the page shows those of the snapshot only.
	p.mu.Lock()
	p.sumsMu.Lock()
	for k, ts := range series {
		if s, ok := p.segments[store.Segment(k)]; !ok || !s.frozen {
			t.Segments[segmentID(k)] = ts
		}
	}
	p.sumsMu.Unlock()
	p.mu.Unlock()
	return t, nil
}
