"""Rank 0's half of a GRPO step: sample prompts -> rollout workers -> reward workers -> advantages.

The learner (`medmo_trainer.stages.rl`) runs the update on all ranks and publishes the weights;
this module gathers what the update needs, as one `RolloutBatch`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from medmo_trainer.config import DatasetSpec, StageConfig
from medmo_trainer.exit_codes import DataError
from medmo_trainer.rl.grpo import group_advantages
from medmo_trainer.rl.prompts import portable_record
from medmo_trainer.rl.workers import WorkerPool


@dataclass(frozen=True)
class PolicyRef:
    """A published policy version: what rollout workers must sample from."""

    version: int
    uri: str

    def to_wire(self) -> dict:
        return {"version": self.version, "uri": self.uri}


@dataclass
class Sample:
    """One completion and what the update needs of it."""

    prompt: dict
    """The prompt as sent to the rollout worker (`Prompt` wire form)."""
    token_ids: list[int]
    logprobs: list[float]
    """log pi_old per token, from the rollout worker (the behaviour policy)."""
    truncated: bool
    advantage: float


@dataclass
class RolloutBatch:
    """All samples of one step (groups contiguous) and what gathering them measured."""

    step: int
    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    """Running totals: worker failovers so far."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Prompts dropped this step, by reason (unreadable image...)."""


class PromptSampler:
    """Draws the prompts of each step from the stage's weighted mixture, deterministically by step."""

    def __init__(self, datasets: list[DatasetSpec], seed: int):
        from medmo_trainer.data import iter_records

        self.seed = seed
        self.skipped: Counter[str] = Counter()
        self.pools: list[list[dict]] = []
        for spec in datasets:
            records = [r.model_dump(mode="json", by_alias=True, exclude_none=True)
                       for r in iter_records(spec.uri, spec.tasks or None, self.skipped)]
            if not records:
                raise DataError(f"dataset {spec.name!r} ({spec.uri}) holds no usable RL prompt")
            self.pools.append(records)
        weights = np.array([spec.weight for spec in datasets], dtype=float)
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return sum(len(pool) for pool in self.pools)

    def sample(self, step: int, count: int) -> list[dict]:
        """`count` records for `step`; the same step always draws the same records (resume-safe)."""
        rng = np.random.default_rng([self.seed, step])
        choices = rng.choice(len(self.pools), size=count, p=self.weights)
        return [self.pools[d][int(rng.integers(len(self.pools[d])))] for d in choices]


def reference_of(record: dict) -> dict:
    """What the reward workers check a completion of `record` against."""
    reference = {"task": record["task"], "answer": record["answer"]}
    if record.get("boxes"):
        reference["boxes"] = record["boxes"]
    if record.get("options"):
        reference["options"] = record["options"]
    return reference


def _chunks(items: list, parts: int) -> list[list]:
    size = math.ceil(len(items) / max(1, parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


class RolloutController:
    """Gathers one step's rollouts, rewards and advantages from the worker pools."""

    def __init__(self, config: StageConfig, sampler: PromptSampler, rollout: WorkerPool, reward: WorkerPool):
        assert config.rl is not None
        self.config = config
        self.algorithm = config.rl.algorithm
        self.rewards = config.rl.rewards
        self.sampler = sampler
        self.rollout = rollout
        self.reward = reward
        self.rollout_requests = config.rl.rollout_requests_per_step or len(rollout.urls)
        self.reward_requests = config.rl.reward_requests_per_step or len(reward.urls)
        self.workers_ready = False

    def collect(self, step: int, policy: PolicyRef) -> RolloutBatch:
        if not self.workers_ready:
            # The workers start with the learner and load the policy meanwhile (minutes for a real model).
            for pool in (self.rollout, self.reward):
                pool.wait_ready(self.config.rl.worker_startup_timeout_seconds)
            self.workers_ready = True
        records = self.sampler.sample(step, self.algorithm.prompts_per_step)
        started = time.monotonic()
        groups, skipped, generated_tokens, versions = self.generate(records, step, policy)
        generation_seconds = time.monotonic() - started
        if not groups:
            raise DataError(f"step {step}: no prompt of {len(records)} could be used ({dict(skipped)})")
        scored, parse_failures = self.score(groups)
        totals = torch.tensor([s["total"] for s in scored], dtype=torch.float32)
        advantages = group_advantages(totals, self.algorithm.group_size)
        samples = [
            Sample(prompt, c["tokenIds"], c["logprobs"], c["truncated"], float(a))
            for (prompt, c), a in zip(((p, c) for p, completions in groups for c in completions), advantages)
        ]
        metrics = reward_metrics(scored)
        metrics.update(
            {
                "rolloutTokensPerSecond": generated_tokens / max(generation_seconds, 1e-9),
                "rolloutSeconds": generation_seconds,
                "policyVersion": float(min(versions)),
                "truncatedFraction": sum(s.truncated for s in samples) / len(samples),
                "completionLength": sum(len(s.token_ids) for s in samples) / len(samples),
                **{f"parseFailures/{k}": float(v) for k, v in parse_failures.items()},
            }
        )
        counters = {"rolloutFailovers": self.rollout.total_failovers(), "rewardFailovers": self.reward.total_failovers()}
        return RolloutBatch(step=step, samples=samples, metrics=metrics, counters=counters, skipped=skipped)

    def generate(self, records: list[dict], step: int, policy: PolicyRef):
        """(prompt, completions) per usable record, prompts dropped by reason, tokens, worker versions."""
        prompts = [{"id": str(i), "record": portable_record(record)} for i, record in enumerate(records)]
        bodies = [
            {
                "prompts": chunk,
                "sampling": {
                    "n": self.algorithm.group_size,
                    "temperature": self.algorithm.temperature,
                    "topP": self.algorithm.top_p,
                    "maxNewTokens": self.algorithm.max_completion_length,
                    # seeded by (run seed, step, chunk): the same samples whichever replica serves it
                    "seed": int(np.random.default_rng([self.sampler.seed, step, index]).integers(2**31)),
                    "imageSize": self.config.hyperparameters.image_size,
                },
                "policy": policy.to_wire(),
            }
            for index, chunk in enumerate(_chunks(prompts, self.rollout_requests))
        ]
        responses = self.rollout.map("/v1/generate", bodies)
        groups, skipped = [], Counter()
        for body, response in zip(bodies, responses):
            for prompt, result in zip(body["prompts"], response["results"]):
                if result.get("error") or len(result["completions"]) != self.algorithm.group_size:
                    skipped["badImage" if "image" in result.get("error", "") else "rolloutError"] += 1
                    continue
                groups.append((prompt, result["completions"]))
        tokens = sum(r["generatedTokens"] for r in responses)
        return groups, skipped, tokens, [r["policyVersion"] for r in responses]

    def score(self, groups: list[tuple[dict, list[dict]]]) -> tuple[list[dict], Counter[str]]:
        """Per-completion rewards (components and total), in sample order, and parse-failure counts."""
        items = [
            {
                "prompt": prompt["record"]["prompt"],
                "completion": c["text"],
                "completionLength": len(c["tokenIds"]),
                "reference": reference_of(prompt["record"]),
            }
            for prompt, completions in groups
            for c in completions
        ]
        bodies = [
            {"weights": self.rewards.to_wire(), "maxCompletionLength": self.algorithm.max_completion_length, "items": chunk}
            for chunk in _chunks(items, self.reward_requests)
        ]
        scored, failures = [], Counter()
        for response in self.reward.map("/v1/score", bodies):
            scored.extend(response["rewards"])
            failures.update(response["parseFailures"])
        return scored, failures


def reward_metrics(scored: list[dict]) -> dict[str, float]:
    """`reward/<component>` mean and `rewardStd/<component>` spread over the samples it applies to."""
    metrics = {}
    columns = {"total": [s["total"] for s in scored]}
    for name in scored[0]["components"]:
        columns[name] = [s["components"][name] for s in scored if s["components"][name] is not None]
    for name, values in columns.items():
        if values:
            array = np.asarray(values, dtype=float)
            metrics[f"reward/{name}"] = float(array.mean())
            metrics[f"rewardStd/{name}"] = float(array.std())
    return metrics
