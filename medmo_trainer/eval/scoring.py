"""Scoring a benchmark: per-record metric observations summed into totals that ranks can all-reduce.

Pure Python (no torch): the eval stage feeds it records and generated texts, and reduces the
`totals()` vector over ranks before calling `summary()`. Every metric is a mean of observations,
kept as a (sum, count) pair so that shards combine exactly.

Metrics (a benchmark reports those of the tasks it holds):

    vqaClosedAcc   closed VQA (yes/no, choice among options) accuracy
    vqaChoiceAcc   multiple-choice accuracy (answerType `choice`: the option letter read from the answer,
                   e.g. "C", "(C)", "C. Edema", "The answer is (C)", or the one option it names)
    vqaOpenAcc     open VQA normalised exact match
    reportRougeL    ROUGE-L F-measure of generated reports
    reportF1        finding-level F1 of generated reports (`medmo_trainer.answers.findings`: one finding
                    per clause, negated or not; a negated finding never matches a positive one)
    captionRougeL   ROUGE-L F-measure of generated captions
    groundingMiou   mean matched IoU per ground-truth box (see `metrics`)
    groundingAcc50  fraction of ground-truth boxes found with IoU >= 0.5
    retrievalR<k>   recall@k of the matching caption among the candidates, k in RECALL_AT

Counts: `samples`, `unparseable` (outputs from which no answer could be read; they score 0 on the
metrics read from text) and `unparseable<Task>` (e.g. `unparseableVqa`). Retrieval is a ranking metric: an answer whose
letter cannot be read is ranked by the model's letter scores alone.

`add` also returns what it read from one completion and that record's own scores (`ScoredAnswer`),
which the eval stage writes out as the benchmark's predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medmo_trainer.answers import extract_answer, findings, normalize_text, read_vqa_answer, vqa_accuracy
from medmo_trainer.boxes import parse_boxes
from medmo_trainer.config import ALL_TASKS
from medmo_trainer.data.schema import OPTION_LETTERS, Record
from medmo_trainer.eval import metrics

RECALL_AT = (1, 2)
"""The k of the retrieval recall@k metrics."""

METRIC_NAMES: tuple[str, ...] = (
    "vqaClosedAcc",
    "vqaChoiceAcc",
    "vqaOpenAcc",
    "reportRougeL",
    "reportF1",
    "captionRougeL",
    "groundingMiou",
    "groundingAcc50",
    *(f"retrievalR{k}" for k in RECALL_AT),
)
COUNT_NAMES: tuple[str, ...] = ("samples", "unparseable", *(f"unparseable{task.capitalize()}" for task in ALL_TASKS))


def retrieval_ranking(prediction: str, options: Sequence[str], letter_scores: Mapping[str, float] | None = None) -> list[str]:
    """Option letters ranked for recall@k: the letter the answer picks first, then the others by
    descending model score (`letter_scores`, e.g. the log-probability of answering with that letter),
    ties and missing scores in letter order. Without a readable pick the ranking is by score alone."""
    letters = list(OPTION_LETTERS[: len(options)])
    answer = extract_answer(prediction)
    picked = [letter for letter in letters if vqa_accuracy(answer, letter, options) == 1.0][:1]
    scores = letter_scores or {}
    rest = sorted((l for l in letters if l not in picked), key=lambda l: -scores.get(l, float("-inf")))
    return picked + rest


@dataclass
class ScoredAnswer:
    """One completion as scored: what was read from it and the record's own score per metric."""

    parsed: Any
    """What the metrics read (JSON-able): the yes/no word, option letter or normalised text of VQA; the
    text of captions; `[finding, negated]` pairs of reports; `{"label", "box"}` boxes of grounding; the
    ranked option letters of retrieval. None when nothing could be read."""
    scores: dict[str, float | None]
    """The record's value of each metric it counts in (grounding: the mean over its ground-truth boxes);
    None when the completion could not be read."""
    readable: bool


class BenchmarkScorer:
    """Sums of metric observations and counts of one benchmark on one rank."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(METRIC_NAMES, 0.0)
        self.observations = dict.fromkeys(METRIC_NAMES, 0.0)
        self.counts = dict.fromkeys(COUNT_NAMES, 0.0)

    def add(self, record: Record, completion: str, letter_scores: Mapping[str, float] | None = None) -> ScoredAnswer:
        """Scores one generated completion against its record."""
        self.counts["samples"] += 1
        parsed, observations, readable = getattr(self, f"_score_{record.task}")(record, completion, letter_scores)
        per_metric: dict[str, list[float | None]] = {}
        for name, value in observations:
            self.sums[name] += 0.0 if value is None else value  # an unreadable answer scores 0
            self.observations[name] += 1
            per_metric.setdefault(name, []).append(value)
        if not readable:
            self.counts["unparseable"] += 1
            self.counts[f"unparseable{record.task.capitalize()}"] += 1
        scores = {name: None if None in values else sum(values) / len(values) for name, values in per_metric.items()}
        return ScoredAnswer(parsed if readable else None, scores, readable)

    # Each _score_<task> returns (what was read, [(metric, value or None)], whether the answer was readable).

    def _score_vqa(self, record: Record, completion: str, _scores):
        answer = extract_answer(completion)
        if record.answer_type == "open":
            value = metrics.open_vqa_accuracy(completion, record.answer)
            return normalize_text(answer), [("vqaOpenAcc", value)], value is not None
        metric = "vqaChoiceAcc" if record.answer_type == "choice" else "vqaClosedAcc"
        value = metrics.closed_vqa_accuracy(completion, record.answer, record.options)
        return read_vqa_answer(answer, record.answer, record.options), [(metric, value)], value is not None

    def _score_report(self, record: Record, completion: str, _scores):
        f1 = metrics.report_finding_f1(completion, record.answer)
        stated = sorted([finding, negated] for finding, negated in findings(extract_answer(completion)))
        return stated, [("reportRougeL", metrics.rouge_l(completion, record.answer)), ("reportF1", f1)], f1 is not None

    def _score_caption(self, record: Record, completion: str, _scores):
        answer = extract_answer(completion)
        return answer, [("captionRougeL", metrics.rouge_l(completion, record.answer))], bool(answer)

    def _score_grounding(self, record: Record, completion: str, _scores):
        score = metrics.score_grounding(completion, [box.box for box in record.boxes])
        boxes = [{"label": group.label, "box": list(box)} for group in parse_boxes(completion).groups for box in group.boxes]
        observations = [(name, value) for iou in score.ious
                        for name, value in (("groundingMiou", iou), ("groundingAcc50", float(iou >= metrics.IOU_THRESHOLD)))]
        return boxes, observations, score.readable

    def _score_retrieval(self, record: Record, completion: str, letter_scores):
        ranking = retrieval_ranking(completion, record.options, letter_scores)
        observations = [(f"retrievalR{k}", metrics.recall_at_k([ranking], [record.answer], k)) for k in RECALL_AT]
        return ranking, observations, vqa_accuracy(extract_answer(completion), record.answer, record.options) is not None

    def totals(self) -> list[float]:
        """Sums, observation counts and counts as one flat vector (fixed order) for an all-reduce."""
        return [*self.sums.values(), *self.observations.values(), *self.counts.values()]

    @staticmethod
    def summary(totals: Sequence[float]) -> tuple[dict[str, float], dict[str, int]]:
        """Mean of each metric that had observations, and the counts, from (reduced) `totals()`."""
        n = len(METRIC_NAMES)
        sums, observations, counts = totals[:n], totals[n : 2 * n], totals[2 * n :]
        means = {name: s / o for name, s, o in zip(METRIC_NAMES, sums, observations) if o > 0}
        return means, {name: int(round(c)) for name, c in zip(COUNT_NAMES, counts)}
