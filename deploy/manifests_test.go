package deploy_test

// The Kubernetes artefacts: the kustomize base and the Helm chart are
// rendered with the libraries kubectl and helm use (krusty; the chart loader
// and template engine), every object is decoded strictly into its real Go
// type (an unknown field, a wrong type, a duplicate key or a mis-cased field
// fails, as the API server's strict field validation would), and the two
// renderings are checked to deploy the same thing.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	yamlv3 "go.yaml.in/yaml/v3"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/funnelwatch/funnelwatch/processor"
)

const (
	kustomizeDir = "kustomize"
	chartDir     = "helm/funnelwatch"
	// ruleSource is the single source of the alerting and recording rules.
	ruleSource = "rules/funnelwatch.rules.yaml"
	// dashboardSource is the Grafana dashboard both renderings ship.
	dashboardSource = "grafana/funnelwatch.json"
	// generatedPrometheusRule is ruleSource wrapped into a PrometheusRule for
	// kustomize, which can neither read ruleSource (outside its root) nor
	// wrap a plain rule file into an object.
	generatedPrometheusRule = "kustomize/prometheusrule.yaml"

	// releaseName makes the chart's full name "funnelwatch", the kustomize
	// base's name.
	releaseName = "funnelwatch"
	releaseNS   = "funnelwatch"
	// kubeVersion is the cluster version the chart is rendered for.
	kubeVersion = "v1.33.0"

	storeDir    = "/var/lib/funnelwatch"
	configFile  = "/etc/funnelwatch/funnelwatch.yaml"
	metricsPort = "http-metrics"
)

var updateGenerated = flag.Bool("update", false, "rewrite "+generatedPrometheusRule+" from "+ruleSource)

// manifest is one Kubernetes object decoded strictly into its Go type.
type manifest struct {
	Kind string
	Name string
	Obj  metav1.Object
}

func (m manifest) String() string { return m.Kind + "/" + m.Name }

// newObject returns an empty object of the Go type of apiVersion and kind,
// or nil for a kind the deploy artefacts do not use.
func newObject(apiVersion, kind string) metav1.Object {
	switch apiVersion + " " + kind {
	case "v1 ServiceAccount":
		return &corev1.ServiceAccount{}
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}
	case "v1 Service":
		return &corev1.Service{}
	case "apps/v1 StatefulSet":
		return &appsv1.StatefulSet{}
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}
	case "monitoring.coreos.com/v1 PrometheusRule":
		return &monitoringv1.PrometheusRule{}
	}
	return nil
}

// decodeStrict decodes one YAML document into obj the way the API server's
// strict field validation does: duplicate keys, unknown fields, fields in
// the wrong case and values of the wrong type are errors.
func decodeStrict(doc []byte, obj any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, obj)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// decodeManifests splits a YAML stream into documents and decodes each
// strictly into its Go type.
func decodeManifests(t *testing.T, source string, stream []byte) []manifest {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(stream)))
	var out []manifest
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: split documents: %v", source, err)
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			t.Fatalf("%s: document %d: %v", source, i, err)
		}
		if head.APIVersion == "" && head.Kind == "" {
			var rest map[string]any
			if err := yaml.Unmarshal(doc, &rest); err != nil || len(rest) > 0 {
				t.Fatalf("%s: document %d has no apiVersion and kind:\n%s", source, i, doc)
			}
			continue // only comments or blank
		}
		obj := newObject(head.APIVersion, head.Kind)
		if obj == nil {
			t.Fatalf("%s: document %d: unexpected %s %s", source, i, head.APIVersion, head.Kind)
		}
		if err := decodeStrict(doc, obj); err != nil {
			t.Fatalf("%s: %s %s: strict decoding: %v\n%s", source, head.Kind, obj.GetName(), err, doc)
		}
		if obj.GetName() == "" {
			t.Fatalf("%s: document %d: %s without a name", source, i, head.Kind)
		}
		out = append(out, manifest{Kind: head.Kind, Name: obj.GetName(), Obj: obj})
	}
	return out
}

// renderKustomize builds the kustomize base with the default (root only)
// load restrictions, as `kubectl apply -k deploy/kustomize` does.
func renderKustomize(t *testing.T) []byte {
	t.Helper()
	dir, err := filepath.Abs(kustomizeDir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", kustomizeDir, err)
	}
	out, err := m.AsYaml()
	if err != nil {
		t.Fatalf("kustomize build %s: %v", kustomizeDir, err)
	}
	return out
}

// loadChart loads the chart directory the way `helm install` does.
func loadChart(t *testing.T, dir string) *chart.Chart {
	t.Helper()
	// Helm logs every symbolic link it follows (rules/, dashboards/) on the
	// standard logger; TestHelmChartFiles checks the links instead.
	defer log.SetOutput(log.Writer())
	log.SetOutput(io.Discard)
	c, err := loader.Load(dir)
	if err != nil {
		t.Fatalf("load chart %s: %v", dir, err)
	}
	return c
}

// renderChart renders c with vals over its defaults the way `helm template`
// does and returns the manifests (without NOTES.txt) in template order and
// the rendered NOTES.txt.
func renderChart(t *testing.T, c *chart.Chart, vals map[string]any) (stream []byte, notes string) {
	t.Helper()
	caps := chartutil.DefaultCapabilities.Copy()
	kv, err := chartutil.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	caps.KubeVersion = *kv
	if !chartutil.IsCompatibleRange(c.Metadata.KubeVersion, kubeVersion) {
		t.Fatalf("chart kubeVersion %q excludes %s", c.Metadata.KubeVersion, kubeVersion)
	}
	opts := chartutil.ReleaseOptions{Name: releaseName, Namespace: releaseNS, Revision: 1, IsInstall: true}
	rv, err := chartutil.ToRenderValues(c, vals, opts, caps)
	if err != nil {
		t.Fatalf("chart values: %v", err)
	}
	files, err := engine.Render(c, rv)
	if err != nil {
		t.Fatalf("render chart: %v", err)
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	var b bytes.Buffer
	for _, name := range names {
		switch {
		case strings.HasSuffix(name, "/NOTES.txt"):
			notes = files[name]
			continue
		case strings.HasPrefix(path.Base(name), "_"):
			continue
		}
		fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", name, files[name])
	}
	return b.Bytes(), notes
}

// kinds lists "Kind/name" of every manifest, sorted.
func kinds(ms []manifest) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.String())
	}
	sort.Strings(out)
	return out
}

// find returns the only manifest of kind named name, failing the test when
// there is none.
func find[T metav1.Object](t *testing.T, ms []manifest, name string) T {
	t.Helper()
	for _, m := range ms {
		if o, ok := m.Obj.(T); ok && m.Name == name {
			return o
		}
	}
	var zero T
	t.Fatalf("no %T named %q in %v", zero, name, kinds(ms))
	return zero
}

// all returns every manifest of type T.
func all[T metav1.Object](ms []manifest) []T {
	var out []T
	for _, m := range ms {
		if o, ok := m.Obj.(T); ok {
			out = append(out, o)
		}
	}
	return out
}

// kustomizeHash matches the content hash kustomize appends to generated
// ConfigMaps.
var kustomizeHash = regexp.MustCompile(`-[a-z0-9]{10}$`)

// configMapName is the name of the funnelwatch.yaml ConfigMap without the
// kustomize hash suffix.
const configMapName = "funnelwatch-config"

// wantKinds are the objects both renderings create with everything on.
var wantKinds = []string{
	"ConfigMap/funnelwatch-config",
	"ConfigMap/funnelwatch-dashboards",
	"PodDisruptionBudget/funnelwatch",
	"PrometheusRule/funnelwatch",
	"Service/funnelwatch",
	"Service/funnelwatch-headless",
	"ServiceAccount/funnelwatch",
	"ServiceMonitor/funnelwatch",
	"StatefulSet/funnelwatch",
}

// unhashed returns kinds(ms) with kustomize's hash suffix cut off the
// generated configuration ConfigMap.
func unhashed(ms []manifest) []string {
	out := kinds(ms)
	for i, k := range out {
		if strings.HasPrefix(k, "ConfigMap/"+configMapName+"-") {
			out[i] = kustomizeHash.ReplaceAllString(k, "")
		}
	}
	return out
}

func TestKustomizeBuild(t *testing.T) {
	ms := decodeManifests(t, kustomizeDir, renderKustomize(t))
	if got := unhashed(ms); !slices.Equal(got, wantKinds) {
		t.Fatalf("kustomize objects:\ngot  %v\nwant %v", got, wantKinds)
	}
	for _, m := range ms {
		if ns := m.Obj.GetNamespace(); ns != "" {
			t.Errorf("%s: namespace %q in the base; leave it to overlays and kubectl -n", m, ns)
		}
	}
	checkDeployment(t, ms, "funnelwatch")
}

func TestHelmTemplate(t *testing.T) {
	c := loadChart(t, chartDir)
	without := func(drop ...string) []string {
		return slices.DeleteFunc(slices.Clone(wantKinds), func(k string) bool { return slices.Contains(drop, k) })
	}
	tests := []struct {
		name      string
		values    string
		wantKinds []string
	}{
		{name: "defaults", wantKinds: wantKinds},
		{
			name:      "servicemonitor off",
			values:    "serviceMonitor: {enabled: false}",
			wantKinds: without("ServiceMonitor/funnelwatch"),
		},
		{
			name:      "prometheusrule off",
			values:    "prometheusRule: {enabled: false}",
			wantKinds: without("PrometheusRule/funnelwatch"),
		},
		{
			name:      "no prometheus operator",
			values:    "serviceMonitor: {enabled: false}\nprometheusRule: {enabled: false}",
			wantKinds: without("ServiceMonitor/funnelwatch", "PrometheusRule/funnelwatch"),
		},
		{
			name: "kube-prometheus-stack labels",
			values: `
serviceMonitor:
  additionalLabels: {release: kube-prometheus-stack}
  relabelings: [{action: replace, targetLabel: cluster, replacement: eu-1}]
  metricRelabelings: [{action: drop, sourceLabels: [__name__], regex: go_gc_.*}]
prometheusRule:
  additionalLabels: {release: kube-prometheus-stack}
dashboards:
  annotations: {grafana_folder: Funnels}`,
			wantKinds: wantKinds,
		},
		{
			name:      "dashboards and pdb off",
			values:    "dashboards: {enabled: false}\npodDisruptionBudget: {enabled: false}",
			wantKinds: without("ConfigMap/funnelwatch-dashboards", "PodDisruptionBudget/funnelwatch"),
		},
		{
			name: "plaintext kafka without sasl",
			values: `
config:
  kafka:
    brokers: [kafka.kafka.svc:9092]
    tls: {enabled: false, ca_file: ""}
    sasl: {mechanism: "", username: "", password_env: ""}`,
			wantKinds: wantKinds,
		},
		{
			name: "production knobs",
			values: `
replicaCount: 3
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
serviceAccount: {create: false, name: shared}
persistence: {size: 50Gi, storageClassName: fast-ssd}
extraArgs: [--log.level=debug]
extraEnv: [{name: TZ, value: UTC}]
resources: {requests: {cpu: "2", memory: 1Gi}, limits: {memory: 2Gi}}
nodeSelector: {kubernetes.io/arch: amd64}
tolerations: [{key: dedicated, operator: Equal, value: funnel, effect: NoSchedule}]
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector: {matchLabels: {app.kubernetes.io/name: funnelwatch}}`,
			wantKinds: without("ServiceAccount/funnelwatch"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vals, err := chartutil.ReadValues([]byte(tt.values))
			if err != nil {
				t.Fatal(err)
			}
			stream, notes := renderChart(t, c, vals)
			ms := decodeManifests(t, chartDir, stream)
			if got := kinds(ms); !slices.Equal(got, tt.wantKinds) {
				t.Fatalf("objects:\ngot  %v\nwant %v", got, tt.wantKinds)
			}
			for _, m := range ms {
				if ns := m.Obj.GetNamespace(); ns != releaseNS {
					t.Errorf("%s: namespace %q, want the release namespace %q", m, ns, releaseNS)
				}
			}
			if !strings.Contains(notes, "port-forward svc/funnelwatch") {
				t.Errorf("NOTES.txt does not say how to reach the page:\n%s", notes)
			}
			checkDeployment(t, ms, "funnelwatch")
		})
	}
}

// TestHelmServiceMonitorTLS checks that the ServiceMonitor values for an
// endpoint behind TLS and basic auth (docs/security.md) reach the
// endpoint as the Prometheus Operator reads it.
func TestHelmServiceMonitorTLS(t *testing.T) {
	vals, err := chartutil.ReadValues([]byte(`
serviceMonitor:
  scheme: https
  tlsConfig: {ca: {secret: {name: funnelwatch-web, key: ca.crt}}, serverName: funnelwatch.funnelwatch.svc}
  basicAuth: {username: {name: funnelwatch-scrape, key: username}, password: {name: funnelwatch-scrape, key: password}}`))
	if err != nil {
		t.Fatal(err)
	}
	stream, _ := renderChart(t, loadChart(t, chartDir), vals)
	ep := find[*monitoringv1.ServiceMonitor](t, decodeManifests(t, chartDir, stream), "funnelwatch").Spec.Endpoints[0]
	if got, want := deref(ep.Scheme), monitoringv1.Scheme("https"); got != want {
		t.Errorf("scheme = %q; want %q", got, want)
	}
	if ep.TLSConfig == nil || ep.TLSConfig.CA.Secret == nil || ep.TLSConfig.CA.Secret.Name != "funnelwatch-web" ||
		deref(ep.TLSConfig.ServerName) != "funnelwatch.funnelwatch.svc" {
		t.Errorf("tlsConfig = %+v; want the CA from Secret funnelwatch-web and serverName funnelwatch.funnelwatch.svc", ep.TLSConfig)
	}
	if ep.BasicAuth == nil || ep.BasicAuth.Username.Name != "funnelwatch-scrape" || ep.BasicAuth.Password.Key != "password" {
		t.Errorf("basicAuth = %+v; want username and password from Secret funnelwatch-scrape", ep.BasicAuth)
	}
}

// deref is *p, or the zero value for nil.
func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

func TestHelmTemplateRejectsBadValues(t *testing.T) {
	c := loadChart(t, chartDir)
	tests := []struct {
		name, values string
	}{
		{"unknown top-level key", "replicas: 2"},
		{"replicas as string", `replicaCount: "two"`},
		{"pdb minAvailable", "podDisruptionBudget: {minAvailable: 1}"},
		{"unknown servicemonitor key", "serviceMonitor: {enable: true}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vals, err := chartutil.ReadValues([]byte(tt.values))
			if err != nil {
				t.Fatal(err)
			}
			opts := chartutil.ReleaseOptions{Name: releaseName, Namespace: releaseNS, IsInstall: true}
			if _, err := chartutil.ToRenderValues(c, vals, opts, nil); err == nil {
				t.Errorf("values %q accepted; want a schema error", tt.values)
			}
		})
	}
}

// TestHelmChartFiles checks that Helm's loader follows the chart's rules/
// and dashboards/ symlinks to deploy/rules and deploy/grafana, so the chart
// ships the very source files, and that a packaged chart (helm package
// resolves the links into the archive) renders the same.
func TestHelmChartFiles(t *testing.T) {
	for link, target := range map[string]string{"rules": "../../rules", "dashboards": "../../grafana"} {
		p := filepath.Join(chartDir, link)
		got, err := os.Readlink(p)
		if err != nil {
			t.Fatalf("%s must be a symlink to %s: %v", p, target, err)
		}
		if got != target {
			t.Errorf("%s -> %s, want -> %s", p, got, target)
		}
	}
	c := loadChart(t, chartDir)
	files := map[string][]byte{}
	for _, f := range c.Files {
		files[f.Name] = f.Data
	}
	for inChart, source := range map[string]string{
		"rules/funnelwatch.rules.yaml": ruleSource,
		"dashboards/funnelwatch.json":  dashboardSource,
	} {
		want, err := os.ReadFile(source)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := files[inChart]; !ok {
			t.Errorf("chart has no file %s (symlink not followed?)", inChart)
		} else if !bytes.Equal(got, want) {
			t.Errorf("chart file %s differs from %s", inChart, source)
		}
	}
	for name := range files {
		if strings.HasPrefix(name, "rules/tests/") || name == "dashboards/kustomization.yaml" {
			t.Errorf("chart ships %s; .helmignore should leave it out", name)
		}
	}

	archive, err := chartutil.Save(c, t.TempDir())
	if err != nil {
		t.Fatalf("package chart: %v", err)
	}
	packaged := loadChart(t, archive)
	dirStream, _ := renderChart(t, c, nil)
	tgzStream, _ := renderChart(t, packaged, nil)
	if !bytes.Equal(dirStream, tgzStream) {
		t.Errorf("the packaged chart %s renders differently from %s", filepath.Base(archive), chartDir)
	}
}

// TestKustomizeAndHelmAgree checks that both renderings deploy the same
// objects with the same essentials, so either install path gives the same
// funnelwatch.
func TestKustomizeAndHelmAgree(t *testing.T) {
	k := decodeManifests(t, kustomizeDir, renderKustomize(t))
	stream, _ := renderChart(t, loadChart(t, chartDir), nil)
	h := decodeManifests(t, chartDir, stream)
	if got, want := unhashed(k), kinds(h); !slices.Equal(got, want) {
		t.Fatalf("objects differ:\nkustomize %v\nhelm      %v", got, want)
	}

	ks := find[*appsv1.StatefulSet](t, k, "funnelwatch")
	hs := find[*appsv1.StatefulSet](t, h, "funnelwatch")
	sameJSON(t, "StatefulSet spec", statefulSetEssentials(ks), statefulSetEssentials(hs))

	for _, name := range []string{"funnelwatch", "funnelwatch-headless"} {
		sameJSON(t, "Service "+name+" spec", find[*corev1.Service](t, k, name).Spec, find[*corev1.Service](t, h, name).Spec)
	}
	sameJSON(t, "PodDisruptionBudget spec",
		find[*policyv1.PodDisruptionBudget](t, k, "funnelwatch").Spec, find[*policyv1.PodDisruptionBudget](t, h, "funnelwatch").Spec)
	sameJSON(t, "ServiceMonitor spec",
		find[*monitoringv1.ServiceMonitor](t, k, "funnelwatch").Spec, find[*monitoringv1.ServiceMonitor](t, h, "funnelwatch").Spec)
	if kr, hr := squashedJSON(t, find[*monitoringv1.PrometheusRule](t, k, "funnelwatch").Spec),
		squashedJSON(t, find[*monitoringv1.PrometheusRule](t, h, "funnelwatch").Spec); kr != hr {
		t.Errorf("PrometheusRule spec differs between kustomize and helm:\n%s", lineDiff(kr, hr))
	}
	sameJSON(t, "dashboards ConfigMap data",
		find[*corev1.ConfigMap](t, k, "funnelwatch-dashboards").Data, find[*corev1.ConfigMap](t, h, "funnelwatch-dashboards").Data)

	// The configuration files differ in layout (Helm re-serialises values)
	// but must mean the same.
	sameJSON(t, "funnelwatch.yaml",
		yamlValue(t, configData(t, k)), yamlValue(t, configData(t, h)))
	kc, err := processor.ParseConfig([]byte(configData(t, k)))
	if err != nil {
		t.Fatal(err)
	}
	hc, err := processor.ParseConfig([]byte(configData(t, h)))
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "parsed funnelwatch.yaml", kc, hc)
}

// statefulSetEssentials is the part of a StatefulSet both renderings must
// agree on: everything but metadata, the Helm-only labels and checksum
// annotation, and the hash suffix of the kustomize ConfigMap.
func statefulSetEssentials(s *appsv1.StatefulSet) appsv1.StatefulSetSpec {
	spec := *s.Spec.DeepCopy()
	spec.Template.Annotations = nil
	for i := range spec.Template.Spec.Volumes {
		if cm := spec.Template.Spec.Volumes[i].ConfigMap; cm != nil {
			cm.Name = kustomizeHash.ReplaceAllString(cm.Name, "")
		}
	}
	for i := range spec.VolumeClaimTemplates {
		spec.VolumeClaimTemplates[i].Labels = nil
	}
	return spec
}

// sameJSON fails the test when got and want have different JSON forms.
func sameJSON(t *testing.T, what string, kustomize, helm any) {
	t.Helper()
	k, err := json.MarshalIndent(kustomize, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	h, err := json.MarshalIndent(helm, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k, h) {
		t.Errorf("%s differs between kustomize and helm:\n%s", what, lineDiff(string(k), string(h)))
	}
}

// lineDiff shows the lines of a and b that the other lacks; enough to spot
// a difference in two JSON documents.
func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out []string
	for _, l := range al {
		if !slices.Contains(bl, l) {
			out = append(out, "- kustomize: "+l)
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			out = append(out, "+ helm:      "+l)
		}
	}
	if len(out) == 0 {
		return "(same lines, different order)"
	}
	return strings.Join(out, "\n")
}

// yamlValue decodes YAML into generic values, for comparing meaning rather
// than layout.
func yamlValue(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := yaml.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// configData returns funnelwatch.yaml from the configuration ConfigMap.
func configData(t *testing.T, ms []manifest) string {
	t.Helper()
	for _, cm := range all[*corev1.ConfigMap](ms) {
		if kustomizeHash.ReplaceAllString(cm.Name, "") == configMapName || cm.Name == configMapName {
			s, ok := cm.Data["funnelwatch.yaml"]
			if !ok {
				t.Fatalf("ConfigMap %s has no funnelwatch.yaml", cm.Name)
			}
			return s
		}
	}
	t.Fatalf("no ConfigMap %s in %v", configMapName, kinds(ms))
	return ""
}

// checkDeployment checks what makes the objects work together and what the
// platform teams' policies (Pod Security "restricted") expect, whatever the
// rendering and the values.
func checkDeployment(t *testing.T, ms []manifest, name string) {
	t.Helper()
	sts := find[*appsv1.StatefulSet](t, ms, name)
	pod := sts.Spec.Template
	podLabels := labels.Set(pod.Labels)

	sel, err := metav1.LabelSelectorAsSelector(sts.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(podLabels) {
		t.Errorf("StatefulSet selector %v does not select its pods %v (%v)", sts.Spec.Selector, pod.Labels, err)
	}
	if sts.Spec.UpdateStrategy.Type != appsv1.RollingUpdateStatefulSetStrategyType {
		t.Errorf("updateStrategy %q, want RollingUpdate", sts.Spec.UpdateStrategy.Type)
	}
	if p := sts.Spec.PersistentVolumeClaimRetentionPolicy; p == nil || p.WhenDeleted != appsv1.RetainPersistentVolumeClaimRetentionPolicyType {
		t.Errorf("persistentVolumeClaimRetentionPolicy %+v: the store must survive deleting the StatefulSet", p)
	}

	// Services: the governing one is headless, the metrics one is what the
	// ServiceMonitor selects; both reach the pods' metrics port.
	var headless, metrics *corev1.Service
	for _, svc := range all[*corev1.Service](ms) {
		if !labels.SelectorFromSet(svc.Spec.Selector).Matches(podLabels) || len(svc.Spec.Selector) == 0 {
			t.Errorf("Service %s selector %v does not select the pods %v", svc.Name, svc.Spec.Selector, pod.Labels)
		}
		if svc.Spec.ClusterIP == corev1.ClusterIPNone {
			headless = svc
		} else {
			metrics = svc
		}
		if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != metricsPort || svc.Spec.Ports[0].Port != 9470 ||
			svc.Spec.Ports[0].TargetPort.StrVal != metricsPort {
			t.Errorf("Service %s ports %+v, want %s 9470 -> %s", svc.Name, svc.Spec.Ports, metricsPort, metricsPort)
		}
	}
	if headless == nil || sts.Spec.ServiceName != headless.Name {
		t.Errorf("StatefulSet serviceName %q is not a headless Service of the release", sts.Spec.ServiceName)
	}
	if metrics == nil {
		t.Fatalf("no metrics Service")
	}

	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	if len(c.Ports) != 1 || c.Ports[0].Name != metricsPort || c.Ports[0].ContainerPort != 9470 {
		t.Errorf("container ports %+v, want %s 9470", c.Ports, metricsPort)
	}
	for _, want := range []string{"run", "--config.file=" + configFile, "--store.dir=" + storeDir, "--web.listen-address=:9470"} {
		if !slices.Contains(c.Args, want) {
			t.Errorf("container args %q lack %q", c.Args, want)
		}
	}
	if c.Args[0] != "run" {
		t.Errorf("container args %q do not start with the run command", c.Args)
	}
	if !strings.HasPrefix(c.Image, "ghcr.io/funnelwatch/funnelwatch") {
		t.Errorf("image %q", c.Image)
	}

	probes := []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", c.StartupProbe, "/healthz"},
		{"livenessProbe", c.LivenessProbe, "/healthz"},
		{"readinessProbe", c.ReadinessProbe, "/readyz"},
	}
	for _, p := range probes {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s missing or not an HTTP probe", p.name)
			continue
		}
		if p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.StrVal != metricsPort {
			t.Errorf("%s probes %s on %v, want %s on %s", p.name, p.probe.HTTPGet.Path, p.probe.HTTPGet.Port, p.path, metricsPort)
		}
	}
	if s := c.StartupProbe; s != nil && s.PeriodSeconds*s.FailureThreshold < 120 {
		t.Errorf("startupProbe allows %ds to open the store; want at least 120s", s.PeriodSeconds*s.FailureThreshold)
	}

	if g := pod.Spec.TerminationGracePeriodSeconds; g == nil || *g < 60 {
		t.Errorf("terminationGracePeriodSeconds %s; want at least 60 to flush and commit", intPtr(g))
	}
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().IsZero() || req.Memory().IsZero() || lim.Memory().IsZero() {
		t.Errorf("resources %+v: want cpu and memory requests and a memory limit", c.Resources)
	}

	checkSecurity(t, pod.Spec, c)

	// Service account: never a token.
	if pod.Spec.AutomountServiceAccountToken == nil || *pod.Spec.AutomountServiceAccountToken {
		t.Errorf("pod automountServiceAccountToken %s, want false", boolPtr(pod.Spec.AutomountServiceAccountToken))
	}
	for _, sa := range all[*corev1.ServiceAccount](ms) {
		if sa.Name != pod.Spec.ServiceAccountName {
			t.Errorf("ServiceAccount %s is not the pods' %s", sa.Name, pod.Spec.ServiceAccountName)
		}
		if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
			t.Errorf("ServiceAccount %s automountServiceAccountToken %s, want false", sa.Name, boolPtr(sa.AutomountServiceAccountToken))
		}
	}

	// The store: one claim per pod, mounted where --store.dir points.
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	if len(sts.Spec.VolumeClaimTemplates) != 1 || sts.Spec.VolumeClaimTemplates[0].Name != "data" {
		t.Fatalf("volumeClaimTemplates %+v, want one named data", sts.Spec.VolumeClaimTemplates)
	}
	if m := mounts["data"]; m.MountPath != storeDir || m.ReadOnly {
		t.Errorf("data volume mounted at %q (readOnly %v), want %s", m.MountPath, m.ReadOnly, storeDir)
	}
	vct := sts.Spec.VolumeClaimTemplates[0]
	if s := vct.Spec.Resources.Requests.Storage(); s.IsZero() || !slices.Contains(vct.Spec.AccessModes, corev1.ReadWriteOnce) {
		t.Errorf("volumeClaimTemplate %+v: want a ReadWriteOnce size request", vct.Spec)
	}

	// Configuration: mounted where --config.file points, valid for
	// funnelwatch, pointing at the volume and the Secrets the pod has.
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = v
	}
	cfgVol, ok := volumes["config"]
	if !ok || cfgVol.ConfigMap == nil || mounts["config"].MountPath != path.Dir(configFile) {
		t.Fatalf("no ConfigMap volume config mounted at %s", path.Dir(configFile))
	}
	find[*corev1.ConfigMap](t, ms, cfgVol.ConfigMap.Name)
	raw := configData(t, ms)
	cfg, err := processor.ParseConfig([]byte(raw))
	if err != nil {
		t.Fatalf("funnelwatch.yaml is not a valid configuration: %v\n%s", err, raw)
	}
	if cfg.Store.Dir != storeDir {
		t.Errorf("funnelwatch.yaml store.dir %q, want %s", cfg.Store.Dir, storeDir)
	}
	if env := cfg.Kafka.SASL.PasswordEnv; env != "" {
		var found bool
		for _, e := range c.Env {
			if e.Name == env {
				found = e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Name != ""
			}
		}
		if !found {
			t.Errorf("kafka.sasl.password_env %s is not set from a Secret in the container env %+v", env, c.Env)
		}
	}
	if cfg.Kafka.TLS.Enabled {
		for _, f := range []string{cfg.Kafka.TLS.CAFile, cfg.Kafka.TLS.CertFile, cfg.Kafka.TLS.KeyFile} {
			if f == "" {
				continue
			}
			var found bool
			for _, m := range c.VolumeMounts {
				if v := volumes[m.Name]; v.Secret != nil && path.Dir(f) == m.MountPath {
					found = true
				}
			}
			if !found {
				t.Errorf("kafka.tls file %s is not in a Secret volume mount", f)
			}
		}
	} else if _, ok := volumes["kafka-tls"]; ok {
		t.Errorf("kafka-tls Secret volume mounted although kafka.tls.enabled is false")
	}

	if pdb := all[*policyv1.PodDisruptionBudget](ms); len(pdb) == 1 {
		s, err := metav1.LabelSelectorAsSelector(pdb[0].Spec.Selector)
		if err != nil || !s.Matches(podLabels) {
			t.Errorf("PodDisruptionBudget selector %v does not select the pods", pdb[0].Spec.Selector)
		}
		if pdb[0].Spec.MaxUnavailable == nil || pdb[0].Spec.MaxUnavailable.IntValue() != 1 || pdb[0].Spec.MinAvailable != nil {
			t.Errorf("PodDisruptionBudget %+v, want maxUnavailable 1", pdb[0].Spec)
		}
	}

	for _, sm := range all[*monitoringv1.ServiceMonitor](ms) {
		s, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil || !s.Matches(labels.Set(metrics.Labels)) {
			t.Errorf("ServiceMonitor selector %v does not select the metrics Service %v", sm.Spec.Selector, metrics.Labels)
		}
		if s.Matches(labels.Set(headless.Labels)) {
			t.Errorf("ServiceMonitor also selects the headless Service: every pod would be scraped twice")
		}
		if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != metricsPort || sm.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("ServiceMonitor endpoints %+v, want %s /metrics", sm.Spec.Endpoints, metricsPort)
		}
		if l := sm.Spec.JobLabel; l == "" || metrics.Labels[l] != "funnelwatch" {
			t.Errorf("ServiceMonitor jobLabel %q: the job must be \"funnelwatch\", which the rules match", l)
		}
	}

	for _, pr := range all[*monitoringv1.PrometheusRule](ms) {
		checkPrometheusRule(t, pr)
	}

	for _, cm := range all[*corev1.ConfigMap](ms) {
		if cm.Name != "funnelwatch-dashboards" {
			continue
		}
		if cm.Labels["grafana_dashboard"] != "1" {
			t.Errorf("ConfigMap %s labels %v lack grafana_dashboard: \"1\" for Grafana's sidecar", cm.Name, cm.Labels)
		}
		want, err := os.ReadFile(dashboardSource)
		if err != nil {
			t.Fatal(err)
		}
		if got := cm.Data[path.Base(dashboardSource)]; got != string(want) {
			t.Errorf("ConfigMap %s does not hold %s verbatim", cm.Name, dashboardSource)
		}
		if size := len(want); size > 256<<10 {
			// kubectl apply keeps a copy in an annotation limited to 256KiB.
			t.Errorf("ConfigMap %s is %d bytes; client-side kubectl apply fails above 256KiB", cm.Name, size)
		}
	}
}

// checkSecurity checks the Pod Security Standard "restricted" profile and a
// read-only root file system.
func checkSecurity(t *testing.T, spec corev1.PodSpec, c corev1.Container) {
	t.Helper()
	ps := spec.SecurityContext
	if ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot || ps.RunAsUser == nil || *ps.RunAsUser != 65532 ||
		ps.FSGroup == nil || *ps.FSGroup != 65532 || ps.SeccompProfile == nil || ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod securityContext %+v: want runAsNonRoot, runAsUser 65532, fsGroup 65532, seccomp RuntimeDefault", ps)
	}
	cs := c.SecurityContext
	if cs == nil {
		t.Fatalf("container has no securityContext")
	}
	if cs.AllowPrivilegeEscalation == nil || *cs.AllowPrivilegeEscalation {
		t.Errorf("allowPrivilegeEscalation %s, want false", boolPtr(cs.AllowPrivilegeEscalation))
	}
	if cs.ReadOnlyRootFilesystem == nil || !*cs.ReadOnlyRootFilesystem {
		t.Errorf("readOnlyRootFilesystem %s, want true", boolPtr(cs.ReadOnlyRootFilesystem))
	}
	if cs.RunAsNonRoot == nil || !*cs.RunAsNonRoot || cs.RunAsUser == nil || *cs.RunAsUser != 65532 {
		t.Errorf("container runAsNonRoot %s runAsUser %s, want true and 65532", boolPtr(cs.RunAsNonRoot), intPtr(cs.RunAsUser))
	}
	if cs.Capabilities == nil || !slices.Equal(cs.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(cs.Capabilities.Add) > 0 {
		t.Errorf("capabilities %+v, want drop [ALL] and nothing added", cs.Capabilities)
	}
	if cs.SeccompProfile == nil || cs.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("container seccompProfile %+v, want RuntimeDefault", cs.SeccompProfile)
	}
	if cs.Privileged != nil && *cs.Privileged {
		t.Errorf("privileged container")
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Errorf("pod uses host namespaces")
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			t.Errorf("volume %s is a hostPath", v.Name)
		}
	}
}

// boolPtr and intPtr print optional API fields.
func boolPtr(b *bool) string {
	if b == nil {
		return "unset"
	}
	return fmt.Sprint(*b)
}

func intPtr(i *int64) string {
	if i == nil {
		return "unset"
	}
	return fmt.Sprint(*i)
}

// checkPrometheusRule checks that a PrometheusRule carries exactly the
// groups of the rule source file. Runs of white space in strings are
// compared as one space: kustomize re-emits YAML with go-yaml v3, whose
// emitter adds a blank line before the more-indented lines of a folded (>)
// scalar, so kustomize's copy of such an annotation template gains a line
// break (harmless inside {{- -}} actions, and avoided with literal | blocks).
func checkPrometheusRule(t *testing.T, pr *monitoringv1.PrometheusRule) {
	t.Helper()
	src, err := os.ReadFile(ruleSource)
	if err != nil {
		t.Fatal(err)
	}
	var want monitoringv1.PrometheusRuleSpec
	if err := decodeStrict(src, &want); err != nil {
		t.Fatalf("%s does not decode strictly as a PrometheusRule spec: %v", ruleSource, err)
	}
	if len(want.Groups) == 0 {
		t.Fatalf("%s has no groups", ruleSource)
	}
	got, wantJSON := squashedJSON(t, pr.Spec), squashedJSON(t, want)
	if got != wantJSON {
		t.Errorf("PrometheusRule %s spec differs from %s:\n%s", pr.Name, ruleSource, lineDiff(wantJSON, got))
	}
}

// squashedJSON returns v as indented JSON with every run of white space in
// its strings replaced by one space.
func squashedJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var generic any
	if err := json.Unmarshal(b, &generic); err != nil {
		t.Fatal(err)
	}
	var squash func(any) any
	squash = func(v any) any {
		switch v := v.(type) {
		case string:
			return strings.Join(strings.Fields(v), " ")
		case []any:
			for i := range v {
				v[i] = squash(v[i])
			}
		case map[string]any:
			for k := range v {
				v[k] = squash(v[k])
			}
		}
		return v
	}
	out, err := json.MarshalIndent(squash(generic), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// TestRuleSourceParsesAlike checks that the rule file means the same to
// Prometheus and kustomize (go.yaml.in/yaml/v3, YAML 1.2) as to kubectl and
// Helm (sigs.k8s.io/yaml on yaml.v2, YAML 1.1), which read the rules once
// they are inside a PrometheusRule: unquoted on/off/yes/no, octal-looking
// numbers and the like differ between the two.
func TestRuleSourceParsesAlike(t *testing.T) {
	src, err := os.ReadFile(ruleSource)
	if err != nil {
		t.Fatal(err)
	}
	var k8s, prom any
	if err := yaml.Unmarshal(src, &k8s); err != nil {
		t.Fatal(err)
	}
	if err := yamlv3.Unmarshal(src, &prom); err != nil {
		t.Fatal(err)
	}
	var diffs []string
	var walk func(p string, a, b any)
	walk = func(p string, a, b any) {
		switch a := a.(type) {
		case map[string]any:
			bm, _ := b.(map[string]any)
			for k := range a {
				walk(p+"."+k, a[k], bm[k])
			}
		case []any:
			bl, _ := b.([]any)
			for i := range a {
				if i < len(bl) {
					walk(fmt.Sprintf("%s[%d]", p, i), a[i], bl[i])
				}
			}
		default:
			if fmt.Sprint(a) != fmt.Sprint(b) {
				diffs = append(diffs, fmt.Sprintf("%s:\n  kubectl/helm: %q\n  prometheus:   %q", p, a, b))
			}
		}
	}
	walk("", k8s, prom)
	if len(diffs) > 0 {
		t.Errorf("%s reads differently to Prometheus/kustomize (yaml v3) and kubectl/Helm (yaml v2); quote these values:\n%s",
			ruleSource, strings.Join(diffs, "\n"))
	}
}

// prometheusRuleHeader precedes the rule file in generatedPrometheusRule.
const prometheusRuleHeader = `# Code generated from deploy/` + ruleSource + ` by
# "go test -run TestKustomizePrometheusRuleIsGenerated -update" in deploy/. DO NOT EDIT.
#
# The spec below is that file indented: edit the rules there, then regenerate.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: funnelwatch
  labels:
    app.kubernetes.io/name: funnelwatch
    app.kubernetes.io/instance: funnelwatch
spec:
`

// generatePrometheusRule wraps the rule file into a PrometheusRule the way
// the Helm chart's template does: the file's lines indented under spec.
func generatePrometheusRule(rules []byte) []byte {
	var b bytes.Buffer
	b.WriteString(prometheusRuleHeader)
	for _, line := range strings.SplitAfter(strings.TrimRight(string(rules), "\n")+"\n", "\n") {
		if strings.TrimSpace(line) == "" {
			b.WriteString(strings.TrimLeft(line, " \t"))
			continue
		}
		b.WriteString("  " + line)
	}
	return b.Bytes()
}

// TestKustomizePrometheusRuleIsGenerated fails when the kustomize
// PrometheusRule no longer matches the rule source file. The Helm chart
// needs no such copy: it reads the file through its rules/ symlink.
func TestKustomizePrometheusRuleIsGenerated(t *testing.T) {
	rules, err := os.ReadFile(ruleSource)
	if err != nil {
		t.Fatal(err)
	}
	want := generatePrometheusRule(rules)
	if *updateGenerated {
		if err := os.WriteFile(generatedPrometheusRule, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(generatedPrometheusRule)
	if err != nil {
		t.Fatalf("%v; generate it with: go test -run %s -update", err, t.Name())
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is out of date with %s; regenerate it with: go test -run %s -update", generatedPrometheusRule, ruleSource, t.Name())
	}
	ms := decodeManifests(t, generatedPrometheusRule, got)
	checkPrometheusRule(t, find[*monitoringv1.PrometheusRule](t, ms, "funnelwatch"))
}

// TestDecodeStrict makes sure the decoder the tests rely on rejects what
// the API server's strict field validation rejects.
func TestDecodeStrict(t *testing.T) {
	tests := []struct {
		name, doc string
		wantErr   bool
	}{
		{"valid", "metadata: {name: x}\nspec: {replicas: 1, serviceName: s}", false},
		{"unknown field", "metadata: {name: x}\nspec: {replica: 1}", true},
		{"wrong type", "metadata: {name: x}\nspec: {replicas: one}", true},
		{"wrong case", "metadata: {Name: x}", true},
		{"duplicate key", "metadata: {name: x, name: y}", true},
		{"misplaced field", "metadata: {name: x}\nspec: {template: {spec: {image: x}}}", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := decodeStrict([]byte(tt.doc), &appsv1.StatefulSet{})
			if (err != nil) != tt.wantErr {
				t.Errorf("decodeStrict(%q) = %v; want error %v", tt.doc, err, tt.wantErr)
			}
		})
	}
}

// docsFile is the deployment guide whose kustomize overlay example
// TestDocsKustomizeOverlay builds.
const docsFile = "../docs/deploy.md"

// docBlock returns the fenced code block of docsFile whose first line is
// first.
func docBlock(t *testing.T, doc, first string) string {
	t.Helper()
	for _, block := range strings.Split(doc, "```")[1:] {
		// A block starts with its info string (yaml) on the fence line.
		_, body, _ := strings.Cut(block, "\n")
		if strings.HasPrefix(body, first+"\n") {
			return body
		}
	}
	t.Fatalf("%s has no code block starting with %q", docsFile, first)
	return ""
}

// TestDocsKustomizeOverlay builds the overlay example of docs/deploy.md on
// top of this checkout's base (instead of the GitHub URL it names), so the
// documented way of installing keeps working.
func TestDocsKustomizeOverlay(t *testing.T) {
	b, err := os.ReadFile(docsFile)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	base, err := filepath.Abs(kustomizeDir)
	if err != nil {
		t.Fatal(err)
	}
	remote := regexp.MustCompile(`https://github\.com/funnelwatch/funnelwatch//deploy/kustomize\?ref=\S+`)
	overlay := docBlock(t, doc, "# overlays/prod/kustomization.yaml")
	if !remote.MatchString(overlay) {
		t.Fatalf("the overlay example does not use the base by its GitHub URL:\n%s", overlay)
	}
	// kustomize takes a relative path to another kustomization only.
	overlay = remote.ReplaceAllString(overlay, "BASE")
	config := docBlock(t, doc, "# overlays/prod/funnelwatch.yaml")

	// The same overlay without the Prometheus Operator's objects.
	var k map[string]any
	if err := yaml.Unmarshal([]byte(overlay), &k); err != nil {
		t.Fatal(err)
	}
	var del map[string]any
	if err := yaml.Unmarshal([]byte(docBlock(t, doc, "patches:\n  - patch: |-\n      $patch: delete")), &del); err != nil {
		t.Fatal(err)
	}
	k["patches"] = append(k["patches"].([]any), del["patches"].([]any)...)
	withoutOperator, err := yaml.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, kustomization string
		wantKinds           []string
	}{
		{"overlay", overlay, wantKinds},
		{"without operator", string(withoutOperator), slices.DeleteFunc(slices.Clone(wantKinds), func(k string) bool {
			return k == "ServiceMonitor/funnelwatch" || k == "PrometheusRule/funnelwatch"
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			rel, err := filepath.Rel(dir, base)
			if err != nil {
				t.Fatal(err)
			}
			kustomization := strings.ReplaceAll(tt.kustomization, "BASE", rel)
			for name, content := range map[string]string{"kustomization.yaml": kustomization, "funnelwatch.yaml": config} {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
			if err != nil {
				t.Fatalf("kustomize build of the documented overlay: %v\n%s", err, kustomization)
			}
			out, err := m.AsYaml()
			if err != nil {
				t.Fatal(err)
			}
			ms := decodeManifests(t, "overlay", out)
			if got := unhashed(ms); !slices.Equal(got, tt.wantKinds) {
				t.Fatalf("objects:\ngot  %v\nwant %v", got, tt.wantKinds)
			}
			for _, m := range ms {
				if m.Obj.GetNamespace() != "funnelwatch" {
					t.Errorf("%s in namespace %q, want funnelwatch", m, m.Obj.GetNamespace())
				}
				if _, ok := m.Obj.(*monitoringv1.ServiceMonitor); ok && m.Obj.GetLabels()["release"] != "kube-prometheus-stack" {
					t.Errorf("%s lacks the release label", m)
				}
				if _, ok := m.Obj.(*monitoringv1.PrometheusRule); ok && m.Obj.GetLabels()["release"] != "kube-prometheus-stack" {
					t.Errorf("%s lacks the release label", m)
				}
			}
			sts := find[*appsv1.StatefulSet](t, ms, "funnelwatch")
			if got := sts.Spec.VolumeClaimTemplates[0].Spec.Resources.Requests.Storage().String(); got != "20Gi" {
				t.Errorf("volume size %s, want the overlay's 20Gi", got)
			}
			if got := configData(t, ms); got != config {
				t.Errorf("funnelwatch.yaml is not the overlay's:\n%s", got)
			}
			checkDeployment(t, ms, "funnelwatch")
		})
	}
}
