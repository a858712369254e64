"""The synthetic medical data: deterministic, five task types, answers that agree with the pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from medmo_trainer.data import iter_records, load_image
from medmo_trainer.data.schema import GRID, OPTION_LETTERS
from medmo_trainer.data.shards import INDEX_NAME
from medmo_trainer.data.synthetic import BODY_INTENSITY, COUNT_WORDS, NODULE_INTENSITY, main


def _write(folder: Path, *args: str) -> None:
    main(["--out", str(folder), *args])


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    _write(tmp_path / "a", "--n", "8", "--seed", "11", "--shard-size", "20")
    _write(tmp_path / "b", "--n", "8", "--seed", "11", "--shard-size", "20")
    _write(tmp_path / "c", "--n", "8", "--seed", "12", "--shard-size", "20")
    first, again, other = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert first == again
    assert len([name for name in first if name.endswith(".jsonl")]) >= 2  # shards of 20 records
    assert first["images/train-000000.png"] != other["images/train-000000.png"]


def test_heldout_split_holds_different_scans(tmp_path):
    _write(tmp_path / "train", "--n", "5", "--seed", "1")
    _write(tmp_path / "heldout", "--n", "5", "--seed", "1", "--split", "heldout")
    train = _tree(tmp_path / "train")
    heldout = _tree(tmp_path / "heldout")
    assert set(train.values()).isdisjoint(heldout.values())
    assert all(name.startswith(("heldout-", "images/heldout-")) for name in set(heldout) - {INDEX_NAME})


def test_boxes_enclose_exactly_the_bright_nodules(synthetic_train):
    grounding = [r for r in iter_records(str(synthetic_train), tasks=["grounding"])]
    assert len(grounding) >= 10
    for record in grounding:
        pixels = np.asarray(load_image(record.image).convert("L"))
        height, width = pixels.shape
        outside = np.ones_like(pixels, dtype=bool)
        bright = pixels > (NODULE_INTENSITY + BODY_INTENSITY) / 2
        for box in record.boxes:
            x1, y1, x2, y2 = box.box
            left, top = int(x1 * width / GRID), int(y1 * height / GRID)
            right, bottom = int(np.ceil(x2 * width / GRID)), int(np.ceil(y2 * height / GRID))
            rows, cols = np.nonzero(bright[top:bottom, left:right])
            assert len(rows) >= 9, record.id  # a nodule is inside
            # and the box is tight around it: its edges are within the grid's rounding (1 px) of the nodule's
            assert rows.min() <= 1 and cols.min() <= 1, record.id
            assert rows.max() >= bottom - top - 2 and cols.max() >= right - left - 2, record.id
            outside[top:bottom, left:right] = False
        assert pixels[outside].max() < 170, record.id  # no bright nodule left outside every box


def test_every_scan_has_all_task_types_with_consistent_answers(synthetic_train):
    records = list(iter_records(str(synthetic_train)))
    by_scan: dict[str, dict[str, list]] = {}
    for record in records:
        by_scan.setdefault(record.meta["scan"], {}).setdefault(record.task, []).append(record)
    assert len(by_scan) == 30
    for scan, tasks in by_scan.items():
        count = len(tasks["grounding"][0].boxes) if "grounding" in tasks else 0
        assert {"caption", "vqa", "report", "retrieval"} <= set(tasks), scan
        caption = tasks["caption"][0].answer
        assert f"with {COUNT_WORDS[count]} nodule" in caption
        retrieval = tasks["retrieval"][0]
        assert retrieval.options[OPTION_LETTERS.index(retrieval.answer)] == caption
        assert len(set(retrieval.options)) == 4
        report = tasks["report"][0]
        assert len(re.findall(r"nodule in the", report.answer)) == count
        assert ("No effusion." in report.answer) == ("no effusion" in caption)
        closed = next(r for r in tasks["vqa"] if r.answer_type == "closed")
        assert closed.answer in closed.options
        if closed.prompt == "How many nodules are there?":
            assert closed.answer == str(count)
        if closed.prompt == "Is there a nodule?":
            assert closed.answer == ("yes" if count else "no")


def test_embedded_images_need_no_files(tmp_path):
    _write(tmp_path, "--n", "3", "--seed", "2", "--embed-images")
    assert not (tmp_path / "images").exists()
    line = json.loads((tmp_path / "train-00000.jsonl").read_text().splitlines()[0])
    assert line["image"].startswith("data:image/png;base64,")
    assert len(list(iter_records(str(tmp_path)))) >= 15
