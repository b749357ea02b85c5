"""A lean incremental forward for GPT-2 models: the math of transformers' `GPT2LMHeadModel`, a fraction of its Python.

At the sizes RL on a laptop uses (a few hundred thousand to a few million parameters), one decoding step of the
Hugging Face forward spends most of its time in Python: mask construction, output wrappers, cache bookkeeping.
`gpt2_forward` does the same arithmetic with the model's own parameter tensors (read live, so an agent training
the policy in place is seen at the next step) and a plain list of key/value tensors as cache. It is used by the
env's decoders whenever the model is a GPT-2 in eval mode; any other model goes through its own ``forward``.
Its next-token log-probs match the Hugging Face forward to float rounding (tested).

Legend: ``B`` rows, ``W`` positions fed in this call, ``L`` cached positions, ``H`` heads, ``D`` head width,
``E`` embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVLayer:
    """One layer's keys and values, ``(B, H, L, D)`` each (the attribute names of transformers' cache layers)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class KVCache:
    """A list of `KVLayer`, duck-typed like transformers' `DynamicCache.layers`."""

    def __init__(self, layers: list[KVLayer]):
        self.layers = layers


def supports_lean_forward(model: nn.Module) -> bool:
    """True for a plain GPT-2 LM (the architecture `gpt2_forward` implements) with no dropout active."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
        return False
    dropout = config.resid_pdrop or config.embd_pdrop or config.attn_pdrop
    return (
        (not model.training or not dropout)
        and config.activation_function in _ACTIVATIONS
        and not config.add_cross_attention
        and not config.reorder_and_upcast_attn
    )


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu_new": _gelu_new, "gelu_pytorch_tanh": _gelu_new, "gelu": F.gelu, "relu": F.relu}


def gpt2_forward(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None) -> tuple[KVCache, torch.Tensor]:
    """Feed ``ids (B, W)`` after ``cache``; return the new cache and the logits at the last position ``(B, V)``.

    ``attention_mask (B, L + W)`` covers the cached and the new positions (0 = padding or a dead column);
    ``positions (B, W)`` are the new tokens' position ids. Padding positions attend to themselves only, so every
    value stays finite and masked columns can never leak NaN into a live row.
    """
    config, transformer = model.config, model.transformer
    heads, width = config.n_head, ids.shape[1]
    head_dim = config.n_embd // heads
    act = _ACTIVATIONS[config.activation_function]
    past = 0 if cache is None else cache.layers[0].keys.shape[2]
    # (B, 1, W, L + W): key j is visible to query i when it is live and not in i's future.
    keys_live = attention_mask.bool()[:, None, None, :]
    query_index = torch.arange(width, device=ids.device)[:, None] + past
    key_index = torch.arange(past + width, device=ids.device)[None, :]
    visible = keys_live & (key_index <= query_index) | (key_index == query_index)
    scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
    x = transformer.wte(ids) + transformer.wpe(positions)  # (B, W, E)
    layers = []
    for index, block in enumerate(transformer.h):
        attn = block.attn
        qkv = F.linear(F.layer_norm(x, block.ln_1.normalized_shape, block.ln_1.weight, block.ln_1.bias,
                                    block.ln_1.eps), attn.c_attn.weight.T, attn.c_attn.bias)
        q, k, v = (t.view(t.shape[0], width, heads, head_dim).transpose(1, 2) for t in qkv.split(config.n_embd, 2))
        if cache is not None:
            k = torch.cat([cache.layers[index].keys, k], dim=2)
            v = torch.cat([cache.layers[index].values, v], dim=2)
        layers.append(KVLayer(k, v))
        layer_scale = scale / (index + 1) if config.scale_attn_by_inverse_layer_idx else scale
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=layer_scale)  # (B, H, W, D)
        y = y.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(y, attn.c_proj.weight.T, attn.c_proj.bias)
        mlp = block.mlp
        h = F.layer_norm(x, block.ln_2.normalized_shape, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        x = x + F.linear(act(F.linear(h, mlp.c_fc.weight.T, mlp.c_fc.bias)), mlp.c_proj.weight.T, mlp.c_proj.bias)
    last = transformer.ln_f(x[:, -1])  # (B, E)
    return KVCache(layers), model.lm_head(last)
