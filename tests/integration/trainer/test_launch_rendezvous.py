"""A rendezvous that cannot complete fails with a message naming the host, instead of hanging.

Real torchrun (`python -m medmo_trainer.launch`, the trainer image's entrypoint) configured through
the PET_* variables the operator renders into learner pods, with a short rendezvous timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from medmo_cases import load_sample

from medmo_operator import api, render
from medmo_trainer.exit_codes import ExitCode

UNRESOLVABLE = "medmo-gone-ground-0-0.medmo-gone-ground.invalid"  # .invalid never resolves (RFC 6761)
TIMEOUT_S = 5
HANG_GUARD_S = 300


def _launch(tmp_path: Path, **pet: str) -> tuple[subprocess.CompletedProcess, str]:
    """Runs the launcher as a learner pod does (`-m medmo_trainer --config ...`); returns the
    process and the termination message it left."""
    termination_log = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    env.update({f"PET_{k}": v for k, v in pet.items()}, MEDMO_TERMINATION_LOG=str(termination_log))
    result = subprocess.run(
        [sys.executable, "-m", "medmo_trainer.launch", "-m", "medmo_trainer", "--config", str(tmp_path / "stage.yaml")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    return result, termination_log.read_text() if termination_log.exists() else ""


def test_an_unresolvable_rendezvous_host_fails_the_pod_with_a_message_naming_it(tmp_path):
    result, message = _launch(tmp_path, MASTER_ADDR=UNRESOLVABLE, MASTER_PORT="29500", NNODES="2", NODE_RANK="1",
                              NPROC_PER_NODE="1", RDZV_CONF=f"timeout={TIMEOUT_S}")

    assert result.returncode == ExitCode.DISTRIBUTED_FAILURE, result.stderr[-3000:]
    assert f"cannot resolve the rendezvous host {UNRESOLVABLE}" in message, message
    assert f"{TIMEOUT_S} s" in message
    assert message.startswith("DISTRIBUTED_FAILURE (exit 11): rendezvous failed")
    assert f"cannot resolve the rendezvous host {UNRESOLVABLE}" in result.stderr


def test_rank_zero_whose_peers_never_join_fails_with_a_message_naming_its_address(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result, message = _launch(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES="2", NODE_RANK="0",
                              NPROC_PER_NODE="1", RDZV_CONF=f"timeout={TIMEOUT_S}")

    assert result.returncode == ExitCode.DISTRIBUTED_FAILURE, result.stderr[-3000:]
    assert f"rendezvous of 2 node(s) at 127.0.0.1:{port} failed" in message, message
    assert "1/2 clients joined" in message


def test_learner_pods_bound_torchrun_rendezvous_below_its_default():
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import _default_timeout_seconds

    spec = api.parse_training(load_sample("medmo-run.yaml")).spec
    run = render.RunRef(name="medmo-8b", namespace="medmo", uid="uid-1")
    endpoints = render.OperatorEndpoints(progress_url="http://operator:8080", token_key=b"k" * 32)
    job = render.build_learner_job(run, spec, spec.stages[1], 0, endpoints)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}

    timeout = int(dict(item.split("=") for item in env["PET_RDZV_CONF"].split(","))["timeout"])
    assert 0 < timeout < _default_timeout_seconds
