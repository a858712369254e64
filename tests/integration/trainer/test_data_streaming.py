"""Datasets streamed from SeaweedFS S3: ranks read only their share of shards, a mixture resumes exactly
(worker processes included), and Parquet files as Hugging Face `datasets` writes them train through a
column mapping."""

from __future__ import annotations

import gc
import io
import json

import pytest
import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data import DatasetUnavailableError
from medmo_trainer.data.pack import pack
from medmo_trainer.data.synthetic import generate, generate_scan
from medmo_trainer.fsio import url_to_fs
from medmo_trainer.inputs import IGNORE_INDEX, build_train_loader
from medmo_trainer.model import load_model


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="module")
def processor():
    return load_model("preset:tiny-qwen3-vl").processor


def _ids(loader, batches: int) -> list[str]:
    ids = []
    for _ in range(batches):
        loader.next_batch()
        ids.extend(loader.last_record_ids)
    return ids


def _packed_shards(uri: str) -> dict[str, set[str]]:
    """Shard URI -> ids of the records it holds."""
    import pyarrow.parquet as pq

    fs, root = url_to_fs(uri)
    return {fs.unstrip_protocol(p): set(pq.read_table(io.BytesIO(fs.cat_file(p)), columns=["id"])["id"].to_pylist())
            for p in fs.find(root) if p.endswith(".parquet")}


def test_each_rank_reads_only_its_share_of_the_shards(s3_env, s3_bucket, processor, tmp_path):
    generate(str(tmp_path / "jsonl"), n=24, seed=5)
    packed = f"{s3_bucket}/packed"
    total = pack(str(tmp_path / "jsonl"), packed, records_per_shard=16)["records"]
    hp = Hyperparameters(per_device_batch_size=1, image_size=32)
    spec = [DatasetSpec(name="packed", uri=packed)]
    rank1 = set(_ids(build_train_loader(spec, processor, hp, rank=1, world_size=2, seed=3), total - total // 2))
    rank1_only = [uri for uri, ids in _packed_shards(packed).items() if ids <= rank1]
    assert len(rank1_only) >= 3  # of 9 shards: 4 or 5 hold rank 1's half, one may be split
    fs, _ = url_to_fs(packed)
    for uri in rank1_only:  # gone from storage: rank 0 must not need them
        fs.rm(uri)
    rank0 = build_train_loader(spec, processor, hp, rank=0, world_size=2, seed=3)
    ids = _ids(rank0, total // 2)  # its whole share of the first pass
    assert len(set(ids)) == total // 2 and not rank0.stats.skipped and rank1.isdisjoint(ids)


def test_a_mixture_streamed_from_s3_resumes_with_the_samples_of_an_uninterrupted_run(s3_env, s3_bucket, processor):
    scans = f"{s3_bucket}/scans"
    generate(scans, n=20, seed=6, shard_size=25)  # JSONL shards with their index
    packed = f"{s3_bucket}/scans-packed"
    pack(scans, packed, records_per_shard=20)
    other = f"{s3_bucket}/other"
    generate(other, n=8, seed=7, split="heldout", shard_size=10, embed_images=True)
    specs = [DatasetSpec(name="packed", uri=packed, weight=2.0, tasks=["vqa", "grounding", "caption"]),
             DatasetSpec(name="jsonl", uri=other, weight=1.0)]
    hp = Hyperparameters(per_device_batch_size=4, image_size=32)

    for rank, workers in ((0, 0), (1, 2)):
        uninterrupted = build_train_loader(specs, processor, hp, rank=rank, world_size=2, seed=11)
        before = _ids(uninterrupted, 3)
        state = json.loads(json.dumps(uninterrupted.state_dict()))  # what the checkpoint stores
        expected = [uninterrupted.next_batch() for _ in range(5)]

        resumed = build_train_loader(specs, processor, hp, rank=rank, world_size=2, seed=11, num_workers=workers)
        resumed.load_state_dict(state)
        for want in expected:
            got = resumed.next_batch()
            assert all(torch.equal(got[key], want[key]) for key in want)
        assert resumed.stats == uninterrupted.stats
        used = uninterrupted.stats.per_dataset
        assert used["packed"] > used["jsonl"] > 0
        assert all(i.split("-")[2] in ("vqa", "grounding", "caption") for i in before if i.startswith("train-"))
        # Stop its worker processes now: forked from this process while its S3 I/O thread ran, they
        # stalled the next test's uploads while they lived.
        del resumed
        gc.collect()


def _write_vqa_parquet(uri: str, scans: range) -> list[dict]:
    """A VQA set laid out as `datasets` writes one (`Dataset.to_parquet`): an Image column of
    {bytes, path} structs and the set's own column names; returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for index in scans:
        png, records = generate_scan(8, "train", index)
        vqa = next(r for r in records if r.task == "vqa" and r.answer_type == "closed")
        rows.append({"question": vqa.prompt, "answer": vqa.answer, "answer_type": "CLOSED",
                     "choices": vqa.options, "img": {"bytes": png, "path": f"scan-{index}.png"}})
    fs, path = url_to_fs(uri)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    fs.pipe_file(path, buffer.getvalue())
    return rows


def test_a_parquet_vqa_set_trains_through_a_column_mapping(s3_env, s3_bucket, processor):
    rows = _write_vqa_parquet(f"{s3_bucket}/vqa/train-00000-of-00002.parquet", range(0, 4))
    rows += _write_vqa_parquet(f"{s3_bucket}/vqa/train-00001-of-00002.parquet", range(4, 8))
    columns = {"prompt": "question", "answer": "answer", "answerType": "answer_type", "options": "choices",
               "image": "img"}
    spec = [DatasetSpec(name="vqa", uri=f"{s3_bucket}/vqa", tasks=["vqa"], columns=columns)]
    loader = build_train_loader(spec, processor, Hyperparameters(per_device_batch_size=8, image_size=32),
                                rank=0, world_size=1, seed=0)
    batch = loader.next_batch()
    assert loader.stats.samples == 8 and not loader.stats.skipped
    assert sorted(loader.last_record_ids) == sorted(f"train-0000{s}-of-00002-{i}" for s in (0, 1) for i in range(4))
    labels = batch["labels"].flatten()
    answers = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert sorted(answers.split("<|im_end|>")[:-1]) == sorted(row["answer"] for row in rows)

    unmapped = [DatasetSpec(name="vqa", uri=f"{s3_bucket}/vqa", columns=columns)]
    with pytest.raises(DatasetUnavailableError, match="columns.task"):
        build_train_loader(unmapped, processor, Hyperparameters(), rank=0, world_size=1, seed=0)
    misnamed = [DatasetSpec(name="vqa", uri=f"{s3_bucket}/vqa", tasks=["vqa"], columns=columns | {"prompt": "q"})]
    with pytest.raises(DatasetUnavailableError, match="'q'"):
        build_train_loader(misnamed, processor, Hyperparameters(), rank=0, world_size=1, seed=0).next_batch()
