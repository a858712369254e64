"""The box reward scored a batch at a time gives what the per-pair definitions give, completion by completion."""

import random

import numpy as np
from scipy.optimize import linear_sum_assignment

from medmo_trainer.boxes import generalized_iou, normalized_l1
from medmo_trainer.rl.rewards import BoxReward, box_rewards, pair_score, pair_terms


def random_box(rng: random.Random) -> tuple[float, float, float, float]:
    kind = rng.random()
    x1, y1 = rng.randint(0, 1000), rng.randint(0, 1000)
    if kind < 0.1:  # zero width or height
        return (x1, y1, x1, min(1000, y1 + rng.randint(0, 50)))
    if kind < 0.15:  # a point
        return (x1, y1, x1, y1)
    return (x1, y1, min(1000, x1 + rng.randint(1, 300)), min(1000, y1 + rng.randint(1, 300)))


def one_by_one(predicted, truths, malformed, lambda_fn, lambda_fp) -> float:
    """R_bbox written out pair by pair, as the paper defines it (the reference for the batched code)."""
    g, p = len(truths), len(predicted) + malformed
    if g == 0:
        return 1.0 if p == 0 else 0.0
    matched = []
    if predicted:
        cost = [[5 * normalized_l1(pb, tb) + 2 * (1 - generalized_iou(pb, tb)) for pb in predicted] for tb in truths]
        rows, cols = linear_sum_assignment(np.array(cost))
        matched = [pair_score(predicted[c], truths[r]) for r, c in zip(rows, cols)]
    penalty = (lambda_fn * (g - len(matched)) + lambda_fp * (p - len(matched))) / max(1, g)
    return min(max(sum(matched) / g - penalty, 0.0), 1.0)


def test_pair_terms_equal_the_scalar_definitions_including_degenerate_boxes():
    rng = random.Random(0)
    pairs = [(random_box(rng), random_box(rng)) for _ in range(2000)]
    pairs += [((5, 5, 5, 5), (5, 5, 5, 5)), ((5, 5, 5, 5), (6, 6, 6, 6)), ((0, 0, 0, 10), (0, 20, 0, 30))]
    cost, score = pair_terms(np.array([p for p, _ in pairs], float), np.array([t for _, t in pairs], float))
    for (p, t), c, s in zip(pairs, cost.tolist(), score.tolist()):
        assert s == pair_score(p, t)
        assert c == 5 * normalized_l1(p, t) + 2 * (1 - generalized_iou(p, t))


def test_a_batch_scores_each_completion_as_alone():
    rng = random.Random(1)
    cases = []
    for _ in range(500):
        truths = [random_box(rng) for _ in range(rng.randint(0, 5))]
        predicted = [random_box(rng) for _ in range(rng.randint(0, 5))]
        cases.append((predicted, truths, rng.randint(0, 2) * (rng.random() < 0.2)))
    for lambdas in [(0.0, 0.0), (0.3, 0.5)]:
        batched = box_rewards([(p, m) for p, _, m in cases], [t for _, t, _ in cases], *lambdas)
        assert batched == [one_by_one(p, t, m, *lambdas) for p, t, m in cases]


def test_completions_without_references_are_none_in_a_mixed_batch():
    reward = BoxReward()
    values = reward([None] * 3, ["<box>[[0, 0, 10, 10]]</box>", "yes", "<box>[[0, 0, 10, 10]]</box>"],
                    task=["grounding", "vqa", "grounding"], boxes=[[[0, 0, 10, 10]], None, [[500, 500, 600, 600]]])
    assert values[0] == 1.0 and values[1] is None and 0.0 < values[2] < 0.8
