"""The grid's plots (PNG, matplotlib's Agg backend), one row of panels per (task, reward):

* ``frontier.png``: held-out gold reward against KL(π ‖ π_ref) — each trained run's path through its held-out
  checkpoints (mean over seeds), its final evaluation (± std over seeds), best-of-n over n, and π_SFT: the DPO
  paper's reward–KL frontier (Rafailov et al. 2023, fig. 2), with the true reward on the y axis.
* ``overoptimisation.png`` (reward = rm only): gold and proxy (RM) score against √KL at the same checkpoints and
  for best-of-n — Gao et al. 2023's over-optimisation curves: the proxy can keep rising while the gold stalls.
* ``learning_curves.png``: gold reward and KL of the training batches against env steps, and gold against training
  wall time (mean ± std over seeds; DPO trains on fixed pairs and samples nothing, so it has no such curve).
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from rlhf_env.files import atomic_write

COLORS = {"sft": "black", "best_of_n": "tab:gray", "ppo": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green",
          "reinforce_ma": "tab:purple", "reinforce_value": "tab:brown", "dpo": "tab:red", "preset_grpo": "tab:olive",
          "preset_dr_grpo": "tab:cyan", "preset_dapo": "tab:pink", "preset_rloo": "gold",
          "preset_reinforce_pp": "navy"}
MARKERS = ["o", "s", "^", "D", "v", "P"]
KL_LABEL = "KL(π ‖ π_ref) per response (nats)"
GOLD_LABEL = "held-out gold reward (task's true reward)"


def _by_task(groups: list[dict]) -> dict[tuple, list[dict]]:
    """(task, reward) → its groups (one per β), in β order."""
    out = defaultdict(list)
    for group in groups:
        out[(group["task"], group["reward"])].append(group)
    return out


def _stack(runs: list[dict], section: str, key: str) -> np.ndarray:
    """(seeds, points) array of `key` along each run's `section` ("checkpoints" or "curve"), cut to the shortest."""
    series = [[point.get(key, np.nan) for point in run[section]] for run in runs]
    length = min(len(s) for s in series)
    return np.array([s[:length] for s in series], dtype=float)


def _std(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


# Rows of one algorithm on other feedback (or on several processes) get these colours, in order of appearance.
VARIANT_COLORS = ["tab:olive", "tab:cyan", "tab:pink", "gold", "navy", "lime", "maroon", "teal"]


def _color(row: dict) -> str:
    """The algorithm's colour, or for a variant of it (`row["feedback"]` other than "human", several processes) a
    colour of its own, the same in every panel."""
    if row.get("feedback", "human") == "human" and row.get("processes", 1) == 1:
        return COLORS[row["algorithm"]]
    key = (row["algorithm"], row.get("feedback", "human"), row.get("processes", 1))
    if key not in _VARIANTS:
        _VARIANTS[key] = VARIANT_COLORS[len(_VARIANTS) % len(VARIANT_COLORS)]
    return _VARIANTS[key]


_VARIANTS: dict[tuple, str] = {}


def _row_label(row: dict, beta: float, many_betas: bool) -> str:
    return row["label"] + (f", β = {beta:g}" if many_betas and row["algorithm"] not in ("sft", "best_of_n") else "")


def _best_of_n(groups: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Best-of-n's (KL, `key`) means over seeds, by n (the same in every β group: taken from the first with it)."""
    for group in groups:
        rows = [r for r in group["rows"] if r["algorithm"] == "best_of_n"]
        if rows:
            kl = np.array([np.mean([run["metrics"]["objective/kl"] for run in r["runs"]]) for r in rows])
            y = np.array([np.mean([run["metrics"][key] for run in r["runs"]]) for r in rows])
            return kl, y
    return np.array([]), np.array([])


def _frontier_panel(ax, groups: list[dict]) -> None:
    many = len(groups) > 1
    kl, gold = _best_of_n(groups, "objective/gold_score")
    if len(kl):
        ax.plot(kl, gold, "-o", color=COLORS["best_of_n"], ms=4, label="best-of-n (n = 2, 4, …; analytic KL)")
    sft_drawn = False
    for b, group in enumerate(groups):
        for row in group["rows"]:
            algorithm, runs = row["algorithm"], row["runs"]
            final_kl = np.array([r["metrics"]["objective/kl"] for r in runs])
            final_gold = np.array([r["metrics"]["objective/gold_score"] for r in runs])
            if algorithm == "sft":
                if not sft_drawn:
                    ax.plot(final_kl.mean(), final_gold.mean(), "*", color="black", ms=12, label="π_SFT")
                    sft_drawn = True
                continue
            if algorithm == "best_of_n":
                continue
            color, marker = _color(row), MARKERS[b % len(MARKERS)]
            if runs[0].get("checkpoints"):
                path_kl = _stack(runs, "checkpoints", "objective/kl").mean(0)
                path_gold = _stack(runs, "checkpoints", "objective/gold_score").mean(0)
                ax.plot(path_kl, path_gold, "-", color=color, alpha=0.45, lw=1.2)
            ax.errorbar(final_kl.mean(), final_gold.mean(), xerr=_std(final_kl), yerr=_std(final_gold), fmt=marker,
                        color=color, ms=7, capsize=3, label=_row_label(row, group["beta"], many))
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(GOLD_LABEL)
    ax.grid(alpha=0.3)


def _overoptimisation_panels(axes, groups: list[dict]) -> None:
    many = len(groups) > 1
    for ax, key, name in ((axes[0], "objective/gold_score", "gold (true) reward"),
                          (axes[1], "objective/score", "RM (proxy) score")):
        kl, y = _best_of_n(groups, key)
        if len(kl):
            ax.plot(np.sqrt(kl), y, "-o", color=COLORS["best_of_n"], ms=4, label="best-of-n")
        for b, group in enumerate(groups):
            for row in group["rows"]:
                if not row["runs"][0].get("checkpoints"):
                    continue
                path_kl = np.sqrt(np.clip(_stack(row["runs"], "checkpoints", "objective/kl"), 0, None)).mean(0)
                path_y = _stack(row["runs"], "checkpoints", key).mean(0)
                ax.plot(path_kl, path_y, "-", marker=MARKERS[b % len(MARKERS)], ms=4,
                        color=_color(row), label=_row_label(row, group["beta"], many))
        ax.set_xlabel("√KL(π ‖ π_ref) (√nats)")
        ax.set_ylabel(f"held-out {name}")
        ax.grid(alpha=0.3)


def _learning_panels(axes, groups: list[dict]) -> None:
    from matplotlib.ticker import EngFormatter

    many = len(groups) > 1
    panels = ((axes[0], "timesteps", "objective/gold_score", "env steps (generated tokens)", "gold reward"),
              (axes[1], "timesteps", "objective/kl", "env steps (generated tokens)", "KL to π_ref (nats)"),
              (axes[2], "seconds", "objective/gold_score", "training wall time (s)", "gold reward"))
    for ax, x_key, y_key, x_label, y_label in panels:
        for b, group in enumerate(groups):
            for row in group["rows"]:
                runs = row["runs"]
                if not runs[0].get("curve") or y_key not in runs[0]["curve"][0]:
                    continue
                x = _stack(runs, "curve", x_key).mean(0)
                y = _stack(runs, "curve", y_key)
                color = _color(row)
                ax.plot(x, y.mean(0), color=color, ls=["-", "--", ":", "-."][b % 4],
                        label=_row_label(row, group["beta"], many))
                if len(y) > 1:
                    ax.fill_between(x, y.mean(0) - y.std(0, ddof=1), y.mean(0) + y.std(0, ddof=1), color=color,
                                    alpha=0.15, lw=0)
        if x_key == "timesteps":
            ax.xaxis.set_major_formatter(EngFormatter())  # 100k, not 100000
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{y_label} (training batches)")
        ax.grid(alpha=0.3)


def _figure(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    return plt, fig, axes


def save_figure(fig, path: Path, **savefig) -> Path:
    """Save `fig` as a PNG at `path` atomically: rendered in memory, then `atomic_write`, so that a crash leaves the
    old plot or the whole new one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    atomic_write(path, buffer.getvalue())
    return path


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def _legend(ax) -> None:
    """A legend for the labelled lines of `ax`, if it has any (cells without curves draw none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot_all(groups: list[dict], out: Path) -> list[Path]:
    """Write the plots for the aggregated `groups` (see `benchmarks.results.aggregate`) into `out`."""
    tasks = _by_task(groups)
    written = []

    plt, fig, axes = _figure(len(tasks), 1)
    for ax, ((task, reward), task_groups) in zip(axes[:, 0], tasks.items()):
        _frontier_panel(ax, task_groups)
        ax.set_title(f"{task}: agents optimise the {'reward model' if reward == 'rm' else 'gold reward'}")
        _legend(ax)
    written.append(_save(plt, fig, out / "frontier.png",
                         "Gold reward vs KL to π_ref (lines: held-out checkpoints during training)"))

    rm_tasks = {k: v for k, v in tasks.items() if k[1] == "rm"}
    if rm_tasks:
        plt, fig, axes = _figure(len(rm_tasks), 2)
        for ax_row, ((task, _), task_groups) in zip(axes, rm_tasks.items()):
            _overoptimisation_panels(ax_row, task_groups)
            for ax, name in zip(ax_row, ("gold", "proxy")):
                ax.set_title(f"{task}: {name} score along training")
            _legend(ax_row[1])
        written.append(_save(plt, fig, out / "overoptimisation.png",
                             "Over-optimisation (Gao et al. 2023): true and proxy reward vs √KL"))

    plt, fig, axes = _figure(len(tasks), 3)
    for ax_row, ((task, reward), task_groups) in zip(axes, tasks.items()):
        _learning_panels(ax_row, task_groups)
        for ax in ax_row:
            ax.set_title(f"{task}, reward = {reward}")
        _legend(ax_row[0])
    written.append(_save(plt, fig, out / "learning_curves.png",
                         "Learning curves (training batches; mean ± std over seeds)"))
    return written
