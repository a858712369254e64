"""The MedMOTraining models: samples load, invalid resources are rejected naming the field."""

from __future__ import annotations

import pytest
from medmo_cases import INVALID_CASES, load_sample
from pydantic import ValidationError

from medmo_operator import api


@pytest.mark.parametrize("sample", ["medmo-run.yaml", "medmo-tiny.yaml"])
def test_samples_load_through_the_models(sample):
    training = api.parse_training(load_sample(sample))

    assert [stage.type for stage in training.spec.stages] == ["pretrain", "sft", "sft", "rl", "eval"]
    # the paper's recipe aligns the projector only (the default); the tiny one trains its whole random model
    expected = ["projector"] if sample == "medmo-run.yaml" else ["projector", "vision", "language"]
    assert training.spec.stages[0].effective_trainable() == expected


def test_a_pretrain_stage_trains_only_the_projector_unless_told():
    obj = load_sample("medmo-tiny.yaml")
    del obj["spec"]["stages"][0]["trainable"]

    assert api.parse_training(obj).spec.stages[0].effective_trainable() == ["projector"]


def test_paper_recipe_sample_uses_the_papers_settings():
    spec = api.parse_training(load_sample("medmo-run.yaml")).spec
    align, ground, instruct, grpo, _ = spec.stages

    assert (align.hyperparameters.learning_rate, align.hyperparameters.image_size) == (1e-5, 768)
    assert (ground.hyperparameters.learning_rate, ground.hyperparameters.image_size) == (8e-6, 1280)
    assert instruct.hyperparameters.learning_rate == 5e-6
    assert (ground.strategy.name, ground.strategy.zero_stage) == ("deepspeed", 2)
    assert (grpo.rl.algorithm.epsilon_low, grpo.rl.algorithm.epsilon_high) == (0.15, 0.25)
    assert spec.stage_node_pool(align).gpus_per_node == 8
    assert spec.storage.secret_ref.name == "s3-credentials"


def test_defaults_follow_the_paper():
    stage = api.Stage.model_validate({"name": "s", "type": "sft", "datasets": [{"name": "d", "uri": "s3://b/d"}]})

    assert stage.hyperparameters.learning_rate == 1e-5
    assert stage.hyperparameters.lr_scheduler == "cosine"
    assert (stage.strategy.name, stage.strategy.zero_stage) == ("deepspeed", 2)
    assert stage.effective_trainable() == ["vision", "projector", "language"]
    assert api.RLAlgorithm().epsilon_high > api.RLAlgorithm().epsilon_low


def test_stage_node_pool_overrides_only_what_it_sets():
    spec = api.parse_training(load_sample("medmo-run.yaml")).spec
    stage = spec.stages[0].model_copy(update={"node_pool": api.NodePool(gpus_per_node=4)})

    pool = spec.stage_node_pool(stage)

    assert pool.gpus_per_node == 4
    assert pool.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pool.tolerations[0].key == "nvidia.com/gpu"


def test_at_least_fifteen_invalid_cases():
    assert len(INVALID_CASES) >= 15


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda case: case.id)
def test_invalid_resource_is_rejected_naming_the_field(case):
    with pytest.raises(ValidationError) as error:
        api.parse_training(case.resource())

    message = api.format_validation_error(error.value)
    assert case.field in message, message


def test_wire_names_are_camel_case():
    training = api.parse_training(load_sample("medmo-tiny.yaml"))

    wire = training.spec.to_wire()

    assert "nodePool" in wire and "runPolicy" in wire
    assert "learningRate" in wire["stages"][0]["hyperparameters"]


# Names as Kubernetes' RFC 1123 label check (k8s.io/apimachinery IsDNS1123Label) judges them.
RFC1123_LABELS = ["a", "0", "a-b", "1st", "x9", "a--b", "a" * 20]
NOT_RFC1123_LABELS = ["", "-a", "a-", "A", "Ab", "a_b", "a.b", "a b", "ä", "a\n"]


@pytest.mark.parametrize("name", RFC1123_LABELS)
def test_stage_benchmark_and_dataset_names_accept_every_rfc1123_label(name):
    api.Stage.model_validate({"name": name, "type": "sft", "datasets": [{"name": name, "uri": "s3://b/d"}]})
    api.Stage.model_validate({"name": "bench", "type": "eval", "benchmarks": [{"name": name, "uri": "s3://b/h"}]})


@pytest.mark.parametrize("name", NOT_RFC1123_LABELS)
def test_stage_benchmark_and_dataset_names_reject_what_kubernetes_rejects(name):
    with pytest.raises(ValidationError, match=r"(?m)^name$"):
        api.Stage.model_validate({"name": name, "type": "sft", "datasets": [{"name": "d", "uri": "s3://b/d"}]})
    with pytest.raises(ValidationError, match=r"(?m)^datasets\.0\.name$"):
        api.Stage.model_validate({"name": "s", "type": "sft", "datasets": [{"name": name, "uri": "s3://b/d"}]})
    with pytest.raises(ValidationError, match=r"(?m)^benchmarks\.0\.name$"):
        api.Stage.model_validate({"name": "bench", "type": "eval", "benchmarks": [{"name": name, "uri": "s3://b/h"}]})


def test_run_name_must_start_with_a_letter_as_its_service_names_must():
    run = load_sample("medmo-tiny.yaml")
    run["metadata"]["name"] = "1st-run"
    with pytest.raises(ValidationError, match="must start with a letter"):
        api.parse_training(run)
