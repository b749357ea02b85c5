"""A masked reward is not data. With ``nonfinite_reward="mask"`` the env pays 0.0 in place of a NaN/inf score and
flags it (``info["score_nonfinite"]``); the agents carry the flag into their episodes, and masked episodes get no
loss and enter no baseline, group statistic, whitening or logged mean of the score (their count is logged)."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.ppo
import agents.reinforce
import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.core import group_counts, group_std, rloo_baseline
from agents.evaluate import best_of_n, evaluate
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig


def odd_words_nan(prompts: list[str], responses: list[str]) -> list[float]:
    """NaN for responses with an odd number of words, 1.0 otherwise."""
    return [math.nan if len(response.split()) % 2 else 1.0 for response in responses]


def always_nan(prompts: list[str], responses: list[str]) -> list[float]:
    return [math.nan] * len(responses)


def masked_envs(reward_fn=odd_words_nan, num_envs=16, beta=0.0, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=10, beta=beta, reward_fn=reward_fn,
                        nonfinite_reward="mask", **kwargs)


def test_rloo_leaves_a_sample_without_a_valid_other_out():
    # The smallest input: K = 2, β = 0, one sample's reward NaN (masked to 0.0), the other's 1.0.
    returns, valid = torch.tensor([0.0, 1.0]), torch.tensor([False, True])
    usable = valid & (group_counts(valid, 2) >= 2)
    advantages = (returns - rloo_baseline(returns, 2, usable)) * usable
    assert usable.tolist() == [False, False] and advantages.tolist() == [0.0, 0.0]  # nothing left to learn from
    # With a third valid sample, the masked one is nobody's baseline.
    returns, valid = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([False, True, True])
    assert rloo_baseline(returns, 3, valid)[1:].tolist() == [3.0, 1.0]


def test_group_std_is_taken_over_valid_samples_only():
    returns, valid = torch.tensor([5.0, 1.0, 3.0, 0.0]), torch.tensor([False, True, True, True])
    assert group_std(returns, 4, valid)[0] == pytest.approx(float(torch.tensor([1.0, 3.0, 0.0]).std()))
    assert group_std(returns, 4)[0] == pytest.approx(float(returns.std()))  # without a mask: every sample


def test_reinforce_learns_nothing_when_every_valid_return_is_equal(digest):
    # The run: NaN for odd word counts, 1.0 otherwise, β = 0: every valid episode returns 1.0, so every
    # advantage is 0 (observed before: +1/3 to +1 for the valid episodes, and objective/score 0.625).
    envs = masked_envs()
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=16, samples_per_prompt=4), progress=False)
    before = digest(envs.unwrapped.policy)
    metrics = agent.update()
    assert metrics["episode/score_masked"] > 0
    assert metrics["objective/score"] == 1.0 and metrics["objective/rlhf_reward"] == 1.0
    assert metrics["train/no_signal"] == 1 and digest(envs.unwrapped.policy) == before


@pytest.mark.parametrize("baseline", ["moving_average", "none", "value"])
def test_other_baselines_take_no_data_from_masked_episodes(baseline, monkeypatch):
    calls = []
    real = agents.reinforce.reinforce_loss

    def recording_loss(logprobs, advantages, mask, num_episodes=None, *args):
        calls.append((mask.clone(), float(num_episodes)))
        return real(logprobs, advantages, mask, num_episodes, *args)

    monkeypatch.setattr(agents.reinforce, "reinforce_loss", recording_loss)
    envs = masked_envs(beta=0.05)  # β > 0: a masked episode's return (−β·KL) is not 0, so it would weigh in
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=16, samples_per_prompt=4, baseline=baseline),
                      progress=False)
    episodes = []
    real_rollout = agents.reinforce.rollout
    monkeypatch.setattr(agents.reinforce, "rollout",
                        lambda a, prompts: episodes.append(real_rollout(a, prompts)) or episodes[-1])
    metrics = agent.update()
    masked = np.array(episodes[0].score_nonfinite)
    assert 0 < masked.sum() < 16 and metrics["episode/score_masked"] == masked.sum()
    (mask, num_episodes), = calls
    assert (mask[torch.from_numpy(masked)] == 0).all() and num_episodes == 16 - masked.sum()
    if baseline == "moving_average":  # the average moves toward the mean *valid* return only
        valid_returns = [sum(r) for r, m in zip(episodes[0].rewards, masked) if not m]
        assert agent.moving_average == pytest.approx(0.1 * np.mean(valid_returns))
    if baseline == "value":  # zero-initialised head: values 0, so the loss is ½·mean over valid tokens of G²
        valid = [(sum(r), len(r)) for r, m in zip(episodes[0].rewards, masked) if not m]
        expected = 0.5 * sum(g * g * n for g, n in valid) / sum(n for _, n in valid)
        assert metrics["loss/value"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce-value", "reinforce-rloo"])
def test_a_batch_of_masked_episodes_changes_nothing(algorithm, digest):
    envs = masked_envs(always_nan, num_envs=8)
    if algorithm == "ppo":
        agent = PPO(envs, PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=2), progress=False)
        trained = agent.model
    else:
        config = ReinforceConfig(episodes_per_update=8, samples_per_prompt=2, baseline=algorithm.split("-")[1])
        agent = Reinforce(envs, config, progress=False)
        trained = agent.model or agent.lm
    before = digest(trained)
    metrics = agent.update()
    assert metrics["episode/score_masked"] == 8 and math.isnan(metrics["objective/score"])
    assert digest(trained) == before
    if algorithm == "ppo":
        assert metrics["train/empty_minibatches"] == 4  # 2 epochs × 2 minibatches, none with a valid token
    else:
        assert metrics["train/no_signal"] == 1


def test_ppo_gives_masked_episodes_no_advantage_and_whitens_over_valid_tokens_only(monkeypatch):
    calls = []
    real = agents.ppo.policy_loss

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        calls.append((advantages.detach().clone(), mask.clone()))
        return real(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(agents.ppo, "policy_loss", recording_policy_loss)
    agent = PPO(masked_envs(num_envs=8), PPOConfig(episodes_per_update=8, minibatch_size=8, update_epochs=1),
                progress=False)
    metrics = agent.update()
    assert 0 < metrics["episode/score_masked"] < 8 and metrics["objective/score"] == 1.0
    advantages, mask = calls[0]
    masked_rows = mask.sum(1) == 0
    assert int(masked_rows.sum()) == metrics["episode/score_masked"]  # masked episodes carry no loss
    assert (advantages[masked_rows] == 0).all()
    valid = advantages[mask.bool()]  # whitened over the valid tokens alone: mean 0, unit (Bessel) variance
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-5) and float(valid.std()) == pytest.approx(1.0, rel=1e-4)


def test_evaluation_leaves_masked_scores_out_of_the_score_mean():
    stats = evaluate(masked_envs(), 32)
    assert 0 < stats["episode/score_masked"] < 32 and stats["objective/score"] == 1.0


def test_best_of_n_never_prefers_a_masked_sample():
    stats = best_of_n(masked_envs(), n=4, n_episodes=16)
    assert stats["objective/score"] == 1.0
    with pytest.raises(ValueError, match="returned nan"):  # the default nonfinite_reward="raise" raises
        best_of_n(gym.make_vec("RLHF-v0", num_envs=2, max_new_tokens=10, reward_fn=always_nan), n=2, n_episodes=2)


def test_episodes_carry_the_flag():
    agent = Reinforce(masked_envs(num_envs=8), ReinforceConfig(episodes_per_update=8, samples_per_prompt=2),
                      progress=False)
    from agents.common import rollout

    episodes = rollout(agent)
    flags = np.array(episodes.score_nonfinite)
    odd = np.array([len(t.split()) % 2 == 1 for t in episodes.texts])
    assert np.array_equal(flags, odd) and flags.any()
    assert all(score == 0.0 for score, flag in zip(episodes.scores, flags) if flag)
