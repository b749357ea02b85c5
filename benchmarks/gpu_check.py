"""The GPU check, one command for a CUDA machine: ``python -m benchmarks.gpu_check --out runs/gpu-check``.

It runs, each step with its own time limit so that the whole check fits in about 8 minutes:

1. the CUDA tests (``tests/test_cuda.py``: the env's KL seam on CUDA in fp32, a bf16 env, PPO / REINFORCE / DPO
   updates and a checkpoint on CUDA; they skip on a machine without CUDA);
2. ``benchmarks.throughput`` on CUDA in fp32 and in bf16 (env tokens/s next to the policy's own ``generate``);
3. a short RLOO learning check on the gold reward (``python -m agents.reinforce --baseline rloo --reward gold``):
   held-out gold before and after;
4. with two or more GPUs, the same RLOO run on 2 processes (``torchrun --nproc_per_node 2``).

It writes ``gpu_check.json`` (every step's command, exit code, seconds, output tail and parsed numbers) and
``gpu_check.md`` (a summary to paste into docs/gpu.md) into ``--out``. ``--device cpu --quick`` runs the same
steps on the CPU with tiny budgets: that is how the test suite checks the script itself (no GPU in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rlhf_env.files import atomic_write, atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def run_step(name: str, command: list[str], limit: float, env: dict | None = None) -> dict:
    """Run `command` from the repository root with a time limit (seconds); its record: exit code (124 when the
    limit stopped it), seconds and the last 4000 characters of its output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, **(env or {})})
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        code = 124
        output = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                         for part in (stopped.stdout, stopped.stderr))
    return {"name": name, "command": " ".join(command), "exit_code": code,
            "seconds": round(time.perf_counter() - start, 1), "output_tail": output[-4000:]}


def last_json(text: str):
    """The last JSON object printed in `text` (the benchmarks and agents print one at the end), or None."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start
    while start >= 0:
        try:
            return json.loads(text[start:])
        except ValueError:
            start = text.rfind("\n{", 0, start)
    return None


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def steps(device: str, quick: bool, gpus: int, out: Path) -> list[tuple[str, list[str], float, dict | None]]:
    """(name, command, time limit in seconds, extra environment) of each step."""
    python = sys.executable
    timesteps = "3000" if quick else "150000"
    rloo = ["-m", "agents.reinforce", "--baseline", "rloo", "--reward", "gold", "--total-timesteps", timesteps,
            "--device", device, "--eval-episodes", "32" if quick else "512", "--no-progress"]
    throughput = ["-m", "benchmarks.throughput", "--device", device, "--batches", "1,64", "--lengths", "32",
                  "--repeats", "1", "--steps", "40" if quick else "200"]
    plan = [("cuda tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], 120,
             None),
            ("throughput fp32", [python, *throughput, "--dtype", "float32"], 75, None),
            ("throughput bf16", [python, *throughput, "--dtype", "bfloat16"], 75, None),
            ("rloo learning", [python, *rloo, "--out", str(out / "rloo")], 120, None)]
    if gpus >= 2:
        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        plan.append(("rloo 2 processes", [*torchrun, *rloo, "--out", str(out / "rloo-2")], 90, None))
    return plan


def summarise(record: dict) -> str:
    """gpu_check.md: the machine, then a line per step with its numbers."""
    lines = ["# GPU check", "", f"Commit {record['commit']}, {record['date']}; python -m benchmarks.gpu_check "
             f"{' '.join(record['argv'])}.", "", "Machine: " + json.dumps(record["machine"]), "",
             "| step | exit | seconds | result |", "|---|---|---|---|"]
    for step in record["steps"]:
        result = step.get("result", "")
        lines.append(f"| {step['name']} | {step['exit_code']} | {step['seconds']} | {result} |")
    lines.append("")
    return "\n".join(lines)


def result_of(step: dict) -> str:
    """The numbers a step's output holds, in a few words."""
    if step["name"] == "cuda tests":
        tail = step["output_tail"].strip().splitlines()
        return tail[-1] if tail else ""
    parsed = last_json(step["output_tail"])
    if not isinstance(parsed, dict):
        return ""
    if "throughput" in parsed:
        return "; ".join(f"batch {row['batch']}: env {row['env_tokens_per_s']} tok/s, generate "
                         f"{row['generate_tokens_per_s']} tok/s ({row['env_over_generate']}×)"
                         for row in parsed["throughput"])
    if "eval_after" in parsed:
        before, after = parsed["eval_before"], parsed["eval_after"]
        return (f"held-out gold {before['objective/gold_score']:.3f} → {after['objective/gold_score']:.3f}, KL "
                f"{after['objective/kl']:.2f}, {parsed['timesteps']} env steps in {parsed['train_seconds']} s on "
                f"{parsed['processes']} process(es)")
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu to try the script itself")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (the test suite's run on the CPU)")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.report import git_commit

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; nothing to check (--device cpu --quick tries the "
              "script on the CPU)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    record = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "argv": sys.argv[1:] if argv is None else argv, "machine": machine(), "steps": []}
    for name, command, limit, env in steps(args.device, args.quick, gpus, out):
        print(f"── {name}: {' '.join(command)}", flush=True)
        step = run_step(name, command, limit, env)
        step["result"] = result_of(step)
        print(f"   exit {step['exit_code']} in {step['seconds']} s: {step['result']}", flush=True)
        record["steps"].append(step)
        atomic_write_json(out / "gpu_check.json", record)  # what has run so far survives a later kill
    atomic_write(out / "gpu_check.md", summarise(record))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(step["exit_code"] == 0 for step in record["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
