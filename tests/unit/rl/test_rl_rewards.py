"""The verifiable rewards, against values computed by hand (the arithmetic is written next to each)."""

import math

import pytest

from medmo_trainer.answers import finding_f1, vqa_accuracy
from medmo_trainer.boxes import generalized_iou, parse_boxes
from medmo_trainer.config import RewardWeights
from medmo_trainer.rl.rewards import (
    AccuracyReward,
    BoxReward,
    OverlongPenalty,
    RewardSuite,
    TagCountFormatReward,
    box_reward,
    label_key,
    pair_score,
)

NORM = 2 * math.sqrt(2) * 1000  # 2*sqrt(H^2+W^2) on the 0-1000 grid = 2828.427...
A = (100.0, 100.0, 300.0, 300.0)
B = (600.0, 600.0, 700.0, 700.0)


def grounding(completions, boxes, lambda_fn=0.0, lambda_fp=0.0):
    reward = BoxReward(lambda_fn, lambda_fp)
    values = reward([None] * len(completions), completions, task=["grounding"] * len(completions), boxes=boxes)
    return values, reward.stats


# --- box reward -------------------------------------------------------------------------------


def test_exact_box_scores_one():
    # L1 = 0, GIoU = 1 -> s = (5*1 + 2*(1+1)/2)/7 = 1; B = 1/1; no penalty.
    values, _ = grounding(["Lesion <box>[[100, 100, 300, 300]]</box>"], [[list(A)]])
    assert values == [pytest.approx(1.0)]


def test_shifted_box_by_hand():
    # pred (150,100,350,300) vs A: |dx1|+|dx2| = 50+50 = 100 -> L1 = 100/2828.427 = 0.0353553
    # intersection 150*200 = 30000; union 40000+40000-30000 = 50000 -> IoU 0.6; hull 250*200 = 50000
    # -> GIoU 0.6. s = (5*(1-0.0353553) + 2*(0.6+1)/2)/7 = (4.8232233 + 1.6)/7 = 0.9176033
    expected = (5 * (1 - 100 / NORM) + 2 * 1.6 / 2) / 7
    assert expected == pytest.approx(0.9176033, abs=1e-7)
    values, _ = grounding(["<box>[[150, 100, 350, 300]]</box>"], [[list(A)]])
    assert values[0] == pytest.approx(expected)


def test_disjoint_box_has_negative_giou():
    # pred (200,0,300,100) vs truth (0,0,100,100): L1 = (200+200)/2828.427 = 0.1414214
    # IoU 0, union 20000, hull 300*100 = 30000 -> GIoU = -(30000-20000)/30000 = -1/3
    # s = (5*(1-0.1414214) + 2*(2/3)/2)/7 = (4.2928932 + 0.6666667)/7 = 0.7085086
    truth, pred = (0.0, 0.0, 100.0, 100.0), (200.0, 0.0, 300.0, 100.0)
    assert generalized_iou(pred, truth) == pytest.approx(-1 / 3)
    assert pair_score(pred, truth) == pytest.approx(0.7085086, abs=1e-7)


def test_far_box_clips_l1_at_one():
    # truth (0,0,10,10), pred (990,990,1000,1000): L1 = 4*990/2828.427 = 1.40 -> clip01 -> 1
    # IoU 0, union 200, hull 1e6 -> GIoU = -(1e6-200)/1e6 = -0.9998; s = (0 + 2*0.0002/2)/7 = 2.857e-5
    assert pair_score((990.0, 990.0, 1000.0, 1000.0), (0.0, 0.0, 10.0, 10.0)) == pytest.approx(0.0002 / 7)


def test_more_predictions_than_truths_with_false_positive_penalty():
    # G=1, P=2, Hungarian matches A to A (cost 0): B = 1/1 = 1
    # Pen = [0.3*(1-1) + 0.5*(2-1)]/max(1,1) = 0.5 -> R = clip01(1 - 0.5) = 0.5
    text = "Lesion <box>[[600, 600, 700, 700], [100, 100, 300, 300]]</box>"
    assert grounding([text], [[list(A)]], lambda_fn=0.3, lambda_fp=0.5)[0] == [pytest.approx(0.5)]
    # With the default lambdas (0) the spurious box costs nothing: R = 1.
    assert grounding([text], [[list(A)]])[0] == [pytest.approx(1.0)]


def test_fewer_predictions_than_truths_with_false_negative_penalty():
    # G=2, P=1, |M|=1 with s=1: B = 1/2 = 0.5; Pen = 0.2*(2-1)/2 = 0.1 -> R = 0.4
    values, _ = grounding(["<box>[[600, 600, 700, 700]]</box>"], [[list(A), list(B)]], lambda_fn=0.2)
    assert values == [pytest.approx(0.4)]


def test_hungarian_matching_ignores_order():
    # Truths [A, B], predictions written [B, A]: the optimal matching pairs equal boxes -> R = 1.
    values, _ = grounding(["x <box>[[600, 600, 700, 700]]</box> y <box>[[100, 100, 300, 300]]</box>"], [[list(A), list(B)]])
    assert values == [pytest.approx(1.0)]


def test_no_ground_truth_boxes():
    # G=0: predicting nothing is a correct abstention (1.0); any box scores 0 (B = 0).
    values, stats = grounding(["No lesion is visible.", "Lesion <box>[[1, 2, 3, 4]]</box>"], [[], []])
    assert values == [1.0, 0.0]
    assert stats["unparseable"] == 0


def test_no_predicted_boxes_scores_zero_and_is_counted():
    # G=1, P=0: |M| = 0 -> B = 0 -> R = 0; the text had no <box> block at all.
    values, stats = grounding(["I cannot tell."], [[list(A)]])
    assert values == [0.0]
    assert stats["unparseable"] == 1


def test_out_of_range_box_is_clipped_to_the_grid():
    # (-50, 100, 300, 1080) overshoots by less than a tenth of the grid: it clips to
    # (0, 100, 300, 1000), exactly the truth -> R = 1.
    values, stats = grounding(["<box>[[-50, 100, 300, 1080]]</box>"], [[[0, 100, 300, 1000]]])
    assert values == [pytest.approx(1.0)]
    assert stats["malformedBoxes"] == 0


def test_a_coordinate_far_off_the_grid_makes_the_box_malformed_not_an_edge_box():
    # 4339 is a digit too many, not a near miss: clipped, it would become (0, 100, 300, 1000), the
    # truth itself, and earn the full reward. It is malformed instead: counted, unmatched, R = 0.
    values, stats = grounding(["<box>[[0, 100, 300, 4339]]</box>", "<box>[[-200, 100, 300, 1000]]</box>"],
                              [[[0, 100, 300, 1000]], [[0, 100, 300, 1000]]])
    assert values == [0.0, 0.0]
    assert stats["malformedBoxes"] == 2
    # The edge of the tolerance: 1100 still clips.
    values, stats = grounding(["<box>[[0, 100, 300, 1100]]</box>"], [[[0, 100, 300, 1000]]])
    assert values == [pytest.approx(1.0)] and stats["malformedBoxes"] == 0


def test_degenerate_zero_width_box_scores_by_distance_only():
    # pred (100,100,100,300) vs A: L1 = 200/2828.427 = 0.0707107; IoU 0; union 40000, hull 40000
    # -> GIoU 0. s = (5*(1-0.0707107) + 2*(0+1)/2)/7 = (4.6464466 + 1)/7 = 0.8066352
    values, _ = grounding(["<box>[[100, 100, 100, 300]]</box>"], [[list(A)]])
    assert values[0] == pytest.approx(0.8066352, abs=1e-7)


def test_reversed_box_is_malformed_and_unmatched():
    # (300,100,100,300) has x2 < x1: malformed, counted in P but never matched -> B = 0.
    # With lambda_fp = 1: Pen = (0 + 1*(1-0))/1 = 1 as well; R = 0 either way.
    values, stats = grounding(["<box>[[300, 100, 100, 300]]</box>"], [[list(A)]], lambda_fp=1.0)
    assert values == [0.0]
    assert stats["malformedBoxes"] == 1


def test_malformed_text_never_raises():
    # Wrong arity, words, an empty block, an unclosed block and a non-string all score 0.
    completions = ["<box>[[12, abc, 3, 4]]</box>", "<box>[[1, 2, 3]]</box>", "<box>nonsense</box>", "<box>[[1, 2", None]
    values, stats = grounding(completions, [[list(A)]] * 5)
    assert values == [0.0] * 5
    assert stats["malformedBoxes"] == 3
    assert stats["unparseable"] == 2


def test_malformed_entry_next_to_a_good_box_counts_as_false_positive():
    # Entries [A] and [1, 2, 3]: P = 2 (one malformed), |M| = 1, B = 1; Pen = 0.5*(2-1)/1 -> R = 0.5
    values, _ = grounding(["<box>[[100, 100, 300, 300], [1, 2, 3]]</box>"], [[list(A)]], lambda_fp=0.5)
    assert values == [pytest.approx(0.5)]


def test_reference_boxes_from_answer_text_record_boxes_and_non_grounding_is_none():
    reward = BoxReward()
    values = reward(
        [None, None, None],
        ["Lesion <box>[[100, 100, 300, 300]]</box>", "Nodule <box>[[100, 100, 300, 300]]</box>", "yes"],
        task=["grounding", "grounding", "vqa"],
        answer=["Lesion <box>[[100, 100, 300, 300]]</box>", "ignored when boxes are given", "yes"],
        boxes=[None, [{"label": "nodule", "box": [100, 100, 300, 300]}], None],
    )
    assert values == [pytest.approx(1.0), pytest.approx(1.0), None]


def test_box_reward_function_matches_formula_for_two_pairs():
    # Truths [A, B]; predictions [A shifted 50 right, B exact]: s1 = 0.9176033, s2 = 1
    # B = (0.9176033 + 1)/2 = 0.9588017
    assert box_reward([(150.0, 100.0, 350.0, 300.0), B], [A, B]) == pytest.approx(0.9588017, abs=1e-7)


def test_labels_parse_before_each_box():
    parsed = parse_boxes("<think>two blobs.</think><answer>Lesion <box>[[1, 2, 3, 4]]</box>, Cyst <box>[[5, 6, 7, 8]]</box></answer>")
    assert parsed.labels == ["Lesion", "Cyst"]
    assert [label_key(label) for label in parsed.labels] == ["lesion", "cyst"]
    assert parsed.boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]


def test_a_joining_and_is_not_part_of_the_next_label():
    parsed = parse_boxes("The nodule <box>[[1, 2, 3, 4]]</box> and an effusion <box>[[5, 6, 7, 8]]</box>")
    assert [label_key(label) for label in parsed.labels] == ["nodule", "effusion"]


# --- accuracy ---------------------------------------------------------------------------------


def test_yes_no_matching():
    assert vqa_accuracy("Yes, there is a lesion.", "Yes") == 1.0
    assert vqa_accuracy("No.", "yes") == 0.0
    assert vqa_accuracy("maybe", "yes") is None


def test_option_letter_matching():
    options = ["Fracture", "Normal", "Tumor"]
    assert vqa_accuracy("(B) Normal", "B", options) == 1.0
    assert vqa_accuracy("Normal", "B", options) == 1.0  # the option's text picks its letter
    assert vqa_accuracy("The answer is C", "B", options) == 0.0
    assert vqa_accuracy("B.", "Normal", options) == 1.0  # a reference given as text maps to its letter
    assert vqa_accuracy("unsure", "B", options) is None
    # closed VQA whose options are the answers themselves (a count): the text picks the option
    assert vqa_accuracy("2", "2", ["0", "1", "2", "3"]) == 1.0
    assert vqa_accuracy("3", "2", ["0", "1", "2", "3"]) == 0.0


def test_normalised_exact_match():
    assert vqa_accuracy("The left lower lobe.", "left lower lobe") == 1.0
    assert vqa_accuracy("right lower lobe", "left lower lobe") == 0.0


def test_report_finding_f1_with_negation():
    reference = "Two lesions in the left upper region. No pleural effusion."
    # reference findings: {(two lesions in left upper region, +), (pleural effusion, negated)}
    # prediction asserts the effusion: {(two lesions..., +), (pleural effusion, +)} -> TP 1
    # F1 = 2*1/(2+2) = 0.5
    assert finding_f1("Two lesions in the left upper region. Pleural effusion is present.", reference) == 0.5
    assert finding_f1("There is no pleural effusion; two lesions in the left upper region.", reference) == 1.0
    # Three predicted findings, one right: F1 = 2*1/(3+2) = 0.4
    assert finding_f1("Two lesions in the left upper region. Cyst. Mass.", reference) == pytest.approx(0.4)


def test_accuracy_reward_by_task_counts_unparseable():
    reward = AccuracyReward()
    values = reward(
        [None] * 5,
        ["<think>look</think><answer>yes</answer>", "perhaps", "a caption", "Lesion <box>[[1,2,3,4]]</box>", ""],
        task=["vqa", "vqa", "caption", "grounding", "report"],
        answer=["Yes", "no", "A scan.", "Lesion <box>[[1,2,3,4]]</box>", "No lesion."],
    )
    # vqa 1; unreadable yes/no 0 (counted); caption not verifiable; grounding label F1 1; empty report 0 (counted)
    assert values == [1.0, 0.0, None, 1.0, 0.0]
    assert reward.stats["unparseable"] == 2


# --- format and length ------------------------------------------------------------------------


def test_tag_count_format_reward():
    reward = TagCountFormatReward()
    # all four tags once -> 4*0.25; answer tags only -> 0.5; <think> twice and </think> once -> 0.25
    values = reward([None] * 3, ["<think>a</think><answer>b</answer>", "<answer>b</answer>", "<think><think></think>"])
    assert values == [1.0, 0.5, 0.25]


def test_overlong_penalty_dapo():
    # L_max 100, L_cache 20: <= 80 -> 0; 90 -> (80-90)/20 = -0.5; 100 -> -1; 120 -> -1
    penalty = OverlongPenalty(max_length=100, buffer=20)
    assert penalty([None] * 5, [""] * 5, completion_length=[10, 80, 90, 100, 120]) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert penalty([None], [""]) == [None]
    with pytest.raises(ValueError, match="overlongBuffer"):
        OverlongPenalty(max_length=10, buffer=20)


# --- combination ------------------------------------------------------------------------------


def test_suite_weighted_total_and_stats():
    suite = RewardSuite(RewardWeights(accuracy=1.0, bbox=2.0, format=0.5, overlong=1.0, overlong_buffer=20), 100)
    scored = suite(
        [None, None],
        ["<answer>Lesion <box>[[100, 100, 300, 300]]</box></answer>", "garbage"],
        task=["grounding", "grounding"],
        answer=["Lesion <box>[[100, 100, 300, 300]]</box>"] * 2,
        completion_length=[40, 90],
    )
    # sample 0: accuracy 1*1 + bbox 2*1 + format 0.5*0.5 + overlong 0 = 3.25
    # sample 1: accuracy label F1 with no labels = 0, bbox 0, format 0, overlong (80-90)/20 = -0.5 -> -0.5
    assert scored.components["bbox"] == [pytest.approx(1.0), 0.0]
    assert scored.total == [pytest.approx(3.25), pytest.approx(-0.5)]
    assert suite.take_stats() == {"bbox/unparseable": 1}
    assert suite.take_stats() == {}
