"""The box reward scored a batch at a time gives what the per-pair definitions and the one-text readers give,
completion by completion and bit for bit."""

import random

import numpy as np
from scipy.optimize import linear_sum_assignment

from medmo_trainer.boxes import coerce_box, coerce_boxes, generalized_iou, normalized_l1, parse_boxes, read_boxes
from medmo_trainer.rl.rewards import BoxReward, _enumerated_matching, box_rewards, pair_score, pair_terms


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


def assert_batch_scores_each_as_alone(cases: list) -> None:
    """`cases`: (predicted, truths, malformed) per completion; with and without the penalties."""
    for lambdas in [(0.0, 0.0), (0.3, 0.5)]:
        batched = box_rewards([(p, m) for p, _, m in cases], [t for _, t, _ in cases], *lambdas)
        assert batched == [one_by_one(p, t, m, *lambdas) for p, t, m in cases]


def test_a_batch_scores_each_completion_as_alone():
    rng = random.Random(1)
    cases = []
    for _ in range(500):
        truths = [random_box(rng) for _ in range(rng.randint(0, 5))]
        predicted = [random_box(rng) for _ in range(rng.randint(0, 5))]
        cases.append((predicted, truths, rng.randint(0, 2) * (rng.random() < 0.2)))
    assert_batch_scores_each_as_alone(cases)


def test_completions_without_references_are_none_in_a_mixed_batch():
    reward = BoxReward()
    values = reward([None] * 3, ["<box>[[0, 0, 10, 10]]</box>", "yes", "<box>[[0, 0, 10, 10]]</box>"],
                    task=["grounding", "vqa", "grounding"], boxes=[[[0, 0, 10, 10]], None, [[500, 500, 600, 600]]])
    assert values[0] == 1.0 and values[1] is None and 0.0 < values[2] < 0.8


def test_large_matchings_and_tied_costs_give_the_solver_s_answer():
    """Up to 8 x 8 (beyond the enumerated shapes: the solver one by one) and duplicated boxes (equal costs)."""
    rng = random.Random(2)
    cases = []
    for _ in range(300):
        truths = [random_box(rng) for _ in range(rng.randint(1, 8))]
        predicted = [random_box(rng) for _ in range(rng.randint(1, 8))]
        if rng.random() < 0.4:  # the same box twice, or a prediction equal to a truth: ties between assignments
            predicted.append(predicted[0])
            truths.append(rng.choice(predicted))
        cases.append((predicted, truths, 0))
    assert_batch_scores_each_as_alone(cases)


NUMBERS = ["7", "1000", "1100", "1101", "-100", "-101", "+.5", "5.", "1e2", "1E+3", "1e999", "inf", "nan", "1_0",
           "\u0663", " 7 ", "\t8", "\u00a09", "x", "", "1.5.2", "--3", "0x10", "-0"]


def random_text(rng: random.Random) -> str:
    def entry() -> str:
        count = rng.choice([4, 4, 4, 4, 3, 5, 0])
        return "[" + ",".join(rng.choice(NUMBERS) if rng.random() < 0.3 else str(rng.randint(0, 1000))
                              for _ in range(count)) + "]"
    blocks = [rng.choice(["Lesion ", "; mass ", ""]) + "<box>[" + ", ".join(entry() for _ in range(rng.randint(0, 4)))
              + "]" + rng.choice(["</box>", "</BOX>", "", "]</box>"]) for _ in range(rng.randint(0, 3))]
    return rng.choice(["", "<think>look</think>"]) + "".join(blocks)


def test_reading_a_batch_of_texts_gives_each_text_s_boxes_and_malformed_count():
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(2000)] + [None, 12, "no boxes at all"]
    batch = read_boxes(texts)
    for index, text in enumerate(texts):
        parsed = parse_boxes(text)
        assert batch.boxes[batch.owner == index].tolist() == [list(box) for box in parsed.boxes]
        assert (batch.malformed[index], batch.found_block[index]) == (parsed.malformed, parsed.found_block)
    assert sum(batch.malformed) > 1000 and len(batch.boxes) > 300  # the texts do exercise both outcomes


def test_coercing_a_batch_of_values_gives_each_value_s_box():
    rng = random.Random(4)
    corners = [(rng.randint(-150, 1000), rng.randint(-150, 1000)) for _ in range(500)]
    values = [[x, y, x + rng.randint(-20, 300), y + rng.randint(-20, 300)] for x, y in corners]
    assert 100 < coerce_boxes(values)[1].sum() < 500  # plain lists (one array at once), valid and not
    odd = values + [[1, 2, 3], (1, 2, 3, 4), [1, "2", 3, 4], [1, " 3 ", 5, 9], [True, 2, 3, 4], [None, 1, 2, 3],
                    [float("nan"), 1, 2, 3], [1, "x", 3, 4], [10**400, 1, 2, 3], "1234", None, {"box": [1, 2, 3, 4]}, np.array([1, 2, 3, 4])]
    for batch in (values, odd):
        boxes, valid = coerce_boxes(batch)
        expected = [coerce_box(v) for v in batch]
        assert valid.tolist() == [box is not None for box in expected]
        assert [tuple(row) for row, ok in zip(boxes.tolist(), valid.tolist()) if ok] == [b for b in expected if b is not None]


def test_enumerated_matching_hands_equal_cost_assignments_to_the_solver():
    """Two assignments of equal total cost but different scores: the enumeration flags it instead of choosing."""
    costs = np.array([[1.0, 2.0, 2.0, 3.0],   # 2x2: the diagonal and the anti-diagonal both cost 4
                      [1.0, 3.0, 3.0, 1.0],   # diagonal 2, anti-diagonal 6: one optimum
                      [5.0, 1.0, 1.0, 5.0]])  # anti-diagonal only
    scores = np.array([[0.9, 0.1, 0.2, 0.3],
                       [0.9, 0.1, 0.2, 0.3],
                       [0.4, 0.8, 0.7, 0.6]])
    sums, ties = _enumerated_matching(costs.ravel(), scores.ravel(), np.array([0, 4, 8]), 2, 2)
    assert ties.tolist() == [True, False, False]
    assert sums[1:].tolist() == [0.9 + 0.3, 0.8 + 0.7]
    # 3 truths, 2 predictions: matched pairs are summed in row order, as the solver returns them
    cost = np.array([[9.0, 1.0], [9.0, 9.0], [1.0, 9.0]])
    score = np.array([[0.0, 0.25], [0.0, 0.0], [0.5, 0.0]])
    sums, ties = _enumerated_matching(cost.ravel(), score.ravel(), np.array([0]), 3, 2)
    rows, columns = linear_sum_assignment(cost)
    assert not ties[0] and sums[0] == sum(score[rows, columns].tolist())
