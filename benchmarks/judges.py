"""The built-in judge's agreement against the number of human labels it saw: ``python -m benchmarks.judges``.

For each n of ``--labels`` and each seed: n pairs drawn from the task's shipped training pairs (the simulated
annotators' labels, the world's "human" labels with their noise), a judge made from the shipped π_SFT and trained on
them (`rlhf_env.pipeline.judge_training.train_judge`), then measured on held-out pairs (the shipped eval pairs, on
eval prompts; `evaluate_judge`): agreement with gold and with the human labels, both orders averaged and one order
alone, the position bias, and labelling speed. n = 0 is the judge before any training. For reference, a reward model
trained on the same n labels for the same steps and batch size (a fresh trunk, as the asset build makes one) is
measured on the same pairs (``--no-reward-model`` skips it).

    python -m benchmarks.judges [--task sentiment] [--labels 0,100,300,1000] [--eval-pairs 1000] [--steps 300]
                                [--lr 1e-3] [--seeds 0] [--no-reward-model] [--out FILE]

Prints a markdown table; ``--out`` also writes the rows with the commit, the command and the settings (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from benchmarks.report import git_commit
from rlhf_env.assets import MANIFEST, asset_dir, load_assets, load_preference_pairs
from rlhf_env.files import atomic_write
from rlhf_env.models import build_policy
from rlhf_env.pipeline.judge_training import JudgeConfig, evaluate_judge, judge_from_policy, train_judge
from rlhf_env.pipeline.reward_training import RewardConfig, evaluate_reward_model, train_reward_model
from rlhf_env.reward_model import RewardModel
from rlhf_env.tasks import DEFAULT_TASK, TASKS

COLUMNS = ("human labels", "agreement with gold", "with the human labels", "gold, one order", "orders disagree",
           "P(first slot)", "train (s)", "labels / s", "RM on the same labels: gold")


def reward_model_accuracy(tokenizer, policy, pairs: list[dict], held_out: list[dict], config: JudgeConfig) -> float:
    """Held-out gold accuracy of a reward model trained on `pairs` with the judge's steps, batch size and seed."""
    trunk = build_policy(tokenizer, "tiny", policy.config.n_positions, seed=config.seed + 5).transformer
    reward_model = RewardModel(trunk)
    settings = RewardConfig(steps=config.steps, batch_size=config.batch_size, seed=config.seed)
    train_reward_model(reward_model, tokenizer, pairs, None, settings, progress=False)
    return evaluate_reward_model(reward_model, tokenizer, held_out)["accuracy_gold"]


def measure(task: str, labels: list[int], seeds: list[int], eval_pairs: int, config: JudgeConfig,
            with_reward_model: bool = True, progress: bool = False) -> dict:
    """Train and evaluate one judge per (n, seed); returns the rows and the references."""
    directory = asset_dir(task)
    tokenizer, policy, _ = load_assets(directory)
    train = load_preference_pairs(directory, "train")
    held_out = load_preference_pairs(directory, "eval")
    held_out = [held_out[i] for i in sorted(np.random.default_rng(0).permutation(len(held_out))[:eval_pairs])]
    rows = []
    for seed in seeds:
        for n in labels:
            if n > len(train):
                raise ValueError(f"{n} labels asked for, but the task ships {len(train)} training pairs")
            start = time.perf_counter()
            seeded = JudgeConfig(**{**asdict(config), "seed": seed})
            pairs = [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:n]]
            if n == 0:
                judge, trained = judge_from_policy(policy, tokenizer, config=seeded), {"train_seconds": 0.0}
            else:
                judge, trained = train_judge(policy, tokenizer, pairs, seeded, progress=progress)
            report = evaluate_judge(judge, held_out)
            rows.append({"labels": n, "seed": seed, **report, "train_seconds": trained["train_seconds"],
                         "final_train_loss": trained.get("final_train_loss"),
                         "seconds": round(time.perf_counter() - start, 1)})
            if with_reward_model and n > 0:
                rows[-1]["reward_model_accuracy_gold"] = reward_model_accuracy(tokenizer, policy, pairs, held_out,
                                                                               seeded)
            print(f"n={n} seed={seed}: gold {report.get('agreement_gold', float('nan')):.3f}, labels "
                  f"{report['agreement_labels']:.3f}, orders disagree {report['position_disagreement']:.3f}",
                  file=sys.stderr, flush=True)
    manifest = json.loads((directory / MANIFEST).read_text())
    references = {"human_labels_agreement_gold": rows[0].get("labels_agreement_gold"),
                  "reward_model_accuracy_gold": manifest["reward_model"].get("accuracy_gold"),
                  "reward_model_train_pairs": manifest["reward_model"].get("n_train_pairs")}
    return {"rows": rows, "references": references}


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per number of labels, as markdown."""
    def cell(values, digits=3):
        values = np.array([v for v in values if v is not None], dtype=float)
        if len(values) == 0:
            return "–"
        return f"{values.mean():.{digits}f}" + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for n in sorted({r["labels"] for r in rows}):
        group = [r for r in rows if r["labels"] == n]
        lines.append("| " + " | ".join([
            str(n), cell([r.get("agreement_gold") for r in group]), cell([r["agreement_labels"] for r in group]),
            cell([r.get("agreement_gold_one_order") for r in group]),
            cell([r["position_disagreement"] for r in group]), cell([r["first_slot"] for r in group]),
            cell([r["train_seconds"] for r in group], 0), cell([r["pairs_per_second"] for r in group], 0),
            cell([r.get("reward_model_accuracy_gold") for r in group]),
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.judges", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS))
    parser.add_argument("--labels", default="0,100,300,1000", help="comma-separated numbers of human labels")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (label draw, new weights, batches)")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs to measure on")
    parser.add_argument("--steps", type=int, default=JudgeConfig.steps)
    parser.add_argument("--lr", type=float, default=JudgeConfig.lr)
    parser.add_argument("--batch-size", type=int, default=JudgeConfig.batch_size)
    parser.add_argument("--no-reward-model", action="store_true", help="skip the reward model on the same labels")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    config = JudgeConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    labels = [int(n) for n in args.labels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = measure(args.task, labels, seeds, args.eval_pairs, config, with_reward_model=not args.no_reward_model,
                      progress=args.progress)
    results.update(command="python -m benchmarks.judges " + " ".join(argv if argv is not None else sys.argv[1:]),
                   commit=git_commit(), task=args.task, config=asdict(config), eval_pairs=args.eval_pairs,
                   machine={"threads": torch.get_num_threads(), "torch": torch.__version__,
                            "platform": platform.platform()})
    print(table(results["rows"]))
    print(f"\nreferences: {json.dumps(results['references'])}")
    if args.out:
        atomic_write(args.out, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
