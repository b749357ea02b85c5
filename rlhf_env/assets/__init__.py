"""The shipped assets of every built-in task (tokenizer, π_SFT, reward model, preferences) and how to load them.

They are built by project code from a fixed seed (`rlhf_env.pipeline.assets`; ``python -m rlhf_env.assets build
--task sentiment``) and ship inside the package so that ``gym.make("RLHF-v0")`` starts at once;
``python -m rlhf_env.assets check`` rebuilds them and compares hashes. Layout of an asset directory::

    tokenizer/         PreTrainedTokenizerFast (save_pretrained)
    policy/            π_SFT = π_ref, a GPT-2 causal LM (safetensors)
    reward_model/      a GPT2ForSequenceClassification, num_labels=1 (safetensors), normalising offset folded in
    preferences/       pairs_{train,eval}.jsonl and groups_{train,eval}.jsonl (see rlhf_env.pipeline.preferences)
    manifest.json      seed, configs, reports (perplexity, grammar, RM accuracy, seconds), sha256 of every file
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rlhf_env.jsonl import dumps_jsonl, write_jsonl
from rlhf_env.models import load_causal_lm, load_tokenizer
from rlhf_env.pipeline.preferences import label_groups, load_groups, load_pairs
from rlhf_env.reward_model import RewardModel
from rlhf_env.tasks import AnnotatorConfig, Task, get_task

PACKAGE_ASSETS = Path(__file__).parent
MANIFEST = "manifest.json"


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
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} is not an asset directory (no {MANIFEST}); build one with "
                         "`python -m rlhf_env.assets build --task TASK --out DIR`")
    tokenizer = load_tokenizer(directory / "tokenizer")
    policy = load_causal_lm(directory / "policy", device=device, dtype=dtype)
    reward_model = RewardModel.from_pretrained(directory / "reward_model", device=device, dtype=dtype)
    return tokenizer, policy, reward_model


def load_preference_pairs(directory: str | Path, split: str = "train") -> list[dict]:
    """The preference pairs of an asset directory.

    The package does not ship the sentiment task's 7 MB ``pairs_train.jsonl``: the labels are a pure function of
    the shipped ``groups_train.jsonl`` and the manifest's labelling seed, so they are re-derived here, checked
    against the manifest's sha256, and written next to the groups when the directory is writable. A pairs file
    already there is read when the manifest lists its hash; one that differs from it (written by an older release,
    whose pairs had no ``labeler`` field) is re-derived and replaced the same way.
    """
    directory = Path(directory)
    path = directory / "preferences" / f"pairs_{split}.jsonl"
    manifest_file = directory / MANIFEST
    if path.is_file():
        listed = json.loads(manifest_file.read_text())["sha256"] if manifest_file.is_file() else {}
        expected = listed.get(f"preferences/pairs_{split}.jsonl")
        if expected is None or hashlib.sha256(path.read_bytes()).hexdigest() == expected:
            return load_pairs(path)
    manifest = json.loads(manifest_file.read_text())
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
