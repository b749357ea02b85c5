"""ArithmeticTask: gold reward, prompt split, the noisy teacher and its exact log-probabilities."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from rlhf_env.tasks import TASKS, get_task
from rlhf_env.tasks.arithmetic import (
    P_ERROR,
    ArithmeticTask,
    digits,
    forgotten_carry_answers,
    parse_number,
    parse_prompt,
    sample_teacher,
    teacher_distribution,
)


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("4 7 + 3 8 =", "8 5", 1.0),
        ("4 7 + 3 8 =", "7 5", 0.0),  # forgot the carry
        ("4 7 + 3 8 =", "8 6", 0.0),  # off by one
        ("9 9 + 9 9 =", "1 9 8", 1.0),
        ("5 2 - 3 8 =", "1 4", 1.0),
        ("5 2 - 3 8 =", "2 4", 0.0),  # forgot the borrow
        ("7 - 7 =", "0", 1.0),
        ("0 + 0 =", "0", 1.0),
        ("4 7 + 3 8 =", "0 8 5", 0.0),  # leading zero
        ("4 7 + 3 8 =", "85", 0.0),  # not digit by digit
        ("4 7 + 3 8 =", "8 5 =", 0.0),
        ("4 7 + 3 8 =", "", 0.0),
        ("7 - 7 =", "0 0", 0.0),
    ],
)
def test_gold_hand_picked(task, prompt, response, expected):
    assert task.gold(prompt, response) == expected


@pytest.mark.parametrize(
    ("response", "well_formed"),
    [("8 5", True), ("0", True), ("1 0 0", True), ("", False), ("  ", False), ("0 5", False), ("85", False),
     ("8 x", False), ("- 5", False), ("²", False)],
)  # fmt: skip
def test_is_well_formed(task, response, well_formed):
    assert task.is_well_formed("4 7 + 3 8 =", response) is well_formed


def test_perfect_answer_reaches_best_gold(task):
    for prompt in task.eval_prompts()[:200]:
        a, op, b = parse_prompt(prompt)
        assert task.gold(prompt, digits(a + b if op == "+" else a - b)) == task.best_gold


@pytest.mark.parametrize("prompt", ["4 7 + 3 8", "47 + 38 =", "3 8 - 4 7 =", "1 0 0 + 1 =", "4 7 * 3 8 =", ""])
def test_parse_prompt_rejects_non_task_prompts(prompt):
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        parse_prompt(prompt)


def test_prompt_split_disjoint_complete_and_deterministic():
    task = ArithmeticTask(seed=0)
    train, eval_ = task.train_prompts(), task.eval_prompts()
    assert not set(train) & set(eval_)
    assert len(train) + len(eval_) == 100 * 100 + 100 * 101 // 2  # sums, and differences with a >= b
    assert len(eval_) == round(0.1 * (len(train) + len(eval_)))
    again = ArithmeticTask(seed=0)
    assert (again.train_prompts(), again.eval_prompts()) == (train, eval_)
    assert set(ArithmeticTask(seed=1).eval_prompts()) != set(eval_)
    assert all(parse_prompt(p) for p in train + eval_)


def test_forgotten_carries():
    assert forgotten_carry_answers(47, "+", 38) == [75]
    assert forgotten_carry_answers(95, "+", 5) == [90, 0]
    assert forgotten_carry_answers(99, "+", 99) == [188, 98]
    assert forgotten_carry_answers(12, "+", 34) == []
    assert forgotten_carry_answers(52, "-", 38) == [24]
    assert forgotten_carry_answers(58, "-", 32) == []


def test_teacher_distribution_is_a_distribution_with_the_stated_accuracy(task):
    for prompt in task.train_prompts()[::50]:
        a, op, b = parse_prompt(prompt)
        dist = teacher_distribution(a, op, b)
        assert sum(dist.values()) == pytest.approx(1.0)
        assert dist[a + b if op == "+" else a - b] == pytest.approx(1 - P_ERROR)
        assert all(p > 0 for p in dist.values())
        assert all(len(digits(answer).split()) < task.max_new_tokens for answer in dist)  # + EOS fits


def test_demonstrations_deterministic_and_well_formed(task):
    first = task.demonstrations(300, np.random.default_rng(7))
    assert first == task.demonstrations(300, np.random.default_rng(7))
    assert first != task.demonstrations(300, np.random.default_rng(8))
    assert all(task.is_well_formed(p, r) for p, r in first)
    train = set(task.train_prompts())
    assert all(p in train for p, _ in first)
    eval_set = set(task.eval_prompts())
    assert all(p in eval_set for p, _ in task.demonstrations(100, np.random.default_rng(7), split="eval"))
    with pytest.raises(ValueError, match="split"):
        task.demonstrations(1, np.random.default_rng(0), split="test")


def test_teacher_accuracy_near_documented_value(task):
    demos = task.demonstrations(2000, np.random.default_rng(0))
    accuracy = np.mean([task.gold(p, r) for p, r in demos])
    assert abs(accuracy - (1 - P_ERROR)) < 0.04  # 4 standard errors of a binomial mean over 2000 draws
    assert np.mean([task.is_well_formed(p, r) for p, r in demos]) == 1.0


def test_samples_follow_teacher_distribution(task):
    """Empirical frequencies for one problem match the distribution that `log_prob` reports."""
    prompt, n = "4 7 + 3 8 =", 4000
    rng = np.random.default_rng(0)
    counts = Counter(digits(sample_teacher(47, "+", 38, rng)) for _ in range(n))
    assert set(counts) == {digits(answer) for answer in teacher_distribution(47, "+", 38)}
    for response, count in counts.items():
        expected = math.exp(task.log_prob(prompt, response))
        assert abs(count / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_log_prob_exact(task):
    assert task.log_prob("4 7 + 3 8 =", "8 5") == pytest.approx(math.log(0.7))
    # 75 is both the forgotten carry (0.3 · 0.5) and the tens digit off by one (0.3 · 0.5 / 4)
    assert task.log_prob("4 7 + 3 8 =", "7 5") == pytest.approx(math.log(0.15 + 0.0375))
    assert task.log_prob("4 7 + 3 8 =", "5 0") is None  # the teacher never writes it
    assert task.log_prob("4 7 + 3 8 =", "0 8 5") is None
    total = sum(math.exp(task.log_prob("9 5 + 5 =", digits(n))) for n in teacher_distribution(95, "+", 5))
    assert total == pytest.approx(1.0)


def test_parse_number_round_trips():
    for n in (0, 7, 10, 85, 198):
        assert parse_number(digits(n)) == n


def test_registered():
    assert TASKS["arithmetic"] is ArithmeticTask
    task = get_task("arithmetic")
    assert isinstance(task, ArithmeticTask) and task.name == "arithmetic"
    assert task.annotator.length_bonus == 0.0 and task.annotator.flip_prob == 0.1
