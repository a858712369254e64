"""The trainer's import layering, read from the source with `ast` (imports inside functions count too).

Evaluation and RL rewards share `medmo_trainer.boxes`/`medmo_trainer.answers` and never import each
other; nothing imports an entry point (`__main__`); the top-level parts of `medmo_trainer` (its
folders and modules) import each other without a cycle; the trainer never imports the operator.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import medmo_trainer

PACKAGE = Path(medmo_trainer.__file__).parent


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Absolute names of every module `path` imports (a relative import is resolved), with line numbers."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            yield base, node.lineno
            yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)


def _all_imports() -> list[tuple[Path, str, int]]:
    return [(path, name, line) for path in sorted(PACKAGE.rglob("*.py")) for name, line in _imports(path)]


def _part(path_or_module: Path | str) -> str:
    """The top-level part of medmo_trainer a file or module belongs to (`data`, `rl`, `config`, ...)."""
    if isinstance(path_or_module, Path):
        return path_or_module.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return path_or_module.split(".")[1]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{line}"


def test_the_import_reader_sees_imports_inside_functions():
    shards = PACKAGE / "data" / "shards.py"
    assert "medmo_trainer.data.synthetic" in {name for name, _ in _imports(shards)}  # inside open_dataset


def test_nothing_imports_an_entry_point():
    offenders = [_where(p, line) for p, name, line in _all_imports() if name.split(".")[-1] == "__main__"]
    assert offenders == []


def test_evaluation_and_rl_do_not_import_each_other():
    offenders = [
        f"{_where(p, line)} imports {name}"
        for p, name, line in _all_imports()
        if name.startswith("medmo_trainer.") and {_part(p), _part(name)} == {"eval", "rl"}
    ]
    assert offenders == []


def test_the_trainer_never_imports_the_operator():
    offenders = [_where(p, line) for p, name, line in _all_imports() if name.split(".")[0] == "medmo_operator"]
    assert offenders == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None when it has none."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(edges.get(node, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(edges) if (cycle := visit(node)) is not None), None)


def test_find_cycle_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_top_level_parts_import_each_other_without_a_cycle():
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for path, name, line in _all_imports():
        if name.startswith("medmo_trainer.") and _part(path) != _part(name):
            edges.setdefault(_part(path), set()).add(_part(name))
            where.setdefault((_part(path), _part(name)), _where(path, line))
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + ", ".join(f"{a} -> {b} ({where[a, b]})" for a, b in zip(cycle, cycle[1:]))
