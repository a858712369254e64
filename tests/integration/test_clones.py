"""Two clones on one machine each run their own code, and no folder shadows the standard library.

Both clones share the dependency virtualenv (keyed by the pinned requirements) but each gets its own
`.venv` from scripts/bootstrap.sh; bootstrapping the second must not re-point the first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medmo_cases import REPO, clone_head

WHERE = ("import medmo_operator, medmo_trainer, operator, sys; "
         "print(medmo_operator.__file__); print(medmo_trainer.__file__); print(operator.__file__); "
         "print(sys.executable)")


def _bootstrap(clone: Path) -> Path:
    out = subprocess.run(["scripts/bootstrap.sh"], cwd=clone, check=True, capture_output=True, text=True,
                         timeout=600)
    return Path(out.stdout.strip().splitlines()[-1])


def _imports(venv: Path, cwd: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", WHERE], cwd=cwd, check=True,
                         capture_output=True, text=True, timeout=120)
    return out.stdout.split()


def test_each_clone_imports_its_own_code(tmp_path):
    first, second = clone_head(tmp_path / "first"), clone_head(tmp_path / "second")
    first_venv = _bootstrap(first)
    second_venv = _bootstrap(second)
    assert first_venv == first / ".venv" and second_venv == second / ".venv"

    for clone, venv in ((first, first_venv), (second, second_venv)):
        operator_file, trainer_file, stdlib_operator, executable = _imports(venv, cwd=tmp_path)
        assert Path(operator_file).is_relative_to(clone / "operator" / "medmo_operator")
        assert Path(trainer_file).is_relative_to(clone / "medmo_trainer")
        assert not Path(stdlib_operator).is_relative_to(clone), "the folder operator/ shadowed the stdlib"
        assert Path(executable).parent == venv / "bin", "pods get this interpreter's bin first on PATH"

    # The console script of each clone runs that clone's operator.
    for clone, venv in ((first, first_venv), (second, second_venv)):
        shown = subprocess.run([str(venv / "bin" / "medmo"), "--help"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        script = (venv / "bin" / "medmo").read_text().splitlines()[0]
        assert script == f"#!{venv / 'bin' / 'python'}"


def test_the_repository_root_never_shadows_the_standard_library():
    """From the root, with the root first on sys.path (python -c, python -S, python -m), `operator` is
    the standard library's: the folder holds the package medmo_operator and is no package itself."""
    python = sys.executable
    for flags in ([], ["-S"]):
        result = subprocess.run([python, *flags, "-c",
                                 "import collections, operator; print(operator.eq(1, 1), operator.__file__)"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        equal, where = result.stdout.split()
        assert equal == "True" and not Path(where).is_relative_to(REPO)
