"""The README's Quickstart, literally: a fresh clone runs its first command exactly as written.

The command is read from the README's Quickstart code block, so the test follows the README. It runs
from a plain `git clone` of HEAD with the default (relative) work directory, as a new user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from medmo_cases import REPO, clone_head, load_sample
from PIL import Image

DEMO_STORAGE = Path(urlparse(load_sample("medmo-tiny.yaml")["spec"]["storage"]["uri"]).path)
"""Where the README's demo keeps checkpoints and models (the sample's file:// storage)."""
# Max - min of each held-out metric over GRPO seeds 0, 1 and 2 from the demo's SFT model (2026-12-03,
# the GRPO stage alone, its other settings as in the sample): what "no worse, within seed noise" allows.
GRPO_SEED_SPREAD = {"vqaClosedAcc": 0.084, "vqaOpenAcc": 0.084, "reportF1": 0.013, "reportRougeL": 0.023,
                    "captionRougeL": 0.004}
RUN_TIMEOUT_S = 3600  # a guard against a hang: about 5 minutes on 2 idle cores, 40+ on a crowded machine
STOP_GRACE_S = 120


def quickstart_command() -> str:
    """The first command of the README's Quickstart (its first `sh` code block)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md: the Quickstart section has no ```sh code block"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f"README.md: the Quickstart's first code block should hold one command, not {lines}"
    return lines[0]


def _users_environment() -> dict[str, str]:
    """This environment without what the test runner adds (this checkout's virtualenv on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(REPO))
    return env


def _run_as_a_user(command: str, clone: Path, storage: Path) -> subprocess.CompletedProcess:
    """Runs `command` in a shell from the clone, with the demo's storage folder its own.

    The sample's storage (file:///tmp/medmo/runs/medmo-tiny) is one folder per machine, shared by
    every clone. In a private mount namespace a fresh folder is bound over it, as on a fresh machine,
    so neither a user's earlier demo nor another test's run is read or overwritten. Everything else
    (/tmp included, where pod address ranges are claimed) stays the machine's.
    """
    isolated = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && exec sh -c "$3"', "quickstart", str(storage), str(DEMO_STORAGE), command]
    process = subprocess.Popen(isolated, cwd=clone, env=_users_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Ctrl-C, as a user would press it: every process of the run stops; then make sure.
        os.killpg(process.pid, signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"{command!r} did not finish in {RUN_TIMEOUT_S} s; its output:\n{output[-6000:]}")
    return subprocess.CompletedProcess(isolated, process.returncode, output, "")


def _printed_resource(output: str) -> dict:
    """The final resource as the command prints it (`kubectl get mmt -o yaml` style)."""
    start = output.index("apiVersion: medmo.io/")
    end = output.index("\neval metrics of stage ", start)
    return yaml.safe_load(output[start:end])


def _printed_eval_metrics(output: str) -> dict[str, dict[str, float]]:
    """`eval metrics of stage NAME:` followed by indented `key value` lines, per stage."""
    metrics: dict[str, dict[str, float]] = {}
    for stage, body in re.findall(r"^eval metrics of stage (\S+):\n((?:  \S+ +\S+\n)+)", output, re.M):
        metrics[stage] = {key: float(value) for key, value in (line.split() for line in body.splitlines())}
    return metrics


@pytest.fixture
def scratch():
    """A fresh folder readable by the pods' non-root user (outside /tmp, whose per-user folders
    pytest makes private); removed afterwards, with the empty mount point made for the demo's
    storage if there was none."""
    base = Path(tempfile.mkdtemp(prefix="medmo-readme-", dir="/var/tmp"))
    base.chmod(0o755)
    made = [p for p in (DEMO_STORAGE, *DEMO_STORAGE.parents) if not p.exists()]
    DEMO_STORAGE.mkdir(parents=True, exist_ok=True)
    yield base
    shutil.rmtree(base, ignore_errors=True)
    for folder in made:  # deepest first; one a real run has filled since is kept
        with contextlib.suppress(OSError):
            folder.rmdir()


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 600)
def test_the_readme_quickstart_command_succeeds_from_a_fresh_clone_and_again_prints_the_finished_run(scratch):
    command = quickstart_command()
    clone = clone_head(scratch / "clone")
    storage = scratch / "storage"
    storage.mkdir()

    first = _run_as_a_user(command, clone, storage)

    assert first.returncode == 0, first.stdout[-8000:]
    resource = _printed_resource(first.stdout)
    status = resource["status"]
    assert status["phase"] == "Succeeded", status
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * len(resource["spec"]["stages"])
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in status["conditions"])
    metrics = _printed_eval_metrics(first.stdout)
    eval_stages = [s["name"] for s in resource["spec"]["stages"] if s["type"] == "eval"]
    assert eval_stages and sorted(metrics) == sorted(eval_stages), first.stdout[-3000:]
    for stage in eval_stages:
        recorded = next(s["metrics"] for s in status["stages"] if s["name"] == stage)
        assert metrics[stage] and metrics[stage] == {k: round(v, 4) for k, v in recorded.items()}
        iou = [v for k, v in metrics[stage].items() if k.endswith("groundingMiou")]
        assert iou and all(0 <= v <= 1 for v in iou), metrics[stage]
    # The README says where the report is, relative to the folder the command ran in.
    report = Path(first.stdout.split("report: ", 1)[1].split()[0])
    assert (clone / report).resolve() == (clone / ".medmo/medmo-tiny/report/report.md").resolve()
    assert "groundingMiou" in (clone / report).read_text() and "](boxes.png)" in (clone / report).read_text()
    for plot in ("loss.png", "rewards.png", "grounding_iou.png", "boxes.png"):
        image = Image.open(clone / report.parent / plot).convert("L")
        assert image.size[0] >= 400 and len(set(image.getdata())) > 2, plot
    # Every held-out answer of every model the eval stage scored, beside its metrics.
    for stage in eval_stages:
        document = json.loads((storage / stage / "metrics.json").read_text())
        assert len(document["models"]) == 2  # after RL, and before it
        for model in document["models"]:
            lines = (storage / stage / "predictions" / f"{model['name']}.jsonl").read_text().splitlines()
            assert len(lines) == sum(counts["samples"] for counts in model["counts"].values())
            assert {"id", "prompt", "reference", "generated", "parsed", "scores"} <= json.loads(lines[0]).keys()
    # What the README says the demo shows: the SFT model places boxes (IoU and Acc@0.5 >= 0.3), and
    # GRPO raises both over it.
    bench = status["stages"][-1]["metrics"]
    for metric in ("groundingMiou", "groundingAcc50"):
        assert bench[f"instruct/heldout/{metric}"] >= 0.3, bench
        assert bench[f"heldout/{metric}"] > bench[f"instruct/heldout/{metric}"], bench
    # ... and both models answer yes/no and counting questions from the scan, not by the majority
    # answer (about 0.55 on these questions), before and after RL.
    for model in ("", "instruct/"):
        assert bench[f"{model}heldout/vqaClosedAcc"] >= 0.8, bench
    # RL keeps what SFT taught: every other held-out skill after GRPO is no worse than after SFT by more
    # than GRPO's own seed-to-seed spread (README's demo section).
    for metric, spread in GRPO_SEED_SPREAD.items():
        assert bench[f"heldout/{metric}"] >= bench[f"instruct/heldout/{metric}"] - spread, (metric, bench)
    # Both models write answers the scorer reads: boxes digit by digit, a word for a question.
    counts = status["stages"][-1]["counters"]
    for model in ("", "instruct/"):
        assert counts[f"{model}heldout/unparseable"] < 0.05 * counts[f"{model}heldout/samples"], counts

    again = _run_as_a_user(command, clone, storage)

    assert again.returncode == 0, again.stdout[-8000:]
    assert _printed_resource(again.stdout)["status"] == status, "the second run changed the finished run"
    assert _printed_eval_metrics(again.stdout) == metrics
    assert not re.search(r"\[[#-]{24}\]", again.stdout), f"the finished run trained again:\n{again.stdout[-3000:]}"
    assert "resuming" not in again.stdout
