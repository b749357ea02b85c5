"""stable-baselines3 on RLHF-v0: an SB3 `VecEnv` over the native batched env, with the KL computed for SB3's policy.

SB3 rejects Gymnasium vector envs and expects its own `VecEnv` (reset returns only observations, ``step`` returns
``(obs, rewards, dones, infos)`` with one info dict per row and resets finished rows at once, the finished
observation in ``info["terminal_observation"]``). `SB3VecEnv` gives that shape to `RLHFVectorEnv` run with
``autoreset_mode="SameStep"``, so one model forward per step still serves every row.

The KL seam: the env is made with ``kl_mode="agent"`` and holds only π_ref; `SB3VecEnv.attach` hands it the SB3
model, whose policy is asked for log π(a_t|s_t) of each action taken (one extra forward of SB3's small network per
step), so Σ_t KL_t = log π_SB3(y|x) − log π_ref(y|x) for the policy that acted.

Episodes end with ``terminated=True`` at EOS and at the token cap (``TimeLimit.truncated`` is always False): SB3
never bootstraps a value on top of the final score, so the score is counted once.

>>> from stable_baselines3 import PPO
>>> from rlhf_env.sb3 import SB3VecEnv
>>> venv = SB3VecEnv.make(num_envs=4, **SMALL_CONFIG)
>>> model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, seed=0)
>>> venv.attach(model)
>>> _ = model.learn(total_timesteps=32)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from rlhf_env.vector_env import RLHFVectorEnv

# A small configuration for policies without a language model's prior: 4-token responses, and a KL weight large
# enough that π_ref's grammar is worth learning from the per-token reward.
SMALL_CONFIG = {"max_new_tokens": 4, "beta": 0.5}


class SB3PolicyLogprobs:
    """`rlhf_env.agent.Agent`'s ``action_logprobs`` for an SB3 model: log π(a|s) under ``model.policy``.

    The policy is read from the model at every call, so a model whose parameters are replaced (``set_parameters``)
    is still the one scored.
    """

    def __init__(self, model):
        if not hasattr(model, "policy") or not hasattr(model.policy, "get_distribution"):
            raise TypeError(f"expected an SB3 model with a stochastic policy (PPO, A2C, ...), "
                            f"got {type(model).__name__}")
        self.model = model

    @torch.no_grad()
    def action_logprobs(self, observations: dict[str, np.ndarray], actions: np.ndarray) -> np.ndarray:
        policy = self.model.policy
        obs, _ = policy.obs_to_tensor(observations)
        distribution = policy.get_distribution(obs)
        return distribution.log_prob(torch.as_tensor(actions, device=policy.device)).double().cpu().numpy()

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return self.model.predict(observation, state, episode_start, deterministic)


class SB3VecEnv(VecEnv):
    """`RLHFVectorEnv` as an SB3 `VecEnv` (module docstring). `make` builds one with the right settings.

    Each finished row's info holds the env's end-of-episode keys (``score``, ``gold_score``, ``kl_sum``,
    ``response_text``, ...), ``terminal_observation``, ``TimeLimit.truncated`` (False) and ``episode``
    (``{"r": return, "l": length, "t": seconds}``, what SB3's `Monitor` adds, so ``ep_rew_mean`` is logged).
    """

    def __init__(self, envs: RLHFVectorEnv):
        envs = getattr(envs, "unwrapped", envs)
        if not isinstance(envs, RLHFVectorEnv):
            raise TypeError(f"SB3VecEnv wraps an RLHFVectorEnv, got {type(envs).__name__}")
        if envs.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError("SB3 resets finished rows in the same step: build the env with "
                             "autoreset_mode='SameStep' (SB3VecEnv.make does)")
        self.envs = envs
        super().__init__(envs.num_envs, envs.single_observation_space, envs.single_action_space)
        self._actions: np.ndarray | None = None
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._start = time.time()

    @classmethod
    def make(cls, num_envs: int = 8, **env_kwargs) -> SB3VecEnv:
        """A new batched env (``kl_mode="agent"`` unless given) wrapped for SB3; `env_kwargs` as for RLHF-v0."""
        env_kwargs.setdefault("kl_mode", "agent")
        return cls(RLHFVectorEnv(num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **env_kwargs))

    def attach(self, model) -> None:
        """Score every action under `model`'s policy (an SB3 PPO, A2C, ...): the env's KL is then for that policy."""
        self.envs.attach_agent(SB3PolicyLogprobs(model))

    def reset(self):
        seeds = None if all(s is None for s in self._seeds) else self._seeds
        options = self._options[0] or None
        if any(o != self._options[0] for o in self._options):
            raise ValueError("RLHF-v0's SB3VecEnv takes one set of reset options for all rows")
        obs, infos = self.envs.reset(seed=seeds, options=options)
        self.reset_infos = _rows(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        self._returns[:], self._lengths[:] = 0.0, 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.envs.step(self._actions)
        dones = terminated | truncated
        rows = _rows(infos, self.num_envs)
        self._returns += rewards
        self._lengths += 1
        if dones.any():
            final_infos = _rows(infos["final_info"], self.num_envs)
            for row in np.flatnonzero(dones):
                episode = {"r": float(self._returns[row]), "l": int(self._lengths[row]),
                           "t": round(time.time() - self._start, 6)}
                rows[row] = dict(final_infos[row], terminal_observation=infos["final_obs"][row],
                                 episode=episode, **{"TimeLimit.truncated": bool(truncated[row])})
                rows[row]["next_prompt"] = infos["prompt"][row]
                self._returns[row], self._lengths[row] = 0.0, 0
        return obs, rewards.astype(np.float32), dones, rows

    def close(self) -> None:
        self.envs.close()

    def render(self, mode: str | None = None):
        return self.envs.render()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.envs, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.envs, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.envs, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)


def _rows(infos: dict, num_envs: int) -> list[dict]:
    """Gymnasium's vector ``infos`` (arrays with ``_key`` masks) → one dict per row, SB3's form."""
    rows: list[dict] = [{} for _ in range(num_envs)]
    for key, values in infos.items():
        if key.startswith("_") or key in ("final_obs", "final_info"):
            continue
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        for row in np.flatnonzero(mask):
            value = values[row]
            rows[row][key] = value.item() if isinstance(value, np.generic) else value
    return rows
