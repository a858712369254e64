"""The benchmark harness (tests/benchmarks/harness.py): the order sides run in, the spread, the results file."""

from __future__ import annotations

import itertools

from benchmarks import harness


def test_sides_run_interleaved_every_repeat_in_the_same_order():
    assert harness.interleaved(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]


def test_spread_is_median_min_max():
    assert harness.spread([5.0, 1.0, 3.0, 9.0, 4.0]) == (4.0, 1.0, 9.0)
    assert harness.spread([2.0, 4.0]) == (3.0, 2.0, 4.0)


def test_run_measures_interleaved_and_reports_ratio_against_the_first_side(tmp_path):
    calls = []
    rates = {"slow": itertools.cycle([10.0, 12.0, 8.0]), "fast": itertools.cycle([30.0, 20.0, 25.0])}

    def side(name):
        def measure():
            calls.append(name)
            return {"items/s": next(rates[name])}
        return harness.Side(name, measure, [harness.Process("main", threads=1)])

    bench = harness.Benchmark("toy", [side("slow"), side("fast")], repeats=3).run()
    assert calls == ["slow", "fast"] * 3
    out = tmp_path / "results.md"
    bench.report(out)
    row = next(line for line in out.read_text().splitlines() if line.startswith("| fast | items/s"))
    assert "| 25 | 20-30 | 2.50 |" in row  # median 25 against the baseline's 10


def test_times_read_as_speed_ratios(tmp_path):
    seconds = {"a": 2.0, "b": 1.0}
    sides = [harness.Side(n, lambda n=n: {"s": seconds[n]}, [harness.Process("main", 1)]) for n in seconds]
    bench = harness.Benchmark("t", sides, repeats=1, higher_is_better={"s": False}).run()
    row = next(line for line in bench.table().splitlines() if line.startswith("| b | s |"))
    assert row.endswith("| 2.00 |")  # half the time is twice the speed


def test_a_benchmark_rewrites_only_its_own_section(tmp_path):
    out = tmp_path / "results.md"
    harness.write_section(out, "one", "first\n")
    harness.write_section(out, "two", "second\n")
    harness.write_section(out, "one", "first again\n")
    text = out.read_text()
    assert "first again" in text and "second" in text and "first\n" not in text.replace("first again\n", "")
    assert text.index("first again") < text.index("second")


def test_thread_env_fixes_every_pool():
    env = harness.thread_env(3, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}


def test_warmup_rounds_run_first_and_are_not_recorded():
    calls = []
    sides = [harness.Side(n, lambda n=n: calls.append(n) or {"x": float(len(calls))}, [harness.Process("main", 1)])
             for n in ("a", "b")]
    bench = harness.Benchmark("w", sides, repeats=2, warmup=1).run()
    assert calls == ["a", "b"] * 3
    assert bench.results[0].values("x") == [3.0, 5.0]
