"""The one sampler: responses drawn from a causal LM with their log-probs, through the same `BatchedDecoder` the
envs step (so a model is sampled with one arithmetic everywhere: best-of-n, win rates, the optimum estimate,
preference data), and Gumbel-max, the one way tokens are drawn.

Sampling draws from the model's true distribution at the given temperature: no top-k, no top-p (transformers'
``generate`` defaults to ``top_k=50``, which makes recorded log-probs disagree with the policy's).

Legend: ``B`` sequences, ``P`` query (prompt) tokens, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_env.decoding.batched import BatchedDecoder
from rlhf_env.lm import pad_left


def gumbel_max(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logprobs (B, V)``, drawn from softmax(logprobs) by Gumbel-max: argmax(log p − log(−log
    u)), u ~ U(0, 1) (the same distribution as softmax + multinomial, and cheaper). ``(B,)``. The uniforms are
    clamped at float's smallest normal so that log(−log u) stays finite."""
    uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)
    uniform = uniform.clamp_min_(torch.finfo(uniform.dtype).tiny)
    return (logprobs - torch.log(-torch.log(uniform))).argmax(-1)


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


@torch.no_grad()
def sample(
    model: nn.Module,
    queries: list[list[int]],
    *,
    backend: str,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample one response per query with a KV cache, recording each token's log-probability.

    `backend` (``"gpt2"``, ``"llama"`` or ``"hf"``, `rlhf_env.models.choose_backend`) is how `model` runs. A sequence
    stops at its EOS; later columns hold `pad_token_id` and log-prob 0 (finished rows keep being fed the pad token, so
    every row sees the same columns). `eos_token_id` may list several stop tokens (an env's ``world.stop_token_ids``:
    EOS and a chat template's end-of-turn token); a sequence stops at the first of any.
    """
    decoder = BatchedDecoder([model], [backend], len(queries), temperature, pad_token_id,
                             compact_at=max(len(q) for q in queries) + max_new_tokens + 1)  # never compacts
    device = decoder.device
    query_ids, query_mask = pad_left(queries, pad_token_id, device)  # (B, P): the layout the decoder prefills
    logp = decoder.feed(queries, restart=[True] * len(queries))[:, 0]  # (B, V)
    tokens, logprobs = [], []
    finished = torch.zeros(len(queries), dtype=torch.bool, device=device)
    stops = torch.as_tensor(eos_token_id, device=device).reshape(-1)  # (S,) the stop tokens
    for step in range(max_new_tokens):
        token = gumbel_max(logp, generator)  # (B,)
        token_logp = logp.gather(-1, token[:, None])[:, 0]  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(token_logp), token_logp))
        finished = finished | torch.isin(token, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logp = decoder.feed([[t] for t in token.tolist()], restart=[False] * len(queries))[:, 0]
    responses = torch.stack(tokens, dim=1)  # (B, T)
    # A token is real if no EOS came strictly before it: EOS itself belongs to the response.
    is_eos = torch.isin(responses, stops)
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~eos_before).long()
    return Samples(query_ids, query_mask, responses, response_mask, torch.stack(logprobs, dim=1), finished)
