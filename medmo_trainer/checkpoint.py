"""Checkpoints of a stage: save every N steps, commit atomically, keep the last K, resume exactly.

Layout under the stage's `checkpointUri`:

    step-N/state/...             model, optimizer and schedule (DCP files, or DeepSpeed's own)
    step-N/trainer/rank-R.pt     per-rank RNG states and data-loader position
    step-N/COMMITTED             written last, by rank 0, once every rank has finished writing: JSON with
                                 the step, the world size, the run's uid, a hash of each part of the stage
                                 config that shapes training, and the name and shape of every trained tensor
    latest                       the name of the newest committed folder (`step-N`), updated after COMMITTED,
                                 for the operator and for people; resume looks for the markers themselves

With `checkpoint.async`, a save copies the state to CPU memory and returns; a background thread
uploads it, writes the trainer state, waits for every rank's upload (on a gloo group of its own) and
then commits and prunes, exactly as a synchronous save does. One save is in flight at most: the next
waits for it, the end of the stage waits for the last, and SIGTERM waits for the one in flight (for
at most `PREEMPTION_WAIT_S`) before the process stops.

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
import math
import os
import pickle
import random
import re
import shutil
import logging
import signal
import tempfile
import threading
import time
from concurrent.futures import Future
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
HOLD_UPLOAD_ENV = "MEDMO_TEST_HOLD_UPLOAD_AT_STEP"
"""Test hook of asynchronous saves: `N` makes every rank's background upload of step N stop after
writing its data files (before DCP's metadata) and never go on; `N:S` holds it S seconds instead."""
PREEMPTION_WAIT_S = 20.0
"""How long SIGTERM waits for an upload in flight: within Kubernetes' default 30 s grace period."""

logger = logging.getLogger(__name__)

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
        self._staging: Path | None = None
        self.last_committed_uri: str | None = None
        self.asynchronous = self.policy.asynchronous and strategy.saves_asynchronously
        if self.policy.asynchronous and not self.asynchronous and context.is_main:
            logger.warning("checkpoint.async: %s saves synchronously (its state does not go through "
                           "torch.distributed.checkpoint)", config.strategy.name)
        self._in_flight: Future | None = None
        self._upload_group = None
        self._previous_sigterm: Any = None
        if self.asynchronous:
            # Uploads' collectives get their own gloo group: on the training group they would interleave
            # with training's, and nccl groups cannot take CPU tensors.
            self._upload_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
            if threading.current_thread() is threading.main_thread():
                self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def close(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    @property
    def staging(self) -> Path:
        """A local folder for strategies whose state passes through files (DeepSpeed), made on first
        use: a stage that never needs one leaves nothing behind, even when it is killed."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="medmo-checkpoint-"))
        return self._staging

    def uri_of(self, step: int) -> str:
        return f"{self.root}/step-{step}"

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a checkpoint is saved after this optimizer step."""
        return step % self.policy.every_steps == 0 or step == total_steps

    def save(self, step: int, loader_state: dict[str, Any]) -> None:
        """Writes the checkpoint of `step` on every rank, then commits it (a collective); with
        `checkpoint.async`, starts that in the background once the previous save has committed."""
        if self.asynchronous:
            self.wait()
            self._in_flight = self._start_upload(step, loader_state)
        else:
            self._save_now(step, loader_state)

    def wait(self, timeout: float | None = None) -> None:
        """Returns once the save in flight (if any) has committed; a failed upload is a StorageError,
        and TimeoutError after `timeout` seconds leaves it in flight."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        try:
            in_flight.result(timeout)
        except (TimeoutError, StageError):
            raise
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise StorageError(f"uploading a checkpoint under {self.root} failed: {_error_text(error)}") from error
        finally:
            if in_flight.done():  # still in flight for a SIGTERM that interrupts this wait
                self._in_flight = None

    def _start_upload(self, step: int, loader_state: dict[str, Any]) -> Future:
        """Copies this rank's state to CPU memory, then uploads and commits it in the background."""
        uri = self.uri_of(step)
        try:
            self._clear(step)
            # Captured now: RNGs and data position move on while the upload runs.
            trainer_state = self._trainer_state(step, loader_state)
            writer = _writer(f"{uri}/state", self.options, _held_seconds(step))
            upload = self.strategy.save_state_async(writer, self._upload_group)
        except StageError:
            raise
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException
            raise StorageError(f"saving checkpoint {uri} failed: {_error_text(error)}") from error
        done: Future = Future()

        def finish() -> None:
            try:
                upload.result()
                self._write(f"{self._path(step)}/trainer/rank-{self.context.rank}.pt", trainer_state)
                if self._upload_group is not None:
                    dist.barrier(group=self._upload_group)  # every rank's files are in
                self._crash_if_requested(step)
                if self.context.is_main:
                    self._commit(step)
                    self._prune()  # after the commit: never before the newer checkpoint is safe
                self.last_committed_uri = uri
                done.set_result(uri)
            except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
                done.set_exception(error)

        # A daemon thread: an upload that hangs must not keep a failed process from exiting.
        threading.Thread(target=finish, name=f"medmo-checkpoint-{step}", daemon=True).start()
        return done

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Preemption: lets the upload in flight commit (bounded), then hands SIGTERM to the handler before."""
        if self._in_flight is not None:
            logger.info("SIGTERM: waiting up to %.0f s for the checkpoint upload in flight", PREEMPTION_WAIT_S)
            try:
                self.wait(PREEMPTION_WAIT_S)
                logger.info("SIGTERM: the checkpoint in flight is committed")
            except BaseException as error:  # noqa: BLE001 (stopping anyway)
                logger.warning("SIGTERM: the checkpoint in flight did not commit: %r", error)
        signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
        self._previous_sigterm = None
        os.kill(os.getpid(), signal.SIGTERM)

    def _clear(self, step: int) -> None:
        if self.context.is_main and self.fs.exists(self._path(step)):
            self._remove(self._path(step))  # leftover of an interrupted save
        self.context.barrier()

    def _save_now(self, step: int, loader_state: dict[str, Any]) -> None:
        uri = self.uri_of(step)
        try:
            self._clear(step)
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
        self._write(f"{self._path(step)}/trainer/rank-{self.context.rank}.pt", self._trainer_state(step, loader_state))

    @staticmethod
    def _trainer_state(step: int, loader_state: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        torch.save({"step": step, "rng": _rng_states(), "loader": loader_state}, buffer)
        return buffer.getvalue()

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


def _held_seconds(step: int) -> float | None:
    """How long the test hook `HOLD_UPLOAD_ENV` holds the upload of `step` (inf: forever); None: not held."""
    held_step, _, seconds = os.environ.get(HOLD_UPLOAD_ENV, "").partition(":")
    if held_step != str(step):
        return None
    return float(seconds) if seconds else math.inf


def _writer(uri: str, storage_options: dict, held_seconds: float | None) -> Any:
    """DCP's fsspec writer; one that stops after writing the data files when a test holds the upload."""
    from torch.distributed.checkpoint.fsspec_filesystem import FsspecWriter

    if held_seconds is None:
        return FsspecWriter(uri, **storage_options)

    class HeldWriter(FsspecWriter):
        def write_data(self, plan, planner):
            written = super().write_data(plan, planner)
            written.wait()
            logger.info("test hook: holding the upload of %s after its data files", uri)
            threading.Event().wait(None if math.isinf(held_seconds) else held_seconds)
            return written

    return HeldWriter(uri, **storage_options)


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
