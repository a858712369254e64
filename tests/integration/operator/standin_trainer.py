"""A stand-in for the trainer image, for operator tests where training itself is not the subject.

It behaves as the trainer does towards the operator: reads the stage config, resumes from the last
committed checkpoint under `checkpointUri` (file:// only), reports progress to the operator with
the run's token, commits a checkpoint every `checkpoint.everySteps`, writes an export marker at the
end, and exits 0; or fails with a chosen exit code. Knobs come from the first dataset's URI query,
e.g. `standin://x?stepSeconds=0.2&exitCode=3&failAtStep=4&failOnAttempt=0`.

SIGUSR1 makes it finish at its next step as if that were its last, with the trainer's success
termination message plus the time it exited (epoch seconds): the operator benchmark's way to end
many runs at once and time how soon the operator notices.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

from medmo_trainer.progress import LOSS, Progress, success_message


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def main(argv: list[str]) -> int:
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    knobs = {k: v[0] for k, v in parse_qs(urlparse((config.get("datasets") or [{"uri": ""}])[0]["uri"]).query).items()}
    steps = int(config["hyperparameters"].get("maxSteps") or 10)
    every = int(config["checkpoint"]["everySteps"])
    step_seconds = float(knobs.get("stepSeconds", "0.1"))
    attempt = int(os.environ.get("MEDMO_ATTEMPT", "0"))
    rank = int(os.environ.get("PET_NODE_RANK", "0"))
    checkpoints = _path(config["checkpointUri"])
    latest = checkpoints / "latest"
    start = int(latest.read_text()) if latest.exists() else 0
    print(f"stand-in {config['stage']} rank {rank} attempt {attempt}: resuming from step {start}", flush=True)
    told_to_finish: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: told_to_finish.append(signum))
    for step in range(start + 1, steps + 1):
        time.sleep(step_seconds)
        fails_now = "exitCode" in knobs and step == int(knobs.get("failAtStep", "1"))
        if fails_now and attempt in {int(a) for a in knobs.get("failOnAttempt", "0").split(",")}:
            print(f"stand-in failing at step {step} with exit code {knobs['exitCode']}", flush=True)
            return int(knobs["exitCode"])
        if rank == 0 and step % every == 0:
            (checkpoints / f"step-{step}").mkdir(parents=True, exist_ok=True)
            latest.write_text(str(step))
        if rank == 0:
            _report(config, step, steps, f"{config['checkpointUri']}/step-{int(latest.read_text())}" if latest.exists() else None)
        if told_to_finish:
            steps = step
            break
    if rank == 0 and config["type"] != "eval":
        out = _path(config["outputUri"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"stage": config["stage"], "from": config["model"]["base"]}))
    print(f"stand-in {config['stage']} done at step {steps}", flush=True)
    if told_to_finish:
        with open(os.environ.get("MEDMO_TERMINATION_LOG", "/dev/termination-log"), "w") as log:
            log.write(success_message(steps, f"stand-in told to finish; exited at {time.time()!r}", config["outputUri"]))
    return 0


def _report(config: dict, step: int, total: int, checkpoint: str | None) -> None:
    url = os.environ.get("MEDMO_PROGRESS_URL")
    if not url:
        return
    token = Path(os.environ["MEDMO_PROGRESS_TOKEN_FILE"]).read_text().strip()
    body = Progress(run=config["run"], stage=config["stage"], step=step, total_steps=total, last_checkpoint=checkpoint,
                    metrics={LOSS: 1.0 / step}).to_json()
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        urllib.request.urlopen(request, timeout=2).close()
    except OSError as error:  # the operator may be restarting: progress is best effort, as in the trainer
        print(f"progress report failed: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
