"""An RL step in micro-batches: their losses add up to the batch's, and settings that do not apply are refused."""

from __future__ import annotations

import pytest
import torch

from medmo_trainer.config import StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.exit_codes import ConfigError
from medmo_trainer.rl.grpo import clipped_policy_loss, completion_mask
from medmo_trainer.stages.rl import GRPOLearner


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batch_losses_over_the_batch_count_sum_to_the_batch_loss_and_gradient(aggregation):
    """As the learner splits a step: each micro-batch padded to its own longest completion, each loss
    divided by the whole batch's count of loss tokens (or completions), one completion cut and masked."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 2, 5, 6, 1])
    truncated = torch.tensor([False, True, False, False, False, False])
    width = int(lengths.max())
    logp = torch.randn(6, width, generator=generator).mul(0.1).sub(1.0).requires_grad_()
    old = logp.detach() + torch.randn(6, width, generator=generator).mul(0.05)
    advantages = torch.randn(6, generator=generator)
    mask = completion_mask(lengths, truncated, width, mask_truncated=True)
    whole = clipped_policy_loss(logp, old, advantages, mask, 0.15, 0.25, aggregation=aggregation)
    (whole_gradient,) = torch.autograd.grad(whole.loss, logp)

    count = mask.sum() if aggregation == "token" else (mask.sum(dim=1) > 0).sum()
    parts = []
    for start in range(0, 6, 2):
        rows = slice(start, start + 2)
        chunk_width = int(lengths[rows].max())
        chunk_mask = completion_mask(lengths[rows], truncated[rows], chunk_width, mask_truncated=True)
        parts.append(clipped_policy_loss(logp[rows, :chunk_width], old[rows, :chunk_width], advantages[rows],
                                         chunk_mask, 0.15, 0.25, aggregation=aggregation, normalizer=count).loss)
    (parts_gradient,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(whole.loss.item(), rel=1e-6)
    torch.testing.assert_close(parts_gradient, whole_gradient)


def test_an_rl_stage_refuses_gradient_accumulation_steps():
    config = StageConfig.model_validate({
        "run": "medmo", "stage": "grpo", "type": "rl", "model": {"base": "preset:tiny-qwen3-vl"},
        "storage": {"uri": "file:///nowhere"}, "outputUri": "file:///nowhere/model",
        "checkpointUri": "file:///nowhere/checkpoints", "datasets": [{"name": "boxes", "uri": "file:///nowhere/data"}],
        "hyperparameters": {"gradientAccumulationSteps": 4, "perDeviceBatchSize": 2},
        "strategy": {"name": "deepspeed", "zeroStage": 3},
        "rl": {"rolloutUrls": ["http://rollout:8000"], "rewardUrls": ["http://reward:8000"]},
    })
    with pytest.raises(ConfigError, match="gradientAccumulationSteps does not apply.*perDeviceBatchSize"):
        GRPOLearner.build(config, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
