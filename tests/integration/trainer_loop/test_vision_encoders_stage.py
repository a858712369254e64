"""Extra vision encoders through real stages (torchrun, 2 ranks): the pretrain stage aligns the new projector
with the language model frozen, resumes exactly after a kill, and exports a model the next stage, the eval
stage and the rollout workers load; a later stage trains only the groups its `trainable` names."""

from __future__ import annotations

import json

import pytest
import torch

from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage, stage_config
from medmo_trainer.checkpoint import COMMIT_MARKER
from medmo_trainer.config import ModelSource
from medmo_trainer.model import load_model, module_groups
from medmo_trainer.stages.eval import load_eval_model

ENCODERS = [{"name": "hires", "base": "preset:tiny-siglip", "imageSize": 128, "poolSize": 2}]
MODEL = {"base": "preset:tiny-qwen3-vl", "visionEncoders": ENCODERS}
STRATEGIES = [
    pytest.param({"name": "ddp"}, id="ddp"),
    pytest.param({"name": "fsdp"}, id="fsdp", marks=pytest.mark.slow),
    pytest.param({"name": "deepspeed", "zeroStage": 2}, id="deepspeed-zero2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pretrain_aligns_the_new_projector_resumes_exactly_and_exports(tmp_path, synthetic_data, strategy):
    settings = {"steps": 4, "every_steps": 2, "strategy": strategy, "type": "pretrain", "stage": "align",
                "model": {**MODEL, "trainable": ["projector"]}}
    whole = run_stage(tmp_path, stage_config(tmp_path / "whole", str(synthetic_data), **settings), name="whole")
    assert_succeeded(whole)

    config = stage_config(tmp_path / "killed", str(synthetic_data), **settings)
    killed = run_stage(tmp_path, config, kill_after_step=3, name="killed")
    assert killed.returncode < 0 and killed.final["phase"] == "Running", "the run was meant to die mid-way"
    marker = json.loads((tmp_path / "killed" / "checkpoints" / "step-2" / COMMIT_MARKER).read_text())
    saved = set(marker["tensors"])
    assert any(n.startswith("model.extra_projectors.hires.") for n in saved)
    assert all(n.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list.", "model.extra_projectors."))
               for n in saved), "a projector-only stage checkpoints only projectors"

    resumed = run_stage(tmp_path, config, name="resumed")
    assert_succeeded(resumed)
    assert sorted(resumed.losses) == [3, 4]
    for step, loss in {**killed.losses, **resumed.losses}.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5), f"step {step}"

    start = load_model(ModelSource.model_validate(MODEL)).model.state_dict()
    exported = load_model(str(tmp_path / "killed" / "model"))
    assert exported.family == "medmo_qwen3_vl" and exported.processor.extra_pool_sizes == [2]
    weights = exported.model.state_dict()
    groups = module_groups(exported.model)
    for name in groups["language"] + groups["encoder:hires"]:
        assert torch.equal(weights[name], start[name]), f"frozen weight {name} changed"
    assert all(not torch.equal(weights[n], start[n]) for n in groups["projector:hires"]), "the new projector trained"


def test_later_stage_trains_only_the_named_encoder_groups_and_eval_loads_the_export(tmp_path, synthetic_data):
    align = stage_config(tmp_path / "align", str(synthetic_data), steps=2, type="pretrain", stage="align",
                         model={**MODEL, "trainable": ["projector:hires"]})
    assert_succeeded(run_stage(tmp_path, align, name="align"))
    aligned = str(tmp_path / "align" / "model")
    tune = stage_config(tmp_path / "tune", str(synthetic_data), steps=2, stage="tune",
                        model={"base": aligned, "visionEncoders": ENCODERS, "trainable": ["encoder:hires", "projector:hires"]})
    assert_succeeded(run_stage(tmp_path, tune, name="tune"))

    before = load_model(aligned).model.state_dict()
    model, processor = load_eval_model(str(tmp_path / "tune" / "model"), torch.device("cpu"), torch.float32)
    after = model.state_dict()
    groups = module_groups(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and changed <= set(groups["encoder:hires"]) | set(groups["projector:hires"])
    assert any(n.startswith("model.extra_encoders.hires.") for n in changed)
    assert processor.extra_pool_sizes == [2]
