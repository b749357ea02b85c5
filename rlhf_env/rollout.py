"""The batched core under both environments: B episodes, π and π_ref decoded together, one forward per step.

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

import numpy as np
import torch
from torch import nn

from rlhf_env.gpt2_decode import GPT2Stack, can_stack
from rlhf_env.kl import kl_estimate
from rlhf_env.lm import pad_left, position_ids


class BatchedDecoder:
    """M causal LMs (the policy and the reference) stepped over B rows with a shared mask; returns next-token
    log-probs ``(B, M, V)`` in fp32.

    How the models run is chosen whenever the cache starts afresh: small GPT-2s of one shape as one `GPT2Stack`
    (every model in each batched product), other GPT-2s each on the lean path, any other model through its own
    ``forward``. `caches` holds one cache per such runner; rows and columns are the same in all of them.
    """

    def __init__(self, models: list[nn.Module], batch: int, temperature: float = 1.0, pad_token_id: int = 0,
                 compact_at: int = 256):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.models, self.batch, self.temperature = list(models), batch, temperature
        self.pad_token_id, self.compact_at = pad_token_id, compact_at
        self.device = next(self.models[0].parameters()).device
        self.caches: list | None = None
        self.runners: list = []
        self._stacks: dict[tuple[int, ...], GPT2Stack] = {}  # kept so that stacked weights are reused
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=self.device)  # (B, L)
        self.next_positions = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)
        self.logprobs: torch.Tensor | None = None  # (B, M, V) at each row's current state
        self.forward_calls = 0

    def release(self) -> None:
        """Drop the caches (a later feed starts afresh)."""
        self.caches, self.logprobs = None, None
        self.mask = self.mask[:, :0]

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

    def _choose_runners(self) -> list:
        """Small GPT-2s of one shape: one stack; else each GPT-2 alone on the lean path, other models as they are."""
        if can_stack(self.models):
            groups = [self.models]
        else:
            groups = [[model] if can_stack([model]) else model for model in self.models]
        runners = []
        for group in groups:
            if isinstance(group, list):
                key = tuple(map(id, group))
                if key not in self._stacks:
                    self._stacks[key] = GPT2Stack(group)
                group = self._stacks[key]
            runners.append(group)
        return runners

    def _forward(self, ids, attention_mask, positions, caches):
        """One forward of every model: the new caches and log-probs ``(B, M, V)``."""
        self.forward_calls += 1
        new_caches, logits = [], []
        for runner, cache in zip(self.runners, caches or [None] * len(self.runners)):
            if isinstance(runner, GPT2Stack):
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
        self.runners = self._choose_runners()  # the cache starts afresh: models may have changed mode
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


class RolloutBatch:
    """B episodes of one RLHF world side by side: per-row text, both decoders, and the reward arithmetic.

    `world` is an `rlhf_env.env.RLHFWorld` (models, tokenizer, task, KL settings). Each `step` consumes one entry
    per row: a token to append, a query to restart with, or `None` (the row is idle).
    """

    def __init__(self, world, batch: int):
        self.world, self.batch = world, batch
        pad = world.tokenizer.pad_token_id
        # One decoder runs π and π_ref (log-probs [:, 0] and [:, 1]); other kl_modes: no acting policy in the env,
        # so no policy forward (log π is 0 or the agent's) and the reference is model 0.
        self.has_policy = world.policy is not None
        models = [world.policy, world.reference] if self.has_policy else [world.reference]
        self.decoder = BatchedDecoder(models, batch, world.temperature, pad, world.compact_at)
        # Observations kept up to date in place: query left-padded to P columns, response after it.
        self.width_prompt, self.width_response = world.max_prompt_tokens, world.max_new_tokens
        self.obs_ids = np.full((batch, self.width_prompt + self.width_response), pad, dtype=np.int64)  # (B, P + T)
        self.obs_mask = np.zeros_like(self.obs_ids)  # (B, P + T)
        self.prompts: list[str | None] = [None] * batch
        self.queries: list[list[int]] = [[] for _ in range(batch)]
        self.responses: list[list[int]] = [[] for _ in range(batch)]
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.ref_logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.active = [False] * batch

    def release(self) -> None:
        """Drop the KV caches and end every episode (what `close` does); a later reset starts afresh."""
        self.decoder.release()
        self.active = [False] * self.batch

    def feed(self, inputs: list[list[int] | None], restart: list[bool]) -> None:
        """One forward of each model over every row's input (see `BatchedDecoder.feed`)."""
        self.decoder.feed(inputs, restart)

    def start(self, row: int, prompt: str, query: list[int]) -> None:
        """Begin a new episode in `row` (its query is fed by the next `feed`)."""
        self.prompts[row], self.queries[row] = prompt, query
        self.responses[row], self.logprobs[row], self.ref_logprobs[row] = [], [], []
        self.active[row] = True
        self.obs_ids[row] = self.world.pad_token_id
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
        """log π(· | state) of every row ``(B, V)``; an error unless kl_mode="policy" (no π in the env)."""
        if not self.has_policy:
            raise RuntimeError(f"kl_mode={self.world.kl_mode!r}: the env holds no acting policy, so it has no "
                                 "next_token_logprobs (the agent samples from its own policy)")
        return self.decoder.logprobs[:, 0]

    def append(self, rows: list[int], tokens: list[int], logprobs: list[float],
               ref_logprobs: list[float]) -> dict[str, np.ndarray]:
        """Record ``tokens[i]`` in ``rows[i]`` with its log-probs under π and π_ref; return the step's info of those
        rows as arrays, one entry per row: ``logprob``, ``ref_logprob``, ``kl``, ``beta``, ``non_score_reward``,
        ``reward`` (−β·KL_t), ``terminated`` (EOS or the token cap) and ``finished`` (EOS).

        The caller feeds the tokens of the rows that go on afterwards.
        """
        world = self.world
        logprob, ref_logprob = np.array(logprobs, dtype=np.float64), np.array(ref_logprobs, dtype=np.float64)
        kl = kl_estimate(logprob, ref_logprob, world.kl_estimator)
        lengths = np.empty(len(rows), dtype=np.int64)
        for i, (row, token) in enumerate(zip(rows, tokens)):
            self.responses[row].append(token)
            self.logprobs[row].append(logprobs[i])
            self.ref_logprobs[row].append(ref_logprobs[i])
            lengths[i] = len(self.responses[row])
        columns = self.width_prompt + lengths - 1
        self.obs_ids[rows, columns], self.obs_mask[rows, columns] = tokens, 1
        finished = np.array(tokens, dtype=np.int64) == world.eos_token_id
        terminated = finished | (lengths == world.max_new_tokens)
        for row, done in zip(rows, terminated.tolist()):
            self.active[row] = not done
        reward = -world.beta * kl
        return {"logprob": logprob, "ref_logprob": ref_logprob, "kl": kl, "beta": np.full(len(rows), world.beta),
                "non_score_reward": reward, "reward": reward.copy(), "terminated": terminated, "finished": finished}

    def finish(self, rows: list[int], finished: list[bool]) -> tuple[list[dict], list[float]]:
        """Score the finished `rows` (one batched RM forward): each row's end-of-episode info (score, gold score,
        text, length, KL sum) and the reward its last step adds (the score, less the missing-EOS penalty when the
        row was cut off at the token cap)."""
        texts = [self.response_text(row) for row in rows]
        scores = self.world.score([self.prompts[r] for r in rows], [self.queries[r] for r in rows],
                                  [self.responses[r] for r in rows], texts)
        infos, rewards = [], []
        for row, text, score, eos in zip(rows, texts, scores, finished):
            info = self.world.end_of_episode(self.prompts[row], text, score, eos, self.logprobs[row],
                                             self.ref_logprobs[row])
            infos.append(info)
            rewards.append(info["score"] - (0.0 if eos else self.world.missing_eos_penalty))
        self.world.record_episode_kls([info["kl_sum"] for info in infos])  # once every row's end is known
        return infos, rewards

    def response_text(self, row: int) -> str:
        return self.world.tokenizer.decode(self.responses[row], skip_special_tokens=True)

    def observation(self, row: int | slice = slice(None)) -> dict:
        """The observation of one row (or of all rows, batched), as copies."""
        return {"input_ids": self.obs_ids[row].copy(), "attention_mask": self.obs_mask[row].copy()}
