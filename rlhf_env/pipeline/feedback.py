"""Reward models from AI feedback (RLAIF): the task's preference data labelled by a judge instead of the simulated
human annotators, and a reward model trained on those labels exactly as the asset build trains it on the human
ones (Lee et al. 2023, "RLAIF", §2.2: a reward model distilled from AI preferences).

Only the labels differ between the sources: the same π_SFT sample groups (the shipped ``groups_train.jsonl``: 4
responses to each of 6,000 training prompts), all C(4, 2) pairs of each group, the same reward-model trunk seed,
loss, steps and learning rate (the asset manifest's), the same normalisation (mean 0 on π_SFT samples), the same
held-out evaluation (the shipped eval pairs: accuracy against the human labels and against gold).

Sources (`SOURCES`):

* ``"rule_judge"``: the task's `constitution` — for sentiment, two weighted principles: "positive words"
  (`rlhf_env.tasks.sentiment.keyword_sentiment`, a word list that reads no negation) and "well formed" (the
  task's grammar check, weighted to dominate). A rule a person could write down, with a known blind spot
  (negation); ties are dropped.
* ``"lm_judge"``: the built-in LM judge (`rlhf_env.pipeline.judge_training`), π_SFT fine-tuned on
  `LM_JUDGE_LABELS` human labels, then labelling every pair (both orders averaged): AI feedback bootstrapped from
  a few human labels.

`build_feedback_reward_model` writes one (atomically, with ``feedback.json``: the labels' agreement with gold, the
reward model's accuracies, the seconds spent); `feedback_reward_model` returns a cached one, building it the first
time (``$RLHF_GYM_CACHE``, default ``~/.cache/rlhf-gym``). `python -m benchmarks.run --feedback rule_judge lm_judge`
trains RL cells on them (docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rlhf_env.assets import MANIFEST, asset_dir, load_assets, load_preference_pairs
from rlhf_env.files import atomic_directory
from rlhf_env.models import build_policy
from rlhf_env.pipeline.judge_training import JudgeConfig, evaluate_judge, train_judge
from rlhf_env.pipeline.labelers import Principle, RuleJudge, label_groups_by
from rlhf_env.pipeline.preferences import load_groups
from rlhf_env.pipeline.reward_training import (
    RewardConfig,
    evaluate_reward_model,
    normalize_reward_model,
    train_reward_model,
)
from rlhf_env.reward_model import RewardModel
from rlhf_env.tasks import Task, get_task

SOURCES = {
    "rule_judge": "the task's constitution (`constitution`): weighted rule principles, ties dropped",
    "lm_judge": "the built-in LM judge: π_SFT fine-tuned on LM_JUDGE_LABELS human labels, both orders averaged",
}
LM_JUDGE_LABELS = 1000
"""Human labels the built-in LM judge is fine-tuned on (drawn from the shipped training pairs) before it labels
everything: 3% of the 31,352 the human reward model sees."""
REPORT = "feedback.json"
VERSION = 1
"""Part of the cache key: raise it when what a build makes changes."""


def constitution(task: str | Task) -> RuleJudge:
    """The built-in rule judge of `task` (a constitution). Sentiment: "positive words"
    (`rlhf_env.tasks.sentiment.keyword_sentiment`, weight 1) and "well formed" (1 if the task's grammar accepts the
    review, else 0; weight 2, so that it outweighs any difference in positive words, which stays below 2: no
    adjective spam wins); P(a ≻ b) = 1 / 0 / ½ by the sign of the weighted difference (a tie is no label).
    `ValueError` for a task without one."""
    task = get_task(task)
    if task.name != "sentiment":
        raise ValueError(f"task {task.name!r} has no built-in constitution (the sentiment task has one); build a "
                         "RuleJudge from your own principles (rlhf_env.pipeline.labelers)")
    from rlhf_env.tasks.sentiment import keyword_sentiment

    def well_formed(prompts, responses):
        return [float(task.is_well_formed(p, r)) for p, r in zip(prompts, responses)]

    return RuleJudge([Principle("positive words", score=keyword_sentiment, weight=1.0),
                      Principle("well formed", score=well_formed, weight=2.0)], name="constitution")


def labeler_for(source: str, directory: Path, seed: int = 0, judge_config: JudgeConfig | None = None,
                progress: bool = False) -> tuple[object, dict]:
    """The labeler of `source` for the task whose assets are in `directory`, and a report on how it was made.
    `judge_config`: the LM judge's fine-tuning (default `JudgeConfig` with `seed`)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if source == "rule_judge":
        return constitution(manifest["task"]), {}
    if source == "lm_judge":
        tokenizer, policy, _ = load_assets(directory)
        human = load_preference_pairs(directory, "train")
        n = min(LM_JUDGE_LABELS, len(human))
        shown = [human[i] for i in sorted(np.random.default_rng(seed).permutation(len(human))[:n])]
        judge_config = judge_config or JudgeConfig(seed=seed)
        judge, report = train_judge(policy, tokenizer, shown, judge_config, progress=progress)
        return judge, {"judge": report | {"human_labels": n}}
    raise ValueError(f"unknown feedback source {source!r}; expected one of {sorted(SOURCES)}")


def label_agreement(pairs: list[dict], comparisons: int) -> dict:
    """How the labels compare with gold: the share of labelled pairs whose chosen side has the higher gold (pairs
    whose gold ties left out), and the share of the `comparisons` that got a label at all (ties dropped)."""
    differ = [p for p in pairs if p["chosen_gold"] != p["rejected_gold"]]
    return {"labels": len(pairs), "comparisons": comparisons, "coverage": len(pairs) / max(1, comparisons),
            "labels_agreement_gold": float(np.mean([p["chosen_gold"] > p["rejected_gold"] for p in differ]))
            if differ else float("nan")}


def build_feedback_reward_model(source: str, out_dir: str | Path, directory: str | Path | None = None,
                                task: str | Task | None = None, seed: int = 0, judge_config: JudgeConfig | None = None,
                                progress: bool = True) -> dict:
    """Label the training groups of an asset directory with `source`'s labeler and train a reward model on the
    labels as the asset build does (its manifest's preset, trunk seed and `RewardConfig`); write it to `out_dir`
    (``reward_model/`` in the standard format, ``feedback.json``) in one step. Returns the report.

    `directory`: the assets (default: the shipped ones of `task`). `seed`: the LM judge's label draw and weights;
    `judge_config` its fine-tuning (`labeler_for`).
    `ValueError` for an unknown source or a task without a constitution, before anything is labelled."""
    if source not in SOURCES:
        raise ValueError(f"unknown feedback source {source!r}; expected one of {sorted(SOURCES)}")
    directory = Path(directory) if directory is not None else asset_dir(task)
    manifest = json.loads((directory / MANIFEST).read_text())
    if source == "rule_judge":
        constitution(manifest["task"])  # a task without one fails here, before the judge is trained
    start = time.perf_counter()
    labeler, report = labeler_for(source, directory, seed=seed, judge_config=judge_config, progress=progress)
    groups = load_groups(directory / "preferences" / "groups_train.jsonl")
    t = time.perf_counter()
    pairs = label_groups_by(labeler, groups, seed=manifest["labelling"]["seeds"]["train"])
    comparisons = sum(len(g["responses"]) * (len(g["responses"]) - 1) // 2 for g in groups)
    report["labelling"] = label_agreement(pairs, comparisons) | {"seconds": round(time.perf_counter() - t, 1)}
    held_out = load_preference_pairs(directory, "eval")
    if source == "lm_judge":
        report["judge"]["held_out"] = evaluate_judge(labeler, held_out)  # agreement with gold and human labels
    tokenizer, _, _ = load_assets(directory)
    config = manifest["config"]
    build_seed = config["seed"]
    trunk = build_policy(tokenizer, config["preset"], config["n_positions"], seed=build_seed + 5).transformer
    reward_model = RewardModel(trunk)
    settings = replace(RewardConfig(**config["reward"]), seed=build_seed + 6)
    report["reward_model"] = train_reward_model(reward_model, tokenizer, pairs, None, settings, progress=progress)
    report["reward_model"]["offset"] = normalize_reward_model(reward_model, tokenizer, groups)
    report["reward_model"].update(evaluate_reward_model(reward_model, tokenizer, held_out))
    report["human_reward_model"] = {key: manifest["reward_model"].get(key)
                                    for key in ("accuracy_gold", "accuracy_labels", "n_train_pairs")}
    report.update(source=source, task=manifest["task"], seed=seed, seconds=round(time.perf_counter() - start, 1),
                  threads=torch.get_num_threads())
    with atomic_directory(out_dir) as tmp:
        reward_model.save_pretrained(tmp / "reward_model")
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def cache_root() -> Path:
    """Where built feedback reward models are kept: ``$RLHF_GYM_CACHE`` or ``~/.cache/rlhf-gym``."""
    return Path(os.environ.get("RLHF_GYM_CACHE") or Path.home() / ".cache" / "rlhf-gym")


def feedback_dir(source: str, task: str | Task, seed: int = 0) -> Path:
    """The cache folder of `source`'s reward model for the shipped assets of `task`: named by the task, source,
    seed and a digest of the assets' manifest (a rebuilt world gets a new folder)."""
    manifest = (asset_dir(task) / MANIFEST).read_bytes()
    key = hashlib.sha256(manifest + f"{source}/{seed}/{VERSION}".encode()).hexdigest()[:12]
    return cache_root() / "feedback" / f"{get_task(task).name}-{source}-s{seed}-{key}"


def feedback_reward_model(source: str, task: str | Task, seed: int = 0, progress: bool = True) -> Path:
    """The folder of `source`'s reward model for `task` (pass it as ``reward_model=``), built on first use
    (`build_feedback_reward_model`, a few minutes on a CPU) and cached."""
    folder = feedback_dir(source, task, seed)
    if not (folder / REPORT).is_file():
        build_feedback_reward_model(source, folder, task=task, seed=seed, progress=progress)
    return folder / "reward_model"


def feedback_report(source: str, task: str | Task, seed: int = 0) -> dict:
    """The ``feedback.json`` of a built feedback reward model (`feedback_reward_model` first)."""
    return json.loads((feedback_dir(source, task, seed) / REPORT).read_text())
