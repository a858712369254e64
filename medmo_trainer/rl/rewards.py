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

import functools
import itertools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from scipy.optimize import linear_sum_assignment

from medmo_trainer.answers import extract_answer, finding_f1, normalize_text, vqa_accuracy
from medmo_trainer.boxes import L1_NORMALIZER, Box, coerce_boxes, generalized_iou, normalized_l1, parse_boxes, read_boxes
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
    """
    def rows(lists: Sequence[Sequence[Box]]) -> tuple[np.ndarray, np.ndarray]:
        flat = [tuple(box) for boxes in lists for box in boxes]
        return (np.array(flat, dtype=float).reshape(-1, 4),
                np.repeat(np.arange(len(lists)), [len(boxes) for boxes in lists]))

    predicted, predicted_owner = rows([boxes for boxes, _ in predictions])
    true_boxes, truth_owner = rows(truths)
    return batch_box_rewards(predicted, predicted_owner, true_boxes, truth_owner,
                             [malformed for _, malformed in predictions], lambda_fn, lambda_fp)


ENUMERATED_MATCHING = 5
"""Completions with at most this many truths and predictions are matched by trying every assignment at once."""

_TIE = 1e-9


@functools.cache
def _assignments(larger: int, smaller: int) -> np.ndarray:
    """Every injective map of `smaller` items into `larger`, one per row: (larger!/(larger-smaller)!, smaller)."""
    return np.array(list(itertools.permutations(range(larger), smaller)), dtype=np.int64).reshape(-1, smaller)


def _enumerated_matching(cost: np.ndarray, score: np.ndarray, starts: np.ndarray, rows: int, columns: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The optimal matching of M completions that share a G x N shape, by trying every assignment.

    Returns each completion's sum of matched scores (summed row by row, as `linear_sum_assignment`'s
    rows come) and a mask of those whose best total cost is within `_TIE` of another assignment's:
    for those the enumeration and the solver may pick different optima, so the caller asks the solver.
    """
    index = starts[:, None] + np.arange(rows * columns)
    costs, scores = cost[index].reshape(-1, rows, columns), score[index].reshape(-1, rows, columns)
    everyone = np.arange(len(starts))[:, None]
    if rows <= columns:  # each truth (row) takes a distinct prediction
        picked = _assignments(columns, rows)
        totals = costs[:, np.arange(rows), picked].sum(axis=2)
        best = totals.argmin(axis=1)
        matched = scores[everyone, np.arange(rows), picked[best]]
    else:  # each prediction (column) takes a distinct truth; the matched pairs are then put in row order
        picked = _assignments(rows, columns)
        totals = costs[:, picked, np.arange(columns)].sum(axis=2)
        best = totals.argmin(axis=1)
        chosen_rows = picked[best]
        order = np.argsort(chosen_rows, axis=1)
        matched = scores[everyone, np.take_along_axis(chosen_rows, order, axis=1), order]
    lowest = totals[everyone[:, 0], best]
    ties = (totals <= (lowest + _TIE * (1.0 + np.abs(lowest)))[:, None]).sum(axis=1) > 1
    sums = matched[:, 0]
    for j in range(1, matched.shape[1]):
        sums = sums + matched[:, j]
    return sums, ties


def batch_box_rewards(
    predicted: np.ndarray,
    predicted_owner: np.ndarray,
    truths: np.ndarray,
    truth_owner: np.ndarray,
    malformed: Sequence[int],
    lambda_fn: float = 0.0,
    lambda_fp: float = 0.0,
) -> list[float]:
    """`box_rewards` on arrays: (N, 4) boxes with the completion each belongs to (non-decreasing), for
    `len(malformed)` completions.

    Every pair's C and s come from one `pair_terms` call for the whole batch, and a completion with one
    truth or one prediction (a plain argmin) is matched with the others of its kind at once, and so are
    small ones of one shape (`_enumerated_matching`); larger ones and near-ties go to
    `linear_sum_assignment` one by one. Same arithmetic, in the same order, as one completion alone.
    """
    size = len(malformed)
    n = np.bincount(predicted_owner, minlength=size)
    g = np.bincount(truth_owner, minlength=size)
    pair_counts = g * n
    first_prediction = np.cumsum(n) - n
    first_truth = np.cumsum(g) - g
    first_pair = np.cumsum(pair_counts) - pair_counts
    # Pair k of completion i is (truth r, prediction c) with k = r * n_i + c, as in its G x N cost matrix.
    pair_owner = np.repeat(np.arange(size), pair_counts)
    local = np.arange(int(pair_counts.sum())) - first_pair[pair_owner]
    row, column = np.divmod(local, np.maximum(n, 1)[pair_owner])
    cost, score = pair_terms(predicted[first_prediction[pair_owner] + column], truths[first_truth[pair_owner] + row])

    matched_sum = np.zeros(size)
    matched = np.minimum(g, n)
    single = np.flatnonzero((pair_counts > 0) & (matched == 1))
    if single.size:  # argmin of the one row or column: the first of equal costs, as the assignment takes it
        paired = np.flatnonzero(pair_counts)
        lowest = np.full(size, np.inf)
        lowest[paired] = np.minimum.reduceat(cost, first_pair[paired])
        is_single = np.zeros(size, dtype=bool)
        is_single[single] = True
        at_lowest = np.flatnonzero((cost == lowest[pair_owner]) & is_single[pair_owner])
        owners = pair_owner[at_lowest]
        first = np.ones(len(owners), dtype=bool)
        first[1:] = owners[1:] != owners[:-1]
        matched_sum[owners[first]] = score[at_lowest[first]]
    several = matched > 1
    one_by_one = np.zeros(size, dtype=bool)
    for rows, columns in set(zip(g[several].tolist(), n[several].tolist())):
        items = np.flatnonzero(several & (g == rows) & (n == columns))
        if max(rows, columns) > ENUMERATED_MATCHING:
            one_by_one[items] = True
            continue
        sums, ties = _enumerated_matching(cost, score, first_pair[items], rows, columns)
        matched_sum[items] = sums
        one_by_one[items[ties]] = True
    for i in np.flatnonzero(one_by_one).tolist():
        rows, columns, start = int(g[i]), int(n[i]), int(first_pair[i])
        r, c = linear_sum_assignment(cost[start:start + rows * columns].reshape(rows, columns))
        total = 0
        for value in score[start + r * columns + c].tolist():
            total += value  # row by row, as `sum` of the matched scores
        matched_sum[i] = total

    with np.errstate(divide="ignore", invalid="ignore"):
        coverage = matched_sum / g
    predicted_count = n + np.asarray(malformed, dtype=np.int64)
    penalty = (lambda_fn * (g - matched) + lambda_fp * (predicted_count - matched)) / np.maximum(1, g)
    reward = np.minimum(np.maximum(coverage - penalty, 0.0), 1.0)
    reward = np.where(g == 0, np.where(predicted_count == 0, 1.0, 0.0), reward)
    return reward.tolist()


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
        # The completions that have reference boxes are scored together: their labelled boxes (one flat
        # list), or, for a grounding record sent without them, the boxes of its answer text.
        scored: list[int] = []
        labelled: list = []
        labelled_owner: list[int] = []
        from_answers: list[tuple[int, str]] = []  # (position among the scored, answer)
        for index, (task, answer, reference_boxes) in enumerate(zip(tasks, answers, boxes)):
            if reference_boxes is not None:
                labelled += [b.get("box") if isinstance(b, dict) else b for b in reference_boxes]
                labelled_owner += [len(scored)] * len(reference_boxes)
            elif task == "grounding" and answer is not None:
                from_answers.append((len(scored), answer))
            else:
                continue
            scored.append(index)
        values: list[float | None] = [None] * size
        if not scored:
            return values
        truths, truth_owner = self._truths(labelled, labelled_owner, from_answers)
        parsed = read_boxes([completions[i] for i in scored])
        self.stats["malformedBoxes"] += sum(parsed.malformed)
        has_truths = np.bincount(truth_owner, minlength=len(scored)) > 0
        self.stats["unparseable"] += sum(t and not found for t, found in zip(has_truths.tolist(), parsed.found_block))
        rewards = batch_box_rewards(parsed.boxes, parsed.owner, truths, truth_owner, parsed.malformed,
                                    self.lambda_fn, self.lambda_fp)
        for index, value in zip(scored, rewards):
            values[index] = value
        return values

    def _truths(self, labelled: list, labelled_owner: list[int], from_answers: list[tuple[int, str]]
                ) -> tuple[np.ndarray, np.ndarray]:
        """The valid reference boxes of the scored completions, rows in completion order, and their owners."""
        truths, valid = coerce_boxes(labelled)
        self.stats["malformedReference"] += int((~valid).sum())
        truths, owner = truths[valid], np.array(labelled_owner, dtype=np.int64)[valid]
        if from_answers:  # records sent without labelled boxes: rare, merged in completion order
            positions, answers = zip(*from_answers)
            parsed = read_boxes(answers)
            owner = np.concatenate([owner, np.array(positions)[parsed.owner]])
            order = np.argsort(owner, kind="stable")
            truths, owner = np.concatenate([truths, parsed.boxes])[order], owner[order]
        return truths, owner


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
