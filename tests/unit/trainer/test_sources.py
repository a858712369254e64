"""Where models and data come from: S3 settings from the environment, and clear errors for bad sources."""

from __future__ import annotations

import pytest

from medmo_trainer.config import ModelSource
from medmo_trainer.fsio import S3_MAX_ATTEMPTS, s3_options
from medmo_trainer.model import ModelUnavailableError, load_model


def test_s3_endpoint_and_region_come_from_the_environment(monkeypatch):
    for name in ("MEDMO_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL",
                 "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    retries = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}}}
    assert s3_options() == retries
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert s3_options() == {**retries, "endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "eu-west-3"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("MEDMO_S3_ENDPOINT", "http://127.0.0.1:3")  # the project's own variable wins
    assert s3_options()["endpoint_url"] == "http://127.0.0.1:3"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ModelUnavailableError, match=r"preset:tiny-llama.*tiny-qwen2\.5-vl.*tiny-qwen3-vl"):
        load_model(ModelSource(base="preset:tiny-llama"))


@pytest.mark.parametrize("form", ["{}", "file://{}"])
def test_missing_model_folder_is_named_in_the_error(tmp_path, form):
    base = form.format(tmp_path / "no-model")
    with pytest.raises(ModelUnavailableError, match=str(tmp_path / "no-model")):
        load_model(base)


def test_folder_of_an_unsupported_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelUnavailableError, match="'bert' is not supported.*qwen2_5_vl.*qwen3_vl"):
        load_model(str(tmp_path))
