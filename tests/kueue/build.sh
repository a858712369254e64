#!/usr/bin/env bash
# Builds Kueue's manager (cmd/kueue of the Go module sigs.k8s.io/kueue) into a cache outside the
# clone keyed by its version, copies Kueue's CRDs and webhook manifests from the module next to it,
# and prints the binary's path (and nothing else) on stdout. A second call, or a concurrent one, reuses the same build: it waits on a
# lock instead of building twice.
#
#   KUEUE_BIN="$(tests/kueue/build.sh)"     # .../kueue-<ver>/bin/kueue
#                                            # .../kueue-<ver>/crds/*.yaml, .../kueue-<ver>/webhooks.yaml
#
# Env: MEDMO_CACHE (default ~/.cache/medmo); MEDMO_BUILD_JOBS (go build -p, default: cores);
#      KUEUE_VERSION (default below; the module proxy must serve it).
set -euo pipefail

KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
cache_dir="${MEDMO_CACHE:-$HOME/.cache/medmo}/kueue-$KUEUE_VERSION"
bin="$cache_dir/bin/kueue"

built() { [ -x "$bin" ] && [ -d "$cache_dir/crds" ] && [ -f "$cache_dir/webhooks.yaml" ]; }

if built; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || {
  echo "kueue/build.sh: Go is needed to build Kueue: install Go >= 1.25 (or any Go >= 1.21 with" \
       "GOTOOLCHAIN=auto) and retry" >&2
  exit 1
}
mkdir -p "$cache_dir"
exec 9>"$cache_dir.lock"
flock 9
if built; then  # another caller finished the build while we waited for the lock
  echo "$bin"
  exit 0
fi

# Build chatter goes to stderr: stdout carries only the binary's path.
exec 3>&1 1>&2
export CGO_ENABLED=0 GOFLAGS=-mod=mod
staging="$cache_dir.partial"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/crds"

start=$SECONDS
# The module carries no replace directives, so `go install module@version` builds it exactly as
# released (its own go.sum checked against the checksum database).
src="$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -d "$src" ] || { echo "kueue/build.sh: could not download sigs.k8s.io/kueue@$KUEUE_VERSION" >&2; exit 1; }
# The release's publication time stands in for the build date, so rebuilds are reproducible.
date="$(go list -m -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/^\s*"Time": "\(.*\)",$/\1/p')"
ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
ldflags+=" -X sigs.k8s.io/kueue/pkg/version.GitCommit= -X sigs.k8s.io/kueue/pkg/version.BuildDate=$date"
if [ -x "$bin" ]; then  # only the manifests are missing (a cache from before they were copied)
  cp "$bin" "$staging/bin/"
else
  echo "kueue/build.sh: building Kueue $KUEUE_VERSION into $cache_dir (cold builds take minutes)" >&2
  GOBIN="$staging/bin" go install -p "${MEDMO_BUILD_JOBS:-$(nproc)}" -trimpath -ldflags "$ldflags" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
fi
cp "$src"/config/components/crd/bases/*.yaml "$staging/crds/"
cp "$src"/config/components/webhook/manifests.yaml "$staging/webhooks.yaml"
chmod -R u+w "$staging"
rm -rf "$cache_dir/bin" "$cache_dir/crds" "$cache_dir/webhooks.yaml"
mv "$staging/bin" "$staging/crds" "$staging/webhooks.yaml" "$cache_dir/"
rmdir "$staging"
echo "kueue/build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin" >&3
