"""The env and the agents on a CUDA device (fp32 and bf16). Every test here skips without CUDA: CI has no GPU; the
GPU check (``python -m benchmarks.gpu_check``) runs this file on a CUDA machine and reports it in docs/gpu.md."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env.lm import pad_left, pad_right, response_logprobs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def act(envs, rng) -> np.ndarray:
    """One sampled action per row, from the distribution the env computed (as an LM agent samples)."""
    logp = envs.unwrapped.next_token_logprobs
    return np.array([rng.choice(len(row), p=np.exp(row) / np.exp(row).sum()) for row in logp])


def test_the_kl_seam_is_exact_on_cuda_in_fp32():
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8, device="cuda").unwrapped
    assert envs.world.device.type == "cuda"
    with torch.no_grad():  # make π differ from π_ref, so the seam has something to measure
        for p in envs.world.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokenizer, policy, reference = envs.tokenizer, envs.world.policy, envs.world.reference
    envs.reset(seed=0)
    rng, checked = np.random.default_rng(0), 0
    while checked < 8:
        queries = envs.queries()
        responses = [list(r) for r in envs._episodes.responses]
        actions = act(envs, rng)
        _, _, terminated, _, infos = envs.step(actions)
        for row in np.flatnonzero(terminated):
            q, qm = pad_left([queries[row]], tokenizer.pad_token_id)
            r, rm = pad_right([responses[row] + [int(actions[row])]], tokenizer.pad_token_id)
            q, qm, r, rm = (t.to("cuda") for t in (q, qm, r, rm))
            with torch.no_grad():
                exact = response_logprobs(policy, q, qm, r, rm).sum() - response_logprobs(reference, q, qm, r, rm).sum()
            assert infos["kl_sum"][row] == pytest.approx(float(exact), abs=1e-4)
            checked += 1


def test_a_bf16_env_runs_whole_episodes_with_finite_rewards():
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, device="cuda", dtype=torch.bfloat16).unwrapped
    assert next(envs.world.policy.parameters()).dtype == torch.bfloat16
    envs.reset(seed=0)
    rng, finished = np.random.default_rng(0), 0
    while finished < 16:
        _, rewards, terminated, _, infos = envs.step(act(envs, rng))
        assert np.isfinite(rewards).all()
        finished += int(terminated.sum())
        if terminated.any():
            assert np.isfinite(infos["score"][terminated]).all()


@pytest.mark.parametrize("make", [
    lambda envs, pairs: PPO(envs, PPOConfig(episodes_per_update=16, minibatch_size=8), progress=False),
    lambda envs, pairs: Reinforce(envs, ReinforceConfig(episodes_per_update=16), progress=False),
    lambda envs, pairs: DPO(envs, DPOConfig(batch_size=8, pairs=pairs(16), eval_pairs=pairs(8, "eval")),
                            progress=False),
], ids=["ppo", "rloo", "dpo"])
def test_each_agent_updates_on_cuda_and_its_checkpoint_loads_on_the_cpu(make, small_pairs, tmp_path):
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, device="cuda")
    agent = make(envs, small_pairs)
    before = [p.detach().clone() for p in agent.lm.parameters()]
    metrics = agent.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.lm.parameters()))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    agent.save(tmp_path / "model")
    cpu = type(agent).load(tmp_path / "model", gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, device="cpu"),
                           progress=False)
    for a, b in zip(agent.lm.parameters(), cpu.lm.parameters()):
        assert torch.equal(a.cpu(), b)
