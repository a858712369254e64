"""Boxes in model text: the `<box>` grammar, reading and writing it, and box geometry (IoU, GIoU, L1).

One module for every reader of boxes: the record schema (a grounding answer writes its record's
boxes), evaluation (grounding IoU) and the RL box reward. Nothing here raises on bad text. `read_boxes` and
`coerce_boxes` read a whole batch into numpy arrays for the RL reward; they follow the same rules as
`parse_boxes` and `coerce_box`, box for box.

Boxes are XYXY on Qwen3-VL's 0-1000 relative grid, written `Lesion <box>[[x1, y1, x2, y2], ...]</box>`,
one group per label, groups joined with `; `. Decisions about odd boxes, shared by predictions and
references:

- a coordinate a little outside the grid (by at most OVERSHOOT, a tenth of it) is clipped to
  [0, 1000]: a box that overshoots the image edge still points at the right region, and clipping
  keeps a graded reward for near misses;
- a coordinate further out (say 4339: a digit too many) is not a position on the grid at all: its
  box is *malformed*. Clipping it would turn noise into a box along the image edge that RL credits;
- a box whose corners are reversed (x2 < x1 or y2 < y1), or that is not exactly four finite
  numbers, is *malformed*: it is counted, it cannot be matched, and it still counts as a
  prediction (the model did emit it), so it can only cost reward, never earn it;
- a box of zero width or height (after clipping) is *degenerate* but valid: its IoU with
  anything is 0, so it scores only through its L1 distance and GIoU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

GRID = 1000
"""Side of Qwen3-VL's relative box grid; record boxes are integers on it."""

Box = tuple[float, float, float, float]
"""x1, y1, x2, y2 on the grid."""

OVERSHOOT = GRID / 10
"""How far outside [0, GRID] a coordinate may lie and still be clipped; beyond it the box is malformed."""

_GRID_F = float(GRID)

L1_NORMALIZER = 2.0 * math.sqrt(GRID**2 + GRID**2)
"""2*sqrt(H^2 + W^2) of the paper's L1 term, with H = W = the grid."""

_BOX_BLOCK = re.compile(r"<box>(.*?)</box>", re.DOTALL | re.IGNORECASE)
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_LABEL_SEPARATORS = re.compile(r"<[^>]*>|[,;.:\n]")


@dataclass
class BoxGroup:
    """One `<box>...</box>` block and the label written before it."""

    label: str
    """The clause right before the block (back to the previous tag or punctuation), stripped; may be empty."""
    boxes: list[Box] = field(default_factory=list)
    """Valid boxes of the block, clipped to the grid, in the order written."""
    malformed: int = 0
    """Entries of the block that are not a valid XYXY box (an empty block counts as one)."""


@dataclass
class ParsedBoxes:
    """Every box group of one text."""

    groups: list[BoxGroup] = field(default_factory=list)

    @property
    def boxes(self) -> list[Box]:
        return [box for group in self.groups for box in group.boxes]

    @property
    def labels(self) -> list[str]:
        """One label per group, as written."""
        return [group.label for group in self.groups]

    @property
    def malformed(self) -> int:
        return sum(group.malformed for group in self.groups)

    @property
    def found_block(self) -> bool:
        """Whether the text had at least one `<box>...</box>` block."""
        return bool(self.groups)

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
        group = BoxGroup(label=_LABEL_SEPARATORS.split(text[cursor : block.start()])[-1].strip())
        parsed.groups.append(group)
        cursor = block.end()
        entries = _INNER_LIST.findall(block.group(1))
        if not entries:
            group.malformed += 1
        for entry in entries:
            box = coerce_box(entry.split(","))
            if box is None:
                group.malformed += 1
            else:
                group.boxes.append(box)
    return parsed


def coerce_box(values: object) -> Box | None:
    """Four numbers (or numeric strings) as a grid-clipped box; None when malformed (see the module's rules)."""
    # Written out per coordinate, not as a loop: the RL box reward calls this for every box it scores.
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    try:
        x1, y1, x2, y2 = map(float, values)  # float() strips a string's surrounding whitespace itself
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        return None
    low, high = -OVERSHOOT, GRID + OVERSHOOT  # NaN fails these comparisons and infinities lie outside
    if not (low <= x1 <= high and low <= y1 <= high and low <= x2 <= high and low <= y2 <= high):
        return None
    x1, y1, x2, y2 = (0.0 if v < 0.0 else _GRID_F if v > _GRID_F else v for v in (x1, y1, x2, y2))
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


@dataclass
class BoxBatch:
    """The valid boxes of a batch of texts, in one array, with the text each came from."""

    boxes: np.ndarray
    """(N, 4) float64, grid-clipped, texts in order and each text's boxes in the order written."""
    owner: np.ndarray
    """(N,) int64: the index of the text (or record) each box belongs to; non-decreasing."""
    malformed: list[int]
    """Per text: entries that are not a valid box (as `ParsedBoxes.malformed`)."""
    found_block: list[bool]
    """Per text: whether it had a `<box>...</box>` block."""


def read_boxes(texts: Sequence[object]) -> BoxBatch:
    """`parse_boxes` for a batch (boxes and malformed counts, without labels), checked and clipped at once."""
    values: list[float] = []  # four per entry that float() reads; range and order are checked at once below
    entry_owner: list[int] = []
    malformed = [0] * len(texts)
    found = [False] * len(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        blocks = _BOX_BLOCK.findall(text)
        if not blocks:
            continue
        found[index] = True
        bad = 0
        for block in blocks:
            entries = _INNER_LIST.findall(block)
            if not entries:
                bad += 1
            for entry in entries:
                parts = entry.split(",")
                if len(parts) != 4:
                    bad += 1
                    continue
                try:
                    box = (float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]))
                except ValueError:
                    bad += 1
                    continue
                values += box
                entry_owner.append(index)
        malformed[index] = bad
    boxes, valid = _checked(np.array(values, dtype=float).reshape(-1, 4))
    owner = np.array(entry_owner, dtype=np.int64)
    if not valid.all():
        for index in owner[~valid].tolist():
            malformed[index] += 1
        boxes, owner = boxes[valid], owner[valid]
    return BoxBatch(boxes, owner, malformed, found)


def coerce_boxes(values: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """`coerce_box` of each value at once: the (N, 4) clipped boxes and a mask of the valid ones."""
    if all(type(v) in (list, tuple) and len(v) == 4 for v in values):
        try:
            return _checked(np.array(values, dtype=float).reshape(-1, 4))
        except (TypeError, ValueError, OverflowError):  # a coordinate float() cannot read: box by box below
            pass
    boxes = [coerce_box(v) for v in values]
    valid = np.array([box is not None for box in boxes], dtype=bool)
    return np.array([box or (0.0, 0.0, 0.0, 0.0) for box in boxes], dtype=float).reshape(-1, 4), valid


def _checked(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`coerce_box`'s checks on rows of four floats: rows within the overshoot, clipped, corners in order."""
    with np.errstate(invalid="ignore"):
        valid = ((raw >= -OVERSHOOT) & (raw <= GRID + OVERSHOOT)).all(axis=1)  # NaN fails both
    boxes = np.clip(np.where(valid[:, None], raw, 0.0), 0.0, _GRID_F)
    valid &= (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    return boxes, valid


def format_box_group(label: str, boxes: Sequence[Sequence[int]]) -> str:
    """`<label> <box>[[x1, y1, x2, y2], ...]</box>`: one label's boxes as the model writes them."""
    inner = ", ".join("[" + ", ".join(str(v) for v in box) + "]" for box in boxes)
    return f"{label} <box>[{inner}]</box>"


GROUP_SEPARATOR = "; "
"""Between the groups of one answer."""


# ---------------------------------------------------------------------------------------------
# Geometry


def intersection_and_union(a: Box, b: Box) -> tuple[float, float]:
    """Areas of the intersection and the union of two XYXY boxes."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    return intersection, (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection


def iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when the union has no area."""
    intersection, union = intersection_and_union(a, b)
    return intersection / union if union > 0 else 0.0


def generalized_iou(a: Box, b: Box) -> float:
    """GIoU in [-1, 1]. Zero-area boxes have IoU 0; two identical zero-area boxes have GIoU 1."""
    intersection, union = intersection_and_union(a, b)
    if union <= 0.0:
        return 1.0 if a == b else -1.0
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    # A zero-area hull means both boxes lie on one line; the enclosing term is then undefined.
    return intersection / union if hull <= 0.0 else intersection / union - (hull - union) / hull


def normalized_l1(pred: Box, truth: Box) -> float:
    """(|dx1|+|dy1|+|dx2|+|dy2|) / (2*sqrt(H^2+W^2)) on the grid (can exceed 1 for far boxes)."""
    return sum(abs(p - t) for p, t in zip(pred, truth)) / L1_NORMALIZER
