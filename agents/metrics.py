"""Metrics: one namespaced list (docs/metrics.md), written to a JSONL file, TensorBoard when installed, and stdout;
plus `diagnose`, which reads a run's history and names the failure modes RLHF runs are known for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class MetricsLogger:
    """Appends each update's metrics to ``<out_dir>/metrics.jsonl`` (and TensorBoard if it is installed)."""

    def __init__(self, out_dir: str | Path | None, tensorboard: bool = True):
        self.history: list[dict] = []
        self.path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            step = metrics.get("time/timesteps", len(self.history))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_history(path: str | Path) -> list[dict]:
    """The metrics of a run, one dict per update, from its ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([h[key] for h in history if key in h and h[key] is not None], dtype=float)


def diagnose(history: list[dict]) -> list[str]:
    """Warnings for the failure modes of RLHF runs, compared between the first and the last quarter of updates.

    * KL climbing: the last quarter's mean sequence KL is above 5 nats and still rising;
    * entropy collapse: per-token entropy fell below 30% of where it started;
    * reward hacking: the proxy score rose while the gold score fell;
    * grammar falling: the well-formed share fell by more than 5 points (a prototype at β = 0.02 lost 10 points
      by appending clauses while its gold score kept rising);
    * value loss oscillating: the value loss's update-to-update swings are larger than its mean;
    * nothing moving: score, gold score and KL all stayed put.
    """
    if len(history) < 8:
        return ["too few updates to diagnose (need 8)"]
    quarter = max(2, len(history) // 4)

    def first_last(key):
        values = _series(history, key)
        return (values[:quarter].mean(), values[-quarter:].mean()) if len(values) >= 2 * quarter else (None, None)

    flags = []
    kl0, kl1 = first_last("objective/kl")
    kl_series = _series(history, "objective/kl")
    if kl1 is not None and kl1 > 5 and kl_series[-quarter:].mean() > kl_series[-2 * quarter:-quarter].mean():
        flags.append(f"KL climbing: {kl0:.2f} → {kl1:.2f} nats and still rising (raise beta or set kl_target)")
    h0, h1 = first_last("policy/entropy")
    if h1 is not None and h0 > 0 and h1 < 0.3 * h0:
        flags.append(f"entropy collapse: per-token entropy {h0:.3f} → {h1:.3f}")
    s0, s1 = first_last("objective/score")
    g0, g1 = first_last("objective/gold_score")
    if s1 is not None and g1 is not None and s1 > s0 + 0.05 and g1 < g0 - 0.02:
        flags.append(f"reward hacking: proxy score {s0:.3f} → {s1:.3f} while gold {g0:.3f} → {g1:.3f}")
    w0, w1 = first_last("episode/well_formed")
    if w1 is not None and w1 < w0 - 0.05:
        flags.append(f"grammar falling: well-formed {w0:.1%} → {w1:.1%}")
    value_loss = _series(history, "loss/value")
    if len(value_loss) >= 8 and np.abs(np.diff(value_loss[-2 * quarter:])).mean() > value_loss[-2 * quarter:].mean():
        flags.append("value loss oscillating: update-to-update swings exceed its mean (lower lr or vf_coef)")
    if (s1 is not None and abs(s1 - s0) < 0.01 and g1 is not None and abs(g1 - g0) < 0.01
            and kl1 is not None and kl1 < 0.05):
        flags.append("nothing moving: score, gold and KL flat (raise lr, check gradients reach the policy)")
    return flags
