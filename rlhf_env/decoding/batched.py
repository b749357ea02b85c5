"""The batched KV-cache decoder under both environments and the sampler: M models stepped over B rows together.

Legend: ``B`` rows (episodes running side by side), ``L`` cached columns, ``W`` columns fed in one call,
``V`` vocabulary.

Rows start and end at different times. Every call feeds each row either its action token (the row goes on), its
new query (the row restarts: its old columns are masked out), or nothing (the row just ended and waits). The
going-on rows are decoded in one forward (one new column); restarting rows are prefilled together in a second
forward and written over their own dead columns, so each token passes through each model once. The cache grows by
a column a step; when it holds more than ``compact_at`` columns, each row's live columns are gathered to the right
of a narrower cache (no forward pass: keys and values already carry their positions).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_env.decoding.gpt2 import GPT2Stack, ModelStack, can_stack
from rlhf_env.decoding.llama import LlamaStack, can_stack_llama
from rlhf_env.lm import pad_left, position_ids


class BatchedDecoder:
    """M causal LMs (the policy and the reference) stepped over B rows with a shared mask; returns next-token
    log-probs ``(B, M, V)`` in fp32.

    ``backends[m]`` (``"gpt2"``, ``"llama"`` or ``"hf"``, decided by `rlhf_env.models.choose_backend` when the
    models were attached) says how model m runs; the runners are built here, once: GPT-2s of one small shape as one
    `GPT2Stack` (every model in each batched product), Llama-family LMs of one shape as one `LlamaStack`, other
    lean models each on their lean path, ``"hf"`` models through their own ``forward``. `caches` holds one cache
    per runner; rows and columns are the same in all of them.
    """

    def __init__(self, models: list[nn.Module], backends: list[str], batch: int, temperature: float = 1.0,
                 pad_token_id: int = 0, compact_at: int = 256):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if len(backends) != len(models) or set(backends) - {"gpt2", "llama", "hf"}:
            raise ValueError(f"one backend ('gpt2', 'llama' or 'hf') per model, got {backends}")
        self.models, self.batch, self.temperature = list(models), batch, temperature
        self.pad_token_id, self.compact_at = pad_token_id, compact_at
        self.device = next(self.models[0].parameters()).device
        self.runners = self._runners(backends)
        self.caches: list | None = None
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=self.device)  # (B, L)
        self.next_positions = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)
        self.logprobs: torch.Tensor | None = None  # (B, M, V) at each row's current state
        self.forward_calls = 0

    def _runners(self, backends: list[str]) -> list:
        """One lean stack for all models when they share a lean backend and stack (`GPT2Stack`, `LlamaStack`);
        else one runner per model."""
        if all(b == "gpt2" for b in backends) and can_stack(self.models):
            return [GPT2Stack(self.models)]
        if all(b == "llama" for b in backends) and can_stack_llama(self.models):
            return [LlamaStack(self.models)]
        lean = {"gpt2": GPT2Stack, "llama": LlamaStack}
        return [lean[b]([model]) if b in lean else model for model, b in zip(self.models, backends)]

    def release(self) -> None:
        """Drop the caches (a later feed starts afresh) and have the lean runners read the models' parameters again
        (`ModelStack.refresh`: FSDP swaps gathered parameters in for the shards around each rollout)."""
        self.caches, self.logprobs = None, None
        self.mask = self.mask[:, :0]
        for runner in self.runners:
            if isinstance(runner, ModelStack):
                runner.refresh()

    @torch.no_grad()
    def feed(self, inputs: list[list[int] | None], restart: list[bool]) -> torch.Tensor:
        """Feed each row its tokens (`None`: nothing) and return the next-token log-probs ``(B, M, V)``.

        A restarting row's tokens are a new query whose positions start at 0. Going-on rows are decoded together
        (one forward, one new column); restarting rows are prefilled together in a second forward and spliced into
        the cache over their dead columns, so every token goes through each model exactly once. If every row
        restarts, the cache starts afresh: a batch of one then computes exactly what a fresh prefill computes.
        Rows fed nothing keep their previous log-probs.
        """
        restart_rows = [row for row, flag in enumerate(restart) if flag]
        decode_rows = [row for row, tokens in enumerate(inputs) if tokens is not None and not restart[row]]
        if any(len(inputs[row]) != 1 for row in decode_rows):
            raise ValueError("going-on rows take exactly one token per step")
        logprobs = self.logprobs
        if len(restart_rows) == self.batch:
            self.release()
            logprobs = self._prefill_all([inputs[row] for row in restart_rows])
        else:
            if decode_rows:
                logprobs = self._decode(inputs, decode_rows, logprobs)
            if restart_rows:
                logprobs = self._prefill_rows(restart_rows, [inputs[row] for row in restart_rows], logprobs)
        self.logprobs = logprobs
        if self.mask.shape[1] > self.compact_at:
            self._compact()
        return self.logprobs

    def _forward(self, ids, attention_mask, positions, caches):
        """One forward of every model: the new caches and log-probs ``(B, M, V)``."""
        self.forward_calls += 1
        new_caches, logits = [], []
        for runner, cache in zip(self.runners, caches or [None] * len(self.runners)):
            if isinstance(runner, ModelStack):
                cache, runner_logits = runner.forward(ids, attention_mask, positions, cache)  # (B, m, V)
            else:
                out = runner(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                             cache=cache, use_cache=True)
                cache, runner_logits = out.cache, out.logits[:, -1, None]
            new_caches.append(cache)
            logits.append(runner_logits)
        logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
        logits = logits.float() if self.temperature == 1.0 else logits.float() / self.temperature
        return new_caches, torch.log_softmax(logits, dim=-1)

    def _layers(self):
        """Every layer of every cache (each has ``keys`` and ``values`` ``(B, heads, L, D)``)."""
        return [layer for cache in self.caches for layer in cache.layers]

    def _prefill_all(self, queries: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_left(queries, self.pad_token_id, self.device)  # (B, P)
        positions = position_ids(mask)
        self.caches, logprobs = self._forward(ids, mask, positions, None)
        self.mask, self.next_positions = mask, positions[:, -1] + 1
        return logprobs

    def _decode(self, inputs, rows: list[int], logprobs):
        """One new column for every row; only `rows` hold a real token in it."""
        live = [0] * self.batch
        for row in rows:
            live[row] = 1
        ids = torch.tensor([[inputs[row][0] if on else self.pad_token_id] for row, on in enumerate(live)],
                           device=self.device)  # (B, 1)
        new_mask = torch.tensor(live, device=self.device)[:, None]  # (B, 1)
        attention_mask = torch.cat([self.mask, new_mask], dim=1)  # (B, L + 1)
        self.caches, new = self._forward(ids, attention_mask, self.next_positions[:, None] * new_mask, self.caches)
        self.mask = attention_mask
        self.next_positions = self.next_positions + new_mask[:, 0]
        if logprobs is None or len(rows) == self.batch:
            return new
        return torch.where(new_mask.bool()[:, :, None], new, logprobs)

    def _prefill_rows(self, rows: list[int], queries: list[list[int]], logprobs) -> torch.Tensor:
        """Prefill new queries for `rows` and write them over those rows' last columns (all dead after a restart)."""
        ids, mask = pad_left(queries, self.pad_token_id, self.device)  # (R, P)
        positions = position_ids(mask)
        fresh, new = self._forward(ids, mask, positions, None)
        width = ids.shape[1]
        if self.mask.shape[1] < width:  # make room: masked columns on the left of every row
            self._pad_left_columns(width - self.mask.shape[1])
        index = torch.tensor(rows, device=self.device)
        self.mask[index] = 0
        self.mask[index, -width:] = mask
        for layer, part in zip(self._layers(), [layer for cache in fresh for layer in cache.layers]):
            layer.keys[index, :, -width:] = part.keys
            layer.values[index, :, -width:] = part.values
        self.next_positions[index] = positions[:, -1] + 1
        if logprobs is None:
            return new
        logprobs = logprobs.clone()
        logprobs[index] = new
        return logprobs

    def _pad_left_columns(self, n: int) -> None:
        self.mask = torch.cat([self.mask.new_zeros((self.batch, n)), self.mask], dim=1)
        for layer in self._layers():
            layer.keys = torch.cat([layer.keys.new_zeros((*layer.keys.shape[:2], n, layer.keys.shape[3])),
                                    layer.keys], dim=2)
            layer.values = torch.cat([layer.values.new_zeros((*layer.values.shape[:2], n,
                                                              layer.values.shape[3])), layer.values], dim=2)

    def _compact(self) -> None:
        """Keep only live columns, right-aligned: the cache shrinks to the longest live row."""
        live = self.mask.sum(1)  # (B,)
        width = int(live.max())
        columns = torch.arange(self.mask.shape[1], device=self.device)
        # Sort each row's columns so that live ones come last, in their original order.
        order = torch.argsort(self.mask * (columns + 1), dim=1, stable=True)[:, -width:]  # (B, width)
        self.mask = self.mask.gather(1, order)
        for layer in self._layers():
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
