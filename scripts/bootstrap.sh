#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtualenv.
#
# The virtualenv lives outside the clone, keyed by the Python version and the
# pinned requirements, so every clone on this machine (a developer's, CI's) reuses
# it, and a change of pins builds a new one beside the old.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
cache="${MEDMO_CACHE:-$HOME/.cache/medmo}"
# Only the runtime and test pins key the venv: requirements/bench.txt installs into a benchmark-only venv.
key="$( { "$python" -c 'import sys; print(sys.version)'; cat "$root"/requirements/base.txt "$root"/requirements/test.txt; } | sha256sum | cut -c1-12)"
venv="$cache/venv-$key"
mkdir -p "$cache"
# Several shells (helpers, CI) may bootstrap at once: one builds, the others wait.
exec 9>"$cache/bootstrap.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (first run downloads torch, several GB)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$root/requirements/base.txt" -r "$root/requirements/test.txt" >&2
  touch "$venv/.complete"
fi
# The project itself is installed editable and re-pointed at this clone each time (a few seconds).
if ! "$venv/bin/python" - "$root" <<'PY' 2>/dev/null
import sys, pathlib, medmo_operator, medmo_trainer
root = pathlib.Path(sys.argv[1]).resolve()
ok = all(pathlib.Path(m.__file__).resolve().is_relative_to(root) for m in (medmo_operator, medmo_trainer))
sys.exit(0 if ok else 1)
PY
then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
