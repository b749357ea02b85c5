"""Preference data: K responses per prompt from π_SFT, labelled by simulated annotators, saved as JSONL.

Two annotator modes (the utility each annotator ranks by is the task's gold reward, plus a per-word bonus for
tasks whose annotators like long answers; see `AnnotatorConfig`):

* ``pairwise``: every one of the C(K, 2) pairs is judged on its own, Bradley–Terry style:
  P(i ≻ j) = σ((u_i − u_j) / temperature) (temperature 0: the higher utility wins), then the label is flipped
  with probability ``flip_prob``. Pairs with equal utility at temperature 0 carry no preference and are dropped.
* ``ranking``: one full ranking per prompt from the Plackett–Luce model with scores u / temperature (Gumbel
  trick; temperature 0 sorts by utility, ties at random), then each adjacent pair is swapped with probability
  ``flip_prob``; all C(K, 2) pairs follow from the ranking.

Files (one JSON object per line; users can bring their own in the same format):

* ``pairs``: ``{"prompt", "chosen", "rejected"}`` required; ``chosen_gold``, ``rejected_gold``, ``group`` optional,
  and ``labeler``: who labelled the pair (``"simulated"`` here; an AI judge's name and its ``p_chosen`` for pairs
  from `rlhf_env.pipeline.labelers`, which labels with any labeler).
* ``groups``: ``{"prompt", "responses", "gold", "ranking"}``: the raw samples; ``ranking`` lists response
  indices best first (``null`` in pairwise mode).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf_env.decoding.sampling import sample
from rlhf_env.jsonl import read_jsonl
from rlhf_env.models import choose_backend
from rlhf_env.tasks.base import AnnotatorConfig, Task
from rlhf_env.text import decode_responses, encode_prompts, model_max_length

PAIR_FIELDS = {"prompt": str, "chosen": str, "rejected": str}
GROUP_FIELDS = {"prompt": str, "responses": list, "gold": list}
SIMULATED = "simulated"
"""The ``labeler`` of the simulated annotators' pairs (`rlhf_env.pipeline.labelers.SimulatedAnnotator`'s name)."""


@dataclass(frozen=True)
class PreferenceConfig:
    """How much preference data to sample and how to label it."""

    n_prompts: int = 6000
    """Distinct prompts to sample responses for (drawn from the split without replacement while possible)."""
    k: int = 4
    """Responses sampled per prompt."""
    mode: str = "pairwise"
    """``"pairwise"`` (independent Bradley–Terry judgements) or ``"ranking"`` (one Plackett–Luce ranking)."""
    annotator: AnnotatorConfig | None = None
    """Annotator noise and biases; `None` uses the task's own."""
    temperature: float = 1.0
    """Sampling temperature of π_SFT."""
    batch_size: int = 512
    """Sequences sampled per batch."""
    seed: int = 0
    """Seeds prompt choice, sampling and labels."""
    sampling_backend: str = "hf"
    """How π_SFT is sampled (`rlhf_env.models.choose_backend`): "hf", the arithmetic the shipped assets were built
    with (so `python -m rlhf_env.assets check` reproduces their bits); "auto" is faster on a GPT-2."""

    def __post_init__(self) -> None:
        if self.mode not in ("pairwise", "ranking"):
            raise ValueError(f"unknown preference mode {self.mode!r}; expected 'pairwise' or 'ranking'")
        if self.k < 2:
            raise ValueError(f"need k >= 2 responses per prompt to compare, got {self.k}")


@torch.no_grad()
def sample_groups(model, tokenizer, task: Task, config: PreferenceConfig, split: str = "train",
                  progress: bool = True) -> list[dict]:
    """Sample `config.k` responses for each of `config.n_prompts` prompts and score them with the gold reward."""
    rng = np.random.default_rng(config.seed)
    pool = task.train_prompts() if split == "train" else task.eval_prompts()
    chosen = rng.choice(len(pool), size=config.n_prompts, replace=config.n_prompts > len(pool))
    prompts = [pool[i] for i in chosen]
    flat_prompts = [p for p in prompts for _ in range(config.k)]
    queries = encode_prompts(tokenizer, flat_prompts, model_max_length(model) - task.max_new_tokens)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
    backend = choose_backend(model, config.sampling_backend)
    texts = []
    for start in tqdm(range(0, len(queries), config.batch_size), desc=f"sampling {split}", disable=not progress):
        samples = sample(model, queries[start : start + config.batch_size], backend=backend,
                         max_new_tokens=task.max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         temperature=config.temperature, generator=generator)
        texts.extend(decode_responses(tokenizer, samples.response_lists()))
    groups = []
    for g, prompt in enumerate(prompts):
        responses = texts[g * config.k : (g + 1) * config.k]
        groups.append({"prompt": prompt, "responses": responses,
                       "gold": [task.gold(prompt, r) for r in responses], "ranking": None})
    return groups


def label_groups(groups: list[dict], annotator: AnnotatorConfig, mode: str, seed: int) -> list[dict]:
    """Simulated annotators judge each group; returns the preference pairs (and fills rankings in place)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for g, group in enumerate(groups):
        responses = group["responses"]
        utility = np.array([annotator.utility(gold, r) for gold, r in zip(group["gold"], responses)])
        if mode == "ranking":
            ranking = plackett_luce_ranking(utility, annotator.temperature, rng)
            for i in range(len(ranking) - 1):  # careless annotators swap neighbours
                if rng.random() < annotator.flip_prob:
                    ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
            group["ranking"] = [int(i) for i in ranking]
            judged = [(ranking[a], ranking[b]) for a, b in itertools.combinations(range(len(ranking)), 2)]
        else:
            judged = []
            for i, j in itertools.combinations(range(len(responses)), 2):
                if annotator.temperature == 0:
                    if utility[i] == utility[j]:
                        continue
                    i_wins = utility[i] > utility[j]
                else:
                    i_wins = rng.random() < 1 / (1 + np.exp(-(utility[i] - utility[j]) / annotator.temperature))
                if rng.random() < annotator.flip_prob:
                    i_wins = not i_wins
                judged.append((i, j) if i_wins else (j, i))
        for winner, loser in judged:
            if responses[winner] == responses[loser]:
                continue
            pairs.append({"prompt": group["prompt"], "chosen": responses[winner], "rejected": responses[loser],
                          "chosen_gold": group["gold"][winner], "rejected_gold": group["gold"][loser], "group": g,
                          "labeler": SIMULATED})
    return pairs


def plackett_luce_ranking(utility: np.ndarray, temperature: float, rng: np.random.Generator) -> list[int]:
    """A ranking (best first) from Plackett–Luce with scores utility / temperature, by the Gumbel-max trick.

    Sorting ``s_i + Gumbel_i`` in decreasing order draws exactly a Plackett–Luce ranking with weights exp(s_i).
    At temperature 0 the order is by utility, with ties broken at random.
    """
    noise = rng.gumbel(size=len(utility))
    if temperature == 0:
        keys = list(zip(utility, noise))
    else:
        keys = list(zip(utility / temperature + noise, noise))
    return sorted(range(len(utility)), key=lambda i: keys[i], reverse=True)


def load_pairs(path: str | Path) -> list[dict]:
    """Preference pairs from JSONL (``prompt``, ``chosen``, ``rejected`` required), validated line by line."""
    return read_jsonl(path, PAIR_FIELDS)


def load_groups(path: str | Path) -> list[dict]:
    """Sampled groups from JSONL (``prompt``, ``responses``, ``gold``; ``ranking`` optional), validated."""
    groups = read_jsonl(path, GROUP_FIELDS)
    for number, group in enumerate(groups, start=1):
        ranking = group.get("ranking")
        if ranking is not None and sorted(ranking) != list(range(len(group["responses"]))):
            raise ValueError(f"{path}, record {number}: field 'ranking' is not a permutation of the responses")
    return groups
