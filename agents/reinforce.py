"""REINFORCE with a baseline for language-model policies on RLHF-v0: the critic-free policy gradient.

    python -m agents.reinforce --baseline rloo --reward gold --total-timesteps 1000000 --out runs/rloo-gt

The estimator is the textbook one (Williams 1992): ∇J = E[Σ_t ∇log π(a_t|s_t) · (G − b)], where G is the episode's
return as the env pays it, G = score − β·Σ_t KL_t (the env's per-token rewards, summed; never recomputed), and the
log-probabilities are **summed** over the response's tokens (the log-probability of the sequence), not averaged.
One gradient step per batch of fresh episodes, so the estimator stays on-policy and needs no importance ratio.

Baselines (``ReinforceConfig.baseline``); each keeps the estimator unbiased because b does not depend on the
sample's own actions:

* ``"moving_average"``: b = an exponential moving average of past batches' mean return (updated after the batch
  it is used on). The classic baseline of Williams (1992) and Sutton & Barto (2018, §13.4).
* ``"rloo"``: K samples per prompt; b for a sample = the mean return of the other K − 1 samples of its prompt
  (REINFORCE leave-one-out: Kool et al. 2019; the RLHF recipe of Ahmadian et al. 2024, "Back to Basics").
* ``"value"``: a learned value head on the policy's trunk, one baseline per token, b_t = V(s_t), trained by MSE on
  the returns (PPO's critic without clipping or GAE; Sutton & Barto §13.4, "REINFORCE with baseline").
* ``"none"``: b = 0 (the plain estimator; high variance, for comparison).

Options: ``group_norm`` divides each advantage by the standard deviation of its prompt's K returns, as GRPO does
(Shao et al. 2024) — a per-prompt step size, no longer the unbiased gradient of E[G] but of a reweighted objective;
``reward_to_go`` uses G_t = Σ_{t' ≥ t} r_t' at token t instead of G (the KL paid before t cannot be caused by
a_t, so dropping it lowers the variance and keeps the estimator unbiased; Sutton & Barto §13.3).

One update (`Reinforce.update`): 1. rollout (K samples of each prompt); 2. returns; 3. baselines and advantages;
4. one gradient step on −Σ_t A_t·log π(a_t|s_t) (+ c·value loss); 5. stats.

Legend: ``B`` episodes per update, ``K`` samples per prompt, ``T`` response tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from agents.checkpoint import load_agent, save_checkpoint
from agents.common import (
    Batch,
    acting_world,
    at_least_one,
    autocast,
    batch_tensors,
    check_field,
    clipped_step,
    exact_div,
    given_episodes,
    learn_loop,
    non_negative,
    none_or,
    positive,
    predict,
    rollout,
    run_command,
    seeded_generators,
    train_module,
    whole_batch,
)
from agents.core import (
    entropy_from_logits,
    explained_variance,
    group_counts,
    group_std,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    reinforce_loss,
    reward_to_go,
    rloo_baseline,
)
from agents.distributed import Ranks
from agents.fsdp import check_shardable
from agents.metrics import MetricsLogger
from agents.policy import ActorCritic, response_logits
from agents.rollout import Episodes, episode_stats

Baseline = Literal["moving_average", "rloo", "value", "none"]


@dataclass(frozen=True)
class ReinforceConfig:
    episodes_per_update: int = 64
    """Episodes per update (a multiple of the vector env's num_envs and of samples_per_prompt)."""
    samples_per_prompt: int = 4
    """K samples of each prompt per update (rloo and group_norm need K ≥ 2; other baselines accept K = 1)."""
    baseline: Baseline = "rloo"
    """"moving_average", "rloo", "value" or "none" (see the module docstring)."""
    group_norm: bool = False
    """Divide advantages by the std of their prompt's K returns (GRPO-style)."""
    reward_to_go: bool = False
    """Per-token returns G_t = Σ_{t'≥t} r_t' instead of the whole episode's return G at every token."""
    ema_decay: float = 0.9
    """Decay of the moving-average baseline (weight of the past)."""
    learning_rate: float = 5e-4
    """Adam step size (constant). One step per batch, so larger than PPO's (which takes 16 per batch): with RLOO,
    5e-4 and 1e-3 both reached held-out gold 0.59 in 300 updates, 5e-4 at lower KL (1.8 vs 2.4); 3e-4 was slow."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    micro_batch_size: int | None = None
    """Episodes per forward/backward; the micro-batches' gradients add up to one step (None: the whole batch)."""
    vf_coef: float = 0.1
    """Value-loss coefficient (baseline "value" only)."""
    value_init: Literal["zero", "small"] = "zero"
    """Value head init for baseline "value": "zero" or "small"."""
    group_norm_eps: float = 1e-4
    """Added to the group std before dividing (a group with equal returns has zero advantages anyway)."""
    seed: int = 0
    """Seeds the value head, the prompts and samples of each rollout."""

    def __post_init__(self):
        for name in ("episodes_per_update", "samples_per_prompt"):
            check_field(self, name, at_least_one, "an integer ≥ 1")
        check_field(self, "micro_batch_size", none_or(at_least_one), "None or an integer ≥ 1")
        for name in ("learning_rate", "vf_coef"):
            check_field(self, name, non_negative, "a finite number ≥ 0")
        for name in ("adam_eps", "max_grad_norm", "group_norm_eps"):
            check_field(self, name, positive, "a finite number > 0")
        check_field(self, "value_init", ("zero", "small").__contains__, "'zero' or 'small'")
        check_field(self, "baseline", get_args(Baseline).__contains__, f"one of {get_args(Baseline)}")
        if (self.baseline == "rloo" or self.group_norm) and self.samples_per_prompt < 2:
            raise ValueError("baseline='rloo' and group_norm need samples_per_prompt ≥ 2")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        exact_div(self.episodes_per_update, self.samples_per_prompt, "episodes_per_update / samples_per_prompt")
        if self.micro_batch_size is not None:
            exact_div(self.episodes_per_update, self.micro_batch_size, "episodes_per_update / micro_batch_size")


class Reinforce:
    """REINFORCE with a baseline on the env's acting policy (trained in place):
    ``Reinforce(gym.make_vec("RLHF-v0", num_envs=64), ReinforceConfig(baseline="rloo")).learn(500_000)``.

    Data-parallel when a `torch.distributed` process group is initialised (`agents.distributed`): each of the W
    ranks samples ``episodes_per_update / W`` episodes (whole groups of K samples of a prompt, so the RLOO and
    group statistics stay on one rank) and the update is the single-process update of the whole batch. With
    ``fsdp=True`` the policy (and value head) is also sharded over the ranks (`agents.fsdp`)."""

    def __init__(self, env, config: ReinforceConfig = ReinforceConfig(), out_dir: str | Path | None = None,
                 progress: bool = True, fsdp: bool = False):
        self.config = config
        self.ranks = Ranks.current()
        self.envs, self.world = acting_world(env, "Reinforce", config.episodes_per_update, self.ranks)
        if fsdp:
            check_shardable(self.world)
        if not self.ranks.single:  # every prompt's K samples on one rank
            exact_div(config.episodes_per_update // self.ranks.world_size, config.samples_per_prompt,
                      f"each rank's share of the batch (episodes_per_update / {self.ranks.world_size} ranks) / "
                      "samples_per_prompt")
            if config.micro_batch_size is not None:
                exact_div(config.episodes_per_update // self.ranks.world_size, config.micro_batch_size,
                          f"each rank's share of the batch (episodes_per_update / {self.ranks.world_size} ranks) / "
                          "micro_batch_size")
        self.device, self.lm = self.world.device, self.world.policy
        # The training forward: the env's choice for its policy, or under FSDP the model's own forward (its hooks
        # gather and reduce the shards; the lean GPT-2 path would bypass them).
        self.backend = "hf" if fsdp else self.world.backends["policy"]
        with torch.random.fork_rng(devices=[]):  # the value head's init, seeded; the global RNG is left as it was
            torch.manual_seed(config.seed)
            self.model = ActorCritic(self.lm, self.backend, config.value_init) if config.baseline == "value" else None
        self.rng, self.shared_rng, self.generator = seeded_generators(config.seed, self.ranks)
        self.num_timesteps = self.num_updates = self.num_episodes = 0
        self.params, self.sharded, self.optimizer = train_module(self, self.model or self.lm, fsdp)
        self.progress, self.logger = progress, MetricsLogger(out_dir if self.ranks.is_main else None)
        self.moving_average = 0.0  # the "moving_average" baseline: EMA of past batches' mean return

    def learn(self, total_timesteps: int, callback=None) -> Reinforce:
        """Update until `total_timesteps` env steps (generated tokens, idle rows included) have been taken.

        ``callback(agent, metrics)`` runs after every update; returning False stops training.
        """
        return learn_loop(self, total_timesteps, callback, self.progress)

    def update(self, episodes: Episodes | None = None) -> dict:
        """One REINFORCE step on a fresh batch. Returns the logged metrics (the whole batch's, on every rank).

        `episodes` replaces the rollout: this rank's share of the batch (``episodes_per_update / W``, in
        consecutive groups of ``samples_per_prompt`` samples of one prompt), sampled from the current policy as
        `agents.rollout.collect_episodes` returns them (REINFORCE is on-policy); β then does not move. `ValueError`
        for another count, groups or per-token lengths, before any model call."""
        cfg, start = self.config, time.perf_counter()
        k = cfg.samples_per_prompt
        # 1. rollout: K samples of each of B/K training prompts, in consecutive groups of K (this rank's B/W).
        # Eval mode for the whole update (dropout off, as PPO): the gradient is that of the policy that sampled.
        (self.model or self.lm).eval()
        if episodes is None:
            pool = self.world.prompt_pool("train")
            picks = self.rng.integers(len(pool), size=cfg.episodes_per_update // self.ranks.world_size // k)
            episodes = rollout(self, [pool[i] for i in picks for _ in range(k)])
        else:
            episodes = self._given(episodes)
        rollout_seconds = time.perf_counter() - start
        everything = whole_batch(episodes, self.ranks)  # every rank's episodes: the batch's metrics
        stats = episode_stats(everything, self.world.beta, self.world.task)
        b = batch_tensors(episodes, self.world.pad_token_id, self.device)
        total = self.ranks.sum  # sums a statistic over the ranks: the whole batch's (the identity in one process)
        # Episodes that carry a loss: not those whose score the env masked (their return is not data), and, where
        # group statistics are taken, not those left without another valid sample of their prompt (no baseline).
        usable = b.valid  # (B,)
        if cfg.baseline == "rloo" or cfg.group_norm:
            usable = usable & (group_counts(usable, k) >= 2)
        mask = b.response_mask.float() * usable.float()[:, None]  # (B, T)
        # 2. returns: the env's per-token rewards (−β·KL_t, + the score at the last token), summed.
        episode_returns = b.rewards.sum(1)  # (B,)  G
        returns = reward_to_go(b.rewards, mask) if cfg.reward_to_go else episode_returns[:, None] * mask  # (B, T)
        # 3. baselines (b does not depend on the sample's own actions) and advantages A = G − b. The group
        #    statistics (RLOO, group_norm) are each prompt's, whose K samples are all on this rank.
        num_episodes, num_tokens = total(usable.sum()), total(mask.sum())  # the whole batch's
        if cfg.baseline == "rloo":
            baseline = rloo_baseline(episode_returns, k, usable)[:, None] * mask  # (B, T)
        elif cfg.baseline == "moving_average":
            baseline = torch.full_like(mask, self.moving_average) * mask
            returns_sum = total(episode_returns[usable].sum())
            if num_episodes > 0:
                self.moving_average = (cfg.ema_decay * self.moving_average
                                       + (1 - cfg.ema_decay) * float(returns_sum / num_episodes))
        else:  # "none"; "value" subtracts V(s_t) in phase 4, from the same forward that trains it
            baseline = torch.zeros_like(mask)
        advantages = returns - baseline  # (B, T)
        scale = (group_std(episode_returns, k, usable) + cfg.group_norm_eps)[:, None] if cfg.group_norm else 1.0
        # 4. one gradient step: −Σ_t A_t·log π(a_t|s_t), summed over tokens, averaged over the usable episodes (and
        #    the value loss averaged over their tokens); both denominators are the whole batch's, counted before
        #    the micro-batches run, so the micro-batches' (and ranks') gradients add up to the whole batch's.
        self.optimizer.zero_grad(set_to_none=True)
        log = dict.fromkeys(("loss/policy", "loss/value", "policy/entropy"), 0.0)
        values_seen = torch.zeros_like(mask)
        finite, rows = True, np.arange(len(episodes))
        no_signal = bool(num_episodes == 0) or (cfg.baseline != "value"
                                                and not self.ranks.any(bool(advantages.abs().any())))
        for micro in np.split(rows, len(rows) // (cfg.micro_batch_size or len(rows))):
            if no_signal:  # e.g. RLOO on groups with equal returns: nothing to learn, parameters stay put
                break
            m = mask[micro]
            logits, values = self._forward(b, micro)
            logprobs = logprobs_from_logits(logits, b.responses[micro])  # (b, T)
            micro_advantages = advantages[micro]
            vf_loss = torch.zeros((), device=self.device)
            if values is not None:
                values_seen[micro] = values.detach() * m
                micro_advantages = micro_advantages - values.detach() * m
                vf_loss = 0.5 * masked_mean((values - returns[micro]) ** 2, m, num_tokens)
            micro_advantages = micro_advantages / (scale[micro] if cfg.group_norm else 1.0)
            pg_loss = reinforce_loss(logprobs, micro_advantages, m, num_episodes)
            loss = pg_loss + cfg.vf_coef * vf_loss
            if not torch.isfinite(loss):
                finite = False
                if self.sharded is None:
                    break
                # FSDP: every rank runs every backward (each one a collective); the step is skipped below
            loss.backward()
            for key, value in (("loss/policy", pg_loss), ("loss/value", vf_loss),
                               ("policy/entropy", masked_mean(entropy_from_logits(logits.detach()), m, num_tokens))):
                log[key] += value.item()  # micro-batch shares add up to the batch's values
        finite = self.ranks.all(finite)  # a loss that was not finite on any rank skips the step on every rank
        grad_norm = clipped_step(self.optimizer, self.params, cfg.max_grad_norm, finite=finite and not no_signal,
                                 ranks=self.ranks, sharded=self.sharded is not None)
        skipped = grad_norm is None  # parameters stay as they are
        log = self.ranks.sum_floats(log)  # the ranks' shares add up to the batch's values
        if no_signal or not finite:
            log = dict.fromkeys(log, float("nan"))
        # 5. stats
        self.num_updates += 1
        self.num_episodes += len(everything)
        self.num_timesteps += everything.tokens
        final_advantages = (advantages - values_seen) / scale
        metrics = {"time/updates": self.num_updates, "time/timesteps": self.num_timesteps,
                   "time/episodes": self.num_episodes, **stats,
                   **log,
                   "policy/advantage_std": float(masked_var(final_advantages, mask, total=total).sqrt())
                   if num_tokens >= 2 else float("nan"),
                   "val/baseline_mean": float(masked_mean(baseline + values_seen, mask, total=total)),
                   "val/explained_variance": explained_variance(baseline + values_seen, returns, mask, total),
                   "train/grad_norm": float("nan") if grad_norm is None else grad_norm,
                   "train/skipped": int(skipped and not no_signal), "train/no_signal": int(no_signal),
                   "time/tokens_per_s": everything.tokens / rollout_seconds,
                   "time/update_seconds": time.perf_counter() - start}
        self.logger.log(metrics)
        return metrics

    def _given(self, episodes: Episodes) -> Episodes:
        """`update(episodes)`'s episodes, checked (`agents.common.given_episodes`, and groups of K of one prompt)."""
        episodes = given_episodes(self, episodes)
        k = self.config.samples_per_prompt
        for start in range(0, len(episodes), k):
            if len(set(episodes.prompts[start: start + k])) != 1:
                raise ValueError(f"update(episodes=...): episodes {start}…{start + k - 1} are not {k} samples of one "
                                 "prompt (samples_per_prompt): the batch holds consecutive groups of K samples")
        return episodes

    def _forward(self, b: Batch, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(b, T, V)`` at the sampling temperature, and values ``(b, T)`` for baseline "value"."""
        with autocast(self.device):
            if self.model is not None:
                return self.model(*b.text(rows), temperature=self.world.temperature)
            return response_logits(self.lm, *b.text(rows), self.backend, self.world.temperature)[0], None

    # ---------------------------------------------------------------- acting and checkpoints
    def predict(self, observation: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
        """The next token for an env observation (one, or a batch), SB3-style: ``(action, None)``."""
        return predict(self, observation, deterministic)

    def save(self, directory: str | Path) -> None:
        """Policy (safetensors), value head, optimizer, RNG states, KL controller, baseline, counters, config and
        the env's settings, as one checkpoint written in one step (`agents.checkpoint`)."""
        tensors = self.model.critic_state_dict() if self.model is not None else {}
        save_checkpoint(self, directory, "reinforce", tensors, {"moving_average": self.moving_average})

    @classmethod
    def load(cls, directory: str | Path, env, out_dir: str | Path | None = None, progress: bool = True,
             fsdp: bool = False) -> Reinforce:
        """Resume from `save` in `env`, built like the original (same task, reference, reward and KL settings).

        Check-then-change: a damaged checkpoint, another env or another shape raises `ValueError` and leaves the env
        as it was. With `out_dir`, its ``metrics.jsonl`` continues from the checkpoint's update. `fsdp` shards the
        resumed agent (`agents.fsdp`), whether or not the saved run was sharded."""
        def own(agent, checkpoint):
            average = checkpoint.meta.get("moving_average")
            if average is not None and not math.isfinite(average):
                raise ValueError(f"{checkpoint.directory}: the moving-average baseline is {average}")
            return agent.model.critic_state_dict() if agent.model is not None else {}

        def write_own(agent, checkpoint):
            if agent.model is not None:
                agent.model.load_state_dict(checkpoint.tensors, strict=False)
            agent.moving_average = checkpoint.meta.get("moving_average")

        return load_agent(cls, ReinforceConfig, "reinforce", directory, env, out_dir, progress, fsdp, own,
                          write_own)


def main(argv: list[str] | None = None) -> dict | list[str]:
    return run_command(Reinforce, ReinforceConfig, "REINFORCE with a baseline on RLHF-v0", argv)


if __name__ == "__main__":
    main()
