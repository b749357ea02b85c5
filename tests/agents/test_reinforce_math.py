"""REINFORCE's estimator: baselines against hand-computed values, and unbiasedness on a toy problem whose exact
gradient is known (the seed's mean-log-prob sketch and a self-including group baseline fail the same check)."""

import pytest
import torch

from agents.core import group_std, reinforce_loss, reward_to_go, rloo_baseline


def test_rloo_baseline_excludes_the_sample_itself():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 0.0])
    expected = [11 / 3, 10 / 3, 9 / 3, 6 / 3, 4 / 3, 4 / 3, 0.0, 4 / 3]
    assert rloo_baseline(returns, 4).tolist() == pytest.approx(expected)
    assert rloo_baseline(torch.tensor([1.0, 5.0]), 2).tolist() == [5.0, 1.0]


def test_group_std_and_shape_contracts():
    returns = torch.tensor([1.0, 3.0, 2.0, 2.0])
    assert group_std(returns, 2).tolist() == pytest.approx([2**0.5, 2**0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="multiple"):
        rloo_baseline(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="k ≥ 2"):
        rloo_baseline(torch.zeros(4), 1)


def test_reward_to_go_sums_the_future_within_each_episode():
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [-0.5, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 9.0 is padding
    assert torch.allclose(reward_to_go(rewards, mask), torch.tensor([[0.7, 0.8, 1.0], [1.5, 2.0, 0.0]]))


def test_reinforce_loss_sums_tokens_and_averages_episodes():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, 2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = reinforce_loss(logprobs, advantages, mask)
    assert loss.item() == pytest.approx(-((2 * -1 + 2 * -2) + (-1 * -0.5)) / 2)
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.0, -1.0], [0.5, 0.0]]  # −A·mask / B; padding gets nothing


# A two-token toy: token 0 at the first step is EOS (a one-token episode); otherwise a second token follows.
REWARD_EOS = 0.8
REWARD = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.2, 2.0, -0.5]])  # REWARD[y1, y2] for y1 ≠ 0


def exact_gradient(theta):
    """∇ E[G] by enumerating all episodes."""
    theta = theta.detach().clone().requires_grad_(True)
    p1, p2 = torch.softmax(theta[0], 0), torch.softmax(theta[1], 0)
    value = p1[0] * REWARD_EOS + (p1[1:, None] * p2[None, :] * REWARD[1:]).sum()
    return torch.autograd.grad(value, theta)[0]


def estimated_gradient(theta, baseline, k=4, groups=100_000, seed=0):
    """The estimator's mean over groups × k sampled episodes, with the loss the agent uses."""
    generator = torch.Generator().manual_seed(seed)
    theta = theta.detach().clone().requires_grad_(True)
    logp1, logp2 = torch.log_softmax(theta[0], 0), torch.log_softmax(theta[1], 0)
    n = groups * k
    y1 = torch.multinomial(logp1.exp().detach(), n, replacement=True, generator=generator)
    y2 = torch.multinomial(logp2.exp().detach(), n, replacement=True, generator=generator)
    mask = torch.stack([torch.ones(n), (y1 != 0).float()], 1)  # (N, 2)
    returns = torch.where(y1 == 0, torch.tensor(REWARD_EOS), REWARD[y1, y2])  # (N,)
    logprobs = torch.stack([logp1[y1], logp2[y2]], 1)  # (N, 2)
    if baseline == "none":
        advantages = returns[:, None].expand(-1, 2)
    elif baseline == "moving_average":  # any constant
        advantages = (returns - 0.5)[:, None].expand(-1, 2)
    elif baseline == "rloo":
        advantages = (returns - rloo_baseline(returns, k))[:, None].expand(-1, 2)
    elif baseline == "value":  # any function of the state: b(s_0) = 0.3, b(s_1) = 0.25·y1
        advantages = returns[:, None] - torch.stack([torch.full((n,), 0.3), 0.25 * y1], 1)
    elif baseline == "group_mean_including_self":  # biased: the sample is part of its own baseline
        advantages = (returns - returns.view(-1, k).mean(1).repeat_interleave(k))[:, None].expand(-1, 2)
    if baseline == "mean_logprob":  # the seed's sketch: the mean token log-prob times the reward
        loss = -(returns * (logprobs * mask).sum(1) / mask.sum(1)).mean()
    else:
        loss = reinforce_loss(logprobs, advantages * mask, mask)
    return -torch.autograd.grad(loss, theta)[0]


THETA = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]])


@pytest.mark.parametrize("baseline", ["none", "moving_average", "rloo", "value"])
def test_the_estimator_is_unbiased_with_every_baseline(baseline):
    exact = exact_gradient(THETA)
    estimate = estimated_gradient(THETA, baseline)
    assert exact.abs().max() > 0.1
    assert torch.allclose(estimate, exact, atol=0.01), (estimate, exact)


@pytest.mark.parametrize("wrong", ["mean_logprob", "group_mean_including_self"])
def test_the_same_check_catches_biased_estimators(wrong):
    exact = exact_gradient(THETA)
    assert not torch.allclose(estimated_gradient(THETA, wrong), exact, atol=0.01)
