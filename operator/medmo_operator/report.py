"""The run report: a Markdown page with a metrics table per stage and PNG plots of the run's numbers.

Reads what the stages left in storage: each stage's per-step log (`<storage>/<stage>/metrics/`,
written by `medmo_trainer.metrics_log`) and an eval stage's `<storage>/<stage>/metrics.json`, its
models' predictions and its example images (written by `medmo_trainer.stages.eval`), plus the run's
status. Eval tables put a column per model scored and, with a compared model (the model before RL),
the change from it. Plots:

    loss.png            training loss over steps, one line per stage that logged `loss`
    rewards.png         RL reward components (`reward/<component>`) over steps, one panel per RL stage:
                        each step's value faint, its rolling mean over `ROLLING_WINDOW` steps solid
    grounding_iou.png   grounding mean IoU and Acc@0.5 of every model an eval stage scored
                        (e.g. before and after RL), one bar group per model and benchmark
    boxes.png           a few held-out images (one row each) with the true boxes and each model's
                        predicted boxes drawn, one column per model: the model before RL beside the
                        model after it

Matplotlib's object API renders straight to PNG (the Agg canvas), never through pyplot's global
state, so the operator can call this from any thread. No torch import.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from medmo_trainer.fsio import join, url_to_fs
from medmo_trainer.metrics_log import read_metrics_log, stage_log_uri
from medmo_trainer.progress import LOSS, REWARD_PREFIX

logger = logging.getLogger(__name__)

EVAL_METRICS_FILE = "metrics.json"
GROUNDING_METRICS = ("groundingMiou", "groundingAcc50")
EVAL_COUNTS = ("samples", "unparseable", "skipped")
"""Counts of an eval stage's metrics.json shown under its scores."""
PLOT_SIZE = (8.0, 4.5)
PLOT_DPI = 100
ROLLING_WINDOW = 8
"""Steps in the rolling mean of the reward curves."""
GRID = 1000
"""Side of the relative grid boxes are written on (Qwen-VL's 0-1000)."""
TRUE_BOX_COLOR = "#00c853"
PREDICTED_BOX_COLOR = "#ff1744"


def write_report(
    training_status: Mapping, storage_uri: str, out_dir: Path, *, run_name: str | None = None
) -> Path:
    """Writes `report.md` and its PNG plots into `out_dir`; returns the path of `report.md`.

    `training_status` is the MedMOTraining's `status` as the API shows it (camelCase keys).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = [dict(stage) for stage in training_status.get("stages", [])]
    logs = {stage["name"]: read_metrics_log(stage_log_uri(storage_uri, stage["name"])) for stage in stages}
    evals = {}
    for stage in stages:
        if (evaluation := read_eval_metrics(storage_uri, stage["name"])) is not None:
            evals[stage["name"]] = evaluation

    plots = {
        "Boxes on held-out images (green: true boxes; red: the model's)": plot_boxes(evals, out_dir / "boxes.png"),
        "Training loss": plot_loss(logs, out_dir / "loss.png"),
        f"RL reward components (faint: each step; solid: mean of the last {ROLLING_WINDOW} steps)":
            plot_rewards(logs, out_dir / "rewards.png"),
        "Grounding before and after RL": plot_grounding(evals, out_dir / "grounding_iou.png"),
    }
    lines = [f"# MedMO run report{f': {run_name}' if run_name else ''}", ""]
    lines += _summary(training_status)
    lines += _stage_table(stages)
    for stage in stages:
        lines += _stage_section(stage, logs[stage["name"]], evals.get(stage["name"]))
    lines += ["## Plots", ""]
    for title, path in plots.items():
        if path is not None:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def read_eval_metrics(storage_uri: str, stage: str) -> dict | None:
    """An eval stage's metrics.json, or None when the stage wrote none (not an eval stage, or not run)."""
    fs, path = url_to_fs(join(storage_uri, stage, EVAL_METRICS_FILE))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def read_predictions(uri: str) -> dict[tuple[str, str], dict]:
    """A model's predictions file keyed by (benchmark, record id); empty when it cannot be read."""
    try:
        fs, path = url_to_fs(uri)
        lines = fs.cat_file(path).decode().splitlines()
    except (OSError, ValueError) as error:
        logger.warning("predictions %s not read: %s", uri, error)
        return {}
    rows = (json.loads(line) for line in lines if line.strip())
    return {(row["benchmark"], row["id"]): row for row in rows}


# ---------------------------------------------------------------------------------------------
# Markdown


def format_value(value: object) -> str:
    """Numbers with 4 significant digits (integers as they are); anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[format_value(c) for c in row] for row in rows]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in cells),
        "",
    ]


def _summary(status: Mapping) -> list[str]:
    rows = [
        ("Phase", status.get("phase")),
        ("Started", status.get("startTime")),
        ("Finished", status.get("completionTime")),
        ("Output model", status.get("outputModel")),
    ]
    return markdown_table(["run", ""], [row for row in rows if row[1] is not None])


def _stage_table(stages: Sequence[Mapping]) -> list[str]:
    rows = [
        (s["name"], s.get("phase"), s.get("step"), s.get("totalSteps"), s.get("restarts", 0), s.get("lastCheckpoint"))
        for s in stages
    ]
    return ["## Stages", ""] + markdown_table(["stage", "phase", "step", "total steps", "restarts", "last checkpoint"], rows)


def _stage_section(stage: Mapping, log: Sequence[Mapping], evaluation: Mapping | None) -> list[str]:
    lines = [f"## Stage {stage['name']}", ""]
    if stage.get("message"):
        lines += [str(stage["message"]), ""]
    if evaluation is not None:
        lines += _eval_tables(evaluation)
    else:
        if stage.get("metrics"):
            lines += markdown_table(["metric", "latest"], sorted(stage["metrics"].items()))
        if stage.get("counters"):
            lines += markdown_table(["counter", "total"], sorted(stage["counters"].items()))
    losses = [(r["step"], r[LOSS]) for r in log if isinstance(r.get(LOSS), (int, float))]
    if losses:
        first, last = losses[0], losses[-1]
        lines += [f"Loss {format_value(first[1])} at step {first[0]} -> {format_value(last[1])} at step {last[0]}.", ""]
    rewards = {key: [r[key] for r in log if isinstance(r.get(key), (int, float))]
               for key in sorted({key for r in log for key in r if key.startswith(REWARD_PREFIX)})}
    rows = [(key, values[0], float(np.mean(values[:ROLLING_WINDOW])), float(np.mean(values[-ROLLING_WINDOW:])), values[-1])
            for key, values in rewards.items() if values]
    if rows:
        lines += markdown_table(["reward", "first step", f"mean of first {ROLLING_WINDOW}",
                                 f"mean of last {ROLLING_WINDOW}", "last step"], rows)
    return lines


def _eval_tables(evaluation: Mapping) -> list[str]:
    """One table per benchmark: a row per metric, then the sample counts, a column per model scored (the
    stage's own model first) and, with a compared model, the own model's change from the first one."""
    models = evaluation.get("models", [])
    lines = []
    for benchmark in evaluation.get("benchmarks", []):
        scores = [model.get("benchmarks", {}).get(benchmark, {}) for model in models]
        counts = [model.get("counts", {}).get(benchmark, {}) for model in models]
        names = sorted({metric for per_model in scores for metric in per_model})
        compared = len(models) > 1
        rows = [[name, *(per_model.get(name) for per_model in scores),
                 *([_change(scores[0].get(name), scores[1].get(name))] if compared else [])] for name in names]
        rows += [[name, *(per_model.get(name) for per_model in counts), *([_change(counts[0].get(name), counts[1].get(name))]
                  if compared else [])] for name in EVAL_COUNTS if any(name in c for c in counts)]
        lines += [f"Benchmark `{benchmark}`" + (f" (change: {models[0]['name']} minus {models[1]['name']})" if compared else "")
                  + ":", ""]
        lines += markdown_table(["metric", *(m["name"] for m in models), *(["change"] if compared else [])], rows)
        files = [f"`{m['predictions']}`" for m in models if m.get("predictions")]
        if files:
            lines += [f"Every answer, with what was read from it and its scores: {', '.join(files)}.", ""]
    return lines


def _change(after: object, before: object) -> str:
    if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
        return ""
    return f"{after - before:+.4g}"


# ---------------------------------------------------------------------------------------------
# Plots


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=PLOT_DPI)
    return path


def plot_loss(logs: Mapping[str, Sequence[Mapping]], path: Path) -> Path | None:
    """Loss over steps, one line per stage with a logged loss; None when no stage logged one."""
    series = {
        stage: [(r["step"], r[LOSS]) for r in records if isinstance(r.get(LOSS), (int, float))]
        for stage, records in logs.items()
    }
    series = {stage: points for stage, points in series.items() if points}
    if not series:
        return None
    figure = Figure(figsize=PLOT_SIZE)
    axes = figure.subplots()
    for stage, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="." if len(points) < 50 else None, label=stage)
    axes.set(xlabel="step", ylabel="loss", title="Training loss per stage")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_rewards(logs: Mapping[str, Sequence[Mapping]], path: Path) -> Path | None:
    """Reward components over steps, one panel per stage that logged `reward/*`; None when none did."""
    stages = {
        stage: sorted({key for r in records for key in r if key.startswith(REWARD_PREFIX)})
        for stage, records in logs.items()
    }
    stages = {stage: keys for stage, keys in stages.items() if keys}
    if not stages:
        return None
    figure = Figure(figsize=(PLOT_SIZE[0], PLOT_SIZE[1] * len(stages)))
    for axes, (stage, keys) in zip(figure.subplots(len(stages), 1, squeeze=False)[:, 0], stages.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in logs[stage] if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                faint = axes.plot(steps, values, alpha=0.3, linewidth=1)[0]
                axes.plot(steps, rolling_mean(values, ROLLING_WINDOW), color=faint.get_color(), linewidth=2,
                          label=key.removeprefix(REWARD_PREFIX))
        axes.set(xlabel="step", ylabel="reward", title=f"Reward components, stage {stage}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return _save(figure, path)


def plot_grounding(evals: Mapping[str, Mapping], path: Path) -> Path | None:
    """Bars of grounding mIoU and Acc@0.5 per scored model and benchmark; None without grounding scores."""
    groups = []
    for stage, evaluation in evals.items():
        for model in evaluation.get("models", []):
            for benchmark, scores in model.get("benchmarks", {}).items():
                if any(m in scores for m in GROUNDING_METRICS):
                    label = f"{model['name']}\n{benchmark}" + (f" ({stage})" if len(evals) > 1 else "")
                    groups.append((label, [scores.get(m, 0.0) for m in GROUNDING_METRICS]))
    if not groups:
        return None
    figure = Figure(figsize=PLOT_SIZE)
    axes = figure.subplots()
    width = 0.8 / len(GROUNDING_METRICS)
    for i, metric in enumerate(GROUNDING_METRICS):
        positions = [g + (i - (len(GROUNDING_METRICS) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, [values[i] for _, values in groups], width, label=metric)
        axes.bar_label(bars, fmt="%.3f")
    axes.set_xticks(range(len(groups)), [label for label, _ in groups])
    axes.set(ylabel="score", ylim=(0, 1.05), title="Grounding: mean IoU and Acc@0.5 per model")
    axes.legend()
    return _save(figure, path)


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it."""
    sums = np.cumsum(np.asarray(values, dtype=float))
    return [float((sums[i] - (sums[i - window] if i >= window else 0.0)) / min(i + 1, window)) for i in range(len(values))]


def plot_boxes(evals: Mapping[str, Mapping], path: Path) -> Path | None:
    """The example images of the (last) eval stage that wrote some, one row each, with the true boxes
    and one column per model's predicted boxes (compared models first: before RL beside after RL);
    None when no eval stage wrote example images or predictions."""
    evaluation = next((e for e in reversed(list(evals.values())) if e.get("examples")), None)
    if evaluation is None:
        return None
    models = [m for m in [*evaluation["models"][1:], *evaluation["models"][:1]] if m.get("predictions")]
    predictions = [read_predictions(m["predictions"]) for m in models]
    rows = []
    for example in evaluation["examples"]:
        image = _read_image(example["image"])
        answers = [p.get((example["benchmark"], example["id"])) for p in predictions]
        if image is not None and answers and all(answers):
            rows.append((example, image, answers))
    if not rows:
        return None
    figure = Figure(figsize=(2.6 * len(models), 2.8 * len(rows)))
    panels = figure.subplots(len(rows), len(models), squeeze=False)
    for (example, image, answers), row_panels in zip(rows, panels):
        for model, answer, axes in zip(models, answers, row_panels):
            axes.imshow(np.asarray(image), cmap="gray")
            _draw_boxes(axes, answer.get("referenceBoxes", []), image.size, TRUE_BOX_COLOR, "-")
            _draw_boxes(axes, answer.get("parsed") or [], image.size, PREDICTED_BOX_COLOR, "--")
            iou = (answer.get("scores") or {}).get("groundingMiou")
            shown = f"IoU {format_value(iou)}" if answer.get("readable", True) and iou is not None else "no box read"
            axes.set_title(f"{model['name']}: {shown}", fontsize=9)
            axes.set_xticks([])
            axes.set_yticks([])
        row_panels[0].set_ylabel(example["id"], fontsize=7)
    return _save(figure, path)


def _draw_boxes(axes, boxes: Sequence[Mapping], size: tuple[int, int], color: str, style: str) -> None:
    width, height = size
    for entry in boxes:
        x1, y1, x2, y2 = (float(v) for v in entry["box"])
        axes.add_patch(Rectangle((x1 * width / GRID, y1 * height / GRID), (x2 - x1) * width / GRID,
                                 (y2 - y1) * height / GRID, fill=False, edgecolor=color, linestyle=style, linewidth=1.5))


def _read_image(uri: str) -> Image.Image | None:
    try:
        fs, path = url_to_fs(uri)
        with Image.open(io.BytesIO(fs.cat_file(path))) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        logger.warning("example image %s not read: %s", uri, error)
        return None
