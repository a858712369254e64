"""Argo CD's health check for MedMOTraining (manifests/argocd/health.lua), run by a real Lua
interpreter (Debian's lua5.4; Argo CD runs the same script in gopher-lua, and it uses nothing
gopher-lua lacks) on objects the operator wrote in real runs.

The objects (argocd_statuses.json) were captured by
tests/integration/operator/capture_argocd_statuses.py: the real operator on the test control plane
with the stand-in trainer, one run per scenario (succeeds, recovers after a restart, retries out,
non-retryable exit, deadline, suspended then resumed, unschedulable, queued in Kueue behind another
run), every distinct phase and set of conditions each run passed through. When the operator gains a phase or a condition, the coverage
test below fails until that script is run again and its output committed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from medmo_cases import REPO

from medmo_operator import api

HEALTH_LUA = REPO / "manifests" / "argocd" / "health.lua"
CAPTURED = Path(__file__).with_name("argocd_statuses.json")
NEVER_WRITTEN = {api.Phase.PENDING: "the first reconcile moves a run to Running; before it the object has no status"}
"""Run phases the operator never writes, and why (the captured object with no status stands for them)."""
HEALTH_BY_PHASE = {
    None: "Progressing",
    "Running": "Progressing",
    "Restarting": "Progressing",  # a restart within backoffLimit: the operator recovers by itself
    "Suspended": "Suspended",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
}


def _captured() -> list[dict]:
    return json.loads(CAPTURED.read_text())


def _lua(value) -> str:
    """A Python value from JSON as a Lua table constructor (as Argo CD hands `obj` to the script)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else f"\\u{{{ord(c):x}}}" for c in value)
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(_lua(item) for item in value) + "}"
    return "{" + ", ".join(f"[{_lua(key)}] = {_lua(item)}" for key, item in value.items() if item is not None) + "}"


def _health(obj: dict) -> tuple[str, str]:
    """(status, message) of the health check on `obj`."""
    program = f"obj = {_lua(obj)}\nlocal hs = dofile({_lua(str(HEALTH_LUA))})\nio.write(hs.status, '\\n', hs.message)"
    result = subprocess.run(["lua5.4", "-"], input=program, capture_output=True, text=True, timeout=30, check=True)
    status, message = result.stdout.split("\n", 1)
    return status, message


@pytest.fixture(scope="module", autouse=True)
def _lua_installed():
    assert shutil.which("lua5.4"), "lua5.4 is missing: run scripts/system-deps.sh"


@pytest.mark.parametrize("entry", _captured(), ids=lambda e: f"{e['scenario']}-{(e['object'].get('status') or {}).get('phase')}")
def test_health_of_every_captured_object(entry):
    obj = entry["object"]
    status = obj.get("status") or {}
    phase = status.get("phase")
    health, message = _health(obj)
    true = {c["type"]: c for c in status.get("conditions", []) if c["status"] == "True"}
    if status and phase not in ("Succeeded", "Failed") and status["observedGeneration"] < obj["metadata"]["generation"]:
        # A spec edit (here: suspend turned off) the operator has not acted on yet.
        assert health == "Progressing" and "not yet acted on spec generation" in message
        return
    assert health == HEALTH_BY_PHASE[phase], message
    if phase == "Failed":
        assert message == true["Failed"]["message"]
    elif phase == "Restarting":
        assert message == true["Restarting"]["message"]
    elif any(c["type"] == "Admitted" and c["status"] == "False" for c in status.get("conditions", [])):
        assert message.startswith("queued: stage "), message
    elif "WaitingForResources" in true:
        assert message.startswith("waiting for resources: ") and "nvidia.com/gpu" in message
    elif phase == "Running":
        record = next(r for r in status["stages"] if r["name"] == status["currentStage"])
        if "totalSteps" in record:
            assert message == f"stage {record['name']}: step {record.get('step', 0)} of {record['totalSteps']}"
    elif phase is None:
        assert message == "waiting for the operator"


def test_the_captures_hold_every_phase_and_condition_the_operator_writes():
    captured = [entry["object"].get("status") or {} for entry in _captured()]
    phases = {status.get("phase") for status in captured}
    missing = [p.value for p in api.Phase if p.value not in phases and p not in NEVER_WRITTEN]
    assert not missing, f"no captured object in phase {missing}: run tests/integration/operator/capture_argocd_statuses.py"
    assert {} in captured, "no captured object without status (what Argo CD sees before the first reconcile)"
    held = {c["type"] for status in captured for c in status.get("conditions", []) if c["status"] == "True"}
    missing = [c.value for c in api.ConditionType if c.value not in held]
    assert not missing, f"no captured object with condition {missing} True: run tests/integration/operator/capture_argocd_statuses.py"


def test_the_kustomization_puts_the_script_under_argocds_key_for_the_kind():
    kustomization = yaml.safe_load((HEALTH_LUA.parent / "kustomization.yaml").read_text())
    generator = next(g for g in kustomization["configMapGenerator"] if g["name"] == "argocd-cm")
    assert generator["files"] == [f"resource.customizations.health.{api.GROUP}_{api.KIND}={HEALTH_LUA.name}"]
    assert kustomization["namespace"] == "argocd"
