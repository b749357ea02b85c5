"""LoRA policies (the optional extra ``pip install "rlhf-gym[lora]"``, which installs `peft`): π trains only its
adapter weights and π_ref is the same base with the adapters disabled, so the base weights exist once in memory.

Two ways in, both on the env (`rlhf_env.world.RLHFWorld`):

* ``policy=peft_model``: a `peft.PeftModel` with one LoRA adapter;
* ``lora=LoraConfig(...)``: the env wraps its policy (the task's π_SFT, or ``policy=``) with `get_peft_model`; the
  adapters are initialised from seed 0 (the global torch RNG is left as it was), so two envs built alike start
  alike.

Without ``reference=``, the reference is `AdaptersOff` over the policy: the policy's own base modules run with the
adapters switched off (peft's ``disable_adapter()``), through its own forward and KV cache. Its parameters and
state dict are the base weights under the base model's own names, so a checkpoint's reference digest is that of
the base model, and stays the same while the adapters train. An explicit ``reference=`` is used as given (the base
is then not shared).

peft is imported only here, and only when a LoRA policy is asked for: the library imports and runs without it.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

INSTALL_HINT = 'pip install "rlhf-gym[lora]"'
# Initialisations that leave the base weights untouched: with the adapters off, the model is the base model.
# (PiSSA, OLoRA, LoftQ, EVA, CorDA ... rewrite the base weights, so the "base" would no longer be π_SFT.)
BASE_PRESERVING_INITS = (True, False, "gaussian")
# The adapter settings that decide what a checkpoint's adapter weights compute (compared when one is loaded).
ADAPTER_SETTINGS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "lora_bias",
                    "target_modules", "exclude_modules", "target_parameters", "layers_to_transform", "layers_pattern",
                    "rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices")


def require_peft():
    """The `peft` module, or an `ImportError` that says how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"LoRA policies need the optional dependency peft: {INSTALL_HINT}") from error
    return peft


def is_peft_model(model) -> bool:
    """True for a `peft.PeftModel` (False without importing peft when it is not imported: then none can exist)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_lora_config(config) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(config, peft.LoraConfig)


def adapter_config(model):
    """The config of the one adapter of a PEFT policy."""
    return model.peft_config[model.active_adapter]


def check_lora_policy(model, derived_reference: bool) -> None:
    """`ValueError` unless `model` is a PEFT model the env can train and, when the reference is derived from it
    (``derived_reference``: no ``reference=``), whose base with the adapters off is the model it started from."""
    if len(model.peft_config) != 1:
        raise ValueError(f"the policy holds {len(model.peft_config)} adapters ({sorted(model.peft_config)}); the env "
                         "trains one LoRA adapter")
    config = adapter_config(model)
    if str(config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise ValueError(f"the policy's adapter is {config.peft_type}; the env supports LoRA adapters (LoraConfig)")
    if any(getattr(module, "merged", False) for module in model.modules()):
        raise ValueError("the policy's LoRA adapter is merged into the base weights: unmerge it (model.unmerge_adapter"
                         "()) so that the adapters can be switched off for the reference")
    if not derived_reference:
        return
    if config.bias != "none":
        raise ValueError(f"LoraConfig(bias={config.bias!r}) trains the base's biases, so the base with the adapters "
                         "off is no longer the reference: use bias='none', or pass reference= explicitly")
    if config.init_lora_weights not in BASE_PRESERVING_INITS:
        raise ValueError(f"LoraConfig(init_lora_weights={config.init_lora_weights!r}) rewrites the base weights, so "
                         "the base with the adapters off is not the model you started from: use True or 'gaussian', "
                         "or pass reference= explicitly")


def wrap_policy(model: nn.Module, config) -> nn.Module:
    """`model` with the LoRA adapter of `config` injected in place (`peft.get_peft_model`), the adapters initialised
    from seed 0 without touching the global RNG."""
    peft = require_peft()
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"lora= takes a peft.LoraConfig, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model (a
        # FutureWarning from transformers 5.24 on); nothing here depends on it.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config)


def _adapter_prefix(model) -> str:
    return getattr(model.base_model, "prefix", "lora_")


def base_name(name: str) -> str:
    """A parameter's name in the base model, from its name inside a PEFT-injected one (``c_attn.base_layer.weight``
    -> ``c_attn.weight``; a module kept whole by ``modules_to_save``: its original copy)."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


class AdaptersOff(nn.Module):
    """π_ref as the base of a PEFT policy: the policy's own modules with its adapters switched off.

    Nothing is copied: its parameters are the policy's base parameters (the same tensors), listed and saved under
    the base model's own names (``state_dict()`` equals that of the model before the adapters were injected). The
    policy is held outside the module tree, so ``parameters()``, ``state_dict()`` and ``train()`` see only the
    base.

    A forward runs the base model's own forward with every adapter layer switched off, as peft's
    ``disable_adapter()`` does (``enable_adapters(False)`` on each tuner layer, then back on), over the layers found
    when the reference was made; it leaves each layer's switch and each adapter weight's ``requires_grad`` as it
    found them (peft's switch resets them). peft's own context manager also walks the whole model to check its
    status: 7 ms per call on a 24-layer model, against 1 ms for this switch.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        object.__setattr__(self, "policy", policy)  # not a submodule: the adapters are not the reference's
        prefix = _adapter_prefix(policy)
        base = policy.get_base_model()
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_prefix", prefix)
        # what peft's disable_adapter() switches (`BaseTuner._enable_adapter_layers`), found once
        object.__setattr__(self, "_switches", [m for m in base.modules()
                                               if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))])
        object.__setattr__(self, "_adapter_params", [p for name, p in policy.named_parameters() if prefix in name])

    def _is_adapter(self, name: str) -> bool:
        return self._prefix in name or ".modules_to_save." in name

    @property
    def config(self):
        return self._base.config

    def get_input_embeddings(self):
        return self._base.get_input_embeddings()

    def get_output_embeddings(self):
        return self._base.get_output_embeddings()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self._base.named_parameters(remove_duplicate=remove_duplicate):
            if not self._is_adapter(name):
                yield prefix + ("." if prefix else "") + base_name(name), p

    def state_dict(self, *args, **kwargs):
        return {base_name(name): tensor for name, tensor in self._base.state_dict().items()
                if not self._is_adapter(name)}

    def forward(self, *args, **kwargs):
        flags = [p.requires_grad for p in self._adapter_params]
        switched = [m for m in self._switches if not m.disable_adapters]
        try:
            for module in switched:
                module.enable_adapters(False)
            return self._base(*args, **kwargs)
        finally:
            for module in switched:
                module.enable_adapters(True)
            for p, flag in zip(self._adapter_params, flags):
                p.requires_grad_(flag)

    def extra_repr(self) -> str:
        return f"{type(self._base).__name__} of a PEFT policy, adapters off"


def adapter_settings(model) -> dict:
    """What a checkpoint records of a PEFT policy's adapter: the `ADAPTER_SETTINGS` of its config, as JSON."""
    config = adapter_config(model).to_dict()
    out = {}
    for key in ADAPTER_SETTINGS:
        value = config.get(key)
        if isinstance(value, (set, frozenset, list, tuple)):
            value = sorted(str(v) for v in value)
        elif isinstance(value, dict):
            value = {str(k): v for k, v in sorted(value.items())}
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's weights of a PEFT policy, under PEFT's saved names (what ``adapter_model.safetensors`` holds)."""
    peft = require_peft()
    return peft.get_peft_model_state_dict(model, adapter_name=model.active_adapter)


@torch.no_grad()
def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Write adapter weights (PEFT's saved names, checked beforehand) into a PEFT policy."""
    peft = require_peft()
    result = peft.set_peft_model_state_dict(model, state, adapter_name=model.active_adapter)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"adapter weights were not written: {unexpected[:3]}")
