"""The verifiable rewards of MedMO's RL stage, as plain callables combined with weights.

Every reward is a callable `(prompts, completions, **columns) -> list[float | None]`: one value per
completion, None where the reward does not apply to that sample (a VQA record has no boxes to
score). Columns are lists aligned with `completions`:

- `task`: the record's task type (`grounding`, `vqa`, `report`, `retrieval`, `caption`);
- `answer`: the reference answer text;
- `boxes`: reference boxes on the 0-1000 grid, each `[x1, y1, x2, y2]` or a record's
  `{"label": ..., "box": [x1, y1, x2, y2]}`; None (or absent) reads them from `answer`;
- `options`: the choices of a multiple-choice question, or None;
- `completion_length`: the completion's length in tokens (for the over-length penalty).

Text that cannot be read scores 0 and is counted in the reward's `stats` (a Counter the caller
reads and resets); nothing here raises on model output.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from scipy.optimize import linear_sum_assignment

from medmo_trainer.answers import extract_answer, finding_f1, normalize_text, vqa_accuracy
from medmo_trainer.boxes import L1_NORMALIZER, Box, coerce_box, generalized_iou, normalized_l1, parse_boxes
from medmo_trainer.config import RewardWeights

RewardFn = Callable[..., list[float | None]]

# The paper's weights inside the box reward: 5 for the L1 term, 2 for the GIoU term.
L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0


def _column(columns: dict, name: str, size: int) -> list:
    values = columns.get(name)
    return list(values) if values is not None else [None] * size


# ---------------------------------------------------------------------------------------------
# Box reward


def pair_score(pred: Box, truth: Box) -> float:
    """s_ij = [5*(1-clip01(L1)) + 2*(GIoU+1)/2] / 7, in [0, 1]."""
    l1 = min(max(normalized_l1(pred, truth), 0.0), 1.0)
    giou = generalized_iou(pred, truth)
    return (L1_WEIGHT * (1.0 - l1) + GIOU_WEIGHT * (giou + 1.0) / 2.0) / (L1_WEIGHT + GIOU_WEIGHT)


def pair_terms(predicted: np.ndarray, truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matching cost C and score s of aligned boxes, row by row: (N, 4) and (N, 4) -> (N,), (N,).

    The same arithmetic, in the same order, as `normalized_l1`, `generalized_iou` and `pair_score`
    (C = 5*L1 + 2*(1-GIoU)), for all pairs of a batch at once.
    """
    px1, py1, px2, py2 = predicted.T
    tx1, ty1, tx2, ty2 = truths.T
    distance = np.abs(predicted - truths)
    l1 = (((distance[:, 0] + distance[:, 1]) + distance[:, 2]) + distance[:, 3]) / L1_NORMALIZER
    intersection = (np.maximum(0.0, np.minimum(px2, tx2) - np.maximum(px1, tx1))
                    * np.maximum(0.0, np.minimum(py2, ty2) - np.maximum(py1, ty1)))
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - intersection
    hull = (np.maximum(px2, tx2) - np.minimum(px1, tx1)) * (np.maximum(py2, ty2) - np.minimum(py1, ty1))
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = intersection / union
        giou = np.where(hull > 0.0, overlap - (hull - union) / hull, overlap)
    giou = np.where(union > 0.0, giou, np.where((predicted == truths).all(axis=1), 1.0, -1.0))
    cost = L1_WEIGHT * l1 + GIOU_WEIGHT * (1.0 - giou)
    score = (L1_WEIGHT * (1.0 - np.clip(l1, 0.0, 1.0)) + GIOU_WEIGHT * (giou + 1.0) / 2.0) / (L1_WEIGHT + GIOU_WEIGHT)
    return cost, score


def box_rewards(
    predictions: Sequence[tuple[Sequence[Box], int]],
    truths: Sequence[Sequence[Box]],
    lambda_fn: float = 0.0,
    lambda_fp: float = 0.0,
) -> list[float]:
    """The paper's R_bbox for a batch: one (predicted boxes, malformed count) and one truth list per completion.

    Hungarian matching on C_ij = 5*L1_ij + 2*(1-GIoU_ij); B = sum of matched s_ij / G;
    Pen = [lambda_fn*(G-|M|) + lambda_fp*(P-|M|)] / max(1, G); R = clip01(B - Pen).
    `malformed` boxes count in P but are never matched. Edge cases: no truths and no predictions
    is a correct abstention (1.0); predictions where there are no truths score 0 (B is 0).
    Every pair's C and s come from one `pair_terms` call for the whole batch (the per-pair Python
    arithmetic was most of a scoring's time); a one-row or one-column matching is a plain argmin.
    """
    pair_predicted: list[float] = []  # coordinates of every pair, flat: row r = truth r, column c = prediction c
    pair_truths: list[float] = []
    for (predicted, _), true_boxes in zip(predictions, truths):
        if predicted and true_boxes:
            pair_predicted.extend(chain.from_iterable(predicted * len(true_boxes)))
            pair_truths.extend(chain.from_iterable(tuple(t) * len(predicted) for t in true_boxes))
    cost_array = score_array = np.empty(0)
    if pair_predicted:
        cost_array, score_array = pair_terms(np.array(pair_predicted, dtype=float).reshape(-1, 4),
                                             np.array(pair_truths, dtype=float).reshape(-1, 4))
    cost, score = cost_array.tolist(), score_array.tolist()
    rewards = []
    offset = 0
    for (predicted, malformed), true_boxes in zip(predictions, truths):
        g, n, p = len(true_boxes), len(predicted), len(predicted) + malformed
        if g == 0:
            rewards.append(1.0 if p == 0 else 0.0)
            continue
        matched_scores: list[float] = []
        if n:
            pairs = range(offset, offset + g * n)
            if g == 1 or n == 1:  # argmin of the one row or column (the first of equal costs, as the assignment)
                matched_scores = [score[min(pairs, key=cost.__getitem__)]]
            else:
                rows, cols = linear_sum_assignment(cost_array[offset:offset + g * n].reshape(g, n))
                matched_scores = [score[offset + r * n + c] for r, c in zip(rows.tolist(), cols.tolist())]
            offset += g * n
        matched = len(matched_scores)
        coverage = sum(matched_scores) / g
        penalty = (lambda_fn * (g - matched) + lambda_fp * (p - matched)) / max(1, g)
        rewards.append(min(max(coverage - penalty, 0.0), 1.0))
    return rewards


def box_reward(
    predicted: Sequence[Box],
    truths: Sequence[Box],
    malformed: int = 0,
    lambda_fn: float = 0.0,
    lambda_fp: float = 0.0,
) -> float:
    """The paper's R_bbox for one completion (`box_rewards` of a batch of one)."""
    return box_rewards([(predicted, malformed)], [truths], lambda_fn, lambda_fp)[0]


class BoxReward:
    """R_bbox per completion; None for samples without reference boxes (non-grounding tasks)."""

    name = "bbox"

    def __init__(self, lambda_fn: float = 0.0, lambda_fp: float = 0.0):
        self.lambda_fn = lambda_fn
        self.lambda_fp = lambda_fp
        self.stats: Counter[str] = Counter()

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float | None]:
        size = len(completions)
        tasks, answers, boxes = (_column(columns, c, size) for c in ("task", "answer", "boxes"))
        scored: list[int] = []  # the completions that have reference boxes, scored together
        predictions: list[tuple[list[Box], int]] = []
        references: list[list[Box]] = []
        for index, (completion, task, answer, reference_boxes) in enumerate(zip(completions, tasks, answers, boxes)):
            truths = self._truths(task, answer, reference_boxes)
            if truths is not None:
                scored.append(index)
                predictions.append(self._parse(completion, truths))
                references.append(truths)
        values: list[float | None] = [None] * size
        for index, value in zip(scored, box_rewards(predictions, references, self.lambda_fn, self.lambda_fp)):
            values[index] = value
        return values

    def _truths(self, task: str | None, answer: str | None, reference_boxes: list | None) -> list[Box] | None:
        if reference_boxes is not None:
            truths = [coerce_box(b.get("box") if isinstance(b, dict) else b) for b in reference_boxes]
            self.stats["malformedReference"] += sum(t is None for t in truths)
            return [t for t in truths if t is not None]
        if task == "grounding" and answer is not None:
            return parse_boxes(answer).boxes
        return None

    def _parse(self, completion: str, truths: list[Box]) -> tuple[list[Box], int]:
        """The completion's valid boxes and its count of malformed ones (both counted in `stats`)."""
        parsed = parse_boxes(completion)
        malformed = parsed.malformed
        self.stats["malformedBoxes"] += malformed
        if truths and not parsed.found_block:
            self.stats["unparseable"] += 1
        return parsed.boxes, malformed


# ---------------------------------------------------------------------------------------------
# Label accuracy

_JOINING_AND = re.compile(r"\band\b")


def label_key(label: str) -> str:
    """A label as label accuracy compares it: normalised, after a joining `and` (`... and mass <box>`)."""
    return normalize_text(_JOINING_AND.split(label)[-1])


def label_f1(predicted: Sequence[str], expected: Sequence[str]) -> float:
    """F1 of two label sets (empty labels ignored); 1.0 when both are empty."""
    p, e = {x for x in predicted if x}, {x for x in expected if x}
    if not p and not e:
        return 1.0
    return 2.0 * len(p & e) / (len(p) + len(e))


class AccuracyReward:
    """Label accuracy (the paper's factuality reward), by task.

    vqa and retrieval: `vqa_accuracy` on the `<answer>` text; report: finding-set F1 with negation;
    grounding: F1 of the labels written before each box; caption: None (not verifiable).
    """

    name = "accuracy"

    def __init__(self):
        self.stats: Counter[str] = Counter()

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float | None]:
        size = len(completions)
        tasks, answers, options = (_column(columns, c, size) for c in ("task", "answer", "options"))
        return [self._score(*row) for row in zip(completions, tasks, answers, options)]

    def _score(self, completion: str, task: str | None, answer: str | None, options: list | None) -> float | None:
        if answer is None or task in (None, "caption"):
            return None
        if task == "grounding":
            reference_labels = [label_key(label) for label in parse_boxes(answer).labels]
            if not any(reference_labels):
                return None
            return label_f1([label_key(label) for label in parse_boxes(completion).labels], reference_labels)
        prediction = extract_answer(completion)
        if task == "report":
            score = finding_f1(prediction, answer)
        else:
            score = vqa_accuracy(prediction, answer, options)
        if score is None:
            self.stats["unparseable"] += 1
            return 0.0
        return score


# ---------------------------------------------------------------------------------------------
# Format and length

FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class TagCountFormatReward:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once."""

    name = "format"

    def __init__(self):
        self.stats: Counter[str] = Counter()

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float | None]:
        return [self._score(c) for c in completions]

    def _score(self, completion: object) -> float:
        if not isinstance(completion, str):
            self.stats["unparseable"] += 1
            return 0.0
        return sum(0.25 for tag in FORMAT_TAGS if completion.count(tag) == 1)


class OverlongPenalty:
    """DAPO's soft over-length punishment, in [-1, 0].

    With L_max the completion budget and L_cache the buffer: 0 up to L_max - L_cache tokens, then
    falling linearly to -1 at L_max, and -1 beyond. Needs the `completion_length` column (tokens);
    None for samples without it.
    """

    name = "overlong"

    def __init__(self, max_length: int, buffer: int):
        if buffer > max_length:
            raise ValueError(f"overlongBuffer ({buffer}) must not exceed maxCompletionLength ({max_length})")
        self.max_length = max_length
        self.buffer = buffer
        self.stats: Counter[str] = Counter()

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> list[float | None]:
        lengths = _column(columns, "completion_length", len(completions))
        return [None if n is None else self.penalty(int(n)) for n in lengths]

    def penalty(self, length: int) -> float:
        expected = self.max_length - self.buffer
        if length <= expected:
            return 0.0
        if length <= self.max_length:
            return (expected - length) / self.buffer
        return -1.0


# ---------------------------------------------------------------------------------------------
# Combination


@dataclass
class ScoredBatch:
    """Rewards of a batch: each component (None where it does not apply) and the weighted total."""

    components: dict[str, list[float | None]]
    total: list[float]


class RewardSuite:
    """The reward components of an `rl` stage and their weights.

    The total is the weighted sum of the components that apply to a sample (a None counts 0).
    """

    def __init__(self, weights: RewardWeights, max_completion_length: int):
        self.weights = {
            "accuracy": weights.accuracy,
            "bbox": weights.bbox,
            "format": weights.format,
            "overlong": weights.overlong,
        }
        self.functions: dict[str, RewardFn] = {
            "accuracy": AccuracyReward(),
            "bbox": BoxReward(weights.lambda_fn, weights.lambda_fp),
            "format": TagCountFormatReward(),
            "overlong": OverlongPenalty(max_completion_length, min(weights.overlong_buffer, max_completion_length)),
        }

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> ScoredBatch:
        components = {name: fn(prompts, completions, **columns) for name, fn in self.functions.items()}
        total = [
            sum(self.weights[name] * values[i] for name, values in components.items() if values[i] is not None)
            for i in range(len(completions))
        ]
        return ScoredBatch(components, total)

    def take_stats(self) -> dict[str, int]:
        """Parse-failure counts since the last call, as `<component>/<what>`, then reset them."""
        counts = {
            f"{name}/{what}": n for name, fn in self.functions.items() for what, n in getattr(fn, "stats", {}).items() if n
        }
        for fn in self.functions.values():
            fn.stats.clear()
        return counts
