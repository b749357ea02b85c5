"""FileTask: loading prompts and demonstrations from users' files, and rejecting bad files with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_env.tasks import FileTask
from rlhf_env.tasks.base import AnnotatorConfig

PROMPTS = [f"question {i}" for i in range(20)]


def exact_match(prompt: str, response: str) -> float:
    return float(response == prompt.split()[-1])


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:10]) + "\n\n   \n" + "\n".join(f"  {p}  " for p in PROMPTS[10:]) + "\n")
    return path


@pytest.fixture
def demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    records = [{"prompt": p, "response": p.split()[-1], "note": "extra fields are ignored"} for p in PROMPTS]
    records.append({"prompt": "a prompt outside the prompts file", "response": "x"})
    write_jsonl(path, records)
    return path


def test_loads_txt_ignoring_blank_lines_and_surrounding_spaces(txt):
    task = FileTask(txt, gold=exact_match)
    train, eval_ = task.train_prompts(), task.eval_prompts()
    assert sorted(train + eval_) == sorted(PROMPTS)
    assert not set(train) & set(eval_)
    assert len(eval_) == 2


def test_loads_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    path.write_text(path.read_text() + "\n")  # a trailing blank line is fine
    task = FileTask(path, gold=exact_match)
    assert sorted(task.train_prompts() + task.eval_prompts()) == sorted(PROMPTS)


def test_split_deterministic_and_seeded(txt):
    a, b = FileTask(txt, gold=exact_match, seed=3), FileTask(txt, gold=exact_match, seed=3)
    assert (a.train_prompts(), a.eval_prompts()) == (b.train_prompts(), b.eval_prompts())
    splits = {tuple(FileTask(txt, gold=exact_match, seed=s).eval_prompts()) for s in range(5)}
    assert len(splits) > 1
    assert len(FileTask(txt, gold=exact_match, eval_fraction=0.5).eval_prompts()) == 10


def test_settings_and_callables(txt):
    annotator = AnnotatorConfig(flip_prob=0.2, length_bonus=0.05)
    task = FileTask(txt, gold=lambda p, r: 1, name="mine", max_new_tokens=8, best_gold=2, annotator=annotator,
                    well_formed=lambda p, r: r.isupper())  # fmt: skip
    assert (task.name, task.max_new_tokens, task.best_gold, task.annotator) == ("mine", 8, 2.0, annotator)
    assert task.gold("question 1", "1") == 1.0 and isinstance(task.gold("question 1", "1"), float)
    assert task.is_well_formed("question 1", "ABC") and not task.is_well_formed("question 1", "abc")
    default = FileTask(txt, gold=exact_match)
    assert default.gold("question 3", "3") == 1.0 and default.gold("question 3", "4") == 0.0
    assert default.is_well_formed("question 3", "x") and not default.is_well_formed("question 3", "  ")
    assert default.log_prob("question 3", "3") is None


def test_demonstrations_sampled_per_split(txt, demos):
    task = FileTask(txt, gold=exact_match, demonstrations_path=demos)
    rng_demos = task.demonstrations(200, np.random.default_rng(0))
    assert rng_demos == task.demonstrations(200, np.random.default_rng(0))
    assert rng_demos != task.demonstrations(200, np.random.default_rng(1))
    eval_set = set(task.eval_prompts())
    assert not any(p in eval_set for p, _ in rng_demos)
    # prompts outside the prompts file count as train demonstrations
    assert ("a prompt outside the prompts file", "x") in rng_demos
    assert len(set(rng_demos)) == 18 + 1
    eval_demos = task.demonstrations(50, np.random.default_rng(0), split="eval")
    assert {p for p, _ in eval_demos} == eval_set
    assert all(exact_match(p, r) == 1.0 for p, r in eval_demos)
    assert task.demonstrations(0, np.random.default_rng(0)) == []


def test_demonstrations_need_a_file(txt):
    task = FileTask(txt, gold=exact_match)
    with pytest.raises(ValueError, match="demonstrations file"):
        task.demonstrations(5, np.random.default_rng(0))
    assert sorted(task.tokenizer_corpus(np.random.default_rng(0))) == sorted(PROMPTS)  # works without demos


def test_split_without_demonstrations_raises(txt, tmp_path):
    task = FileTask(txt, gold=exact_match)
    path = tmp_path / "train_only.jsonl"
    write_jsonl(path, [{"prompt": p, "response": "r"} for p in task.train_prompts()])
    task = FileTask(txt, gold=exact_match, demonstrations_path=path)
    assert len(task.demonstrations(5, np.random.default_rng(0))) == 5
    with pytest.raises(ValueError, match="no demonstration for a prompt of the eval split"):
        task.demonstrations(5, np.random.default_rng(0), split="eval")
    with pytest.raises(ValueError, match="split"):
        task.demonstrations(5, np.random.default_rng(0), split="test")


def test_tokenizer_corpus_covers_prompts_and_demonstrations(txt, demos):
    corpus = FileTask(txt, gold=exact_match, demonstrations_path=demos).tokenizer_corpus(np.random.default_rng(0))
    assert set(PROMPTS) <= set(corpus)
    assert "a prompt outside the prompts file x" in corpus


# --- bad input: each case names the file, and the line where there is one ---------------------------------------


@pytest.mark.parametrize(
    ("lines", "line_number", "problem"),
    [
        (['{"prompt": "ok"}', "{not json"], 2, "not valid JSON"),
        (['{"prompt": "ok"}', "", '{"text": "no prompt"}'], 3, "missing the 'prompt' field"),
        (['{"prompt": 3}'], 1, "must be a string, got int"),
        (['{"prompt": "ok"}', '{"prompt": "ok 2"}', '{"prompt": "   "}'], 3, "blank"),
        (['{"prompt": "ok"}', '["prompt"]'], 2, "expected a JSON object, got list"),
    ],
)
def test_bad_prompt_lines(tmp_path, lines, line_number, problem):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=problem) as err:
        FileTask(path, gold=exact_match)
    assert f"{path}, line {line_number}:" in str(err.value)


@pytest.mark.parametrize(
    ("lines", "line_number", "problem"),
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], 2, "missing the 'response' field"),
        (['{"prompt": "a", "response": ["b"]}'], 1, "must be a string, got list"),
        (['{"prompt": "", "response": "b"}'], 1, "'prompt' field is blank"),
        (['{"prompt": "a", "response": "b"}', "", "", "oops"], 4, "not valid JSON"),
    ],
)
def test_bad_demonstration_lines(txt, tmp_path, lines, line_number, problem):
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=problem) as err:
        FileTask(txt, gold=exact_match, demonstrations_path=path)
    assert f"{path}, line {line_number}:" in str(err.value)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_missing_prompts_file(tmp_path, name):
    with pytest.raises(ValueError, match="does not exist") as err:
        FileTask(tmp_path / name, gold=exact_match)
    assert str(tmp_path / name) in str(err.value)


def test_missing_demonstrations_file(txt, tmp_path):
    with pytest.raises(ValueError, match="demonstrations file .*missing.jsonl does not exist"):
        FileTask(txt, gold=exact_match, demonstrations_path=tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("name", "text"), [("empty.txt", ""), ("blank.txt", "\n  \n\n"), ("empty.jsonl", "\n")])
def test_empty_prompts_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="no prompts") as err:
        FileTask(path, gold=exact_match)
    assert str(path) in str(err.value)


def test_empty_demonstrations_file(txt, tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="no demonstrations"):
        FileTask(txt, gold=exact_match, demonstrations_path=path)


def test_one_distinct_prompt_cannot_be_split(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("same\nsame\n")
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        FileTask(path, gold=exact_match)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        FileTask(path, gold=exact_match)


def test_not_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        FileTask(path, gold=exact_match)


def test_bad_arguments(txt):
    with pytest.raises(TypeError, match="gold must be a function"):
        FileTask(txt, gold=1.0)
    with pytest.raises(TypeError, match="well_formed"):
        FileTask(txt, gold=exact_match, well_formed=True)
    with pytest.raises(TypeError, match="AnnotatorConfig"):
        FileTask(txt, gold=exact_match, annotator={"flip_prob": 0.1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        FileTask(txt, gold=exact_match, max_new_tokens=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        FileTask(txt, gold=exact_match, eval_fraction=1.0)
