"""Direct RLAIF: a judge's preference, asked online, *is* the reward (Lee et al. 2023, "RLAIF", §2.3 "direct
RLAIF"; no reward model is trained).

`JudgeReward` is a batched reward function for ``reward_fn=``: for each finished episode it samples
``references`` responses to the same query from a reference policy (π_SFT, the env's π_ref by default) and pays

    r(x, y) = mean_j P_judge(y ≻ y_ref_j | x),   y_ref_j ~ π_ref(· | x),   a number in [0, 1],

the probability that the judge (any `rlhf_env.pipeline.labelers.Labeler`: an LM judge, averaged over both orders,
or a rule judge) prefers the policy's response to a π_SFT sample: a win rate against the starting policy,
estimated from `references` comparisons. Cost per episode: `references` sampled reference responses (one batched
decode of π_ref over the finished episodes' queries) and `references` judge comparisons (an `LMJudge` runs both
orders: 2·`references` forwards of the judge's prompt); `JudgeReward.seconds` and `.calls` count it.

The reference samples come from the function's own seeded generator, so a run is reproducible from its seed. Its
state is part of agent checkpoints (`random_state` / `set_random_state`, the hooks `agents.checkpoint` saves for
any reward function that has them), so a resumed run draws the same reference samples as an uninterrupted one.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rlhf_env.decoding.sampling import sample
from rlhf_env.models import choose_backend
from rlhf_env.pipeline.labelers import check_probabilities
from rlhf_env.text import decode_responses


class JudgeReward:
    """``reward_fn=JudgeReward(judge, reference, tokenizer, max_new_tokens)``: r = P_judge(response ≻ π_ref sample).

    `judge`: a `Labeler` (``prefer(prompts, a, b) -> P(a ≻ b)``). `reference`: the causal LM the reference responses
    are sampled from (pass the env's π_ref, e.g. ``rlhf_env.assets`` π_SFT), with the env's `tokenizer`;
    `max_new_tokens` and `temperature` as the env samples. `references`: comparisons per episode (≥ 1). Returns one
    float in [0, 1] per response; `rlhf_env.pipeline.labelers.LabelerError` if the judge returns anything else.
    `ValueError` for a judge without ``prefer`` or ``references`` < 1, at construction."""

    def __init__(self, judge, reference, tokenizer, max_new_tokens: int, references: int = 1,
                 temperature: float = 1.0, seed: int = 0):
        if not callable(getattr(judge, "prefer", None)):
            raise ValueError(f"judge must be a Labeler with prefer(prompts, a, b) -> P(a ≻ b), got "
                             f"{type(judge).__name__}")
        if not (isinstance(references, int) and references >= 1):
            raise ValueError(f"references must be an integer ≥ 1, got {references!r}")
        self.judge, self.reference, self.tokenizer = judge, reference, tokenizer
        self.max_new_tokens, self.references, self.temperature = int(max_new_tokens), references, float(temperature)
        self.backend = choose_backend(reference)
        self.generator = torch.Generator(device=next(reference.parameters()).device).manual_seed(seed)
        self.seconds, self.calls, self.comparisons = 0.0, 0, 0

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str], query_ids: list[list[int]]) -> list[float]:
        start = time.perf_counter()
        n, k = len(prompts), self.references
        queries = [q for q in query_ids for _ in range(k)]  # (N·k) each query k times, in order
        stops = self.tokenizer.eos_token_id
        samples = sample(self.reference, queries, backend=self.backend, max_new_tokens=self.max_new_tokens,
                         eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id
                         if self.tokenizer.pad_token_id is not None else stops,
                         temperature=self.temperature, generator=self.generator)
        reference_texts = decode_responses(self.tokenizer, samples.response_lists())
        p = self.judge.prefer([x for x in prompts for _ in range(k)], [y for y in responses for _ in range(k)],
                              reference_texts)
        p = check_probabilities(p, n * k, getattr(self.judge, "name", type(self.judge).__name__))
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.comparisons += n * k
        return np.asarray(p, dtype=np.float64).reshape(n, k).mean(1).tolist()

    def random_state(self) -> torch.Tensor:
        """The state of the generator the reference samples are drawn from (a uint8 tensor, `torch.Generator`'s)."""
        return self.generator.get_state()

    def set_random_state(self, state: torch.Tensor) -> None:
        """Continue from a `random_state` (a resumed run draws the reference samples an uninterrupted one would)."""
        self.generator.set_state(state)

    @property
    def seconds_per_episode(self) -> float:
        """Wall time of the reward per scored episode so far (sampling the references and judging)."""
        return self.seconds / max(1, self.comparisons // self.references)
