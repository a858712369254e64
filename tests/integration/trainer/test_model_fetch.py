"""The model initializer (`python -m medmo_trainer.fetch`) against a stand-in for the Hugging Face Hub
(tests/hub_standin.py: no hub is reachable from this machine), and loading in a stage's precision."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hub_standin import HUB_GATED_MODEL, HUB_MODEL

from medmo_trainer.config import DatasetSpec, Hyperparameters, ModelSource, StageConfig, StorageConfig
from medmo_trainer.exit_codes import ExitCode
from medmo_trainer.stages.training import load_stage_model


def _fetch(hub, model: str, target, token: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), MEDMO_TERMINATION_LOG=str(tmp_path / "termination"))
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "medmo_trainer.fetch", "--model", model, "--to", f"file://{target}"],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_gated_model_is_fetched_with_the_token_into_storage_and_the_token_is_never_printed(hub, tmp_path):
    target = tmp_path / "storage" / "base_model"

    result = _fetch(hub, HUB_GATED_MODEL, target, hub.token, tmp_path)

    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in (hub.root / HUB_GATED_MODEL).iterdir())
    for path in (hub.root / HUB_GATED_MODEL).iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes(), path.name
    message = (tmp_path / "termination").read_text()
    assert message.startswith("OK: model") and str(target) in message
    assert hub.token not in result.stdout + result.stderr + message


@pytest.mark.parametrize(("model", "token", "code", "answer"), [
    (HUB_GATED_MODEL, None, ExitCode.MODEL_ACCESS_DENIED, "answered 401"),
    (HUB_GATED_MODEL, "hf_not-the-right-token", ExitCode.MODEL_ACCESS_DENIED, "answered 403"),
    ("medmo-test/no-such-model", None, ExitCode.MODEL_INVALID, "answered 404"),
], ids=["gated-without-token", "gated-with-another-token", "missing"])
def test_a_refused_or_missing_model_exits_with_a_final_code_naming_the_model_and_the_answer(hub, tmp_path, model, token, code, answer):
    result = _fetch(hub, model, tmp_path / "storage" / "base_model", token, tmp_path)

    assert result.returncode == code, result.stderr[-3000:]
    message = (tmp_path / "termination").read_text()
    assert message.startswith(f"{code.name} (exit {int(code)})") and repr(model) in message and answer in message, message
    assert not (tmp_path / "storage" / "base_model" / "config.json").exists()


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)])
def test_a_stage_loads_bf16_weights_in_its_precision(hub, precision, dtype):
    """The hub's copy is saved in bf16; on CPU `auto` means fp32."""
    config = StageConfig(
        run="r", stage="s", type="sft", model=ModelSource(base=str(hub.root / HUB_MODEL)),
        datasets=[DatasetSpec(name="d", uri="synthetic://train?n=4")], storage=StorageConfig(uri="file:///unused"), output_uri="file:///unused/out", checkpoint_uri="file:///unused/ckpt",
        hyperparameters=Hyperparameters(precision=precision),
    )
    saved = {p.dtype for p in load_stage_model(config, torch.device("cpu")).model.parameters()}

    assert saved == {dtype}
