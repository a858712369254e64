#!/usr/bin/env bash
# Builds the OpenTelemetry Collector of the telemetry tests (main.go: OTLP receiver, file exporter)
# from the Go modules next to this script, into a cache outside the clone keyed by the collector's
# version, and prints the binary's path (and nothing else) on stdout. A second call, or a concurrent
# one, reuses the same build: it waits on a lock instead of building twice.
#
#   MEDMO_OTELCOL="$(tests/otelcol/build.sh)"
#
# Env: MEDMO_CACHE (default ~/.cache/medmo); MEDMO_BUILD_JOBS (go build -p, default: cores).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

command -v go >/dev/null || {
  echo "otelcol/build.sh: Go is needed to build the OpenTelemetry Collector: install Go >= 1.26" >&2
  exit 1
}
# The version of the collector's core module as go.mod pins it, and a digest of the sources: a new
# pin or a changed main.go builds a new binary.
version="$(cd "$here" && go list -m -f '{{.Version}}' go.opentelemetry.io/collector/otelcol)"
digest="$(cat "$here/main.go" "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-12)"
cache_dir="${MEDMO_CACHE:-$HOME/.cache/medmo}/otelcol-$version-$digest"
binary="$cache_dir/otelcol-medmo"

if [ -x "$binary" ]; then
  echo "$binary"
  exit 0
fi
mkdir -p "$cache_dir"
exec 9>"$cache_dir.lock"
flock 9
if [ -x "$binary" ]; then  # another caller finished the build while we waited for the lock
  echo "$binary"
  exit 0
fi

start=$SECONDS
echo "otelcol/build.sh: building the OpenTelemetry Collector $version into $cache_dir" >&2
(cd "$here" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -p "${MEDMO_BUILD_JOBS:-$(nproc)}" -trimpath \
  -ldflags "-s -w" -o "$binary.partial" . >&2)
mv "$binary.partial" "$binary"
echo "otelcol/build.sh: built in $((SECONDS - start)) s" >&2
echo "$binary"
