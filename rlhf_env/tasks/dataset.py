"""Your own task from a dataset: prompts from a Hugging Face `datasets.Dataset` (or `DatasetDict`), or from a local
JSON, JSON Lines, CSV or Parquet file read with `datasets`, and a gold reward from a Python function.

Needs the optional `datasets` package (``pip install "rlhf-gym[datasets]"``); the rest of rlhf-gym imports without
it. Files are read from the local disk only, never downloaded: ``Dataset.from_json`` / ``from_csv`` /
``from_parquet``, in memory, with `datasets`' cache in a temporary folder that is deleted at once (nothing is left
under ``~/.cache`` or next to the file).

* **Prompts** come from one column (`prompt_column`, default ``"prompt"``). A prompt is a non-blank string or a
  conversation, a list of ``{"role": ..., "content": ...}`` messages, which the env renders through the tokenizer's
  chat template (`rlhf_env.chat`). Everything is checked when the task is built: a missing column, an empty
  dataset or a prompt of another type is a `ValueError` naming the split (or file), the row and the column.
* **Splits.** A `DatasetDict`, or a dict of splits (`Dataset` objects or files), gives train and eval prompts as
  they are when `eval_split` names one (duplicates within a split dropped, dataset order kept). Otherwise the
  distinct prompts of the train split (or of the one dataset or file) are split into train and eval by
  `eval_fraction` with `seed`, reproducibly: the same data and seed give the same split on every run.
* **Gold.** ``gold(prompt, response) -> float`` is the true reward, as for every task; a gold that needs more of
  the row names those columns as parameters, ``gold(prompt, response, answer)``, and gets the prompt's values by
  keyword (every column with ``**columns``), the convention of the env's batched reward functions. A prompt that
  appears twice must then have the same values in those columns. Without `gold` the task has no gold reward:
  ``gold`` returns NaN (``gold_score`` in the env's info), and training needs a reward model or a reward function.

>>> from datasets import Dataset
>>> data = Dataset.from_dict({"question": ["2 + 2", "3 + 4", "1 + 1", "5 + 0"], "answer": ["4", "7", "2", "5"]})
>>> task = DatasetTask(data, gold=lambda prompt, response, answer: float(response.strip() == answer),
...                    prompt_column="question", eval_fraction=0.25)
>>> sorted(task.train_prompts()), task.eval_prompts()
(['1 + 1', '2 + 2', '5 + 0'], ['3 + 4'])
>>> task.gold("3 + 4", "7"), task.gold("3 + 4", "8")
(1.0, 0.0)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from rlhf_env.chat import check_prompt, prompt_key, prompt_text
from rlhf_env.tasks.base import AnnotatorConfig, Task, split_prompts
from rlhf_env.tasks.custom import DEFAULT_ANNOTATOR, WellFormedFn, check_task_settings

INSTALL_HINT = 'pip install "rlhf-gym[datasets]"'
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def import_datasets():
    """The `datasets` module, or an `ImportError` saying how to install it."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"prompts from datasets need the datasets package: {INSTALL_HINT}") from error
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """No "Generating train split" progress bars while a file is read."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_dataset_file(path: str | os.PathLike):
    """A local ``.json`` (a JSON array or JSON Lines), ``.jsonl``, ``.csv`` or ``.parquet`` file as an in-memory
    `datasets.Dataset`, read by `datasets`' own readers with their cache in a temporary folder that is deleted
    before this returns (no download, no cache left behind).

    Raises:
        ValueError: the file is missing, has another suffix, or cannot be read in its format (an empty file
            included); the message names the file.
        ImportError: `datasets` is not installed.
    """
    datasets = import_datasets()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist or is not a file")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"dataset file {path}: expected a {', '.join(FILE_FORMATS)} file, got suffix "
                         f"{path.suffix!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"dataset file {path} is empty")
    read = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
            "parquet": datasets.Dataset.from_parquet}[kind]
    with tempfile.TemporaryDirectory(prefix="rlhf-gym-datasets-") as cache, _quiet(datasets):
        try:
            return read(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as error:
            raise ValueError(f"dataset file {path}: cannot be read as {kind} ({type(error).__name__}: "
                             f"{error})") from error


class DatasetTask(Task):
    """A task whose prompts come from a dataset (module docstring for the sources, splits and gold).

    Args:
        data: a `datasets.Dataset`, a `datasets.DatasetDict` (or any dict of split name → `Dataset` or file), or
            the path of a local ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file.
        gold: ``gold(prompt, response, **columns) -> float``, the true reward (module docstring), or None for a
            task without one (``gold`` is NaN).
        prompt_column: the column that holds the prompts (strings or conversations).
        train_split: the split the train prompts come from, when `data` is a dict of splits.
        eval_split: the split of the eval prompts, when `data` is a dict of splits; None splits the train split by
            `eval_fraction` and `seed` (the only case in which those two matter).
        eval_fraction: share of the distinct prompts held out for evaluation when the task splits them itself.
        seed: seeds that split.
        name: the task's name in logs and result files.
        max_new_tokens: response length cap.
        best_gold: the best gold reward any response can reach (reported next to results).
        annotator: how simulated annotators turn gold rewards into preferences.
        well_formed: ``well_formed(prompt, response) -> bool``; `None` means "the response is not blank".

    Raises:
        ValueError: a missing file, split or column; an empty dataset; a prompt that is not a non-blank string or a
            well-formed conversation; fewer than 2 distinct prompts to split; a column `gold` asks for that the data
            lacks, or whose values differ between two rows of one prompt; an argument out of range.
        TypeError: `gold` or `well_formed` is not callable, or `annotator` is not an `AnnotatorConfig`.
        ImportError: `datasets` is not installed.
    """

    def __init__(
        self,
        data,
        gold: Callable[..., float] | None = None,
        *,
        prompt_column: str = "prompt",
        train_split: str = "train",
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
        name: str = "dataset",
        max_new_tokens: int = 32,
        best_gold: float = 1.0,
        annotator: AnnotatorConfig = DEFAULT_ANNOTATOR,
        well_formed: WellFormedFn | None = None,
    ):
        datasets = import_datasets()
        if gold is not None and not callable(gold):
            raise TypeError(f"gold must be None or a function gold(prompt, response, **columns) -> float, got "
                            f"{type(gold).__name__}")
        check_task_settings(name, max_new_tokens, annotator, well_formed)
        if not isinstance(prompt_column, str) or not prompt_column:
            raise ValueError(f"prompt_column must be a column name (a non-empty string), got {prompt_column!r}")
        self.name, self.max_new_tokens, self.best_gold, self.annotator = (
            name, max_new_tokens, float(best_gold), annotator)
        self._gold, self._well_formed, self.prompt_column = gold, well_formed, prompt_column
        splits = _sources(datasets, data, train_split, eval_split)  # [(label, Dataset)]: train, then eval if given
        for label, dataset in splits:
            _check_columns(label, dataset, prompt_column)
        self.gold_columns = _gold_columns(gold, splits, prompt_column)
        self._rows: dict = {}  # prompt key -> the values of gold_columns in its row
        read = [self._read(label, dataset) for label, dataset in splits]
        if eval_split is None:
            self._train, self._eval = _split(read[0], splits[0][0], eval_fraction, seed)
        else:
            self._train, self._eval = _unique(read[0]), _unique(read[1])
        self.num_rows = sum(len(dataset) for _, dataset in splits)

    def _read(self, label: str, dataset) -> list:
        """The checked prompts of `dataset` in row order, recording the gold columns of each prompt's row."""
        where = f"{label}, column {self.prompt_column!r}"
        dataset = dataset.with_format(None)  # Python objects, whatever format (numpy, torch) the dataset was set to
        prompts = [check_prompt(prompt, f"{where}, row {i}") for i, prompt in enumerate(dataset[self.prompt_column])]
        if self.gold_columns:
            values = {column: list(dataset[column]) for column in self.gold_columns}
            for i, prompt in enumerate(prompts):
                row = {column: values[column][i] for column in self.gold_columns}
                seen = self._rows.setdefault(prompt_key(prompt), row)
                for column in self.gold_columns:
                    if seen[column] != row[column]:
                        raise ValueError(
                            f"{label}, row {i}: the prompt {_shown(prompt)} appears in another row with another "
                            f"{column!r} ({_shown(seen[column])} vs {_shown(row[column])}); gold takes {column!r}, "
                            f"so each prompt needs one value")
        return prompts

    def train_prompts(self) -> list:
        return list(self._train)

    def eval_prompts(self) -> list:
        return list(self._eval)

    def demonstrations(self, n: int, rng: np.random.Generator, split: str = "train") -> list[tuple[str, str]]:
        """A `DatasetTask` holds prompts only: `ValueError` (supervised fine-tuning needs demonstrations)."""
        raise ValueError(f"task {self.name!r} has no demonstrations: a DatasetTask holds prompts only; supervised "
                         "fine-tuning needs FileTask(..., demonstrations_path='demos.jsonl')")

    def gold(self, prompt, response: str) -> float:
        """``gold(prompt, response, **columns)`` of the user's function, with the prompt's row values of the columns
        it takes; NaN without a gold function. `ValueError` for a prompt outside the data when columns are needed.
        """
        if self._gold is None:
            return math.nan
        if not self.gold_columns:
            return float(self._gold(prompt, response))
        row = self._rows.get(prompt_key(prompt))
        if row is None:
            raise ValueError(f"task {self.name!r}: gold takes the columns {list(self.gold_columns)} of the prompt's "
                             f"row, but the prompt {_shown(prompt)} is not in the dataset")
        return float(self._gold(prompt, response, **row))

    def is_well_formed(self, prompt, response: str) -> bool:
        if self._well_formed is None:
            return super().is_well_formed(prompt, response)
        return bool(self._well_formed(prompt, response))

    def tokenizer_corpus(self, rng: np.random.Generator, n: int = 5000) -> list[str]:
        """Every prompt as text (a conversation's contents): the data is the whole corpus (`rng` and `n` unused)."""
        return [prompt_text(prompt) for prompt in self._train + self._eval]

    def __repr__(self) -> str:
        return (f"DatasetTask(name={self.name!r}, prompt_column={self.prompt_column!r}, train={len(self._train)}, "
                f"eval={len(self._eval)})")


def _sources(datasets, data, train_split: str, eval_split: str | None) -> list[tuple[str, object]]:
    """``[(label, Dataset)]`` for the train split and, when `eval_split` is given, the eval split; each label names
    the split or file in messages."""
    if isinstance(data, datasets.IterableDataset | datasets.IterableDatasetDict):
        raise ValueError("data is a streaming (iterable) dataset; DatasetTask needs every prompt up front: load it "
                         "without streaming=True")
    if isinstance(data, Mapping):
        names = list(data)
        wanted = [train_split] + ([] if eval_split is None else [eval_split])
        for split in wanted:
            if split not in data:
                raise ValueError(f"data has no split {split!r}; its splits are {names} (pass train_split= and "
                                 "eval_split=)")
        if eval_split == train_split:
            raise ValueError(f"eval_split and train_split are both {train_split!r}; leave eval_split=None to split "
                             "it by eval_fraction")
        return [_source(datasets, data[split], f"split {split!r}") for split in wanted]
    if eval_split is not None:
        raise ValueError(f"eval_split={eval_split!r} names a split of a DatasetDict (or a dict of splits), but data "
                         "is a single dataset: leave eval_split=None to split it by eval_fraction")
    return [_source(datasets, data, "the dataset")]


def _source(datasets, data, label: str) -> tuple[str, object]:
    if isinstance(data, (str, os.PathLike)):
        return (f"dataset file {data}" if label == "the dataset" else f"{label} (file {data})",
                load_dataset_file(data))
    if isinstance(data, datasets.Dataset):
        return label, data
    raise ValueError(f"{label}: expected a datasets.Dataset, a DatasetDict or dict of splits, or the path of a "
                     f"{', '.join(FILE_FORMATS)} file, got {type(data).__name__}")


def _check_columns(label: str, dataset, prompt_column: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{label} is empty (no rows)")
    if prompt_column not in dataset.column_names:
        raise ValueError(f"{label} has no column {prompt_column!r} (its columns are {dataset.column_names}); pass "
                         "prompt_column= to name the prompts' column")


def _gold_columns(gold, splits, prompt_column: str) -> tuple[str, ...]:
    """The columns `gold` takes besides (prompt, response): the names of its further parameters (those with a
    default only if the data has them), or every other column for ``**columns``; `ValueError` for a required one
    that a split lacks."""
    if gold is None:
        return ()
    try:
        parameters = list(inspect.signature(gold).parameters.values())[2:]
    except (TypeError, ValueError):
        return ()
    common = [c for c in splits[0][1].column_names if c != prompt_column
              and all(c in dataset.column_names for _, dataset in splits)]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return tuple(common)
    out = []
    for p in parameters:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if p.name in common:
            out.append(p.name)
        elif p.default is p.empty:
            lacking = next((label for label, dataset in splits if p.name not in dataset.column_names), "the data")
            raise ValueError(f"gold takes {p.name!r}, but {lacking} has no column {p.name!r} (gold(prompt, response, "
                             f"...) gets the row's values of the columns it names; columns: "
                             f"{splits[0][1].column_names})")
    return tuple(out)


def _unique(prompts: list) -> list:
    """`prompts` without repeats, in first-seen order."""
    seen, out = set(), []
    for prompt in prompts:
        key = prompt_key(prompt)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out


def _split(prompts: list, label: str, eval_fraction: float, seed: int) -> tuple[list, list]:
    """The distinct `prompts` split into (train, eval) by `rlhf_env.tasks.base.split_prompts`: strings are ordered
    as they are, conversations by their JSON text, so the split is the same on every run."""
    by_text = {p if isinstance(p, str) else json.dumps(p, sort_keys=True, ensure_ascii=False): p for p in prompts}
    if len(by_text) < 2:
        raise ValueError(f"{label}: need at least 2 distinct prompts to split into train and eval, got "
                         f"{len(by_text)}")
    train, eval_ = split_prompts(list(by_text), eval_fraction, seed)
    return [by_text[t] for t in train], [by_text[t] for t in eval_]


def _shown(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
