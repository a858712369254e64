"""Exit codes of a training process, by failure class.

The operator renders a Job `podFailurePolicy` from this module: codes below 10 mean the stage can
never succeed as configured (fail the stage at once, no retries), codes of 10 and above are
infrastructure trouble that a restart from the last checkpoint can cure (count against the backoff
limit). Pure Python: the operator imports it without torch.

Workers run under `python -m medmo_trainer.launch` (torchrun's command line), which exits with the
code of the first failed worker; plain `torchrun` would turn every failure into 1.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit status of `python -m medmo_trainer` (and of `medmo_trainer.launch`)."""

    OK = 0
    UNEXPECTED = 1
    """An error of no known class (a bug); retried like infrastructure, within the backoff limit."""
    CONFIG_INVALID = 2
    """The stage config is missing, unreadable or invalid."""
    DATA_INVALID = 3
    """A dataset URI cannot be read, or holds no usable record."""
    MODEL_INVALID = 4
    """The model source cannot be found or loaded."""
    CHECKPOINT_INCOMPATIBLE = 5
    """The stage's checkpoint folder holds a checkpoint this stage must not or cannot resume from: written
    by another run or under another config, or with tensors whose names or shapes do not match the model."""
    MODEL_ACCESS_DENIED = 6
    """The model hub refused the model (401/403): it is gated or private, and no token, or one without
    access to it, was given."""
    STORAGE_UNAVAILABLE = 10
    """Checkpoint or export storage failed (network, credentials refused mid-run, server down)."""
    DISTRIBUTED_FAILURE = 11
    """Rendezvous or a collective (NCCL, gloo) failed: usually a lost peer."""
    MODEL_HUB_UNAVAILABLE = 12
    """The model hub could not be reached or failed mid-download (network, 5xx)."""

    @property
    def retryable(self) -> bool:
        """Whether restarting the stage from its last checkpoint may succeed."""
        return self == ExitCode.UNEXPECTED or self >= 10


NON_RETRYABLE: tuple[int, ...] = tuple(int(c) for c in ExitCode if c != ExitCode.OK and not c.retryable)
"""Exit codes a podFailurePolicy should map to `FailJob`."""

RETRYABLE: tuple[int, ...] = tuple(int(c) for c in ExitCode if c != ExitCode.OK and c.retryable)
"""Exit codes a podFailurePolicy should count against the backoff limit (restart from checkpoint)."""


class StageError(Exception):
    """An error whose failure class is known; `exit_code` is what the process exits with."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ConfigError(StageError):
    exit_code = ExitCode.CONFIG_INVALID


class DataError(StageError):
    exit_code = ExitCode.DATA_INVALID


class ModelError(StageError):
    exit_code = ExitCode.MODEL_INVALID


class ModelAccessDeniedError(StageError):
    exit_code = ExitCode.MODEL_ACCESS_DENIED


class ModelHubUnavailableError(StageError):
    exit_code = ExitCode.MODEL_HUB_UNAVAILABLE


class CheckpointIncompatibleError(StageError):
    exit_code = ExitCode.CHECKPOINT_INCOMPATIBLE


class StorageError(StageError):
    exit_code = ExitCode.STORAGE_UNAVAILABLE


class DistributedError(StageError):
    exit_code = ExitCode.DISTRIBUTED_FAILURE
