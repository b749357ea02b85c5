"""What a task is: prompts, a demonstration generator, a gold reward and the annotators who judge it.

A task is the world an RLHF run lives in. It supplies

* prompts, split into train and eval (`train_prompts`, `eval_prompts`);
* demonstrations `(prompt, response)` for supervised fine-tuning (`demonstrations`);
* a programmatic **gold reward** `gold(prompt, response) -> float`, the true objective, which the learned reward
  model only approximates;
* a well-formedness check `is_well_formed(prompt, response) -> bool` (grammar for text tasks, a number for
  arithmetic) so that monitors can see fluency fall before the gold reward does;
* `annotator` settings: how simulated humans turn gold rewards into preference labels.

All text is plain whitespace-separated tokens for the built-in tasks, so a word-level tokenizer round-trips it
exactly. Built-in tasks subclass `Task`; users with their own prompts use `rlhf_env.tasks.custom.FileTask`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AnnotatorConfig:
    """How simulated annotators label preferences from the gold reward (see `rlhf_env.pipeline.preferences`)."""

    temperature: float = 0.0
    """Bradley–Terry / Plackett–Luce temperature on gold rewards; 0 means the annotator always sees the gold order."""
    flip_prob: float = 0.1
    """Probability that a pairwise label is flipped at random after judging (careless clicks)."""
    length_bonus: float = 0.0
    """Utility added per response word before judging: > 0 models annotators who prefer longer answers."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"annotator temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.flip_prob < 0.5:
            raise ValueError(f"annotator flip_prob must be in [0, 0.5), got {self.flip_prob}")

    def utility(self, gold: float, response: str) -> float:
        """The number this annotator ranks a response by (gold plus any length preference)."""
        return gold + self.length_bonus * len(response.split())


class Task(abc.ABC):
    """A prompt source, a demonstration generator, a gold reward and annotator settings.

    Subclasses set `name`, `best_gold` (the best gold reward any response can reach, stated in their docstring),
    `max_new_tokens` (a response length that fits every demonstration) and `annotator`.
    """

    name: str = "task"
    best_gold: float = 1.0
    max_new_tokens: int = 24
    annotator: AnnotatorConfig = AnnotatorConfig()

    @abc.abstractmethod
    def train_prompts(self) -> list[str]:
        """Prompts for training (SFT, preference data, RL)."""

    @abc.abstractmethod
    def eval_prompts(self) -> list[str]:
        """Held-out prompts, disjoint from `train_prompts` where the task allows it."""

    @abc.abstractmethod
    def demonstrations(self, n: int, rng: np.random.Generator, split: str = "train") -> list[tuple[str, str]]:
        """`n` demonstrations `(prompt, response)` drawn with `rng` from the prompts of `split`."""

    @abc.abstractmethod
    def gold(self, prompt: str, response: str) -> float:
        """The true reward of `response` to `prompt`."""

    def gold_reward(self, prompts: list[str], responses: list[str]) -> list:
        """The gold reward as a batched reward function: ``reward_fn=task.gold_reward`` trains on the true reward
        (the "-GT" runs) instead of a reward model."""
        return [self.gold(prompt, response) for prompt, response in zip(prompts, responses)]

    def objectives(self) -> dict:
        """Every objective of the task that has a gold value, as batched reward functions by name (the form
        `gold_reward` has), the task's gold reward first. One, ``{"gold": self.gold_reward}``, unless the task
        defines more: the sentiment task adds "brevity", for multi-objective runs (``rewards=`` with weights, the
        grid's ``--pareto``). With more than one, evaluations report each as ``objective/gold/<name>``."""
        return {"gold": self.gold_reward}

    def is_well_formed(self, prompt: str, response: str) -> bool:
        """Whether the response is well formed (grammatical, parseable); tasks refine this."""
        return bool(response.strip())

    def tokenizer_corpus(self, rng: np.random.Generator, n: int = 5000) -> list[str]:
        """Texts to train the task's tokenizer on: prompts and demonstrations from both splits.

        Eval prompts are included on purpose: the tokenizer must cover them, and a word-level vocabulary leaks no
        labels.
        """
        texts = list(self.train_prompts()) + list(self.eval_prompts())
        for prompt, response in self.demonstrations(n, rng):
            texts.append(f"{prompt} {response}")
        return texts

    def log_prob(self, prompt: str, response: str) -> float | None:
        """Exact log-probability of `response` under the demonstration generator, if the task knows it.

        Used to report the generator's perplexity floor next to the SFT model's perplexity; `None` if unknown.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class GeneratedTask(Task):
    """A task whose prompts are enumerated once, split into train and eval, and answered by a demonstrator.

    Subclasses pass their prompt list to `__init__` and implement `demonstrate`.
    """

    def __init__(self, prompts: list[str], eval_fraction: float = 0.1, seed: int = 0):
        self._train, self._eval = split_prompts(prompts, eval_fraction, seed)

    def train_prompts(self) -> list[str]:
        return list(self._train)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def demonstrations(self, n: int, rng: np.random.Generator, split: str = "train") -> list[tuple[str, str]]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        prompts = self._train if split == "train" else self._eval
        # All prompt indices are drawn before any response: the stream of `rng` draws is part of the seed contract.
        return [(prompts[i], self.demonstrate(prompts[i], rng)) for i in rng.integers(len(prompts), size=n)]

    @abc.abstractmethod
    def demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
        """One demonstration response to `prompt`, drawn with `rng`."""


def split_prompts(prompts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split distinct prompts into (train, eval) with a fixed seed; eval gets at least one prompt."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    unique = sorted(set(prompts))
    if len(unique) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split into train and eval, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_eval = max(1, round(eval_fraction * len(unique)))
    eval_set = {unique[i] for i in order[:n_eval]}
    train = [p for p in unique if p not in eval_set]
    return train, [p for p in unique if p in eval_set]
