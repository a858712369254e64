"""The one JSONL record schema of MedMO data, for all five task types.

A dataset is a `.jsonl` file or a folder of `*.jsonl` shards; each line is one `Record`:

    {"id": "train-000012-vqa-1", "task": "vqa", "image": "images/train-000012.png",
     "prompt": "Is there a nodule?", "answer": "yes", "answerType": "closed", "options": ["yes", "no"]}

A record shows the model one image (`image`), several (`images`, in the order the model sees them,
all before the prompt) or none (a text-only question, as in MedQA; give neither field). An image
reference is one of
- a path relative to the folder of the shard that holds the record (`images/x.png`),
- an absolute fsspec URI (`s3://bucket/images/x.png`, `file:///data/x.png`) or absolute local path,
- an embedded image, `data:image/png;base64,<...>`.

Per task:
- `caption`: `answer` is the caption.
- `vqa`: `answerType` is `closed` (then `options` lists the allowed answers and `answer` is one of
  them, e.g. yes/no), `open` (free text), or `choice`: a multiple-choice question as in PMC-VQA,
  MMMU or MedXpertQA, whose `prompt` lists every one of `options` (`multiple_choice_prompt` writes
  them lettered `A. ...`) and whose `answer` is the letter of the right one (`A` for the first).
- `report`: `answer` is the report; `findings` lists its positive findings, for verifiable rewards.
- `retrieval`: `options` are candidate captions; `answer` is the letter of the matching one (`A`, `B`...).
- `grounding`: `boxes` holds the ground truth, XYXY on the 0-1000 grid; `answer` writes them as
  `<label> <box>[[x1, y1, x2, y2], ...]</box>`, one such group per label, joined with `; `.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from medmo_trainer.boxes import GRID, GROUP_SEPARATOR, format_box_group, parse_boxes
from medmo_trainer.config import TaskType

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Box(BaseModel):
    """One labelled box, XYXY on the 0-1000 grid."""

    model_config = ConfigDict(extra="forbid")

    label: Annotated[str, Field(min_length=1)]
    box: tuple[int, int, int, int]
    """x1, y1, x2, y2 with 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000."""

    @model_validator(mode="after")
    def _check_box(self) -> Box:
        x1, y1, x2, y2 = self.box
        if not (0 <= x1 < x2 <= GRID and 0 <= y1 < y2 <= GRID):
            raise ValueError(f"box {list(self.box)} is not XYXY inside the 0-{GRID} grid")
        return self


class Record(BaseModel):
    """One training or evaluation example (camelCase keys in the JSONL)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    id: Annotated[str, Field(min_length=1)]
    task: TaskType
    image: Annotated[str, Field(min_length=1)] | None = None
    """The record's one image: a relative path (to the shard's folder), absolute URI/path, or
    `data:image/...;base64,` URI. None (and `images` empty) for a text-only record."""
    images: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """The images of a record that shows several (references as for `image`), in the order shown."""
    prompt: Annotated[str, Field(min_length=1)]
    """The user's instruction or question (the image comes before it in the chat turn)."""
    answer: Annotated[str, Field(min_length=1)]
    """The target text the model learns to produce (loss is computed on it only)."""
    answer_type: Literal["closed", "open", "choice"] | None = None
    """For `vqa`: closed (answer among `options`), open, or choice (answer the letter of an option)."""
    options: list[str] = Field(default_factory=list)
    """Allowed answers of closed VQA, choices of a multiple-choice question, or candidate captions of retrieval."""
    findings: list[str] = Field(default_factory=list)
    """Positive findings of a report, for label-accuracy rewards."""
    boxes: list[Box] = Field(default_factory=list)
    """Ground-truth boxes of grounding records."""
    meta: dict = Field(default_factory=dict)
    """Free-form provenance (generator parameters, source dataset ids)."""

    @property
    def image_refs(self) -> list[str]:
        """The record's images in the order shown: `[image]`, `images`, or none for a text-only record."""
        return [self.image] if self.image is not None else list(self.images)

    @model_validator(mode="after")
    def _check_task_fields(self) -> Record:
        if self.image is not None and self.images:
            raise ValueError("give either `image` (one) or `images` (several), not both")
        if self.task == "vqa":
            if self.answer_type is None:
                raise ValueError("vqa record needs answerType 'closed', 'open' or 'choice'")
            if self.answer_type == "closed" and self.answer not in self.options:
                raise ValueError(f"closed vqa answer {self.answer!r} is not among options {self.options}")
            if self.answer_type == "choice":
                _check_letter_answer("multiple-choice", self.answer, self.options)
                unlisted = [option for option in self.options if option not in self.prompt]
                if unlisted:
                    raise ValueError(f"multiple-choice prompt does not list the options {unlisted}")
        if self.task == "retrieval":
            _check_letter_answer("retrieval", self.answer, self.options)
        if self.task == "grounding":
            if not self.boxes:
                raise ValueError("grounding record needs at least one entry in boxes")
            if parse_grounding(self.answer) != {(b.label, b.box) for b in self.boxes}:
                raise ValueError("grounding answer does not write exactly the record's boxes")
        return self


def _check_letter_answer(kind: str, answer: str, options: list[str]) -> None:
    letters = OPTION_LETTERS[: len(options)]
    if len(options) < 2 or answer not in letters:
        raise ValueError(f"{kind} answer {answer!r} must be one of the option letters {list(letters)} "
                         f"(at least 2 options)")


def format_grounding(boxes: list[Box]) -> str:
    """Writes boxes as `<label> <box>[[x1, y1, x2, y2], ...]</box>`, grouped by label in first-seen order."""
    by_label: dict[str, list[tuple[int, int, int, int]]] = {}
    for box in boxes:
        by_label.setdefault(box.label, []).append(box.box)
    return GROUP_SEPARATOR.join(format_box_group(label, coords) for label, coords in by_label.items())


def parse_grounding(text: str) -> set[tuple[str, tuple[float, float, float, float]]]:
    """The (label, box) pairs written in `text` (`medmo_trainer.boxes` reads them); malformed boxes are left out."""
    return {(group.label, box) for group in parse_boxes(text).groups for box in group.boxes}


def multiple_choice_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice (or retrieval) prompt: the question, then one lettered option per line."""
    lines = [question] + [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines)
