#!/usr/bin/env bash
# Installs the Debian packages the project needs beyond Python's, when missing (idempotent):
#   libnss-wrapper  per-pod hosts files and hostnames for the local pod runner
#   gcc             compiles the local pod runner's network shim (operator/medmo_operator/local/podnet_shim.c)
#   lua5.4          runs the Argo CD health check (manifests/argocd/) in its tests, as Argo CD's Lua VM does
set -euo pipefail
packages=(libnss-wrapper gcc libc6-dev lua5.4)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
