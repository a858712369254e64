"""`medmo run`: the recipe on one machine, as a newcomer runs it from the README."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from medmo_cases import load_sample

MEDMO = [sys.executable, "-m", "medmo_operator.cli"]


def _two_stage(storage: Path, sft_steps: int = 40) -> dict:
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"]["name"] = "resumable"
    obj["spec"]["storage"]["uri"] = f"file://{storage}"
    align, ground = obj["spec"]["stages"][:2]
    align["hyperparameters"]["maxSteps"] = 4
    align["checkpoint"] = {"everySteps": 2}
    ground["hyperparameters"]["maxSteps"] = sft_steps
    ground["checkpoint"] = {"everySteps": 5, "keepLast": 2}
    obj["spec"]["stages"] = [align, ground]
    return obj


def _status(workdir: Path, name: str) -> dict:
    path = workdir / name / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_wrong_field_is_named_and_nothing_starts(tmp_path):
    obj = load_sample("medmo-tiny.yaml")
    obj["spec"]["stages"][1]["hyperparameters"]["learningrate"] = 0.1
    obj["spec"]["stages"][2]["strategy"]["name"] = "megatron"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(obj))

    result = subprocess.run([*MEDMO, "run", str(tmp_path / "bad.yaml"), "--workdir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "spec.stages.1.hyperparameters.learningrate" in result.stderr
    assert "spec.stages.2.strategy.name" in result.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
def test_ctrl_c_during_sft_then_the_same_command_resumes_from_the_checkpoint(tmp_path):
    spec_file, workdir = tmp_path / "run.yaml", tmp_path / "state"
    spec_file.write_text(yaml.safe_dump(_two_stage(tmp_path / "storage")))
    command = [*MEDMO, "run", str(spec_file), "--workdir", str(workdir)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)

    def sft_checkpointed():
        record = next((s for s in _status(workdir, "resumable").get("stages", []) if s["name"] == "ground"), {})
        return record.get("lastCheckpoint") and record.get("step", 0) >= 12 and record

    deadline = time.monotonic() + 600
    while not sft_checkpointed():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the SFT stage never reached a checkpoint"
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0]
    interrupted = _status(workdir, "resumable")

    assert first.returncode == 130, output
    assert "run the same command again to resume" in output
    assert not _trainer_processes(workdir), "Ctrl-C left trainer processes running"
    checkpoint = next(s for s in interrupted["stages"] if s["name"] == "ground")["lastCheckpoint"]

    second = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming resumable at stage ground" in second.stdout
    resumed = second.stdout.split("[Resumed] from ")[1].split("\n")[0]
    resumed_step = int(resumed.rsplit("at step ", 1)[1])
    assert resumed_step >= int(checkpoint.rsplit("step-", 1)[1]) > 0, resumed
    final = _status(workdir, "resumable")
    assert final["phase"] == "Succeeded"
    assert [s["phase"] for s in final["stages"]] == ["Succeeded", "Succeeded"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_every_pod_as_ctrl_c_does(tmp_path, signum):
    """`kill`, a CI timeout or a closed terminal stops the run's pods; none is left training."""
    name = f"stop-{signum.name.lower()}-{uuid.uuid4().hex[:6]}"
    obj = load_sample("medmo-tiny.yaml")
    obj["metadata"]["name"] = name
    obj["spec"]["storage"]["uri"] = f"file://{tmp_path / 'storage'}"
    align = obj["spec"]["stages"][0]
    align["hyperparameters"]["maxSteps"] = 100_000  # it never finishes by itself: only the signal ends it
    obj["spec"]["stages"] = [align]
    spec_file, workdir = tmp_path / "run.yaml", tmp_path / "state"
    spec_file.write_text(yaml.safe_dump(obj))
    # Every container of the run has the run's progress URL in its environment, and nothing else does.
    marker = f"/medmotrainings/{name}/progress".encode()
    run = subprocess.Popen([*MEDMO, "run", str(spec_file), "--workdir", str(workdir)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not _training_step(workdir, name):
            assert run.poll() is None, run.stdout.read()
            assert time.monotonic() < deadline, "the run's first pod never reported a step"
            time.sleep(0.2)
        assert _processes_with(marker), "the training pod's processes are not where this test looks"

        run.send_signal(signum)
        output = run.communicate(timeout=120)[0]

        assert run.returncode == 128 + signum, output
        assert f"interrupted ({signum.name})" in output and "run the same command again to resume" in output
        assert not _processes_with(marker), f"{signum.name} left processes of the run behind"
        assert _status(workdir, name)["phase"] == "Running"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _training_step(workdir: Path, name: str) -> int:
    return max((stage.get("step", 0) for stage in _status(workdir, name).get("stages", [])), default=0)


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _trainer_processes(workdir: Path) -> list[int]:
    return [pid for pid in _processes_with(str(workdir).encode()) if pid != os.getpid()]
