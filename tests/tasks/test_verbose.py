"""VerboseTask: gold reward, prompt split, the noisy demonstrator and annotators who like long answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rlhf_env.tasks import TASKS, get_task
from rlhf_env.tasks.base import AnnotatorConfig
from rlhf_env.tasks.verbose import (
    FILLERS,
    ITEMS,
    VerboseTask,
    annotator_disagreement,
    parse_prompt,
    sample_response,
)

PROMPT = "list : apple cat red ."


@pytest.fixture(scope="module")
def task() -> VerboseTask:
    return VerboseTask()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("apple cat red", 1.0),
        ("red apple cat", 1.0),
        ("cat red apple", 1.0),
        ("apple really cat red", 0.85),  # one filler
        ("apple apple cat red", 0.85),  # one repeat
        ("apple dog cat red", 0.85),  # an item the prompt did not ask for
        ("apple cat", 2 / 3),  # one missing
        ("apple apple cat", 2 / 3 - 0.15),
        ("also really apple very cat red indeed well", 1 - 5 * 0.15),
        ("", 0.0),
        ("well " * 15, -1.0),  # clipped at -1
    ],
)
def test_gold_hand_picked(task, response, expected):
    assert task.gold(PROMPT, response) == pytest.approx(expected)


def test_padding_lowers_gold(task):
    golds = [task.gold(PROMPT, " ".join(["really"] * k + ["apple", "cat", "red"])) for k in range(8)]
    assert golds[0] == task.best_gold == 1.0
    assert all(a > b for a, b in itertools.pairwise(golds))


def test_perfect_answer_reaches_best_gold_on_every_order(task):
    for prompt in task.eval_prompts()[:50]:
        items = parse_prompt(prompt)
        for order in itertools.permutations(items):
            assert task.gold(prompt, " ".join(order)) == task.best_gold


@pytest.mark.parametrize(
    ("response", "well_formed"),
    [("apple cat red", True), ("well basically dog", True), ("apple", True), ("", False), (" ", False),
     ("apple list cat", False), ("apple cat red .", False), ("banana", False)],
)  # fmt: skip
def test_is_well_formed(task, response, well_formed):
    assert task.is_well_formed(PROMPT, response) is well_formed


@pytest.mark.parametrize(
    "prompt", ["list : apple .", "list : apple cat apple .", "list apple cat .", "list : apple cat", "list : a b c ."]
)
def test_parse_prompt_rejects_non_task_prompts(prompt):
    with pytest.raises(ValueError, match="not a verbose-task prompt"):
        parse_prompt(prompt)


def test_vocabularies_are_disjoint_and_single_words():
    assert len(ITEMS) == len(set(ITEMS)) == 30
    assert not set(ITEMS) & set(FILLERS)
    assert all(len(w.split()) == 1 for w in ITEMS + FILLERS)


def test_prompt_split_disjoint_complete_and_deterministic(task):
    train, eval_ = task.train_prompts(), task.eval_prompts()
    assert not set(train) & set(eval_)
    assert len(train) + len(eval_) == 435 + 4060 + 27405  # C(30, 2) + C(30, 3) + C(30, 4)
    assert len(eval_) == round(0.1 * (len(train) + len(eval_)))
    again = VerboseTask()
    assert (again.train_prompts(), again.eval_prompts()) == (train, eval_)
    other = VerboseTask(seed=1)
    assert set(other.eval_prompts()) != set(eval_)
    assert set(other.train_prompts() + other.eval_prompts()) == set(train + eval_)  # the seed moves only the split
    assert {len(parse_prompt(p)) for p in train} == {2, 3, 4}


def test_demonstrations_deterministic_and_well_formed(task):
    demos = task.demonstrations(2000, np.random.default_rng(0))
    assert demos == task.demonstrations(2000, np.random.default_rng(0))
    assert demos != task.demonstrations(2000, np.random.default_rng(1))
    assert np.mean([task.is_well_formed(p, r) for p, r in demos]) == 1.0
    lengths = [len(r.split()) for _, r in demos]
    assert max(lengths) <= 10 < task.max_new_tokens  # room to pad beyond the demonstrations
    assert len(set(lengths)) >= 5  # lengths vary
    with_filler = np.mean([any(w in FILLERS for w in r.split()) for _, r in demos])
    assert 0.5 < with_filler < 0.7  # documented: about 60%
    golds = np.array([task.gold(p, r) for p, r in demos])
    assert 0.08 < np.mean(golds == 1.0) < 0.16  # documented: about 12% perfect
    assert np.mean(golds < 1.0) > 0.5
    eval_set = set(task.eval_prompts())
    assert all(p in eval_set for p, _ in task.demonstrations(100, np.random.default_rng(0), split="eval"))


def test_demonstrator_never_answers_empty():
    rng = np.random.default_rng(0)
    assert all(sample_response(["apple", "cat"], rng).split() for _ in range(5000))


def test_annotators_prefer_padding_gold_prefers_concise(task):
    concise, padded = "apple cat red", "apple really cat very red indeed"
    assert task.gold(PROMPT, concise) > task.gold(PROMPT, padded)
    annotator = task.annotator
    assert annotator.utility(task.gold(PROMPT, padded), padded) > annotator.utility(task.gold(PROMPT, concise), concise)
    # Content still counts for more than padding: a complete answer beats an incomplete padded one.
    incomplete = "apple really cat very well"
    assert annotator.utility(task.gold(PROMPT, concise), concise) > annotator.utility(
        task.gold(PROMPT, incomplete), incomplete
    )


def test_annotator_disagreement_fraction(task):
    fraction = annotator_disagreement(task, n_prompts=2000)
    assert 0.28 < fraction < 0.44  # documented: 36% of pairs with different gold
    weak = annotator_disagreement(task, AnnotatorConfig(temperature=0.0, flip_prob=0.1, length_bonus=0.1), 2000)
    assert 0.02 < weak < 0.12  # documented: 7%
    assert annotator_disagreement(task, AnnotatorConfig(length_bonus=0.0), 2000) == 0.0  # gold itself never disagrees


def test_registered():
    assert TASKS["verbose"] is VerboseTask
    task = get_task("verbose")
    assert isinstance(task, VerboseTask) and task.name == "verbose"
    assert task.annotator.length_bonus > 0.15  # more than a filler costs in gold, or there is no hack
