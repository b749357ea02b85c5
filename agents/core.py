"""Pure tensor functions shared by the agents: masked statistics, log-probs, GAE and the PPO, REINFORCE and DPO
losses.

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


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float, num_tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), a masked mean over tokens.

    Returns ``(loss, stats)`` with ``clipfrac`` (share of tokens where the clipped term is the active one),
    ``approx_kl`` (the k3 estimate of KL(π_old ‖ π), as in CleanRL) and ``ratio``. With `num_tokens`, the token
    count of the whole minibatch this ``(b, T)`` micro-batch belongs to, the loss and the stats are the
    micro-batch's share: summed over the micro-batches they are the minibatch's token means (`masked_mean`).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
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


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   num_episodes: torch.Tensor | float | None = None) -> torch.Tensor:
    """The score-function surrogate −Σ_t A_t·log π(a_t|s_t), **summed** over each episode's tokens and averaged over
    episodes: its gradient is the REINFORCE estimator (Williams 1992) of −∇E[G] (with A_t = G − b or G_t − b_t).

    Summing, not averaging, over tokens is what makes it the gradient of the sequence's log-probability
    log π(y|x) = Σ_t log π(a_t|s_t); a per-token mean would weight short responses up. `num_episodes` replaces
    the ``B`` of this call as the denominator: the episode count of the whole batch when these ``(B, T)`` rows
    are one micro-batch of it, so that the micro-batches' losses add up to the batch's.
    """
    if not logprobs.shape == advantages.shape == mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, advantages {tuple(advantages.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, T) shape")
    per_episode = (advantages.detach() * logprobs * mask).sum(1)  # (B,)
    return -(per_episode.mean() if num_episodes is None else per_episode.sum() / num_episodes)


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
