"""The agents' shared math against hand-computed values."""

import math

import pytest
import torch

from agents.core import (
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)


def test_gae_with_a_constant_critic_and_a_terminal_score():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.full((1, 3), 0.5)
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # δ = [0, 0, 1 − 0.5] (no value after the terminal token); A_t = δ_t + γλ·A_{t+1}.
    assert advantages.tolist()[0] == pytest.approx([0.95**2 * 0.5, 0.95 * 0.5, 0.5])
    assert returns.tolist()[0] == pytest.approx([0.5 + 0.95**2 * 0.5, 0.5 + 0.95 * 0.5, 1.0])


def test_gae_ignores_padding_after_an_episode_that_hit_the_token_cap():
    # Row 0 ended at the cap (3 tokens, terminated with the score); row 1 ended with EOS after 2 tokens.
    rewards = torch.tensor([[-0.1, -0.1, 0.7], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.2, 0.2], [0.5, 0.5, 7.0]])  # 7.0 sits on padding and must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # λ = 1: A_t = (sum of rewards from t) − V_t, no bootstrap after the last real token.
    assert advantages[0].tolist() == pytest.approx([0.5 - 0.2, 0.6 - 0.2, 0.7 - 0.2])
    assert advantages[1].tolist() == pytest.approx([1.0 - 0.5, 1.0 - 0.5, 0.0])
    assert returns[1].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_gae_discounts_with_gamma():
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.9,
                              lam=1.0)
    assert returns.tolist()[0] == pytest.approx([0.81, 0.9, 1.0])


def test_gae_checks_shapes():
    with pytest.raises(ValueError, match="same"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_masked_statistics_skip_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # Rewards keep their mean (and sign): only the scale changes; unbiased variance here is exactly 1.
    assert masked_whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(1.5))  # ratio 1.5 on both tokens
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logprobs, old, torch.tensor([[1.0, 1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"] == 1.0  # positive advantage: clipped at 1.2
    loss, stats = policy_loss(logprobs, old, torch.tensor([[-1.0, -1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(1.5) and stats["clipfrac"] == 0.0  # negative: pessimistic, unclipped
    loss, stats = policy_loss(old, old, torch.tensor([[0.3, -0.1]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.1) and stats["ratio"] == 1.0 and stats["approx_kl"] == 0.0


def test_clipped_value_loss_by_hand():
    mask = torch.ones(1, 1)
    loss, stats = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and stats["clipfrac"] == 1.0  # the clipped value 0.2 counts
    loss, _ = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), mask, None)
    assert loss.item() == 0.0


def test_logprobs_entropy_and_explained_variance():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    assert entropy_from_logits(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask) == pytest.approx(0.0)
