"""Held-out evaluation of the env's acting policy, and the KL-regularised optimum that learning is measured against.

The optimum of E_π[r] − β·KL(π ‖ π_ref) over policies is attained by π* ∝ π_ref·exp(r/β) and equals
β·log E_{y~π_ref}[exp(r(x, y)/β)] per prompt (Rafailov et al. 2023, eq. 4; Korbak et al. 2022). We estimate it by
sampling from π_ref: a log-mean-exp over samples (importance sampling with π_ref as proposal).

`best_of_n` is the inference-time baseline every RLHF comparison needs (Stiennon et al. 2020; Gao et al. 2023):
sample n responses from π_SFT, keep the one the reward prefers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from agents.rollout import Episodes, collect_episodes, episode_stats
from rlhf_env.decoding.sampling import sample
from rlhf_env.reward import call_reward_fn
from rlhf_env.vector_env import RLHFVectorEnv

# The π_SFT samples a win rate compares against are drawn with a seed of their own, so that they never share a
# random stream with the rollout they are compared to (with the evaluation's seed they happen not to coincide — the
# rollout samples by Gumbel-max, `sample` otherwise — but nothing would keep that true).
REFERENCE_SEED_OFFSET = 1_000_003


def evaluate(envs, n_episodes: int, seed: int = 10_000, beta: float | None = None) -> dict:
    """Mean objective metrics of `n_episodes` on held-out prompts, sampled at the env's temperature.

    `beta`: the KL coefficient of the reported objective (``objective/rlhf_reward`` = score − β·KL); None: the
    env's β. An agent that pays the KL in its loss trains in an env with β = 0: pass its coefficient.

    Uses its own seed and generator, and its episodes never move β, so evaluating never changes the course of
    training.
    """
    envs = envs.unwrapped
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    episodes = None
    with envs.beta_frozen():
        while episodes is None or len(episodes) < n_episodes:
            batch = collect_episodes(envs, int(rng.integers(2**31 - 1)), generator, split="eval")
            if episodes is None:
                episodes = batch
            else:
                episodes.extend(batch)
    stats = episode_stats(episodes, envs.world.beta if beta is None else beta, envs.world.task)
    stats["objective/win_rate"] = win_rate_vs_reference(envs.world, episodes, seed + REFERENCE_SEED_OFFSET)
    stats["episodes"] = len(episodes)
    return stats


@torch.no_grad()
def best_of_n(envs, n: int, n_episodes: int, seed: int = 10_000, batch_size: int = 1024) -> dict:
    """Best-of-n sampling from π_ref (π_SFT) on `n_episodes` held-out prompts, scored by the env's reward (its RM,
    its ``reward_fn``, or the weighted sum of its ``rewards`` at the current weights), reported with `evaluate`'s
    metrics (each reward's ``objective/score/<name>`` of the chosen samples too); n = 1 is π_SFT itself.

    The KL is the analytic value log n − (n − 1)/n (Stiennon et al. 2020, appendix G.3), an upper bound on the
    true KL(π_BoN ‖ π_ref) that is tight when the n samples are distinct (Beirami et al. 2024).
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    world = envs.unwrapped.world
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=world.device).manual_seed(seed)
    pool = world.prompt_pool("eval")
    kl = math.log(n) - (n - 1) / n
    episodes = Episodes()
    per_batch = max(1, batch_size // n)
    for start in range(0, n_episodes, per_batch):
        drawn = [world.draw_prompt({"prompt": pool[int(rng.integers(len(pool)))]}, rng)
                 for _ in range(min(per_batch, n_episodes - start))]
        prompts = [p for p, _ in drawn for _ in range(n)]
        queries = [q for _, q in drawn for _ in range(n)]
        samples = sample(world.reference, queries, backend=world.backends["reference"],
                         max_new_tokens=world.max_new_tokens,
                         eos_token_id=world.stop_token_ids, pad_token_id=world.pad_token_id,
                         temperature=world.temperature, generator=generator)
        responses = samples.response_lists()
        texts = world.response_texts(responses)
        components = world.score_components(prompts, queries, responses, texts, samples.finished.tolist())
        for i, (prompt, text) in enumerate(zip(prompts, texts)):  # several rewards: a NaN one is named
            world.check_components(components, i, prompt, text)
        checked = [world.checked_score(score, prompt, text)  # NaN/inf: NonFiniteReward, or masked
                   for score, prompt, text in zip(world.weighted(components), prompts, texts)]
        scores = np.array([score for score, _ in checked]).reshape(-1, n)
        masked = np.array([flag for _, flag in checked]).reshape(-1, n)
        for group, best in enumerate(np.where(masked, -np.inf, scores).argmax(1)):  # ties: the first sample
            row = group * n + int(best)
            episodes.prompts.append(prompts[row])
            episodes.queries.append(queries[row])
            episodes.responses.append(responses[row])
            episodes.texts.append(texts[row])
            episodes.scores.append(float(scores[group, best]))
            episodes.score_nonfinite.append(bool(masked[group, best]))  # only when all n were masked
            episodes.gold_scores.append(float(world.task.gold(prompts[row], texts[row])))
            episodes.kls.append(kl)
            episodes.finished.append(bool(samples.finished[row]))
            for name in world.reward_names:
                episodes.component_scores.setdefault(name, []).append(float(components[name][row]))
    stats = episode_stats(episodes, world.beta, world.task)
    stats["objective/win_rate"] = win_rate_vs_reference(world, episodes, seed + REFERENCE_SEED_OFFSET)
    stats["episodes"] = len(episodes)
    return stats


@torch.no_grad()
def win_rate_vs_reference(world, episodes, seed: int) -> float:
    """P(gold(y) > gold(y_ref)) + ½·P(tie), where y is each episode's response and y_ref one sample of π_ref
    (π_SFT) on the same prompt: 0.5 when the policy is π_ref. Pairs with a NaN gold (a task without one, such as
    a `DatasetTask` with ``gold=None``) are left out; NaN when no pair is left."""
    generator = torch.Generator(device=world.device).manual_seed(seed)
    samples = sample(world.reference, episodes.queries, backend=world.backends["reference"],
                     max_new_tokens=world.max_new_tokens,
                     eos_token_id=world.stop_token_ids, pad_token_id=world.pad_token_id,
                     temperature=world.temperature, generator=generator)
    texts = world.response_texts(samples.response_lists())
    reference_gold = np.array([world.task.gold(p, t) for p, t in zip(episodes.prompts, texts)], dtype=float)
    gold = np.array(episodes.gold_scores, dtype=float)
    known = ~(np.isnan(gold) | np.isnan(reference_gold))
    if not known.any():
        return float("nan")
    gold, reference_gold = gold[known], reference_gold[known]
    return float(np.mean((gold > reference_gold) + 0.5 * (gold == reference_gold)))


@torch.no_grad()
def kl_regularised_optimum(envs: RLHFVectorEnv, reward_fn=None, beta: float | None = None, n_prompts: int = 200,
                           n_samples: int = 256, seed: int = 0) -> dict:
    """Estimate max_π E[r] − β·KL(π ‖ π_ref) on held-out prompts by sampling `n_samples` responses per prompt from
    π_ref; also reports the effective sample size of the importance weights exp(r/β) (low ESS: underestimate).

    ``reward_fn`` (batched, `rlhf_env.reward.call_reward_fn`; e.g. ``task.gold_reward``) is the reward r; None
    scores with the env's own reward (its reward model, its ``reward_fn``, or the weighted sum of its ``rewards``
    at the current weights), in one call per prompt. ``beta``
    defaults to the env's β.
    """
    world = envs.unwrapped.world
    beta = world.beta if beta is None else beta
    reference = world.reference
    rng = np.random.default_rng(seed)
    pool = world.prompt_pool("eval")
    prompts = [pool[i] for i in rng.choice(len(pool), n_prompts, replace=False)]
    values, ess = [], []
    generator = torch.Generator(device=world.device).manual_seed(seed)
    for prompt in prompts:
        query = world.draw_prompt({"prompt": prompt}, rng)[1]
        samples = sample(reference, [query] * n_samples, backend=world.backends["reference"],
                         max_new_tokens=world.max_new_tokens,
                         eos_token_id=world.stop_token_ids, pad_token_id=world.pad_token_id,
                         temperature=world.temperature, generator=generator)
        responses = samples.response_lists()
        texts = world.response_texts(responses)
        finished = samples.finished.tolist()
        if reward_fn is None:
            components = world.score_components([prompt] * n_samples, [query] * n_samples, responses, texts,
                                                finished)
            for i, text in enumerate(texts):  # several rewards: a NaN one is named
                world.check_components(components, i, prompt, text)
            rewards = world.weighted(components)
        else:
            rewards = call_reward_fn(reward_fn, [prompt] * n_samples, texts, {
                "query_ids": [query] * n_samples, "response_ids": responses, "finished": finished,
                "task": world.task})
        checked = [world.checked_score(float(r), prompt, text) for r, text in zip(rewards, texts)]
        kept = [score for score, masked in checked if not masked]  # a masked sample is left out of the estimate
        if not kept:
            continue
        logits = np.array(kept) / beta
        top = logits.max()
        weights = np.exp(logits - top)
        values.append(beta * (top + np.log(weights.mean())))
        ess.append(weights.sum() ** 2 / (weights**2).sum())
    nan = float("nan")  # every sample of every prompt masked
    return {"optimum": float(np.mean(values)) if values else nan, "ess_mean": float(np.mean(ess)) if ess else nan,
            "n_prompts": n_prompts, "n_samples": n_samples, "beta": beta}
