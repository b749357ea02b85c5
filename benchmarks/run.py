"""The benchmark grid in one command: algorithms × tasks × rewards × β × seeds, each cell trained and evaluated on
held-out prompts, then a results table and plots.

    python -m benchmarks.run --quick            # the README's main job: ~10 minutes on 2 CPU cores
    python -m benchmarks.run                    # the full grid (hours; see FULL)
    python -m benchmarks.run --algorithms ppo rloo --betas 0.05 0.1 --seeds 0 1 2 --out runs/mine

Everything goes to one folder (``--out``): ``cells/<cell>.json`` (one per cell: config, commit, seed, metrics,
timing, peak memory, training curve and held-out checkpoints), ``results.md``, ``results.json`` and the PNG plots.
A cell whose JSON exists is not rerun, so an interrupted grid resumes where it stopped, and a grid can be widened
later into the same folder. Each cell runs in its own process (``benchmarks.cell``), one at a time: its peak
memory is its own and its numbers do not depend on what ran before it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.cell import ALGORITHMS, CellConfig


@dataclass(frozen=True)
class Grid:
    tasks: tuple[str, ...] = ("sentiment",)
    rewards: tuple[str, ...] = ("rm",)
    betas: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] = (0,)
    budgets: dict[str, int] = field(default_factory=dict)
    """Algorithm → budget (env steps for the RL agents, preference pairs for DPO; see benchmarks.cell.ALGORITHMS).
    "sft" (the floor) takes 0."""
    best_of: tuple[int, ...] = ()
    """n of each best-of-n cell."""
    optimum_samples: int = 256
    """π_ref samples per prompt for the KL-regularised optimum of each (task, reward, β)."""
    optimum_prompts: int = 200
    eval_episodes: int = 512

    def cells(self, threads: int | None = None, device: str = "auto") -> list[CellConfig]:
        """Every cell, cheapest kinds first and seed by seed, so that a partial run already fills a table."""
        cells = []
        for task in self.tasks:
            for reward in self.rewards:
                for beta in self.betas:
                    common = dict(task=task, reward=reward, beta=beta, threads=threads, device=device)
                    cells.append(CellConfig("optimum", budget=self.optimum_samples,
                                            eval_episodes=self.optimum_prompts, **common))
                    for seed in self.seeds:
                        runs = [("best_of_n", n) for n in self.best_of] + list(self.budgets.items())
                        cells += [CellConfig(algorithm, seed=seed, budget=budget, eval_episodes=self.eval_episodes,
                                             **common) for algorithm, budget in runs]
        return cells


# ~10 minutes on 2 CPU cores (budgets measured on this machine: RLOO ~8.5k env steps/s, PPO ~2.4k, DPO ~700 pairs/s).
QUICK = Grid(seeds=(0, 1), budgets={"sft": 0, "rloo": 400_000, "ppo": 250_000, "dpo": 48_000}, best_of=(2, 8, 32),
             optimum_samples=128, optimum_prompts=100)
# The README's learning budgets for every algorithm, two tasks, three β, three seeds: ~30 minutes per (task, β,
# seed) on 2 CPU cores (PPO ~9, DPO ~6, each REINFORCE ~3), so ~9 hours in all; narrow it with the flags.
FULL = Grid(tasks=("sentiment", "verbose"), betas=(0.05, 0.1, 0.25), seeds=(0, 1, 2),
            budgets={"sft": 0, "rloo": 1_300_000, "grpo": 1_300_000, "reinforce_ma": 1_300_000,
                     "reinforce_value": 1_300_000, "ppo": 1_300_000, "dpo": 256_000},
            best_of=(2, 4, 8, 16, 32, 64))


def run_grid(cells: list[CellConfig], out: Path, progress: bool = True) -> list[str]:
    """Run every cell without a JSON in ``out/cells`` (each in a fresh process, one at a time); returns the names of
    the cells that failed."""
    directory = out / "cells"
    directory.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not (directory / f"{c.name}.json").is_file()]
    if len(todo) < len(cells):
        print(f"{len(cells) - len(todo)} of {len(cells)} cells already done in {directory}: not rerun")
    failed = []
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress)
    for config in bar:
        bar.set_postfix_str(config.name)
        bar.write(f"── {config.name}")
        config_path = directory / f"{config.name}.config.json"
        config_path.write_text(json.dumps(asdict(config), indent=1) + "\n")
        done = subprocess.run([sys.executable, "-m", "benchmarks.cell", str(config_path),
                               str(directory / f"{config.name}.json")])
        if done.returncode != 0:
            bar.write(f"   cell {config.name} failed (exit {done.returncode}); rerunning the grid retries it")
            failed.append(config.name)
        else:
            config_path.unlink()
    bar.close()
    return failed


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced grid on the default task (~10 min)")
    parser.add_argument("--out", default=None, help="output folder (default runs/benchmark[-quick])")
    parser.add_argument("--tasks", nargs="+", help="override the grid's tasks")
    parser.add_argument("--rewards", nargs="+", choices=["rm", "gold"])
    parser.add_argument("--betas", nargs="+", type=float)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--algorithms", nargs="+", choices=sorted(set(ALGORITHMS) - {"optimum"}),
                        help="keep only these (best_of_n: the grid's n values)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every training budget")
    parser.add_argument("--best-of", nargs="+", type=int, help="n of the best-of-n cells")
    parser.add_argument("--eval-episodes", type=int)
    parser.add_argument("--optimum-samples", type=int, help="π_ref samples per prompt for the optimum estimate")
    parser.add_argument("--optimum-prompts", type=int, help="held-out prompts for the optimum estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: one per core)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and plots from the cells")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def grid_from_args(args) -> Grid:
    grid = QUICK if args.quick else FULL
    budgets = dict(grid.budgets)
    best_of = args.best_of or grid.best_of
    if args.algorithms:
        budgets = {a: budgets.get(a, FULL.budgets[a]) for a in args.algorithms if a != "best_of_n"}
        best_of = best_of if "best_of_n" in args.algorithms else ()
    budgets = {a: round(b * args.budget_scale) if a != "sft" else 0 for a, b in budgets.items()}
    overrides = {"tasks": args.tasks, "rewards": args.rewards, "betas": args.betas, "seeds": args.seeds,
                 "eval_episodes": args.eval_episodes, "optimum_samples": args.optimum_samples,
                 "optimum_prompts": args.optimum_prompts}
    return replace(grid, budgets=budgets, best_of=tuple(best_of),
                   **{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    from benchmarks.results import write_report

    args = command_line().parse_args(argv)
    out = Path(args.out or ("runs/benchmark-quick" if args.quick else "runs/benchmark"))
    grid = grid_from_args(args)
    cells = grid.cells(threads=args.threads, device=args.device)
    if args.list:
        print("\n".join(c.name for c in cells))
        return 0
    failed = []
    if not args.report_only:
        start = time.perf_counter()
        failed = run_grid(cells, out, progress=not args.no_progress)
        print(f"grid: {len(cells)} cells, {time.perf_counter() - start:.0f} s this run")
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    if not args.report_only:  # results.md lists every command whose cells the folder holds
        with (out / "commands.txt").open("a") as f:
            f.write(command + "\n")
    written = write_report(out)
    print("wrote " + ", ".join(str(p) for p in written))
    if failed:
        print(f"{len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
