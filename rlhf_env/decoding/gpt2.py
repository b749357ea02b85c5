"""A lean incremental forward for GPT-2 models: the math of transformers' `GPT2LMHeadModel`, a fraction of its Python.

At the sizes RL on a laptop uses (a few hundred thousand to a few million parameters), one decoding step of the
Hugging Face forward spends most of its time in Python: mask construction, output wrappers, cache bookkeeping.
`GPT2Stack` does the same arithmetic with the models' own parameters and a plain list of key/value tensors as
cache, for M models of one shape at once (the env's policy and reference: every matrix product is one batched
product over both, so a step costs one set of operations instead of two). Parameters are read live (an agent
training the policy in place is seen at the next step). It is the ``"gpt2"`` backend of
`rlhf_env.models.choose_backend`: the decoders step models with it, the reward model scores with it, and agents
train through `gpt2_response_forward` (the same blocks with autograd, the LM head on response columns only).
Log-probs match the Hugging Face forward to float rounding, and identical models stacked together give identical
bits (tested).

Legend: ``B`` rows, ``W`` positions fed in this call, ``L`` cached positions, ``H`` heads, ``D`` head width,
``E`` embedding width.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from rlhf_env.lm import position_ids, response_columns


class KVLayer:
    """One layer's keys and values, ``(B, H, L, D)`` each (the attribute names of transformers' cache layers).

    They are views of buffers with spare columns, so a decoding step `append`s its column in place instead of
    copying the whole cache (a `torch.cat` per layer per step cost ~12% of a decoding step). Assigning ``keys`` or
    ``values`` replaces that buffer (the decoder does so when it compacts or widens the cache).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self._keys_width]

    @keys.setter
    def keys(self, tensor: torch.Tensor) -> None:
        self._keys, self._keys_width = tensor, tensor.shape[2]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self._values_width]

    @values.setter
    def values(self, tensor: torch.Tensor) -> None:
        self._values, self._values_width = tensor, tensor.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``W`` columns after the cached ones; new buffers (with room for as many columns again) when full."""
        start, end = self._keys_width, self._keys_width + keys.shape[2]
        if self._values_width != start:
            raise RuntimeError(f"keys hold {start} columns but values {self._values_width}")
        if end > self._keys.shape[2]:
            room = max(end, 2 * start)
            old_keys, old_values = self.keys, self.values
            self._keys = old_keys.new_empty((*old_keys.shape[:2], room, old_keys.shape[3]))
            self._values = old_values.new_empty((*old_values.shape[:2], room, old_values.shape[3]))
            self._keys[:, :, :start], self._values[:, :, :start] = old_keys, old_values
        self._keys[:, :, start:end], self._values[:, :, start:end] = keys, values
        self._keys_width = self._values_width = end


def extended_layer(cache: KVCache | None, index: int, keys: torch.Tensor, values: torch.Tensor) -> KVLayer:
    """Layer `index` holding this call's ``keys`` and ``values (B, H, W, D)``: a new `KVLayer` without a cache, else
    the cache's own layer with them written after its cached columns, in place."""
    if cache is None:
        return KVLayer(keys, values)
    layer = cache.layers[index]
    layer.append(keys, values)
    return layer


class KVCache:
    """A list of `KVLayer`, duck-typed like transformers' `DynamicCache.layers`."""

    def __init__(self, layers: list[KVLayer]):
        self.layers = layers


def is_plain_gpt2(model: nn.Module) -> bool:
    """True for a plain GPT-2 (an LM, or a bare trunk such as a reward model's) without dropout: the architecture
    `GPT2Stack` implements. Plain means transformers' own modules and no hooks: a model with adapter layers swapped
    in (LoRA), a subclass, a compiled wrapper or a forward hook runs through its own ``forward``, since the lean path
    reads the parameters and would silently skip whatever those add. Read once, when a model is attached
    (`rlhf_env.models.choose_backend`); a hook added later is not seen."""
    config = getattr(model, "config", None)
    lm_or_trunk = hasattr(model, "transformer") and hasattr(model, "lm_head") or hasattr(model, "wte")
    if getattr(config, "model_type", None) != "gpt2" or not lm_or_trunk or not plain_modules(model):
        return False
    return (
        not (config.resid_pdrop or config.embd_pdrop or config.attn_pdrop)  # the lean path has no dropout
        and config.activation_function in _ACTIVATIONS
        and not config.add_cross_attention
        and not config.reorder_and_upcast_attn
    )


_PLAIN_MODULES = ("transformers.models.gpt2.", "transformers.pytorch_utils", "transformers.activations",
                  "torch.nn.modules.")


def plain_modules(model: nn.Module, modules: tuple[str, ...] = _PLAIN_MODULES) -> bool:
    """Every submodule comes from one of `modules` (default: transformers' GPT-2 building blocks and torch's layers)
    and no hook is registered."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return False
    return all(type(module).__module__.startswith(modules) and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
        for module in model.modules())


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu_new": _gelu_new, "gelu_pytorch_tanh": _gelu_new, "gelu": F.gelu, "relu": F.relu}


def gpt2_forward(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None) -> tuple[KVCache, torch.Tensor]:
    """Feed ``ids (B, W)`` after ``cache``; return the cache (``cache`` itself, extended in place, or a new one)
    and the logits at the last position ``(B, V)``.

    ``attention_mask (B, L + W)`` covers the cached and the new positions (0 = padding or a dead column);
    ``positions (B, W)`` are the new tokens' position ids. Padding positions attend to themselves only, so every
    value stays finite and masked columns can never leak NaN into a live row.
    """
    cache, logits = GPT2Stack([model]).forward(ids, attention_mask, positions, cache)
    return cache, logits[:, 0]


def gpt2_response_forward(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor,
                          query_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward of a GPT-2 LM over left-padded queries followed by right-padded responses, with
    autograd: the logits that predict each response token ``(B, T, V)`` and the final (layer-normed) hidden states
    of every column ``(B, P + T, E)`` (a value head reads them). The LM head runs on the response columns only."""
    stack = GPT2Stack([model], trainable=True)
    weights = stack.weights()
    hidden = stack._final_hidden(weights, ids, attention_mask)[0]  # (B, P + T, E)
    logits = torch.matmul(response_columns(hidden, query_width), weights["lm_head"][0])  # (B, T, V)
    return logits, hidden


def can_stack(models: list[nn.Module]) -> bool:
    """True when plain GPT-2 LMs (`is_plain_gpt2`) can run as one `GPT2Stack`: one shape, dtype and device and,
    when there are several, small enough that running them in one set of batched ops pays for a stacked copy of
    their weights (a single model's weights are used in place)."""
    shape = [(m.config.n_embd, m.config.n_layer, m.config.n_head, m.config.vocab_size, m.config.n_positions,
              m.config.activation_function, m.config.layer_norm_epsilon, m.config.scale_attn_weights,
              m.config.scale_attn_by_inverse_layer_idx, m.lm_head.weight.dtype, m.lm_head.weight.device)
             for m in models]
    size = sum(p.numel() for m in models for p in m.parameters())
    return all(s == shape[0] for s in shape) and (len(models) == 1 or size <= STACK_MAX_PARAMETERS)


# Below this many parameters (all models together) a decoding step is dominated by per-operation overhead, so M
# models in one set of batched matrix products cost little more than one; above it the stacked copy's memory is
# not worth it (benchmarks.speed measured 0.77 ms for policy + reference stacked vs 1.13 ms apart, 0.5M each).
STACK_MAX_PARAMETERS = 20_000_000


class ModelStack:
    """What the lean stacks share: M models of one shape whose parameters are read live and, for several models,
    stacked into one copy (matrices ``(M, in, out)``, vectors ``(M, 1, n)``) that is rebuilt whenever any parameter
    is modified in place (an optimizer step on the live policy is seen at the next forward). A wrapper that swaps the
    parameter objects themselves (FSDP registers its gathered parameters in place of the shards) is seen after
    `refresh`, which the decoder calls whenever every row starts afresh. Subclasses say which parameters (`_stack`)
    and how a forward uses them."""

    def __init__(self, models: list[nn.Module], trainable: bool = False):
        if trainable and len(models) != 1:
            raise ValueError("a trainable stack runs one model (gradients reach its own parameters)")
        self.models, self.trainable = list(models), trainable
        self.refresh()

    def refresh(self) -> None:
        """Read the models' parameter objects again and restack at the next forward (between in-place changes the
        stamp in `weights` notices, a wrapper may replace them; the old ones are no longer held either)."""
        self._parameters = [p for m in self.models for p in m.parameters()]
        self._stamp, self._weights = None, None

    def weights(self) -> dict:
        """The stacked parameters (`_stack`). A trainable stack's are views of the live parameters, taken afresh at
        every call (autograd reaches the parameters)."""
        if self.trainable:
            return self._stack()
        stamp = tuple((p.data_ptr(), p._version) for p in self._parameters)
        if stamp != self._stamp:
            self._weights, self._stamp = self._stack(), stamp
        return self._weights

    def _stacked(self, path: str, vector: bool = False) -> torch.Tensor:
        """Parameter `path` of every model, ``(M, *shape)`` (``(M, 1, n)`` for a `vector`); one model's is a view."""
        tensors = [m.get_parameter(path) if self.trainable else m.get_parameter(path).detach() for m in self.models]
        weight = tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)
        return weight[:, None] if vector else weight

    def _stack(self) -> dict:
        raise NotImplementedError


class GPT2Stack(ModelStack):
    """M GPT-2 models of one shape run side by side: every matrix product is one batched product over the models.

    A single model's parameters are used as views (no copy); several models' are stacked (`ModelStack`). Keys and
    values of model m live in heads ``m·H … (m+1)·H − 1`` of the cache, so the cache has the layout of a single
    model with M·H heads and row-wise bookkeeping works unchanged.
    """

    def __init__(self, models: list[nn.Module], trainable: bool = False):
        # The values the forward reads, as plain attributes (a transformers config's attribute access costs ~1 µs).
        self.config = SimpleNamespace(**{key: getattr(models[0].config, key) for key in (
            "n_embd", "n_layer", "n_head", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx")})
        # A GPT2LMHeadModel keeps its trunk under "transformer."; a bare GPT2Model (a reward model's trunk) is one.
        self._trunk = "transformer." if hasattr(models[0], "transformer") else ""
        super().__init__(models, trainable)

    def _stack(self) -> dict:
        stacked = self._stacked

        def affine(prefix: str, matrix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
            return stacked(f"{prefix}.weight", vector=not matrix), stacked(f"{prefix}.bias", vector=True)

        trunk = self._trunk
        layers = [{name: affine(f"{trunk}h.{i}.{module}", matrix=name.startswith("c_") or name == "mlp_proj")
                   for name, module in [("ln_1", "ln_1"), ("c_attn", "attn.c_attn"), ("c_proj", "attn.c_proj"),
                                        ("ln_2", "ln_2"), ("c_fc", "mlp.c_fc"), ("mlp_proj", "mlp.c_proj")]}
                  for i in range(self.config.n_layer)]
        weights = {"wte": stacked(f"{trunk}wte.weight"), "wpe": stacked(f"{trunk}wpe.weight"),
                   "ln_f": affine(f"{trunk}ln_f", matrix=False), "layers": layers}
        if trunk:
            weights["lm_head"] = stacked("lm_head.weight").transpose(1, 2)  # (M, E, V)
        return weights

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None) -> tuple[KVCache, torch.Tensor]:
        """`gpt2_forward` for every model at once: the cache (extended in place) and the last position's logits
        ``(B, M, V)``."""
        w = self.weights()
        last = None if ids.shape[1] == 1 else torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
        cache, x = self._blocks(w, ids, attention_mask, positions, cache, last)  # x: (M, B, 1, E)
        logits = torch.bmm(_layer_norm(x[:, :, -1], *w["ln_f"], self.config.layer_norm_epsilon), w["lm_head"])
        return cache, logits.transpose(0, 1)  # (B, M, V)

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor,
                      columns: torch.Tensor | None = None) -> torch.Tensor:
        """The final (layer-normed) hidden states of every position ``(M, B, W, E)`` of left- or right-padded
        sequences, as transformers' ``last_hidden_state``; with ``columns (B,)`` only each row's column there,
        ``(M, B, 1, E)`` (a reward model reads the last real token: the last block then runs on it alone)."""
        return self._final_hidden(self.weights(), ids, attention_mask, columns)

    def _final_hidden(self, w: dict, ids: torch.Tensor, attention_mask: torch.Tensor,
                      columns: torch.Tensor | None = None) -> torch.Tensor:
        _, x = self._blocks(w, ids, attention_mask, position_ids(attention_mask), None, columns)
        models, batch, width, embed = x.shape
        normed = _layer_norm(x.reshape(models, batch * width, embed), *w["ln_f"],
                             self.config.layer_norm_epsilon)
        return normed.view(x.shape)

    def _blocks(self, w: dict, ids, attention_mask, positions, cache,
                columns: torch.Tensor | None = None) -> tuple[KVCache, torch.Tensor]:
        """The transformer blocks: the cache (extended in place) and the residual stream ``(M, B, W, E)`` before
        the final norm. With ``columns (B,)`` the caller reads one column per row: the last block computes keys
        and values for every column but the rest (a quarter of its work) for that column only: ``(M, B, 1, E)``."""
        config, models = self.config, len(self.models)
        heads, (batch, width), embed = config.n_head, ids.shape, config.n_embd
        head_dim = embed // heads
        act = _ACTIVATIONS[config.activation_function]
        past = 0 if cache is None else cache.layers[0].keys.shape[2]
        # Whole sequences of one model (the training forward, a reward model's scores): no stacked twin whose
        # heads must round alike, so attention runs in torch's fused kernel (no (B, H, W, W) score tensor).
        fused = cache is None and models == 1 and width > 1
        hidden = hidden_keys(attention_mask, width, past)  # (B, 1, W, L + W)
        scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
        x = (_embed(w["wte"], ids) + _embed(w["wpe"], positions)).view(models, batch * width, embed)  # (M, B·W, E)
        layers = []
        for index, layer in enumerate(w["layers"]):
            qkv = torch.baddbmm(layer["c_attn"][1], _layer_norm(x, *layer["ln_1"], config.layer_norm_epsilon),
                                layer["c_attn"][0])  # (M, B·W, 3E)
            # (M, B·W, E) -> (B, M·H, W, D): the models' heads side by side.
            q, k, v = (t.view(models, batch, width, heads, head_dim).permute(1, 0, 3, 2, 4)
                       .reshape(batch, models * heads, width, head_dim) for t in qkv.split(embed, 2))
            layers.append(extended_layer(cache, index, k, v))
            k, v = layers[-1].keys, layers[-1].values
            if columns is not None and index == len(w["layers"]) - 1:  # only `columns` go on from here
                rows = torch.arange(batch, device=ids.device)
                q, hidden = q[rows, :, columns][:, :, None], hidden[rows, :, columns][:, :, None]
                x = x.view(models, batch, width, embed)[:, rows, columns]  # (M, B, E)
                width = 1
            layer_scale = scale / (index + 1) if config.scale_attn_by_inverse_layer_idx else scale
            if fused:  # one model, whole sequences: the fused kernel (3x faster forward and backward at 273 columns)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=~hidden, scale=layer_scale)
            else:
                # Written out rather than F.scaled_dot_product_attention: its CPU kernel can round a head
                # differently depending on the thread it lands on, and identical stacked models must give identical
                # log-probs (KL = 0); a decoding step's one query column gains nothing from it either.
                scores = torch.matmul(q, k.transpose(2, 3)).mul_(layer_scale).masked_fill_(hidden, float("-inf"))
                y = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)  # (B, M·H, W, D)
            y = y.view(batch, models, heads, width, head_dim).permute(1, 0, 3, 2, 4).reshape(x.shape)
            x = x + torch.baddbmm(layer["c_proj"][1], y, layer["c_proj"][0])
            h = _layer_norm(x, *layer["ln_2"], config.layer_norm_epsilon)
            x = x + torch.baddbmm(layer["mlp_proj"][1], act(torch.baddbmm(layer["c_fc"][1], h, layer["c_fc"][0])),
                                  layer["mlp_proj"][0])
        return KVCache(layers), x.view(models, batch, width, embed)


def hidden_keys(attention_mask: torch.Tensor, width: int, past: int) -> torch.Tensor:
    """``(B, 1, W, L + W)`` booleans for `width` new queries after `past` cached columns: key j is hidden from query i
    when it is dead (``attention_mask (B, L + W)`` is 0) or in i's future; a query always sees itself (a padding
    column too, so that no row of scores is all −inf)."""
    keys_dead = attention_mask[:, None, None, :] == 0
    if width == 1:  # one decoding step: no future columns
        hidden = keys_dead.clone()
        hidden[..., -1] = False
        return hidden
    query_index = torch.arange(width, device=attention_mask.device)[:, None] + past
    key_index = torch.arange(past + width, device=attention_mask.device)[None, :]
    return (keys_dead | (key_index > query_index)) & (key_index != query_index)


def _embed(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of per-model tables ``(M, N, E)`` for ids ``(B, W)``: ``(M, B, W, E)``. One model's lookup is
    `F.embedding` (its backward is a dense scatter, not the advanced-indexing one: 15× faster when training)."""
    return F.embedding(ids, table[0])[None] if table.shape[0] == 1 else table[:, ids]


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm of ``(M, N, E)`` with per-model ``weight, bias (M, 1, E)`` (the same ops for any M, so a model
    computes the same bits alone and stacked)."""
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=eps), weight)
