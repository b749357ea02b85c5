"""The KL-regularised optimum estimate: exact for a constant reward, between E[r] and max r otherwise."""

import gymnasium as gym
import numpy as np
import pytest

import agents.evaluate
import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.evaluate import evaluate, kl_regularised_optimum
from agents.rollout import collect_episodes


def test_optimum_of_a_constant_reward_is_that_constant():
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=6)
    result = kl_regularised_optimum(envs, lambda prompt, response: 0.25, beta=0.1, n_prompts=3, n_samples=4)
    assert result["optimum"] == pytest.approx(0.25) and result["ess_mean"] == pytest.approx(4.0)


def test_optimum_lies_between_the_mean_and_the_best_sample():
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=6)
    task = envs.unwrapped.task
    low = kl_regularised_optimum(envs, task.gold, beta=100.0, n_prompts=4, n_samples=32)  # β → ∞: the mean
    high = kl_regularised_optimum(envs, task.gold, beta=0.01, n_prompts=4, n_samples=32)  # β → 0: the max
    assert low["optimum"] < high["optimum"] <= task.best_gold + 1e-9


def test_evaluate_uses_held_out_prompts_and_leaves_beta_alone(monkeypatch):
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=6, kl_target=1.0)
    beta = envs.unwrapped.beta
    seen = []

    def recording_collect(*args, **kwargs):
        batch = collect_episodes(*args, **kwargs)
        seen.extend(batch.prompts)
        return batch

    monkeypatch.setattr(agents.evaluate, "collect_episodes", recording_collect)
    stats = evaluate(envs, 8)
    assert len(seen) == 8 and set(seen) <= set(envs.unwrapped.task.eval_prompts())
    assert stats["episodes"] == 8 and envs.unwrapped.beta == beta
    assert np.isfinite(stats["objective/gold_score"])
