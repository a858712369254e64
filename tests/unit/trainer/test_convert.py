"""`medmo data convert` and `medmo data check`: small files in each public layout become records that
the stages read; malformed rows are reported with their line number and left out, never crash."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from medmo_operator.cli import main
from medmo_trainer.data import iter_records, load_image
from medmo_trainer.data.check import check_dataset
from medmo_trainer.data.convert import grid_box


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "source" / "imgs"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png", "lateral.png"):
        Image.new("RGB", (200, 100), (90, 90, 90)).save(folder / name)
    return folder


def _convert(capsys, layout, source, output) -> tuple[int, str, str]:
    code = main(["data", "convert", layout, str(source), str(output)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_vqa_rad_json_becomes_closed_and_open_questions(tmp_path, images, capsys):
    source = tmp_path / "source" / "vqa_rad.json"
    source.write_text(textwrap.dedent("""\
        [
          {"qid": 1, "image_name": "imgs/a.png", "question": "Is there a fracture?", "answer": "Yes",
           "answer_type": "CLOSED"},
          {"qid": 2, "img_name": "imgs/b.png", "question": "Which lobe?", "answer": "left lower lobe",
           "answer_type": "OPEN", "q_lang": "en"},
          {"qid": 3, "image_name": "imgs/a.png", "answer": "no"},
          "not an object",
          {"qid": 4, "image_name": "imgs/b.png", "question": "What modality?", "answer": "CT", "answer_type": "CLOSED"}
        ]
        """))
    code, out, err = _convert(capsys, "vqa-json", source, tmp_path / "out" / "vqa.jsonl")
    assert code == 0 and "3 records (vqa 3); 2 rows left out" in out
    assert "line 6: needs image_name (or img_name), question and answer" in err
    assert "line 7: expected a JSON object, got str" in err

    records = {r.id: r for r in iter_records(str(tmp_path / "out" / "vqa.jsonl"))}
    assert records["vqa-1"].answer_type == "closed" and records["vqa-1"].answer == "yes"
    assert records["vqa-1"].options == ["yes", "no"]
    assert records["vqa-2"].answer_type == "open" and records["vqa-2"].answer == "left lower lobe"
    # a closed answer whose alternatives the file does not list is scored by exact match
    assert records["vqa-4"].answer_type == "open"
    # image paths are written relative to the output file, so the records resolve to the source images
    assert load_image(records["vqa-2"].image).size == (200, 100)


def test_pmc_vqa_csv_becomes_multiple_choice_questions_with_or_without_an_image(tmp_path, images, capsys):
    source = tmp_path / "source" / "pmc_vqa.csv"
    source.write_text(textwrap.dedent("""\
        Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label
        imgs/a.png,What does the arrow show?,B:Effusion,A:Pneumonia ,B:Effusion ,C:Nodule ,D:Fracture ,B
        ,Which drug dissolves a fresh clot?,Alteplase,A:Aspirin,B:Heparin,C:Alteplase,D:Warfarin,
        imgs/b.png,"A question, with a comma?",Z,A:One,B:Two,,,
        imgs/b.png,Too few cells,B
        """))
    code, out, err = _convert(capsys, "mcq-csv", source, tmp_path / "mcq.jsonl")
    assert code == 0 and "2 records (vqa 2); 2 rows left out" in out
    assert "line 4: needs Question, at least two Choice columns, and Answer_label" in err
    assert "line 5: has 3 cells where the header has 8" in err

    first, text_only = iter_records(str(tmp_path / "mcq.jsonl"))
    assert (first.answer_type, first.answer, first.options) == ("choice", "B", ["Pneumonia", "Effusion", "Nodule", "Fracture"])
    assert "B. Effusion" in first.prompt and first.image_refs and load_image(first.image).size == (200, 100)
    # the answer is read from its text when the letter column is empty; no figure: a text-only question
    assert text_only.answer == "C" and text_only.image_refs == []


def test_mimic_cxr_csv_becomes_reports_with_their_positive_findings(tmp_path, images, capsys):
    source = tmp_path / "source" / "reports.csv"
    source.write_text(textwrap.dedent("""\
        study_id,path,findings,impression
        s1,imgs/a.png;imgs/lateral.png,"Small left pleural effusion. No pneumothorax.",Left effusion.
        s2,imgs/b.png,,"Cardiomegaly."
        s3,,"No acute findings.",
        """))
    code, out, err = _convert(capsys, "report-csv", source, tmp_path / "reports.jsonl")
    assert code == 0 and "2 records (report 2); 1 rows left out" in out
    assert "line 4: needs an image in one of" in err
    two_views, single = iter_records(str(tmp_path / "reports.jsonl"))
    assert len(two_views.images) == 2 and two_views.image is None  # the study's two views, in order
    assert two_views.answer == "Small left pleural effusion. No pneumothorax. Left effusion."
    assert "small left pleural effusion" in two_views.findings
    assert not any("pneumothorax" in finding for finding in two_views.findings)  # negated: not a positive finding
    assert single.image is not None and single.findings == ["cardiomegaly"]


def test_coco_boxes_become_grounding_records_on_the_0_to_1000_grid(tmp_path, images, capsys):
    source = tmp_path / "source" / "instances.json"
    document = {
        "images": [{"id": 7, "file_name": "imgs/a.png", "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "rib fracture"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 10, 40, 30]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [150, 60, 60, 80]},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 10, 5]},
            {"id": 4, "image_id": 8, "category_id": 1, "bbox": [0, 0, 10, 5]},
            {"id": 5, "image_id": 7, "category_id": 1, "bbox": [10, 10, 0, 5]},
        ],
    }
    source.write_text(json.dumps(document, indent=1))
    code, out, err = _convert(capsys, "coco", source, tmp_path / "ground.jsonl")
    assert code == 0 and "2 records (grounding 2); 2 rows left out" in out
    annotation_lines = [i + 1 for i, line in enumerate(source.read_text().splitlines()) if line.strip() == "{"][-5:]
    assert f"line {annotation_lines[3]}: annotation names an image_id or category_id" in err
    assert f"line {annotation_lines[4]}: bbox [10, 10, 0, 5] is not [x, y, width, height]" in err

    records = {r.id: r for r in iter_records(str(tmp_path / "ground.jsonl"))}
    nodules = records["coco-7-nodule"]
    # x/200*1000, y/100*1000; the second box runs past the image's right edge and is clipped
    assert [b.box for b in nodules.boxes] == [(100, 100, 300, 400), (750, 600, 1000, 1000)]
    assert nodules.answer == "nodule <box>[[100, 100, 300, 400], [750, 600, 1000, 1000]]</box>"
    assert nodules.prompt == "Locate every nodule in the image with boxes."
    assert records["coco-7-rib-fracture"].boxes[0].box == (0, 0, 50, 50)


def test_grid_boxes_refuse_what_has_no_area():
    assert grid_box([0, 0, 0.1, 10], 1000, 1000) is None  # rounds to zero width on the grid
    assert grid_box(["x", 0, 1, 1], 10, 10) is None and grid_box([0, 0, 5, 5], 0, 10) is None
    assert grid_box([5, 5, 10, 10], 10, 10) == (500, 500, 1000, 1000)


def test_unreadable_sources_are_reported_not_raised(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"qid": 1, "image_name": "a.png", "question": "q", "answer": "yes"},\n {"qid": 2, oops\n]')
    code, out, err = _convert(capsys, "vqa-json", broken, tmp_path / "out.jsonl")
    assert code == 0 and "line 3: not valid JSON" in err and "1 records" in out
    (tmp_path / "object.json").write_text('{"questions": []}')
    code, _, err = _convert(capsys, "vqa-json", tmp_path / "object.json", tmp_path / "none.jsonl")
    assert code == 1 and "line 1: expected a JSON array" in err
    with pytest.raises(SystemExit, match="unknown layout 'yolo'"):
        main(["data", "convert", "yolo", str(broken), str(tmp_path / "x.jsonl")])


def test_check_counts_records_per_task_and_lists_the_lines_it_would_skip(tmp_path, images, capsys):
    good = {"id": "g1", "task": "vqa", "answerType": "closed", "options": ["yes", "no"], "answer": "yes",
            "image": "source/imgs/a.png", "prompt": "Nodule?"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "t1", "image": None, "answerType": "open", "options": [], "answer": "aspirin"}),
        "",
        "{broken",
        json.dumps({**good, "id": "m1", "image": "source/imgs/missing.png"}),
        json.dumps({**good, "id": "v1", "answer": "maybe"}),
        json.dumps({"id": "c1", "task": "caption", "images": ["source/imgs/a.png", "source/imgs/b.png"],
                    "prompt": "Compare.", "answer": "Same."}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")

    code = main(["data", "check", str(tmp_path / "data.jsonl")])
    out = capsys.readouterr().out
    assert code == 1
    assert "3 usable records, 3 skipped" in out
    assert "data.jsonl:4: badJson" in out and "data.jsonl:5: missingImage" in out
    assert "data.jsonl:6: invalidRecord: Value error, closed vqa answer 'maybe' is not among options" in out
    result = check_dataset(str(tmp_path / "data.jsonl"))
    assert result.usable == {"vqa": 2, "caption": 1}
    assert result.kinds["text-only"] == 1 and result.kinds["several images"] == 1
    # without opening images, the missing one goes unnoticed
    assert sum(check_dataset(str(tmp_path / "data.jsonl"), images=False).usable.values()) == 4

    (tmp_path / "clean.jsonl").write_text(json.dumps(good) + "\n")
    assert main(["data", "check", str(tmp_path / "clean.jsonl")]) == 0
    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["data", "check", str(tmp_path / "absent")])


def test_the_readme_example_of_each_task_is_a_valid_record(tmp_path):
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme.split("## Your own data", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    (tmp_path / "examples.jsonl").write_text(block)
    result = check_dataset(str(tmp_path / "examples.jsonl"), images=False)
    assert result.skipped == []
    assert set(result.usable) == {"caption", "vqa", "report", "retrieval", "grounding"}
    assert {"vqa closed", "vqa open", "vqa choice", "text-only", "several images"} <= set(result.kinds)
