"""Converting common public dataset layouts into MedMO JSONL records (`medmo data convert`).

Layouts (`LAYOUTS`), each read from one file:

- `vqa-json`: a JSON array of question/answer pairs as VQA-RAD and SLAKE publish them:
  `{"qid", "image_name" | "img_name", "question", "answer", "answer_type": "CLOSED" | "OPEN"}`.
  Closed yes/no answers become closed questions with options yes/no; other answers (closed ones
  included: their alternatives are not listed) become open questions scored by exact match.
- `mcq-csv`: a CSV of multiple-choice questions as PMC-VQA publishes them: columns `Figure_path`,
  `Question`, `Choice A` ... `Choice E` (values may start with their letter, `A:Pneumonia`) and
  `Answer_label` (a letter) or `Answer` (the right choice's text). No `Figure_path` column (or an
  empty cell) makes a text-only question, as in MedQA.
- `report-csv`: a CSV of reports as MIMIC-CXR layouts hold them: an image column (`path`, `image`,
  `image_path`, `dicom_path` or `Figure_path`; several images of one study separated by `;`),
  `findings` and/or `impression`, optionally `study_id`. The report is the findings then the
  impression; its positive findings (`medmo_trainer.answers.findings`) fill `findings`.
- `coco`: a COCO detection JSON (`images`, `annotations` with `bbox` = [x, y, width, height] in
  pixels, `categories`): one grounding record per image and category, the boxes converted to XYXY
  on the 0-1000 grid.

Image paths in the source are relative to `images` (default: the source file's folder); the records
refer to them relative to the output file's folder when both are local, else by absolute URI.

A row that cannot be converted never stops a conversion: it is reported as a `Problem` with its line
number in the source file and left out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from medmo_trainer.answers import findings
from medmo_trainer.boxes import GRID
from medmo_trainer.data.schema import OPTION_LETTERS, Box, Record, format_grounding, multiple_choice_prompt
from medmo_trainer.fsio import join, url_to_fs

REPORT_PROMPT = "Write the radiology report for this study: its findings, then the impression."
GROUNDING_PROMPT = "Locate every {label} in the image with boxes."
IMAGE_COLUMNS = ("path", "image", "image_path", "dicom_path", "Figure_path")
"""Columns a report CSV may name its images in (the first present wins)."""


@dataclass
class Problem:
    """A source row left out of a conversion (or a dataset line `medmo data check` would skip)."""

    line: int
    """1-based line of the source file where the row starts."""
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class Conversion:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ImagePaths:
    """Where a source's image paths point, and how records written to `out_dir` refer to them."""

    root: str
    """Folder the source's image paths are relative to (a local path or a URI)."""
    out_dir: str
    """Folder of the output JSONL."""

    def ref(self, relative: str) -> str:
        relative = relative.strip()
        if "://" in relative or relative.startswith("/"):
            return relative
        if "://" in self.root or "://" in self.out_dir:
            return join(self.root, relative)
        return os.path.relpath(os.path.join(self.root, relative), self.out_dir)


# ---------------------------------------------------------------------------------------------
# Layouts


def convert_vqa_json(text: str, images: ImagePaths) -> Conversion:
    """VQA-RAD / SLAKE question-answer pairs (see the module docstring)."""
    result = Conversion()
    for line, item in _rows_of_json_array(text, None, result):
        image = item.get("image_name") or item.get("img_name")
        question, answer = item.get("question"), item.get("answer")
        if not isinstance(image, str) or not isinstance(question, str) or answer is None:
            result.problems.append(Problem(line, "needs image_name (or img_name), question and answer"))
            continue
        answer = str(answer).strip()
        closed = str(item.get("answer_type", "")).upper() == "CLOSED" and answer.lower() in ("yes", "no")
        fields = {"answerType": "closed", "options": ["yes", "no"], "answer": answer.lower()} if closed else \
                 {"answerType": "open", "answer": answer}
        qid = item.get("qid", line)
        _add(result, line, id=f"vqa-{qid}", task="vqa", image=images.ref(image), prompt=question.strip(),
             meta={"source": {k: v for k, v in item.items() if k not in ("question", "answer")}}, **fields)
    return result


def convert_mcq_csv(text: str, images: ImagePaths) -> Conversion:
    """PMC-VQA-style multiple-choice questions, with or without an image (see the module docstring)."""
    result = Conversion()
    for line, row in _csv_rows(text, result):
        question = (row.get("Question") or "").strip()
        choices = [(letter, _strip_letter(letter, row.get(f"Choice {letter}") or ""))
                   for letter in OPTION_LETTERS[:5] if (row.get(f"Choice {letter}") or "").strip()]
        options = [text for _, text in choices]
        letter = _answer_letter(row, options)
        if not question or len(options) < 2 or letter is None:
            result.problems.append(Problem(line, "needs Question, at least two Choice columns, and Answer_label "
                                                 "(a letter of a choice) or Answer (a choice's text)"))
            continue
        figure = (row.get("Figure_path") or "").strip()
        _add(result, line, id=f"mcq-{line}", task="vqa", answerType="choice", options=options, answer=letter,
             prompt=multiple_choice_prompt(question, options), **({"image": images.ref(figure)} if figure else {}),
             meta={"source": {"line": line}})
    return result


def convert_report_csv(text: str, images: ImagePaths) -> Conversion:
    """MIMIC-CXR-style reports, one record per study row (see the module docstring)."""
    result = Conversion()
    for line, row in _csv_rows(text, result):
        column = next((c for c in IMAGE_COLUMNS if (row.get(c) or "").strip()), None)
        report = " ".join(part for part in ((row.get("findings") or "").strip(), (row.get("impression") or "").strip()) if part)
        if column is None or not report:
            result.problems.append(Problem(line, f"needs an image in one of {list(IMAGE_COLUMNS)} and a findings "
                                                 "or impression text"))
            continue
        paths = [images.ref(p) for p in row[column].split(";") if p.strip()]
        study = (row.get("study_id") or "").strip() or str(line)
        positive = sorted(finding for finding, negated in findings(report) if not negated)
        pictures = {"image": paths[0]} if len(paths) == 1 else {"images": paths}
        _add(result, line, id=f"report-{study}", task="report", prompt=REPORT_PROMPT, answer=report,
             findings=positive, meta={"source": {"line": line, "studyId": study}}, **pictures)
    return result


def convert_coco(text: str, images: ImagePaths) -> Conversion:
    """COCO detection boxes as grounding records, one per image and category (see the module docstring)."""
    result = Conversion()
    try:
        document = json.loads(text)
        pictures = {p["id"]: p for p in document["images"]}
        names = {c["id"]: c["name"] for c in document["categories"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        result.problems.append(Problem(1, f"not a COCO detection file (images, categories, annotations): {error}"))
        return result
    grouped: dict[tuple[Any, str], tuple[int, list[tuple[int, int, int, int]]]] = {}
    for line, annotation in _rows_of_json_array(text, "annotations", result):
        picture = pictures.get(annotation.get("image_id"))
        label = names.get(annotation.get("category_id"))
        if picture is None or label is None:
            result.problems.append(Problem(line, "annotation names an image_id or category_id the file does not list"))
            continue
        box = grid_box(annotation.get("bbox"), picture.get("width"), picture.get("height"))
        if box is None:
            result.problems.append(Problem(line, f"bbox {annotation.get('bbox')} is not [x, y, width, height] of "
                                                 f"positive size inside the {picture.get('width')}x"
                                                 f"{picture.get('height')} image"))
            continue
        first_line, boxes = grouped.setdefault((picture["id"], label), (line, []))
        boxes.append(box)
    for (picture_id, label), (line, boxes) in grouped.items():
        picture = pictures[picture_id]
        labelled = [Box(label=label, box=box) for box in boxes]
        _add(result, line, id=f"coco-{picture_id}-{_slug(label)}", task="grounding",
             image=images.ref(picture["file_name"]), prompt=GROUNDING_PROMPT.format(label=label),
             answer=format_grounding(labelled), boxes=[b.model_dump() for b in labelled],
             meta={"source": {"imageId": picture_id, "category": label}})
    return result


LAYOUTS: dict[str, Callable[[str, ImagePaths], Conversion]] = {
    "vqa-json": convert_vqa_json,
    "mcq-csv": convert_mcq_csv,
    "report-csv": convert_report_csv,
    "coco": convert_coco,
}


def convert_file(layout: str, source: str, output: str, images: str | None = None) -> Conversion:
    """Converts `source` (a local path or URI) of a layout into the JSONL file `output`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    fs, path = url_to_fs(source)
    text = fs.cat_file(path).decode("utf-8-sig")
    out_dir = output.rsplit("/", 1)[0] if "/" in output else "."
    root = images if images is not None else (source.rsplit("/", 1)[0] if "/" in source else ".")
    result = LAYOUTS[layout](text, ImagePaths(root, out_dir))
    out_fs, out_path = url_to_fs(output)
    parent = out_path.rsplit("/", 1)[0]
    if parent and parent != out_path:
        out_fs.makedirs(parent, exist_ok=True)
    lines = (r.model_dump_json(by_alias=True, exclude_none=True, exclude_defaults=True) + "\n" for r in result.records)
    out_fs.pipe_file(out_path, "".join(lines).encode())
    return result


# ---------------------------------------------------------------------------------------------
# Shared parts


def grid_box(bbox: object, width: object, height: object) -> tuple[int, int, int, int] | None:
    """A COCO [x, y, w, h] pixel box as integer XYXY on the 0-1000 grid, clipped to the image; None when
    it is not four numbers or has no area on the grid."""
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
        width, height = float(width), float(height)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if width <= 0 or height <= 0 or w <= 0 or h <= 0:
        return None

    def scale(value: float, side: float) -> int:
        return min(max(round(value / side * GRID), 0), GRID)

    box = (scale(x, width), scale(y, height), scale(x + w, width), scale(y + h, height))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _add(result: Conversion, line: int, **fields: Any) -> None:
    try:
        result.records.append(Record.model_validate(fields))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        result.problems.append(Problem(line, f"{where + ': ' if where else ''}{first['msg']}"))


def _csv_rows(text: str, result: Conversion) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the row starts, row) of a CSV with a header; unreadable rows become problems."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = reader.fieldnames
    except csv.Error as error:
        result.problems.append(Problem(1, f"unreadable CSV header: {error}"))
        return
    if not header:
        result.problems.append(Problem(1, "the CSV has no header row"))
        return
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            result.problems.append(Problem(start, f"unreadable CSV row: {error}"))
            start = reader.line_num + 1
            continue
        if None in row or any(value is None for value in row.values()):
            cells = sum(value is not None for name, value in row.items() if name is not None) + len(row.get(None) or [])
            result.problems.append(Problem(start, f"has {cells} cells where the header has {len(header)}"))
        else:
            yield start, row
        start = reader.line_num + 1


def _rows_of_json_array(text: str, key: str | None, result: Conversion) -> Iterator[tuple[int, dict]]:
    """(line where the item starts, item) of the top-level JSON array, or of the array under `key` of the
    top-level object; items that are not JSON objects, and a file that is not such JSON, become problems."""
    if key is None:
        start = re.search(r"\S", text)
        position = start.start() if start and start.group() == "[" else -1
    else:
        found = re.search(rf'"{re.escape(key)}"\s*:\s*\[', text)
        position = found.end() - 1 if found else -1
    if position < 0:
        result.problems.append(Problem(1, "expected a JSON array" + (f" under {key!r}" if key else "")))
        return
    decoder = json.JSONDecoder()
    position += 1
    while True:
        position = _skip(text, position, " \t\r\n,")
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            result.problems.append(Problem(line, f"not valid JSON: {error.msg}; the rest of the array is unread"))
            return
        if isinstance(item, dict):
            yield line, item
        else:
            result.problems.append(Problem(line, f"expected a JSON object, got {type(item).__name__}"))


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _strip_letter(letter: str, choice: str) -> str:
    """`A:Pneumonia` / `A. Pneumonia` / `(A) Pneumonia` -> `Pneumonia`."""
    return re.sub(rf"^\s*\(?{letter}\s*[:.)]\s*", "", choice.strip()).strip()


def _answer_letter(row: dict[str, str], options: list[str]) -> str | None:
    letters = OPTION_LETTERS[: len(options)]
    label = (row.get("Answer_label") or "").strip().upper()
    if label in letters and label:
        return label
    answer = (row.get("Answer") or "").strip()
    for letter, option in zip(letters, options):
        if answer and (answer == option or _strip_letter(letter, answer) == option):
            return letter
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "label"
