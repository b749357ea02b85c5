"""Build or check a task's default assets.

    python -m rlhf_env.assets build [--task sentiment] [--out DIR] [--seed 0] [--preset tiny|small]
                                    [--annotation pairwise|ranking] [--rm-loss bradley_terry|listwise]
                                    [--device cpu|cuda|auto] [--quick]
    python -m rlhf_env.assets check [--task sentiment]     # rebuild in a temp dir, compare with the shipped hashes

Without ``--out``, ``build`` writes into the package (``rlhf_env/assets/<task>/``), which is what ships. ``build``
replaces its folder in one step once the new build is complete, and only when the folder is missing, empty or a
previous build: a folder holding anything else is refused (exit code 2, naming the files) before the build starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from rlhf_env.assets import MANIFEST, asset_dir
from rlhf_env.models import PRESETS, resolve_device
from rlhf_env.pipeline.assets import BuildConfig, build_assets, check_replaceable
from rlhf_env.tasks import DEFAULT_TASK, TASKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_env.assets", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=None, help="asset directory (default: inside the package)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--annotation", default="pairwise", choices=["pairwise", "ranking"],
                        help="Bradley-Terry pair judgements, or one Plackett-Luce ranking per prompt")
    parser.add_argument("--rm-loss", default="bradley_terry", choices=["bradley_terry", "listwise"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for smoke tests")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # per-file save/load bars drown the build's own
    config = BuildConfig.quick(args.seed) if args.quick else BuildConfig(seed=args.seed)
    config = replace(config, preset=args.preset, preferences=replace(config.preferences, mode=args.annotation),
                     reward=replace(config.reward, loss=args.rm_loss))
    device = resolve_device(args.device)
    progress = not args.no_progress

    if args.command == "build":
        out = args.out or asset_dir(args.task)
        try:
            check_replaceable(out)  # before the (minutes-long) build, not after it
        except ValueError as error:
            parser.error(str(error))
        manifest = build_assets(args.task, out, config, progress=progress, device=device)
        print(json.dumps(summary(manifest), indent=2))
        print(f"assets written to {out}")
        return 0

    if not (asset_dir(args.task) / MANIFEST).is_file():
        parser.error(f"the package ships no assets for task {args.task!r} to check against")
    shipped = json.loads((asset_dir(args.task) / MANIFEST).read_text())
    # CPU kernels split work by thread count and so round differently: rebuild with the threads of the original.
    torch.set_num_threads(shipped["environment"]["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_assets(args.task, Path(tmp) / args.task, BuildConfig(seed=shipped["config"]["seed"]),
                                progress=progress)
    differ = sorted(k for k in shipped["sha256"] if shipped["sha256"][k] != manifest["sha256"].get(k))
    print(json.dumps(summary(manifest), indent=2))
    if differ:
        print(f"rebuilt assets differ from the shipped ones in: {', '.join(differ)}\n"
              f"(shipped built with {shipped['environment']}, rebuilt with {manifest['environment']};"
              " bitwise equality holds on the same machine, torch build and thread count)")
        return 1
    print("rebuilt assets are bit-for-bit identical to the shipped ones")
    return 0


def summary(manifest: dict) -> dict:
    """The numbers a person wants after a build."""
    sft, rm = manifest["sft"], manifest["reward_model"]
    keys = ("perplexity", "perplexity_floor", "perplexity_ratio", "grammar_pass", "eos_rate", "gold_mean")
    return {
        "task": manifest["task"],
        "sft": {k: round(sft[k], 4) for k in keys if k in sft},
        "reward_model": {k: round(rm[k], 4) for k in ("accuracy_gold", "accuracy_labels", "offset") if k in rm}
        | {"n_train_pairs": rm["n_train_pairs"], "n_eval_pairs": rm["n_pairs"]},
        "seconds": manifest["seconds"],
    }


if __name__ == "__main__":
    sys.exit(main())
