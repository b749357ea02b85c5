"""kl_mode="reference" for agents with their own policy, and the adaptive KL controller inside the env."""

import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from rlhf_env.env import RLHFEnv
from rlhf_env.vector_env import RLHFVectorEnv


def _fixed_action_episode(env, actions, seed):
    env.reset(seed=seed)
    out = []
    for action in actions:
        _, reward, terminated, _, info = env.step(int(action))
        out.append((reward, info))
        if terminated:
            return out
    raise AssertionError("episode did not end")


def test_reference_mode_pays_beta_log_pi_ref_and_runs_no_policy():
    env = RLHFEnv(kl_mode="reference", beta=0.3)
    assert env.policy is None and env._episodes.decoder.models == [env.reference]  # no policy model, no policy forward
    with pytest.raises(RuntimeError, match="kl_mode='reference'"):
        _ = env.next_token_logprobs
    full = RLHFEnv(beta=0.3)  # the same episode with π = π_SFT in the env
    actions = np.random.default_rng(0).integers(4, env.world.vocab_size, full.world.max_new_tokens)
    for (reward, info), (full_reward, full_info) in zip(_fixed_action_episode(env, actions, 4),
                                                        _fixed_action_episode(full, actions, 4)):
        assert info["logprob"] == 0.0 and info["kl"] == -info["ref_logprob"]
        assert info["ref_logprob"] == pytest.approx(full_info["ref_logprob"], abs=1e-5)  # alone vs stacked: rounding
        # reference mode = policy mode + β·log π: the half of the KL the agent brings itself.
        assert reward == pytest.approx(full_reward + 0.3 * full_info["logprob"], abs=1e-5)
    assert info["score"] == pytest.approx(full_info["score"], abs=1e-6)


def test_reference_mode_passes_sb3_check_and_runs_vectorised():
    sb3_check_env(RLHFEnv(kl_mode="reference"))
    envs = RLHFVectorEnv(num_envs=3, kl_mode="reference")
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, reward, _, _, info = envs.step(rng.integers(0, envs.world.vocab_size, 3))
        assert np.isfinite(reward).all()
        if "logprob" in info:
            assert not info["logprob"].any()


@pytest.mark.parametrize("kwargs", [dict(policy="perturbed"), dict(kl_estimator="k3"), dict(kl_target=3.0),
                                    dict(kl_mode="ppo")])
def test_reference_mode_rejects_what_it_cannot_honour(kwargs, perturbed_policy):
    if kwargs.get("policy") == "perturbed":
        kwargs = dict(kwargs, policy=perturbed_policy())
    with pytest.raises(ValueError):
        RLHFEnv(**{"kl_mode": "reference", **kwargs})


def test_adaptive_beta_with_batches_of_one_moves_after_every_finished_episode_by_ziegler_rule(perturbed_policy):
    env = RLHFEnv(policy=perturbed_policy(scale=0.05), beta=0.2, kl_target=1.0, kl_horizon=50, kl_batch_episodes=1)
    rng = np.random.default_rng(0)
    betas = []
    for seed in range(4):
        env.reset(seed=seed)
        terminated = False
        while not terminated:
            logp = env.next_token_logprobs
            _, _, terminated, _, info = env.step(int(rng.choice(len(logp), p=np.exp(logp) / np.exp(logp).sum())))
        error = np.clip(info["kl_sum"] / 1.0 - 1, -0.2, 0.2)
        assert env.beta == pytest.approx(info["beta"] * (1 + error / 50))  # β used in the episode → next β
        betas.append(env.beta)
    assert len(set(betas)) == 4
