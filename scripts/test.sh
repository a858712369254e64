#!/usr/bin/env bash
# Runs the test suite (all of tests/, or the pytest arguments given, e.g. a file or -k):
# sets up the Debian packages, the virtualenv and the Kubernetes binaries first (all cached).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/system-deps.sh  # Debian packages the local pod runner needs (libnss-wrapper, a C compiler)
venv="$(scripts/bootstrap.sh)"
export PATH="$venv/bin:$PATH"
if [ -x tests/controlplane/build.sh ]; then
  MEDMO_K8S_BIN="$(tests/controlplane/build.sh)"
  export MEDMO_K8S_BIN
fi
# Kueue for the scheduling tests: built here, not inside a test, so a cold build (minutes) never
# counts against a test's timeout.
if [ -x tests/kueue/build.sh ] && [ -z "${MEDMO_KUEUE_BIN:-}" ]; then
  MEDMO_KUEUE_BIN="$(tests/kueue/build.sh)"
  export MEDMO_KUEUE_BIN
fi
rc=0
"$venv/bin/python" -m pytest "${@:-tests}" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests in this selection; not a failure"
  rc=0
fi
exit "$rc"
