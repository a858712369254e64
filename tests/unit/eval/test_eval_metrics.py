"""The evaluation metrics against values computed by hand (the arithmetic is written next to each)."""

import pytest

from medmo_trainer.data.schema import Box, Record
from medmo_trainer.boxes import iou
from medmo_trainer.eval.metrics import (
    closed_vqa_accuracy,
    grounding_summary,
    lcs_length,
    matched_ious,
    open_vqa_accuracy,
    recall_at_k,
    report_finding_f1,
    rouge_l,
    score_grounding,
)
from medmo_trainer.eval.scoring import BenchmarkScorer, retrieval_ranking

# --- VQA ----------------------------------------------------------------------------------------


def test_closed_vqa_reads_yes_no_and_option_choices():
    assert closed_vqa_accuracy("Yes.", "yes", ["yes", "no"]) == 1.0
    assert closed_vqa_accuracy("<think>look</think><answer>no</answer>", "yes", ["yes", "no"]) == 0.0
    assert closed_vqa_accuracy("2", "2", ["0", "1", "2", "3"]) == 1.0
    assert closed_vqa_accuracy("3", "2", ["0", "1", "2", "3"]) == 0.0
    assert closed_vqa_accuracy("maybe", "yes", ["yes", "no"]) is None


def test_open_vqa_is_normalised_exact_match():
    assert open_vqa_accuracy("The Upper left.", "upper left") == 1.0
    assert open_vqa_accuracy("upper left lobe", "upper left") == 0.0
    assert open_vqa_accuracy("  ", "small") is None


# --- reports ------------------------------------------------------------------------------------


def test_lcs_length_of_word_sequences():
    # a b c d e vs a c e f: LCS = a c e (3)
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_f_measure_by_hand():
    # pred "small nodule in upper left" (5 words, articles dropped), ref "large nodule in upper left effusion present"
    # (7 words); LCS = nodule in upper left = 4; P = 4/5, R = 4/7, F = 2PR/(P+R) = 2*(16/35)/(48/35) = 2/3.
    assert rouge_l("Small nodule in the upper left.", "Large nodule in the upper left. Effusion present.") == pytest.approx(2 / 3)
    assert rouge_l("No effusion.", "No effusion.") == 1.0
    assert rouge_l("", "No effusion.") == 0.0
    assert rouge_l("cat", "dog") == 0.0


def test_report_finding_f1_keeps_negations_apart():
    # ref findings {(small nodule in upper left, +), (effusion, -)}; pred {(small nodule in upper left, +),
    # (effusion, +)}: 1 shared of 2 + 2 -> F1 = 2*1/4 = 0.5
    reference = "Small nodule in the upper left. No effusion."
    assert report_finding_f1("Small nodule in the upper left. Effusion present.", reference) == pytest.approx(0.5)
    assert report_finding_f1(reference, reference) == 1.0
    assert report_finding_f1("", reference) is None


# --- grounding ----------------------------------------------------------------------------------


def test_iou_by_hand():
    # [0,0,100,100] vs [50,0,150,100]: intersection 50*100 = 5000, union 20000 - 5000 = 15000 -> 1/3
    assert iou((0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((5, 5, 5, 9), (5, 5, 5, 9)) == 0.0  # zero area


def test_matching_is_one_to_one_and_unmatched_truths_score_zero():
    truths = [(0, 0, 100, 100), (200, 200, 300, 300)]
    # One big box covering both truths is credited to one of them only: IoU with each is
    # 10000 / 90000 = 1/9, the other truth gets 0.
    assert sorted(matched_ious([(0, 0, 300, 300)], truths)) == pytest.approx([0.0, 1 / 9])
    # Predictions written in the other order are still matched to their own truth.
    assert matched_ious([(200, 200, 300, 300), (50, 0, 150, 100)], truths) == pytest.approx([1 / 3, 1.0])
    assert matched_ious([], truths) == [0.0, 0.0]


def test_score_grounding_parses_text_and_counts_boxes():
    text = "nodule <box>[[0, 0, 100, 100], [200, 200, 300, 290]]</box>"
    score = score_grounding(text, [[0, 0, 100, 100], [200, 200, 300, 300]])
    # second: intersection 100*90 = 9000, union 10000 + 9000 - 9000 = 10000 -> 0.9
    assert score.ious == pytest.approx([1.0, 0.9])
    assert score.readable and score.predicted == 2
    unreadable = score_grounding("no boxes here", [[0, 0, 100, 100]])
    assert unreadable.ious == [0.0] and not unreadable.readable


def test_grounding_summary_mean_iou_and_acc50():
    # ious 1.0, 0.9, 0.3, 0.0 -> mean 0.55; >= 0.5: 2 of 4 -> 0.5
    assert grounding_summary([1.0, 0.9, 0.3, 0.0]) == pytest.approx({"groundingMiou": 0.55, "groundingAcc50": 0.5})
    assert grounding_summary([]) == {}


# --- retrieval ----------------------------------------------------------------------------------


def test_recall_at_k_by_hand():
    rankings = [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    answers = ["A", "C", "B"]
    assert recall_at_k(rankings, answers, 1) == pytest.approx(1 / 3)
    assert recall_at_k(rankings, answers, 2) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, answers, 3) == 1.0
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(rankings, answers, 0)


def test_retrieval_ranking_puts_the_answered_letter_first_then_scores():
    options = ["Scan with no nodule.", "Scan with one nodule.", "Scan with two nodules.", "Scan with three nodules."]
    scores = {"A": -1.0, "B": -4.0, "C": -0.5, "D": -3.0}
    assert retrieval_ranking("B", options, scores) == ["B", "C", "A", "D"]
    assert retrieval_ranking("I am not sure", options, scores) == ["C", "A", "D", "B"]


# --- one benchmark ------------------------------------------------------------------------------


def _record(task, answer, prompt="q", **fields):
    return Record(id=f"r-{task}-{answer[:5]}", task=task, image="x.png", prompt=prompt, answer=answer, **fields)


def test_scorer_means_counts_and_shards_combine():
    closed = _record("vqa", "yes", answer_type="closed", options=["yes", "no"])
    opened = _record("vqa", "small", answer_type="open")
    grounding = _record(
        "grounding",
        "nodule <box>[[0, 0, 100, 100], [200, 200, 300, 300]]</box>",
        boxes=[Box(label="nodule", box=(0, 0, 100, 100)), Box(label="nodule", box=(200, 200, 300, 300))],
    )
    retrieval = _record("retrieval", "B", options=["one", "two", "three", "four"])

    first, second = BenchmarkScorer(), BenchmarkScorer()
    first.add(closed, "yes")
    first.add(opened, "large")
    first.add(grounding, "nodule <box>[[0, 0, 100, 100]]</box>")  # ious 1.0, 0.0
    second.add(closed, "perhaps")  # unparseable: scores 0
    second.add(retrieval, "B")
    second.add(grounding, "nothing")  # unparseable: ious 0.0, 0.0

    reduced = [a + b for a, b in zip(first.totals(), second.totals())]
    means, counts = BenchmarkScorer.summary(reduced)
    assert means == pytest.approx(
        {
            "vqaClosedAcc": 0.5,  # 1 of 2
            "vqaOpenAcc": 0.0,
            "groundingMiou": 0.25,  # (1 + 0 + 0 + 0) / 4 boxes
            "groundingAcc50": 0.25,
            "retrievalR1": 1.0,
            "retrievalR2": 1.0,
        }
    )
    assert "reportRougeL" not in means  # no report records: no metric, rather than a fake 0
    assert counts["samples"] == 6
    assert counts["unparseable"] == 2
    assert counts["unparseableVqa"] == 1 and counts["unparseableGrounding"] == 1


# --- multiple choice and the per-record view --------------------------------------------------

CHOICES = ["Pneumonia", "Edema", "Effusion", "Atelectasis", "Normal"]


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("C", "C"), ("C.", "C"), ("(C)", "C"), ("c) Effusion", "C"), ("C: Effusion", "C"),
        ("The answer is (C)", "C"), ("The correct answer is C because the angle is blunted.", "C"),
        ("Answer: **C**", "C"), ("**C. Effusion**", "C"), ("option c.", "C"), ("ANSWER IS C", "C"),
        ("<think>fluid</think><answer>C</answer>", "C"), ("Effusion.", "C"), ("It is an effusion", "C"),
        ("The answer is B", "B"), ("E", "E"),
        # unreadable: no letter, a letter past the last option, an article, two options named
        ("I am not sure", None), ("Answer: F", None), ("The answer is a nodule", None),
        ("Edema or effusion", None),
    ],
)
def test_multiple_choice_letters_are_read_from_the_ways_models_write_them(answer, letter):
    record = _record("vqa", "C", answer_type="choice", options=CHOICES,
                     prompt="Which?\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCDE", CHOICES)))
    scored = BenchmarkScorer().add(record, answer)
    assert scored.parsed == letter
    assert scored.scores == {"vqaChoiceAcc": None if letter is None else float(letter == "C")}


def test_choice_questions_are_scored_apart_from_yes_no_ones():
    scorer = BenchmarkScorer()
    options = ["Aspirin", "Alteplase"]
    text_only = Record(id="medqa", task="vqa", answer_type="choice", options=options, answer="B",
                       prompt="Which dissolves a clot?\nA. Aspirin\nB. Alteplase")
    scorer.add(text_only, "B")
    scorer.add(_record("vqa", "yes", answer_type="closed", options=["yes", "no"]), "no")
    means, counts = BenchmarkScorer.summary(scorer.totals())
    assert means == {"vqaChoiceAcc": 1.0, "vqaClosedAcc": 0.0} and counts["samples"] == 2


def test_each_answer_keeps_what_was_read_and_its_own_scores():
    grounding = _record("grounding", "nodule <box>[[0, 0, 100, 100], [200, 200, 300, 300]]</box>",
                        boxes=[Box(label="nodule", box=(0, 0, 100, 100)), Box(label="nodule", box=(200, 200, 300, 300))])
    scored = BenchmarkScorer().add(grounding, "nodule <box>[[0, 0, 100, 100]]</box>")
    assert scored.parsed == [{"label": "nodule", "box": [0.0, 0.0, 100.0, 100.0]}]
    assert scored.scores == {"groundingMiou": 0.5, "groundingAcc50": 0.5}  # (1 + 0) / 2 boxes
    report = _record("report", "Small nodule. No effusion.")
    scored = BenchmarkScorer().add(report, "No effusion. Large mass.")
    assert scored.parsed == [["effusion", True], ["large mass", False]]
    assert scored.scores["reportF1"] == pytest.approx(0.5)  # 1 shared of 2 + 2 findings
    unreadable = BenchmarkScorer().add(_record("vqa", "yes", answer_type="closed", options=["yes", "no"]), "hmm")
    assert (unreadable.parsed, unreadable.scores, unreadable.readable) == (None, {"vqaClosedAcc": None}, False)
