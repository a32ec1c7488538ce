package deploy_test

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// buildTimeout bounds the static build of the whole binary on a cold cache.
const buildTimeout = 5 * time.Minute

// TestStaticBuild runs deploy/build.sh, which deploy/Dockerfile runs in its
// build stage, and checks that the binary can live in a distroless "static"
// image: no ELF interpreter, no shared libraries, stripped, stamped with
// the version and revision, and runnable.
func TestStaticBuild(t *testing.T) {
	t.Parallel() // mostly waiting on the go command
	if runtime.GOOS != "linux" {
		t.Fatalf("the image is linux; run this test on linux (GOOS %s)", runtime.GOOS)
	}
	out := filepath.Join(t.TempDir(), "funnelwatch")
	ctx, cancel := context.WithTimeout(t.Context(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "build.sh")
	cmd.Env = append(os.Environ(), "OUT="+out, "VERSION=v9.9.9-test", "REVISION=0123456789abcdef", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("deploy/build.sh: %v\n%s", err, stderr.String())
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("binary has an ELF interpreter (PT_INTERP): it is dynamically linked")
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	if len(libs) > 0 {
		t.Errorf("binary needs shared libraries (DT_NEEDED) %q", libs)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("binary has a symbol table; -ldflags -s did not apply")
	}

	info, err := buildinfo.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if info.Path != "github.com/funnelwatch/funnelwatch/cmd/funnelwatch" {
		t.Errorf("main package %q", info.Path)
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	for key, want := range map[string]string{"CGO_ENABLED": "0", "-trimpath": "true", "GOOS": "linux"} {
		if got := settings[key]; got != want {
			t.Errorf("build setting %s = %q, want %q", key, got, want)
		}
	}
	// With -trimpath the build info leaves -ldflags out, so check their
	// effects: -w drops DWARF, -X stamps the strings into the binary.
	for _, s := range f.Sections {
		if strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_") {
			t.Errorf("binary has DWARF section %s; -ldflags -w did not apply", s.Name)
		}
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"v9.9.9-test", "0123456789abcdef"} {
		if !bytes.Contains(bin, []byte(want)) {
			t.Errorf("binary lacks %q: -X main.version/main.revision stamp nothing (package main needs var version, revision string)", want)
		}
	}

	// The binary runs without a libc; `help` prints the commands and exits.
	run := exec.CommandContext(ctx, out, "help")
	usage, _ := run.CombinedOutput()
	if !strings.Contains(string(usage), "funnelwatch") || !strings.Contains(string(usage), "run") {
		t.Errorf("%s help printed %q", filepath.Base(out), usage)
	}
}

// TestDockerfile checks the Dockerfile against what the deploy manifests
// and build.sh rely on; there is no Docker engine in CI to build it.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	if stages := regexp.MustCompile(`(?mi)^FROM\s`).FindAllString(df, -1); len(stages) < 2 {
		t.Fatalf("want a multi-stage build, got %d FROM lines", len(stages))
	}
	final := lastFrom(df)
	if !strings.HasPrefix(final, "gcr.io/distroless/static") || !strings.HasSuffix(final, ":nonroot") {
		t.Errorf("final image %q, want gcr.io/distroless/static…:nonroot", final)
	}
	for _, want := range []string{
		"sh deploy/build.sh",
		"USER 65532:65532",
		"EXPOSE 9470",
		"VOLUME /var/lib/funnelwatch",
		`ENTRYPOINT ["/funnelwatch"]`,
		`CMD ["run", "--config.file=/etc/funnelwatch/funnelwatch.yaml", "--store.dir=/var/lib/funnelwatch"]`,
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if strings.Contains(df, "go build") {
		t.Errorf("Dockerfile runs go build itself; it must use deploy/build.sh so both builds stay the same")
	}
	ignore, err := os.ReadFile("Dockerfile.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(ignore), "!deploy/build.sh") {
		t.Errorf("Dockerfile.dockerignore leaves deploy/build.sh out of the build context")
	}
}

// lastFrom returns the image of the Dockerfile's last FROM instruction.
func lastFrom(df string) string {
	var image string
	for _, line := range strings.Split(df, "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 || !strings.EqualFold(fields[0], "FROM") {
			continue
		}
		for _, f := range fields[1:] {
			if !strings.HasPrefix(f, "--") {
				image = f
				break
			}
		}
	}
	return image
}
