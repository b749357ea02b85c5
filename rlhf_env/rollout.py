"""The batched core under both environments: B episodes, one KV cache per model, one forward per step.

Legend: ``B`` rows (episodes running side by side), ``L`` cached columns, ``W`` columns fed in one call,
``V`` vocabulary.

Rows start and end at different times. Every call feeds each row either its action token (the row goes on), its
new query (the row restarts: its old columns are masked out), or nothing (the row just ended and waits). Inputs are
left-padded to the widest row, so one forward per model serves all rows whatever they are doing. The cache only
grows; when it holds more than ``compact_at`` columns, each row's live columns are gathered to the right of a
narrower cache (no forward pass: keys and values already carry their positions).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_env.lm import position_ids


class BatchedDecoder:
    """A causal LM stepped over B rows with a shared KV cache; returns next-token log-probs ``(B, V)`` in fp32."""

    def __init__(self, model: nn.Module, batch: int, temperature: float = 1.0, pad_token_id: int = 0,
                 compact_at: int = 256):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.batch, self.temperature = model, batch, temperature
        self.pad_token_id, self.compact_at = pad_token_id, compact_at
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=self.device)  # (B, L)
        self.next_positions = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)
        self.logprobs: torch.Tensor | None = None  # (B, V) at each row's current state
        self.forward_calls = 0

    @torch.no_grad()
    def feed(self, inputs: list[list[int] | None], restart: list[bool]) -> torch.Tensor:
        """Feed each row its tokens (`None`: nothing) and return the next-token log-probs ``(B, V)``.

        A restarting row's tokens are a new query whose positions start at 0; its earlier columns are masked.
        Rows fed nothing keep their previous log-probs. If every row restarts, the cache starts afresh, which makes a
        batch of one compute exactly what a fresh prefill computes.
        """
        if all(tokens is None for tokens in inputs):
            return self.logprobs
        if all(restart):
            self.cache = None
            self.mask = self.mask[:, :0]
        width = max(len(tokens) for tokens in inputs if tokens is not None)
        ids = torch.full((self.batch, width), self.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros((self.batch, width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            if tokens:
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                new_mask[row, width - len(tokens) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        restart_rows = torch.tensor(restart, device=self.device)
        old_mask = self.mask * (~restart_rows[:, None]).long()  # (B, L) a restart forgets the old episode
        start = torch.where(restart_rows, torch.zeros_like(self.next_positions), self.next_positions)  # (B,)
        positions = (start[:, None] + position_ids(new_mask)) * new_mask  # (B, W)
        attention_mask = torch.cat([old_mask, new_mask], dim=1)  # (B, L + W)
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        self.forward_calls += 1
        self.cache, self.mask = out.past_key_values, attention_mask
        fed = new_mask.sum(1)  # (B,)
        self.next_positions = torch.where(fed > 0, start + fed, self.next_positions)
        logprobs = torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)  # (B, V)
        if self.logprobs is not None:
            logprobs = torch.where((fed > 0)[:, None], logprobs, self.logprobs)
        self.logprobs = logprobs
        if self.mask.shape[1] > self.compact_at:
            self._compact()
        return self.logprobs

    def _compact(self) -> None:
        """Keep only live columns, right-aligned: the cache shrinks to the longest live row."""
        live = self.mask.sum(1)  # (B,)
        width = int(live.max())
        columns = torch.arange(self.mask.shape[1], device=self.device)
        # Sort each row's columns so that live ones come last, in their original order.
        order = torch.argsort(self.mask * (columns + 1), dim=1, stable=True)[:, -width:]  # (B, width)
        self.mask = self.mask.gather(1, order)
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)


class RolloutBatch:
    """B episodes of one RLHF world side by side: per-row text, both decoders, and the reward arithmetic.

    `world` is an `rlhf_env.env.RLHFWorld` (models, tokenizer, task, KL settings). Each `step` consumes one entry
    per row: a token to append, a query to restart with, or `None` (the row is idle).
    """

    def __init__(self, world, batch: int):
        self.world, self.batch = world, batch
        pad = world.tokenizer.pad_token_id
        self.policy = BatchedDecoder(world.policy, batch, world.temperature, pad, world.compact_at)
        self.reference = BatchedDecoder(world.reference, batch, world.temperature, pad, world.compact_at)
        self.prompts: list[str | None] = [None] * batch
        self.queries: list[list[int]] = [[] for _ in range(batch)]
        self.responses: list[list[int]] = [[] for _ in range(batch)]
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.ref_logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.active = [False] * batch

    def feed(self, inputs: list[list[int] | None], restart: list[bool]) -> None:
        """One forward of each model over every row's input (see `BatchedDecoder.feed`)."""
        self.policy.feed(inputs, restart)
        self.reference.feed(inputs, restart)

    def start(self, row: int, prompt: str, query: list[int]) -> None:
        """Begin a new episode in `row` (its query is fed by the next `feed`)."""
        self.prompts[row], self.queries[row] = prompt, query
        self.responses[row], self.logprobs[row], self.ref_logprobs[row] = [], [], []
        self.active[row] = True

    def append(self, row: int, token: int) -> dict:
        """Record `token` in `row`: its log-probs under π and π_ref (already computed) and the per-token reward.

        Returns the step's info; ``terminated`` is set when the token is EOS or fills the cap. The caller feeds the
        token to the decoders afterwards if the row goes on.
        """
        world = self.world
        logprob = float(self.policy.logprobs[row, token])
        ref_logprob = float(self.reference.logprobs[row, token])
        kl = world.kl(logprob, ref_logprob)
        self.responses[row].append(token)
        self.logprobs[row].append(logprob)
        self.ref_logprobs[row].append(ref_logprob)
        eos = token == world.tokenizer.eos_token_id
        terminated = eos or len(self.responses[row]) == world.max_new_tokens
        self.active[row] = not terminated
        reward = -world.beta * kl
        return {"logprob": logprob, "ref_logprob": ref_logprob, "kl": kl, "beta": world.beta,
                "non_score_reward": reward, "reward": reward, "terminated": terminated, "finished": eos}

    def finish(self, rows: list[int], infos: dict[int, dict]) -> None:
        """Score the finished `rows` (one batched RM forward) and add the score parts to their infos."""
        texts = [self.response_text(row) for row in rows]
        scores = self.world.score([self.prompts[r] for r in rows], [self.queries[r] for r in rows],
                                  [self.responses[r] for r in rows], texts)
        for row, text, score in zip(rows, texts, scores):
            info = infos[row]
            info.update(self.world.end_of_episode(self.prompts[row], text, score, info["finished"],
                                                  self.logprobs[row], self.ref_logprobs[row]))
            info["reward"] += info["score"] - (0.0 if info["finished"] else self.world.missing_eos_penalty)

    def response_text(self, row: int) -> str:
        return self.world.tokenizer.decode(self.responses[row], skip_special_tokens=True)

    def observation(self, row: int, width_prompt: int, width_response: int) -> tuple:
        """``(input_ids, attention_mask)`` of one row: query left-padded, response right-padded."""
        import numpy as np

        ids = np.full(width_prompt + width_response, self.world.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros(width_prompt + width_response, dtype=np.int64)
        query, response = self.queries[row], self.responses[row]
        ids[width_prompt - len(query) : width_prompt] = query
        mask[width_prompt - len(query) : width_prompt] = 1
        ids[width_prompt : width_prompt + len(response)] = response
        mask[width_prompt : width_prompt + len(response)] = 1
        return ids, mask
