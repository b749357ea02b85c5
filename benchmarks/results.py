"""The grid's cells → ``results.md`` (mean ± std over seeds), ``results.json`` and the plots (`benchmarks.plots`).

Rows are grouped by (task, reward, β); within a group, one row per (algorithm, budget), over its seeds. The
objective E[r] − β·KL is given as a share of the KL-regularised optimum β·log E_{π_ref}[exp(r/β)] of the same
reward, estimated by importance sampling from π_ref (its effective sample size is printed next to it: a small ESS
means the estimate is low, so shares above 100% are possible and say the estimate, not the agent, is off).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from rlhf_env.files import atomic_write, read_lines

ORDER = ["sft", "best_of_n", "ppo", "rloo", "grpo", "reinforce_ma", "reinforce_value", "dpo", "preset_grpo",
         "preset_dr_grpo", "preset_dapo", "preset_rloo", "preset_reinforce_pp"]
LABELS = {"sft": "π_SFT (floor)", "best_of_n": "best-of-{n}", "ppo": "PPO", "rloo": "REINFORCE + RLOO (K=4)",
          "grpo": "REINFORCE, GRPO-style (K=4)", "reinforce_ma": "REINFORCE + moving average",
          "reinforce_value": "REINFORCE + value head", "dpo": "DPO", "preset_grpo": "GRPO preset (K=4)",
          "preset_dr_grpo": "Dr. GRPO preset (K=4)", "preset_dapo": "DAPO preset (K=4)",
          "preset_rloo": "RLOO preset (K=4)", "preset_reinforce_pp": "REINFORCE++ preset (K=4)"}


# How the report names each feedback source (`benchmarks.cell.FEEDBACK`), in the table's order.
FEEDBACK_LABELS = {"human": "human labels", "rule_judge": "RM on rule-judge labels",
                   "lm_judge": "RM on LM-judge labels", "direct_rlaif": "direct RLAIF (rule judge)",
                   "iterated": "iterated RM"}


def label(algorithm: str, budget: int) -> str:
    return LABELS[algorithm].format(n=budget)


CELL_KEYS = ("name", "config", "commit", "metrics", "timing", "memory", "curve", "checkpoints", "machine")
"""What a cell record holds (`benchmarks.cell.run_cell` writes them all; the report reads them all)."""
CONFIG_KEYS = ("algorithm", "task", "reward", "beta", "budget", "seed")
"""The fields of a record's config that the report groups by."""


def read_cell(path: Path) -> dict:
    """The cell record in `path`; `ValueError` naming the file when it does not parse (truncated, say) or lacks one
    of `CELL_KEYS` / `CONFIG_KEYS`."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{path} is not a cell record: it does not parse as JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a cell record: a JSON {type(record).__name__}, not an object")
    missing = [key for key in CELL_KEYS if key not in record]
    if not missing and isinstance(record["config"], dict):
        missing = [f"config.{key}" for key in CONFIG_KEYS if key not in record["config"]]
    elif not missing:
        missing = ["config (an object)"]
    if missing:
        raise ValueError(f"{path} is not a cell record: it lacks {', '.join(missing)}")
    return record


def load_cells(out: Path) -> list[dict]:
    """Every finished cell record in ``out/cells``. A damaged file (see `read_cell`) is skipped with a message on
    stderr naming it, so that ``--report-only`` still reports the other cells; rerunning the grid moves it aside
    and redoes the cell (`benchmarks.run.finished`)."""
    cells = []
    for path in sorted((Path(out) / "cells").glob("*.json")):
        if path.name.endswith(".config.json"):
            continue
        try:
            cells.append(read_cell(path))
        except ValueError as error:
            print(f"skipped a damaged cell: {error}; rerun the grid (without --report-only) to redo it",
                  file=sys.stderr)
    return cells


def aggregate(cells: list[dict]) -> list[dict]:
    """One entry per (task, reward, β): the optimum, and a row per (algorithm, budget, feedback, processes) with
    every metric's seeds (a run on other feedback, or data-parallel, is its own row, labelled with it)."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"optimum": None, "rows": defaultdict(list)})
    for cell in cells:
        c = cell["config"]
        group = groups[(c["task"], c["reward"], c["beta"])]
        if c["algorithm"] == "optimum":
            group["optimum"] = cell["metrics"]
        else:
            group["rows"][(c["algorithm"], c["budget"], c.get("feedback", "human"), c.get("processes", 1))].append(cell)
    result = []
    for (task, reward, beta), group in sorted(groups.items()):
        rows = []
        for (algorithm, budget, feedback, processes), runs in sorted(
                group["rows"].items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1],
                                                       list(FEEDBACK_LABELS).index(kv[0][2]), kv[0][3])):
            name = (label(algorithm, budget) + (f", {FEEDBACK_LABELS[feedback]}" if feedback != "human" else "")
                    + (f", {processes} processes" if processes > 1 else ""))
            rows.append({"algorithm": algorithm, "budget": budget, "feedback": feedback, "processes": processes,
                         "label": name,
                         "seeds": sorted(r["config"]["seed"] for r in runs), "runs": runs,
                         "commits": sorted({str(r["commit"]) for r in runs})})
        result.append({"task": task, "reward": reward, "beta": beta, "optimum": group["optimum"], "rows": rows})
    return result


def values(row: dict, key: str) -> np.ndarray:
    """`key` of each seed's run: a metric name, or "train_seconds" / "peak_rss_mib"."""
    out = []
    for run in row["runs"]:
        source = run["timing"] if key in run["timing"] else run["memory"] if key in run["memory"] else run["metrics"]
        out.append(source.get(key, np.nan))
    return np.array(out, dtype=float)


def mean_std(x: np.ndarray, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    x = x[np.isfinite(x)] * scale
    if len(x) == 0:
        return "–"
    def number(v: float) -> str:
        return f"{v:.{digits}f}".replace("-", "−") if round(v, digits) != 0 else f"{0:.{digits}f}"  # no "−0.00"

    return number(x.mean()) + (f" ± {number(x.std(ddof=1))}" if len(x) > 1 else "") + suffix


COLUMNS = ("algorithm", "budget", "gold", "RM score", "reward vs gold", "KL (nats)", "E[r] − β·KL", "% of optimum",
           "win rate vs π_SFT", "well-formed", "length", "perplexity", "train time (s)", "env steps/s",
           "peak memory (MiB)", "seeds")


def steps_per_second(row: dict) -> str:
    """Env steps per second of training time (the rollouts and updates of an RL agent's budget), or "" for the
    rows that take no env steps."""
    rates = [run["timing"]["timesteps"] / run["timing"]["train_seconds"] for run in row["runs"]
             if run["timing"].get("timesteps") and run["timing"].get("train_seconds")]
    return mean_std(np.array(rates), 0) if len(rates) == len(row["runs"]) else ""


def table_rows(group: dict) -> list[list[str]]:
    """The results table of one (task, reward, β) group, as strings."""
    optimum = group["optimum"]["optimum"] if group["optimum"] else None
    lines = []
    for row in group["rows"]:
        objective = values(row, "objective/rlhf_reward")  # E[r] − β·KL with r the cell's reward
        # The optimum is that of the task's own reward: a row on other feedback optimises another reward.
        share = mean_std(100 * objective / optimum, 0, suffix="%") if optimum and row["feedback"] == "human" else "–"
        budget = {"sft": "", "best_of_n": f"n = {row['budget']}", "dpo": f"{row['budget']:,} pairs"}.get(
            row["algorithm"], f"{row['budget']:,} steps")
        lines.append([row["label"], budget, mean_std(values(row, "objective/gold_score")),
                      mean_std(values(row, "objective/score"), 2),
                      mean_std(values(row, "objective/gold_agreement"), 2), mean_std(values(row, "objective/kl"), 2),
                      mean_std(objective), share, mean_std(values(row, "objective/win_rate"), 2),
                      mean_std(values(row, "episode/well_formed"), 1, 100, "%"),
                      mean_std(values(row, "episode/length"), 1), mean_std(values(row, "perplexity"), 1),
                      mean_std(values(row, "train_seconds"), 0), steps_per_second(row),
                      mean_std(values(row, "peak_rss_mib"), 0),
                      ", ".join(map(str, row["seeds"]))])
    return lines


def markdown(groups: list[dict], cells: list[dict], commands: list[str], plots: list[Path],
             sections: list[str] = ()) -> str:
    """results.md: a header, a table per group, then `sections` (markdown lines: the Pareto sweep's) and the
    plots."""
    commits = sorted({str(c["commit"]) for c in cells})
    machines = sorted({f"{m['device']}, {m['threads']} threads, torch {m['torch']}"
                       for m in (c["machine"] for c in cells)})
    lines = ["# Benchmark results", "",
             f"{len(cells)} cells from {', '.join(f'`{c}`' for c in commands) or 'unrecorded commands'}; "
             f"commit {', '.join(commits)}; {'; '.join(machines)}.", "",
             "Held-out prompts; mean ± std over seeds (sample std). **gold**: the task's true reward; **RM score**: "
             "the reward the agent optimised (the learned reward model, or the gold itself for reward = gold); "
             "**reward vs gold**: how often that reward orders two of the policy's held-out responses as gold "
             "does (`objective/gold_agreement`); "
             "**KL**: log π(y|x) − log π_ref(y|x) per response, summed over tokens (best-of-n: the analytic bound "
             "log n − (n−1)/n); **E[r] − β·KL** and its share of the KL-regularised optimum β·log E_π_ref[exp(r/β)] "
             "(of the task's own reward: none for rows on other feedback); "
             "**win rate**: gold beats one π_SFT sample of the same prompt (ties half); **well-formed**: the task's "
             "grammar check; **perplexity**: of held-out demonstrations under the policy (π_SFT ≈ the data's floor); "
             "**train time**: the updates alone (best-of-n: its sampling and scoring); **env steps/s**: the env steps "
             "of training (rollouts and updates) per second of train time; **peak memory**: the cell "
             "process's peak resident set.", ""]
    for group in groups:
        lines.append(f"## {group['task']}, reward = {group['reward']}, β = {group['beta']:g}")
        lines.append("")
        optimum = group["optimum"]
        if optimum:
            lines.append(f"KL-regularised optimum of the {group['reward']} reward: **{optimum['optimum']:.3f}** "
                         f"(β·log-mean-exp over {optimum['n_samples']} π_ref samples per prompt, "
                         f"{optimum['n_prompts']} held-out prompts; effective sample size {optimum['ess_mean']:.1f} "
                         f"per prompt, so if anything an underestimate).")
            lines.append("")
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(group)]
        lines.append("")
    lines += sections
    if plots:
        lines.append("## Plots")
        lines.append("")
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path) -> list[Path]:
    """Write results.md, results.json and the plots for the cells in `out`; returns the files written."""
    from benchmarks import pareto
    from benchmarks.plots import plot_all

    out = Path(out)
    cells = load_cells(out)
    if not cells:
        raise SystemExit(f"no finished cells in {out / 'cells'}")
    sweep = [cell for cell in cells if pareto.is_pareto_cell(cell)]  # --pareto's cells have a report of their own
    groups = aggregate([cell for cell in cells if not pareto.is_pareto_cell(cell)])
    plots = plot_all(groups, out) if groups else []
    pareto_lines, pareto_summary, pareto_plots = pareto.write(sweep, out)
    log = out / "commands.txt"
    commands = list(dict.fromkeys(read_lines(log)[0])) if log.is_file() else []  # a torn last line is dropped
    atomic_write(out / "results.md", markdown(groups, cells, commands, pareto_plots + plots, pareto_lines))
    summary = [{**{k: g[k] for k in ("task", "reward", "beta", "optimum")},
                "rows": [{"algorithm": r["algorithm"], "budget": r["budget"], "seeds": r["seeds"],
                          "commits": r["commits"], "metrics": {key: values(r, key).tolist() for key in (
                              "objective/gold_score", "objective/score", "objective/kl", "objective/rlhf_reward",
                              "objective/win_rate", "episode/well_formed", "episode/length", "perplexity",
                              "train_seconds", "peak_rss_mib")}} for r in g["rows"]]} for g in groups]
    if pareto_summary:
        summary.append({"pareto": pareto_summary})
    atomic_write(out / "results.json", json.dumps(summary, indent=1) + "\n")
    return [out / "results.md", out / "results.json", *pareto_plots, *plots]
