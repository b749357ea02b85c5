"""A split batch gives the same update as the whole batch: for every agent and every option that splits a batch
(PPO's gradient accumulation, REINFORCE's and DPO's micro-batches), the accumulated gradient equals the unsplit
one on batches of unequal lengths. Each loss is normalised by the token (or episode) count of the whole batch,
counted before the micro-batches run."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.core import policy_loss, value_loss
from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig

TOLERANCE = 1e-5  # relative L2: float rounding only


def first_step_gradient(agent) -> torch.Tensor:
    """Run one update and return the gradient the optimizer's first step was taken with (flattened)."""
    gradients = []
    step = agent.optimizer.step

    def recording_step(*args, **kwargs):
        gradients.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                    for p in agent.params]).clone())
        return step(*args, **kwargs)

    agent.optimizer.step = recording_step
    agent.update()
    assert gradients, "the update took no optimizer step"
    return gradients[0]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def envs(num_envs: int = 8, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=16, **kwargs)


def test_the_smallest_split_weights_every_token_as_the_whole_minibatch_does():
    # One minibatch of two episodes with 1 and 3 response tokens, split into two micro-batches of one episode.
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    advantages = torch.ones(2, 3) * mask
    old_logprobs = torch.full((2, 3), -1.0)
    whole = torch.full((2, 3), -1.0, requires_grad=True)
    policy_loss(whole, old_logprobs, advantages, mask, 0.2)[0].backward()
    split = torch.full((2, 3), -1.0, requires_grad=True)
    num_tokens = mask.sum()  # the minibatch's, decided before its micro-batches run
    for rows in ([0], [1]):
        policy_loss(split[rows], old_logprobs[rows], advantages[rows], mask[rows], 0.2, num_tokens)[0].backward()
    # d loss / d logprob_t = −A_t·ratio / 4 for each of the 4 tokens (a per-micro-batch mean gives 1/2 and 1/6).
    assert torch.allclose(whole.grad, -mask / 4) and torch.allclose(split.grad, -mask / 4)


def test_value_loss_shares_add_up_to_the_whole_minibatch():
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    values, returns = torch.tensor([[0.5, 0, 0], [0.1, -0.2, 0.3]]), torch.tensor([[1.0, 0, 0], [0.0, 0.0, 1.0]])
    whole, stats = value_loss(values, values, returns, mask, None)
    num_tokens = mask.sum()
    parts = [value_loss(values[r], values[r], returns[r], mask[r], None, num_tokens)[0] for r in ([0], [1])]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.parametrize("options", [
    {},
    {"ent_coef": 0.01, "whiten_rewards": True},
    {"ptx_coef": 0.5, "ptx_batch_size": 6},
    {"separate_critic": True, "clip_range_value": None},
], ids=["plain", "entropy", "ptx", "separate_critic"])
def test_ppo_gradient_accumulation_equals_the_whole_minibatch(options):
    config = dict(episodes_per_update=8, minibatch_size=8, update_epochs=1, max_grad_norm=1e9, seed=0, **options)
    whole = first_step_gradient(PPO(envs(), PPOConfig(**config), progress=False))
    for steps in (2, 4):
        split = first_step_gradient(PPO(envs(), PPOConfig(gradient_accumulation_steps=steps, **config),
                                        progress=False))
        assert relative_difference(split, whole) <= TOLERANCE, steps


def test_ppo_rollouts_here_have_unequal_lengths():
    # The equality above is only a test of the normaliser if the episodes differ in length.
    agent = PPO(envs(), PPOConfig(episodes_per_update=8, minibatch_size=8, update_epochs=1, seed=0), progress=False)
    metrics = agent.update()
    assert metrics["episode/length"] != metrics["episode/length_p90"]


@pytest.mark.parametrize("options", [
    {"baseline": "value"},
    {"baseline": "value", "reward_to_go": True},
    {"baseline": "rloo"},
    {"baseline": "rloo", "advantage_norm": "group_std"},
    {"baseline": "moving_average"},
    {"baseline": "none"},
], ids=["value", "value-reward_to_go", "rloo", "rloo-group_norm", "moving_average", "none"])
def test_reinforce_micro_batches_equal_the_whole_batch(options):
    config = dict(episodes_per_update=8, samples_per_prompt=2, max_grad_norm=1e9, seed=0, **options)
    whole_agent = Reinforce(envs(beta=0.05), ReinforceConfig(**config), progress=False)
    whole = first_step_gradient(whole_agent)
    assert whole_agent.logger.history[-1]["episode/length"] != whole_agent.logger.history[-1]["episode/length_p90"]
    for micro in (1, 2, 4):
        split = first_step_gradient(Reinforce(envs(beta=0.05), ReinforceConfig(micro_batch_size=micro, **config),
                                              progress=False))
        assert relative_difference(split, whole) <= TOLERANCE, micro


def odd_words_nan(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan") if len(r.split()) % 2 else float(len(r.split())) for r in responses]


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "value"])
def test_split_batches_with_masked_episodes_equal_the_whole_batch(algorithm):
    # Masked episodes leave the token and episode counts: the denominators must still be the whole batch's.
    def agent(split: int):
        world = envs(beta=0.05, reward_fn=odd_words_nan, nonfinite_reward="mask")
        if algorithm == "ppo":
            return PPO(world, PPOConfig(episodes_per_update=8, minibatch_size=8, update_epochs=1, max_grad_norm=1e9,
                                        gradient_accumulation_steps=split, seed=0), progress=False)
        return Reinforce(world, ReinforceConfig(episodes_per_update=8, samples_per_prompt=4, baseline=algorithm,
                                                micro_batch_size=8 // split, max_grad_norm=1e9, seed=0),
                         progress=False)

    whole_agent = agent(1)
    whole = first_step_gradient(whole_agent)
    assert 0 < whole_agent.logger.history[-1]["episode/score_masked"] < 8
    for split in (2, 4):
        assert relative_difference(first_step_gradient(agent(split)), whole) <= TOLERANCE, split


def test_dpo_micro_batches_equal_the_whole_batch(tmp_path, small_pairs):
    # DPO already summed its per-pair losses over the whole batch: this guards that it stays so.
    pairs = small_pairs(64)
    config = dict(batch_size=8, max_grad_norm=1e9, pairs=pairs, eval_pairs=pairs, seed=0)
    whole = first_step_gradient(DPO(envs(beta=0.1), DPOConfig(**config), progress=False))
    for micro in (1, 2, 4):
        split = first_step_gradient(DPO(envs(beta=0.1), DPOConfig(micro_batch_size=micro, **config),
                                        progress=False))
        assert relative_difference(split, whole) <= TOLERANCE, micro


def test_reinforce_value_loss_is_a_mean_over_the_batch_tokens():
    """The logged value loss of a split batch is the whole batch's token mean (not a mean of micro-batch means)."""
    config = dict(episodes_per_update=8, samples_per_prompt=2, baseline="value", seed=0)
    whole = Reinforce(envs(beta=0.05), ReinforceConfig(**config), progress=False).update()
    split = Reinforce(envs(beta=0.05), ReinforceConfig(micro_batch_size=1, **config), progress=False).update()
    assert split["loss/value"] == pytest.approx(whole["loss/value"], rel=1e-5)
    assert split["policy/entropy"] == pytest.approx(whole["policy/entropy"], rel=1e-5)
    assert np.isfinite(whole["loss/value"]) and whole["loss/value"] > 0
