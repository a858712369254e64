"""The record schema: box answers written and read back, task rules enforced."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medmo_trainer.data import Box, Record, format_grounding, parse_grounding


def test_grounding_answers_round_trip_through_the_box_format():
    boxes = [Box(label="Fractures", box=(156, 516, 231, 607)), Box(label="nodule", box=(1, 2, 3, 4)),
             Box(label="Fractures", box=(10, 20, 30, 40))]
    text = format_grounding(boxes)
    assert text == "Fractures <box>[[156, 516, 231, 607], [10, 20, 30, 40]]</box>; nodule <box>[[1, 2, 3, 4]]</box>"
    assert parse_grounding(text) == {(b.label, b.box) for b in boxes}


def test_parse_grounding_tolerates_spacing_and_ignores_garbage():
    assert parse_grounding("I see: nodule <box>[[1,2, 3 ,4]]</box> and <box>oops</box>") == {
        ("nodule", (1, 2, 3, 4))
    }
    assert parse_grounding("no boxes here") == set()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "segmentation"}, "task"),
        ({"task": "grounding", "answer": "nodule <box>[[1, 2, 3, 4]]</box>",
          "boxes": [{"label": "nodule", "box": [1, 2, 3, 1004]}]}, "0-1000 grid"),
        ({"task": "grounding", "answer": "nodule <box>[[1, 2, 3, 5]]</box>",
          "boxes": [{"label": "nodule", "box": [1, 2, 3, 4]}]}, "does not write exactly"),
        ({"task": "vqa", "answerType": "closed", "answer": "maybe", "options": ["yes", "no"]}, "not among options"),
        ({"task": "vqa"}, "answerType"),
        ({"task": "retrieval", "answer": "C", "options": ["a", "b"]}, "option letters"),
        ({"answer": ""}, "at least 1 character"),
    ],
)
def test_invalid_records_are_rejected_with_the_reason(fields, message):
    data = {"id": "r1", "task": "caption", "image": "images/x.png", "prompt": "Describe.", "answer": "A scan."}
    with pytest.raises(ValidationError, match=message):
        Record.model_validate(data | fields)
