"""Helpers of the training-loop tests: stage configs, and stages run as real torchrun processes.

Every run is `python -m medmo_trainer.launch --nproc-per-node 2 -m medmo_trainer --config <file>`
(torchrun's launcher, 2 ranks on gloo), exactly what a training pod runs, with the tiny Qwen3-VL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medmo_trainer.progress import LOG_PREFIX

RUN_TIMEOUT_S = 300


def stage_config(tmp: Path, data: str, *, checkpoint_uri: str | None = None, output_uri: str | None = None,
                 strategy: dict | None = None, steps: int = 12, every_steps: int = 100, **overrides) -> dict:
    """A small sft stage config (camelCase wire form); `overrides` replace top-level keys."""
    config = {
        "run": "loop-test",
        "stage": "sft",
        "type": "sft",
        "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": str(tmp)},
        "outputUri": output_uri or str(tmp / "model"),
        "checkpointUri": checkpoint_uri or str(tmp / "checkpoints"),
        "datasets": [{"name": "synthetic", "uri": data}],
        "hyperparameters": {
            "learningRate": 2e-3, "maxSteps": steps, "warmupRatio": 0.1, "perDeviceBatchSize": 4,
            "imageSize": 64, "maxSeqLength": 256,
        },
        "strategy": strategy or {"name": "ddp"},
        "checkpoint": {"everySteps": every_steps, "keepLast": 2},
    }
    config.update(overrides)
    return config


@dataclass
class StageRun:
    """What a finished (or killed) torchrun stage left behind."""

    returncode: int
    output: str
    termination_message: str
    reports: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> dict[int, float]:
        """Loss of each optimizer step, from the per-step progress lines of rank 0."""
        return {r["step"]: r["metrics"]["loss"] for r in self.reports if r["phase"] == "Running"}

    @property
    def final(self) -> dict:
        return self.reports[-1]


def _command(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "medmo_trainer.launch", "--nproc-per-node", "2",
            "-m", "medmo_trainer", "--config", str(config_file)]


def _environment(tmp: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MEDMO_", "OTEL_"))}
    env.update({"MEDMO_TERMINATION_LOG": str(tmp / "termination-log"), "OMP_NUM_THREADS": "1"})
    for key in ("MEDMO_CACHE", "MEDMO_PROGRESS_TOKEN_FILE"):  # a shared cache; the run's token (RL workers need it)
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def _reports(output: str) -> list[dict]:
    return [json.loads(line.removeprefix(LOG_PREFIX)) for line in output.splitlines() if line.startswith(LOG_PREFIX)]


def run_stage(tmp: Path, config: dict, env: dict[str, str] | None = None, kill_after_step: int | None = None,
              name: str = "stage", kill_when: Callable[[list[str]], bool] | None = None,
              terminate_when: Callable[[list[str]], bool] | None = None) -> StageRun:
    """Runs a stage with 2 ranks; with `kill_after_step`, SIGKILLs the whole torchrun process group as
    soon as rank 0 reports that step (a node lost mid-run); with `kill_when`, as soon as it holds of the
    output lines so far. `terminate_when` SIGTERMs the launcher once when it holds, as the kubelet stops
    a pod (torchrun passes the signal on to its workers)."""
    config_file = tmp / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    termination_log = tmp / "termination-log"
    termination_log.unlink(missing_ok=True)
    process = subprocess.Popen(_command(config_file), env=_environment(tmp, env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    terminated = False
    try:
        for line in process.stdout:
            lines.append(line)
            if kill_after_step is not None and line.startswith(LOG_PREFIX):
                report = json.loads(line.removeprefix(LOG_PREFIX))
                if report["phase"] == "Running" and report["step"] >= kill_after_step:
                    kill_tree(process.pid)
            if kill_when is not None and kill_when(lines):
                kill_tree(process.pid)
            if terminate_when is not None and not terminated and terminate_when(lines):
                process.send_signal(signal.SIGTERM)
                terminated = True
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
    output = "".join(lines)
    message = termination_log.read_text().strip() if termination_log.exists() else ""
    return StageRun(process.returncode, output, message, _reports(output))


def kill_tree(root: int) -> None:
    """SIGKILLs a process and all its descendants, as a node loss would (torchrun starts its workers
    in their own sessions, so killing the launcher's process group alone would leave them running)."""
    victims = [root]
    for pid in victims:  # grows while walking: children of children
        victims.extend(child for child, parent in _parents().items() if parent == pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parents() -> dict[int, int]:
    """Parent pid of every process on this machine, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def assert_succeeded(run: StageRun) -> None:
    assert run.returncode == 0, f"stage failed ({run.returncode}): {run.termination_message}\n{run.output[-4000:]}"


class ProgressSink:
    """A real HTTP server on loopback that records the progress reports POSTed to it."""

    def __init__(self, port: int = 0) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers.get("Authorization"), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/progress"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ProgressSink:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (a progress endpoint that is down)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/progress"
