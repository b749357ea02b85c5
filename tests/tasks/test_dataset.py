"""DatasetTask: prompts from a `datasets.Dataset`, a DatasetDict or local JSON/JSONL/CSV/Parquet files (no download,
no cache left behind), splits given or drawn by seed, a gold that reads the row's columns, and a named error for a
missing column, an empty dataset or a prompt that is neither a string nor a conversation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
Dataset, DatasetDict = datasets.Dataset, datasets.DatasetDict

from rlhf_env.env import RLHFEnv  # noqa: E402
from rlhf_env.models import build_policy  # noqa: E402
from rlhf_env.tasks import DatasetTask, FileTask  # noqa: E402

PROMPTS = [f"question {i}" for i in range(20)]


def exact(prompt, response, answer):
    return float(response == str(answer))  # a CSV reader makes "3" the number 3


def rows(prompts=PROMPTS):
    return {"prompt": list(prompts), "answer": [p.split()[-1] for p in prompts]}


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": "answer with a number"}, {"role": "user", "content": f"question {i}"}]


def write(path, kind: str, data: dict) -> None:
    """`data` (columns) as a file of `kind`: jsonl, json (an array), csv or parquet."""
    records = [dict(zip(data, values)) for values in zip(*data.values())]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(data))
            writer.writeheader()
            writer.writerows(records)
    else:
        Dataset.from_dict(data).to_parquet(str(path))


def test_a_dataset_is_split_reproducibly_by_seed():
    data = Dataset.from_dict(rows(PROMPTS + PROMPTS[:5]))  # repeats count once
    task = DatasetTask(data.with_format("numpy"), gold=exact)  # read as Python objects whatever the format
    train, eval_ = task.train_prompts(), task.eval_prompts()
    assert sorted(train + eval_) == sorted(PROMPTS) and not set(train) & set(eval_) and len(eval_) == 2
    again = DatasetTask(Dataset.from_dict(rows(PROMPTS[::-1])), gold=exact)  # row order does not matter
    assert (again.train_prompts(), again.eval_prompts()) == (train, eval_)
    assert len({tuple(DatasetTask(data, gold=exact, seed=s).eval_prompts()) for s in range(5)}) > 1
    assert len(DatasetTask(data, eval_fraction=0.5).eval_prompts()) == 10


def test_conversations_are_split_reproducibly_whatever_the_order_of_rows_and_keys():
    conversations = [conversation(i) for i in range(10)]
    swapped = [[{"content": m["content"], "role": m["role"]} for m in c] for c in conversations[::-1]]
    for prompts in (conversations, swapped):
        data = Dataset.from_dict({"messages": prompts}).with_format("numpy")  # read as Python lists all the same
        task = DatasetTask(data, prompt_column="messages", eval_fraction=0.2)
        assert [p[-1]["content"] for p in task.eval_prompts()] == ["question 4", "question 6"]  # pinned: seed 0
        assert len(task.train_prompts()) == 8


def test_the_split_is_that_of_a_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS))
    for seed in range(3):
        file, data = FileTask(path, gold=lambda p, r: 0.0, seed=seed), DatasetTask(Dataset.from_dict(rows()), seed=seed)
        assert (file.train_prompts(), file.eval_prompts()) == (data.train_prompts(), data.eval_prompts())


def test_given_splits_are_used_as_they_are():
    data = DatasetDict(train=Dataset.from_dict(rows(PROMPTS[:6] + PROMPTS[:2])),
                       test=Dataset.from_dict(rows(PROMPTS[10:13])))
    task = DatasetTask(data, gold=exact, eval_split="test")
    assert task.train_prompts() == PROMPTS[:6] and task.eval_prompts() == PROMPTS[10:13]
    assert task.gold("question 11", "11") == 1.0
    split = DatasetTask(data, gold=exact)  # no eval_split: the train split is split by eval_fraction
    assert sorted(split.train_prompts() + split.eval_prompts()) == sorted(PROMPTS[:6])
    named = DatasetTask({"dev": data["test"], "all": data["train"]}, train_split="all", eval_split="dev")
    assert named.eval_prompts() == PROMPTS[10:13]
    with pytest.raises(ValueError, match=r"data has no split 'validation'; its splits are \['train', 'test'\]"):
        DatasetTask(data, eval_split="validation")
    with pytest.raises(ValueError, match="data has no split 'train'"):
        DatasetTask({"all": data["train"]})
    with pytest.raises(ValueError, match="names a split of a DatasetDict .* but data is a single dataset"):
        DatasetTask(data["train"], eval_split="test")
    with pytest.raises(ValueError, match="eval_split and train_split are both 'train'"):
        DatasetTask(data, eval_split="train")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_files_are_read_locally_and_leave_no_cache(tmp_path, monkeypatch, kind):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))  # where datasets caches by default
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / f"prompts.{kind}"
    write(path, kind, rows())
    task = DatasetTask(path, gold=exact)
    assert sorted(task.train_prompts() + task.eval_prompts()) == sorted(PROMPTS)
    assert task.gold("question 3", "3") == 1.0
    assert list(folder.iterdir()) == [path] and not cache.exists()


def test_conversations_from_jsonl_and_parquet_and_a_dict_of_files(tmp_path):
    data = {"messages": [conversation(i) for i in range(6)], "answer": [str(i) for i in range(6)]}
    write(tmp_path / "chat.jsonl", "jsonl", data)
    write(tmp_path / "chat.parquet", "parquet", data)
    for path in (tmp_path / "chat.jsonl", tmp_path / "chat.parquet"):
        task = DatasetTask(path, gold=exact, prompt_column="messages", eval_fraction=0.5)
        prompts = task.train_prompts() + task.eval_prompts()
        assert sorted(prompts, key=json.dumps) == sorted(data["messages"], key=json.dumps)
        assert task.gold(conversation(4), "4") == 1.0 and task.gold(conversation(4), "5") == 0.0
    write(tmp_path / "test.csv", "csv", rows(["what is 1", "what is 2"]))
    write(tmp_path / "train.jsonl", "jsonl", rows(PROMPTS[:4]))
    task = DatasetTask({"train": tmp_path / "train.jsonl", "test": str(tmp_path / "test.csv")}, eval_split="test")
    assert (task.train_prompts(), task.eval_prompts()) == (PROMPTS[:4], ["what is 1", "what is 2"])


def test_a_missing_column_or_an_empty_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"the dataset has no column 'prompt' \(its columns are \['text'\]\); pass "
                                         "prompt_column="):
        DatasetTask(Dataset.from_dict({"text": PROMPTS}))
    path = tmp_path / "p.csv"
    write(path, "csv", {"text": PROMPTS})
    with pytest.raises(ValueError, match=f"dataset file {path} has no column 'question'"):
        DatasetTask(path, prompt_column="question")
    with pytest.raises(ValueError, match="split 'test' has no column 'prompt'"):
        DatasetTask({"train": Dataset.from_dict(rows()), "test": Dataset.from_dict({"q": ["x"]})}, eval_split="test")
    with pytest.raises(ValueError, match="the dataset is empty"):
        DatasetTask(Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="split 'test' is empty"):
        DatasetTask(DatasetDict(train=Dataset.from_dict(rows()), test=Dataset.from_dict({"prompt": []})),
                    eval_split="test")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"dataset file {empty} is empty"):
        DatasetTask(empty)
    header = tmp_path / "header.csv"
    header.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=f"dataset file {header}"):
        DatasetTask(header)
    with pytest.raises(ValueError, match="need at least 2 distinct prompts"):
        DatasetTask(Dataset.from_dict({"prompt": ["same", "same"]}))


@pytest.mark.parametrize("values, message", [
    ([1, 2, 3], "row 0: expected a string or a conversation .* got int 1"),
    (["a", None, "c"], "row 1: expected a string or a conversation .* got NoneType None"),
    ([{"text": "a"}, {"text": "b"}], "row 0: expected a string or a conversation .* got dict"),
    (["a", "  "], "row 1: the prompt is blank"),
    ([[{"role": "user", "content": "a"}], [{"role": "user"}]], r"row 1, message 0: 'content' must be a string"),
    ([[{"role": "user", "content": "a"}], []], "row 1: the conversation has no messages"),
    ([["a", "b"], ["c"]], "row 0, message 0: expected a dict"),
])
def test_a_prompt_that_is_not_a_string_or_a_conversation_is_named(values, message):
    with pytest.raises(ValueError, match=f"the dataset, column 'prompt', {message}"):
        DatasetTask(Dataset.from_dict({"prompt": values}))


def test_numbers_in_a_csv_file_are_not_prompts(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("prompt\n1\n2\n3\n")
    with pytest.raises(ValueError, match=f"dataset file {path}, column 'prompt', row 0: .* got int 1"):
        DatasetTask(path)


def test_a_bad_file_or_data_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        DatasetTask(tmp_path / "missing.jsonl")
    other = tmp_path / "prompts.txt"
    other.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"expected a \.json, \.jsonl, \.csv, \.parquet file, got suffix '\.txt'"):
        DatasetTask(other)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=f"dataset file {broken}: cannot be read as json"):
        DatasetTask(broken)
    with pytest.raises(ValueError, match="the dataset: expected a datasets.Dataset, .* got list"):
        DatasetTask(PROMPTS)
    with pytest.raises(ValueError, match="streaming"):
        DatasetTask(Dataset.from_dict(rows()).to_iterable_dataset())
    with pytest.raises(ValueError, match="prompt_column must be a column name"):
        DatasetTask(Dataset.from_dict(rows()), prompt_column="")
    with pytest.raises(TypeError, match="gold must be None or a function"):
        DatasetTask(Dataset.from_dict(rows()), gold="exact")
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        DatasetTask(Dataset.from_dict(rows()), eval_fraction=1.5)


def test_gold_gets_the_columns_it_names():
    data = Dataset.from_dict(rows() | {"weight": [2.0] * 20})
    seen = []

    def every(prompt, response, **columns):
        seen.append(columns)
        return 1.0

    assert DatasetTask(data, gold=every).gold("question 1", "x") == 1.0 and seen == [{"answer": "1", "weight": 2.0}]
    weighted = DatasetTask(data, gold=lambda p, r, weight, bonus=0.5: weight + bonus)  # bonus is no column
    assert weighted.gold_columns == ("weight",) and weighted.gold("question 1", "x") == 2.5
    assert weighted.gold_reward(["question 1", "question 2"], ["x", "y"]) == [2.5, 2.5]
    plain = DatasetTask(data, gold=lambda p, r: float(len(r)))
    assert plain.gold_columns == () and plain.gold("not in the data", "abc") == 3.0
    with pytest.raises(ValueError, match="gold takes 'reference', but the dataset has no column 'reference'"):
        DatasetTask(data, gold=lambda p, r, reference: 0.0)
    with pytest.raises(ValueError, match="gold takes the columns \\['answer'\\] of the prompt's row, but the prompt "
                                         "'elsewhere' is not in the dataset"):
        DatasetTask(data, gold=exact).gold("elsewhere", "1")


def test_a_repeated_prompt_must_agree_on_the_gold_columns():
    data = Dataset.from_dict({"prompt": ["a", "b", "a"], "answer": ["1", "2", "3"], "id": [0, 1, 2]})
    with pytest.raises(ValueError, match="row 2: the prompt 'a' appears in another row with another 'answer' "
                                         r"\('1' vs '3'\)"):
        DatasetTask(data, gold=exact)
    assert DatasetTask(data, gold=lambda p, r: 0.0).train_prompts()  # columns gold does not take may differ


def test_without_gold_the_gold_is_nan_and_there_are_no_demonstrations():
    task = DatasetTask(Dataset.from_dict({"messages": [conversation(i) for i in range(4)]}),
                       prompt_column="messages", name="chat", max_new_tokens=8)
    assert math.isnan(task.gold(conversation(1), "1"))
    assert (task.name, task.max_new_tokens) == ("chat", 8)
    with pytest.raises(ValueError, match="a DatasetTask holds prompts only"):
        task.demonstrations(2, np.random.default_rng(0))
    assert sorted(task.tokenizer_corpus(np.random.default_rng(0))) == sorted(
        f"answer with a number\nquestion {i}" for i in range(4))
    assert task.is_well_formed(conversation(1), "x") and not task.is_well_formed(conversation(1), " ")


def test_without_datasets_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "rlhf-gym\[datasets\]"'):
        DatasetTask("prompts.jsonl")


def test_rlhf_gym_imports_without_datasets():
    code = ("import sys; sys.modules['datasets'] = None\n"
            "import gymnasium, rlhf_env, rlhf_env.env, rlhf_env.vector_env, rlhf_env.tasks\n"
            "from rlhf_env.tasks import DatasetTask\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_env_on_a_dataset_task(tokenizer):
    words = ["the plot was", "the acting was not", "honestly , the story was", "the cast was"]
    task = DatasetTask(Dataset.from_dict({"text": words, "target": ["good", "bad", "good", "bad"]}),
                       gold=lambda prompt, response, target: float(target in response.split()),
                       prompt_column="text", eval_fraction=0.25, max_new_tokens=3)
    env = RLHFEnv(task=task, tokenizer=tokenizer, policy=build_policy(tokenizer, seed=0),
                  reference=build_policy(tokenizer, seed=1), reward_fn=task.gold_reward)
    _, info = env.reset(seed=0, options={"prompt": "the acting was not"})
    env.step(tokenizer.convert_tokens_to_ids("bad"))
    _, reward, terminated, _, end = env.step(tokenizer.eos_token_id)
    assert terminated and end["response_text"] == "bad" and end["gold_score"] == end["score"] == 1.0
    _, info = env.reset(seed=0, options={"split": "eval"})
    assert info["prompt"] in task.eval_prompts()
