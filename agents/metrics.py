"""Metrics: one namespaced list (docs/metrics.md), written to a JSONL file, TensorBoard when installed, and stdout;
plus `diagnose`, which reads a run's history and names the failure modes RLHF runs are known for."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from rlhf_env.files import FolderLock, append_line, atomic_write, read_lines


class MetricsLogger:
    """Appends each update's metrics to ``<out_dir>/metrics.jsonl`` (and TensorBoard if it is installed).

    The logger owns `out_dir` (`rlhf_env.files.FolderLock`: a second run on the same folder gets `FolderInUse`) and
    appends each record in one fsynced write. A fresh run refuses a folder that already holds a run's metrics.
    ``resume_at=(updates, timesteps)`` continues a run from a checkpoint: the records after that update, which
    the crashed run logged but the checkpoint does not hold, are dropped (from TensorBoard too), so that the log
    of a resumed run equals an uninterrupted run's.
    """

    def __init__(self, out_dir: str | Path | None, tensorboard: bool = True,
                 resume_at: tuple[int, int] | None = None):
        self.history: list[dict] = []
        if out_dir is not None and (not isinstance(out_dir, (str, os.PathLike)) or str(out_dir) == ""):
            raise ValueError(f"out_dir must be a folder path or None, got {out_dir!r}")
        if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise ValueError(f"out_dir {out_dir} is a file, not a folder")
        self.path = None if out_dir is None else Path(out_dir) / "metrics.jsonl"
        self.writer, self._lock = None, None
        if self.path is None:
            return
        self._lock = FolderLock(self.path.parent, "run folder").acquire()
        try:
            if self.path.is_file():
                self.history = self._kept(resume_at)
            if tensorboard:
                self.writer = _tensorboard(self.path.parent / "tensorboard",
                                           None if resume_at is None else resume_at[1] + 1)
        except BaseException:
            self.close()
            raise

    def _kept(self, resume_at: tuple[int, int] | None) -> list[dict]:
        """The existing records a run continues from: those up to update ``resume_at[0]`` (rewritten atomically
        without the rest); a fresh run (None) refuses a log that holds records."""
        history = read_history(self.path)
        if resume_at is None and history:
            raise ValueError(f"{self.path.parent} already holds the metrics of a run ({len(history)} updates): "
                             "resume it from its checkpoint (load(..., out_dir=...)) or choose another folder")
        kept = [h for h in history if resume_at is not None and h.get("time/updates", 0) <= resume_at[0]]
        if self.path.read_bytes() != _lines(kept).encode("utf-8"):  # lost updates, or a torn last line
            atomic_write(self.path, _lines(kept))
        return kept

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if self.path is not None:
            append_line(self.path, json.dumps(metrics))
        if self.writer is not None:
            step = metrics.get("time/timesteps", len(self.history))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush TensorBoard and give up the folder (another run may then write to it)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _lines(history: list[dict]) -> str:
    return "".join(json.dumps(h) + "\n" for h in history)


def _tensorboard(directory: Path, purge_step: int | None):
    """A TensorBoard writer (None when tensorboard is not installed); events from `purge_step` on are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory), purge_step=purge_step)


def read_history(path: str | Path) -> list[dict]:
    """The metrics of a run, one dict per update, from its ``metrics.jsonl``.

    A torn last line (a crash in mid-write) is dropped with a warning; any other line that is not a JSON object is
    a `ValueError` naming the file and the line."""
    lines, torn = read_lines(path)
    if torn:
        warnings.warn(f"{path}: dropped a torn last line (the run stopped while writing it)", stacklevel=2)
    history = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        history.append(record)
    return history


def _series(history: list[dict], key: str) -> np.ndarray:
    """The finite values of metric `key` over the history, in order (updates without it, or NaN, left out)."""
    values = np.array([h[key] for h in history if key in h and h[key] is not None], dtype=float)
    return values[np.isfinite(values)]


def diagnose(history: list[dict]) -> list[str]:
    """Warnings for the failure modes of RLHF runs, compared between the first and the last quarter of updates.

    * KL climbing: the last quarter's mean sequence KL is above 5 nats and still rising;
    * entropy collapse: per-token entropy fell below 30% of where it started;
    * reward hacking: the proxy score rose while the gold score fell;
    * reward drifting from gold: the reward's pairwise agreement with gold on the policy's own samples
      (``objective/gold_agreement``) fell by more than 0.1 (the reward model or judge is being read where it was
      not trained: over-optimisation under way even while gold still rises);
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
    a0, a1 = first_last("objective/gold_agreement")
    if a1 is not None and a1 < a0 - 0.1:
        flags.append(f"reward drifting from gold: its agreement with gold on the policy's samples {a0:.2f} → {a1:.2f}"
                     " (lower the KL budget, or refresh the reward model: agents.iterated_rm)")
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
