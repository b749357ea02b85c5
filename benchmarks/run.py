"""The benchmark grid in one command: algorithms × tasks × rewards × β × seeds, each cell trained and evaluated on
held-out prompts, then a results table and plots.

    python -m benchmarks.run --quick            # the README's main job: ~10 minutes on 2 CPU cores
    python -m benchmarks.run                    # the full grid (hours; see FULL)
    python -m benchmarks.run --algorithms ppo rloo --betas 0.05 0.1 --seeds 0 1 2 --out runs/mine
    python -m benchmarks.run --pareto           # two objectives (sentiment gold vs brevity): the Pareto front
    python -m benchmarks.run --quick --processes 2   # each training cell data-parallel on 2 processes (torchrun)

Everything goes to one folder (``--out``): ``cells/<cell>.json`` (one per cell: config, commit, seed, metrics,
timing, peak memory, training curve and held-out checkpoints), ``results.md``, ``results.json``, ``commands.txt``
and the PNG plots. A cell whose JSON exists is not rerun, so an interrupted grid resumes where it stopped, and a
grid can be widened later into the same folder. Each cell runs in its own process (``benchmarks.cell``), one at a
time: its peak memory is its own and its numbers do not depend on what ran before it.

Nothing lost, nothing half-done:

* One writer per folder: a run (``--report-only`` too) holds a lock on ``--out`` (`rlhf_env.files.FolderLock`) from
  start to end; a second run on the same folder stops at once with exit code 2, naming the folder and the pid that
  holds it. The kernel drops the lock when its owner dies, however it dies.
* Every file is written atomically (a temporary sibling, fsync, rename; ``commands.txt`` by fsynced appends): a
  crash leaves the old file or the whole new one.
* Damaged cells are moved aside and rerun: a cell JSON that does not parse or lacks a key the report reads is renamed
  to ``<cell>.json.damaged`` (kept, not deleted; the run prints its name) and the cell runs again. ``--report-only``
  skips such a file with a message naming it and reports the other cells.
* A killed grid takes its cell with it: on Linux the cell process gets SIGKILL from the kernel when the grid process
  dies (``PR_SET_PDEATHSIG``), even by SIGKILL; on Ctrl-C or SIGTERM the grid stops the cell (SIGTERM, then SIGKILL
  after 10 s) and waits for it before it exits. Elsewhere (macOS, Windows) only the second holds: after a hard kill
  of the grid, stop its cell by hand before rerunning it. So a rerun never runs a cell twice at once. A cell of
  several processes (``--processes``) is a ``torchrun`` launcher whose workers each die with it the same way
  (`benchmarks.processes`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.cell import ALGORITHMS, FEEDBACK, UNTRAINED, CellConfig
from benchmarks.processes import dies_with
from benchmarks.results import read_cell
from rlhf_env.files import FolderInUse, FolderLock, append_line, atomic_write_json


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
    weights: tuple[float, ...] = ()
    """The Pareto sweep (`PARETO`): each weight λ of the task's second gold objective gets its own best-of-n and
    training cells (`CellConfig.weight`), π_SFT one cell (λ = 0) per seed, and there are no optimum cells."""
    kl_target: float | None = None
    """Adaptive β toward this KL per episode in every training cell (`CellConfig.kl_target`); None: β fixed."""
    kl_horizon: int = 10_000
    feedbacks: tuple[str, ...] = ("human",)
    """Where the reward model's labels come from (`benchmarks.cell.FEEDBACK`): each RL cell on the learned reward
    model runs once per feedback source ("human" is the task's reward model as built)."""
    processes: int = 1
    """Data-parallel processes of every training cell (`CellConfig.processes`: run under ``torchrun``)."""

    def cells(self, threads: int | None = None, device: str = "auto") -> list[CellConfig]:
        """Every cell, cheapest kinds first and seed by seed, so that a partial run already fills a table."""
        if self.weights:
            return self._pareto_cells(threads, device)
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
                                             processes=self._processes(algorithm), feedback=feedback, **common)
                                  for algorithm, budget in runs for feedback in self._feedbacks(algorithm, reward)]
        return cells

    def _pareto_cells(self, threads: int | None, device: str) -> list[CellConfig]:
        cells = []
        for task in self.tasks:
            for reward in self.rewards:
                for beta in self.betas:
                    for seed in self.seeds:
                        common = dict(task=task, reward=reward, beta=beta, seed=seed, threads=threads, device=device,
                                      eval_episodes=self.eval_episodes)
                        if "sft" in self.budgets:
                            cells.append(CellConfig("sft", weight=0.0, **common))
                        for weight in self.weights:
                            cells += [CellConfig("best_of_n", budget=n, weight=weight, **common) for n in self.best_of]
                            cells += [CellConfig(algorithm, budget=budget, weight=weight, kl_target=self.kl_target,
                                                 kl_horizon=self.kl_horizon, processes=self._processes(algorithm),
                                                 **common)
                                      for algorithm, budget in self.budgets.items() if algorithm != "sft"]
        return cells

    def _processes(self, algorithm: str) -> int:
        return 1 if algorithm in UNTRAINED else self.processes

    def _feedbacks(self, algorithm: str, reward: str) -> tuple[str, ...]:
        """The feedback sources a cell of `algorithm` on `reward` runs with: every one for an RL agent on the
        learned reward model; "human" (the default reward model, or none) for the rest."""
        if reward != "rm" or algorithm in (*UNTRAINED, "dpo"):
            return ("human",)
        return self.feedbacks


# ~10 minutes on 2 CPU cores (budgets measured on this machine: RLOO ~8.5k env steps/s, PPO ~2.4k, DPO ~700 pairs/s).
QUICK = Grid(seeds=(0, 1), budgets={"sft": 0, "rloo": 400_000, "ppo": 250_000, "dpo": 48_000}, best_of=(2, 8, 32),
             optimum_samples=128, optimum_prompts=100)
# The README's learning budgets for every algorithm, two tasks, three β, three seeds: ~30 minutes per (task, β,
# seed) on 2 CPU cores (PPO ~9, DPO ~6, each REINFORCE ~3), so ~9 hours in all; narrow it with the flags.
FULL = Grid(tasks=("sentiment", "verbose"), betas=(0.05, 0.1, 0.25), seeds=(0, 1, 2),
            budgets={"sft": 0, "rloo": 1_300_000, "grpo": 1_300_000, "reinforce_ma": 1_300_000,
                     "reinforce_value": 1_300_000, "ppo": 1_300_000, "dpo": 256_000},
            best_of=(2, 4, 8, 16, 32, 64))

# The two-objective sweep on sentiment (its gold vs brevity): every weight's RL agents spend the same KL budget,
# 2.5 nats per episode, the bound of best-of-32 beside them; the quick grid's budgets. 38 cells: 84 minutes on 2 CPU
# cores shared with other work (about 50 alone, from the cells' own training times).
PARETO = Grid(seeds=(0, 1), budgets={"sft": 0, "rloo": 400_000, "ppo": 250_000}, best_of=(32,),
              weights=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95), kl_target=2.5, kl_horizon=2000)


CELL_COMMAND = [sys.executable, "-m", "benchmarks.cell"]
"""How `run_grid` starts a cell of one process, before its two arguments (CONFIG.json OUT.json); tests put a
stand-in here."""


def cell_command(config: CellConfig, config_path: Path, result_path: Path, progress: bool = True) -> list[str]:
    """The command that runs a cell from its config file: `CELL_COMMAND` ``CONFIG OUT``, or for a cell of N > 1
    processes ``python -m torch.distributed.run --standalone --nproc_per_node N -m benchmarks.cell CONFIG OUT``
    (``torchrun``: one worker per rank, each with one thread unless the cell sets ``threads``); with
    ``--no-progress`` after them when `progress` is off (no progress bars in the cell's output)."""
    quiet = [] if progress else ["--no-progress"]
    if config.processes == 1:
        return [*CELL_COMMAND, str(config_path), str(result_path), *quiet]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(config.processes), "-m", "benchmarks.cell", str(config_path), str(result_path), *quiet]

STOP_SECONDS = 10
"""How long a stopped cell gets to exit after SIGTERM before it is killed."""


def _run_cell_process(command: list[str]) -> int:
    """Run one cell's process to its end and return its exit code. If the grid is interrupted meanwhile (Ctrl-C,
    SIGTERM: any exception), the cell is stopped (SIGTERM, then SIGKILL after `STOP_SECONDS`) and waited for first,
    so that no cell outlives its grid."""
    child = subprocess.Popen(command, preexec_fn=dies_with(os.getpid()))
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises ``SystemExit(143)`` (as Ctrl-C raises KeyboardInterrupt), so that the
    grid unwinds and stops its cell. Only the main thread can set signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def move_aside(path: Path) -> Path:
    """Rename a damaged `path` to ``<name>.damaged`` (``.damaged-1``, … when taken): kept for a look, not deleted."""
    target, n = path.with_name(path.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.rename(path, target)
    return target


def finished(path: Path) -> bool:
    """Whether the cell JSON `path` holds a finished cell. A damaged one (`benchmarks.results.read_cell` refuses it)
    is moved aside (`move_aside`) with a message naming it, and counts as not finished."""
    if not path.is_file():
        return False
    try:
        read_cell(path)
    except ValueError as error:
        aside = move_aside(path)
        print(f"damaged cell result: {error}\n   moved aside to {aside}; the cell runs again")
        return False
    return True


def run_grid(cells: list[CellConfig], out: Path, progress: bool = True) -> list[str]:
    """Run every cell without a finished JSON in ``out/cells`` (each in a fresh process, one at a time); returns the
    names of the cells that failed. The caller holds ``FolderLock(out)`` (`main` does).

    Ctrl-C or SIGTERM stops the running cell, waits for it, and is raised again; on Linux the cell dies with this
    process however it dies (see the module's docstring)."""
    directory = out / "cells"
    directory.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not finished(directory / f"{c.name}.json")]
    if len(todo) < len(cells):
        print(f"{len(cells) - len(todo)} of {len(cells)} cells already done in {directory}: not rerun")
    failed = []
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress)
    with _sigterm_raises():
        for config in bar:
            bar.set_postfix_str(config.name)
            bar.write(f"── {config.name}")
            config_path, result_path = directory / f"{config.name}.config.json", directory / f"{config.name}.json"
            atomic_write_json(config_path, asdict(config))
            try:
                returncode = _run_cell_process(cell_command(config, config_path, result_path, progress))
            except BaseException:
                bar.close()
                print(f"grid interrupted: cell {config.name} was stopped; rerunning the grid redoes it",
                      file=sys.stderr, flush=True)
                raise
            if returncode != 0:
                bar.write(f"   cell {config.name} failed (exit {returncode}); rerunning the grid retries it")
                failed.append(config.name)
            else:
                config_path.unlink()
    bar.close()
    return failed


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced grid on the default task (~10 min)")
    parser.add_argument("--pareto", action="store_true",
                        help="the two-objective weight sweep on sentiment (gold vs brevity) at one KL budget")
    parser.add_argument("--weights", nargs="+", type=float,
                        help="the Pareto sweep's weights λ of the second objective, each in [0, 1]")
    parser.add_argument("--kl-target", type=float, help="adaptive β toward this KL (nats per episode)")
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
    parser.add_argument("--feedback", nargs="+", choices=sorted(FEEDBACK),
                        help="feedback sources of the RL cells on the learned reward model (default: human)")
    parser.add_argument("--processes", type=int,
                        help="data-parallel processes per training cell, each cell under torchrun (default 1)")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and plots from the cells")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def grid_from_args(args) -> Grid:
    if args.quick and args.pareto:
        raise SystemExit("benchmarks.run: --quick and --pareto are two grids; pick one")
    if args.weights and not args.pareto:
        raise SystemExit("benchmarks.run: --weights belongs to the Pareto sweep; add --pareto")
    grid = QUICK if args.quick else PARETO if args.pareto else FULL
    budgets = dict(grid.budgets)
    best_of = args.best_of or grid.best_of
    if args.algorithms:
        rloo = budgets.get("rloo", FULL.budgets["rloo"])  # a preset's budget: RLOO's (env steps, the same work)
        budgets = {a: budgets.get(a, FULL.budgets.get(a, rloo)) for a in args.algorithms if a != "best_of_n"}
        best_of = best_of if "best_of_n" in args.algorithms else ()
    budgets = {a: round(b * args.budget_scale) if a != "sft" else 0 for a, b in budgets.items()}
    overrides = {"tasks": args.tasks, "rewards": args.rewards, "betas": args.betas, "seeds": args.seeds,
                 "eval_episodes": args.eval_episodes, "optimum_samples": args.optimum_samples,
                 "optimum_prompts": args.optimum_prompts, "weights": args.weights, "kl_target": args.kl_target,
                 "processes": args.processes, "feedbacks": args.feedback}
    return replace(grid, budgets=budgets, best_of=tuple(best_of),
                   **{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    from benchmarks.results import write_report

    args = command_line().parse_args(argv)
    grid = grid_from_args(args)
    out = Path(args.out or ("runs/benchmark-quick" if args.quick else "runs/benchmark-pareto" if args.pareto
                            else "runs/benchmark"))
    cells = grid.cells(threads=args.threads, device=args.device)
    if args.list:
        print("\n".join(c.name for c in cells))
        return 0
    lock = FolderLock(out, "benchmark folder")
    try:
        lock.acquire()  # one writer per folder, from the first cell to the last plot
    except FolderInUse as error:
        print(f"benchmarks.run: {error}", file=sys.stderr)
        return 2
    try:
        failed = []
        if not args.report_only:
            start = time.perf_counter()
            failed = run_grid(cells, out, progress=not args.no_progress)
            print(f"grid: {len(cells)} cells, {time.perf_counter() - start:.0f} s this run")
        command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
        if not args.report_only:  # results.md lists every command whose cells the folder holds
            append_line(out / "commands.txt", command)
        written = write_report(out)
    finally:
        lock.release()
    print("wrote " + ", ".join(str(p) for p in written))
    if failed:
        print(f"{len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
