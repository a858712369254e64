"""`medmo data pack` and `medmo data index`: Parquet shards that load like their JSONL source, and an
index that a loader trusts until the shards change."""

from __future__ import annotations

import json

import pytest

from medmo_operator.cli import main as medmo
from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data import DatasetUnavailableError, iter_records, load_image
from medmo_trainer.data.shards import INDEX_NAME
from medmo_trainer.data.synthetic import generate
from medmo_trainer.inputs import build_train_loader


def test_pack_writes_parquet_shards_of_the_valid_records(tmp_path, capsys):
    generate(str(tmp_path / "src"), n=6, seed=2, shard_size=20)
    with open(tmp_path / "src" / "train-00000.jsonl", "a") as shard:
        shard.write('{"id": "broken", "task": "vqa"\n')
    (tmp_path / "src" / INDEX_NAME).unlink()  # the folder is counted afresh, broken line included
    assert medmo(["data", "pack", str(tmp_path / "src"), str(tmp_path / "packed"), "--records-per-shard", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    source = list(iter_records(str(tmp_path / "src")))
    assert summary["records"] == len(source) and summary["skipped"] == {"badJson": 1}
    assert summary["shards"] == len(list((tmp_path / "packed").glob("part-*.parquet"))) == -(-len(source) // 8)
    packed = list(iter_records(str(tmp_path / "packed")))
    assert packed == source
    load_image(packed[0].image)  # references made absolute: the images stayed in the source folder


def test_a_loader_refuses_an_index_its_shards_no_longer_match(tmp_path, capsys, tiny_qwen3):
    generate(str(tmp_path / "data"), n=6, seed=2, shard_size=12)
    (tmp_path / "data" / INDEX_NAME).unlink()
    assert medmo(["data", "index", str(tmp_path / "data")]) == 0
    index = json.loads((tmp_path / "data" / INDEX_NAME).read_text())
    assert [s["path"] for s in index["shards"]] == sorted(p.name for p in (tmp_path / "data").glob("*.jsonl"))
    assert sum(s["records"] for s in index["shards"]) == json.loads(capsys.readouterr().out)["records"]

    shard = tmp_path / "data" / index["shards"][0]["path"]
    shard.write_text(shard.read_text() + shard.read_text().splitlines()[0] + "\n")  # one more record
    spec = [DatasetSpec(name="data", uri=str(tmp_path / "data"))]
    loader = build_train_loader(spec, tiny_qwen3.processor, Hyperparameters(per_device_batch_size=40, image_size=32),
                                rank=0, world_size=1, seed=0)
    with pytest.raises(DatasetUnavailableError, match="medmo data index"):
        loader.next_batch()
