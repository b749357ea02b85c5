"""Data-parallel scaling on this machine's CPU cores: ``python -m benchmarks.scaling``.

Times the same work, updates of one agent on a global batch of ``--episodes`` episodes (RLOO by default, or
PPO), in three settings:

* ``1 process × 1 thread``: the baseline;
* ``2 processes × 1 thread``: ``torchrun --standalone --nproc_per_node 2`` (`agents.distributed`: each process
  collects half the batch with its own env, gloo sums the gradients);
* ``1 process × 2 threads``: torch's intra-op threads instead of processes.

Each setting runs in fresh processes (2 warm-up updates, then ``--updates`` timed ones) and reports the median
seconds per update and tokens/s (env steps of every process, idle rows included, per second of update). The
processes sample different episodes, so their token counts differ a little: tokens/s is the comparable number.
On 2 cores the two 2-way settings are bounded by the same two cores; what differs is how the work is split: per
row (threads, inside each matrix product of a small model) or per half batch (processes, one all-reduce per
step). Run it alone on the machine: other processes on the cores distort every number.

Prints a markdown table and the JSON (``--out FILE`` also writes the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from rlhf_env.files import atomic_write_json

SETTINGS = [(1, 1), (2, 1), (1, 2)]  # (processes, threads per process)


def measure(algorithm: str, episodes: int, max_new_tokens: int, updates: int, warmup: int) -> dict | None:
    """In this process (one rank of a torchrun group, or alone): build the agent, run `warmup` then `updates`
    updates; rank 0 returns the timings (other ranks None)."""
    import gymnasium as gym
    import torch

    import rlhf_env  # noqa: F401  (registers RLHF-v0)
    from agents.distributed import init_from_environment, shut_down
    from agents.ppo import PPO, PPOConfig
    from agents.reinforce import Reinforce, ReinforceConfig

    ranks, device = init_from_environment("cpu")
    envs = gym.make_vec("RLHF-v0", num_envs=episodes // ranks.world_size, max_new_tokens=max_new_tokens,
                        device=device)
    if algorithm == "ppo":
        agent = PPO(envs, PPOConfig(episodes_per_update=episodes, minibatch_size=max(1, episodes // 4)),
                    progress=False)
    else:
        agent = Reinforce(envs, ReinforceConfig(episodes_per_update=episodes), progress=False)
    for _ in range(warmup):
        agent.update()
    seconds, tokens = [], []
    for _ in range(updates):
        before, start = agent.num_timesteps, time.perf_counter()
        agent.update()
        seconds.append(ranks.max(time.perf_counter() - start))  # the slowest rank's: the update's wall time
        tokens.append(agent.num_timesteps - before)  # every rank's env steps
    shut_down(finished=True)
    if not ranks.is_main:
        return None
    return {"processes": ranks.world_size, "threads": torch.get_num_threads(),
            "seconds_per_update": float(np.median(seconds)),
            "tokens_per_s": float(np.sum(tokens) / np.sum(seconds)), "updates_timed": updates,
            "tokens_per_update": float(np.mean(tokens))}


def run_setting(processes: int, threads: int, args: argparse.Namespace) -> dict:
    """One setting in fresh processes (torchrun for several); its rank 0's result."""
    child = ["-m", "benchmarks.scaling", "--child", "--algorithm", args.algorithm, "--episodes", str(args.episodes),
             "--max-new-tokens", str(args.max_new_tokens), "--updates", str(args.updates),
             "--warmup", str(args.warmup)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(launcher + child, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) × {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    """The results as a markdown table, each setting's tokens/s also relative to 1 process × 1 thread."""
    base = rows[0]["tokens_per_s"]
    lines = ["| setting | seconds / update | tokens / s | vs 1 × 1 |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['processes']} process(es) × {row['threads']} thread(s) | "
                     f"{row['seconds_per_update']:.3f} | {row['tokens_per_s']:.0f} | "
                     f"{row['tokens_per_s'] / base:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=["rloo", "ppo"], default="rloo")
    parser.add_argument("--episodes", type=int, default=64, help="global batch: episodes per update (even)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--updates", type=int, default=10, help="timed updates per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.episodes % 2:
        parser.error("--episodes must be even (2 processes take half each)")
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = measure(args.algorithm, args.episodes, args.max_new_tokens, args.updates, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return result
    from benchmarks.report import git_commit

    rows = [run_setting(processes, threads, args) for processes, threads in SETTINGS]
    report = {"commit": git_commit(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "algorithm": args.algorithm, "episodes_per_update": args.episodes,
              "max_new_tokens": args.max_new_tokens, "settings": rows}
    print(table(rows))
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)  # the old file or the whole new one
    return report


if __name__ == "__main__":
    main()
