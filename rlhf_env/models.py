"""Building tiny GPT-2-style models from config, loading any local causal LM safely, and deciding once how each
model runs (its backend).

Presets (parameter counts for the sentiment vocabulary of ~140 tokens):

* ``tiny``: d=128, 2 layers, 4 heads, ~0.42M parameters: the default task's π_SFT and reward-model trunk.
* ``small``: d=256, 3 layers, 4 heads, ~2.4M parameters.

Loading is local, safetensors-only and `trust_remote_code` stays off unless the caller asks for it: a directory that
holds only pickle weights (``pytorch_model.bin``) is refused, because unpickling runs arbitrary code; a checkpoint
whose weights do not match its config (missing or unexpected tensors: more or fewer layers than the config says) is
refused rather than completed with random weights (`check_loading_info`). Tokenizers load by the same rules
(`load_tokenizer`): a local folder only, no network, and no code from the folder (``auto_map``) unless asked.

Backends (`choose_backend`): ``"gpt2"`` runs a plain GPT-2 through `rlhf_env.decoding.gpt2` (transformers'
arithmetic with a fraction of its Python), ``"llama"`` decodes a plain Llama, Qwen2 or Mistral LM through
`rlhf_env.decoding.llama` (the same for that family; its training forward and reward-model scores stay on the
model's own forward), ``"hf"`` runs everything through the model's own ``forward``; ``"auto"`` picks a lean one
when it can. The choice is made once, when a model is attached to an env or a sampler, and recorded
(``env.unwrapped.world.backends``); a model not on ``"gpt2"`` is checked then (`check_decodable`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, DynamicLayer

from rlhf_env.decoding.gpt2 import is_plain_gpt2
from rlhf_env.decoding.llama import is_plain_llama

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


def check_loading_info(path: str | Path, info: dict, allowed_unexpected: tuple[str, ...] = ()) -> None:
    """Raise `ValueError` if transformers' loading report (``output_loading_info=True``) for `path` lists weights the
    model needed but the checkpoint lacks (they would be left at random), weights the checkpoint holds but the model
    has no place for (dropped silently; e.g. a config with fewer layers than the weights), or weights of the wrong
    shape. Tied weights (an ``lm_head`` tied to the input embeddings) are not reported by transformers, so a normal
    save of GPT-2, Llama or Qwen2 passes. Unexpected keys starting with one of `allowed_unexpected` pass (a causal
    LM's ``lm_head.`` when only its trunk is loaded)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(allowed_unexpected))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    problems = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for what, keys in
                (("missing from the weights (would be random)", missing),
                 ("in the weights but not in the config's model (would be dropped)", unexpected),
                 ("of the wrong shape", mismatched)) if keys]
    if problems:
        raise ValueError(f"{path}: the weights do not match config.json; " + "; ".join(problems))


def load_causal_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load a local causal LM (any architecture transformers knows) from safetensors, in eval mode.

    `ValueError` for a path that is not a local directory of safetensors weights (`check_safe_weights`) or whose
    weights do not match its config (`check_loading_info`)."""
    check_safe_weights(path)
    with quiet_loading():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype, output_loading_info=True,
            local_files_only=True,
        )
    check_loading_info(path, info)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in the local folder `path`: never from the network (``local_files_only``), and
    without running code from the folder unless `trust_remote_code` (a folder whose ``tokenizer_config.json`` or
    ``config.json`` names its own classes in ``auto_map`` is refused up front, so that transformers never stops to
    ask on stdin).

    `ValueError` for a path that is not an existing local directory (a Hub id such as ``"gpt2"`` included) or for
    an ``auto_map`` without `trust_remote_code`.
    """
    from transformers import AutoTokenizer

    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        raise ValueError(f"tokenizer {path!r} is not a local directory; rlhf-gym loads tokenizers from local folders "
                         "only (save one with tokenizer.save_pretrained(folder), or pass the tokenizer object)")
    path = Path(path)
    if not trust_remote_code:
        for name in ("tokenizer_config.json", "config.json"):
            file = path / name
            try:
                config = json.loads(file.read_text()) if file.is_file() else {}
            except (OSError, ValueError) as error:
                raise ValueError(f"{file} is not readable JSON: {error}") from error
            if isinstance(config, dict) and config.get("auto_map"):
                raise ValueError(f"{file} has an auto_map entry ({config['auto_map']}): loading this tokenizer runs "
                                 "code from the folder; pass trust_remote_code=True if you trust it")
    with quiet_loading():
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' per-file progress bars while loading or saving tiny models (they would flood every
    reset and checkpoint)."""
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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', ...; got {device!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch build sees no CUDA device (torch "
                         f"{torch.__version__}); use 'cpu' or 'auto'")
    return device


BACKENDS = ("auto", "gpt2", "llama", "hf")


class UnsupportedModel(ValueError):
    """A model the env cannot decode (`check_decodable`): its cache is not a stack of full-attention key/value layers
    (sliding-window attention, state-space models), or its config gives no context length."""


def choose_backend(model: torch.nn.Module, requested: str = "auto") -> str:
    """``"gpt2"``, ``"llama"`` or ``"hf"``: how `model` runs (module docstring). ``"auto"`` takes ``"gpt2"`` for a
    plain GPT-2 without dropout (`rlhf_env.decoding.gpt2.is_plain_gpt2`), ``"llama"`` for a plain Llama-family LM
    (`rlhf_env.decoding.llama.is_plain_llama`), else ``"hf"``; asking for a lean backend a model is not plain for
    raises `ValueError`. Decided from the model's modules and config, not from its mode or the call."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    lean = "gpt2" if is_plain_gpt2(model) else "llama" if is_plain_llama(model) else None
    if requested in ("gpt2", "llama") and lean != requested:
        runs = {"gpt2": "plain GPT-2 models without dropout",
                "llama": "plain Llama, Qwen2 and Mistral LMs (full attention, no dropout, no hooks or adapters)"}
        raise ValueError(f"backend={requested!r} runs {runs[requested]}; {type(model).__name__} is not one "
                         "(use 'hf' or 'auto')")
    return lean if lean and requested != "hf" else "hf"


# transformers' names (``config.layer_types``) for the layers the env can decode: full attention, and the
# feed-forward kinds some configs list alongside their attention layers. Any other kind (sliding_attention,
# chunked_attention, linear_attention: a state-space or linear-attention layer, hybrid, ...) keeps a cache the
# decoders cannot splice row by row.
DECODABLE_LAYER_TYPES = frozenset({"full_attention", "mlp", "moe", "dense", "sparse"})


@torch.no_grad()
def check_decodable(model: torch.nn.Module, name: str = "model") -> None:
    """Raise `UnsupportedModel` unless the env can decode `model` through its own forward: only full-attention
    layers in its ``config.layer_types`` (`DECODABLE_LAYER_TYPES`; read from the config, before any forward), a
    context length in its config, and a cache of full-attention layers whose keys and values grow by one column per
    token (what the decoders splice, compact and pad row by row: one two-token forward), when the model is
    attached."""
    config = getattr(model, "config", None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    other = sorted({str(kind) for kind in layer_types} - DECODABLE_LAYER_TYPES)
    if other:
        advice = ""
        if any("sliding" in kind for kind in other):  # config.sliding_window = None would make the forward fail
            advice = (" (a sliding window no shorter than prompt + response is full attention: build or load the "
                      f"model with config.layer_types = ['full_attention'] * {len(layer_types)})")
        raise UnsupportedModel(f"{name} ({type(model).__name__}): config.layer_types has {other} layers; the env "
                               f"decodes models whose attention layers are all full attention{advice}")
    if not isinstance(getattr(config, "max_position_embeddings", None), int):
        raise UnsupportedModel(f"{name} ({type(model).__name__}): its config has no max_position_embeddings, so the "
                               "env cannot size prompts and responses")
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
    layers = getattr(cache, "layers", None) if isinstance(cache, DynamicCache) else None
    kinds = sorted({type(layer).__name__ for layer in layers or []})
    if not layers or kinds != [DynamicLayer.__name__] or layers[0].keys.shape[2] != 2:
        raise UnsupportedModel(
            f"{name} ({type(model).__name__}) keeps a {type(cache).__name__} with {kinds or 'no'} layers; the env "
            "decodes models whose cache is full-attention key/value layers (a sliding window no shorter than "
            "prompt + response can be switched off: config.sliding_window = None where the config has no "
            "layer_types, as Mistral's)")
