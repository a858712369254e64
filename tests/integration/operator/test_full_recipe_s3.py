"""The whole recipe through the operator, as a user runs it on a cluster: the tiny sample with S3
storage (SeaweedFS, credentials in a Secret), `kubectl apply -f`, `kubectl wait`, the real trainer
in every pod (learners, RL rollout and reward workers, eval), then the final model downloaded from
S3 and used with stock transformers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
import yaml
from medmo_cases import load_sample, progress_lines, shrink_stages
from PIL import Image, ImageDraw

from medmo_operator import render

pytestmark = [pytest.mark.slow, pytest.mark.controlplane, pytest.mark.s3]

RUN = "medmo-tiny"
SECRET = "s3-credentials"
STEPS = 2
EVAL_SAMPLES = 8
"""One generated batch per evaluated model."""
RUN_TIMEOUT_S = 1500

# What a user runs after `pip install transformers torchvision`: the model card's snippet.
USER_SCRIPT = """
import json
import sys
from transformers import AutoModelForImageTextToText, AutoProcessor
model_dir, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(model_dir)
processor = AutoProcessor.from_pretrained(model_dir)
messages = [{"role": "user", "content": [
    {"type": "image", "image": image},
    {"type": "text", "text": "Locate the nodule in this scan."},
]}]
inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print("ANSWER:" + json.dumps(answer))
"""


def _kubectl_wait_succeeded(cp, namespace: str) -> bool:
    """`kubectl wait --for=condition=Succeeded`, given up as soon as the run has failed (it cannot
    succeed then)."""
    wait = subprocess.Popen([str(cp.bin_dir / "kubectl"), f"--kubeconfig={cp.kubeconfig}", "wait", "-n", namespace,
                             "--for=condition=Succeeded", f"--timeout={RUN_TIMEOUT_S}s", f"mmt/{RUN}"])
    try:
        while wait.poll() is None:
            phase = cp.kubectl("get", "mmt", RUN, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout
            if phase == "Failed":
                return False
            time.sleep(5)
    finally:
        if wait.poll() is None:
            wait.kill()
        wait.wait()
    return wait.returncode == 0


def _recipe_on_s3(storage: str, s3_server) -> dict:
    """manifests/samples/medmo-tiny.yaml with S3 storage and the fewest steps and records that
    still run every stage type for real."""
    obj = load_sample("medmo-tiny.yaml")
    spec = obj["spec"]
    spec["storage"] = {"uri": storage, "secretRef": {"name": SECRET},
                       "endpoint": s3_server.endpoint, "region": s3_server.region}
    shrink_stages(spec, STEPS, EVAL_SAMPLES)
    return obj


def _json(cp, *args: str) -> dict:
    return json.loads(cp.kubectl(*args, "-o", "json").stdout)


def _pod_logs(node_agent, namespace: str) -> dict[str, str]:
    """Every container log of every pod the node agent ran in `namespace` (deleted pods included),
    keyed by `<pod>/<container>`."""
    logs = {}
    for pod_dir in sorted((node_agent.workdir / "pods").glob(f"{namespace}_*")):
        pod = pod_dir.name.removeprefix(f"{namespace}_").rsplit("_", 1)[0]
        for log in sorted((pod_dir / "logs").glob("*.log")):
            logs[f"{pod}/{log.stem}"] = log.read_text(errors="replace")
    return logs


def _one(logs: dict[str, str], prefix: str) -> str:
    matching = [text for name, text in logs.items() if name.startswith(prefix)]
    assert len(matching) == 1, f"expected one log starting {prefix!r}, got {sorted(n for n in logs if n.startswith(prefix))}"
    return matching[0]


@pytest.mark.timeout(RUN_TIMEOUT_S + 900)
def test_the_tiny_recipe_on_s3_through_the_operator_yields_a_model_stock_transformers_loads(
        control_plane, operator, node_agent, namespace, s3_server, s3_bucket, tmp_path):
    storage = f"{s3_bucket}/runs/{RUN}"
    manifest = tmp_path / "medmo-tiny-s3.yaml"
    manifest.write_text(yaml.safe_dump(_recipe_on_s3(storage, s3_server), sort_keys=False))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
              "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))

    control_plane.kubectl("apply", "-n", namespace, "-f", str(manifest))
    succeeded = _kubectl_wait_succeeded(control_plane, namespace)
    run = _json(control_plane, "get", "mmt", RUN, "-n", namespace)
    status = run.get("status", {})
    assert succeeded, f"status: {json.dumps(status, indent=1)}\noperator log: {operator.log.read_text()[-4000:]}"

    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ["align", "ground", "instruct", "grpo", "bench"]
    assert all(s["phase"] == "Succeeded" for s in stages.values()), stages
    assert all(stages[name]["step"] == STEPS for name in ("align", "ground", "instruct", "grpo")), stages
    assert status["outputModel"] == f"{storage}/grpo/model"

    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    # The eval stage's scores, as it wrote them to storage, are what status shows.
    written = json.loads(fs.cat_file(f"{storage}/bench/metrics.json"))
    bench = stages["bench"]
    assert written["metrics"] and bench["metrics"] == pytest.approx(written["metrics"]), bench
    assert bench["counters"] == written["counters"], bench
    assert 0 <= bench["metrics"]["heldout/groundingMiou"] <= 1
    assert bench["counters"]["heldout/samples"] == EVAL_SAMPLES

    # The learner reached its workers by their Services' names, and both sides logged the traffic.
    grpo_config = yaml.safe_load(_json(control_plane, "get", "configmap", f"{RUN}-grpo-config", "-n", namespace)
                                 ["data"][render.CONFIG_FILE])
    rollout_service, reward_service = f"{RUN}-grpo-rollout", f"{RUN}-grpo-reward"
    assert grpo_config["rl"]["rolloutUrls"] == [f"http://{rollout_service}:{render.WORKER_PORT}"]
    assert grpo_config["rl"]["rewardUrls"] == [f"http://{reward_service}:{render.WORKER_PORT}"]
    logs = _pod_logs(node_agent, namespace)
    learner_steps = [p for p in progress_lines(_one(logs, f"{RUN}-grpo-0-")) if p["phase"] == "Running"]
    assert [p["step"] for p in learner_steps] == list(range(1, STEPS + 1))
    for report in learner_steps:
        assert report["metrics"]["completionLength"] > 0 and "reward/bbox" in report["metrics"], report
    rollout_log, reward_log = _one(logs, f"{rollout_service}-"), _one(logs, f"{reward_service}-")
    assert len(re.findall(r"generate: \d+ prompts", rollout_log)) >= STEPS, rollout_log[-3000:]
    assert len(re.findall(r"score: \d+ completions", reward_log)) >= STEPS, reward_log[-3000:]
    # The rollout worker read each policy version from the run's storage with the Secret's credentials.
    assert f"loaded policy version {STEPS - 1} from {storage}/grpo/policy/" in rollout_log, rollout_log[-3000:]

    # The credentials reached the pods only through secretKeyRef: no trace in what the run shows.
    shown = {
        "the run": json.dumps(run),
        "events": json.dumps(_json(control_plane, "get", "events", "-n", namespace)),
        "configmaps": json.dumps(_json(control_plane, "get", "configmaps", "-n", namespace)),
        "jobs, deployments and pods": json.dumps(_json(control_plane, "get", "jobs,deployments,pods", "-n", namespace)),
        "operator log": operator.log.read_text(errors="replace"),
        **{f"pod log {name}": text for name, text in logs.items()},
    }
    for credential in (s3_server.access_key, s3_server.secret_key):
        leaks = [where for where, text in shown.items() if credential in text]
        assert not leaks, f"a storage credential appears in: {leaks}"

    # A user downloads the final model and uses it with stock transformers in a fresh process.
    model_dir = tmp_path / "downloaded-model"
    fs.get(status["outputModel"].removeprefix("s3://").rstrip("/") + "/", str(model_dir), recursive=True)
    image = tmp_path / "scan.png"
    _scan_like_image(image)
    used = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(model_dir), str(image)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert used.returncode == 0, used.stderr[-4000:]
    answer = json.loads(used.stdout.split("ANSWER:", 1)[1])
    assert answer.strip(), f"the model generated no text: {used.stdout[-2000:]}"


def _scan_like_image(path: Path) -> None:
    """A grey 64-pixel scan with one bright round finding."""
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(image).ellipse((20, 24, 34, 38), fill=(220, 220, 220))
    image.save(path)
