"""REINFORCE with a baseline for language-model policies on RLHF-v0: the critic-free policy gradient.

    python -m agents.reinforce --baseline rloo --reward gold --total-timesteps 1000000 --out runs/rloo-gt

The estimator is the textbook one (Williams 1992): ∇J = E[Σ_t ∇log π(a_t|s_t) · (G − b)], where G is the episode's
return as the env pays it, G = score − β·Σ_t KL_t (the env's per-token rewards, summed; never recomputed), and the
log-probabilities are **summed** over the response's tokens (the log-probability of the sequence), not averaged.
By default one gradient step per batch of fresh episodes, so the estimator stays on-policy and needs no importance
ratio.

Baselines (``ReinforceConfig.baseline``); each but ``"group_mean"`` keeps the estimator unbiased because b does not
depend on the sample's own actions:

* ``"moving_average"``: b = an exponential moving average of past batches' mean return (updated after the batch
  it is used on). The classic baseline of Williams (1992) and Sutton & Barto (2018, §13.4).
* ``"rloo"``: K samples per prompt; b for a sample = the mean return of the other K − 1 samples of its prompt
  (REINFORCE leave-one-out: Kool et al. 2019; the RLHF recipe of Ahmadian et al. 2024, "Back to Basics").
* ``"group_mean"``: b = the mean return of the sample's whole group, itself included (GRPO, Shao et al. 2024):
  not independent of the sample, but its advantage is the leave-one-out one times (K − 1)/K, so the gradient is
  the unbiased one scaled by that factor.
* ``"value"``: a learned value head on the policy's trunk, one baseline per token, b_t = V(s_t), trained by MSE on
  the returns (PPO's critic without clipping or GAE; Sutton & Barto §13.4, "REINFORCE with baseline").
* ``"none"``: b = 0 (the plain estimator; high variance, for comparison).

Options, each one field (the table with their sources: docs/agents.md, "Loss options and presets"; the named
recipes GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ are `agents.presets`): ``advantage_norm`` ("group_std": divide
by the prompt's return std, GRPO — a per-prompt step size, the gradient of a reweighted objective; "batch": whiten
over the whole batch, REINFORCE++); ``reward_to_go`` (G_t = Σ_{t' ≥ t} r_t' at token t: unbiased, lower variance;
Sutton & Barto §13.3); ``loss_aggregation`` (how tokens are weighted, `agents.core.aggregate`); ``clip_range`` or
``clip_range_low`` / ``clip_range_high`` (PPO's clipped surrogate against the sampling policy, asymmetric for
DAPO; inert at one step, where the ratio is 1), ``update_epochs`` × ``num_minibatches`` (several clipped steps
per batch), ``ratio_level`` ("sequence": GSPO's ratio); ``kl_in_loss`` (kl_coef·KL(π ‖ π_ref) as a loss term
with ``kl_estimator`` k1, k2 or k3, in an env with β = 0); ``drop_uniform_groups`` (DAPO's dynamic sampling,
without refill). Every normaliser is the whole minibatch's, counted before its micro-batches run.

One update (`Reinforce.update`): 1. rollout (K samples of each prompt); 2. returns; 3. baselines and advantages;
4. one gradient step on −Σ_t A_t·log π(a_t|s_t) (+ c·value loss), or update_epochs × num_minibatches clipped
steps; 5. stats.

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
    KLEstimator,
    LossAggregation,
    RatioLevel,
    aggregate,
    entropy_from_logits,
    explained_variance,
    group_counts,
    group_mean,
    group_std,
    kl_estimates,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    reinforce_loss,
    reward_to_go,
    rloo_baseline,
    uniform_groups,
)
from agents.distributed import Ranks
from agents.fsdp import FSDPIncompatible, check_shardable
from agents.metrics import MetricsLogger
from agents.policy import ActorCritic, response_logits
from agents.presets import PRESETS
from agents.rollout import Episodes, episode_stats

Baseline = Literal["moving_average", "rloo", "group_mean", "value", "none"]
AdvantageNorm = Literal["none", "group_std", "batch"]


class KLPaidTwice(ValueError):
    """``kl_in_loss`` in an env whose reward already pays β·KL (β ≠ 0): the penalty would be counted twice."""


@dataclass(frozen=True)
class ReinforceConfig:
    episodes_per_update: int = 64
    """Episodes per update (a multiple of the vector env's num_envs and of samples_per_prompt)."""
    samples_per_prompt: int = 4
    """K samples of each prompt per update (the group statistics need K ≥ 2; other baselines accept K = 1)."""
    baseline: Baseline = "rloo"
    """"moving_average", "rloo", "group_mean", "value" or "none" (see the module docstring)."""
    advantage_norm: AdvantageNorm = "none"
    """Divide advantages by the std of their prompt's K returns ("group_std", GRPO) or whiten them over the whole
    batch's tokens ("batch", REINFORCE++); "none" leaves them."""
    reward_to_go: bool = False
    """Per-token returns G_t = Σ_{t'≥t} r_t' instead of the whole episode's return G at every token."""
    loss_aggregation: LossAggregation = "seq_mean_token_sum"
    """How tokens are weighted: "seq_mean_token_sum" (log π(y|x), REINFORCE), "token_mean" (DAPO),
    "seq_mean_token_mean" (GRPO) or "seq_mean_token_sum_norm" (Dr. GRPO: / the env's max_new_tokens)."""
    clip_range: float | None = None
    """PPO-style ratio clip ε of a clipped surrogate; None (and no clip_range_low/high): plain REINFORCE."""
    clip_range_low: float | None = None
    """ε_low of an asymmetric clip (the ratio's floor is 1 − ε_low; None: clip_range)."""
    clip_range_high: float | None = None
    """ε_high of an asymmetric clip (the ratio's ceiling is 1 + ε_high; DAPO's clip-higher; None: clip_range)."""
    ratio_level: RatioLevel = "token"
    """The clipped ratio: each token's ("token") or the episode's geometric mean of them ("sequence", GSPO)."""
    update_epochs: int = 1
    """Passes over each batch (GRPO's μ); more than one step per batch needs clipping."""
    num_minibatches: int = 1
    """Optimizer steps per pass, each on episodes_per_update / num_minibatches episodes (DAPO: 16)."""
    kl_in_loss: bool = False
    """Pay kl_coef·KL(π ‖ π_ref) as a loss term (GRPO) instead of in the reward: needs the env's β = 0."""
    kl_coef: float = 0.05
    """Coefficient of the KL loss term (kl_in_loss only)."""
    kl_estimator: KLEstimator = "k3"
    """The KL loss term's estimator: "k1", "k2" or "k3" (agents.core.kl_estimates; kl_in_loss only)."""
    drop_uniform_groups: bool = False
    """Leave out groups whose K returns are all equal (DAPO's dynamic sampling, without its refill)."""
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
    """Added to the group std before dividing (advantage_norm "group_std")."""
    seed: int = 0
    """Seeds the value head, the prompts and samples of each rollout."""

    def __post_init__(self):
        for name in ("episodes_per_update", "samples_per_prompt", "update_epochs", "num_minibatches"):
            check_field(self, name, at_least_one, "an integer ≥ 1")
        check_field(self, "micro_batch_size", none_or(at_least_one), "None or an integer ≥ 1")
        for name in ("learning_rate", "vf_coef", "kl_coef"):
            check_field(self, name, non_negative, "a finite number ≥ 0")
        for name in ("adam_eps", "max_grad_norm", "group_norm_eps"):
            check_field(self, name, positive, "a finite number > 0")
        check_field(self, "value_init", ("zero", "small").__contains__, "'zero' or 'small'")
        for name, kind in (("baseline", Baseline), ("advantage_norm", AdvantageNorm),
                           ("loss_aggregation", LossAggregation), ("ratio_level", RatioLevel),
                           ("kl_estimator", KLEstimator)):
            check_field(self, name, get_args(kind).__contains__, f"one of {get_args(kind)}")
        check_field(self, "clip_range", none_or(positive), "None or a finite number > 0")
        check_field(self, "clip_range_low", none_or(lambda eps: 0 < eps < 1), "None or in (0, 1)")
        check_field(self, "clip_range_high", none_or(positive), "None or a finite number > 0")
        if self.clip_range_low is None and self.clip_range_high is None:
            check_field(self, "clip_range", none_or(lambda eps: eps < 1), "None or in (0, 1)")
        if (self.clip_low is None) != (self.clip_high is None):
            raise ValueError("ReinforceConfig.clip_range_low and clip_range_high: a clipped surrogate needs both "
                             f"sides; got ε_low={self.clip_low}, ε_high={self.clip_high} (set clip_range for both)")
        if self.clip_low is None and self.update_epochs * self.num_minibatches > 1:
            raise ValueError(f"ReinforceConfig.update_epochs × num_minibatches = "
                             f"{self.update_epochs * self.num_minibatches} steps per batch: every step after the first "
                             "is off-policy and needs the ratio to π_old, clipped: set clip_range (or "
                             "clip_range_low and clip_range_high)")
        if self.ratio_level == "sequence" and self.clip_low is None:
            raise ValueError("ReinforceConfig.ratio_level='sequence' (GSPO) is a clipped ratio: set clip_range (or "
                             "clip_range_low and clip_range_high)")
        groups = self.baseline in ("rloo", "group_mean") or self.advantage_norm == "group_std"
        if (groups or self.drop_uniform_groups) and self.samples_per_prompt < 2:
            raise ValueError("baseline 'rloo' or 'group_mean', advantage_norm='group_std' and drop_uniform_groups "
                             "are group statistics: they need samples_per_prompt ≥ 2")
        if self.advantage_norm == "batch" and self.baseline == "value":
            raise ValueError("ReinforceConfig.advantage_norm='batch' whitens the advantages before the training "
                             "forward, but baseline 'value' subtracts V(s_t) during it: use another baseline")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        exact_div(self.episodes_per_update, self.samples_per_prompt, "episodes_per_update / samples_per_prompt")
        exact_div(self.episodes_per_update, self.num_minibatches, "episodes_per_update / num_minibatches")
        if self.micro_batch_size is not None:
            exact_div(self.episodes_per_update, self.micro_batch_size, "episodes_per_update / micro_batch_size")

    @property
    def clip_low(self) -> float | None:
        """ε_low of the clipped surrogate (None: no clipping, plain REINFORCE)."""
        return self.clip_range if self.clip_range_low is None else self.clip_range_low

    @property
    def clip_high(self) -> float | None:
        """ε_high of the clipped surrogate (None: no clipping, plain REINFORCE)."""
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per batch: update_epochs × num_minibatches."""
        return self.update_epochs * self.num_minibatches

    @classmethod
    def preset(cls, name: str, **overrides) -> ReinforceConfig:
        """The config of a published recipe (`PRESETS`), with `overrides` for any field (`ValueError` for an unknown
        name): ``ReinforceConfig.preset("dr_grpo", samples_per_prompt=8)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_saved(cls, **saved) -> ReinforceConfig:
        """The config a checkpoint saved (`agents.checkpoint`): those from before ``advantage_norm`` store
        ``group_norm`` (True: "group_std")."""
        if "group_norm" in saved:
            saved = dict(saved)
            saved.setdefault("advantage_norm", "group_std" if saved.pop("group_norm") else "none")
        return cls(**saved)


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
            if config.steps_per_batch > 1:  # each rank's share of a drawn minibatch differs: forwards out of step
                raise FSDPIncompatible(f"fsdp=True runs one gradient step per batch in Reinforce; update_epochs × "
                                       f"num_minibatches = {config.steps_per_batch} (clipped multi-step recipes "
                                       "such as DAPO) is not sharded yet: use plain data parallelism (fsdp=False)")
            check_shardable(self.world)
        if not self.ranks.single:  # every prompt's K samples on one rank
            exact_div(config.episodes_per_update // self.ranks.world_size, config.samples_per_prompt,
                      f"each rank's share of the batch (episodes_per_update / {self.ranks.world_size} ranks) / "
                      "samples_per_prompt")
            if config.micro_batch_size is not None:
                exact_div(config.episodes_per_update // self.ranks.world_size, config.micro_batch_size,
                          f"each rank's share of the batch (episodes_per_update / {self.ranks.world_size} ranks) / "
                          "micro_batch_size")
        if config.kl_in_loss and (self.world.beta != 0 or self.world.kl_controller.state_dict()["kind"] != "fixed"):
            raise KLPaidTwice(f"ReinforceConfig.kl_in_loss pays kl_coef·KL in the loss, but the env's reward already "
                              f"pays β·KL (β = {self.world.beta}): make the env with beta=0 (and no kl_target)")
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
        """One REINFORCE update on a fresh batch (one gradient step, or update_epochs × num_minibatches clipped
        steps). Returns the logged metrics (the whole batch's, on every rank).

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
        # 2. returns: the env's per-token rewards (−β·KL_t, + the score at the last token), summed.
        episode_returns = b.rewards.sum(1)  # (B,)  G
        # Episodes that carry a loss: not those whose score the env masked (their return is not data), and, where
        # group statistics are taken, not those left without another valid sample of their prompt (no baseline),
        # nor, with drop_uniform_groups, those of a group whose returns are all equal.
        usable = b.valid  # (B,)
        if cfg.baseline in ("rloo", "group_mean") or cfg.advantage_norm == "group_std":
            usable = usable & (group_counts(usable, k) >= 2)
        if cfg.drop_uniform_groups:
            usable = usable & ~uniform_groups(episode_returns, k, usable)
        mask = b.response_mask.float() * usable.float()[:, None]  # (B, T)
        returns = reward_to_go(b.rewards, mask) if cfg.reward_to_go else episode_returns[:, None] * mask  # (B, T)
        # 3. baselines (b does not depend on the sample's own actions, but for group_mean) and advantages A = G − b.
        #    The group statistics are each prompt's, whose K samples are all on this rank; the batch whitening's
        #    are the whole batch's.
        num_episodes, num_tokens = total(usable.sum()), total(mask.sum())  # the whole batch's
        baseline = self._baseline(episode_returns, usable, mask, num_episodes)  # (B, T)
        advantages = returns - baseline  # (B, T)
        group_norm = cfg.advantage_norm == "group_std"
        scale = (group_std(episode_returns, k, usable) + cfg.group_norm_eps)[:, None] if group_norm else 1.0
        if cfg.advantage_norm == "batch":
            advantages = masked_whiten(advantages, mask, total=total)
        # 4. one gradient step (or update_epochs × num_minibatches clipped ones): the policy loss weighted over the
        #    tokens by loss_aggregation (+ kl_coef·KL, + the value loss averaged over the tokens). Every normaliser
        #    is its minibatch's count over the whole batch, counted before the micro-batches run, so that the
        #    micro-batches' (and ranks') gradients add up to the minibatch's.
        values_seen = torch.zeros_like(mask)
        no_signal = bool(num_episodes == 0) or (cfg.baseline != "value" and not cfg.kl_in_loss
                                                and not self.ranks.any(bool(advantages.abs().any())))
        first, n = self.ranks.rank * len(episodes), len(episodes)
        multi = cfg.steps_per_batch > 1
        # Several steps: minibatches drawn over the whole batch from the stream every rank shares (as PPO); each
        # rank trains on its own rows of each. One step: the whole batch, and no draw.
        orders = ([self.shared_rng.permutation(cfg.episodes_per_update) for _ in range(cfg.update_epochs)] if multi
                  else [np.arange(cfg.episodes_per_update)])
        counts = self.ranks.cat(torch.stack([usable.float(), mask.sum(1)], 1))  # (B_all, 2) episodes, tokens

        def mine(rows: np.ndarray) -> np.ndarray:  # this rank's rows of `rows` (batch indices), as local indices
            return rows[(rows >= first) & (rows < first + n)] - first

        # π_old: several steps need the log-probs of the policy that sampled, in the training forward's layout (the
        # first minibatch's micro-batches repeat this computation exactly, so its ratio is exactly 1, as in PPO);
        # one step takes its own forward's, detached.
        first_minibatch = np.split(orders[0], cfg.num_minibatches)[0]
        old_logprobs = self._old_logprobs(b, mine(first_minibatch)) if multi and not no_signal else None
        log: dict[str, list[float]] = {}
        skipped = 0
        for order in orders:
            for minibatch in np.split(order, cfg.num_minibatches):
                if no_signal:  # e.g. RLOO on groups with equal returns: nothing to learn, parameters stay put
                    break
                totals = counts[torch.as_tensor(minibatch, device=counts.device)].sum(0)  # the minibatch's
                sums = self._minibatch_gradients(b, mine(minibatch), mask, advantages, returns, scale, old_logprobs,
                                                 values_seen, totals[0], totals[1])
                grad_norm = clipped_step(self.optimizer, self.params, cfg.max_grad_norm, finite=sums is not None,
                                         ranks=self.ranks, sharded=self.sharded is not None)
                if grad_norm is None:  # a loss or the gradient was not finite: parameters stay as they are
                    skipped += 1
                    continue
                sums = self.ranks.sum_floats(sums)  # the ranks' shares add up to the minibatch's values
                for key, value in (sums | {"train/grad_norm": grad_norm}).items():
                    log.setdefault(key, []).append(value)
        if no_signal:  # the step is not taken: gradients dropped, on every rank
            clipped_step(self.optimizer, self.params, cfg.max_grad_norm, finite=False, ranks=self.ranks,
                         sharded=self.sharded is not None)
        # 5. stats
        self.num_updates += 1
        self.num_episodes += len(everything)
        self.num_timesteps += everything.tokens
        final_advantages = (advantages - values_seen) / scale
        keys = [*self._loss_keys(), "train/grad_norm"]
        metrics = {"time/updates": self.num_updates, "time/timesteps": self.num_timesteps,
                   "time/episodes": self.num_episodes, **stats,
                   **{key: float(np.mean(log[key])) if key in log else float("nan") for key in keys},
                   "policy/advantage_std": float(masked_var(final_advantages, mask, total=total).sqrt())
                   if num_tokens >= 2 else float("nan"),
                   "val/baseline_mean": float(masked_mean(baseline + values_seen, mask, total=total)),
                   "val/explained_variance": explained_variance(baseline + values_seen, returns, mask, total),
                   "train/skipped": skipped, "train/no_signal": int(no_signal),
                   "time/tokens_per_s": everything.tokens / rollout_seconds,
                   "time/update_seconds": time.perf_counter() - start}
        if multi:
            metrics["train/rollout_logprob_mismatch"] = self.ranks.max(
                float(((old_logprobs - b.env_logprobs).abs() * mask).max())) if old_logprobs is not None \
                else float("nan")
        self.logger.log(metrics)
        return metrics

    def _baseline(self, episode_returns: torch.Tensor, usable: torch.Tensor, mask: torch.Tensor,
                  num_episodes: torch.Tensor) -> torch.Tensor:
        """b ``(B, T)`` of the config's baseline from the episodes' returns ``(B,)`` (the moving average is read, then
        moved toward the batch's mean usable return); zeros for "none" and "value" (which subtracts V(s_t) in phase
        4, from the same forward that trains it)."""
        cfg, k = self.config, self.config.samples_per_prompt
        if cfg.baseline == "rloo":
            return rloo_baseline(episode_returns, k, usable)[:, None] * mask
        if cfg.baseline == "group_mean":
            return group_mean(episode_returns, k, usable)[:, None] * mask
        if cfg.baseline == "moving_average":
            baseline = torch.full_like(mask, self.moving_average) * mask
            returns_sum = self.ranks.sum(episode_returns[usable].sum())
            if num_episodes > 0:
                self.moving_average = (cfg.ema_decay * self.moving_average
                                       + (1 - cfg.ema_decay) * float(returns_sum / num_episodes))
            return baseline
        return torch.zeros_like(mask)

    def _old_logprobs(self, b: Batch, first_rows: np.ndarray) -> torch.Tensor:
        """log π_old ``(B, T)`` of this rank's episodes under the current parameters, before any step: the first
        minibatch's rows (`first_rows`, local) in its micro-batches, then the rest (no gradient)."""
        old = torch.zeros_like(b.env_logprobs)
        rest = np.setdiff1d(np.arange(len(old)), first_rows)
        with torch.no_grad():
            for micro in self._micro_batches(first_rows) + self._micro_batches(rest):
                logits, _ = self._forward(b, micro)
                old[micro] = logprobs_from_logits(logits, b.responses[micro])
        return old

    def _minibatch_gradients(self, b: Batch, rows: np.ndarray, mask: torch.Tensor, advantages: torch.Tensor,
                             returns: torch.Tensor, scale: torch.Tensor | float, old_logprobs: torch.Tensor | None,
                             values_seen: torch.Tensor, num_episodes: torch.Tensor,
                             num_tokens: torch.Tensor) -> dict[str, float] | None:
        """Accumulate this rank's share of one minibatch's gradient over its micro-batches (zeroed first): `rows`,
        its episodes of the minibatch (possibly none), with the minibatch's whole counts `num_episodes` and
        `num_tokens`. Returns its shares of the loss terms and stats, or None if a loss was not finite (the step is
        then skipped on every rank)."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        counts = dict(num_episodes=num_episodes, num_tokens=num_tokens, max_tokens=self.world.max_new_tokens)
        sums = dict.fromkeys(self._loss_keys(), 0.0)  # the same keys on every rank, rows or none
        finite = True
        for micro in self._micro_batches(rows):
            m = mask[micro]
            logits, values = self._forward(b, micro)
            logprobs = logprobs_from_logits(logits, b.responses[micro])  # (b, T)
            micro_advantages = advantages[micro]
            vf_loss = torch.zeros((), device=self.device)
            if values is not None:
                values_seen[micro] = values.detach() * m
                micro_advantages = micro_advantages - values.detach() * m
                vf_loss = 0.5 * masked_mean((values - returns[micro]) ** 2, m, num_tokens)
            micro_advantages = micro_advantages / (scale[micro] if cfg.advantage_norm == "group_std" else 1.0)
            terms = {}
            if cfg.clip_low is None:
                pg_loss = reinforce_loss(logprobs, micro_advantages, m, num_episodes, cfg.loss_aggregation,
                                         num_tokens, self.world.max_new_tokens)
            else:  # π_old: the sampling policy's log-probs (one step: this very forward's, so the ratio is 1)
                old = logprobs.detach() if old_logprobs is None else old_logprobs[micro]
                pg_loss, pg_stats = policy_loss(logprobs, old, micro_advantages, m, (cfg.clip_low, cfg.clip_high),
                                                aggregation=cfg.loss_aggregation, ratio_level=cfg.ratio_level,
                                                **counts)
                terms.update({f"policy/{key}": value for key, value in pg_stats.items()})
            loss = pg_loss + cfg.vf_coef * vf_loss
            if cfg.kl_in_loss:  # kl_coef·KL(π ‖ π_ref), weighted over the tokens as the policy loss is
                kl_loss = aggregate(kl_estimates(logprobs, b.ref_logprobs[micro], cfg.kl_estimator), m,
                                    cfg.loss_aggregation, **counts)
                loss = loss + cfg.kl_coef * kl_loss
                terms["loss/kl"] = kl_loss.item()
            if not torch.isfinite(loss):
                if self.sharded is None:
                    return None
                finite = False  # FSDP: every rank runs every backward (each one a collective); the step is skipped
            loss.backward()
            terms |= {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                      "policy/entropy": masked_mean(entropy_from_logits(logits.detach()), m, num_tokens).item()}
            for key, value in terms.items():
                sums[key] += value  # micro-batch shares add up to the minibatch's values
        return sums if finite else None

    def _loss_keys(self) -> list[str]:
        """The loss terms and stats each step logs: those of the clipped surrogate and the KL term when used."""
        cfg = self.config
        return (["loss/policy", "loss/value", "policy/entropy"]
                + (["policy/clipfrac", "policy/approx_kl", "policy/ratio"] if cfg.clip_low is not None else [])
                + (["loss/kl"] if cfg.kl_in_loss else []))

    def _micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """`rows` in consecutive chunks of ``micro_batch_size`` (all of them at once when None; the last one shorter
        when a rank's share of a minibatch is not a multiple of it; none for no rows)."""
        size = self.config.micro_batch_size or max(1, len(rows))
        return [rows[i: i + size] for i in range(0, len(rows), size)]

    def _given(self, episodes: Episodes) -> Episodes:
        """`update(episodes)`'s episodes, checked (`agents.common.given_episodes`, groups of K of one prompt, and
        with kl_in_loss log π_ref for every response token)."""
        episodes = given_episodes(self, episodes)
        k = self.config.samples_per_prompt
        if self.config.kl_in_loss and [len(r) for r in episodes.ref_logprobs] != [len(r) for r in episodes.responses]:
            raise ValueError("update(episodes=...): kl_in_loss needs episodes.ref_logprobs, one per response token")
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

        return load_agent(cls, ReinforceConfig.from_saved, "reinforce", directory, env, out_dir, progress, fsdp, own,
                          write_own)


def main(argv: list[str] | None = None) -> dict | list[str]:
    return run_command(Reinforce, ReinforceConfig, "REINFORCE with a baseline on RLHF-v0", argv, presets=PRESETS,
                       loss_kl_coef=lambda config: config.kl_coef if config.kl_in_loss else None)


if __name__ == "__main__":
    main()
