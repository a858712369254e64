"""The `rl` stage: GRPO with DAPO's clip-higher and token-level loss, on torchrun ranks.

One step reads like the algorithm:

    batch  = controller.collect(step, policy)   rank 0: prompts -> rollout workers -> reward workers -> advantages
    batch  = broadcast(batch)                   every rank takes its share of the completions
    update(batch)                               clipped token-level loss (+ beta * KL), one optimizer step
    policy = publish(step)                      trained weights to storage; rollout workers load them on their next request

On-policy by default (`maxStaleness: 0`). With `maxStaleness: 1` rank 0 gathers step t+1's batch
with policy t-1 while the ranks update to t, so generation and training overlap; the ratio then
uses the rollout workers' log-probabilities of the policy that sampled.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medmo_trainer.checkpoint import CheckpointManager
from medmo_trainer.config import StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.exit_codes import ConfigError, StorageError
from medmo_trainer.fsio import join, url_to_fs
from medmo_trainer.metrics_log import MetricsLog
from medmo_trainer.progress import GRAD_NORM, LEARNING_RATE, LOSS, PEAK_GPU_MEMORY_GIB, Progress, data_counters
from medmo_trainer.rl.controller import PolicyRef, PromptSampler, RolloutBatch, RolloutController, Sample
from medmo_trainer.rl.grpo import clipped_policy_loss, completion_mask
from medmo_trainer.rl.policy import completion_logprobs
from medmo_trainer.rl.prompts import Prompt, encode_prompts
from medmo_trainer.rl.rollout import weights_bytes
from medmo_trainer.rl.workers import WorkerPool
from medmo_trainer.stages import StageResult, register
from medmo_trainer.stages.loop import StageLoop, run_reporting_failures
from medmo_trainer.stages.training import export_stage_model, load_stage_model, move_to, seed_everything
from medmo_trainer.strategies import TrainingStrategy, build_strategy

logger = logging.getLogger(__name__)

POLICY_VERSIONS_KEPT = 2
"""Published versions kept in storage: the newest, and the one an overlapping rollout may still read."""


@dataclass
class UpdateMetrics:
    loss: float
    grad_norm: float
    learning_rate: float
    clip_fraction: float
    kl: float
    tokens: int
    peak_memory_bytes: int | None = None
    """Most GPU memory rank 0's allocator held during the step; None on CPU."""


@dataclass(frozen=True)
class PolicySync:
    """What publishing one policy version moved: the trained weights' bytes, and the seconds from
    gathering them (a collective) to the file committed in storage."""

    bytes: int
    seconds: float

    def as_metrics(self) -> dict[str, float]:
        return {"policySyncBytes": float(self.bytes), "policySyncSeconds": self.seconds}


def rl_progress(config: StageConfig, step: int, total_steps: int, batch: RolloutBatch | None,
                update: UpdateMetrics | None, skipped: Counter[str], last_checkpoint: str | None, phase: str,
                message: str = "", sync: PolicySync | None = None) -> Progress:
    """The progress report of an RL stage: the step's rollout, update and weight-sync metrics, and its counters."""
    metrics = dict(batch.metrics) if batch is not None else {}
    if update is not None:
        metrics.update({LOSS: update.loss, LEARNING_RATE: update.learning_rate, GRAD_NORM: update.grad_norm,
                        "kl": update.kl, "clipFraction": update.clip_fraction})
        if update.peak_memory_bytes is not None:
            metrics[PEAK_GPU_MEMORY_GIB] = update.peak_memory_bytes / 2**30
    if sync is not None:
        metrics.update(sync.as_metrics())
    counters = {**data_counters(None, skipped), **(batch.counters if batch is not None else {})}
    return Progress(run=config.run, stage=config.stage, phase=phase, step=step, total_steps=total_steps,
                    last_checkpoint=last_checkpoint, message=message, metrics=metrics, counters=counters)


class PolicyPublisher:
    """Writes each policy version's trained weights to `<storage>/<stage>/policy/<attempt>/v-N.safetensors`,
    in the stage's compute dtype (bf16 halves what every worker downloads; they compute in it anyway).

    Only the weights that train are published (the projector alone in an alignment stage): workers
    keep the frozen rest from the model they loaded. The attempt folder is new on every (re)start, so a
    worker never mistakes a killed attempt's version N for this one's.
    """

    def __init__(self, config: StageConfig, dtype: torch.dtype):
        self.root = join(config.storage.uri, config.stage, "policy", uuid.uuid4().hex[:12])
        self.dtype = dtype
        self.fs, self.root_path = url_to_fs(self.root)
        self.published: list[str] = []
        self.last_bytes = 0
        """Size of the last published file."""

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> PolicyRef:
        """Writes `state` (the trained weights) as `version`, keeping the newest POLICY_VERSIONS_KEPT."""
        uri = join(self.root, f"v-{version}.safetensors")
        payload = weights_bytes({k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()})
        try:
            self.fs.makedirs(self.root_path, exist_ok=True)
            with self.fs.open(join(self.root_path, f"v-{version}.safetensors"), "wb") as handle:
                handle.write(payload)
            self.last_bytes = len(payload)
            self.published.append(uri)
            for old in self.published[:-POLICY_VERSIONS_KEPT]:
                self.fs.rm(url_to_fs(old)[1])
            self.published = self.published[-POLICY_VERSIONS_KEPT:]
        except OSError as error:
            raise StorageError(f"publishing policy version {version} to {uri} failed: {error}") from error
        return PolicyRef(version, uri)


class GRPOLearner(StageLoop):
    """Runs one `rl` stage; see the module docstring."""

    def __init__(self, config: StageConfig, context: DistContext, loaded: Any, reference: Any,
                 strategy: TrainingStrategy, checkpoints: CheckpointManager, sampler: PromptSampler,
                 controller: RolloutController | None, publisher: PolicyPublisher | None,
                 executor: ThreadPoolExecutor | None, total_steps: int):
        super().__init__(config, context, total_steps)
        assert config.rl is not None
        self.algorithm = config.rl.algorithm
        self.loaded = loaded
        self.reference = reference
        self.strategy = strategy
        self.checkpoints = checkpoints
        self.sampler = sampler
        self.controller = controller
        self.publisher = publisher
        self.executor = executor
        """Rank 0's background thread gathering the next batch while the ranks update."""
        self.metrics_log: MetricsLog | None = None
        self.policy: PolicyRef | None = None
        """The newest published policy version (rank 0)."""
        self.pending: Future | None = None
        """The batch being gathered for the next step (rank 0)."""
        self.sync: PolicySync | None = None
        """What the last publish moved (rank 0)."""

    @classmethod
    def build(cls, config: StageConfig, context: DistContext) -> GRPOLearner:
        from medmo_trainer.model import apply_trainable

        rl = config.rl
        if rl is None or not rl.rollout_urls or not rl.reward_urls:
            raise ConfigError(f"rl stage {config.stage!r} needs rl.rolloutUrls and rl.rewardUrls")
        if not config.datasets:
            raise ConfigError(f"rl stage {config.stage!r} needs datasets of prompts with verifiable answers")
        if rl.algorithm.prompts_per_step * rl.algorithm.group_size < context.world_size:
            raise ConfigError(f"promptsPerStep x groupSize ({rl.algorithm.prompts_per_step} x "
                              f"{rl.algorithm.group_size}) must be at least the number of ranks ({context.world_size})")
        hp = config.hyperparameters
        if hp.gradient_accumulation_steps != 1:
            raise ConfigError(f"rl stage {config.stage!r}: gradientAccumulationSteps does not apply (each RL step is "
                              "one optimizer step over its promptsPerStep x groupSize completions, in micro-batches "
                              "of perDeviceBatchSize per rank); remove it")
        seed_everything(hp.seed)
        sampler = PromptSampler(config.datasets, hp.seed)
        total_steps = hp.max_steps or math.ceil(hp.epochs * len(sampler) / rl.algorithm.prompts_per_step)
        loaded = load_stage_model(config, context.device)
        apply_trainable(loaded.model, config.model.trainable)
        reference = None
        if rl.algorithm.kl_beta > 0:
            reference = load_stage_model(config, context.device).model.to(context.device).eval().requires_grad_(False)
        strategy = build_strategy(config, context)
        completions_per_rank = math.ceil(rl.algorithm.prompts_per_step * rl.algorithm.group_size / context.world_size)
        strategy.prepare(loaded.model, total_steps, math.ceil(completions_per_rank / hp.per_device_batch_size))
        controller = publisher = executor = None
        if context.is_main:
            timeout = rl.request_timeout_seconds
            controller = RolloutController(config, sampler, WorkerPool("rollout", rl.rollout_urls, timeout),
                                           WorkerPool("reward", rl.reward_urls, timeout))
            publisher = PolicyPublisher(config, strategy.dtype)
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        return cls(config, context, loaded, reference, strategy, CheckpointManager(config, context, strategy),
                   sampler, controller, publisher, executor, total_steps)

    def train(self) -> StageResult:
        restored = self.checkpoints.restore()
        if restored is not None:
            self.step = restored.step
            logger.info("resumed from %s at step %d", restored.uri, restored.step)
        self.metrics_log = MetricsLog.for_stage(self.config.storage.uri, self.config.stage, self.context.is_main,
                                                start_step=self.step)
        self.policy = self.publish(self.step)
        self.pending = self.gather(self.step + 1)
        update = None
        while self.step < self.total_steps:
            started = time.perf_counter()
            with self.telemetry.span("medmo.step", step=self.step + 1):
                batch, update = self.train_step()
            self.step += 1
            self.report(batch, update, "Running", seconds=time.perf_counter() - started)
            if self.checkpoints.due(self.step, self.total_steps):
                with self.telemetry.span("medmo.checkpoint", step=self.step):
                    self.checkpoints.save(self.step, {"step": self.step})
                self.metrics_log.flush()
        self.export()
        self.checkpoints.wait()  # an asynchronous last save commits before the stage succeeds
        self.report(None, update, "Succeeded", message=f"exported to {self.config.output_uri}")
        summary = f"{self.step} steps" + (f", final loss {update.loss:.4f}" if update else "")
        return StageResult(steps=self.step, output_uri=self.config.output_uri, summary=summary)

    def train_step(self) -> tuple[RolloutBatch, UpdateMetrics]:
        """Step `self.step + 1`: its gathered batch, the update, the new policy published, the next batch
        started (before the update when one step of staleness lets generation overlap it)."""
        step = self.step + 1
        batch = self.receive(self.pending)
        more = step < self.total_steps
        if self.algorithm.max_staleness and more:
            self.pending = self.gather(step + 1)  # from the policy before this update
        update = self.update(batch)
        self.policy = self.publish(step)
        if not self.algorithm.max_staleness and more:
            self.pending = self.gather(step + 1)
        return batch, update

    def gather(self, step: int) -> Future | None:
        """Starts gathering `step`'s batch from the newest policy on rank 0 (a background thread); None elsewhere."""
        if self.executor is None:
            return None
        return self.executor.submit(self.controller.collect, step, self.policy)

    def receive(self, pending: Future | None) -> RolloutBatch:
        """Rank 0's gathered batch, on every rank."""
        holder = [pending.result() if pending is not None else None]
        if self.context.world_size > 1:
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def update(self, batch: RolloutBatch) -> UpdateMetrics:
        """One optimizer step over this rank's share of the batch's completions, in micro-batches of
        perDeviceBatchSize whose losses sum to this rank's share of the batch's loss."""
        mine = batch.samples[self.context.rank :: self.context.world_size]
        carrying = [s for s in batch.samples if not (self.algorithm.mask_truncated and s.truncated)]
        count = sum(len(s.token_ids) for s in carrying) if self.algorithm.loss_aggregation == "token" else len(carrying)
        normalizer = max(count, 1) / self.context.world_size
        micro = self.config.hyperparameters.per_device_batch_size
        chunks = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        on_gpu = self.context.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.context.device)
        learning_rate = self.strategy.learning_rate()
        loss = clipped = kl = tokens = 0.0
        for index, chunk in enumerate(chunks):
            with self.strategy.autocast():
                out = self.loss_of(chunk, normalizer)
            self.strategy.backward(out.loss, last_micro_step=index == len(chunks) - 1)
            loss += out.loss.item()
            clipped += (out.clip_fraction * out.tokens).item()
            kl += (out.kl * out.tokens).item()
            tokens += out.tokens.item()
        grad_norm = self.strategy.optimizer_step()
        total_tokens = self.context.sum(tokens)
        return UpdateMetrics(
            loss=self.context.sum(loss),
            grad_norm=grad_norm,
            learning_rate=learning_rate,
            clip_fraction=self.context.sum(clipped) / max(total_tokens, 1.0),
            kl=self.context.sum(kl) / max(total_tokens, 1.0),
            tokens=int(total_tokens),
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.context.device) if on_gpu else None,
        )

    def loss_of(self, samples: list[Sample], normalizer: float):
        """The clipped GRPO loss of some completions (shapes: B completions, T tokens)."""
        device = self.context.device
        inputs = encode_prompts(self.loaded.processor, [Prompt.model_validate(s.prompt) for s in samples],
                                self.config.hyperparameters.image_size)
        inputs = {k: move_to(v, device) for k, v in inputs.items()}
        width = max(len(s.token_ids) for s in samples)
        ids = torch.tensor([s.token_ids + [0] * (width - len(s.token_ids)) for s in samples], device=device)
        lengths = torch.tensor([len(s.token_ids) for s in samples], device=device)
        truncated = torch.tensor([s.truncated for s in samples], device=device)
        attention = completion_mask(lengths, truncated, width, mask_truncated=False)
        loss_mask = completion_mask(lengths, truncated, width, self.algorithm.mask_truncated)
        temperature = self.algorithm.temperature
        logp = completion_logprobs(self.strategy.model, inputs, ids, attention, temperature)
        if self.algorithm.max_staleness:
            old = torch.tensor([s.logprobs + [0.0] * (width - len(s.logprobs)) for s in samples], device=device)
        else:
            # On-policy the sampler is the policy being updated; its own values avoid engine mismatch.
            old = logp.detach()
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = completion_logprobs(self.reference, inputs, ids, attention, temperature)
        advantages = torch.tensor([s.advantage for s in samples], device=device)
        return clipped_policy_loss(
            logp, old, advantages, loss_mask, self.algorithm.epsilon_low, self.algorithm.epsilon_high,
            aggregation=self.algorithm.loss_aggregation, ref_logp=ref, beta=self.algorithm.kl_beta,
            normalizer=normalizer,
        )

    def publish(self, version: int) -> PolicyRef | None:
        """Publishes the current trained weights as `version` (a collective; rank 0 writes)."""
        started = time.perf_counter()
        state = self.strategy.trained_state_dict()
        if self.publisher is None:
            return None
        policy = self.publisher.publish(version, state)
        self.sync = PolicySync(self.publisher.last_bytes, time.perf_counter() - started)
        return policy

    def report(self, batch: RolloutBatch | None, update: UpdateMetrics | None, phase: str, message: str = "",
               seconds: float | None = None) -> None:
        if not self.context.is_main:
            return
        skipped = self.sampler.skipped + (batch.skipped if batch is not None else Counter())
        progress = rl_progress(self.config, self.step, self.total_steps, batch, update, skipped,
                               self.last_checkpoint, phase, message, self.sync)
        self.reporter.report(progress)
        if batch is not None and update is not None and seconds is not None:
            self.telemetry.record_step(update.loss, update.tokens, len(batch.samples), seconds)
            self.metrics_log.log(self.step, progress.metrics)

    @property
    def last_checkpoint(self) -> str | None:
        return self.checkpoints.last_committed_uri

    def export(self) -> None:
        """Writes the trained policy in Hugging Face format to the stage's output URI."""
        export_stage_model(self.config, self.context, self.strategy)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.checkpoints.close()
        super().close()


@register("rl")
def run_rl_stage(config: StageConfig, context: DistContext) -> StageResult:
    return run_reporting_failures(GRPOLearner.build(config, context), GRPOLearner.train)
