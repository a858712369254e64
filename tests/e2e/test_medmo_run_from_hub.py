"""`medmo run` with a hub model: the same plan as the operator runs the model initializer first, on this
machine, and the stage loads the copy in the run's storage. The hub is a stand-in (tests/hub_standin.py,
the `hub` fixture): no hub is reachable from this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from hub_standin import HUB_GATED_MODEL
from medmo_cases import load_sample

pytestmark = [pytest.mark.slow]


def test_medmo_run_fetches_a_gated_hub_model_once_with_the_shells_token_and_trains_from_the_copy(hub, tmp_path):
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"]["name"] = "from-hub"
    spec = obj["spec"]
    storage = tmp_path / "storage"
    spec["storage"]["uri"] = f"file://{storage}"
    spec["model"] = {"base": HUB_GATED_MODEL, "tokenSecretRef": {"name": "hf-token"}, "hubEndpoint": hub.endpoint}
    align = spec["stages"][0]
    align["datasets"][0]["uri"] = "synthetic://train?n=16&seed=1"
    align["hyperparameters"].update(maxSteps=2, perDeviceBatchSize=2)
    align["checkpoint"] = {"everySteps": 2}
    spec["stages"] = [align]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(obj))
    before = len(hub.requests())

    result = subprocess.run([sys.executable, "-m", "medmo_operator.cli", "run", str(tmp_path / "run.yaml"), "--workdir",
                             str(tmp_path / "state")], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env={**os.environ, "HF_TOKEN": hub.token})

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = json.loads((tmp_path / "state" / "from-hub" / "status.json").read_text())
    assert [(i["name"], i["phase"]) for i in status["initializers"]] == [("model-initializer", "Succeeded")]
    assert [(s["name"], s["phase"], s["step"]) for s in status["stages"]] == [("align", "Succeeded", 2)]
    assert (storage / "base_model" / "config.json").read_bytes() == (hub.root / HUB_GATED_MODEL / "config.json").read_bytes()
    assert "[ModelInitialized]" in result.stdout
    asked = [r for r in hub.requests()[before:] if HUB_GATED_MODEL in r["path"]]  # huggingface_hub asks for more
    assert [r["path"] for r in asked if r["path"].startswith("/api/") and "/revision/" in r["path"]] == [
        f"/api/models/{HUB_GATED_MODEL}/revision/main"]
    assert {r["token"] for r in asked} == {"right"}  # the stage's pod, without the token, never asked for the model
    shown = result.stdout + result.stderr + json.dumps(status)
    shown += "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*.log"))
    assert hub.token not in shown
