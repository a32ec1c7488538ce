package deploy_test

import (
	"testing"

	"helm.sh/helm/v3/pkg/chartutil"
	appsv1 "k8s.io/api/apps/v1"

	"github.com/funnelwatch/funnelwatch/processor"
)

// TestHelmScaleOutFollowsReplicas checks that the chart turns the scale-out
// mode on exactly when it runs more than one replica, keeping the other
// scale_out keys.
func TestHelmScaleOutFollowsReplicas(t *testing.T) {
	c := loadChart(t, chartDir)
	tests := []struct {
		name, values string
		want         bool
		wantTopic    string
	}{
		{name: "one replica", values: "replicaCount: 1", want: false},
		{name: "three replicas", values: "replicaCount: 3", want: true},
		{name: "three replicas keep the topic", values: "replicaCount: 3\nconfig: {scale_out: {deltas_topic: fw-deltas}}", want: true, wantTopic: "fw-deltas"},
		{name: "one replica may opt in", values: "config: {scale_out: {enabled: true}}", want: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vals, err := chartutil.ReadValues([]byte(tt.values))
			if err != nil {
				t.Fatal(err)
			}
			stream, _ := renderChart(t, c, vals)
			cfg, err := processor.ParseConfig([]byte(configData(t, decodeManifests(t, chartDir, stream))))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.ScaleOut.Enabled != tt.want {
				t.Errorf("got scale_out.enabled %v; want %v", cfg.ScaleOut.Enabled, tt.want)
			}
			if cfg.ScaleOut.DeltasTopic != tt.wantTopic {
				t.Errorf("got scale_out.deltas_topic %q; want %q", cfg.ScaleOut.DeltasTopic, tt.wantTopic)
			}
		})
	}
}

// TestKustomizeScaleOutFollowsReplicas checks that the base's replica
// count and its scale_out.enabled agree.
func TestKustomizeScaleOutFollowsReplicas(t *testing.T) {
	ms := decodeManifests(t, kustomizeDir, renderKustomize(t))
	cfg, err := processor.ParseConfig([]byte(configData(t, ms)))
	if err != nil {
		t.Fatal(err)
	}
	replicas := int32(1)
	if r := find[*appsv1.StatefulSet](t, ms, "funnelwatch").Spec.Replicas; r != nil {
		replicas = *r
	}
	if got, want := cfg.ScaleOut.Enabled, replicas > 1; got != want {
		t.Errorf("got scale_out.enabled %v with %d replicas; want %v", got, replicas, want)
	}
}
