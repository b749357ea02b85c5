"""The batch of live episodes under both environments: B rows side by side, each with its prompt, query, response
so far and per-token log-probs, the observation arrays kept up to date in place, and the decoder that steps π and
π_ref over all rows. It records; the world (`rlhf_env.world`) pays the rewards.

Legend: ``B`` rows, ``P`` query columns (the task's longest prompt), ``T`` = max_new_tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf_env.decoding.batched import BatchedDecoder


class EpisodeBatch:
    """B episodes side by side. ``decoder`` runs π and π_ref (log-probs ``[:, 0]`` and ``[:, 1]``) or, when the env
    holds no acting policy (``kl_mode`` "agent" or "reference"), π_ref alone (``has_policy=False``: log π is then
    0 here, the agent's or absent). Each `feed` consumes one entry per row: a token to append, a query to restart
    with, or `None` (the row is idle). An episode ends at a token of ``stop_token_ids`` (EOS, and a chat template's
    end-of-turn token) or at the token cap."""

    def __init__(self, decoder: BatchedDecoder, has_policy: bool, prompt_width: int, max_new_tokens: int,
                 pad_token_id: int, stop_token_ids: tuple[int, ...]):
        self.decoder, self.has_policy, self.batch = decoder, has_policy, decoder.batch
        self.width_prompt, self.max_new_tokens = prompt_width, max_new_tokens
        self.pad_token_id, self.stop_token_ids = pad_token_id, tuple(stop_token_ids)
        # Observations kept up to date in place: query left-padded to P columns, response after it.
        self.obs_ids = np.full((self.batch, prompt_width + max_new_tokens), pad_token_id, dtype=np.int64)  # (B, P+T)
        self.obs_mask = np.zeros_like(self.obs_ids)  # (B, P + T)
        self.prompts: list[str | list[dict] | None] = [None] * self.batch
        self.queries: list[list[int]] = [[] for _ in range(self.batch)]
        self.responses: list[list[int]] = [[] for _ in range(self.batch)]
        self.logprobs: list[list[float]] = [[] for _ in range(self.batch)]
        self.ref_logprobs: list[list[float]] = [[] for _ in range(self.batch)]
        self.weights: list[tuple[float, ...] | None] = [None] * self.batch  # reward weights each episode started with
        self.active = [False] * self.batch

    def release(self) -> None:
        """Drop the KV caches and end every episode (what `close` does); a later reset starts afresh."""
        self.decoder.release()
        self.active = [False] * self.batch

    def feed(self, inputs: list[list[int] | None], restart: list[bool]) -> None:
        """One forward of each model over every row's input (see `BatchedDecoder.feed`)."""
        self.decoder.feed(inputs, restart)

    def start(self, row: int, prompt: str | list[dict], query: list[int],
              weights: tuple[float, ...] | None = None) -> None:
        """Begin a new episode in `row` (its query is fed by the next `feed`), scored at its end with the reward
        `weights` in force now (None: whatever is in force when it ends)."""
        self.prompts[row], self.queries[row], self.weights[row] = prompt, query, weights
        self.responses[row], self.logprobs[row], self.ref_logprobs[row] = [], [], []
        self.active[row] = True
        self.obs_ids[row] = self.pad_token_id
        self.obs_mask[row] = 0
        self.obs_ids[row, self.width_prompt - len(query) : self.width_prompt] = query
        self.obs_mask[row, self.width_prompt - len(query) : self.width_prompt] = 1

    def token_logprobs(self, tokens: list[int]) -> tuple[list[float], list[float]]:
        """log π and log π_ref of one token per row, read from the distributions already computed."""
        rows = torch.arange(self.batch, device=self.decoder.device)
        index = torch.tensor(tokens, device=self.decoder.device)
        picked = self.decoder.logprobs[rows, :, index].T.tolist()  # (M, B)
        return (picked[0], picked[1]) if self.has_policy else ([0.0] * self.batch, picked[0])

    def policy_logprobs(self) -> torch.Tensor:
        """log π(· | state) of every row ``(B, V)`` (a view; `RuntimeError` when the env holds no acting policy)."""
        if not self.has_policy:
            raise RuntimeError("this env holds no acting policy (kl_mode 'agent' or 'reference'), so it has no "
                               "next_token_logprobs: the agent samples from its own policy")
        return self.decoder.logprobs[:, 0]

    def append(self, rows: list[int], tokens: list[int], logprobs: list[float],
               ref_logprobs: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Record ``tokens[i]`` in ``rows[i]`` with its log-probs under π and π_ref; return, per entry, whether the
        token is a stop token, EOS or end of turn (``finished``), and whether the episode ends with it
        (``terminated``: a stop token or the token cap).

        The caller feeds the tokens of the rows that go on afterwards.
        """
        lengths = np.empty(len(rows), dtype=np.int64)
        for i, (row, token) in enumerate(zip(rows, tokens)):
            self.responses[row].append(token)
            self.logprobs[row].append(logprobs[i])
            self.ref_logprobs[row].append(ref_logprobs[i])
            lengths[i] = len(self.responses[row])
        columns = self.width_prompt + lengths - 1
        self.obs_ids[rows, columns], self.obs_mask[rows, columns] = tokens, 1
        finished = np.isin(np.array(tokens, dtype=np.int64), self.stop_token_ids)
        terminated = finished | (lengths == self.max_new_tokens)
        for row, done in zip(rows, terminated.tolist()):
            self.active[row] = not done
        return finished, terminated

    def observation(self, row: int | slice = slice(None)) -> dict:
        """The observation of one row (or of all rows, batched), as copies."""
        return {"input_ids": self.obs_ids[row].copy(), "attention_mask": self.obs_mask[row].copy()}
