"""FSDP on this machine's CPU cores, 2 gloo processes: what each rank holds, and what decoding costs (``python -m
benchmarks.sharding``; it starts ``torchrun --standalone --nproc_per_node 2`` itself).

Each rank builds an RLOO agent on the default task without FSDP and one with it (`agents.fsdp`), takes one update
with each, and counts the bytes it holds of the trained parameters, their gradients and Adam's moments (π_ref, which
the env holds whole, alongside). Then it times the same rollout (``--rows`` rows of the rank's env, up to
``--max-new-tokens`` tokens) four ways:

* ``whole, gpt2``: no FSDP, the env's lean GPT-2 decoder (the baseline);
* ``FSDP, gathered once, gpt2``: what the agents do, π all-gathered before the rollout and resharded after;
* ``FSDP, gathered once, hf``: the same through transformers' forward (``backend="hf"``);
* ``FSDP, all-gather per forward, hf``: no gathering first, FSDP's own hooks all-gather every unit at every
  decoding step. Here both ranks roll out the same prompts with the same seed so that their steps line up; with
  their own prompts (as in training) one rank would stop decoding before the other and the collectives would
  hang.

Timings are medians of ``--repeats`` rollouts, the slower rank's. Prints a markdown table and the JSON (``--out
FILE`` also writes it). Run it alone on the machine: other processes on the cores distort the times.
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

MODES = ["whole, gpt2", "FSDP, gathered once, gpt2", "FSDP, gathered once, hf", "FSDP, all-gather per forward, hf"]


def held_bytes(tensors) -> int:
    """Bytes of `tensors` on this rank: a DTensor's local shard only."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def training_state(agent) -> dict:
    """This rank's bytes of the trained parameters, their gradients and Adam's moments, and of π_ref."""
    moments = [value for slots in agent.optimizer.state.values() for name, value in slots.items() if name != "step"]
    return {"parameters": held_bytes(agent.params),
            "gradients": held_bytes([p.grad for p in agent.params if p.grad is not None]),
            "adam_moments": held_bytes(moments), "reference": held_bytes(list(agent.world.reference.parameters()))}


def measure(rows: int, max_new_tokens: int, repeats: int) -> dict | None:
    """In one rank of a 2-process torchrun group: the bytes held and the rollout times; rank 0 returns them."""
    import contextlib

    import gymnasium as gym
    import torch

    import rlhf_env  # noqa: F401  (registers RLHF-v0)
    from agents.distributed import init_from_environment, shut_down
    from agents.reinforce import Reinforce, ReinforceConfig
    from agents.rollout import collect_episodes

    ranks, device = init_from_environment("cpu")
    config = ReinforceConfig(episodes_per_update=2 * rows, samples_per_prompt=2)
    agents = {}
    for mode in MODES:
        backend = "hf" if mode.endswith("hf") else "auto"
        envs = gym.make_vec("RLHF-v0", num_envs=rows, max_new_tokens=max_new_tokens, device=device, backend=backend)
        agents[mode] = Reinforce(envs, config, progress=False, fsdp=mode.startswith("FSDP"))
    memory = {}
    for name, mode in (("whole", MODES[0]), ("fsdp", MODES[1])):
        agents[mode].update()
        memory[name] = training_state(agents[mode])
    seconds = {}
    for mode, agent in agents.items():
        gather = mode.startswith("FSDP, gathered")
        times = []
        for repeat in range(repeats + 1):  # the first one untimed
            ranks.sum(torch.zeros(1))  # start together
            start = time.perf_counter()
            with agent.sharded.full_parameters() if gather else contextlib.nullcontext():
                collect_episodes(agent.envs, seed=repeat, generator=torch.Generator().manual_seed(repeat))
            if repeat:
                times.append(ranks.max(time.perf_counter() - start))
        seconds[mode] = float(np.median(times))
    shut_down(finished=True)
    if not ranks.is_main:
        return None
    return {"processes": ranks.world_size, "rows": rows, "max_new_tokens": max_new_tokens, "repeats": repeats,
            "bytes_per_rank": memory, "rollout_seconds": seconds}


def table(result: dict) -> str:
    """The bytes each rank holds with and without FSDP, then the rollout times, as markdown."""
    whole, fsdp = result["bytes_per_rank"]["whole"], result["bytes_per_rank"]["fsdp"]
    lines = ["| per rank | without FSDP | with FSDP |", "|---|---|---|"]
    for key in ("parameters", "gradients", "adam_moments", "reference"):
        lines.append(f"| {key.replace('_', ' ')} | {whole[key] / 2**20:.2f} MiB | {fsdp[key] / 2**20:.2f} MiB |")
    base = result["rollout_seconds"][MODES[0]]
    lines += ["", "| rollout | seconds | vs whole |", "|---|---|---|"]
    for mode, value in result["rollout_seconds"].items():
        lines.append(f"| {mode} | {value:.3f} | {value / base:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="rows of each rank's env (one rollout)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts per mode")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        result = measure(args.rows, args.max_new_tokens, args.repeats)
        if result is not None:
            print(json.dumps(result))
        return result
    from benchmarks.report import git_commit

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "benchmarks.sharding", "--child", "--rows", str(args.rows), "--max-new-tokens",
               str(args.max_new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the 2 FSDP processes failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    report = {"commit": git_commit(), "machine": platform.machine(), "cpus": os.cpu_count(), **result}
    print(table(report))
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)  # the old file or the whole new one
    return report


if __name__ == "__main__":
    main()
