#!/usr/bin/env bash
# Creates (once) and prints the path of this clone's virtualenv (<clone>/.venv).
#
# The dependencies live in a shared virtualenv outside the clone, keyed by the Python version and
# the pinned requirements, so every clone on this machine (a developer's, CI's) reuses it, and a
# change of pins builds a new one beside the old. The clone's own .venv layers its code on top.
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
# The shared virtualenv holds the dependencies only. Each clone gets its own small virtualenv,
# <clone>/.venv, which sees the shared one's packages and this clone's code and nothing else, so two
# clones on one machine never import each other's files (an editable install into the shared
# virtualenv would be re-pointed by whichever clone bootstrapped last).
if compgen -G "$venv/lib/python*/site-packages/__editable__*medmo*" >/dev/null; then
  "$venv/bin/pip" uninstall -q -y medmo-operator >&2  # left by an older bootstrap
fi
clone_venv="$root/.venv"
stamp="$venv|$root"
if [ "$(cat "$clone_venv/.medmo-bootstrap" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$clone_venv"
  "$python" -m venv --without-pip "$clone_venv"
  "$clone_venv/bin/python" - "$venv" "$root" "$clone_venv" <<'PY'
import os, pathlib, re, sys, sysconfig
shared, root, clone = (pathlib.Path(a) for a in sys.argv[1:])
site = pathlib.Path(sysconfig.get_paths(vars={"base": str(clone), "platbase": str(clone)})["purelib"])
shared_site = next((shared / "lib").glob("python3*/site-packages"))
# .pth files run in name order: this clone's code first, then the shared packages (with their own .pth).
(site / "_medmo_0_clone.pth").write_text(f"{root / 'operator'}\n{root}\n")
(site / "_medmo_1_shared.pth").write_text(f"import site; site.addsitedir({str(shared_site)!r})\n")
# The shared virtualenv's commands, run by this clone's interpreter (python scripts) or linked (binaries).
for command in sorted((shared / "bin").iterdir()):
    target = clone / "bin" / command.name
    if command.is_dir() or target.exists() or command.name.startswith(("python", "activate", "pip", "Activate")):
        continue
    head = command.read_bytes()[:200]
    if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]:
        body = command.read_text().split("\n", 1)[1]
        target.write_text(f"#!{clone / 'bin' / 'python'}\n{body}")
        target.chmod(0o755)
    else:
        target.symlink_to(command)
medmo = clone / "bin" / "medmo"
medmo.write_text(f"#!{clone / 'bin' / 'python'}\nimport sys\nfrom medmo_operator.cli import main\nsys.exit(main())\n")
medmo.chmod(0o755)
PY
  echo "$stamp" > "$clone_venv/.medmo-bootstrap"
fi
echo "$clone_venv"
