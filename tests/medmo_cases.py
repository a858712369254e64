"""Shared test data: the sample resources and a table of invalid ones.

The invalid table is checked against the pydantic models (tests/unit/test_api.py) and against the
real API server's schema and CEL rules (tests/integration), so both reject the same resources.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medmo_trainer.progress import LOG_PREFIX

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "manifests" / "samples"
STANDIN_IMAGE = "medmo-standin-trainer:test"
"""An image the test node agent runs as tests/integration/operator/standin_trainer.py."""
TRAINER_IMAGE = "ghcr.io/medmo/trainer:0.1.0"
"""The trainer image (the samples' default); the node agent runs its entrypoint in this venv."""


def load_sample(name: str) -> dict[str, Any]:
    """A sample resource from manifests/samples/ as a dict."""
    return yaml.safe_load((SAMPLES / name).read_text())


@dataclass(frozen=True)
class InvalidCase:
    """A resource made invalid by one edit, and the field its error must name."""

    id: str
    edit: Callable[[dict[str, Any]], None]
    field: str
    server: bool = True
    """Whether the API server can reject it too (some checks only the models can make)."""

    def resource(self) -> dict[str, Any]:
        obj = copy.deepcopy(load_sample("medmo-tiny.yaml"))
        self.edit(obj)
        return obj


def shrink_stages(spec: dict, steps: int, eval_samples: int) -> None:
    """Cuts a sample's stages to the fewest steps and records that still run each stage type for
    real: 16 training records, 2 held-out scans, `steps` steps with one checkpoint, tiny RL groups."""
    def records(uri: str, n: int) -> str:
        return re.sub(r"([?&])n=\d+", rf"\g<1>n={n}", uri)

    for stage in spec["stages"]:
        for dataset in stage.get("datasets", []):
            dataset["uri"] = records(dataset["uri"], 16)
        for benchmark in stage.get("benchmarks", []):
            benchmark.update(uri=records(benchmark["uri"], 2), maxSamples=eval_samples)
        if stage["type"] == "eval":
            continue
        stage["hyperparameters"].update(maxSteps=steps, perDeviceBatchSize=2)
        stage["checkpoint"] = {"everySteps": steps, "keepLast": 1}
        if stage["type"] == "rl":
            stage["rl"]["algorithm"].update(groupSize=2, promptsPerStep=2, maxCompletionLength=8)


def standin_stage(name: str, kind: str = "sft", steps: int = 6, every: int = 2, nodes: int = 1, **knobs) -> dict:
    """A stage for the stand-in trainer: its dataset URI's query carries the stand-in's knobs
    (stepSeconds, default 0.1; exitCode, failAtStep, ...)."""
    query = "&".join(f"{k}={v}" for k, v in {"stepSeconds": 0.1, **knobs}.items())
    return {
        "name": name, "type": kind, "nodes": nodes,
        "datasets": [{"name": "d", "uri": f"standin://x?{query}"}],
        "hyperparameters": {"maxSteps": steps},
        "strategy": {"name": "ddp"},
        "checkpoint": {"everySteps": every},
    }


def standin_run(name: str, storage: str | Path, stages: list[dict], gpus_per_node: int = 0,
                node_pool: dict | None = None, **spec_extra) -> dict:
    """A MedMOTraining of the stand-in trainer image storing under the folder `storage` (file://),
    its pods requesting a little CPU and memory and `gpus_per_node` GPUs; `node_pool` adds to the
    pool (a nodeSelector, say), `spec_extra` to the spec (scheduling, runPolicy, ...)."""
    pool = {"gpusPerNode": gpus_per_node, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}, **(node_pool or {})}
    return {
        "apiVersion": "medmo.io/v1alpha1",
        "kind": "MedMOTraining",
        "metadata": {"name": name},
        "spec": {
            "image": STANDIN_IMAGE,
            "model": {"base": "preset:tiny-qwen3-vl"},
            "storage": {"uri": f"file://{storage}"},
            "nodePool": pool,
            "stages": stages,
            **spec_extra,
        },
    }


def _stage(obj: dict, name: str) -> dict:
    return next(s for s in obj["spec"]["stages"] if s["name"] == name)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit setting a dotted path; `stage:<name>` selects a stage by name."""

    def edit(obj: dict) -> None:
        node = obj
        parts = path.split(".")
        for part in parts[:-1]:
            node = _stage(obj, part.removeprefix("stage:")) if part.startswith("stage:") else node.setdefault(part, {})
        node[parts[-1]] = value

    return edit


def _dup_stage(obj: dict) -> None:
    obj["spec"]["stages"][1]["name"] = obj["spec"]["stages"][0]["name"]


def _drop_reward(obj: dict) -> None:
    del _stage(obj, "grpo")["rl"]["reward"]


def _drop_rl(obj: dict) -> None:
    del _stage(obj, "grpo")["rl"]


def _eval_first(obj: dict) -> None:
    stages = obj["spec"]["stages"]
    stages.insert(0, stages.pop())


def _unknown_field(obj: dict) -> None:
    _stage(obj, "align")["hyperparameters"]["learningrate"] = 0.1


INVALID_CASES: list[InvalidCase] = [
    InvalidCase("duplicate-stage-names", _dup_stage, "stages"),
    InvalidCase("unknown-stage-type", _set("spec.stage:align.type", "distill"), "type"),
    InvalidCase("rl-without-reward-workers", _drop_reward, "reward"),
    InvalidCase("rl-without-rl-section", _drop_rl, "rl"),
    InvalidCase("zero-rollout-replicas", _set("spec.stage:grpo.rl.rollout.replicas", 0), "replicas"),
    InvalidCase("negative-reward-replicas", _set("spec.stage:grpo.rl.reward.replicas", -2), "replicas"),
    InvalidCase("zero-stage-4", _set("spec.stage:align.strategy", {"name": "deepspeed", "zeroStage": 4}), "zeroStage"),
    InvalidCase("empty-stages", _set("spec.stages", []), "stages"),
    InvalidCase("bad-storage-uri", _set("spec.storage.uri", "http://bucket/runs"), "uri"),
    InvalidCase("unknown-strategy", _set("spec.stage:align.strategy", {"name": "megatron"}), "name"),
    InvalidCase("negative-backoff-limit", _set("spec.runPolicy.backoffLimit", -1), "backoffLimit"),
    InvalidCase("eval-stage-first", _eval_first, "stages"),
    InvalidCase("eval-without-benchmarks", _set("spec.stage:bench.benchmarks", []), "benchmarks"),
    InvalidCase("sft-without-datasets", _set("spec.stage:ground.datasets", []), "datasets"),
    InvalidCase("rl-section-on-sft", _set("spec.stage:ground.rl", {"rollout": {}, "reward": {}}), "rl"),
    InvalidCase("unknown-field", _unknown_field, "learningrate"),
    InvalidCase("negative-learning-rate", _set("spec.stage:align.hyperparameters.learningRate", -1e-3), "learningRate"),
    InvalidCase("zero-dataset-weight", _set("spec.stage:align.datasets", [{"name": "d", "uri": "s3://b/d", "weight": 0}]), "weight"),
    InvalidCase("uppercase-stage-name", _set("spec.stage:align.name", "Align"), "name"),
    InvalidCase("offload-without-deepspeed", _set("spec.stage:align.strategy", {"name": "fsdp", "offload": "cpu"}), "offload"),
    InvalidCase("clip-high-below-low", _set("spec.stage:grpo.rl.algorithm", {"epsilonLow": 0.3, "epsilonHigh": 0.1}), "epsilonHigh"),
    InvalidCase("s3-without-secret", _set("spec.storage.uri", "s3://bucket/runs"), "secretRef"),
    InvalidCase("negative-gpus-per-node", _set("spec.nodePool.gpusPerNode", -1), "gpusPerNode"),
    InvalidCase("zero-nodes", _set("spec.stage:align.nodes", 0), "nodes"),
    InvalidCase("unknown-module-group", _set("spec.stage:align.trainable", ["decoder"]), "trainable"),
    InvalidCase("unknown-task-type", _set("spec.stage:align.datasets", [{"name": "d", "uri": "s3://b/d", "tasks": ["segmentation"]}]), "tasks"),
    InvalidCase("group-size-one", _set("spec.stage:grpo.rl.algorithm", {"groupSize": 1}), "groupSize"),
    InvalidCase("bad-clean-pod-policy", _set("spec.runPolicy.cleanPodPolicy", "Sometimes"), "cleanPodPolicy"),
    InvalidCase("run-name-too-long", _set("metadata.name", "a" * 40), "name"),
    InvalidCase("init-from-later-stage", _set("spec.stage:align.initFrom", "instruct"), "initFrom", server=False),
    InvalidCase("hub-token-for-a-preset", _set("spec.model.tokenSecretRef", {"name": "hf-token"}), "tokenSecretRef"),
    InvalidCase("malformed-hub-id", _set("spec.model.base", "org/name/extra"), "base"),
    InvalidCase("duplicate-vision-encoder-names",
                _set("spec.model.visionEncoders", [{"name": "hires", "base": "preset:tiny-siglip"}] * 2), "visionEncoders"),
    InvalidCase("trainable-names-no-vision-encoder", _set("spec.stage:align.trainable", ["projector:hires"]), "trainable"),
]


def clone_head(target: Path) -> Path:
    """A plain `git clone` of this checkout's HEAD at ``target``, as a new user gets the project."""
    uncommitted = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "requirements"], cwd=REPO)
    assert uncommitted.returncode == 0, ("requirements/ has uncommitted changes: a clone of HEAD would build "
                                         "another dependency virtualenv; commit them first")
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True, timeout=300)
    return target


def progress_lines(log: str) -> list[dict]:
    """The progress reports a stage printed in ``log`` (its stdout or a pod's log), in order."""
    return [json.loads(line.split(LOG_PREFIX, 1)[1]) for line in log.splitlines()
            if LOG_PREFIX + "{" in line]
