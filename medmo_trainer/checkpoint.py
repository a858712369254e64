"""Checkpoints of a stage: save every N steps, commit atomically, keep the last K, resume exactly.

Layout under the stage's `checkpointUri`:

    step-N/state/...             model, optimizer and schedule (DCP files, or DeepSpeed's own)
    step-N/trainer/rank-R.pt     per-rank RNG states and data-loader position
    step-N/COMMITTED             written last, by rank 0, once every rank has finished writing: JSON with
                                 the step, the world size, the run's uid, a hash of each part of the stage
                                 config that shapes training, and the name and shape of every trained tensor
    latest                       the name of the newest committed folder (`step-N`), updated after COMMITTED,
                                 for the operator and for people; resume looks for the markers themselves

A folder without COMMITTED is an interrupted save: it is ignored when resuming and replaced or
pruned later, so a crash in the middle of a save leaves the previous checkpoint in use. Every
distributed and rank-0 side effect of checkpointing lives in `CheckpointManager`.

Only trained weights are saved (with optimizer, schedule, data-loader position and RNGs): frozen ones
come from the stage's input model, which the stage loads before resuming.

A stage resumes only from its own run's checkpoints written under the same config: the run's uid
(`StageConfig.runUid`) and the hashes of `TRAINED_SECTIONS` must match the newest checkpoint's, and
its trained tensors must match the model's by name and shape. Otherwise the stage fails at once with
CHECKPOINT_INCOMPATIBLE (not retried) and a message saying what differs and how to start over: a
resource deleted and applied again under the same name and storage, or `medmo run` with a fresh work
directory, is another run and must not silently continue (or be confused by) the old run's work. The
same run with an edited stage config is refused the same way: the operator forbids editing a started
stage, so this happens only when a config is changed behind its back (a `medmo run` spec edited
between invocations), and continuing would mix two configs' training in one model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
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
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from medmo_trainer.config import StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.exit_codes import CheckpointIncompatibleError, ConfigError, StageError, StorageError
from medmo_trainer.fsio import s3_options, url_to_fs
from medmo_trainer.strategies import TrainingStrategy

COMMIT_MARKER = "COMMITTED"
LATEST_POINTER = "latest"
CRASH_DURING_SAVE_ENV = "MEDMO_TEST_CRASH_DURING_SAVE_AT_STEP"
"""Test hook: when set to N, every rank kills itself after writing step N but before its commit."""

_STEP_FOLDER = re.compile(r"^step-(\d+)$")

TRAINED_SECTIONS = ("type", "model", "datasets", "hyperparameters", "strategy", "rl")
"""The parts of a stage config that change what training computes, hashed into every checkpoint.
Replica counts, worker URLs, storage and checkpoint policy are left out: they change where and how
often, not what. `rl` counts only its algorithm and reward weights."""

_MISMATCHES_SHOWN = 5


@dataclass(frozen=True)
class Restored:
    """What a resume hands back to the trainer."""

    step: int
    uri: str
    loader_state: dict[str, Any]


class CheckpointManager:
    """Saves, commits, prunes and restores the checkpoints of one stage."""

    def __init__(self, config: StageConfig, context: DistContext, strategy: TrainingStrategy) -> None:
        self.config = config
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
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise StorageError(f"saving checkpoint {uri} failed: {_error_text(error)}") from error
        self.last_committed_uri = uri
        return uri

    def restore(self) -> Restored | None:
        """Loads the newest committed checkpoint into the strategy and RNGs; None when there is none.

        A checkpoint of another run or config, or whose tensors do not fit the model, is a
        CheckpointIncompatibleError; only storage trouble is a (retryable) StorageError."""
        try:
            step = self.latest_committed_step()
            if step is None:
                return None
            marker = self._read_marker(step)
        except (StageError, dist.DistError):
            raise
        except Exception as error:
            raise classify_reading_failure(f"reading the checkpoints in {self.root}", error) from error
        uri = self.uri_of(step)
        self._check_identity(uri, marker)
        self._check_world_size(uri, marker)
        self._check_tensors(uri, marker)
        try:
            self.strategy.load_state(f"{uri}/state", self.options, self.staging)
            trainer_state = self._read_trainer_state(step)
        except (StageError, dist.DistError):  # a lost peer is not the checkpoint's fault
            raise
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise classify_reading_failure(f"loading checkpoint {uri}", error) from error
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
        state = {"step": step, "rng": _rng_states(), "loader": loader_state}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write(f"{self._path(step)}/trainer/rank-{self.context.rank}.pt", buffer.getvalue())

    def _read_trainer_state(self, step: int) -> dict[str, Any]:
        path = f"{self._path(step)}/trainer/rank-{self.context.rank}.pt"
        if not self.fs.exists(path):
            raise CheckpointIncompatibleError(f"checkpoint {self.uri_of(step)} has no state for rank {self.context.rank}")
        return torch.load(io.BytesIO(self.fs.cat_file(path)), weights_only=False)

    def _read_marker(self, step: int) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(f"{self._path(step)}/{COMMIT_MARKER}"))

    def _check_identity(self, uri: str, marker: dict[str, Any]) -> None:
        """Refuses a checkpoint of another run, or of this run under another config."""
        expected = config_sections(self.config)
        found_uid, found = marker.get("runUid"), marker.get("config")
        start_over = f"To start the stage over, delete {self.root} or give the run a new `spec.storage.uri`"
        if found is None:
            reason, advice = "records no run identity (it was written by an older trainer)", start_over
        elif found_uid != self.config.run_uid:
            reason = f"was written by another run (uid {found_uid}; this run's uid is {self.config.run_uid})"
            advice = (f"{start_over}. A resource deleted and applied again is a new run; to continue the other "
                      f"run with `medmo run`, use the --workdir it was started with")
        elif found != expected:
            changed = ", ".join(name for name in TRAINED_SECTIONS if found.get(name) != expected[name])
            reason = f"was written by this run under another stage config (changed since: {changed})"
            advice = f"{start_over}; to continue it, restore the stage's previous config"
        else:
            return
        raise CheckpointIncompatibleError(
            f"checkpoint {uri} {reason}, so stage {self.config.stage!r} will not resume from it. {advice}"
        )

    def _check_world_size(self, uri: str, marker: dict[str, Any]) -> None:
        if marker["worldSize"] != self.context.world_size:
            raise ConfigError(
                f"checkpoint {uri} was written by {marker['worldSize']} ranks, this run has "
                f"{self.context.world_size}; resume with the same number of nodes and GPUs per node"
            )

    def _check_tensors(self, uri: str, marker: dict[str, Any]) -> None:
        """Refuses a checkpoint whose trained tensors differ from the model's by name or shape (the
        input model changed under the stage, or `trainable` did), naming what differs."""
        mismatch = describe_mismatch(expected=self.strategy.trained_shapes(), found=marker["tensors"])
        if mismatch:
            raise CheckpointIncompatibleError(
                f"checkpoint {uri} does not fit the model of stage {self.config.stage!r} ({self.config.model.base}): "
                f"{mismatch}. The stage's input model or trainable modules differ from those it was written with; "
                f"to start the stage over, delete {self.root}"
            )

    def _commit(self, step: int) -> None:
        marker = {
            "step": step,
            "worldSize": self.context.world_size,
            "committedAt": time.time(),
            "runUid": self.config.run_uid,
            "config": config_sections(self.config),
            "tensors": self.strategy.trained_shapes(),
        }
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


def config_sections(config: StageConfig) -> dict[str, str]:
    """A short hash of each of the config's `TRAINED_SECTIONS`, to tell which one changed."""
    # Only what differs from the defaults: a field that a later trainer adds with a default (that
    # keeps today's behaviour) must not make every checkpoint written before the upgrade unreadable.
    def trained(section, **only) -> dict:
        return section.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True, **only)

    sections = {
        "type": config.type,
        "model": trained(config.model),
        "datasets": [trained(dataset) for dataset in config.datasets],
        "hyperparameters": trained(config.hyperparameters),
        "strategy": trained(config.strategy),
        "rl": trained(config.rl, include={"algorithm", "rewards"}) if config.rl is not None else None,
    }
    return {
        name: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        for name, value in sections.items()
    }


def describe_mismatch(expected: dict[str, list[int]], found: dict[str, list[int]]) -> str:
    """What differs between two `{tensor name: shape}` maps, in words; "" when they match."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(name for name in set(expected) & set(found) if list(expected[name]) != list(found[name]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} trained tensors of the model are not in the checkpoint ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors of the checkpoint are not trained in the model ({_some(unexpected)})")
    if reshaped:
        shapes = [f"{name}: checkpoint {list(found[name])}, model {list(expected[name])}" for name in reshaped]
        parts.append(f"{len(reshaped)} tensors have other shapes ({_some(shapes)})")
    return "; ".join(parts)


def _some(items: list[str]) -> str:
    more = len(items) - _MISMATCHES_SHOWN
    return ", ".join(items[:_MISMATCHES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def classify_reading_failure(action: str, error: BaseException) -> StageError:
    """StorageError (retryable) when storage failed; CheckpointIncompatibleError when the checkpoint was
    read but its contents do not load (keys, shapes, types: a retry cannot change them)."""
    causes = [failure for failure, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    if any(isinstance(cause, _CONTENT_ERRORS) and not isinstance(cause, dist.DistError) for cause in causes):
        return CheckpointIncompatibleError(f"{action} failed, its contents do not fit this stage: {_error_text(error)}")
    return StorageError(f"{action} failed: {_error_text(error)}")


_CONTENT_ERRORS = (KeyError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError)
"""Errors of reading a checkpoint that come from its contents, not from storage."""


def _error_text(error: BaseException) -> str:
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {failure!r}" for rank, (failure, _) in error.failures.items())
    return str(error)


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
