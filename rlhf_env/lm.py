"""Causal-LM tensor operations shared by the whole pipeline: padding, positions, the response alignment, and
log-probs of given responses through a model's own forward (sampling: `rlhf_env.decoding.sampling`).

Legend: ``B`` sequences, ``P`` query (prompt) tokens, ``T`` response tokens, ``V`` vocabulary.

Queries are **left**-padded so that every query ends at column ``P - 1`` and the response starts at column ``P``;
responses are **right**-padded with the pad token after their EOS. Positions are ``cumsum(attention_mask) - 1``,
so a query's first real token is position 0 whatever its padding (without this, left padding shifts every
position and the model sees text it was never trained on).

"""

from __future__ import annotations

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
