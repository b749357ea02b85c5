"""Training state on disk: safetensors for every tensor, JSON for everything else (never pickle).

An agent's checkpoint directory holds the policy (`save_pretrained`, safetensors), the agent's own tensors, and
``training_state.safetensors`` + ``training_state.json``: optimizer moments, RNG states, KL controller, counters
and config, everything needed to continue a run exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "training_state.safetensors"
STATE_FILE = "training_state.json"


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                        generator: torch.Generator, state: dict) -> None:
    """Write the optimizer, the numpy and torch RNG states and `state` (JSON-serialisable) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    optim = optimizer.state_dict()
    tensors = {"rng/torch_generator": generator.get_state()}
    for index, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer/{index}/{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / TENSORS_FILE)
    meta = dict(state, optimizer_param_groups=optim["param_groups"], numpy_rng=rng.bit_generator.state)
    (directory / STATE_FILE).write_text(json.dumps(meta, indent=2))


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                        generator: torch.Generator) -> dict:
    """Restore what `save_training_state` wrote (in place) and return the JSON `state`."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
        raise ValueError(f"{directory} is not a checkpoint (no {STATE_FILE} / {TENSORS_FILE})")
    meta = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(directory / TENSORS_FILE)
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/")
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta.pop("optimizer_param_groups")})
    generator.set_state(tensors["rng/torch_generator"])
    rng.bit_generator.state = meta.pop("numpy_rng")
    return meta
