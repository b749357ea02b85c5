"""A lean incremental forward for Llama-family decoders (Llama, Qwen2, Mistral): the math of transformers'
``LlamaForCausalLM`` (and its Qwen2 and Mistral twins) for decoding, a fraction of its Python.

The ``"llama"`` backend of `rlhf_env.models.choose_backend`: the env's decoder (and the sampler) step plain
Llama-family LMs with `LlamaStack`, as `rlhf_env.decoding.gpt2.GPT2Stack` does for GPT-2, with the policy and the
reference of one shape stacked into one set of batched products. Agents train, and reward models score, through the
model's own forward; log-probs match it to float rounding and identical stacked models give identical bits
(tested).

What it implements (Touvron et al. 2023, "LLaMA", §2.2; the transformers implementation): pre-norm blocks with
RMSNorm, rotary position embeddings (computed by the model's own rotary module, so every RoPE variant the model
was built with applies), grouped-query attention (a key/value head serves ``H / KVH`` query heads: the queries of
a group attend together, no repeated keys), a SwiGLU MLP, optional q/k/v/o biases (Qwen2), tied or separate LM
head.

Legend as in `rlhf_env.decoding.gpt2`: ``B`` rows, ``W`` positions fed in this call, ``L`` cached positions, ``H``
query heads, ``KVH`` key/value heads, ``G = H / KVH``, ``D`` head width, ``E`` hidden width, ``M`` models.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_env.decoding.gpt2 import STACK_MAX_PARAMETERS, KVCache, ModelStack, extended_layer, hidden_keys, plain_modules

LLAMA_FAMILY = {"llama": "transformers.models.llama.", "qwen2": "transformers.models.qwen2.",
                "mistral": "transformers.models.mistral."}


def is_plain_llama(model: nn.Module) -> bool:
    """True for a Llama-family causal LM (`LLAMA_FAMILY`) that `LlamaStack` computes exactly: transformers' own
    modules and no hooks (a LoRA-wrapped or hooked model runs through its own forward), no dropout, SiLU MLP, no MLP
    bias, full attention in every layer (no sliding window), a rotary module. Read once, when a model is attached."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY or not hasattr(model, "lm_head") or not hasattr(model, "model"):
        return False
    if not plain_modules(model, (LLAMA_FAMILY[model_type], "transformers.activations", "torch.nn.modules.")):
        return False
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) is not None and (
        model_type == "mistral" or getattr(config, "use_sliding_window", False))
    return (
        layer_types == {"full_attention"} and not sliding
        and not getattr(config, "attention_dropout", 0.0)
        and config.hidden_act == "silu"
        and not getattr(config, "mlp_bias", False)
        and hasattr(model.model, "rotary_emb")
    )


def can_stack_llama(models: list[nn.Module]) -> bool:
    """True when plain Llama-family LMs can run as one `LlamaStack`: one architecture, shape, RoPE, dtype and
    device, and (for several) small enough that a stacked copy of their weights pays (`STACK_MAX_PARAMETERS`)."""
    def shape(m: nn.Module) -> tuple:
        c = m.config
        return (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                _head_dim(c), c.intermediate_size, c.vocab_size, c.rms_norm_eps, repr(c.rope_parameters),
                m.lm_head.weight.dtype, m.lm_head.weight.device,
                tuple(n for n, _ in m.named_parameters()))  # the same biases and ties

    first = models[0].model.rotary_emb
    same_rope = all(torch.equal(m.model.rotary_emb.inv_freq, first.inv_freq)
                    and m.model.rotary_emb.attention_scaling == first.attention_scaling for m in models)
    size = sum(p.numel() for m in models for p in m.parameters())
    return (all(shape(m) == shape(models[0]) for m in models) and same_rope
            and (len(models) == 1 or size <= STACK_MAX_PARAMETERS))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaStack(ModelStack):
    """M Llama-family LMs of one shape decoded side by side (`ModelStack`: parameters read live; several models'
    stacked and restacked after any in-place change). q, k and v are one product (their weights side by side), as
    are the MLP's gate and up projections. Keys (after RoPE) and values of model m live in heads
    ``m·KVH … (m+1)·KVH − 1`` of the cache (`KVLayer`, ``(B, M·KVH, L, D)``), so the decoder's row bookkeeping works
    unchanged. Decoding only: no autograd."""

    def __init__(self, models: list[nn.Module]):
        c = models[0].config
        self.config = SimpleNamespace(layers=c.num_hidden_layers, heads=c.num_attention_heads,
                                      kv_heads=c.num_key_value_heads, head_dim=_head_dim(c), eps=c.rms_norm_eps)
        self._rotary = models[0].model.rotary_emb
        super().__init__(models)

    def _stack(self) -> dict:
        stacked = self._stacked
        # Projections that read the same input (q, k, v; gate, up) run as one product over a copy of their weights
        # side by side when the models are stacked anyway or small; a large single model's are used in place (views,
        # one product each): a copy would double its memory and be remade after every optimizer step.
        fuse = len(self.models) > 1 or sum(p.numel() for p in self._parameters) <= STACK_MAX_PARAMETERS

        def linear(paths: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            """``x @ W.T + b`` of the named linears as ``(weight (M, in, out), bias (M, 1, out) or None)`` pairs: one
            pair for all of them side by side (`fuse`, a copy), else one per linear (views)."""
            modules = [self.models[0].get_submodule(p) for p in paths]
            if not fuse:
                return [(stacked(f"{p}.weight").transpose(1, 2), stacked(f"{p}.bias", vector=True)
                         if m.bias is not None else None) for p, m in zip(paths, modules)]
            weight = torch.cat([stacked(f"{p}.weight") for p in paths], dim=1).transpose(1, 2).contiguous()
            if all(m.bias is None for m in modules):
                return [(weight, None)]
            biases = [stacked(f"{p}.bias", vector=True) if m.bias is not None
                      else weight.new_zeros((len(self.models), 1, m.out_features)) for p, m in zip(paths, modules)]
            return [(weight, torch.cat(biases, dim=2))]

        layers = []
        for i in range(self.config.layers):
            prefix = f"model.layers.{i}"
            layers.append({
                "input_norm": stacked(f"{prefix}.input_layernorm.weight", vector=True),
                "qkv": linear([f"{prefix}.self_attn.{name}_proj" for name in "qkv"]),
                "o": linear([f"{prefix}.self_attn.o_proj"]),
                "post_norm": stacked(f"{prefix}.post_attention_layernorm.weight", vector=True),
                "gate_up": linear([f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"]),
                "down": linear([f"{prefix}.mlp.down_proj"]),
            })
        return {"embed": stacked("model.embed_tokens.weight"), "norm": stacked("model.norm.weight", vector=True),
                "lm_head": stacked("lm_head.weight").transpose(1, 2), "layers": layers}  # lm_head (M, E, V)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None) -> tuple[KVCache, torch.Tensor]:
        """Feed ``ids (B, W)`` at ``positions (B, W)`` after ``cache`` (``attention_mask (B, L + W)``, 0 = dead);
        return the cache (extended in place, or a new one) and every model's logits at the last position
        ``(B, M, V)``."""
        config, w, models = self.config, self.weights(), len(self.models)
        (batch, width), heads, kv_heads, head_dim = ids.shape, config.heads, config.kv_heads, config.head_dim
        groups = heads // kv_heads
        past = 0 if cache is None else cache.layers[0].keys.shape[2]
        hidden = hidden_keys(attention_mask, width, past)  # (B, 1, W, L + W)
        if groups > 1:  # the queries of a group sit side by side: (B, 1, G·W, L + W)
            hidden = hidden[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * width, -1)
        x = _embed(w["embed"], ids)  # (M, B·W, E)
        cos, sin = (t[:, None] for t in self._rotary(x, positions))  # (B, 1, W, D)
        scale = head_dim ** -0.5
        layers = []
        for index, layer in enumerate(w["layers"]):
            qkv = _project(_rms_norm(x, layer["input_norm"], config.eps), layer["qkv"])  # (M, B·W, (H + 2KVH)·D)
            q, k, v = (t.view(models, batch, width, -1, head_dim).permute(1, 0, 3, 2, 4)
                       .reshape(batch, -1, width, head_dim)
                       for t in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=2))
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # q (B, M·H, W, D), k and v (B, M·KVH, W, D)
            layers.append(extended_layer(cache, index, k, v))
            k, v = layers[-1].keys, layers[-1].values
            q = q.reshape(batch, models * kv_heads, groups * width, head_dim)  # a key/value head's queries together
            # Written out, as in GPT2Stack: identical stacked models must round alike (KL = 0).
            scores = torch.matmul(q, k.transpose(2, 3)).mul_(scale).masked_fill_(hidden, float("-inf"))
            y = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)  # (B, M·KVH, G·W, D)
            y = y.view(batch, models, heads, width, head_dim).permute(1, 0, 3, 2, 4).reshape(models, batch * width, -1)
            x = x + _project(y, layer["o"])
            gate, up = _project(_rms_norm(x, layer["post_norm"], config.eps), layer["gate_up"]).chunk(2, dim=2)
            x = x + _project(F.silu(gate) * up, layer["down"])
        last = x.view(models, batch, width, -1)[:, :, -1]  # (M, B, E)
        logits = torch.bmm(_rms_norm(last, w["norm"], config.eps), w["lm_head"])  # (M, B, V)
        return KVCache(layers), logits.transpose(0, 1)


def _embed(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of per-model tables ``(M, N, E)`` for ids ``(B, W)``: ``(M, B·W, E)``."""
    rows = F.embedding(ids, table[0])[None] if table.shape[0] == 1 else table[:, ids]
    return rows.reshape(table.shape[0], -1, table.shape[2])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, N, in) @ weight (M, in, out) (+ bias (M, 1, out))``."""
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)


def _project(x: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """The outputs of `linear`'s pairs side by side, ``(M, N, Σ out)``."""
    outputs = [_linear(x, weight, bias) for weight, bias in pairs]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` on ``(M, N, E)`` with per-model ``weight (M, 1, E)``: in fp32, back to x's
    dtype before the weight."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021) as transformers applies it: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
