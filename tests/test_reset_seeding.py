"""Seeds follow Gymnasium's rules on every vector path: a reset with a seed starts each row's generator anew
(row i with seed + i), a reset without one, and every autoreset, continues it. Compared step by step with
Gymnasium's own `SyncVectorEnv` over single envs, and with SB3's `DummyVecEnv` for `SB3VecEnv`."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO as SB3PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from rlhf_env.env import RLHFEnv
from rlhf_env.sb3 import SMALL_CONFIG, SB3VecEnv
from rlhf_env.vector_env import RLHFVectorEnv

N = 3
WORLD = {"max_new_tokens": 4}


def scripted_actions(step: int, eos: int, other: int) -> np.ndarray:
    """Row i emits EOS on every (i + 1)-th step, so rows end and autoreset at different times."""
    return np.array([eos if (step + 1) % (row + 1) == 0 else other for row in range(N)])


def resets_and_steps(envs, eos: int, other: int) -> list[np.ndarray]:
    """Observations through a seeded reset, two unseeded resets, a per-row seed list and autoresets in between."""
    seen = []
    for seed in (5, None, None, [11, None, 13]):
        obs, _ = envs.reset(seed=seed)
        seen.append(obs["input_ids"].copy())
        for step in range(7):
            obs, *_ = envs.step(scripted_actions(step, eos, other))
            seen.append(obs["input_ids"].copy())
    return seen


@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP])
def test_vector_env_draws_what_gymnasiums_sync_vector_env_draws(mode):
    ours = RLHFVectorEnv(num_envs=N, autoreset_mode=mode, **WORLD)
    eos = ours.world.eos_token_id
    other = next(t for t in range(ours.world.vocab_size) if t not in (eos, ours.world.pad_token_id))
    reference = gym.vector.SyncVectorEnv([lambda: RLHFEnv(**WORLD) for _ in range(N)], autoreset_mode=mode)
    for step, (a, b) in enumerate(zip(resets_and_steps(ours, eos, other), resets_and_steps(reference, eos, other))):
        assert np.array_equal(a, b), f"observation {step} differs"


def test_an_unseeded_reset_continues_the_seeded_generator_on_every_run():
    # The input: what `gym.make("RLHF-v0")` gives after reset(seed=5); reset(), the same on every run.
    single = gym.make("RLHF-v0")
    single.reset(seed=5)
    expected = single.reset()[1]["prompt"]
    for _ in range(2):
        envs = gym.make_vec("RLHF-v0", num_envs=1)
        envs.reset(seed=5)
        assert envs.reset()[1]["prompt"][0] == expected


def test_a_rejected_reset_leaves_the_generators_as_they_were():
    envs, twin = RLHFVectorEnv(num_envs=2), RLHFVectorEnv(num_envs=2)
    envs.reset(seed=1)
    twin.reset(seed=1)
    with pytest.raises(ValueError, match="split"):
        envs.reset(options={"split": "nope"})
    assert list(envs.reset()[1]["prompt"]) == list(twin.reset()[1]["prompt"])


def sb3_observations(venv, eos: int, other: int) -> list[np.ndarray]:
    seen = []
    venv.seed(5)
    for _ in range(3):  # the first reset takes the seeds, the later ones continue the generators
        seen.append(venv.reset()["input_ids"].copy())
        for step in range(7):
            venv.step_async(scripted_actions(step, eos, other))
            seen.append(venv.step_wait()[0]["input_ids"].copy())
    return seen


def test_sb3_vec_env_draws_what_sb3s_dummy_vec_env_draws():
    ours = SB3VecEnv.make(num_envs=N, kl_mode="policy", **WORLD)
    eos = ours.envs.world.eos_token_id
    other = next(t for t in range(ours.envs.world.vocab_size) if t not in (eos, ours.envs.world.pad_token_id))
    reference = DummyVecEnv([lambda: RLHFEnv(**WORLD) for _ in range(N)])
    for step, (a, b) in enumerate(zip(sb3_observations(ours, eos, other), sb3_observations(reference, eos, other))):
        assert np.array_equal(a, b), f"observation {step} differs"


def test_a_second_sb3_learn_is_reproducible():
    def two_learns():
        venv = SB3VecEnv.make(num_envs=4, **SMALL_CONFIG)
        model = SB3PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, n_epochs=1, seed=0, device="cpu")
        venv.attach(model)
        model.learn(total_timesteps=32)
        model.learn(total_timesteps=32)  # resets the env without a seed: continues the generators seeded by learn 1
        return np.concatenate([p.detach().numpy().ravel() for p in model.policy.parameters()])

    assert np.array_equal(two_learns(), two_learns())
