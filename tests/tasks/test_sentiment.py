import collections
import math

import numpy as np
import pytest

from rlhf_env.tasks.sentiment import NEGATIVE, POSITIVE, SentimentTask, parse, sample_continuation


@pytest.mark.parametrize(
    "prompt, response, gold",
    [
        ("the plot was", "good", 1 / 2),
        ("the plot was", "bad", -1 / 2),
        ("the plot was", "not good", -1 / 2),
        ("the plot was not", "bad and boring", 2 / 3),  # "not" in the prompt flips both adjectives
        ("it", "seems long", 0.0),  # neutral adjectives count for nothing
        ("honestly , the cast", "was very good and great , it is good and truly superb but the film felt moving "
                                "and fresh", 6 / 7),
        ("the plot was", "good and", -1.0),  # unfinished
        ("the plot was", "good good good good good", -1.0),  # adjective spam
        ("the plot was", "good , it is good , it is good , it is good", -1.0),  # a fourth clause
        ("the plot was", "", -1.0),
        ("the plot was", "the good", -1.0),
    ],
)
def test_gold_hand_values(task, prompt, response, gold):
    assert task.gold(prompt, response) == pytest.approx(gold)


def test_best_gold_is_reachable_and_unbeatable(task):
    best = "good and great , the cast is superb and moving , it was fresh and funny"
    assert task.gold("the plot was", best) == pytest.approx(task.best_gold)
    rng = np.random.default_rng(0)
    golds = [task.gold(p, r) for p, r in task.demonstrations(3000, rng)]
    assert max(golds) <= task.best_gold + 1e-12
    assert min(golds) >= -task.best_gold - 1e-12  # demonstrations are grammatical: never the -1 of bad text


def test_demonstrations_are_grammatical_and_deterministic(task):
    a = task.demonstrations(500, np.random.default_rng(3))
    b = task.demonstrations(500, np.random.default_rng(3))
    assert a == b
    assert all(task.is_well_formed(p, r) for p, r in a)
    assert len({r for _, r in a}) > 400  # enough variety that a model must learn the grammar, not memorise


def test_train_and_eval_prompts_are_disjoint(task):
    train, evals = set(task.train_prompts()), set(task.eval_prompts())
    assert not train & evals
    assert len(evals) == pytest.approx(0.1 * (len(train) + len(evals)), abs=1)
    assert SentimentTask().eval_prompts() == task.eval_prompts()


def test_log_prob_matches_generator_frequencies():
    """The parser's exact log-probability equals the generator's sampling frequency (law of large numbers)."""
    rng = np.random.default_rng(1)
    prompt, n = "it was not", 60000
    counts = collections.Counter(sample_continuation(prompt, rng) for _ in range(n))
    task = SentimentTask()
    single_adjective = [r for r in counts if len(r.split()) == 1]
    freq = sum(counts[r] for r in single_adjective) / n
    prob = sum(math.exp(task.log_prob(prompt, r)) for r in single_adjective)
    # every one-word continuation has the same probability: 0.7 * (0.4/30 or 0.2/20) * 0.65 * 0.3
    assert prob == pytest.approx(len(single_adjective) * 0.7 * 0.65 * 0.3 * 0.4 / 30, rel=0.3)
    assert freq == pytest.approx(prob, abs=4 * math.sqrt(prob / n))


def test_log_prob_counts_only_response_choices():
    # The prompt fixed the subject, verb and "not": the response pays for its adjective and for stopping.
    review = parse("the plot was not", "good")
    expected = math.log(1 - 0.3) + math.log(0.4 / len(POSITIVE)) + math.log(1 - 0.35) + math.log(1 - 0.7)
    assert review.response_log_prob == pytest.approx(expected)
    assert parse("the plot was not", "not good") is None  # a second "not" is not English here
    assert parse("the plot was", "bad").polarities == [-1] and NEGATIVE[0] == "bad"
