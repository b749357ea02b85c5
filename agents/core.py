"""Pure tensor functions shared by the agents: masked statistics, log-probs, GAE, the PPO, REINFORCE and DPO
losses, and the options of the critic-free recipes (loss aggregation, asymmetric and sequence-level clipping, group
baselines, KL estimators as loss terms).

Legend: ``B`` episodes, ``T`` response tokens (right-padded), ``V`` vocabulary. ``mask (B, T)`` is 1 on real
response tokens (EOS included) and 0 on padding. Every function here is pure (no module state, no RNG), so tests
call them directly with hand-computed values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

Total = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes that hold the rest of a batch (`agents.distributed.Ranks.sum`)."""


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | float | None = None,
                total: Total | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (a scalar).

    `count` replaces ``mask.sum()`` as the denominator. When `x` is one micro-batch (or one rank's share) of a
    larger batch, pass the whole batch's count, decided before the micro-batches run: the micro-batches' results
    then add up to the batch's mean, every entry weighted 1/count however the batch is split. (A mean per
    micro-batch, averaged, would weight the entries of short micro-batches up.)

    `total` makes it the mean over the whole batch when `x` is this process's share of it: numerator (and, without
    `count`, the denominator) are summed over the processes (`Total`). None: `x` is the whole batch.
    """
    total = total or _alone
    return total((x * mask).sum()) / (total(mask.sum()).clamp(min=1) if count is None else count)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total: Total | None = None) -> torch.Tensor:
    """Variance of `x` over the masked entries (Bessel-corrected by default, as TRL and lm-human-preferences do).

    Two passes (the mean, then the mean squared deviation), each summed over the processes with `total` (see
    `masked_mean`), so a batch split over processes has the variance of the whole batch. `ValueError` for an
    unbiased variance of fewer than 2 entries."""
    total = total or _alone
    mean = masked_mean(x, mask, total=total)
    count = total(mask.sum())
    var = masked_mean((x - mean) ** 2, mask, total=total)
    if unbiased:
        if count < 2:
            raise ValueError("an unbiased variance needs at least 2 masked entries")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Total | None = None) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean unless ``shift_mean=False``) over the masked entries.

    Padding stays 0. ``shift_mean=False`` is how rewards are whitened: their sign carries meaning. With fewer than
    two masked entries there is no variance to divide by: `x` is only centred (``shift_mean``) or left as it is.
    `total`: the mean and variance are the whole batch's when `x` is this process's share (`masked_var`).
    """
    total = total or _alone
    mean = masked_mean(x, mask, total=total)
    scale = (torch.rsqrt(masked_var(x, mask, total=total) + eps) if total(mask.sum()) >= 2
             else torch.ones_like(mean))
    whitened = (x - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: ``(B, T, V), (B, T) -> (B, T)`` in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: ``(B, T, V) -> (B, T)`` in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 16).

    Every episode ends **terminated** at its last real token (EOS or the env's token cap, which the env also
    reports as terminated), so the value after it is 0: the terminal score is in ``rewards`` at that token and is
    never bootstrapped on top of. Returns ``(advantages, returns)``, both ``(B, T)`` and 0 on padding.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, T) shape")
    mask = mask.to(values.dtype)
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # 1 where a real token follows
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_mask  # (B, T)
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
LOSS_AGGREGATIONS = get_args(LossAggregation)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean",
              num_episodes: torch.Tensor | float | None = None, num_tokens: torch.Tensor | float | None = None,
              max_tokens: int | None = None) -> torch.Tensor:
    """One scalar loss from per-token terms ``(B, T)``: how a batch's tokens are weighted (verl's names).

    * ``"token_mean"``: Σ_{i,t} ℓ / N_tokens, every token weighted alike (DAPO, Yu et al. 2025, §3.3; PPO);
    * ``"seq_mean_token_mean"``: (1/N) Σ_i (1/|y_i|) Σ_t ℓ, each episode's token mean, averaged (GRPO, Shao et al.
      2024, eq. 3): a token of a short response weighs more;
    * ``"seq_mean_token_sum"``: (1/N) Σ_i Σ_t ℓ, the sequence's sum, averaged (REINFORCE on log π(y|x); RLOO);
    * ``"seq_mean_token_sum_norm"``: (1/N) Σ_i Σ_t ℓ / L with L = `max_tokens`, the longest response allowed
      (Dr. GRPO, Liu et al. 2025): the sequence sum scaled by a constant, so no length bias.

    N is `num_episodes` and N_tokens `num_tokens`: the whole (mini)batch's counts when these rows are one
    micro-batch or one process's share of it, decided before the micro-batches run, so that the parts add up to
    the whole (`masked_mean`); None counts this call's rows (``B``) or masked tokens. |y_i| is the row's own masked
    token count (a row lies whole in one micro-batch). `aggregation_weights` gives each token's weight.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token terms {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same "
                         "(B, T) shape")
    if aggregation == "token_mean":
        return masked_mean(per_token, mask, num_tokens)
    per_episode = (per_token * mask).sum(1)  # (B,)
    if aggregation == "seq_mean_token_mean":
        per_episode = per_episode / mask.sum(1).clamp(min=1)
    elif aggregation == "seq_mean_token_sum_norm":
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"seq_mean_token_sum_norm divides by the longest response allowed: max_tokens must be "
                             f"≥ 1, got {max_tokens}")
        per_episode = per_episode / max_tokens
    return per_episode.sum() / (mask.shape[0] if num_episodes is None else num_episodes)


def aggregation_weights(mask: torch.Tensor, aggregation: str = "token_mean",
                        num_episodes: torch.Tensor | float | None = None,
                        num_tokens: torch.Tensor | float | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """The weight ``(B, T)`` each token's term has in `aggregate` (its gradient with respect to the term): the loss
    is Σ_{i,t} w_{i,t}·ℓ_{i,t}. 0 on padding."""
    terms = torch.zeros_like(mask, dtype=torch.float32, requires_grad=True)
    loss = aggregate(terms, mask.float(), aggregation, num_episodes, num_tokens, max_tokens)
    return torch.autograd.grad(loss, terms)[0]


RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS = get_args(RatioLevel)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log-ratio (Zheng et al. 2025): each episode's mean token log-ratio,
    log s_i = (1/|y_i|)·Σ_t log(π(a_t|s_t)/π_old(a_t|s_t)), the log of the geometric mean of its token ratios, at
    every one of its tokens: ``(B, T) -> (B, T)``, 0 on padding. Its gradient spreads (1/|y_i|)·∇ over the
    episode's tokens."""
    per_episode = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    return per_episode[:, None] * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float | tuple[float, float], num_tokens: torch.Tensor | float | None = None,
                aggregation: str = "token_mean", num_episodes: torch.Tensor | float | None = None,
                max_tokens: int | None = None, ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7): per token max(−A·ρ, −A·clip(ρ, 1 − ε_low,
    1 + ε_high)), aggregated over tokens (`aggregate`; PPO's token mean by default).

    `clip_range`: ε, or ``(ε_low, ε_high)`` for DAPO's asymmetric "clip-higher" (Yu et al. 2025, §3.1: a larger
    ε_high lets a low-probability token with A > 0 grow further before its gradient stops; ε_low still bounds how
    far one with A < 0 is pushed down). ``ratio_level="sequence"``: ρ is the episode's GSPO ratio
    (`sequence_log_ratio`) at every token instead of the token's own.

    Returns ``(loss, stats)`` with ``clipfrac`` (share of tokens where the clipped term is the active one),
    ``approx_kl`` (the k3 estimate of KL(π_old ‖ π), as in CleanRL) and ``ratio``, all token means. With
    `num_tokens` (and `num_episodes`, for the per-episode aggregations), the counts of the whole minibatch this
    ``(b, T)`` micro-batch belongs to, the loss and the stats are the micro-batch's share: summed over the
    micro-batches they are the minibatch's (`masked_mean`).
    """
    low, high = clip_range if isinstance(clip_range, tuple) else (clip_range, clip_range)
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    log_ratio = logprobs - old_logprobs  # (B, T)
    if ratio_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, num_episodes, num_tokens, max_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask, num_tokens).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask, num_tokens).item(),
            "ratio": masked_mean(ratio, mask, num_tokens).item(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None, num_tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``½·max((v − R)², (v_clip − R)²)``, v_clip = v_old + clip(v − v_old, ±clip_range).

    The clipping follows OpenAI baselines' PPO2 (and lm-human-preferences); ``clip_range=None`` gives plain MSE.
    `num_tokens`: as in `policy_loss` (the minibatch's token count, for a micro-batch's share).
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, clipped_more = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        per_token, clipped_more = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * masked_mean(per_token, mask, num_tokens)
    return loss, {"clipfrac": masked_mean(clipped_more.float(), mask, num_tokens).item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       total: Total | None = None) -> float:
    """1 − Var[R − v] / Var[R] over the masked tokens (1: perfect critic, 0: no better than a constant); `total`:
    over the whole batch when these are one process's share (`masked_var`)."""
    var_returns = masked_var(returns, mask, unbiased=False, total=total)
    residual = masked_var(returns - values, mask, unbiased=False, total=total)
    if var_returns == 0:
        return float("nan")
    return float(1 - residual / var_returns)


# ---------------------------------------------------------------- REINFORCE
def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{t' ≥ t} r_t' (γ = 1) over each episode's real tokens: ``(B, T) -> (B, T)``, 0 on padding."""
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must have the same shape")
    rewards = rewards * mask
    return (rewards.flip(1).cumsum(1).flip(1)) * mask


def _groups(returns: torch.Tensor, k: int) -> torch.Tensor:
    if returns.ndim != 1 or k < 2 or returns.shape[0] % k:
        raise ValueError(f"returns must be (N,) with N a multiple of k ≥ 2 (consecutive groups of k samples of one "
                         f"prompt); got shape {tuple(returns.shape)}, k={k}")
    return returns.view(-1, k)  # (N / k, k)


def _group_valid(returns: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
    """`valid (N,)` as ``(N / k, k)`` floats (all ones when None)."""
    if valid is None:
        return torch.ones_like(_groups(returns, k))
    if valid.shape != returns.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the shape of returns {tuple(returns.shape)}")
    return _groups(valid.to(returns.dtype), k)


def group_counts(valid: torch.Tensor, k: int) -> torch.Tensor:
    """For each sample, how many valid samples its group of k holds: ``(N,) bool -> (N,)`` (int64)."""
    counts = _groups(valid.long(), k).sum(1, keepdim=True)  # (N / k, 1)
    return counts.expand(-1, k).reshape(-1)


def rloo_baseline(returns: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out baseline: for each sample, the mean return of the *other* k − 1 samples of its prompt.

    ``returns (N,)`` holds consecutive groups of k samples per prompt; returns ``(N,)``. Independent of the sample
    itself, so subtracting it keeps REINFORCE unbiased (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline
    for free"; Ahmadian et al. 2024 for RLHF). With `valid (N,)` (bool) only valid others are averaged: a sample
    whose return is not data (a masked score) is never anyone's baseline; a sample with no valid other gets 0
    (it has no baseline: leave it out, `group_counts` < 2).
    """
    groups, valid = _groups(returns, k), _group_valid(returns, k, valid)
    others = valid.sum(1, keepdim=True) - valid  # (N / k, k): valid samples besides this one
    total = (groups * valid).sum(1, keepdim=True)
    return ((total - groups * valid) / others.clamp(min=1)).reshape(-1)


def group_std(returns: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's group standard deviation (Bessel-corrected, as GRPO's ``torch.std``): ``(N,) -> (N,)``.

    With `valid (N,)` (bool) over the valid samples of each group only (groups with fewer than two: 0).
    """
    groups, valid = _groups(returns, k), _group_valid(returns, k, valid)
    n = valid.sum(1, keepdim=True)
    mean = (groups * valid).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((groups - mean) ** 2) * valid).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return var.sqrt().expand(-1, k).reshape(-1)


def group_mean(returns: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's group mean return, the sample itself included (GRPO's baseline, Shao et al. 2024):
    ``(N,) -> (N,)``, over the valid samples of each group only with `valid (N,)` (bool).

    G − mean = (K − 1)/K · (G − `rloo_baseline`) for a group of K valid samples: the leave-one-out advantage scaled
    by (K − 1)/K, so its expected gradient is the unbiased one times that factor."""
    groups, valid = _groups(returns, k), _group_valid(returns, k, valid)
    mean = (groups * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)  # (N / k, 1)
    return mean.expand(-1, k).reshape(-1)


def uniform_groups(returns: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """True for each sample whose group's valid returns are all equal (compared exactly): ``(N,) -> (N,)`` bool.
    Such a group has no advantage to learn from under a group baseline; DAPO's dynamic sampling leaves it out
    (Yu et al. 2025, §3.2)."""
    groups, valid = _groups(returns, k), _group_valid(returns, k, valid).bool()
    highest = torch.where(valid, groups, -torch.inf).max(1, keepdim=True).values
    lowest = torch.where(valid, groups, torch.inf).min(1, keepdim=True).values
    return (highest <= lowest).expand(-1, k).reshape(-1)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   num_episodes: torch.Tensor | float | None = None, aggregation: str = "seq_mean_token_sum",
                   num_tokens: torch.Tensor | float | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """The score-function surrogate −Σ_t A_t·log π(a_t|s_t), **summed** over each episode's tokens and averaged over
    episodes: its gradient is the REINFORCE estimator (Williams 1992) of −∇E[G] (with A_t = G − b or G_t − b_t).

    Summing, not averaging, over tokens is what makes it the gradient of the sequence's log-probability
    log π(y|x) = Σ_t log π(a_t|s_t); a per-token mean would weight short responses up. `num_episodes` replaces
    the ``B`` of this call as the denominator: the episode count of the whole batch when these ``(B, T)`` rows
    are one micro-batch of it, so that the micro-batches' losses add up to the batch's. `aggregation` weights the
    tokens otherwise (`aggregate`; `num_tokens` and `max_tokens` as there).
    """
    if not logprobs.shape == advantages.shape == mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, advantages {tuple(advantages.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, T) shape")
    return -aggregate(advantages.detach() * logprobs, mask, aggregation, num_episodes, num_tokens, max_tokens)


# ---------------------------------------------------------------- KL to the reference, as a loss term
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)


def kl_estimates(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from the sampled tokens (Schulman 2020, "Approximating KL divergence"),
    differentiable in `logprobs`; with d = log π(a|s) − log π_ref(a|s):

    * ``"k1"`` = d: unbiased for the KL, but as a loss its gradient ∇log π has expectation 0 under π (on-policy
      it adds noise, no pull toward π_ref);
    * ``"k2"`` = d²/2: biased (low variance) for the KL; its gradient d·∇log π has the expectation of ∇KL(π ‖ π_ref)
      (the score-function gradient), the pull toward π_ref the penalty in the reward gives;
    * ``"k3"`` = exp(−d) − 1 + d: unbiased and never negative (GRPO's, Shao et al. 2024, eq. 4); its gradient
      (1 − π_ref/π)·∇log π has the expectation of ∇KL(π_ref ‖ π), the forward KL.

    ``(B, T), (B, T) -> (B, T)``, in the dtype of `logprobs`; `ref_logprobs` is a constant.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have "
                         "the same (B, T) shape")
    d = logprobs - ref_logprobs.detach()  # (B, T)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.expm1(-d) + d


# ---------------------------------------------------------------- DPO
DPOLoss = Literal["sigmoid", "ipo"]
DPO_LOSSES = get_args(DPOLoss)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses ``(N,)`` and the implicit rewards β·(log π − log π_ref) of chosen and rejected.

    Inputs are sequence log-probabilities ``(N,)`` (summed over response tokens). With the log-ratio margin
    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)):

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023, eq. 7): −log σ(β·h); with ``label_smoothing`` ε the label is wrong
      with probability ε: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h) (conservative DPO, Mitchell 2023);
    * ``"ipo"`` (Azar et al. 2023, eq. 17): (h − 1/(2β))², the margin regressed to a finite target.

    Everything is computed in fp32.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    margin = chosen_ratio - rejected_ratio  # (N,)
    if loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * margin)
                  - label_smoothing * torch.nn.functional.logsigmoid(-beta * margin))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
