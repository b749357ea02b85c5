"""Building tiny GPT-2-style models from config, and loading any local causal LM safely.

Presets (parameter counts for the sentiment vocabulary of ~140 tokens):

* ``tiny``: d=128, 2 layers, 4 heads, ~0.42M parameters: the default task's π_SFT and reward-model trunk.
* ``small``: d=256, 3 layers, 4 heads, ~2.4M parameters.

Loading is safetensors-only and `trust_remote_code` stays off unless the caller asks for it: a directory that
holds only pickle weights (``pytorch_model.bin``) is refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

PRESETS = {
    "tiny": dict(n_embd=128, n_layer=2, n_head=4),
    "small": dict(n_embd=256, n_layer=3, n_head=4),
}


def build_policy(
    tokenizer: PreTrainedTokenizerBase, preset: str = "tiny", n_positions: int = 64, seed: int = 0
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 causal LM sized by `preset`, with dropout off (RL needs deterministic passes)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def check_safe_weights(path: str | Path) -> None:
    """Raise `ValueError` unless `path` is a local directory whose weights are safetensors."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a local directory; rlhf-gym loads models from local paths only")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); refusing to unpickle them. "
                "Convert them once with `model.save_pretrained(dir, safe_serialization=True)` from code you trust."
            )
        raise ValueError(f"{path} holds no *.safetensors weights")


def load_causal_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load a local causal LM (any architecture transformers knows) from safetensors, in eval mode."""
    check_safe_weights(path)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    return model.to(device).eval()


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' per-file progress bars while loading tiny models (they would flood every reset)."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
