"""GRPO's maths as pure tensor functions: group advantages, the clipped token-level loss, KL.

Shapes: B completions in a batch (prompts x group size, grouped contiguously: the G completions
of prompt 0 first), T completion tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), with the population std.

    rewards: [B] with B a multiple of `group_size`, groups contiguous. Returns [B]. A group whose
    rewards are all equal gets zero advantages (it carries no learning signal).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).view(-1)


def completion_mask(lengths: torch.Tensor, truncated: torch.Tensor, max_tokens: int, mask_truncated: bool) -> torch.Tensor:
    """Which completion tokens carry loss.

    lengths: [B] tokens generated per completion; truncated: [B] bool, cut at the length budget.
    Returns a float mask [B, max_tokens]: 1 for real tokens, 0 for padding, and all 0 for truncated
    completions when `mask_truncated` (DAPO's overlong filtering: a cut answer is not judged).
    """
    positions = torch.arange(max_tokens, device=lengths.device).unsqueeze(0)
    mask = positions < lengths.unsqueeze(1)
    if mask_truncated:
        mask = mask & ~truncated.bool().unsqueeze(1)
    return mask.float()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) by the k3 estimator exp(d) - d - 1 with d = ref_logp - logp.

    logp, ref_logp: [B, T]. Returns [B, T], each entry >= 0.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass
class LossOutput:
    """The loss to back-propagate and what the progress report shows about it."""

    loss: torch.Tensor
    """Scalar."""
    clip_fraction: torch.Tensor
    """Share of loss-carrying tokens whose clipped objective was the smaller one (scalar, no grad)."""
    kl: torch.Tensor
    """Mean per-token k3 KL to the reference over loss-carrying tokens (scalar, no grad; 0 without one)."""
    tokens: torch.Tensor
    """Loss-carrying tokens in this batch (scalar)."""


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    aggregation: Literal["token", "sequence"] = "token",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """GRPO's objective with DAPO's clip-higher, negated for minimisation.

    logp: [B, T] log-probabilities of the sampled tokens under the policy being trained (with grad);
    old_logp: [B, T] under the policy that sampled them; advantages: [B]; mask: [B, T] from
    `completion_mask`; ref_logp: [B, T] under the frozen reference, needed when beta > 0.

    Per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*KL_k3, with rho =
    exp(logp - old_logp). `token` aggregation divides the masked sum by the number of loss tokens
    (DAPO); `sequence` averages each completion over its own tokens first, then over the completions
    that carry loss. `normalizer`, when given, replaces that token (or completion) count: the learner
    passes the global count / world size, so that summing micro-batches and averaging gradients
    across ranks yields the mean over the whole batch.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when beta > 0")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    tokens = mask.sum()
    safe_tokens = tokens.clamp(min=1.0)
    if aggregation == "token":
        denominator = safe_tokens if normalizer is None else normalizer
        loss = (per_token * mask).sum() / denominator
    elif aggregation == "sequence":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        denominator = (mask.sum(dim=1) > 0).sum().clamp(min=1) if normalizer is None else normalizer
        loss = per_sequence.sum() / denominator
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}: use 'token' or 'sequence'")
    with torch.no_grad():
        clip_fraction = ((clipped < unclipped).float() * mask).sum() / safe_tokens
        mean_kl = (kl * mask).sum() / safe_tokens
    return LossOutput(loss=loss, clip_fraction=clip_fraction, kl=mean_kl, tokens=tokens)
