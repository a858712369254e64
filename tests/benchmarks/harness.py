"""The shared harness of the benchmarks: interleaved repeats, spread, thread settings and a markdown table.

A benchmark names its sides (the first is the baseline), says for each the processes it runs and
the threads each gets, and gives a `measure` callable per side returning its figures (a dict, the
first entry the main one). `Benchmark.run` measures the sides interleaved, A B A B ..., `repeats`
times, so a change in the machine's load falls on every side alike; it records the load average
before and after, the cores this process may use, and the processes each side started (counted
from /proc while it ran). `Benchmark.report` prints the table and writes it as this benchmark's
section of `bench/results.md` (other benchmarks' sections are kept).

Threads: `thread_env(n)` is the environment that fixes a child process's threads (OpenMP, MKL,
OpenBLAS and torch's intra-op pool, which reads OMP_NUM_THREADS), and `pin_threads(n)` does the
same for this process; every side states its threads per process in its `Process` list.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results.md"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
FILE_HEADER = ("# Benchmark results\n\nWritten by `make bench` (each section by its script in tests/benchmarks/; "
               "a script run alone rewrites only its own section). Figures are medians of interleaved repeats "
               "with their min-max; read them with the load average beside them.\n")


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a child process runs `threads` compute threads (torch reads OMP_NUM_THREADS)."""
    return {**(os.environ if base is None else base), **{name: str(threads) for name in THREAD_VARIABLES}}


def pin_threads(threads: int) -> None:
    """This process's compute threads: the environment (for what it starts) and torch's pools, if loaded."""
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(threads)


def thread_settings() -> str:
    """This process's OMP_NUM_THREADS and torch threads, as printed by every process a benchmark starts."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else "not loaded"
    return f"pid {os.getpid()}: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} torch threads={threads}"


def run_child(argv: Sequence[str], threads: int, env: dict[str, str] | None = None,
              timeout_s: float = 1800) -> dict[str, float]:
    """Run one measurement in a fresh process with `threads` threads; its last stdout line is its JSON figures.

    The child's stderr (where it prints its `thread_settings()`) passes through.
    """
    import json
    import subprocess

    result = subprocess.run(list(argv), stdout=subprocess.PIPE, text=True, check=True, timeout=timeout_s,
                            env=thread_env(threads, env))
    return json.loads(result.stdout.strip().splitlines()[-1])


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Process:
    """One process of a side's layout."""

    role: str
    threads: int
    """Compute threads it is given; 0: not limited by the benchmark (a Go server's GOMAXPROCS is the cores)."""
    count: int = 1

    def __str__(self) -> str:
        threads = f"{self.threads} thr" if self.threads else "threads not limited"
        return f"{self.count} {self.role} x {threads}" if self.count > 1 else f"{self.role} ({threads})"


@dataclass
class Side:
    """One of the compared configurations."""

    name: str
    measure: Callable[[], dict[str, float]]
    layout: Sequence[Process]
    """The processes it runs, each with its threads (the harness prints it and counts what it sees)."""

    @property
    def processes(self) -> int:
        return sum(p.count for p in self.layout)

    @property
    def threads(self) -> int:
        return sum(p.count * p.threads for p in self.layout)


def interleaved(sides: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, side) in the order they run: every side once per repeat, in the same order (A B A B ...)."""
    return [(repeat, side) for repeat in range(repeats) for side in sides]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


class ProcessCensus:
    """The processes below this one that appear while a side runs (sampled from /proc every 0.2 s)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.before: set[int] = set()
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-census", daemon=True)

    def __enter__(self) -> ProcessCensus:
        self.before = set(descendants(os.getpid()))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid, name in descendants(os.getpid()).items():
                if pid not in self.before:
                    self.seen.setdefault(pid, name)
            self._stop.wait(self.interval_s)


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every process below `pid` (from /proc/<pid>/task/*/children)."""
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    try:
                        found[child] = Path(f"/proc/{child}/comm").read_text().strip()
                    except OSError:
                        found[child] = "?"
                    pending.append(child)
    return found


@dataclass
class Result:
    """Every repeat's figures of one side, and the processes it was seen to start."""

    side: Side
    figures: list[dict[str, float]] = field(default_factory=list)
    started_processes: list[int] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [f[metric] for f in self.figures if metric in f]


@dataclass
class Benchmark:
    """One benchmark: its sides, how its figures read, and where its table goes."""

    name: str
    """Section title in bench/results.md."""
    sides: Sequence[Side]
    repeats: int = 5
    warmup: int = 0
    """Untimed rounds of every side first (for sides measured in this process: first-call costs)."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """Per metric: True for rates (the default), False for times; ratio = speed against the first side."""
    notes: list[str] = field(default_factory=list)
    """Lines printed under the table (what is measured, what differs between the sides)."""
    command: str = field(default_factory=lambda: "python " + " ".join(shlex.quote(a) for a in sys.argv))
    results: list[Result] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    started: str = ""
    seconds: float = 0.0

    def run(self) -> Benchmark:
        by_name = {side.name: side for side in self.sides}
        self.results = [Result(side) for side in self.sides]
        result_of = {r.side.name: r for r in self.results}
        self.load_before = load_average()
        self.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        began = time.monotonic()
        print(f"{self.name}: {len(self.sides)} sides x {self.repeats} repeats, interleaved; load before "
              f"{self.load_before[0]:.2f} {self.load_before[1]:.2f} {self.load_before[2]:.2f}; {cores()} cores; "
              f"{thread_settings()}", flush=True)
        for side in self.sides:
            print(f"  {side.name}: {', '.join(map(str, side.layout))}", flush=True)
        for _, name in interleaved(list(by_name), self.warmup):
            by_name[name].measure()
        for repeat, name in interleaved(list(by_name), self.repeats):
            with ProcessCensus() as census:
                figures = by_name[name].measure()
            result_of[name].figures.append(figures)
            result_of[name].started_processes.append(len(census.seen))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            print(f"  repeat {repeat + 1}/{self.repeats} {name}: {shown} "
                  f"({len(census.seen)} processes started: {_names(census.seen)})", flush=True)
        self.seconds = time.monotonic() - began
        self.load_after = load_average()
        return self

    def metrics(self) -> list[str]:
        seen: list[str] = []
        for result in self.results:
            for figures in result.figures:
                seen.extend(k for k in figures if k not in seen)
        return seen

    def table(self) -> str:
        metrics = self.metrics()
        lines = [
            f"## {self.name}",
            "",
            f"`{self.command}`",
            "",
            f"{self.started}; {cores()} cores; load average before {_load(self.load_before)}, after "
            f"{_load(self.load_after)}; {self.repeats} repeats interleaved ({' '.join('ABCDEFGHIJ'[:len(self.sides)])} ...)"
            f"{f' after {self.warmup} untimed' if self.warmup else ''}, {self.seconds:.0f} s in all.",
            "",
            "| side | processes (threads each) | processes started per repeat |",
            "|---|---|---|",
            *(f"| {r.side.name} | {', '.join(map(str, r.side.layout))} | {_range(r.started_processes)} |"
              for r in self.results),
            "",
            "| side | metric | median | min-max | ratio |",
            "|---|---|---|---|---|",
        ]
        for metric in metrics:
            having = [r for r in self.results if r.values(metric)]
            base = having[0].values(metric)
            for result in having:
                median, low, high = spread(result.values(metric))
                ratio = _ratio(median, statistics.median(base), self.higher_is_better.get(metric, True)) \
                    if len(having) > 1 else ""
                lines.append(f"| {result.side.name} | {metric} | {_fmt(median)} | {_fmt(low)}-{_fmt(high)} | {ratio} |")
        lines.append("")
        lines.append("ratio: the side's speed against the first side's with that metric (for times, its inverse); "
                     "processes started: counted from /proc while the side ran (0: it ran in processes started "
                     "before).")
        lines.extend(self.notes)
        return "\n".join(lines) + "\n"

    def report(self, path: Path | None = RESULTS) -> str:
        text = self.table()
        print("\n" + text, flush=True)
        if path is not None:
            write_section(path, self.name, text)
        return text


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the section of `name` in the results file, keeping the others."""
    begin, end = f"<!-- bench: {name} -->", f"<!-- /bench: {name} -->"
    current = path.read_text() if path.exists() else FILE_HEADER
    block = f"{begin}\n{text}{end}\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        updated = head + block + ("\n" + tail if tail else "")
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)


def _ratio(value: float, baseline: float, higher_is_better: bool) -> str:
    if not value or not baseline:
        return ""
    return f"{value / baseline if higher_is_better else baseline / value:.2f}"


def _fmt(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1/5/15 min)"


def _range(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _names(seen: dict[int, str]) -> str:
    counts: dict[str, int] = {}
    for name in seen.values():
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items()) or "none"
