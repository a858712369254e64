"""rl.rollout.backend: the vLLM backend runs in its own image, and the rollout workers read the choice
from their stage config."""

from __future__ import annotations

import json

import pytest
import yaml
from medmo_cases import load_sample
from pydantic import ValidationError

from medmo_operator import api, render
from medmo_operator.crd import build_crd
from medmo_trainer.config import StageConfig

RUN = render.RunRef(name="medmo-8b", namespace="medmo", uid="uid-1")
ENDPOINTS = render.OperatorEndpoints(progress_url="http://medmo-operator.medmo-system:8080", token_key=b"k" * 32)
VLLM_IMAGE = "registry.example/medmo-rollout-vllm:1"


def _run_with_rollout(**rollout) -> dict:
    manifest = load_sample("medmo-run.yaml")
    grpo = next(s for s in manifest["spec"]["stages"] if s["type"] == "rl")
    grpo["rl"]["rollout"].update(rollout)
    return manifest


def _rl_children(manifest: dict) -> list[dict]:
    spec = api.parse_training(manifest).spec
    stage = next(s for s in spec.stages if s.type == "rl")
    return render.build_stage_children(RUN, spec, stage, 0, ENDPOINTS)


def test_vllm_rollout_workers_run_their_image_and_read_the_backend_from_their_config():
    children = _rl_children(_run_with_rollout(backend="vllm", image=VLLM_IMAGE))
    deployments = {c["metadata"]["name"]: c for c in children if c["kind"] == "Deployment"}
    image = {name: d["spec"]["template"]["spec"]["containers"][0]["image"] for name, d in deployments.items()}
    spec_image = load_sample("medmo-run.yaml")["spec"]["image"]
    assert image == {"medmo-8b-grpo-rollout": VLLM_IMAGE, "medmo-8b-grpo-reward": spec_image}
    config = StageConfig.model_validate(yaml.safe_load(next(c for c in children if c["kind"] == "ConfigMap")["data"]["stage.yaml"]))
    assert config.rl.rollout_backend == "vllm"


def test_the_transformers_backend_is_the_default_in_the_trainer_image():
    children = _rl_children(load_sample("medmo-run.yaml"))
    config = StageConfig.model_validate(yaml.safe_load(next(c for c in children if c["kind"] == "ConfigMap")["data"]["stage.yaml"]))
    assert config.rl.rollout_backend == "transformers"


def test_vllm_without_its_image_is_refused_by_the_model_and_the_crd():
    with pytest.raises(ValidationError, match="backend vllm needs rl.rollout.image.*images/rollout-vllm"):
        api.parse_training(_run_with_rollout(backend="vllm"))
    with pytest.raises(ValidationError, match="backend"):
        api.parse_training(_run_with_rollout(backend="sglang"))
    rules = json.dumps(build_crd())
    assert "self.backend != 'vllm' || has(self.image)" in rules
