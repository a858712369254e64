"""Models and data through real storage: Hugging Face export and reload, SeaweedFS S3 for datasets and models."""

from __future__ import annotations

import json

import pytest
import torch

from medmo_trainer.config import DatasetSpec, Hyperparameters, ModelSource
from medmo_trainer.data import DatasetUnavailableError
from medmo_trainer.data.synthetic import main as synthetic_main
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import ModelUnavailableError, export_hf, load_model


def _batch(processor, uri: str, seed: int = 0) -> dict:
    hp = Hyperparameters(per_device_batch_size=4, image_size=64)
    spec = [DatasetSpec(name="syn", uri=uri)]
    return build_train_loader(spec, processor, hp, rank=0, world_size=1, seed=seed).next_batch()


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("syn")
    synthetic_main(["--out", str(folder), "--n", "6", "--seed", "21"])
    return str(folder)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MEDMO_CACHE", str(tmp_path / "cache"))
    return s3_server


@pytest.mark.parametrize("preset", ["preset:tiny-qwen3-vl", "preset:tiny-qwen2.5-vl"])
def test_exported_model_reloads_with_identical_logits(preset, tmp_path, local_data):
    original = load_model(preset, seed=3)
    batch = _batch(original.processor, local_data)
    out = tmp_path / "export"
    export_hf(original.model, original.processor, str(out))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "preprocessor_config.json").is_file() and (out / "config.json").is_file()

    reloaded = load_model(ModelSource(base=f"file://{out}"))
    assert reloaded.family == original.family
    assert torch.equal(_batch(reloaded.processor, local_data)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, original.model(**batch).logits, rtol=0, atol=0)
    assert reloaded.model.generation_config.use_cache  # generation keeps its KV cache


def test_model_exported_to_s3_loads_from_s3(s3_env, s3_bucket, local_data, tmp_path):
    original = load_model("preset:tiny-qwen3-vl", seed=5)
    uri = f"{s3_bucket}/runs/demo/align/model"
    export_hf(original.model, original.processor, uri)

    reloaded = load_model(ModelSource(base=uri))
    batch = _batch(original.processor, local_data)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, original.model(**batch).logits, rtol=0, atol=0)
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1
    load_model(ModelSource(base=uri))  # unchanged folder: served from the cache, no second copy
    assert list((tmp_path / "cache" / "models").iterdir()) == cached


def test_missing_s3_model_raises_naming_the_uri(s3_env, s3_bucket):
    uri = f"{s3_bucket}/no/such/model"
    with pytest.raises(ModelUnavailableError, match=uri):
        load_model(uri)


def test_synthetic_data_on_s3_trains_like_the_local_copy(s3_env, s3_bucket, local_data, tiny_qwen3_s3):
    uri = f"{s3_bucket}/datasets/syn"
    synthetic_main(["--out", uri, "--n", "6", "--seed", "21"])
    from_s3 = _batch(tiny_qwen3_s3.processor, uri, seed=8)
    from_disk = _batch(tiny_qwen3_s3.processor, local_data, seed=8)
    for key in from_disk:
        assert torch.equal(from_s3[key], from_disk[key]), key


@pytest.fixture(scope="module")
def tiny_qwen3_s3():
    return load_model("preset:tiny-qwen3-vl")


@pytest.mark.parametrize("suffix", ["missing-folder", "missing.jsonl"])
def test_unreadable_s3_dataset_raises_naming_the_uri(s3_env, s3_bucket, tiny_qwen3_s3, suffix):
    uri = f"{s3_bucket}/{suffix}"
    with pytest.raises(DatasetUnavailableError) as raised:
        _batch(tiny_qwen3_s3.processor, uri)
    assert uri in str(raised.value)


def test_dataset_in_a_bucket_without_credentials_raises_naming_the_uri(s3_env, s3_bucket, tiny_qwen3_s3, monkeypatch):
    synthetic_main(["--out", f"{s3_bucket}/syn", "--n", "1", "--seed", "1"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("MEDMO_S3_ENDPOINT", s3_env.endpoint + "/")  # a new filesystem instance, new credentials
    uri = f"{s3_bucket}/syn"
    with pytest.raises(DatasetUnavailableError) as raised:
        _batch(tiny_qwen3_s3.processor, uri)
    assert uri in str(raised.value)
    assert json.dumps(str(raised.value)).count("wrong-secret") == 0  # credentials never leak into messages
