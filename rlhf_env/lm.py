"""Causal-LM tensor operations shared by the whole pipeline: padding, sampling with log-probs, scoring.

Legend: ``B`` sequences, ``P`` query (prompt) tokens, ``T`` response tokens, ``V`` vocabulary.

Queries are **left**-padded so that every query ends at column ``P - 1`` and the response starts at column ``P``;
responses are **right**-padded with the pad token after their EOS. Positions are ``cumsum(attention_mask) - 1``,
so a query's first real token is position 0 whatever its padding (without this, left padding shifts every
position and the model sees text it was never trained on).

Sampling draws from the model's true distribution at the given temperature: no top-k, no top-p (transformers'
``generate`` defaults to ``top_k=50``, which makes recorded log-probs disagree with the policy's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def pad_left(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad token lists into ``ids (B, P)`` and ``attention_mask (B, P)`` (1 = real token)."""
    if not sequences:
        raise ValueError("no sequences to pad")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every query must hold at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)  # (B, P), (B, P)


def pad_right(sequences: list[list[int]], pad_id: int, width: int | None = None, device="cpu"):
    """Right-pad token lists into ``ids (B, T)`` and ``attention_mask (B, T)``."""
    width = max(len(s) for s in sequences) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)  # (B, T), (B, T)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, under any padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)


@dataclass
class Samples:
    """Responses sampled from a causal LM, with the log-probs of the distribution they were drawn from."""

    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, T) right-padded with pad after EOS
    response_mask: torch.Tensor  # (B, T) 1 = generated token (EOS included)
    logprobs: torch.Tensor  # (B, T) log π(a_t | s_t) at the sampling temperature, 0 at padding
    finished: torch.Tensor  # (B,) bool: EOS was emitted within the token cap

    def response_lists(self) -> list[list[int]]:
        """Each response's token ids, EOS included, padding removed."""
        return [row[m.bool()].tolist() for row, m in zip(self.responses, self.response_mask)]


class IncrementalDecoder:
    """A causal LM over a batch of sequences with a KV cache: one forward per appended token.

    `prefill` consumes left-padded queries, `advance` appends one token per row; both return the next-token
    log-probs ``(B, V)`` in fp32 at the given temperature. The sampler and the environments step models through
    this one class, so their numbers agree exactly.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.temperature = model, temperature
        self.attention_mask: torch.Tensor | None = None  # (B, L) over everything consumed so far
        self.next_positions: torch.Tensor | None = None  # (B,)
        self.cache = None  # transformers' Cache of everything consumed so far

    @torch.no_grad()
    def prefill(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Consume queries ``(B, P)`` (left-padded) and return log-probs ``(B, V)`` of the first response token."""
        positions = position_ids(query_mask)
        out = self.model(input_ids=query_ids, attention_mask=query_mask, position_ids=positions, use_cache=True)
        self.attention_mask, self.next_positions = query_mask, positions[:, -1] + 1
        self.cache = out.cache
        return self._logprobs(out.logits)

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ``(B,)``; return the next-token log-probs ``(B, V)``."""
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_positions[:, None], cache=self.cache, use_cache=True)
        self.cache, self.next_positions = out.cache, self.next_positions + 1
        return self._logprobs(out.logits)

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, -1].float() / self.temperature, dim=-1)  # (B, V)


@torch.no_grad()
def sample(
    model: nn.Module,
    queries: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample one response per query with a KV cache, recording each token's log-probability.

    Tokens are drawn by Gumbel-max on the temperature-scaled log-softmax (the same distribution as softmax +
    multinomial, and cheaper). A sequence stops at its EOS; later columns hold `pad_token_id` and log-prob 0.
    """
    decoder = IncrementalDecoder(model, temperature)
    device = next(model.parameters()).device
    query_ids, query_mask = pad_left(queries, pad_token_id, device)  # (B, P)
    logp = decoder.prefill(query_ids, query_mask)  # (B, V)
    tokens, logprobs = [], []
    finished = torch.zeros(len(queries), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        uniform = torch.rand(logp.shape, generator=generator, device=device).clamp_(min=1e-20)
        token = (logp - torch.log(-torch.log(uniform))).argmax(-1)  # (B,) Gumbel-max
        token_logp = logp.gather(-1, token[:, None])[:, 0]  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(token_logp), token_logp))
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logp = decoder.advance(token)
    responses = torch.stack(tokens, dim=1)  # (B, T)
    # A token is real if no EOS came strictly before it: EOS itself belongs to the response.
    is_eos = responses == eos_token_id
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~eos_before).long()
    return Samples(query_ids, query_mask, responses, response_mask, torch.stack(logprobs, dim=1), finished)


def response_columns(per_position: torch.Tensor, query_width: int) -> torch.Tensor:
    """The columns of a ``(B, P + T, ...)`` forward output that predict the T response tokens: ``(B, T, ...)``.

    This slice is the one alignment in RLHF code that must be right: the output at column ``j`` predicts the token
    at column ``j + 1``, so the last query column predicts the first response token and the last response column
    predicts nothing. Logits, values and hidden states all go through here.
    """
    return per_position[:, query_width - 1 : -1]


def response_logits(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits that predict each response token, from one padded forward over ``query + response``: ``(B, T, V)``
    (aligned by `response_columns`)."""
    input_ids = torch.cat([query_ids, responses], dim=1)  # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P + T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    return response_columns(logits, query_ids.shape[1])  # (B, T, V)


def response_logprobs(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log π(response_t | query, response_<t) at `temperature`, 0 at padding. Returns ``(B, T)`` in fp32."""
    logits = response_logits(model, query_ids, query_mask, responses, response_mask).float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, responses[..., None])[..., 0]  # (B, T)
    return logp * response_mask
