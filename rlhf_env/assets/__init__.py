"""Default assets: each task's tokenizer, π_SFT and reward model, built by project code from a fixed seed.

One command builds them (``python -m rlhf_env.assets build --task sentiment``); the default task's assets ship
inside the package so that ``gym.make("RLHF-v0")`` starts at once, and ``python -m rlhf_env.assets check`` rebuilds
them and compares hashes. Layout of an asset directory::

    tokenizer/         PreTrainedTokenizerFast (save_pretrained)
    policy/            π_SFT = π_ref, a GPT-2 causal LM (safetensors)
    reward_model/      RM trunk (safetensors) + reward_head.safetensors + reward_config.json (normalising offset)
    preferences/       pairs_{train,eval}.jsonl and groups_{train,eval}.jsonl (see rlhf_env.build.preferences)
    manifest.json      seed, configs, reports (perplexity, grammar, RM accuracy, seconds), sha256 of every file

A build writes into a temporary directory and renames it into place, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
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

from rlhf_env.build.preferences import PreferenceConfig, label_groups, load_groups, load_pairs, sample_groups
from rlhf_env.build.reward_model import (
    RewardConfig,
    RewardModel,
    evaluate_reward_model,
    normalize_reward_model,
    train_reward_model,
)
from rlhf_env.build.sft import SFTConfig, train_sft
from rlhf_env.jsonl import dumps_jsonl, write_jsonl
from rlhf_env.models import build_policy, load_causal_lm
from rlhf_env.tasks import AnnotatorConfig, Task, get_task
from rlhf_env.tokenizer import train_tokenizer

PACKAGE_ASSETS = Path(__file__).parent
MANIFEST = "manifest.json"


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


# Keys that record which library release wrote a file, not what the file holds: left out of its hash, so that a
# rebuild under a newer transformers compares equal when everything it computed is equal.
VERSION_KEYS = ("transformers_version",)


def file_hashes(directory: str | Path) -> dict[str, str]:
    """sha256 of every file below `directory` (the manifest excluded), keyed by relative path. A JSON object with a
    `VERSION_KEYS` entry is hashed without it (keys sorted); every other file byte for byte."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(_content(p)).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _content(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        value = json.loads(data)
    except ValueError:
        return data
    if not isinstance(value, dict) or not any(key in value for key in VERSION_KEYS):
        return data
    return json.dumps({k: v for k, v in value.items() if k not in VERSION_KEYS}, sort_keys=True).encode("utf-8")


def asset_dir(task: str | Task) -> Path:
    """Where the package keeps a built-in task's shipped assets."""
    return PACKAGE_ASSETS / get_task(task).name


def load_assets(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load ``(tokenizer, policy, reward_model)`` from an asset directory (safetensors only)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} is not an asset directory (no {MANIFEST}); build one with "
                         "`python -m rlhf_env.assets build --task TASK --out DIR`")
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    policy = load_causal_lm(directory / "policy", device=device, dtype=dtype)
    reward_model = RewardModel.from_pretrained(directory / "reward_model", device=device, dtype=dtype)
    return tokenizer, policy, reward_model


def load_preference_pairs(directory: str | Path, split: str = "train") -> list[dict]:
    """The preference pairs of an asset directory.

    The package does not ship the sentiment task's 7 MB ``pairs_train.jsonl``: the labels are a pure function of
    the shipped ``groups_train.jsonl`` and the manifest's labelling seed, so they are re-derived here, checked
    against the manifest's sha256, and written next to the groups when the directory is writable.
    """
    directory = Path(directory)
    path = directory / "preferences" / f"pairs_{split}.jsonl"
    if path.is_file():
        return load_pairs(path)
    manifest = json.loads((directory / MANIFEST).read_text())
    labelling = manifest["labelling"]
    groups = load_groups(directory / "preferences" / f"groups_{split}.jsonl")
    pairs = label_groups(groups, AnnotatorConfig(**labelling["annotator"]), labelling["mode"],
                         seed=labelling["seeds"][split])
    digest = hashlib.sha256(dumps_jsonl(pairs).encode("utf-8")).hexdigest()
    if digest != manifest["sha256"][f"preferences/pairs_{split}.jsonl"]:
        raise ValueError(f"re-derived {path.name} does not match the manifest of {directory}: the groups file "
                         "or the manifest has been changed")
    try:
        write_jsonl(path, pairs)
    except OSError:  # an installed, read-only package: the pairs are still returned
        pass
    return pairs
