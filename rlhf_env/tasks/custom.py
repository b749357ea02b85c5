"""Your own task: prompts (and optionally demonstrations) from local files, gold reward from a Python function.

Files:

* prompts: ``.txt``, one prompt per line (blank lines ignored), or ``.jsonl``, one JSON object per line with a
  string field ``"prompt"`` (blank lines ignored, other fields ignored);
* demonstrations (optional, needed for supervised fine-tuning): ``.jsonl``, one object per line with string fields
  ``"prompt"`` and ``"response"``.

Prompts and responses are stripped of surrounding whitespace. Everything is read and checked when the task is
built: a missing or empty file, a line that is not JSON, or a missing, non-string or blank field raises
`ValueError` naming the file and the line, so a bad file fails at once instead of halfway through a run.

Demonstrations belong to the split of their prompt; those whose prompt is not in the prompts file count as train
demonstrations (SFT data often comes from a different pool of prompts than RL), so that eval prompts never leak
into supervised training.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
>>> _ = path.write_text("say hi\\nsay bye\\n")
>>> task = FileTask(path, gold=lambda prompt, response: float(response == prompt.split()[-1]))
>>> sorted(task.train_prompts() + task.eval_prompts())
['say bye', 'say hi']
>>> task.gold("say hi", "hi")
1.0
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rlhf_env.jsonl import iter_jsonl
from rlhf_env.tasks.base import AnnotatorConfig, Task, split_prompts

GoldFn = Callable[[str, str], float]
WellFormedFn = Callable[[str, str], bool]
DEFAULT_ANNOTATOR = AnnotatorConfig()


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` (field ``"prompt"``) file, in file order.

    Raises:
        ValueError: the file is missing, has another suffix, holds no prompts, or a line is malformed (the
            message names the file and the line).
    """
    path = _existing_file(path, "prompts")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in _lines(path) if line.strip()]
    elif suffix == ".jsonl":
        prompts = [record["prompt"] for _, record in _read_jsonl(path, ("prompt",))]
    else:
        raise ValueError(f"prompts file {path}: expected a .txt or .jsonl file, got suffix {path.suffix!r}")
    if not prompts:
        raise ValueError(f"prompts file {path}: no prompts (the file is empty or has only blank lines)")
    return prompts


def read_demonstrations(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from a ``.jsonl`` file with string fields ``"prompt"`` and ``"response"``.

    Raises:
        ValueError: the file is missing, holds no demonstrations, or a line is malformed (the message names the
            file and the line).
    """
    path = _existing_file(path, "demonstrations")
    demos = [(record["prompt"], record["response"]) for _, record in _read_jsonl(path, ("prompt", "response"))]
    if not demos:
        raise ValueError(f"demonstrations file {path}: no demonstrations (the file is empty or has only blank lines)")
    return demos


def _existing_file(path: str | os.PathLike, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{kind} file {path} does not exist or is not a file")
    return path


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, record)`` for every non-blank line, each a JSON object with non-blank string `fields`."""
    records = []
    for number, record in iter_jsonl(path, {field: str for field in fields}):
        for field in fields:
            if not record[field].strip():
                raise ValueError(f"{path}, line {number}: the {field!r} field is blank")
            record[field] = record[field].strip()
        records.append((number, record))
    return records


def check_task_settings(name: str, max_new_tokens: int, annotator: AnnotatorConfig, well_formed) -> None:
    """The checks `FileTask` and `rlhf_env.tasks.dataset.DatasetTask` make of their common settings: `TypeError` for
    a `well_formed` that is neither None nor callable or an `annotator` that is not an `AnnotatorConfig`,
    `ValueError` for a `max_new_tokens` that is not a positive integer or an empty `name`."""
    if well_formed is not None and not callable(well_formed):
        raise TypeError(
            f"well_formed must be None or a function well_formed(prompt, response) -> bool, "
            f"got {type(well_formed).__name__}"
        )
    if not isinstance(annotator, AnnotatorConfig):
        raise TypeError(f"annotator must be an AnnotatorConfig, got {type(annotator).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")


class FileTask(Task):
    """A task from local files and a gold-reward function (module docstring for the file formats).

    Args:
        prompts_path: ``.txt`` or ``.jsonl`` file of prompts; at least 2 distinct ones (train and eval).
        gold: ``gold(prompt, response) -> float``, the true reward.
        demonstrations_path: ``.jsonl`` file of demonstrations; required for supervised fine-tuning.
        name: the task's name in logs and result files.
        eval_fraction: share of distinct prompts held out for evaluation.
        seed: seeds the train/eval split.
        max_new_tokens: response length cap; should fit every demonstration.
        best_gold: the best gold reward any response can reach (reported next to results).
        annotator: how simulated annotators turn gold rewards into preferences.
        well_formed: ``well_formed(prompt, response) -> bool``; `None` means "the response is not blank".

    Raises:
        ValueError: a file is missing or malformed (the message names the file and the line), or an argument is
            out of range.
        TypeError: `gold` or `well_formed` is not callable, or `annotator` is not an `AnnotatorConfig`.
    """

    def __init__(
        self,
        prompts_path: str | os.PathLike,
        gold: GoldFn,
        demonstrations_path: str | os.PathLike | None = None,
        name: str = "custom",
        eval_fraction: float = 0.1,
        seed: int = 0,
        max_new_tokens: int = 32,
        best_gold: float = 1.0,
        annotator: AnnotatorConfig = DEFAULT_ANNOTATOR,
        well_formed: WellFormedFn | None = None,
    ):
        if not callable(gold):
            raise TypeError(f"gold must be a function gold(prompt, response) -> float, got {type(gold).__name__}")
        check_task_settings(name, max_new_tokens, annotator, well_formed)
        self.name, self.max_new_tokens, self.best_gold, self.annotator = (
            name,
            max_new_tokens,
            float(best_gold),
            annotator,
        )
        self._gold, self._well_formed = gold, well_formed
        self.prompts_path = Path(prompts_path)
        prompts = read_prompts(self.prompts_path)
        if len(set(prompts)) < 2:
            raise ValueError(
                f"prompts file {self.prompts_path}: need at least 2 distinct prompts to split into train and eval, "
                f"got {len(set(prompts))}"
            )
        self._train, self._eval = split_prompts(prompts, eval_fraction, seed)
        self.demonstrations_path = None if demonstrations_path is None else Path(demonstrations_path)
        self._demos: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
        if self.demonstrations_path is not None:
            eval_set = set(self._eval)
            for prompt, response in read_demonstrations(self.demonstrations_path):
                self._demos["eval" if prompt in eval_set else "train"].append((prompt, response))

    def train_prompts(self) -> list[str]:
        return list(self._train)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def demonstrations(self, n: int, rng: np.random.Generator, split: str = "train") -> list[tuple[str, str]]:
        """`n` demonstrations of `split` drawn with replacement by `rng`.

        Raises:
            ValueError: there is no demonstrations file, or it has no demonstration for a prompt of `split`.
        """
        if split not in self._demos:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.demonstrations_path is None:
            raise ValueError(
                f"task {self.name!r} has no demonstrations: supervised fine-tuning needs a demonstrations file "
                '(FileTask(..., demonstrations_path=\'demos.jsonl\'), one {"prompt": ..., "response": ...} per line)'
            )
        pool = self._demos[split]
        if not pool:
            raise ValueError(
                f"demonstrations file {self.demonstrations_path} has no demonstration for a prompt of the {split} split"
            )
        return [pool[i] for i in rng.integers(len(pool), size=n)]

    def gold(self, prompt: str, response: str) -> float:
        return float(self._gold(prompt, response))

    def is_well_formed(self, prompt: str, response: str) -> bool:
        if self._well_formed is None:
            return super().is_well_formed(prompt, response)
        return bool(self._well_formed(prompt, response))

    def tokenizer_corpus(self, rng: np.random.Generator, n: int = 5000) -> list[str]:
        """Every prompt and every demonstration: the files are the whole corpus, so nothing is sampled.

        Unlike the base class this works without a demonstrations file (`rng` and `n` are unused).
        """
        texts = list(self._train) + list(self._eval)
        texts += [f"{prompt} {response}" for split in ("train", "eval") for prompt, response in self._demos[split]]
        return texts

    def __repr__(self) -> str:
        return f"FileTask(name={self.name!r}, prompts_path={str(self.prompts_path)!r})"
