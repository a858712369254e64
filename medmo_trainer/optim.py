"""Optimizer and learning-rate schedule of a training stage."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from medmo_trainer.config import Hyperparameters


def build_optimizer(params: Iterable[torch.nn.Parameter], hp: Hyperparameters) -> torch.optim.Optimizer:
    """AdamW over the parameters that train; frozen ones must not be passed (no state for them)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check `model.trainable`")
    return torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)


def lr_multiplier(hp: Hyperparameters, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at an optimizer step: linear warmup, then the decay."""
    warmup = math.ceil(hp.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if hp.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if hp.lr_scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(hp, total_steps))
