"""Held-out evaluation of the env's acting policy, and the KL-regularised optimum that learning is measured against.

The optimum of E_π[r] − β·KL(π ‖ π_ref) over policies is attained by π* ∝ π_ref·exp(r/β) and equals
β·log E_{y~π_ref}[exp(r(x, y)/β)] per prompt (Rafailov et al. 2023, eq. 4; Korbak et al. 2022). We estimate it by
sampling from π_ref: a log-mean-exp over samples (importance sampling with π_ref as proposal).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from agents.rollout import collect_episodes, episode_stats
from rlhf_env.lm import sample
from rlhf_env.vector_env import RLHFVectorEnv


def evaluate(envs, n_episodes: int, seed: int = 10_000) -> dict:
    """Mean objective metrics of `n_episodes` on held-out prompts, sampled at the env's temperature.

    Uses its own seed and generator, and restores the env's KL controller afterwards, so evaluating never changes
    the course of training.
    """
    envs = envs.unwrapped
    controller = copy.deepcopy(envs.world.kl_controller)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    episodes = None
    while episodes is None or len(episodes) < n_episodes:
        batch = collect_episodes(envs, int(rng.integers(2**31 - 1)), generator, split="eval")
        if episodes is None:
            episodes = batch
        else:
            episodes.extend(batch)
    envs.world.kl_controller = controller
    stats = episode_stats(episodes, envs.world.beta, envs.world.task)
    stats["objective/win_rate"] = win_rate_vs_reference(envs.world, episodes, seed)
    stats["episodes"] = len(episodes)
    return stats


@torch.no_grad()
def win_rate_vs_reference(world, episodes, seed: int) -> float:
    """P(gold(y) > gold(y_ref)) + ½·P(tie), where y is each episode's response and y_ref one sample of π_ref
    (π_SFT) on the same prompt: 0.5 when the policy is π_ref."""
    generator = torch.Generator(device=world.device).manual_seed(seed)
    samples = sample(world.reference, episodes.queries, max_new_tokens=world.max_new_tokens,
                     eos_token_id=world.eos_token_id, pad_token_id=world.pad_token_id,
                     temperature=world.temperature, generator=generator)
    texts = world.tokenizer.batch_decode(samples.response_lists(), skip_special_tokens=True)
    reference_gold = np.array([world.task.gold(p, t) for p, t in zip(episodes.prompts, texts)])
    gold = np.array(episodes.gold_scores)
    return float(np.mean((gold > reference_gold) + 0.5 * (gold == reference_gold)))


@torch.no_grad()
def kl_regularised_optimum(envs: RLHFVectorEnv, reward_fn, beta: float, n_prompts: int = 200,
                           n_samples: int = 256, seed: int = 0) -> dict:
    """Estimate max_π E[r] − β·KL(π ‖ π_ref) on held-out prompts by sampling `n_samples` responses per prompt from
    π_ref; also reports the effective sample size of the importance weights exp(r/β) (low ESS: underestimate)."""
    world = envs.unwrapped.world
    tokenizer, reference = world.tokenizer, world.reference
    rng = np.random.default_rng(seed)
    pool = world.prompt_pool("eval")
    prompts = [pool[i] for i in rng.choice(len(pool), n_prompts, replace=False)]
    values, ess = [], []
    generator = torch.Generator(device=world.device).manual_seed(seed)
    for prompt in prompts:
        query = world.draw_prompt({"prompt": prompt}, rng)[1]
        samples = sample(reference, [query] * n_samples, max_new_tokens=world.max_new_tokens,
                         eos_token_id=world.eos_token_id, pad_token_id=world.pad_token_id,
                         temperature=world.temperature, generator=generator)
        rewards = []
        for row in range(n_samples):
            tokens = samples.responses[row][samples.response_mask[row].bool()].tolist()
            rewards.append(reward_fn(prompt, tokenizer.decode(tokens, skip_special_tokens=True)))
        logits = np.array(rewards) / beta
        top = logits.max()
        weights = np.exp(logits - top)
        values.append(beta * (top + np.log(weights.mean())))
        ess.append(weights.sum() ** 2 / (weights**2).sum())
    return {"optimum": float(np.mean(values)), "ess_mean": float(np.mean(ess)), "n_prompts": n_prompts,
            "n_samples": n_samples, "beta": beta}
