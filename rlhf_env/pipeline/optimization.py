"""How every pipeline stage trains: AdamW with linear warm-up and cosine decay, one clipped gradient step."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warm-up to 1, then cosine decay to 0.1 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, steps: int):
    """AdamW and its `warmup_cosine` learning-rate schedule, as every build stage trains."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, steps))
    return optimizer, schedule


def gradient_step(model: torch.nn.Module, optimizer, schedule, loss: torch.Tensor, max_grad_norm: float = 1.0):
    """Backpropagate `loss`, clip the global gradient norm, step the optimizer and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    schedule.step()
