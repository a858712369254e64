"""A projector-only `pretrain` stage (FSDP, 2 ranks): frozen groups stay bit-identical, and the exported
Hugging Face model reloads with `from_pretrained` and gives the trained model's logits."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import Qwen3VLForConditionalGeneration

from integration.trainer_loop.trainer_loop_runs import assert_succeeded, run_stage, stage_config
from medmo_trainer.config import DatasetSpec, Hyperparameters
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.model import load_model, module_groups

STEPS = 4


def test_projector_pretrain_freezes_the_rest_and_exports_the_trained_model(tmp_path, synthetic_data):
    config = stage_config(tmp_path, str(synthetic_data), steps=STEPS, strategy={"name": "fsdp"},
                          type="pretrain", stage="align",
                          model={"base": "preset:tiny-qwen3-vl", "trainable": ["projector"]})
    run = run_stage(tmp_path, config)
    assert_succeeded(run)

    start = load_model("preset:tiny-qwen3-vl").model.state_dict()
    exported_model = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    exported = exported_model.state_dict()
    groups = module_groups(exported_model)
    for name in groups["vision"] + groups["language"]:
        assert torch.equal(exported[name], start[name]), f"frozen weight {name} changed"
    changed = [name for name in groups["projector"] if not torch.equal(exported[name], start[name])]
    assert changed == groups["projector"], "every projector weight should have trained"

    # The trained weights, independently: the base preset plus the projector of the final checkpoint.
    dcp_to_torch_save(tmp_path / "checkpoints" / f"step-{STEPS}" / "state", tmp_path / "final.pt")
    trained = torch.load(tmp_path / "final.pt", weights_only=False)["model"]
    assert sorted(trained) == sorted(groups["projector"]), "checkpoints hold only what trains"
    reference = load_model("preset:tiny-qwen3-vl")
    reference.model.load_state_dict(trained, strict=False)
    reference.model.eval()

    hp = Hyperparameters(per_device_batch_size=2, image_size=64, max_seq_length=256)
    batch = next(iter(build_train_loader([DatasetSpec(name="synthetic", uri=str(synthetic_data))],
                                         reference.processor, hp, rank=0, world_size=1, seed=5)))
    batch.pop("labels")
    with torch.no_grad():
        expected = reference.model(**batch).logits
        actual = exported_model(**batch).logits
        untrained = load_model("preset:tiny-qwen3-vl").model.eval()(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, untrained), "the export should differ from the untrained model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "model" / name).is_file(), f"export lacks {name}"
