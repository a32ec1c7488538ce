#!/bin/sh
# Builds the funnelwatch binary the way deploy/Dockerfile does: static
# (CGO_ENABLED=0), reproducible paths (-trimpath), stripped (-s -w), with the
# version and revision that funnel_build_info reports.
#
#   deploy/build.sh                        # ./funnelwatch, version from git
#   VERSION=v1.2.3 REVISION=abc OUT=/tmp/fw deploy/build.sh
#
# GOOS and GOARCH are honoured for cross-builds (docker buildx passes them).
set -eu

out=${OUT:-funnelwatch}
case $out in
/*) ;;
*) out=$PWD/$out ;;
esac

cd "$(dirname "$0")/.."

version=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
revision=${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

CGO_ENABLED=0 exec go build -trimpath \
	-ldflags "-s -w -X main.version=$version -X main.revision=$revision" \
	-o "$out" ./cmd/funnelwatch
