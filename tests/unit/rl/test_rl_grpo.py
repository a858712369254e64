"""GRPO maths against hand-computed values."""

import math

import pytest
import torch

from medmo_trainer.rl.grpo import clipped_policy_loss, completion_mask, group_advantages, k3_kl


def test_group_advantages_normalise_within_each_group():
    # group 1 [1,0,0,1]: mean 0.5, population std 0.5 -> [1,-1,-1,1]; group 2 constant -> zeros
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    assert adv.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-5)


def test_group_advantages_reject_ragged_batches():
    with pytest.raises(ValueError, match="multiple of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_completion_mask_pads_and_masks_truncated():
    lengths, truncated = torch.tensor([3, 1, 2]), torch.tensor([False, False, True])
    assert completion_mask(lengths, truncated, 3, mask_truncated=True).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert completion_mask(lengths, truncated, 3, mask_truncated=False).tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def _batch():
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])
    old = torch.zeros(2, 3)
    logp = ratios.log().clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, advantages, mask


def test_clip_higher_token_loss_by_hand():
    # clip range [1-0.2, 1+0.28] = [0.8, 1.28]
    # A=+1, ratios 1, 1.5, 0.5 -> min(r*A, clip(r)*A) = 1, 1.28 (clipped), 0.5
    # A=-1, ratios 1, 1.5, (masked) -> -1, -1.5 (unclipped is smaller)
    # token loss = -(1 + 1.28 + 0.5 - 1 - 1.5)/5 = -0.28/5 = -0.056
    logp, old, adv, mask = _batch()
    out = clipped_policy_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(-0.056)
    # only token (0, 1) has the clipped term binding among the 5 loss tokens -> 1/5
    assert out.clip_fraction.item() == pytest.approx(0.2)
    assert out.tokens.item() == 5
    out.loss.backward()
    # d/dlogp of -r*A/5 is -r*A/5 where unclipped binds, 0 where clipped binds or masked
    assert logp.grad.flatten().tolist() == pytest.approx([-0.2, 0.0, -0.1, 0.2, 0.3, 0.0])


def test_sequence_aggregation_and_normalizer():
    # per completion: (-1 -1.28 -0.5)/3 = -0.9266667 and (1 + 1.5)/2 = 1.25 -> mean 0.1616667
    logp, old, adv, mask = _batch()
    seq = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation="sequence")
    assert seq.loss.item() == pytest.approx(0.1616667, abs=1e-6)
    # a global normaliser (10 tokens across ranks) divides the same masked sum -0.28
    assert clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, normalizer=10.0).loss.item() == pytest.approx(-0.028)


def test_k3_kl_and_beta_term():
    # d = log 2 - 0: exp(d) - d - 1 = 2 - 0.6931472 - 1 = 0.3068528; zero for equal policies
    assert k3_kl(torch.zeros(1, 1), torch.full((1, 1), math.log(2))).item() == pytest.approx(0.3068528)
    assert k3_kl(torch.zeros(1, 1), torch.zeros(1, 1)).item() == 0.0
    logp = torch.zeros(1, 2, requires_grad=True)
    out = clipped_policy_loss(
        logp, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), 0.2, 0.28,
        ref_logp=torch.full((1, 2), math.log(2)), beta=0.1,
    )
    # advantage 0 leaves only 0.1 * 0.3068528 per token, averaged over 2 tokens
    assert out.loss.item() == pytest.approx(0.03068528)
    assert out.kl.item() == pytest.approx(0.3068528)
    with pytest.raises(ValueError, match="ref_logp"):
        clipped_policy_loss(logp, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), 0.2, 0.28, beta=0.1)


def test_all_truncated_batch_gives_zero_loss_with_a_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    out = clipped_policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), 0.2, 0.28)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert logp.grad.abs().sum().item() == 0.0
