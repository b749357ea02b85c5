"""What an agent provides to act in RLHF-v0 and to have its KL computed for its own policy.

The env pays ``−β·KL_t`` per token with ``KL_t = log π(a_t|s_t) − log π_ref(a_t|s_t)``, so it needs log π of the
policy that acted. There are three ways to give it (``kl_mode`` of the env):

* ``"policy"`` (default, the fast path): the agent *is* an LM and the env holds it (``env.unwrapped.policy``). The
  agent samples from ``env.unwrapped.next_token_logprobs`` and trains the env's policy in place; the env's forward
  is the agent's forward. Our PPO, REINFORCE and DPO work this way.
* ``"agent"``: the agent has a policy of its own (an SB3 MLP, a table, another network). It implements `Agent`
  below and is attached with ``env.unwrapped.attach_agent(agent)``; at every step the env asks it for
  ``log π(a_t|s_t)`` of the action it took, so Σ_t KL_t = log π(y|x) − log π_ref(y|x) exactly for that policy.
  SB3 algorithms attach through `rlhf_env.sb3.SB3VecEnv.attach`.
* ``"reference"``: nothing is asked; the env pays only ``β·log π_ref(a_t|s_t)`` and the agent adds
  ``−β·log π(a_t|s_t)`` itself (or an entropy bonus of β, equal in expectation).

An agent acts on the env's observations (``input_ids`` and ``attention_mask``, batched) the way SB3 models do, so
the loop ``action, _ = agent.predict(obs); obs, reward, ... = env.step(action)`` is the same for all of them.
``examples/custom_agent.py`` is a complete learning agent in under 50 lines.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Agent(Protocol):
    """An agent with its own policy π, acting in RLHF-v0 with ``kl_mode="agent"``.

    Both methods take observations batched as the vector env returns them: a dict of ``(N, P + T)`` int64 arrays
    (the single env's observation with a leading axis of 1 is the case N = 1).
    """

    def predict(self, observation: dict[str, np.ndarray], state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, Any]:
        """Actions ``(N,)`` for a batch of observations, and a recurrent state (``None`` if there is none)."""
        ...

    def action_logprobs(self, observations: dict[str, np.ndarray], actions: np.ndarray) -> np.ndarray:
        """``log π(actions[i] | observations[i])`` for each row, ``(N,)``: the policy that chose the actions, at
        the parameters it had when choosing them. Called by the env inside ``step``, before the reward."""
        ...


class RandomAgent:
    """The uniform-random policy over V tokens, a floor for any benchmark: log π(a|s) = −log V for every action."""

    def __init__(self, vocab_size: int, seed: int | None = None):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(seed)

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        """Uniform tokens: one per row of a batch, or a single token id for one unbatched observation."""
        ids = np.asarray(observation["input_ids"])
        if ids.ndim == 1:
            return int(self.rng.integers(self.vocab_size)), None
        return self.rng.integers(self.vocab_size, size=ids.shape[0]), None

    def action_logprobs(self, observations, actions):
        return np.full(np.shape(actions), -np.log(self.vocab_size))


def evaluate_agent(envs, agent, episodes: int, split: str = "eval") -> dict:
    """Mean end-of-episode metrics of `agent` over `episodes` episodes on the task's `split` prompts, in order.

    `envs` is an `RLHFVectorEnv` (either autoreset mode) built with ``kl_mode="agent"``; `agent` is attached for the
    duration (the previously attached one is restored). Each batch resets every row with its own prompt and steps
    until each row has finished once. Returns ``gold_score``, ``score``, ``kl_sum``, ``rlhf_reward`` (score −
    β·kl_sum), ``length``, ``well_formed``, ``episodes`` and ``score_masked``: episodes whose score the env masked
    (``nonfinite_reward="mask"``) are left out of ``score`` and ``rlhf_reward`` (NaN if none is left). Evaluation
    episodes never move an adaptive β.
    """
    envs = envs.unwrapped
    world = envs.world
    previous, pool = world.agent, world.prompt_pool(split)
    world.attach_agent(agent)
    finals: list[tuple[str, dict]] = []
    try:
        with world.beta_frozen():
            while len(finals) < episodes:
                prompts = [pool[(len(finals) + row) % len(pool)] for row in range(envs.num_envs)]
                obs, _ = envs.reset(options={"prompts": prompts})
                batch: dict[int, dict] = {}
                while len(batch) < envs.num_envs:
                    obs, _, terminated, _, infos = envs.step(np.asarray(agent.predict(obs)[0]))
                    ended = infos.get("final_info", infos)
                    for row in set(np.flatnonzero(terminated)) - set(batch):
                        batch[row] = {key: ended[key][row] for key in ("gold_score", "score", "kl_sum", "length",
                                                                      "response_text", "score_nonfinite")}
                finals += [(prompts[row], batch[row]) for row in range(envs.num_envs)]
    finally:
        world.agent = previous
    finals = finals[:episodes]
    infos = [info for _, info in finals]
    mean = {key: float(np.mean([info[key] for info in infos])) for key in ("gold_score", "kl_sum", "length")}
    scored = [info for info in infos if not info["score_nonfinite"]]  # a masked score is not data
    mean["score"] = float(np.mean([info["score"] for info in scored])) if scored else float("nan")
    mean["rlhf_reward"] = (float(np.mean([info["score"] - world.beta * info["kl_sum"] for info in scored]))
                           if scored else float("nan"))
    mean["well_formed"] = float(np.mean([world.task.is_well_formed(p, i["response_text"]) for p, i in finals]))
    mean["episodes"] = len(finals)
    mean["score_masked"] = len(infos) - len(scored)
    return mean
