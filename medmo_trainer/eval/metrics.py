"""The MedMO paper's evaluation metrics, as pure functions of prediction and reference texts.

Per-sample functions return a score in [0, 1], or None when the prediction cannot be read (the
caller counts it as unparseable and scores it 0). Reading model text (`medmo_trainer.answers`,
`medmo_trainer.boxes`) is shared with the RL rewards, so eval and reward read model text alike.

Grounding is scored per ground-truth box: within one sample, predicted boxes are matched one to
one to ground-truth boxes by the Hungarian method maximising total IoU; each ground-truth box
scores the IoU of its matched prediction, or 0 when it is left unmatched (fewer predictions than
truths, or no readable box). Mean IoU is the mean of those scores over every ground-truth box of
the benchmark, Acc@0.5 the fraction of them scoring at least 0.5. One-to-one matching keeps a
single large box from being credited for several findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from medmo_trainer.answers import extract_answer, finding_f1, normalize_text, vqa_accuracy
from medmo_trainer.boxes import Box, coerce_box, iou, parse_boxes

IOU_THRESHOLD = 0.5
"""IoU at which a ground-truth box counts as found (Acc@0.5)."""


# ---------------------------------------------------------------------------------------------
# VQA


def closed_vqa_accuracy(prediction: str, reference: str, options: Sequence[str] | None = None) -> float | None:
    """1.0 or 0.0 for a yes/no or multiple-choice answer; None when no choice can be read."""
    return vqa_accuracy(extract_answer(prediction), reference, options)


def open_vqa_accuracy(prediction: str, reference: str) -> float | None:
    """Normalised exact match (case, punctuation, articles, spacing ignored); None for an empty answer."""
    answer = normalize_text(extract_answer(prediction))
    if not answer:
        return None
    return float(answer == normalize_text(reference))


# ---------------------------------------------------------------------------------------------
# Reports and captions


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure on normalised words: P = LCS/len(pred), R = LCS/len(ref),
    F = (1 + beta^2) P R / (R + beta^2 P). Two empty texts score 1, one empty text 0."""
    predicted = normalize_text(extract_answer(prediction)).split()
    expected = normalize_text(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def report_finding_f1(prediction: str, reference: str) -> float | None:
    """F1 of the (finding, negated) sets of two reports; None when the prediction states no finding."""
    return finding_f1(extract_answer(prediction), reference)


# ---------------------------------------------------------------------------------------------
# Grounding


def matched_ious(predicted: Sequence[Box], truths: Sequence[Box]) -> list[float]:
    """One IoU per ground-truth box, in order: its one-to-one Hungarian match, 0 when unmatched."""
    scores = [0.0] * len(truths)
    if not predicted or not truths:
        return scores
    overlaps = np.array([[iou(p, t) for p in predicted] for t in truths])
    rows, cols = linear_sum_assignment(overlaps, maximize=True)
    for row, col in zip(rows, cols):
        scores[row] = float(overlaps[row, col])
    return scores


@dataclass
class GroundingScore:
    """Grounding of one sample: the matched IoU of each ground-truth box."""

    ious: list[float]
    readable: bool
    """Whether the prediction held at least one valid box."""
    predicted: int
    """Boxes the prediction wrote, malformed ones included."""


def score_grounding(prediction: str, truths: Sequence[Sequence[float]]) -> GroundingScore:
    """Matched IoUs of a prediction's `<box>` boxes against ground-truth XYXY boxes (0-1000 grid)."""
    parsed = parse_boxes(prediction)
    reference = [box for box in (coerce_box(list(t)) for t in truths) if box is not None]
    return GroundingScore(matched_ious(parsed.boxes, reference), bool(parsed.boxes), parsed.predicted_count)


def grounding_summary(ious: Sequence[float]) -> dict[str, float]:
    """Mean IoU and Acc@0.5 over ground-truth boxes (each entry one box's matched IoU)."""
    if not ious:
        return {}
    return {
        "groundingMiou": float(np.mean(ious)),
        "groundingAcc50": float(np.mean([score >= IOU_THRESHOLD for score in ious])),
    }


# ---------------------------------------------------------------------------------------------
# Retrieval


def recall_at_k(rankings: Sequence[Sequence[str]], answers: Sequence[str], k: int) -> float:
    """Fraction of queries whose correct candidate is among the first k of its ranking."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(rankings) != len(answers):
        raise ValueError(f"{len(rankings)} rankings for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(answer in list(ranking)[:k] for ranking, answer in zip(rankings, answers)) / len(answers)
