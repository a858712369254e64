"""The `eval` stage: greedy answers of one or more models on held-out benchmarks, scored with the
paper's metrics (`medmo_trainer.eval.scoring`).

Each rank generates for its share of every benchmark's records (record i goes to rank i mod world
size); the metric sums are all-reduced, so every world size gives the same numbers. Results:

- stage metrics in the progress reports (hence in `status.stages[].metrics`): `<benchmark>/<metric>`
  for the stage's own model, `<name>/<benchmark>/<metric>` for each of `evaluation.compareModels`,
  and under the same keys the counts `.../samples`, `.../unparseable` and `.../skipped` (malformed
  records, unreadable images) in the reports' counters (hence in `status.stages[].counters`);
- `<storage>/<stage>/predictions/<model>.jsonl`: every answer of each model, one JSON line per record
  scored (benchmarks in order, records by id), for a person to read and for the report's pictures:

      {"benchmark", "id", "task", "images": [absolute references; embedded ones abridged], "prompt", "reference",
       "referenceBoxes": [{"label", "box"}] (grounding), "generated": the model's text,
       "parsed": what the metrics read from it (`ScoredAnswer.parsed`), "readable": bool,
       "scores": {metric: the record's value, None when unreadable}}

- `<storage>/<stage>/examples/<benchmark>/<n>.png`: the images of the benchmark's first
  `EXAMPLE_IMAGES` one-image grounding records (by id), copied where the report can read them (the
  dataset's own images may live on a pod's cache volume);
- `<storage>/<stage>/metrics.json`, which the run report reads:

      {"stage": ..., "benchmarks": [names], "metrics": {the flat metrics}, "counters": {the flat counts},
       "models": [{"name", "uri", "benchmarks": {bench: {metric: mean}}, "counts": {bench: {count: n}},
                   "predictions": URI of its predictions file}],
       "examples": [{"benchmark", "id", "image": URI of the copied PNG}]}
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from medmo_trainer.config import BenchmarkSpec, StageConfig
from medmo_trainer.data.records import MalformedRecordError, iter_records, load_image, load_images
from medmo_trainer.data.schema import OPTION_LETTERS, Record
from medmo_trainer.dist import DistContext
from medmo_trainer.eval.scoring import BenchmarkScorer, ScoredAnswer
from medmo_trainer.exit_codes import DataError, ModelError, StorageError
from medmo_trainer.fsio import join, url_to_fs
from medmo_trainer.inputs import prompt_messages
from medmo_trainer.progress import Progress
from medmo_trainer.stages import StageResult, register
from medmo_trainer.stages.loop import StageLoop, run_reporting_failures
from medmo_trainer.strategies import compute_dtype

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FOLDER = "predictions"
EXAMPLES_FOLDER = "examples"
EXAMPLE_IMAGES = 4
"""Grounding records per benchmark whose images the report draws every model's boxes on."""
SUMMARY_METRICS = ("groundingMiou", "vqaClosedAcc", "reportRougeL")
"""Metrics of the stage's own model named in the one-line termination summary."""


@dataclass
class Benchmark:
    """A benchmark's records on this rank, and how many of its records were skipped here."""

    spec: BenchmarkSpec
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)


@dataclass
class ModelResult:
    name: str
    uri: str
    benchmarks: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: str = ""
    """URI of the model's predictions file."""


@register("eval")
def run_eval_stage(config: StageConfig, context: DistContext) -> StageResult:
    return run_reporting_failures(Evaluator.build(config, context), Evaluator.evaluate)


class Evaluator(StageLoop):
    """Scores every model of the stage on every benchmark; a step is one generated batch, reported."""

    def __init__(self, config: StageConfig, context: DistContext, benchmarks: list[Benchmark],
                 models: list[tuple[str, str]], total_steps: int):
        super().__init__(config, context, total_steps)
        self.benchmarks = benchmarks
        self.models = models
        """(name, model source) of the stage's own model, then of each compared model."""

    @classmethod
    def build(cls, config: StageConfig, context: DistContext) -> Evaluator:
        benchmarks = [load_benchmark(spec, context) for spec in config.benchmarks]
        settings = config.evaluation
        models = [(settings.model_name, config.model.base), *((m.name, m.uri) for m in settings.compare_models)]
        # Rank 0, which reports the steps, holds the most records.
        total_steps = len(models) * sum(-(-len(b.records) // settings.batch_size) for b in benchmarks)
        return cls(config, context, benchmarks, models, total_steps)

    def evaluate(self) -> StageResult:
        results, predictions = [], []
        for name, uri in self.models:
            result, rows = self._evaluate_model(name, uri)
            results.append(result)
            predictions.append(rows)
        flat = flat_metrics(results, own_model=self.config.evaluation.model_name)
        counters = flat_counters(results, own_model=self.config.evaluation.model_name)
        if self.context.is_main:
            for result, rows in zip(results, predictions):
                result.predictions = self._write_predictions(result.name, rows)
            examples = self._write_examples(predictions[0])
            self._write_metrics_file(results, flat, counters, examples)
        self.context.barrier()
        summary = ", ".join(
            f"{benchmark.spec.name}/{metric} {value:.4f}"
            for benchmark in self.benchmarks
            for metric in SUMMARY_METRICS
            if (value := results[0].benchmarks[benchmark.spec.name].get(metric)) is not None
        )
        self._report("Succeeded", metrics=flat, counters=counters, message=f"metrics written to {self._metrics_uri()}")
        return StageResult(steps=self.step, output_uri=None, summary=f"eval: {summary or 'no scores'}")

    def eval_step(self, model, processor, batch: list[Record], scorer: BenchmarkScorer,
                  skipped: Counter) -> list[tuple[Record, str, ScoredAnswer]]:
        """Greedy answers to one batch of records, added to the benchmark's scores; returns each answer scored."""
        settings = self.config.evaluation
        generated = generate_answers(
            model, processor, batch, image_size=self.config.hyperparameters.image_size,
            max_new_tokens=settings.max_new_tokens, device=self.context.device, skipped=skipped,
        )
        return [(record, text, scorer.add(record, text, scores)) for record, text, scores in generated]

    def _evaluate_model(self, name: str, uri: str) -> tuple[ModelResult, list[dict]]:
        """The model's scores on every benchmark, and (on rank 0) every rank's prediction rows."""
        dtype = compute_dtype(self.config.hyperparameters, self.context.device)
        model, processor = load_eval_model(uri, self.context.device, dtype)
        result = ModelResult(name, uri)
        rows = []
        batch_size = self.config.evaluation.batch_size
        for benchmark in self.benchmarks:
            scorer = BenchmarkScorer()
            skipped = Counter(benchmark.skipped)
            for start in range(0, len(benchmark.records), batch_size):
                started = time.perf_counter()
                with self.telemetry.span("medmo.step", step=self.step + 1):
                    scored = self.eval_step(model, processor, benchmark.records[start : start + batch_size],
                                            scorer, skipped)
                self.telemetry.record_batch(len(scored), time.perf_counter() - started)
                rows += [prediction_row(benchmark.spec.name, *answer) for answer in scored]
                self.step += 1
                self._report("Running", message=f"model {name}, benchmark {benchmark.spec.name}")
            totals = self._sum_over_ranks([*scorer.totals(), float(sum(skipped.values()))])
            means, counts = BenchmarkScorer.summary(totals[:-1])
            counts["skipped"] = int(round(totals[-1]))
            if counts["samples"] == 0:
                raise DataError(f"benchmark {benchmark.spec.name!r} ({benchmark.spec.uri}) has no usable record "
                                f"({counts['skipped']} skipped)")
            result.benchmarks[benchmark.spec.name] = means
            result.counts[benchmark.spec.name] = counts
            logger.info("model %s on %s: %s (%s)", name, benchmark.spec.name, means, counts)
        order = {b.spec.name: i for i, b in enumerate(self.benchmarks)}
        return result, sorted(self._gather_on_main(rows), key=lambda row: (order[row["benchmark"]], row["id"]))

    def _report(self, phase: str, metrics: dict[str, float] | None = None, counters: dict[str, int] | None = None,
                message: str = "") -> None:
        self.reporter.report(Progress(
            run=self.config.run, stage=self.config.stage, phase=phase, step=self.step,
            total_steps=self.total_steps, metrics=metrics or {}, counters=counters or {}, message=message,
        ))

    def _metrics_uri(self) -> str:
        return join(self.config.storage.uri, self.config.stage, METRICS_FILE)

    def _write_metrics_file(self, results: Sequence[ModelResult], flat: dict[str, float], counters: dict[str, int],
                            examples: list[dict]) -> None:
        document = {
            "stage": self.config.stage,
            "benchmarks": [b.spec.name for b in self.benchmarks],
            "metrics": flat,
            "counters": counters,
            "models": [vars(result) for result in results],
            "examples": examples,
        }
        _write(self._metrics_uri(), json.dumps(document, indent=2).encode(), "eval metrics")

    def _write_predictions(self, model: str, rows: list[dict]) -> str:
        uri = join(self.config.storage.uri, self.config.stage, PREDICTIONS_FOLDER, f"{model}.jsonl")
        lines = (json.dumps({**row, "images": [_shown_reference(ref) for ref in row["images"]]}) + "\n" for row in rows)
        _write(uri, "".join(lines).encode(), f"predictions of model {model}")
        return uri

    def _write_examples(self, rows: list[dict]) -> list[dict]:
        """Copies the images of each benchmark's first one-image grounding records (by id) into the stage's storage."""
        examples = []
        for benchmark in self.benchmarks:
            chosen = [r for r in rows if r["benchmark"] == benchmark.spec.name and r["task"] == "grounding"
                      and len(r["images"]) == 1][:EXAMPLE_IMAGES]
            for n, row in enumerate(chosen):
                try:
                    image = load_image(row["images"][0])
                except MalformedRecordError as error:  # it was read moments ago; a picture less is no failure
                    logger.warning("example image of %s not copied: %s", row["id"], error)
                    continue
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                uri = join(self.config.storage.uri, self.config.stage, EXAMPLES_FOLDER, benchmark.spec.name, f"{n}.png")
                _write(uri, buffer.getvalue(), f"example image of {row['id']}")
                examples.append({"benchmark": benchmark.spec.name, "id": row["id"], "image": uri})
        return examples

    def _gather_on_main(self, rows: list[dict]) -> list[dict]:
        """Every rank's rows, on rank 0 (others get theirs back)."""
        if not dist.is_initialized() or self.context.world_size == 1:
            return rows
        gathered: list[list[dict]] | None = [[] for _ in range(self.context.world_size)] if self.context.is_main else None
        dist.gather_object(rows, gathered, dst=0)
        return [row for part in gathered for row in part] if self.context.is_main else rows

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not dist.is_initialized() or self.context.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.context.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def _write(uri: str, data: bytes, what: str) -> None:
    try:
        fs, path = url_to_fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    except OSError as error:
        raise StorageError(f"writing {what} to {uri} failed: {error}") from error


def _shown_reference(image: str) -> str:
    """An image reference as a predictions file shows it: an embedded image by its type and size only."""
    if image.startswith("data:"):
        header, _, payload = image.partition(",")
        return f"{header},<{len(payload)} characters>"
    return image


def prediction_row(benchmark: str, record: Record, generated: str, scored: ScoredAnswer) -> dict[str, Any]:
    """One line of a predictions file (see the module docstring)."""
    row = {
        "benchmark": benchmark, "id": record.id, "task": record.task, "images": record.image_refs,
        "prompt": record.prompt, "reference": record.answer, "generated": generated,
        "parsed": scored.parsed, "readable": scored.readable, "scores": scored.scores,
    }
    if record.boxes:
        row["referenceBoxes"] = [{"label": box.label, "box": list(box.box)} for box in record.boxes]
    return row


def load_benchmark(spec: BenchmarkSpec, context: DistContext) -> Benchmark:
    """This rank's share of a benchmark's valid records (after `maxSamples`); malformed ones are counted."""
    skipped: Counter = Counter()
    records = list(iter_records(spec.uri, spec.tasks or None, skipped=skipped))
    if spec.max_samples is not None:
        records = records[: spec.max_samples]
    # Batches of one task finish together: short answers are not held back by long grounding ones.
    mine = sorted(records[context.rank :: context.world_size], key=lambda record: record.task)
    # Malformed records are counted once, on rank 0, so the all-reduced count is the benchmark's.
    return Benchmark(spec, mine, skipped if context.is_main else Counter())


def load_eval_model(uri: str, device: torch.device, dtype: torch.dtype):
    """The model (in eval mode, on `device`, weights in `dtype`) and processor of a model source;
    ModelError when unloadable."""
    from medmo_trainer.model import load_model

    try:
        loaded = load_model(uri, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"cannot load model {uri!r} for evaluation: {error}") from error
    return loaded.model.to(device).eval(), loaded.processor


def generate_answers(
    model, processor, records: Sequence[Record], *, image_size: int, max_new_tokens: int,
    device: torch.device, skipped: Counter,
) -> list[tuple[Record, str, dict[str, float] | None]]:
    """Greedy answers to a batch of records (text-only, one image or several), with retrieval letter
    scores; records whose images cannot be read are counted in `skipped` and left out."""
    usable, images = [], []
    for record in records:
        try:
            images.extend(load_images(record))
            usable.append(record)
        except MalformedRecordError as error:
            skipped[error.reason] += 1
    if not usable:
        return []
    texts = [processor.apply_chat_template(prompt_messages(r), add_generation_prompt=True) for r in usable]
    inputs = processor(texts, images, image_size=image_size).to(device)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, output_logits=True,
        )
    answers = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    first_step = torch.log_softmax(out.logits[0].float(), dim=-1)
    return [
        (record, answer, letter_scores(tokenizer, first_step[i], len(record.options)) if record.task == "retrieval" else None)
        for i, (record, answer) in enumerate(zip(usable, answers))
    ]


def letter_scores(tokenizer, log_probs: torch.Tensor, options: int) -> dict[str, float]:
    """Log-probability of starting the answer with each option letter (its first token)."""
    return {
        letter: float(log_probs[tokenizer.encode(letter, add_special_tokens=False)[0]])
        for letter in OPTION_LETTERS[:options]
    }


def flat_metrics(results: Sequence[ModelResult], own_model: str) -> dict[str, float]:
    """Flat status metrics: `<benchmark>/<name>` for the stage's own model, `<model>/<benchmark>/<name>` else."""
    return {
        f"{_prefix(result, own_model)}{benchmark}/{metric}": value
        for result in results
        for benchmark, means in result.benchmarks.items()
        for metric, value in means.items()
    }


def flat_counters(results: Sequence[ModelResult], own_model: str) -> dict[str, int]:
    """Flat status counters, keyed like `flat_metrics`: samples, unparseable and skipped per benchmark."""
    return {
        f"{_prefix(result, own_model)}{benchmark}/{name}": counts[name]
        for result in results
        for benchmark, counts in result.counts.items()
        for name in ("samples", "unparseable", "skipped")
    }


def _prefix(result: ModelResult, own_model: str) -> str:
    return "" if result.name == own_model else f"{result.name}/"
