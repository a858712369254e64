"""The `pretrain` and `sft` stages: supervised training of a vision-language model on a data mixture.

Both are the same loop; they differ only in their configs (`pretrain` usually trains only the
projector, `sft` all or chosen groups). Components are built in dependency order in
`Trainer.build`; `train()` runs steps, checkpoints and exports; `train_step()` is one optimizer
step over `gradientAccumulationSteps` micro-batches.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmo_trainer.checkpoint import CheckpointManager
from medmo_trainer.config import StageConfig
from medmo_trainer.data import SKIP_REASONS
from medmo_trainer.dist import DistContext
from medmo_trainer.exit_codes import ModelError, StorageError
from medmo_trainer.flops import BatchShape, device_peak_flops, mfu, training_flops
from medmo_trainer.inputs import IGNORE_INDEX, TrainLoader, build_train_loader
from medmo_trainer.model import (
    LoadedModel,
    ModelUnavailableError,
    UnsupportedModelError,
    apply_trainable,
    export_hf,
    load_model,
)
from medmo_trainer.metrics_log import MetricsLog
from medmo_trainer.progress import (
    GRAD_NORM,
    LEARNING_RATE,
    LOSS,
    MFU,
    PEAK_GPU_MEMORY_GIB,
    SAMPLES_PER_SECOND,
    TFLOPS_PER_DEVICE,
    TOKENS_PER_SECOND,
    Progress,
    data_counters,
)
from medmo_trainer.stages import StageResult, register
from medmo_trainer.stages.loop import StageLoop, run_reporting_failures
from medmo_trainer.strategies import TrainingStrategy, build_strategy, compute_dtype

logger = logging.getLogger(__name__)


@dataclass
class DataCounts:
    """Records read and malformed records skipped (by reason) so far, over all ranks."""

    records_read: int
    skipped_by_reason: dict[str, int]


@dataclass
class StepMetrics:
    """What one optimizer step measured, summed or averaged over all ranks."""

    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int
    samples: int
    seconds: float
    data: DataCounts
    flops: float | None = None
    """Model FLOPs of the step over all ranks (`medmo_trainer.flops`); None when not counted."""
    devices: int = 1
    peak_flops: float | None = None
    """Peak FLOPs per second of one device; None on CPU, in fp32 or on a GPU missing from the peak table."""
    peak_memory_bytes: int | None = None
    """Most GPU memory rank 0's allocator held during the step; None on CPU."""

    def as_metrics(self) -> dict[str, float]:
        """The step's progress metrics (MFU and GPU memory only where they are known)."""
        metrics = {
            LOSS: self.loss, LEARNING_RATE: self.learning_rate, GRAD_NORM: self.grad_norm,
            TOKENS_PER_SECOND: self.tokens / self.seconds, SAMPLES_PER_SECOND: self.samples / self.seconds,
        }
        if self.flops is not None:
            metrics[TFLOPS_PER_DEVICE] = self.flops / self.seconds / self.devices / 1e12
            utilisation = mfu(self.flops, self.seconds, self.peak_flops, self.devices)
            if utilisation is not None:
                metrics[MFU] = utilisation
        if self.peak_memory_bytes is not None:
            metrics[PEAK_GPU_MEMORY_GIB] = self.peak_memory_bytes / 2**30
        return metrics


def supervised_loss(model: torch.nn.Module, batch: dict[str, Any], averaging: str) -> torch.Tensor:
    """The micro-batch's cross-entropy on its answer tokens, averaged as `hyperparameters.lossAveraging` says."""
    if averaging == "token":
        return model(**batch).loss
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    return sample_mean_loss(logits, batch["labels"], sample_ids(batch))


def sample_ids(batch: dict[str, Any]) -> torch.Tensor:
    """(rows, seq) index of the sample each token belongs to: one sample a row when padded; when packed,
    a new sample wherever the text positions (row 0 of `position_ids`, shape (4, 1, seq)) restart at 0."""
    if "attention_mask" in batch:
        rows, seq = batch["input_ids"].shape
        return torch.arange(rows, device=batch["input_ids"].device).unsqueeze(1).expand(rows, seq)
    return torch.cumsum(batch["position_ids"][0] == 0, dim=-1) - 1


def sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor, sample_of: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each sample's labelled tokens, then over the samples that have any.

    logits (rows, seq, vocab); labels and sample_of (rows, seq). Token t predicts label t+1, as in
    transformers' causal LM loss; samples without labels (the image-only keepalive) count for nothing.
    """
    targets = labels[:, 1:].flatten()
    owners = sample_of[:, 1:].flatten()
    labelled = targets != IGNORE_INDEX
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1)[labelled].float(), targets[labelled], reduction="none")
    owners = owners[labelled]
    samples = int(sample_of.max()) + 1
    sums = token_losses.new_zeros(samples).index_add(0, owners, token_losses)
    counts = token_losses.new_zeros(samples).index_add(0, owners, torch.ones_like(token_losses))
    return (sums[counts > 0] / counts[counts > 0]).mean()


def training_progress(config: StageConfig, step: int, total_steps: int, metrics: StepMetrics | None, data: DataCounts,
                      last_checkpoint: str | None, phase: str, message: str = "") -> Progress:
    """The progress report of a supervised stage (pretrain, sft)."""
    return Progress(
        run=config.run, stage=config.stage, phase=phase, step=step, total_steps=total_steps,
        last_checkpoint=last_checkpoint, message=message, metrics=metrics.as_metrics() if metrics is not None else {},
        counters=data_counters(data.records_read, data.skipped_by_reason),
    )


class Trainer(StageLoop):
    """Runs one supervised stage; see the module docstring."""

    def __init__(
        self,
        config: StageConfig,
        context: DistContext,
        loaded: LoadedModel,
        loader: TrainLoader,
        strategy: TrainingStrategy,
        checkpoints: CheckpointManager,
        total_steps: int,
    ) -> None:
        super().__init__(config, context, total_steps)
        self.loaded = loaded
        self.loader = loader
        self.strategy = strategy
        self.checkpoints = checkpoints
        self.metrics_log: MetricsLog | None = None
        """Per-step metrics in storage (rank 0), for the run report's loss curves."""
        self.peak_flops = device_peak_flops(context.device, strategy.dtype)

    @classmethod
    def build(cls, config: StageConfig, context: DistContext) -> Trainer:
        hp = config.hyperparameters
        seed_everything(hp.seed)
        loaded = load_stage_model(config, context.device)
        try:
            apply_trainable(loaded.model, config.model.trainable)
        except UnsupportedModelError as error:
            raise ModelError(f"cannot choose trainable groups of {config.model.base!r}: {error}") from error
        if hp.gradient_checkpointing:
            enable_gradient_checkpointing(loaded.model)
        loader = build_train_loader(
            config.datasets, loaded.processor, hp, rank=context.rank, world_size=context.world_size, seed=hp.seed
        )
        global_batch = hp.per_device_batch_size * hp.gradient_accumulation_steps * context.world_size
        total_steps = hp.max_steps or max(1, math.ceil(hp.epochs * loader.samples_per_epoch / global_batch))
        strategy = build_strategy(config, context)
        strategy.prepare(loaded.model, total_steps, hp.gradient_accumulation_steps)
        return cls(
            config=config,
            context=context,
            loaded=loaded,
            loader=loader,
            strategy=strategy,
            checkpoints=CheckpointManager(config, context, strategy),
            total_steps=total_steps,
        )

    def train(self) -> StageResult:
        restored = self.checkpoints.restore()
        if restored is not None:
            self.loader.load_state_dict(restored.loader_state)
            self.step = restored.step
            logger.info("resumed from %s at step %d", restored.uri, restored.step)
        self.metrics_log = MetricsLog.for_stage(
            self.config.storage.uri, self.config.stage, self.context.is_main, start_step=self.step
        )
        batches = self.micro_batches()
        metrics = None
        while self.step < self.total_steps:
            with self.telemetry.span("medmo.step", step=self.step + 1):
                metrics = self.train_step(batches)
            self.step += 1
            self._report(metrics, phase="Running")
            if self.checkpoints.due(self.step, self.total_steps):
                with self.telemetry.span("medmo.checkpoint", step=self.step):
                    self.checkpoints.save(self.step, self.loader.state_dict())
                self.metrics_log.flush()  # every step up to a checkpoint is kept with it
        self._export()
        self.checkpoints.wait()  # an asynchronous last save commits before the stage succeeds
        summary = f"{self.step} steps" + (f", final loss {metrics.loss:.4f}" if metrics else "")
        self._report(metrics, phase="Succeeded", message=f"exported to {self.config.output_uri}")
        return StageResult(steps=self.step, output_uri=self.config.output_uri, summary=summary)

    def train_step(self, batches: Iterator[dict[str, Any]]) -> StepMetrics:
        started = time.perf_counter()
        on_gpu = self.context.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.context.device)
        accumulation = self.config.hyperparameters.gradient_accumulation_steps
        learning_rate = self.strategy.learning_rate()
        samples_before, tokens_before = self.loader.stats.samples, self.loader.stats.tokens
        losses, flops = [], 0.0
        for micro_step in range(accumulation):
            batch = next(batches)
            flops += training_flops(self.loaded.model.config, BatchShape.of(batch))
            with self.strategy.autocast():
                loss = supervised_loss(self.strategy.model, batch, self.config.hyperparameters.loss_averaging)
            # The step's loss is the mean over its micro-batches.
            self.strategy.backward(loss / accumulation, last_micro_step=micro_step == accumulation - 1)
            losses.append(loss.detach().float())
        grad_norm = self.strategy.optimizer_step()
        stats = self.loader.stats
        local = [torch.stack(losses).mean().item(), stats.tokens - tokens_before, stats.samples - samples_before, flops]
        loss_sum, tokens, samples, flops, *data = self.context.sum_all(local + self._local_data_counts())
        return StepMetrics(
            loss=loss_sum / self.context.world_size,
            learning_rate=learning_rate,
            grad_norm=grad_norm,
            tokens=int(tokens),
            samples=int(samples),
            seconds=time.perf_counter() - started,
            data=self._data_counts(data),
            flops=flops,
            devices=self.context.world_size,
            peak_flops=self.peak_flops,
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.context.device) if on_gpu else None,
        )

    @property
    def last_checkpoint(self) -> str | None:
        return self.checkpoints.last_committed_uri

    def close(self) -> None:
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.checkpoints.close()
        super().close()

    def micro_batches(self) -> Iterator[dict[str, Any]]:
        """Batches on this rank's device, pass after pass over the mixture."""
        while True:
            for batch in self.loader:
                yield {key: move_to(value, self.context.device) for key, value in batch.items()}

    def _report(self, metrics: StepMetrics | None, phase: str, message: str = "") -> None:
        data = metrics.data if metrics else self._data_counts(self.context.sum_all(self._local_data_counts()))
        progress = training_progress(self.config, self.step, self.total_steps, metrics, data,
                                     self.last_checkpoint, phase, message)
        if metrics is not None and phase == "Running":
            self.telemetry.record_step(metrics.loss, metrics.tokens, metrics.samples, metrics.seconds)
            if self.metrics_log is not None:
                self.metrics_log.log(self.step, progress.metrics)
        self.reporter.report(progress)

    def _local_data_counts(self) -> list[float]:
        """This rank's records read and skips per reason, in SKIP_REASONS order (to sum over ranks)."""
        stats = self.loader.stats
        return [stats.records_read, *(stats.skipped[reason] for reason in SKIP_REASONS)]

    @staticmethod
    def _data_counts(summed: list[float]) -> DataCounts:
        records_read, *skipped = summed
        by_reason = {reason: int(n) for reason, n in zip(SKIP_REASONS, skipped, strict=True) if n}
        return DataCounts(records_read=int(records_read), skipped_by_reason=by_reason)

    def _export(self) -> None:
        export_stage_model(self.config, self.context, self.strategy)


def export_stage_model(config: StageConfig, context: DistContext, strategy: TrainingStrategy) -> None:
    """Writes the trained model in Hugging Face format to the stage's output URI (rank 0 writes;
    every rank takes part in gathering the weights)."""
    state = strategy.full_state_dict()
    if context.is_main:
        # A fresh copy of the base model receives the gathered weights: it is plain (not wrapped
        # or sharded by the strategy), so it saves as the model's own class.
        fresh = load_stage_model(config, context.device)
        fresh.model.load_state_dict(state)
        try:
            export_hf(fresh.model, fresh.processor, config.output_uri)
        except OSError as error:
            raise StorageError(f"exporting the model to {config.output_uri} failed: {error}") from error
    context.barrier()


@register("pretrain")
@register("sft")
def run_training_stage(config: StageConfig, context: DistContext) -> StageResult:
    return run_reporting_failures(Trainer.build(config, context), Trainer.train)


def load_stage_model(config: StageConfig, device: torch.device) -> Any:
    """The stage's starting model and processor; a source that cannot be loaded is a ModelError.

    Weights load in the stage's precision (`auto`: bf16 when `device` is a GPU), so bf16 weights stay
    bf16 and are never first copied into float32 at twice their size. The processor resizes images
    under the stage's pixel budget, and the export records it, so the exported model's stock
    processor prepares images as this stage trained on them."""
    try:
        loaded = load_model(config.model, dtype=compute_dtype(config.hyperparameters, device))
    except (ModelUnavailableError, UnsupportedModelError) as error:
        raise ModelError(str(error)) from error
    loaded.processor.set_image_size(config.hyperparameters.image_size)
    return loaded


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Frozen embeddings would cut the graph before the first checkpointed block.
    model.enable_input_require_grads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def move_to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
