"""Collecting episodes from the vector env, the way every LM agent here does it.

The agent samples each action from ``envs.next_token_logprobs`` (the env's own forward of the acting policy), so
the env's per-token KL is exact and nothing is computed twice. Rewards, scores and KL come from the env's
``info``; agents never recompute them.

Each rollout resets the env with a seed drawn from the agent's generator and steps until every row has finished
one episode, so every token of a batch comes from the same weights (a row that finishes early idles through an
ignored autoreset episode, as a finished sequence idles in ``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rlhf_env.decoding.sampling import gumbel_max
from rlhf_env.reward import call_reward_fn
from rlhf_env.vector_env import RLHFVectorEnv


class NonFiniteLogits(ValueError):
    """The policy's next-token distribution is NaN/inf for some row (raised before sampling from it)."""


@dataclass
class Episodes:
    """Finished episodes, one entry per episode (field names follow openai/lm-human-preferences and TRL)."""

    prompts: list[str] = field(default_factory=list)
    queries: list[list[int]] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)  # log π at sampling time (the env's forward)
    ref_logprobs: list[list[float]] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)  # the env's per-token rewards: −β·KL_t (+ score)
    scores: list[float] = field(default_factory=list)
    gold_scores: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # Σ_t KL_t per episode
    finished: list[bool] = field(default_factory=list)  # ended with EOS (not the token cap)
    score_nonfinite: list[bool] = field(default_factory=list)  # the reward was NaN/inf and the env masked it to 0
    texts: list[str] = field(default_factory=list)
    # Several rewards (rewards=): each reward's raw score per episode, by name (the env's info["score/<name>"]).
    component_scores: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0  # env steps taken, idle rows included: what the rollout cost

    def __len__(self) -> int:
        return len(self.responses)

    def extend(self, other: Episodes) -> None:
        for name in self.__dataclass_fields__:
            if name not in ("tokens", "component_scores"):
                getattr(self, name).extend(getattr(other, name))
        for name, values in other.component_scores.items():
            self.component_scores.setdefault(name, []).extend(values)
        self.tokens += other.tokens


def unwrap_vector_env(envs) -> RLHFVectorEnv:
    """The `RLHFVectorEnv` under `envs`, or a `ValueError` saying how to make one."""
    inner = getattr(envs, "unwrapped", envs)
    if not isinstance(inner, RLHFVectorEnv):
        raise ValueError("LM agents run on the native vector env: pass gym.make_vec('RLHF-v0', num_envs=N) "
                         f"(got {type(inner).__name__})")
    return inner


def collect_episodes(envs: RLHFVectorEnv, seed: int, generator: torch.Generator, split: str = "train",
                     prompts: list[str] | None = None) -> Episodes:
    """Reset with `seed` and run every row to the end of one episode; returns ``envs.num_envs`` episodes.

    ``split`` picks train or held-out prompts; ``prompts`` (one per row) pins them instead.
    """
    n = envs.num_envs
    options = {"split": split} if prompts is None else {"prompts": prompts}
    _, infos = envs.reset(seed=seed, options=options)
    batch = Episodes(prompts=list(infos["prompt"]), queries=envs.queries())
    components = [f"score/{name}" for name in envs.world.reward_names]
    steps = []  # per step: which rows were still in their episode, and what they did and got
    done = np.zeros(n, dtype=bool)
    ends: dict[int, dict] = {}
    while not done.all():
        next_logprobs = envs.next_token_distribution()  # (B, V), the env's own forward of the policy
        if not torch.isfinite(next_logprobs).any(-1).all():
            raise NonFiniteLogits("the policy's next-token log-probs are NaN/inf: refusing to sample from them")
        actions = gumbel_max(next_logprobs.cpu(), generator).numpy()  # (B,) the agent's generator is on the CPU
        _, step_rewards, terminated, _, infos = envs.step(actions)
        batch.tokens += n
        steps.append((~done, actions, infos["logprob"], infos["ref_logprob"], step_rewards))
        for row in np.flatnonzero(terminated & ~done):
            ends[row] = {key: infos[key][row] for key in ("score", "gold_score", "kl_sum", "finished",
                                                           "response_text", "score_nonfinite", *components)}
        done |= terminated
    running, actions, logprobs, ref_logprobs, rewards = (np.stack(column, axis=1) for column in zip(*steps))  # (B, S)
    for row in range(n):
        taken = running[row]
        batch.responses.append(actions[row, taken].tolist())
        batch.logprobs.append(logprobs[row, taken].tolist())
        batch.ref_logprobs.append(ref_logprobs[row, taken].tolist())
        batch.rewards.append(rewards[row, taken].tolist())
        end = ends[row]
        batch.scores.append(float(end["score"]))
        batch.gold_scores.append(float(end["gold_score"]))
        batch.kls.append(float(end["kl_sum"]))
        batch.finished.append(bool(end["finished"]))
        batch.score_nonfinite.append(bool(end["score_nonfinite"]))
        batch.texts.append(str(end["response_text"]))
        for key in components:
            batch.component_scores.setdefault(key.removeprefix("score/"), []).append(float(end[key]))
    return batch


def gold_agreement(scores: np.ndarray, gold_scores: np.ndarray) -> float:
    """How often the reward orders two episodes as gold does: over all pairs (i < j) of the batch whose gold scores
    differ, the share where score_i − score_j has the sign of gold_i − gold_j (equal scores count half). NaN when
    no pair's gold differs, or when a score or gold score is not finite (a task without gold).

    This is the reward model's (or judge's) pairwise accuracy against gold, measured on the current policy's own
    samples rather than on a fixed preference set, so it shows a reward drifting from the truth as the policy moves
    away from the data the reward was trained on (over-optimisation, Gao et al. 2022). Shapes: both ``(B,)``; pairs
    B·(B − 1)/2 (16,256 for 128 episodes)."""
    scores, gold_scores = np.asarray(scores, dtype=float), np.asarray(gold_scores, dtype=float)
    if not (np.isfinite(scores).all() and np.isfinite(gold_scores).all()):
        return float("nan")
    i, j = np.triu_indices(len(scores), k=1)
    gold_sign = np.sign(gold_scores[i] - gold_scores[j])
    differ = gold_sign != 0
    if not differ.any():
        return float("nan")
    score_sign = np.sign(scores[i] - scores[j])[differ]
    return float(np.mean(np.where(score_sign == 0, 0.5, score_sign == gold_sign[differ])))


def episode_stats(episodes: Episodes, beta: float, task) -> dict:
    """The objective metrics of a batch (names: docs/design.md).

    A masked score (``nonfinite_reward="mask"``) is not data: ``objective/score`` and ``objective/rlhf_reward``
    average the other episodes only (NaN if none is left) and ``episode/score_masked`` counts the masked ones. The
    masked episodes' gold score, KL and length are real measurements of the policy and stay in those means.
    ``objective/gold_agreement`` is the reward's pairwise agreement with gold on the valid episodes
    (`gold_agreement`; NaN without gold).
    With several rewards, ``objective/score/<name>`` is each reward's mean raw score over the valid episodes. A task
    with several gold objectives (`rlhf_env.tasks.Task.objectives`) adds ``objective/gold/<name>``, each one's mean
    over all episodes (the first is ``objective/gold_score`` again, under its name).
    """
    scores, kls = np.array(episodes.scores), np.array(episodes.kls)
    valid = ~np.array(episodes.score_nonfinite, dtype=bool).reshape(-1)  # (B,)
    lengths = np.array([len(r) for r in episodes.responses])
    well_formed = [task.is_well_formed(p, t) for p, t in zip(episodes.prompts, episodes.texts)]
    components = {f"objective/score/{name}": float(np.array(values)[valid].mean()) if valid.any() else float("nan")
                  for name, values in episodes.component_scores.items()}
    objectives = task.objectives()
    if len(objectives) > 1:
        gold_name, *others = objectives
        components[f"objective/gold/{gold_name}"] = float(np.mean(episodes.gold_scores))
        for name in others:
            values = call_reward_fn(objectives[name], list(episodes.prompts), list(episodes.texts), {}, names=())
            components[f"objective/gold/{name}"] = float(np.mean(values))
    return components | {
        "objective/score": float(scores[valid].mean()) if valid.any() else float("nan"),
        "objective/gold_score": float(np.mean(episodes.gold_scores)),
        "objective/gold_agreement": gold_agreement(scores[valid], np.array(episodes.gold_scores)[valid]),
        "objective/kl": float(kls.mean()),
        "objective/rlhf_reward": float((scores - beta * kls)[valid].mean()) if valid.any() else float("nan"),
        "objective/beta": float(beta),
        "episode/length": float(lengths.mean()),
        "episode/length_p90": float(np.percentile(lengths, 90)),
        "episode/eos_rate": float(np.mean(episodes.finished)),
        "episode/well_formed": float(np.mean(well_formed)),
        "episode/score_masked": int((~valid).sum()),
    }
