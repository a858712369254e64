"""What the loops of every stage type share: progress reporter and telemetry, the failure report, clean-up.

Each stage type is one class built the same way: `build(config, context)` makes its components in
dependency order, a loop method runs its steps (one `medmo.step` span each, `medmo.checkpoint` around
saves), and `run_reporting_failures` runs it under one `medmo.stage` span (so a stage is one trace),
reporting a failure to the operator (a `Failed` progress report with the error) before the process
exits with the failure's code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from medmo_trainer.config import StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.progress import Progress, ProgressReporter
from medmo_trainer.stages import StageResult
from medmo_trainer.telemetry import Telemetry


class StageLoop:
    """Base of `Trainer`, `GRPOLearner` and `Evaluator`: where they stand, and how they report it."""

    def __init__(self, config: StageConfig, context: DistContext, total_steps: int) -> None:
        self.config = config
        self.context = context
        self.total_steps = total_steps
        self.step = 0
        self.reporter = ProgressReporter.from_env(enabled=context.is_main)
        self.telemetry = Telemetry(config.run, config.stage, enabled=context.is_main)

    @property
    def last_checkpoint(self) -> str | None:
        """URI of the stage's last committed checkpoint (None for stages that keep none)."""
        return None

    def report_failure(self, error: BaseException) -> None:
        """Tells the operator why the stage stops (no collectives: other ranks may be gone)."""
        self.reporter.report(Progress(
            run=self.config.run, stage=self.config.stage, phase="Failed", step=self.step,
            total_steps=self.total_steps, last_checkpoint=self.last_checkpoint, message=str(error),
        ))

    def close(self) -> None:
        """Flushes the last report and telemetry; subclasses release their own resources first."""
        self.reporter.close()
        self.telemetry.shutdown()


Loop = TypeVar("Loop", bound=StageLoop)


def run_reporting_failures(loop: Loop, run: Callable[[Loop], StageResult]) -> StageResult:
    """`run(loop)`; a failure is reported before it propagates, and the loop is closed either way."""
    try:
        # The stage's root span: its steps and checkpoints are children, so a stage is one trace.
        with loop.telemetry.span("medmo.stage", **{"medmo.stage.type": loop.config.type}):
            return run(loop)
    except Exception as error:  # not an interrupt: a pod stopped from outside has not failed
        loop.report_failure(error)
        raise
    finally:
        loop.close()
