"""Helpers the agent tests share."""

import hashlib


def digest(module) -> str:
    """A hash of every tensor of `module`'s state dict (bit-exact comparisons of whole models)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def small_pairs(directory, n: int = 256, split: str = "train"):
    """The first `n` preference pairs of the shipped sentiment data, as a JSONL file in `directory`."""
    from pathlib import Path

    from rlhf_env.assets import asset_dir, load_preference_pairs
    from rlhf_env.jsonl import write_jsonl

    path = Path(directory) / f"pairs_{split}_{n}.jsonl"
    if not path.is_file():
        write_jsonl(path, load_preference_pairs(asset_dir("sentiment"), split)[:n])
    return str(path)
