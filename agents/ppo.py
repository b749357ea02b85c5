"""PPO with a value head for language-model policies on RLHF-v0 (the InstructGPT recipe).

    python -m agents.ppo --task sentiment --reward gold --total-timesteps 200000 --out runs/ppo-gt
    python -m agents.ppo --diagnose runs/ppo-gt/metrics.jsonl

One update (`PPO.update`) reads as numbered phases: 1. rollout from the vector env (the env computes log π,
log π_ref, the per-token KL penalty and the score); 2. old log-probs and values in the training layout; 3. GAE
advantages; 4. K epochs × minibatches of the clipped policy and value losses; 5. stats. Every implementation
detail that matters is a field of `PPOConfig` with its default and its source.

Legend: ``B`` episodes per update, ``P`` query tokens, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

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
    full_parameters,
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
    unit_interval,
    whole_batch,
)
from agents.core import (
    LossAggregation,
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from agents.distributed import Ranks
from agents.fsdp import check_shardable
from agents.metrics import MetricsLogger
from agents.policy import ActorCritic, ValueInit
from agents.rollout import Episodes, episode_stats
from rlhf_env.pipeline.sft import sft_loss
from rlhf_env.text import encode_pairs


@dataclass(frozen=True)
class PPOConfig:
    episodes_per_update: int = 64
    """Episodes per update (a multiple of the vector env's num_envs; each rollout runs every row once)."""
    minibatch_size: int = 16
    """Episodes per optimizer step."""
    update_epochs: int = 4
    """Passes over each batch (K)."""
    learning_rate: float = 1e-4
    """Adam step size (constant). Tiny GPT-2 policies take larger steps than the 1e-5 of billion-parameter runs
    (3e-4 learned faster for 50 updates, then plateaued lower: see docs/design.md)."""
    adam_eps: float = 1e-5
    """Adam epsilon (CleanRL's PPO default)."""
    gamma: float = 1.0
    """Discount over response tokens (1: the score counts fully at every token, as in InstructGPT)."""
    lam: float = 0.95
    """GAE λ."""
    clip_range: float = 0.2
    """PPO ratio clip ε (both sides, unless clip_range_low / clip_range_high set one)."""
    clip_range_low: float | None = None
    """ε_low: the ratio's floor is 1 − ε_low (None: clip_range)."""
    clip_range_high: float | None = None
    """ε_high: the ratio's ceiling is 1 + ε_high (None: clip_range; DAPO's clip-higher takes 0.28 with ε_low 0.2)."""
    loss_aggregation: LossAggregation = "token_mean"
    """How the policy loss weights tokens (agents.core.aggregate): "token_mean", "seq_mean_token_mean",
    "seq_mean_token_sum" or "seq_mean_token_sum_norm"; the value loss stays a token mean."""
    clip_range_value: float | None = 0.2
    """Value clip around the old values (None: plain MSE)."""
    vf_coef: float = 0.1
    """Value loss coefficient c₁ (TRL's PPO default: the value loss must not drown the policy's gradient)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (the KL penalty already keeps the policy near π_ref)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs of an update early once the mean approx-KL to the rollout policy exceeds this."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch's tokens (the 37 PPO details, #7)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance before GAE (sign kept; TRL's whiten_rewards)."""
    score_clip: float | None = None
    """Clip the end-of-episode score to ±score_clip before GAE (the KL part is never clipped)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the SFT log-likelihood on the task's demonstrations (InstructGPT's alignment-tax fix)."""
    ptx_batch_size: int = 16
    """Demonstrations per minibatch for the ptx term."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (gradients are summed, then one step)."""
    separate_critic: bool = False
    """Give the critic its own trunk instead of a head on the policy's."""
    value_init: ValueInit = "zero"
    """Value head init: "zero", "small", or "reward_model" (needs separate_critic)."""
    seed: int = 0
    """Seeds the value head, the rollouts' prompts and samples, the minibatch order and the ptx demonstrations."""

    def __post_init__(self):
        for name in ("episodes_per_update", "minibatch_size", "update_epochs", "ptx_batch_size",
                     "gradient_accumulation_steps"):
            check_field(self, name, at_least_one, "an integer ≥ 1")
        for name in ("learning_rate", "vf_coef", "ptx_coef"):
            check_field(self, name, non_negative, "a finite number ≥ 0")
        for name in ("adam_eps", "clip_range", "max_grad_norm"):
            check_field(self, name, positive, "a finite number > 0")
        for name in ("clip_range_value", "target_kl", "score_clip", "clip_range_high"):
            check_field(self, name, none_or(positive), "None or a finite number > 0")
        check_field(self, "clip_range_low", none_or(lambda eps: 0 < eps < 1), "None or in (0, 1)")
        check_field(self, "loss_aggregation", get_args(LossAggregation).__contains__,
                    f"one of {get_args(LossAggregation)}")
        for name in ("gamma", "lam"):
            check_field(self, name, unit_interval, "in [0, 1]")
        check_field(self, "ent_coef", math.isfinite, "finite")
        check_field(self, "value_init", get_args(ValueInit).__contains__, f"one of {get_args(ValueInit)}")
        _ = self.num_minibatches, self.micro_batch_size  # the sizes must divide

    @property
    def clip_ranges(self) -> tuple[float, float]:
        """(ε_low, ε_high) of the clipped surrogate."""
        return (self.clip_range if self.clip_range_low is None else self.clip_range_low,
                self.clip_range if self.clip_range_high is None else self.clip_range_high)

    @property
    def num_minibatches(self) -> int:
        return exact_div(self.episodes_per_update, self.minibatch_size, "episodes_per_update / minibatch_size")

    @property
    def micro_batch_size(self) -> int:
        return exact_div(self.minibatch_size, self.gradient_accumulation_steps,
                         "minibatch_size / gradient_accumulation_steps")


class PPO:
    """PPO on the env's acting policy: ``PPO(gym.make_vec("RLHF-v0", num_envs=16), PPOConfig()).learn(100_000)``.

    The policy being trained is ``env.unwrapped.policy`` (in place), so the env's per-token KL is always that of
    the policy that acted. β (fixed or adaptive) lives in the env; the checkpoint saves its controller.

    Data-parallel when a `torch.distributed` process group is initialised (`agents.distributed`): each of the W
    ranks samples ``episodes_per_update / W`` episodes, the minibatches are drawn over the whole batch, and each
    update is the single-process update of the whole batch. With ``fsdp=True`` the policy and its critic are
    also sharded over the ranks (`agents.fsdp`).
    """

    def __init__(self, env, config: PPOConfig = PPOConfig(), out_dir: str | Path | None = None,
                 progress: bool = True, fsdp: bool = False):
        self.config = config
        self.ranks = Ranks.current()
        self.envs, self.world = acting_world(env, "PPO", config.episodes_per_update, self.ranks)
        if fsdp:
            check_shardable(self.world)
        if config.ptx_coef > 0:  # PPO-ptx needs the task's demonstrations: a task without them raises here
            self.world.task.demonstrations(0, np.random.default_rng(0))
        self.device, self.lm = self.world.device, self.world.policy
        if config.value_init == "reward_model" and self.world.reward_model is None and self.world.named_rewards:
            raise ValueError(f"value_init='reward_model' starts the critic as the env's one reward model; this env "
                             f"has several rewards {self.world.reward_names} (rewards=): use value_init='zero' or "
                             "'small'")
        if config.value_init == "reward_model" and self.world.reward_tokenizer is not None:
            raise ValueError("value_init='reward_model' starts the critic as the env's reward model, but that model "
                             "reads its own tokenizer's ids, not the policy's: use value_init='zero' or 'small'")
        # The training forward: the env's choice for its policy, or under FSDP the model's own forward (its hooks
        # gather and reduce the shards; the lean GPT-2 path would bypass them).
        backend = "hf" if fsdp else self.world.backends["policy"]
        with torch.random.fork_rng(devices=[]):  # the value head's init, seeded; the global RNG is left as it was
            torch.manual_seed(config.seed)
            self.model = ActorCritic(self.lm, backend, config.value_init, config.separate_critic,
                                     self.world.reward_model)
        self.rng, self.shared_rng, self.generator = seeded_generators(config.seed, self.ranks)
        self.num_timesteps = self.num_updates = self.num_episodes = 0
        self.params, self.sharded, self.optimizer = train_module(self, self.model, fsdp)
        self.progress, self.logger = progress, MetricsLogger(out_dir if self.ranks.is_main else None)

    # ---------------------------------------------------------------- training
    def learn(self, total_timesteps: int, callback=None) -> PPO:
        """Update until `total_timesteps` env steps (generated tokens, idle rows included) have been taken.

        ``callback(agent, metrics)`` runs after every update; returning False stops training.
        """
        return learn_loop(self, total_timesteps, callback, self.progress)

    def update(self, episodes: Episodes | None = None) -> dict:
        """One PPO iteration: rollout, advantages, K epochs of minibatch updates. Returns the logged metrics (the
        whole batch's, on every rank).

        `episodes` replaces the rollout: this rank's share of the batch (``episodes_per_update / W``), sampled from
        the current policy as `agents.rollout.collect_episodes` returns them; β then does not move. `ValueError`
        for another count or per-token lengths, before any model call."""
        cfg, start = self.config, time.perf_counter()
        # 1. rollout: the env samples-and-scores; we keep its log-probs, rewards and scores (never recomputed).
        #    The model stays in eval mode for the whole update (dropout off, as TRL's disable_dropout): the training
        #    forward is then the function that sampled, and draws nothing from torch's global RNG, which no
        #    checkpoint holds (a model whose config has dropout, such as a released GPT-2, resumes bit for bit).
        self.model.eval()
        episodes = rollout(self) if episodes is None else given_episodes(self, episodes)
        rollout_seconds = time.perf_counter() - start
        everything = whole_batch(episodes, self.ranks)  # every rank's episodes: the batch's metrics
        stats = episode_stats(everything, self.world.beta, self.world.task)
        b = batch_tensors(episodes, self.world.pad_token_id, self.device, cfg.score_clip)
        total = self.ranks.sum  # sums a statistic over the ranks: the whole batch's (the identity in one process)
        # Tokens that carry a loss: every response token, except those of episodes whose score the env masked
        # (no value target, no advantage, in no whitening or mean).
        mask = b.response_mask.float() * b.valid.float()[:, None]  # (B, T)
        # The minibatch orders are drawn over the whole batch from the stream every rank shares; this rank holds
        # the batch's rows first … first + n − 1 (rank order) and trains on its own rows of each minibatch.
        orders = [self.shared_rng.permutation(cfg.episodes_per_update) for _ in range(cfg.update_epochs)]
        first, n = self.ranks.rank * len(episodes), len(episodes)
        tokens = self.ranks.cat(mask.sum(1))  # (B_all,) each episode's loss tokens, the whole batch's

        def mine(rows: np.ndarray) -> np.ndarray:  # this rank's rows of `rows` (batch indices), as local indices
            return rows[(rows >= first) & (rows < first + n)] - first

        # 2. old log-probs and values, in the training forward's layout: the first minibatch of epoch 0 repeats
        #    this computation exactly, so its ratio is exactly 1 (the env's incremental KV-cache log-probs agree
        #    with these only to ~1e-6, so they are used for the reward, not for the ratio).
        old_logprobs, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad(), full_parameters(self):  # FSDP: gathered once, as the ranks' forwards differ in number
            for micro in self._micro_batches(mine(orders[0])):
                logits, values = self._forward(b, micro)
                old_logprobs[micro] = logprobs_from_logits(logits, b.responses[micro])
                old_values[micro] = values
        rollout_mismatch = self.ranks.max(float(((old_logprobs - b.env_logprobs).abs() * mask).max()))
        # 3. advantages: GAE over response tokens; the episode's last token is terminal (value 0 after it). The
        #    whitening statistics are the whole batch's.
        rewards = b.rewards
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=total)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (B, T) each
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, total=total)
        # 4. K epochs × minibatches: clipped policy loss + c₁·clipped value loss − c₂·entropy (+ ptx). Each term is
        #    a mean over the minibatch's tokens whatever the accumulation and however the ranks share it: its
        #    denominator is counted before the micro-batches run, each micro-batch adds its share
        #    (`agents.core.masked_mean`), and the ranks' gradients are summed before the step.
        log = {key: [] for key in ("loss/policy", "loss/value", "loss/ptx", "policy/entropy", "policy/clipfrac",
                                   "policy/approx_kl", "policy/ratio", "val/clipfrac", "train/grad_norm")}
        skipped, empty, epochs_run = 0, 0, 0
        for order in orders:
            epoch_kl = []
            for minibatch in np.split(order, cfg.num_minibatches):
                num_tokens = tokens[minibatch].sum()
                if num_tokens == 0:  # every episode of the minibatch masked: nothing to learn, no step
                    empty += 1
                    continue
                num_episodes = (tokens[minibatch] > 0).sum()  # its valid episodes (the per-episode aggregations)
                sums = self._minibatch_gradients(b, mine(minibatch), mask, num_tokens, num_episodes, old_logprobs,
                                                 old_values, advantages, returns)
                grad_norm = clipped_step(self.optimizer, self.params, cfg.max_grad_norm, finite=sums is not None,
                                         ranks=self.ranks, sharded=self.sharded is not None)
                if grad_norm is None:  # a loss or the gradient was not finite: parameters stay as they are
                    skipped += 1
                    continue
                sums = self.ranks.sum_floats(sums)  # the ranks' shares add up to the minibatch's means
                for key, value in sums.items():
                    log[key].append(value)
                log["train/grad_norm"].append(grad_norm)
                epoch_kl.append(sums["policy/approx_kl"])
            epochs_run += 1
            if cfg.target_kl is not None and epoch_kl and np.mean(epoch_kl) > cfg.target_kl:
                break
        # 5. stats
        self.num_updates += 1
        self.num_episodes += len(everything)
        self.num_timesteps += everything.tokens
        seconds = time.perf_counter() - start
        metrics = {"time/updates": self.num_updates, "time/timesteps": self.num_timesteps,
                   "time/episodes": self.num_episodes, **stats,
                   **{key: float(np.mean(values)) if values else float("nan") for key, values in log.items()},
                   "val/explained_variance": explained_variance(old_values, returns, mask, total),
                   "val/mean": float(masked_mean(old_values, mask, total=total)),
                   "train/epochs": epochs_run, "train/skipped_minibatches": skipped,
                   "train/empty_minibatches": empty,
                   "train/rollout_logprob_mismatch": rollout_mismatch,
                   "time/tokens_per_s": everything.tokens / rollout_seconds, "time/update_seconds": seconds}
        self.logger.log(metrics)
        return metrics

    def _minibatch_gradients(self, b: Batch, rows: np.ndarray, mask: torch.Tensor, num_tokens: torch.Tensor,
                             num_episodes: torch.Tensor, old_logprobs: torch.Tensor, old_values: torch.Tensor,
                             advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float] | None:
        """Accumulate this rank's share of one minibatch's gradient over its micro-batches (zeroed first): `rows`,
        its episodes of the minibatch (possibly none), and its share of the ptx demonstrations. Returns its shares
        of the minibatch's loss terms and stats (zeros for a rank with nothing to do), or None if a loss was not
        finite (the step is then skipped).

        Under FSDP every rank runs as many micro-batches as the busiest one, each with the same forwards (their
        all-gathers and reduce-scatters are collectives): a rank out of episodes or demonstrations runs a
        forward on its first episode or the first demonstration, weighted 0."""
        cfg, sharded = self.config, self.sharded is not None
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = self._micro_batches(rows)
        steps = max(1, len(micro_batches)) if cfg.ptx_coef > 0 else len(micro_batches)
        if sharded:
            steps = int(self.ranks.max(max(1, len(micro_batches))))
        ptx_parts = self._ptx_parts(steps) if cfg.ptx_coef > 0 else []
        zero = torch.zeros((), device=self.device)
        sums = dict.fromkeys(("loss/policy", "loss/value", "loss/ptx", "policy/entropy", "policy/clipfrac",
                              "policy/approx_kl", "policy/ratio", "val/clipfrac"), 0.0)
        finite = True
        for i in range(steps):
            micro = micro_batches[i] if i < len(micro_batches) else None
            ptx = ptx_parts[i] if ptx_parts else None
            if micro is None:  # this rank has no episode of the minibatch left, only ptx demonstrations
                pg_loss = vf_loss = entropy = zero
                pg_stats, vf_stats = {"clipfrac": 0.0, "approx_kl": 0.0, "ratio": 0.0}, {"clipfrac": 0.0}
                if sharded:  # the forward every rank runs, weighted 0
                    logits, values = self._forward(b, np.arange(1))
                    pg_loss = 0.0 * (logits.sum() + values.sum())
            else:
                m = mask[micro]
                logits, values = self._forward(b, micro)
                logprobs = logprobs_from_logits(logits, b.responses[micro])  # (b, T)
                entropy = masked_mean(entropy_from_logits(logits), m, num_tokens)
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[micro], advantages[micro], m, cfg.clip_ranges,
                                                num_tokens, aggregation=cfg.loss_aggregation,
                                                num_episodes=num_episodes, max_tokens=self.world.max_new_tokens)
                vf_loss, vf_stats = value_loss(values, old_values[micro], returns[micro], m, cfg.clip_range_value,
                                               num_tokens)
            ptx_loss = ptx[2] * sft_loss(self.model.lm, ptx[0], ptx[1]) if ptx is not None else zero
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy + cfg.ptx_coef * ptx_loss
            if not torch.isfinite(loss):
                finite = False
                if not sharded:
                    return None
                # FSDP: every rank runs every backward (each one a collective); the step is skipped after
            loss.backward()
            for key, value in (("loss/policy", pg_loss.item()), ("loss/value", vf_loss.item()),
                               ("loss/ptx", ptx_loss.item()), ("policy/entropy", entropy.item()),
                               ("policy/clipfrac", pg_stats["clipfrac"]), ("policy/approx_kl", pg_stats["approx_kl"]),
                               ("policy/ratio", pg_stats["ratio"]), ("val/clipfrac", vf_stats["clipfrac"])):
                sums[key] += value  # micro-batch shares add up to the minibatch's means
        return sums if finite else None

    def _ptx_parts(self, n: int) -> list[tuple | None]:
        """PPO-ptx: one batch of ``ptx_batch_size`` demonstrations for the minibatch (drawn from the stream every
        rank shares), this rank's share of it (rank r of W: the r-th of W near-equal slices) split into `n` parts,
        each ``(rows, num_tokens, weight)`` for ``weight · sft_loss(rows, num_tokens)`` with the whole batch's token
        count and weight 1. An empty part is None, or under FSDP (every rank runs the same forwards) the batch's
        first demonstration with weight 0."""
        task, tokenizer = self.world.task, self.world.tokenizer
        demos = task.demonstrations(self.config.ptx_batch_size, self.shared_rng)
        pairs = encode_pairs(tokenizer, [p for p, _ in demos], [r for _, r in demos],
                             int(self.model.lm.config.max_position_embeddings)).to(self.device)
        num_tokens = pairs.response_mask.sum()
        share = np.array_split(np.arange(len(pairs)), self.ranks.world_size)[self.ranks.rank]
        parts = np.array_split(share, n)
        filler = (pairs.rows(torch.zeros(1, dtype=torch.long, device=self.device)), num_tokens, 0.0)
        return [(pairs.rows(torch.as_tensor(rows, device=self.device)), num_tokens, 1.0) if len(rows)
                else filler if self.sharded is not None else None for rows in parts]

    def _micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """`rows` in consecutive chunks of ``micro_batch_size`` (the last one shorter when a rank's share of a
        minibatch is not a multiple of it; none for no rows)."""
        size = self.config.micro_batch_size
        return [rows[i: i + size] for i in range(0, len(rows), size)]

    def _forward(self, b: Batch, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(b, T, V)`` at the sampling temperature and values ``(b, T)`` for episodes `rows`."""
        with autocast(self.device):
            return self.model(*b.text(rows), temperature=self.world.temperature)

    # ---------------------------------------------------------------- acting and checkpoints
    def predict(self, observation: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
        """The next token for an env observation (one, or a batch), SB3-style: ``(action, None)``."""
        return predict(self, observation, deterministic)

    def save(self, directory: str | Path) -> None:
        """Policy (safetensors), critic, optimizer, RNG states, KL controller, counters, config and the env's
        settings, as one checkpoint written in one step (`agents.checkpoint`)."""
        save_checkpoint(self, directory, "ppo", self.model.critic_state_dict())

    @classmethod
    def load(cls, directory: str | Path, env, out_dir: str | Path | None = None, progress: bool = True,
             fsdp: bool = False) -> PPO:
        """Resume from `save` in `env`, built like the original (same task, reference, reward and KL settings).

        Check-then-change: a damaged checkpoint, another env or another shape raises `ValueError` and leaves the env
        as it was. With `out_dir`, its ``metrics.jsonl`` continues from the checkpoint's update. `fsdp` shards the
        resumed agent (`agents.fsdp`), whether or not the saved run was sharded."""
        return load_agent(cls, PPOConfig, "ppo", directory, env, out_dir, progress, fsdp,
                          own=lambda agent, _: agent.model.critic_state_dict(),
                          write_own=lambda agent, c: agent.model.load_state_dict(c.tensors, strict=False))


def main(argv: list[str] | None = None) -> dict | list[str]:
    return run_command(PPO, PPOConfig, "PPO with a value head on RLHF-v0", argv)


if __name__ == "__main__":
    main()
