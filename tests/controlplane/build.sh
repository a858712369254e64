#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the Go
# modules next to this script, into a cache outside the clone keyed by their versions, and prints
# that bin directory (and nothing else) on stdout. A second call, or a concurrent one, reuses the
# same build: it waits on a lock instead of building twice.
#
#   MEDMO_K8S_BIN="$(tests/controlplane/build.sh)"
#
# Env: MEDMO_CACHE (default ~/.cache/medmo); MEDMO_BUILD_JOBS (go build -p, default: cores).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
cache_dir="${MEDMO_CACHE:-$HOME/.cache/medmo}/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
bin_dir="$cache_dir/bin"

# The harness makes its certificates with the openssl command line.
if ! command -v openssl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "build.sh: installing openssl (the test control plane's certificates need it)" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; } >&2
  else
    echo "build.sh: the openssl command is needed by the test control plane; install it (apt-get install openssl)" >&2
    exit 1
  fi
fi

built() {
  local b
  for b in "${binaries[@]}"; do [ -x "$bin_dir/$b" ] || return 1; done
}

if built; then
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || {
  echo "build.sh: Go is needed to build the control plane: install Go >= 1.26, or any Go >= 1.21 with" \
       "GOTOOLCHAIN=auto (it then fetches 1.26 from the module proxy), and retry" >&2
  exit 1
}
mkdir -p "$cache_dir"
exec 9>"$cache_dir.lock"
flock 9
if built; then  # another caller finished the build while we waited for the lock
  echo "$bin_dir"
  exit 0
fi

# Build chatter goes to stderr: stdout carries only the bin dir.
exec 3>&1 1>&2
export CGO_ENABLED=0 GOFLAGS=-mod=mod
jobs=(-p "${MEDMO_BUILD_JOBS:-$(nproc)}")
staging="$cache_dir/bin.partial"
rm -rf "$staging"
mkdir -p "$staging"

k8s_minor="${K8S_VERSION#v1.}"
k8s_minor="${k8s_minor%%.*}"
# The release's publication time stands in for the build date, so rebuilds are reproducible.
k8s_date="$(cd "$here/kubernetes" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$k8s_date"
done

start=$SECONDS
echo "build.sh: building etcd $ETCD_VERSION into $bin_dir" >&2
(cd "$here/etcd" && go build "${jobs[@]}" -trimpath -ldflags "-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3)
echo "build.sh: building Kubernetes $K8S_VERSION (cold builds take a long while)" >&2
(cd "$here/kubernetes" && go build "${jobs[@]}" -trimpath -ldflags "$k8s_ldflags" -o "$staging/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
echo "build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin_dir" >&3
