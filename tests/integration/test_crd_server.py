"""The generated CRD on the real API server: samples accepted, the invalid table rejected with the
field named, status kept through the status subresource, edits to started stages refused."""

from __future__ import annotations

import json
import time

import pytest
from medmo_cases import INVALID_CASES, load_sample

from medmo_operator import crd

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def crd_installed(control_plane):
    control_plane.kubectl("apply", "-f", str(crd.CRD_PATH))
    control_plane.wait_established("medmotrainings.medmo.io")
    # Discovery caches refresh asynchronously: wait until kubectl can resolve the short name.
    deadline = time.monotonic() + 30
    while control_plane.kubectl("get", "mmt", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the CRD was never served"
        time.sleep(0.5)
    return control_plane


def _apply(cp, obj, namespace, *extra):
    return cp.kubectl("apply", "-n", namespace, "-f", "-", *extra, check=False, input=json.dumps(obj))


@pytest.mark.parametrize("sample", ["medmo-run.yaml", "medmo-tiny.yaml"])
def test_samples_are_accepted(crd_installed, namespace, sample):
    obj = load_sample(sample)
    obj["metadata"].pop("namespace", None)

    result = _apply(crd_installed, obj, namespace, "--dry-run=server")

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", [c for c in INVALID_CASES if c.server], ids=lambda c: c.id)
def test_invalid_resource_is_rejected_by_the_api_server_naming_the_field(crd_installed, namespace, case):
    obj = case.resource()

    result = _apply(crd_installed, obj, namespace, "--dry-run=server")

    assert result.returncode != 0, f"the API server accepted {case.id}"
    assert case.field in result.stderr, result.stderr


def test_vision_encoders_and_their_groups_are_accepted_but_not_with_vllm_rollouts(crd_installed, namespace):
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"].pop("namespace", None)
    obj["spec"]["model"]["visionEncoders"] = [{"name": "hires", "base": "preset:tiny-siglip", "imageSize": 128}]
    obj["spec"]["stages"][0]["trainable"] = ["projector", "encoder:hires", "projector:hires"]
    result = _apply(crd_installed, obj, namespace, "--dry-run=server")
    assert result.returncode == 0, result.stderr

    grpo = next(stage for stage in obj["spec"]["stages"] if stage["type"] == "rl")
    grpo["rl"]["rollout"].update(backend="vllm", image="ghcr.io/medmo/rollout-vllm:0.1.0")
    result = _apply(crd_installed, obj, namespace, "--dry-run=server")
    assert result.returncode != 0 and "vllm" in result.stderr, result.stderr


def _create_run_with_started_stage(cp, namespace):
    obj = load_sample("medmo-tiny.yaml")
    assert _apply(cp, obj, namespace).returncode == 0
    status = {"status": {"phase": "Running", "currentStage": "align", "currentStep": 3,
                         "stages": [{"name": "align", "phase": "Running", "step": 3}]}}
    cp.kubectl("patch", "mmt", "medmo-tiny", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    return obj


def test_status_survives_and_shows_in_printer_columns(crd_installed, namespace):
    _create_run_with_started_stage(crd_installed, namespace)

    table = crd_installed.kubectl("get", "mmt", "-n", namespace).stdout

    assert table.split("\n")[0].split()[:5] == ["NAME", "PHASE", "STAGE", "STEP", "AGE"]
    assert table.split("\n")[1].split()[:4] == ["medmo-tiny", "Running", "align", "3"]


def test_editing_a_started_stage_is_refused_and_a_pending_one_allowed(crd_installed, namespace):
    obj = _create_run_with_started_stage(crd_installed, namespace)
    current = json.loads(crd_installed.kubectl("get", "mmt", "medmo-tiny", "-n", namespace, "-o", "json").stdout)

    started = json.loads(json.dumps(current))
    started["spec"]["stages"][0]["hyperparameters"]["learningRate"] = 0.5
    refused = crd_installed.kubectl("replace", "-f", "-", check=False, input=json.dumps(started))
    assert refused.returncode != 0
    assert "cannot be changed" in refused.stderr

    pending = json.loads(json.dumps(current))
    pending["spec"]["stages"][1]["hyperparameters"]["learningRate"] = 0.5
    accepted = crd_installed.kubectl("replace", "-f", "-", check=False, input=json.dumps(pending))
    assert accepted.returncode == 0, accepted.stderr
    assert obj["metadata"]["name"] == "medmo-tiny"
