"""Building a task's assets: tokenizer → π_SFT → preference data → reward model, from one seed, into a folder.

A build writes into a temporary sibling of its folder and swaps it into place in one step
(`rlhf_env.files.atomic_directory`), so a failed or killed build leaves the folder as it was: missing, or the
previous build, complete. A build never deletes what it did not make: its folder must be missing, empty, or a
previous build (`check_replaceable`), which it checks before it starts. The command line is
``python -m rlhf_env.assets build|check``; loading is `rlhf_env.assets`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers

from rlhf_env.assets import MANIFEST, file_hashes
from rlhf_env.files import atomic_directory, refuse_foreign
from rlhf_env.jsonl import write_jsonl
from rlhf_env.models import build_policy
from rlhf_env.pipeline.preferences import PreferenceConfig, label_groups, sample_groups
from rlhf_env.pipeline.reward_training import (
    RewardConfig,
    evaluate_reward_model,
    normalize_reward_model,
    train_reward_model,
)
from rlhf_env.pipeline.sft import SFTConfig, train_sft
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.reward_model import RewardModel
from rlhf_env.tasks import Task, get_task


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a task's assets."""

    seed: int = 0
    """One seed for the whole build; each stage derives its own from it."""
    preset: str = "tiny"
    """Model size preset for π_SFT and the RM trunk (see `rlhf_env.models.PRESETS`)."""
    n_positions: int = 64
    """Context length of the models (prompt + response)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning."""
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Preference data for training the RM (train prompts)."""
    eval_prompts: int = 400
    """Held-out prompts for the RM's evaluation pairs."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward-model training."""

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        """A seconds-long build for tests: the same code paths with tiny budgets."""
        return cls(seed=seed, sft=SFTConfig(steps=20, n_demonstrations=500, n_eval=64),
                   preferences=PreferenceConfig(n_prompts=48, k=3), eval_prompts=16,
                   reward=RewardConfig(steps=10, batch_size=16))


def build_files(out_dir: Path) -> set[str] | None:
    """The files a previous build in `out_dir` wrote: its manifest and every file its manifest's "sha256" lists
    (``preferences/pairs_{split}.jsonl``, which `load_preference_pairs` re-derives, is listed too). None when
    `out_dir` holds no manifest that parses."""
    try:
        listed = json.loads((out_dir / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {MANIFEST, *listed} if isinstance(listed, dict) else None


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Raise `ValueError` unless a build may write `out_dir`: missing, an empty folder, or a previous build (a
    ``manifest.json`` that parses, and nothing beside it that the manifest does not list). The message names
    `out_dir` and the first few files that are not a build's; nothing is deleted (`rlhf_env.files.refuse_foreign`)."""
    out_dir = Path(out_dir)
    refuse_foreign(out_dir, build_files(out_dir) if out_dir.is_dir() else None, "a task's assets")


def build_assets(task: str | Task, out_dir: str | Path, config: BuildConfig = BuildConfig(),
                 progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """Build tokenizer, π_SFT, preference data and reward model for `task` into `out_dir`; returns the manifest.

    `out_dir` must be missing, empty or a previous build (`check_replaceable`, checked before the build starts and
    again just before the swap): anything else is a `ValueError` and nothing is touched. The build fills a
    temporary sibling and replaces `out_dir` in one step, so a failure or a kill at any point leaves the previous
    `out_dir` complete (at most a hidden ``.NAME.tmp-*`` sibling stays behind after a kill).

    Models train in fp32 on `device`; they are saved from the CPU. Bitwise reproducibility holds on CPU.
    """
    task = get_task(task)
    out_dir = Path(out_dir).resolve()  # ".", "..", a link: the temporary sibling goes beside the real folder
    check_replaceable(out_dir)
    start = time.perf_counter()
    seed = config.seed
    with atomic_directory(out_dir) as tmp:
        timings = {}
        tokenizer = train_tokenizer(task.tokenizer_corpus(np.random.default_rng(seed)))
        tokenizer.save_pretrained(tmp / "tokenizer")

        t = time.perf_counter()
        policy = build_policy(tokenizer, config.preset, config.n_positions, seed=seed).to(device)
        sft_report = train_sft(policy, tokenizer, task, replace(config.sft, seed=seed), progress=progress)
        policy.to("cpu").save_pretrained(tmp / "policy", safe_serialization=True)
        policy.to(device)
        timings["sft"] = time.perf_counter() - t

        t = time.perf_counter()
        prefs = replace(config.preferences, seed=seed + 1)
        groups = sample_groups(policy, tokenizer, task, prefs, split="train", progress=progress)
        eval_groups = sample_groups(policy, tokenizer, task, replace(prefs, n_prompts=config.eval_prompts,
                                                                     seed=seed + 2), split="eval", progress=progress)
        annotator = prefs.annotator or task.annotator
        labelling = {"annotator": asdict(annotator), "mode": prefs.mode, "seeds": {"train": seed + 3, "eval": seed + 4}}
        pairs = label_groups(groups, annotator, prefs.mode, seed=labelling["seeds"]["train"])
        eval_pairs = label_groups(eval_groups, annotator, prefs.mode, seed=labelling["seeds"]["eval"])
        for name, records in [("pairs_train", pairs), ("pairs_eval", eval_pairs),
                              ("groups_train", groups), ("groups_eval", eval_groups)]:
            write_jsonl(tmp / "preferences" / f"{name}.jsonl", records)
        timings["preferences"] = time.perf_counter() - t

        t = time.perf_counter()
        trunk = build_policy(tokenizer, config.preset, config.n_positions, seed=seed + 5).transformer
        reward_model = RewardModel(trunk).to(device)
        rm_report = train_reward_model(reward_model, tokenizer, pairs, groups, replace(config.reward, seed=seed + 6),
                                       progress=progress)
        rm_report["offset"] = normalize_reward_model(reward_model, tokenizer, groups)
        rm_report.update(evaluate_reward_model(reward_model, tokenizer, eval_pairs))
        rm_report["n_train_pairs"] = len(pairs)
        reward_model.to("cpu").save_pretrained(tmp / "reward_model")
        timings["reward_model"] = time.perf_counter() - t

        manifest = {
            "task": task.name,
            "config": asdict(config),
            "labelling": labelling,
            "sft": sft_report,
            "reward_model": rm_report,
            "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - start, 1)},
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "device": str(device)},
            "sha256": file_hashes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        check_replaceable(out_dir)  # the folder may have changed during the (minutes-long) build
    return manifest
