"""The registry of stage types: `pretrain`, `sft`, `rl`, `eval` each map to one runner.

A runner is registered with `@register("sft")` in its module; `get_runner` imports the module
that owns a stage type on first use, so a trainer image only loads what its stage needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medmo_trainer.exit_codes import ConfigError

if TYPE_CHECKING:
    from medmo_trainer.config import StageConfig
    from medmo_trainer.dist import DistContext


@dataclass(frozen=True)
class StageResult:
    """What a finished stage reports: steps run and where its model went."""

    steps: int
    output_uri: str | None = None
    summary: str = ""
    """One line for the termination message, e.g. the final loss or the eval metrics."""


StageRunner = Callable[["StageConfig", "DistContext"], StageResult]

_RUNNERS: dict[str, StageRunner] = {}

_MODULE_OF_STAGE_TYPE = {
    "pretrain": "medmo_trainer.stages.training",
    "sft": "medmo_trainer.stages.training",
    "rl": "medmo_trainer.stages.rl",
    "eval": "medmo_trainer.stages.eval",
}


def register(stage_type: str) -> Callable[[StageRunner], StageRunner]:
    """Decorator registering `runner(config, dist) -> StageResult` for a stage type."""

    def decorate(runner: StageRunner) -> StageRunner:
        _RUNNERS[stage_type] = runner
        return runner

    return decorate


def get_runner(stage_type: str) -> StageRunner:
    """The runner of a stage type, importing the module that registers it if needed."""
    if stage_type not in _RUNNERS and stage_type in _MODULE_OF_STAGE_TYPE:
        module = _MODULE_OF_STAGE_TYPE[stage_type]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    if stage_type not in _RUNNERS:
        known = ", ".join(sorted(_RUNNERS)) or "none"
        raise ConfigError(f"stage type {stage_type!r} has no runner in this trainer (registered: {known})")
    return _RUNNERS[stage_type]
