"""The two-objective sweep's report (``python -m benchmarks.run --pareto``): the Pareto front of two gold
objectives that each agent reaches when trained on their weighted sum, (1 − λ)·r₁ + λ·r₂, for each weight λ.

The cells of a sweep carry `benchmarks.cell.CellConfig.weight`; their evaluations report each gold objective as
``objective/gold/<name>`` (`rlhf_env.tasks.Task.objectives`). Rows are grouped by (task, reward, β, KL target); a
row is one (algorithm, budget, λ) over its seeds. For each algorithm the report says which of its points lie on the
front its own points span:

* **dominated**: another λ of the same algorithm is at least as good in both objectives and better in one;
* **unsupported**: not dominated, but below the upper-right convex hull of the algorithm's points, so no weight of
  a linear scalarisation prefers it — the "concave part" a weight sweep cannot find (it can still reach it by luck
  of optimisation, as here it is a measured point);
* **on the hull**: a point some weight prefers among these.

With the mean over seeds, a point is called unsupported or dominated only by the means; the gaps are printed so
that they can be read against the seeds' spread.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.results import ORDER, label, mean_std, values

COLUMNS = ("algorithm", "λ", "gold: {first}", "gold: {second}", "KL (nats)", "β at the end", "length (tokens)",
           "well-formed", "on the front?", "seeds")


def is_pareto_cell(cell: dict) -> bool:
    return cell["config"].get("weight") is not None


def objective_names(cells: list[dict]) -> list[str]:
    """The gold objectives' names, in the order the cells report them (``objective/gold/<name>``)."""
    names: list[str] = []
    for cell in cells:
        for key in cell["metrics"]:
            if key.startswith("objective/gold/") and key[len("objective/gold/"):] not in names:
                names.append(key[len("objective/gold/"):])
    return names


def aggregate(cells: list[dict]) -> list[dict]:
    """One entry per (task, reward, β) with a row per (algorithm, budget, λ), in λ order, and the KL controllers
    of its trained rows ("kl_targets": the (target, horizon) pairs; (None, None) for a fixed β)."""
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        c = cell["config"]
        groups[(c["task"], c["reward"], c["beta"])][(c["algorithm"], c["budget"], c["weight"])].append(cell)
    out = []
    for (task, reward, beta), rows in sorted(groups.items()):
        group_cells = [cell for runs in rows.values() for cell in runs]
        controllers = sorted({(c["config"].get("kl_target"), c["config"].get("kl_horizon"))
                              if c["config"].get("kl_target") else (None, None)
                              for c in group_cells if c["config"]["algorithm"] not in ("sft", "best_of_n")},
                             key=str)
        out.append({"task": task, "reward": reward, "beta": beta, "kl_targets": controllers,
                    "objectives": objective_names(group_cells),
                    "rows": [{"algorithm": a, "budget": b, "weight": w, "label": label(a, b), "runs": runs,
                              "seeds": sorted(r["config"]["seed"] for r in runs)}
                             for (a, b, w), runs in sorted(rows.items(), key=lambda kv: (
                                 ORDER.index(kv[0][0]), kv[0][1], kv[0][2]))]})
    return out


def front_status(points: list[tuple[float, float]]) -> list[str]:
    """For points (x, y), both to be maximised: "dominated (by #j)", "unsupported (gap g)" or "on the hull", as
    the module's docstring defines them. ``g`` is the vertical distance below the hull, in y's units."""
    xy = np.array(points, dtype=float)
    status = [""] * len(xy)
    front = []
    for i, (x, y) in enumerate(xy):
        dominators = [j for j, (u, v) in enumerate(xy) if u >= x and v >= y and (u > x or v > y)]
        if dominators:
            status[i] = f"dominated (by #{dominators[0]})"
        else:
            front.append(i)
    front.sort(key=lambda i: (xy[i, 0], -xy[i, 1]))  # x up, so y down along a front
    hull: list[int] = []  # the upper-right hull of the front: turns clockwise (a concave curve y(x))
    for i in front:
        while len(hull) >= 2:
            (x0, y0), (x1, y1), (x2, y2) = xy[hull[-2]], xy[hull[-1]], xy[i]
            if (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0) >= 0:  # hull[-1] is on or below the chord: drop it
                hull.pop()
            else:
                break
        hull.append(i)
    for i in front:
        if i in hull:
            status[i] = "on the hull"
            continue
        x = xy[i, 0]
        left = max((j for j in hull if xy[j, 0] <= x), key=lambda j: xy[j, 0])
        right = min((j for j in hull if xy[j, 0] >= x), key=lambda j: xy[j, 0])
        (x0, y0), (x1, y1) = xy[left], xy[right]
        chord = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        status[i] = f"unsupported (gap {chord - xy[i, 1]:.3f})"
    return status


def _means(row: dict, key: str) -> float:
    x = values(row, key)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def table(group: dict) -> list[str]:
    """The markdown table of one group; rows numbered (#) within each algorithm, in λ order."""
    first, second = group["objectives"][:2]
    gold1, gold2 = f"objective/gold/{first}", f"objective/gold/{second}"
    columns = [c.format(first=first, second=second) for c in COLUMNS]
    lines = ["| # | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    by_algorithm = defaultdict(list)
    for row in group["rows"]:
        by_algorithm[(row["algorithm"], row["budget"])].append(row)
    for rows in by_algorithm.values():
        status = front_status([(_means(r, gold1), _means(r, gold2)) for r in rows])
        if rows[0]["algorithm"] == "sft":
            status = ["(start)"] * len(rows)
        for number, (row, state) in enumerate(zip(rows, status)):
            trained = row["algorithm"] not in ("sft", "best_of_n")
            lines.append("| " + " | ".join([
                str(number), row["label"], "" if row["algorithm"] == "sft" else f"{row['weight']:g}",
                mean_std(values(row, gold1)), mean_std(values(row, gold2)), mean_std(values(row, "objective/kl"), 2),
                mean_std(values(row, "objective/beta")) if trained else "",
                mean_std(values(row, "episode/length"), 1), mean_std(values(row, "episode/well_formed"), 1, 100, "%"),
                state, ", ".join(map(str, row["seeds"]))]) + " |")
    return lines


def markdown(groups: list[dict]) -> list[str]:
    lines = []
    for group in groups:
        first, second = group["objectives"][:2]
        reward = "the learned reward model" if group["reward"] == "rm" else "its gold reward"
        budget = " and ".join(
            f"adaptive β (start {group['beta']:g}, horizon {horizon} episodes) toward **{target:g} nats** per "
            f"episode" if target else f"β = {group['beta']:g}" for target, horizon in group["kl_targets"])
        budget = budget or "no trained agents"
        lines += [f"## Pareto front: {group['task']}, {first} vs {second}", "",
                  f"Agents train on (1 − λ)·{first} + λ·{second}, with {first} scored by {reward} and {second} "
                  f"exact; {budget}. Best-of-n picks by the same weighted sum; its KL is the analytic bound. "
                  f"Both columns of gold are measured on held-out prompts. **On the front?** compares each "
                  f"algorithm's points with each other (numbered #): dominated, unsupported (under the convex hull "
                  f"of its points, by the gap shown: no weight prefers it), or on the hull.", ""]
        lines += table(group)
        lines.append("")
    return lines


def summary(groups: list[dict]) -> list[dict]:
    """What results.json keeps of each group: per row, every seed's gold objectives, KL, β, length."""
    out = []
    for group in groups:
        keys = [f"objective/gold/{name}" for name in group["objectives"]] + [
            "objective/kl", "objective/beta", "episode/length", "episode/well_formed", "train_seconds"]
        out.append({**{k: group[k] for k in ("task", "reward", "beta", "kl_targets", "objectives")},
                    "rows": [{"algorithm": r["algorithm"], "budget": r["budget"], "weight": r["weight"],
                              "seeds": r["seeds"], "metrics": {key: values(r, key).tolist() for key in keys}}
                             for r in group["rows"]]})
    return out


def plot(groups: list[dict], out: Path) -> Path:
    """``pareto.png``: one panel per group, the first gold objective on x and the second on y; each algorithm's
    mean over seeds at every λ (joined in λ order, ± std over seeds as error bars), π_SFT as a star."""
    from benchmarks.plots import COLORS, _figure, _legend, _save

    plt, fig, axes = _figure(1, len(groups))
    for ax, group in zip(axes[0], groups):
        first, second = group["objectives"][:2]
        gold1, gold2 = f"objective/gold/{first}", f"objective/gold/{second}"
        by_algorithm = defaultdict(list)
        for row in group["rows"]:
            by_algorithm[(row["algorithm"], row["budget"])].append(row)
        for (algorithm, _), rows in by_algorithm.items():
            x = np.array([_means(r, gold1) for r in rows])
            y = np.array([_means(r, gold2) for r in rows])
            if algorithm == "sft":
                ax.plot(x.mean(), y.mean(), "*", color="black", ms=13, label="π_SFT", zorder=5)
                continue
            xerr = [np.nanstd(values(r, gold1), ddof=1) if len(r["runs"]) > 1 else 0.0 for r in rows]
            yerr = [np.nanstd(values(r, gold2), ddof=1) if len(r["runs"]) > 1 else 0.0 for r in rows]
            kl = np.mean([_means(r, "objective/kl") for r in rows])
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, color=COLORS[algorithm],
                        label=f"{rows[0]['label']} (KL ≈ {kl:.1f})")
            for row, u, v in zip(rows, x, y):
                ax.annotate(f"{row['weight']:g}", (u, v), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=COLORS[algorithm])
        ax.set_xlabel(f"held-out gold: {first}")
        ax.set_ylabel(f"held-out gold: {second}")
        target = ", ".join(f"KL target {t:g} nats" if t else f"β = {group['beta']:g}"
                           for t, _ in group["kl_targets"]) or f"β = {group['beta']:g}"
        ax.set_title(f"{group['task']}, {first} from {'the RM' if group['reward'] == 'rm' else 'gold'}; {target}")
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(plt, fig, out / "pareto.png", "Pareto front of two gold objectives (labels: weight λ of the second)")


def write(cells: list[dict], out: Path) -> tuple[list[str], list[dict], list[Path]]:
    """The Pareto section of results.md, its results.json entries and its plot, for the sweep's `cells`."""
    groups = aggregate(cells)
    groups = [g for g in groups if len(g["objectives"]) >= 2]
    if not groups:
        return [], [], []
    return markdown(groups), summary(groups), [plot(groups, Path(out))]

