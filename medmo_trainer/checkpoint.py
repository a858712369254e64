"""Checkpoints of a stage: save every N steps, commit atomically, keep the last K, resume exactly.

Layout under the stage's `checkpointUri`:

    step-N/state/...             model, optimizer and schedule (DCP files, or DeepSpeed's own)
    step-N/trainer/rank-R.pt     per-rank RNG states and data-loader position
    step-N/COMMITTED             written last, by rank 0, once every rank has finished writing
    latest                       the name of the newest committed folder (`step-N`), updated after COMMITTED,
                                 for the operator and for people; resume looks for the markers themselves

A folder without COMMITTED is an interrupted save: it is ignored when resuming and replaced or
pruned later, so a crash in the middle of a save leaves the previous checkpoint in use. Every
distributed and rank-0 side effect of checkpointing lives in `CheckpointManager`.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmo_trainer.config import StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.exit_codes import ConfigError, StageError, StorageError
from medmo_trainer.fsio import s3_options, url_to_fs
from medmo_trainer.strategies import TrainingStrategy

COMMIT_MARKER = "COMMITTED"
LATEST_POINTER = "latest"
CRASH_DURING_SAVE_ENV = "MEDMO_TEST_CRASH_DURING_SAVE_AT_STEP"
"""Test hook: when set to N, every rank kills itself after writing step N but before its commit."""

_STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Restored:
    """What a resume hands back to the trainer."""

    step: int
    uri: str
    loader_state: dict[str, Any]


class CheckpointManager:
    """Saves, commits, prunes and restores the checkpoints of one stage."""

    def __init__(self, config: StageConfig, context: DistContext, strategy: TrainingStrategy) -> None:
        self.root = config.checkpoint_uri.rstrip("/")
        self.policy = config.checkpoint
        self.context = context
        self.strategy = strategy
        # DCP and DeepSpeed uploads open their own filesystems from the URI: they get the same options.
        self.options = s3_options() if self.root.startswith(("s3://", "s3a://")) else {}
        self.fs, self.root_path = url_to_fs(self.root)
        self.staging = Path(tempfile.mkdtemp(prefix="medmo-checkpoint-"))
        self.last_committed_uri: str | None = None

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def uri_of(self, step: int) -> str:
        return f"{self.root}/step-{step}"

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a checkpoint is saved after this optimizer step."""
        return step % self.policy.every_steps == 0 or step == total_steps

    def save(self, step: int, loader_state: dict[str, Any]) -> str:
        """Writes the checkpoint of `step` on every rank, then commits it (a collective)."""
        uri = self.uri_of(step)
        try:
            if self.context.is_main and self.fs.exists(self._path(step)):
                self._remove(self._path(step))  # leftover of an interrupted save
            self.context.barrier()
            self.strategy.save_state(f"{uri}/state", self.options, self.staging)
            self._write_trainer_state(step, loader_state)
            self.context.barrier()
            self._crash_if_requested(step)
            if self.context.is_main:
                self._commit(step)
                self._prune()
            self.context.barrier()
        except StageError:
            raise
        except Exception as error:
            raise StorageError(f"saving checkpoint {uri} failed: {error}") from error
        self.last_committed_uri = uri
        return uri

    def restore(self) -> Restored | None:
        """Loads the newest committed checkpoint into the strategy and RNGs; None when there is none."""
        try:
            step = self.latest_committed_step()
            if step is None:
                return None
            uri = self.uri_of(step)
            self.strategy.load_state(f"{uri}/state", self.options, self.staging)
            trainer_state = self._read_trainer_state(step)
        except StageError:
            raise
        except Exception as error:
            raise StorageError(f"resuming from {self.root} failed: {error}") from error
        _set_rng_states(trainer_state["rng"])
        self.last_committed_uri = uri
        return Restored(step=step, uri=uri, loader_state=trainer_state["loader"])

    def latest_committed_step(self) -> int | None:
        """The newest step whose folder holds the commit marker.

        The folders, not the `latest` pointer, decide: a crash between writing a marker and moving
        the pointer must not send a resume back to an older checkpoint."""
        return next((step for step in reversed(self._steps_present()) if self._is_committed(step)), None)

    def _path(self, step: int) -> str:
        return f"{self.root_path}/step-{step}"

    def _is_committed(self, step: int) -> bool:
        return self.fs.exists(f"{self._path(step)}/{COMMIT_MARKER}")

    def _steps_present(self) -> list[int]:
        if not self.fs.exists(self.root_path):
            return []
        self.fs.invalidate_cache(self.root_path)
        names = (Path(p.rstrip("/")).name for p in self.fs.ls(self.root_path, detail=False))
        return sorted(int(m.group(1)) for m in map(_STEP_FOLDER.match, names) if m)

    def _write_trainer_state(self, step: int, loader_state: dict[str, Any]) -> None:
        state = {"step": step, "world_size": self.context.world_size, "rng": _rng_states(), "loader": loader_state}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write(f"{self._path(step)}/trainer/rank-{self.context.rank}.pt", buffer.getvalue())

    def _read_trainer_state(self, step: int) -> dict[str, Any]:
        path = f"{self._path(step)}/trainer/rank-{self.context.rank}.pt"
        if not self.fs.exists(path):
            raise ConfigError(
                f"checkpoint {self.uri_of(step)} has no state for rank {self.context.rank}: it was written by "
                f"fewer ranks than the {self.context.world_size} of this run; resume with the same number of nodes"
            )
        state = torch.load(io.BytesIO(self.fs.cat_file(path)), weights_only=False)
        if state["world_size"] != self.context.world_size:
            raise ConfigError(
                f"checkpoint {self.uri_of(step)} was written by {state['world_size']} ranks, this run has "
                f"{self.context.world_size}; resume with the same number of nodes and GPUs per node"
            )
        return state

    def _commit(self, step: int) -> None:
        marker = {"step": step, "worldSize": self.context.world_size, "committedAt": time.time()}
        self._write(f"{self._path(step)}/{COMMIT_MARKER}", json.dumps(marker).encode())
        self._write(f"{self.root_path}/{LATEST_POINTER}", f"step-{step}".encode())

    def _write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local filesystems need the folder
        self.fs.pipe_file(path, data)

    def _prune(self) -> None:
        """Keeps the newest `keepLast` committed checkpoints and deletes everything older."""
        steps = self._steps_present()
        committed = [s for s in steps if self._is_committed(s)]
        if len(committed) <= self.policy.keep_last:
            return
        oldest_kept = committed[-self.policy.keep_last]
        for step in steps:
            if step < oldest_kept:
                self._remove(self._path(step))

    def _remove(self, path: str) -> None:
        """Deletes a folder; depth first, since some S3 servers (SeaweedFS) keep emptied folders as entries."""
        self.fs.invalidate_cache(path)
        for entry in self.fs.ls(path, detail=True):
            if entry["type"] == "directory":
                self._remove(entry["name"])
        self.fs.rm(path, recursive=True)
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root_path)

    def _crash_if_requested(self, step: int) -> None:
        if os.environ.get(CRASH_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
