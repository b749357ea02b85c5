"""Swapping the env's reward model between rollouts (`set_reward_model`, what an iterated reward model does): the
episodes that end afterwards are scored by the new model, and a swap that cannot work is refused with nothing
changed."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2Model

import rlhf_env  # noqa: F401  (registers the envs)
from rlhf_env.reward_model import RewardModel
from rlhf_env.vector_env import RLHFVectorEnv


def scores_of_a_rollout(envs, seed: int = 0) -> list[float]:
    """Run every row to its episode's end from a seeded reset, always sampling; the finished episodes' scores."""
    envs.reset(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    done, scores = np.zeros(envs.num_envs, bool), [np.nan] * envs.num_envs
    while not done.all():
        actions = torch.multinomial(envs.next_token_distribution().exp(), 1, generator=generator)[:, 0].numpy()
        _, _, terminated, truncated, infos = envs.step(actions)
        for row in np.flatnonzero((terminated | truncated) & ~done):
            scores[row], done[row] = float(infos["score"][row]), True
    return scores


def shifted(reward_model: RewardModel, by: float) -> RewardModel:
    new = copy.deepcopy(reward_model)
    with torch.no_grad():
        new.head.bias += by
    return new


def test_episodes_after_the_swap_are_scored_by_the_new_model(reward_model, policy, tokenizer):
    envs = RLHFVectorEnv(num_envs=4, policy=policy, reference=copy.deepcopy(policy), tokenizer=tokenizer,
                         reward_model=reward_model, max_new_tokens=6)
    before = scores_of_a_rollout(envs)
    envs.set_reward_model(shifted(reward_model, 1.5))
    after = scores_of_a_rollout(envs)  # the same episodes (same seeds, same policy), the new model's scores
    np.testing.assert_allclose(after, np.array(before) + 1.5, atol=1e-5)
    assert envs.reward_model is not reward_model and envs.world.reward_sources[0].model is envs.reward_model


def test_a_named_reward_model_is_swapped_by_name(reward_model, policy, tokenizer):
    envs = RLHFVectorEnv(num_envs=2, policy=policy, reference=copy.deepcopy(policy), tokenizer=tokenizer,
                         rewards={"rm": reward_model, "length": lambda prompts, responses: [0.0] * len(prompts)},
                         max_new_tokens=6)
    before = scores_of_a_rollout(envs)
    envs.set_reward_model(shifted(reward_model, -2.0), name="rm")
    np.testing.assert_allclose(scores_of_a_rollout(envs), np.array(before) - 2.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"name must be one of the reward models of rewards= \['rm'\]"):
        envs.set_reward_model(reward_model, name="length")  # a function, not a model


def test_a_swap_that_cannot_work_is_refused_with_nothing_changed(reward_model, policy, tokenizer, task):
    envs = RLHFVectorEnv(num_envs=2, policy=policy, reference=copy.deepcopy(policy), tokenizer=tokenizer,
                         reward_model=reward_model, max_new_tokens=6)
    def tiny(vocab_size: int, n_positions: int) -> RewardModel:
        return RewardModel(GPT2Model(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=8, n_layer=1,
                                                n_head=1, bos_token_id=0, eos_token_id=0)))

    small, short = tiny(16, 64), tiny(len(tokenizer), 4)
    for model, match in ((small, "vocabulary"), (short, "reads 4 positions"), (object(), "expected a RewardModel")):
        with pytest.raises(ValueError, match=match):
            envs.set_reward_model(model)
        assert envs.reward_model is reward_model and envs.world.reward_sources[0].model is reward_model
    with pytest.raises(ValueError, match="single reward; drop name"):
        envs.set_reward_model(reward_model, name="rm")
    with gym.make("RLHF-v0", policy=policy, reference=copy.deepcopy(policy), tokenizer=tokenizer,
                  reward_fn=task.gold_reward) as env:
        with pytest.raises(ValueError, match="scored by a reward function"):
            env.unwrapped.set_reward_model(reward_model)
