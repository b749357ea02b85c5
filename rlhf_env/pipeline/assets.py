"""Building a task's assets: tokenizer → π_SFT → preference data → reward model, from one seed, into a folder.

A build writes into a temporary directory and renames it into place, so a failed build leaves nothing behind.
The command line is ``python -m rlhf_env.assets build|check``; loading is `rlhf_env.assets`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers

from rlhf_env.assets import MANIFEST, file_hashes
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


def build_assets(task: str | Task, out_dir: str | Path, config: BuildConfig = BuildConfig(),
                 progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """Build tokenizer, π_SFT, preference data and reward model for `task` into `out_dir`; returns the manifest.

    Models train in fp32 on `device`; they are saved from the CPU. Bitwise reproducibility holds on CPU.
    """
    task = get_task(task)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    seed = config.seed
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
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
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp/mkstemp create private files; assets are for everyone
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
