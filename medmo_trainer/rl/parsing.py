"""Reading boxes, labels and answers out of free model text. Nothing here raises on bad text.

Boxes are XYXY on Qwen3-VL's 0-1000 relative grid, written `Lesion <box>[[x1, y1, x2, y2], ...]</box>`.
Decisions about odd boxes, shared by predictions and references:

- a coordinate outside the grid is clipped to [0, 1000]: a box that overshoots the image edge
  still points at the right region, and clipping keeps a graded reward for near misses;
- a box whose corners are reversed (x2 < x1 or y2 < y1), or that is not exactly four finite
  numbers, is *malformed*: it is counted, it cannot be matched, and it still counts as a
  prediction (the model did emit it), so it can only cost reward, never earn it;
- a box of zero width or height (after clipping) is *degenerate* but valid: its IoU with
  anything is 0, so it scores only through its L1 distance and GIoU.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field

GRID_SIZE = 1000.0
"""Side of Qwen3-VL's relative box grid."""

Box = tuple[float, float, float, float]

_BOX_BLOCK = re.compile(r"<box>(.*?)</box>", re.DOTALL | re.IGNORECASE)
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LABEL_SEPARATORS = re.compile(r"<[^>]*>|[,;.:\n]|\band\b")


@dataclass
class ParsedBoxes:
    """Boxes read from one text."""

    boxes: list[Box] = field(default_factory=list)
    """Valid boxes, clipped to the grid, in the order written."""
    labels: list[str] = field(default_factory=list)
    """Normalised label written before each `<box>` block (one per block, may be empty)."""
    malformed: int = 0
    """Entries inside `<box>` blocks that are not a valid XYXY box (see the module docstring)."""
    found_block: bool = False
    """Whether the text had at least one `<box>...</box>` block."""

    @property
    def predicted_count(self) -> int:
        """P of the box reward: valid plus malformed boxes."""
        return len(self.boxes) + self.malformed


def parse_boxes(text: object) -> ParsedBoxes:
    """Every `<box>[[...]]</box>` block of `text`; non-strings parse as no boxes."""
    parsed = ParsedBoxes()
    if not isinstance(text, str):
        return parsed
    cursor = 0
    for block in _BOX_BLOCK.finditer(text):
        parsed.found_block = True
        parsed.labels.append(_label_before(text[cursor : block.start()]))
        cursor = block.end()
        entries = _INNER_LIST.findall(block.group(1))
        if not entries:
            parsed.malformed += 1
            continue
        for entry in entries:
            box = coerce_box(entry.split(","))
            if box is None:
                parsed.malformed += 1
            else:
                parsed.boxes.append(box)
    return parsed


def coerce_box(values: object) -> Box | None:
    """Four numbers (or numeric strings) as a grid-clipped box; None when malformed."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    numbers = []
    for value in values:
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        numbers.append(min(max(number, 0.0), GRID_SIZE))
    x1, y1, x2, y2 = numbers
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def _label_before(segment: str) -> str:
    """The label text right before a box block: the last clause, normalised."""
    return normalize_text(_LABEL_SEPARATORS.split(segment)[-1])


def extract_answer(completion: object) -> str:
    """The text inside the last `<answer>...</answer>`, or the whole completion when there is none."""
    if not isinstance(completion, str):
        return ""
    blocks = _ANSWER_BLOCK.findall(completion)
    return (blocks[-1] if blocks else completion).strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(text: object) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    if not isinstance(text, str):
        return ""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())
