"""stable-baselines3 on RLHF-v0 through `SB3VecEnv`: the KL is SB3's policy's, the score is counted once."""

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from rlhf_env.agent import Agent
from rlhf_env.sb3 import SB3PolicyLogprobs, SB3VecEnv
from rlhf_env.vector_env import RLHFVectorEnv


@pytest.fixture
def venv():
    return SB3VecEnv.make(num_envs=3, max_new_tokens=5, beta=0.3)


def test_sb3_policy_kl_is_log_pi_sb3_minus_log_pi_ref(venv, reference_logprob):
    model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=24, seed=0)
    venv.attach(model)
    assert isinstance(SB3PolicyLogprobs(model), Agent)
    venv.seed(1)
    obs = venv.reset()
    queries = [obs["input_ids"][row][obs["attention_mask"][row].astype(bool)].tolist() for row in range(3)]
    steps: list[list] = [[], [], []]  # per row: (observation, action)
    finished = {}
    while len(finished) < 3:
        actions, _ = model.predict(obs, deterministic=False)
        for row in range(3):
            steps[row].append(({k: v[row : row + 1] for k, v in obs.items()}, actions[row]))
        obs, _, dones, infos = venv.step(actions)
        for row in np.flatnonzero(dones):
            finished.setdefault(row, (infos[row], list(steps[row])))
    for row, (info, trajectory) in finished.items():
        # log π_SB3(y|x), recomputed by SB3's own evaluate_actions from the stored observations
        batch = {k: np.concatenate([o[k] for o, _ in trajectory]) for k in trajectory[0][0]}
        obs_tensor, _ = model.policy.obs_to_tensor(batch)
        with torch.no_grad():
            _, logp, _ = model.policy.evaluate_actions(obs_tensor, torch.as_tensor([a for _, a in trajectory]))
        response = [int(a) for _, a in trajectory]
        expected = float(logp.sum()) - reference_logprob(venv.envs, queries[row], response)
        assert info["kl_sum"] == pytest.approx(expected, abs=1e-3)
        assert info["length"] == len(trajectory) and info["TimeLimit.truncated"] is False
        assert info["terminal_observation"]["attention_mask"].sum() == len(queries[row]) + len(trajectory)


class _Recorder(BaseCallback):
    def _on_step(self):
        for row, done in enumerate(self.locals["dones"]):
            if done:
                self.episodes.append((self.n_calls - 1, row, self.locals["infos"][row]))
        return True

    def _on_training_start(self):
        self.episodes = []


@pytest.mark.parametrize("algorithm", [PPO, A2C])
def test_sb3_learns_with_the_score_counted_once(venv, algorithm):
    model = algorithm("MultiInputPolicy", venv, n_steps=16, seed=0, **({"batch_size": 48} if algorithm is PPO
                                                                         else {}))
    venv.attach(model)
    recorder = _Recorder()
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=48, callback=recorder)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    assert len(model.ep_info_buffer) > 0  # SB3 logs ep_rew_mean from info["episode"]
    rewards = model.rollout_buffer.rewards  # (n_steps, n_envs) after SB3's own truncation bootstrap
    starts = model.rollout_buffer.episode_starts
    checked = 0
    for step, row, info in recorder.episodes:
        first = step - info["length"] + 1
        if first < 0 or not (first == 0 or starts[first, row]):
            continue  # the episode began before this rollout
        total = rewards[first : step + 1, row].sum()
        assert total == pytest.approx(info["episode"]["r"], abs=1e-4)
        assert total == pytest.approx(info["score"] - 0.3 * info["kl_sum"], abs=1e-4)  # no bootstrap on top
        checked += 1
    assert checked > 0


def test_sb3_vec_env_contract(venv):
    assert isinstance(venv, VecEnv) and venv.num_envs == 3
    with pytest.raises(ValueError, match="SameStep"):
        SB3VecEnv(RLHFVectorEnv(num_envs=2))
    with pytest.raises(TypeError, match="RLHFVectorEnv"):
        SB3VecEnv(object())
    with pytest.raises(TypeError, match="SB3 model"):
        venv.attach(object())
    venv.seed(5)
    first = venv.reset()
    venv.seed(5)
    assert np.array_equal(venv.reset()["input_ids"], first["input_ids"])  # seeds reach the env
    assert [i["prompt"] for i in venv.reset_infos] and venv.get_attr("beta") == [0.3] * 3
    assert venv.env_is_wrapped(object) == [False] * 3
