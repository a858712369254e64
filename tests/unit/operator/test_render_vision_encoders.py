"""model.visionEncoders in the resource: parsed, validated and carried into every stage's config."""

from __future__ import annotations

import pytest
from medmo_cases import load_sample
from pydantic import ValidationError

from medmo_operator import api, render

RUN = render.RunRef(name="medmo-tiny", namespace="medmo", uid="uid-1")
ENCODERS = [{"name": "hires", "base": "preset:tiny-siglip", "imageSize": 256, "poolSize": 4,
             "projector": {"type": "mlp", "layers": 2}},
            {"name": "path", "base": "s3://models/dinov2-small", "imageSize": 224}]


def tiny_with_encoders(trainable: list[str] | None = None) -> dict:
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["model"]["visionEncoders"] = ENCODERS
    obj["spec"]["stages"][0].pop("trainable", None)  # the pretrain default, unless a test names groups
    if trainable is not None:
        obj["spec"]["stages"][0]["trainable"] = trainable
    return obj


def test_every_stage_config_carries_the_encoders_and_named_groups():
    spec = api.parse_training(tiny_with_encoders(["projector:hires", "projector:path", "encoder:hires"])).spec
    configs = [render.build_stage_config(RUN, spec, stage) for stage in spec.stages]

    assert all([e.name for e in c.model.vision_encoders] == ["hires", "path"] for c in configs)
    assert configs[0].model.trainable == ["projector:hires", "projector:path", "encoder:hires"]
    hires = configs[1].model.vision_encoders[0]
    assert (hires.image_size, hires.pool_size, hires.projector.layers) == (256, 4, 2)
    assert configs[0].model.to_wire()["visionEncoders"][1] == {
        "name": "path", "base": "s3://models/dinov2-small", "imageSize": 224, "poolSize": 4,
        "projector": {"type": "mlp", "layers": 2}}


def test_pretrain_default_trains_every_projector():
    spec = api.parse_training(tiny_with_encoders()).spec
    assert spec.stages[0].type == "pretrain" and spec.stages[0].effective_trainable() == ["projector"]


@pytest.mark.parametrize("trainable", [["encoder:other"], ["projector:"], ["encoder:Hires"]])
def test_groups_naming_no_encoder_are_rejected(trainable):
    with pytest.raises(ValidationError, match="trainable"):
        api.parse_training(tiny_with_encoders(trainable))


def test_vllm_rollouts_are_refused_for_a_model_with_extra_encoders():
    obj = tiny_with_encoders()
    grpo = next(s for s in obj["spec"]["stages"] if s["type"] == "rl")
    grpo["rl"]["rollout"].update(backend="vllm", image="ghcr.io/medmo/rollout-vllm:0.1.0")
    with pytest.raises(ValidationError, match="vllm"):
        api.parse_training(obj)
