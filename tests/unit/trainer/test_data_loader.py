"""The training loader: mixture weights, rank shares, exact resume, answer-only labels, malformed records."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.data import DatasetUnavailableError, iter_records
from medmo_trainer.data.synthetic import generate
from medmo_trainer.inputs import IGNORE_INDEX, build_prompt, build_train_loader, num_tokens


def _loader(specs, processor, hp, *, rank=0, world_size=1, seed=0):
    return build_train_loader(specs, processor, hp, rank=rank, world_size=world_size, seed=seed)


def _ids_of_batches(loader, batches: int) -> list[str]:
    ids = []
    for _ in range(batches):
        loader.next_batch()
        ids.extend(loader.last_record_ids)
    return ids


def test_mixture_follows_dataset_weights(synthetic_train, synthetic_other, tiny_qwen3):
    specs = [DatasetSpec(name="big", uri=str(synthetic_train), weight=1.0),
             DatasetSpec(name="small", uri=str(synthetic_other), weight=3.0)]
    hp = Hyperparameters(per_device_batch_size=8, image_size=32, max_seq_length=256)
    loader = _loader(specs, tiny_qwen3.processor, hp)
    for _ in range(50):
        loader.next_batch()
    used = loader.stats.per_dataset
    assert used["big"] + used["small"] == 400
    # weights, not dataset sizes, decide: the small set (~70 records) is cycled three times as often
    assert abs(used["small"] / 400 - 0.75) < 0.06, used


def test_task_filter_keeps_only_the_chosen_tasks(synthetic_train, tiny_qwen3):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train), tasks=["grounding", "vqa"])]
    loader = _loader(spec, tiny_qwen3.processor, Hyperparameters(per_device_batch_size=8, image_size=32))
    ids = _ids_of_batches(loader, 6)
    assert {i.split("-")[2] for i in ids} == {"grounding", "vqa"}


def test_rank_shares_are_disjoint_and_cover_the_data(synthetic_train, tiny_qwen3):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    total = sum(1 for _ in iter_records(str(synthetic_train)))
    hp = Hyperparameters(per_device_batch_size=1, image_size=32)
    world = 3
    shares = []
    for rank in range(world):
        loader = _loader(spec, tiny_qwen3.processor, hp, rank=rank, world_size=world, seed=9)
        shares.append(_ids_of_batches(loader, total // world))  # one pass over the data between them
    for a in range(world):
        assert len(set(shares[a])) == len(shares[a])
        for b in range(a + 1, world):
            assert set(shares[a]).isdisjoint(shares[b])
    covered = set().union(*shares)
    assert len(covered) == total // world * world and total - len(covered) < world


def test_resume_from_state_dict_reproduces_the_following_batches(synthetic_train, synthetic_other, tiny_qwen3):
    specs = [DatasetSpec(name="big", uri=str(synthetic_train)), DatasetSpec(name="small", uri=str(synthetic_other))]
    hp = Hyperparameters(per_device_batch_size=3, image_size=64)
    uninterrupted = _loader(specs, tiny_qwen3.processor, hp, rank=1, world_size=2, seed=4)
    for _ in range(5):
        uninterrupted.next_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # what a checkpoint stores
    expected = [uninterrupted.next_batch() for _ in range(4)]

    resumed = _loader(specs, tiny_qwen3.processor, hp, rank=1, world_size=2, seed=4)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert resumed.stats == uninterrupted.stats


def test_worker_processes_prepare_the_same_batches_in_order(synthetic_train, synthetic_other, tiny_qwen3):
    specs = [DatasetSpec(name="big", uri=str(synthetic_train)), DatasetSpec(name="small", uri=str(synthetic_other))]
    hp = Hyperparameters(per_device_batch_size=3, image_size=64)
    inline = build_train_loader(specs, tiny_qwen3.processor, hp, rank=0, world_size=2, seed=6, num_workers=0)
    workers = build_train_loader(specs, tiny_qwen3.processor, hp, rank=0, world_size=2, seed=6, num_workers=2)
    workers.load_state_dict(json.loads(json.dumps(inline.state_dict())))
    for _ in range(6):
        want, got = inline.next_batch(), workers.next_batch()
        assert all(torch.equal(got[key], want[key]) for key in want)
    assert workers.stats == inline.stats
    assert workers.state_dict() == inline.state_dict()


def test_resume_on_more_ranks_continues_at_the_same_point_of_the_stream(synthetic_train, tiny_qwen3):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    saved = _loader(spec, tiny_qwen3.processor, Hyperparameters(per_device_batch_size=3, image_size=32),
                    rank=0, world_size=2, seed=1)
    for _ in range(5):  # 5 batches x 3 samples x 2 ranks: the first 30 positions are consumed
        saved.next_batch()
    hp = Hyperparameters(per_device_batch_size=2, image_size=32)
    resumed = _loader(spec, tiny_qwen3.processor, hp, rank=0, world_size=3, seed=1)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict()["nextBatch"] == 5  # 30 positions / (2 samples x 3 ranks)
    fresh = _loader(spec, tiny_qwen3.processor, hp, rank=0, world_size=3, seed=1)
    _ids_of_batches(fresh, 5)  # what an uninterrupted 3-rank run read before that point
    assert _ids_of_batches(resumed, 2) == _ids_of_batches(fresh, 2)


def test_resume_refuses_another_seed(synthetic_train, tiny_qwen3):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    hp = Hyperparameters(per_device_batch_size=1, image_size=32)
    state = _loader(spec, tiny_qwen3.processor, hp, seed=1).state_dict()
    with pytest.raises(ValueError, match="resume with the same seed"):
        _loader(spec, tiny_qwen3.processor, hp, seed=2).load_state_dict(state)


@pytest.mark.parametrize("packing", [True, False])
def test_labels_cover_only_the_answers(synthetic_train, tiny_qwen3, packing):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    hp = Hyperparameters(per_device_batch_size=4, image_size=64, packing=packing)
    loader = _loader(spec, tiny_qwen3.processor, hp, seed=2)
    batch = loader.next_batch()
    answers = {r.id: r.answer for r in iter_records(str(synthetic_train))}
    tokenizer = tiny_qwen3.processor.tokenizer
    labels = batch["labels"].flatten()
    supervised = labels[labels != IGNORE_INDEX]
    expected = "".join(answers[i] + "<|im_end|>" for i in loader.last_record_ids)
    assert tokenizer.decode(supervised) == expected
    # and supervised tokens are exactly the input tokens at those places (no shift inside the loader)
    assert torch.equal(batch["input_ids"].flatten()[labels != IGNORE_INDEX], supervised)
    if packing:  # one row, no padding: every token counts
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert num_tokens(batch) == batch["input_ids"].numel()
    else:  # padding is neither supervised nor counted
        assert batch["input_ids"].shape[0] == 4
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert num_tokens(batch) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()


def _write_malformed_dataset(folder: Path, source: Path) -> tuple[list[str], list[str]]:
    """Twelve good records copied from `source` plus one bad record of each kind, over two shards;
    returns the good records' ids and the skip reasons expected (one record each)."""
    good = [json.loads(line) for line in (source / "train-00000.jsonl").read_text().splitlines()[:12]]
    for record in good:
        record["image"] = str(source / record["image"])
    caption = dict(good[0])
    bad_lines = [
        "{not json",
        json.dumps(caption | {"id": "bad-task", "task": "segmentation"}),
        json.dumps(caption | {"id": "bad-box", "task": "grounding", "answer": "nodule <box>[[1, 2, 3, 1200]]</box>",
                              "boxes": [{"label": "nodule", "box": [1, 2, 3, 1200]}]}),
        json.dumps(caption | {"id": "bad-vqa", "task": "vqa", "answerType": "closed", "answer": "maybe",
                              "options": ["yes", "no"]}),
        json.dumps(caption | {"id": "no-image", "image": "images/missing.png"}),
        json.dumps(caption | {"id": "bad-image", "image": "data:image/png;base64,"
                              + base64.b64encode(b"not a png").decode()}),
        json.dumps(caption | {"id": "too-long", "prompt": "Describe this scan please. " * 200}),
    ]
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in good[:6]) + "\n")
    (folder / "part-1.jsonl").write_text("\n".join([json.dumps(r) for r in good[6:]] + bad_lines) + "\n")
    reasons = ["badJson", "unknownTask", "badBox", "invalidRecord", "missingImage", "badImage", "tooLong"]
    return [r["id"] for r in good], reasons


def test_malformed_records_are_counted_by_reason_and_skipped(tmp_path, synthetic_train, tiny_qwen3):
    good_ids, reasons = _write_malformed_dataset(tmp_path / "mixed", synthetic_train)
    spec = [DatasetSpec(name="mixed", uri=str(tmp_path / "mixed"))]
    # a batch of 19 positions is exactly one pass over the 19 records
    hp = Hyperparameters(per_device_batch_size=19, image_size=32, max_seq_length=128)
    loader = _loader(spec, tiny_qwen3.processor, hp)
    for passes in (1, 2):
        loader.next_batch()
        assert sorted(loader.last_record_ids) == sorted(good_ids)
        assert loader.stats.skipped == Counter({reason: passes for reason in reasons})
        assert loader.stats.samples == 12 * passes and loader.stats.records_read == 19 * passes

    json_level = Counter()
    assert len(list(iter_records(str(tmp_path / "mixed"), skipped=json_level))) == 15
    assert json_level == Counter({"badJson": 1, "unknownTask": 1, "badBox": 1, "invalidRecord": 1})


def test_a_mixture_without_usable_records_fails_instead_of_spinning(tmp_path, tiny_qwen3):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text("{oops\n[1, 2]\n")
    spec = [DatasetSpec(name="bad", uri=str(tmp_path / "bad"))]
    loader = _loader(spec, tiny_qwen3.processor, Hyperparameters(per_device_batch_size=1))
    with pytest.raises(DatasetUnavailableError, match="no usable record"):
        loader.next_batch()


@pytest.mark.parametrize("uri", ["/nonexistent/medmo/data", "file:///nonexistent/medmo/shard.jsonl"])
def test_unreadable_dataset_uri_raises_naming_the_uri(uri, tiny_qwen3):
    spec = [DatasetSpec(name="gone", uri=uri)]
    with pytest.raises(DatasetUnavailableError) as raised:
        _loader(spec, tiny_qwen3.processor, Hyperparameters())
    assert uri in str(raised.value)


def test_folder_without_shards_raises_naming_the_uri(tmp_path, tiny_qwen3):
    spec = [DatasetSpec(name="empty", uri=str(tmp_path))]
    with pytest.raises(DatasetUnavailableError, match="no \\*.jsonl shard") as raised:
        _loader(spec, tiny_qwen3.processor, Hyperparameters())
    assert str(tmp_path) in str(raised.value)


def test_build_prompt_generates_from_the_image_and_question(synthetic_train, tiny_qwen3):
    record = next(iter_records(str(synthetic_train), tasks=["grounding"]))
    prompt = build_prompt(tiny_qwen3.processor, record, image_size=64)
    assert prompt.reference == record.answer
    assert prompt.text.endswith("Locate every nodule with boxes.<|im_end|>\n<|im_start|>assistant\n")
    inputs = prompt.inputs
    image_tokens = int((inputs["input_ids"] == tiny_qwen3.processor.image_token_id).sum())
    assert image_tokens == tiny_qwen3.processor.image_token_count(inputs["image_grid_thw"][0])
    model = tiny_qwen3.model
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
    # generation ends with the assistant's turn
    assert tiny_qwen3.processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_images_missing_in_a_folder_of_shards_do_not_stop_training(tmp_path, tiny_qwen3):
    generate(str(tmp_path / "data"), n=4, seed=1)
    for png in sorted((tmp_path / "data" / "images").glob("*.png"))[:2]:
        png.unlink()
    spec = [DatasetSpec(name="syn", uri=str(tmp_path / "data"))]
    loader = _loader(spec, tiny_qwen3.processor, Hyperparameters(per_device_batch_size=4, image_size=32))
    for _ in range(5):
        loader.next_batch()
    assert loader.stats.skipped["missingImage"] > 0
    assert all(i.startswith(("train-000002", "train-000003")) for i in loader.last_record_ids)


def _passes(loader, batches: int) -> list[dict]:
    return [loader.next_batch() for _ in range(batches)]


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def test_second_pass_reuses_encoded_samples_and_yields_the_same_batches(tmp_path, synthetic_train, tiny_qwen3,
                                                                        monkeypatch):
    _write_malformed_dataset(tmp_path / "mixed", synthetic_train)
    spec = [DatasetSpec(name="mixed", uri=str(tmp_path / "mixed"))]
    hp = Hyperparameters(per_device_batch_size=19, image_size=32, max_seq_length=128)  # a batch is a pass
    monkeypatch.setenv("MEDMO_ENCODED_CACHE_MIB", "0")
    uncached = _loader(spec, tiny_qwen3.processor, hp)
    monkeypatch.setenv("MEDMO_ENCODED_CACHE_MIB", "64")
    cached = _loader(spec, tiny_qwen3.processor, hp)
    assert _same_batches(_passes(cached, 3), _passes(uncached, 3))
    # one encoding per record (malformed ones included), then every pass from memory
    assert (cached.source.encoded.misses, cached.source.encoded.hits) == (19, 38)
    assert uncached.source.encoded.hits == 0 and not uncached.source.encoded.entries
    assert cached.stats == uncached.stats  # skipped records are still counted on every pass


def test_encoded_samples_stay_within_their_memory_budget(synthetic_train, tiny_qwen3, monkeypatch):
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    hp = Hyperparameters(per_device_batch_size=8, image_size=64, max_seq_length=256)
    monkeypatch.setenv("MEDMO_ENCODED_CACHE_MIB", "0.25")
    small = _loader(spec, tiny_qwen3.processor, hp)
    monkeypatch.setenv("MEDMO_ENCODED_CACHE_MIB", "0")
    uncached = _loader(spec, tiny_qwen3.processor, hp)
    budget = 0.25 * 2**20
    batches = []
    for _ in range(40):
        batches.append(small.next_batch())
        assert small.source.encoded.used <= budget
    assert small.source.encoded.used > budget / 2  # it does hold samples, just not all of them
    assert len(small.source.encoded.entries) < sum(1 for _ in iter_records(str(synthetic_train)))
    assert _same_batches(batches, _passes(uncached, 40))


def test_a_share_too_large_to_revisit_keeps_no_encoded_samples(synthetic_train, tiny_qwen3, monkeypatch):
    import medmo_trainer.inputs.loader as loader_module

    total = sum(1 for _ in iter_records(str(synthetic_train)))
    monkeypatch.setattr(loader_module, "CACHE_MAX_RECORDS", total // 2)
    spec = [DatasetSpec(name="syn", uri=str(synthetic_train))]
    hp = Hyperparameters(per_device_batch_size=8, image_size=32)
    whole = _loader(spec, tiny_qwen3.processor, hp)  # the whole dataset for one rank: streamed only
    half = _loader(spec, tiny_qwen3.processor, hp, rank=0, world_size=2)  # half of it: kept
    _passes(whole, 3), _passes(half, 3)
    assert not whole.source.encoded.entries and whole.source.encoded.budget == 0
    assert len(half.source.encoded.entries) == 24
