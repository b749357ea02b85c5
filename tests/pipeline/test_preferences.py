import collections
import itertools
import json

import numpy as np
import pytest

from rlhf_env.jsonl import write_jsonl
from rlhf_env.pipeline.preferences import (
    PreferenceConfig,
    label_groups,
    load_groups,
    load_pairs,
    plackett_luce_ranking,
)
from rlhf_env.tasks.base import AnnotatorConfig


def _groups(n=300, k=4, seed=0):
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n):
        gold = rng.choice([-0.5, 0.0, 0.25, 0.5, 0.75], size=k, replace=False).tolist()
        groups.append({"prompt": f"p{g}", "responses": [f"r{g}_{i}" for i in range(k)], "gold": gold,
                       "ranking": None})
    return groups


def test_noiseless_pairwise_annotators_follow_gold():
    pairs = label_groups(_groups(), AnnotatorConfig(temperature=0.0, flip_prob=0.0), "pairwise", seed=0)
    assert len(pairs) == 300 * 6
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs)


def test_ties_are_dropped_at_temperature_zero():
    groups = [{"prompt": "p", "responses": ["a", "b", "c"], "gold": [0.5, 0.5, 0.0], "ranking": None}]
    pairs = label_groups(groups, AnnotatorConfig(flip_prob=0.0), "pairwise", seed=0)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a", "c"), ("b", "c")]


def test_flip_probability_is_the_label_noise():
    pairs = label_groups(_groups(1000), AnnotatorConfig(temperature=0.0, flip_prob=0.1), "pairwise", seed=1)
    wrong = np.mean([p["chosen_gold"] < p["rejected_gold"] for p in pairs])
    assert wrong == pytest.approx(0.1, abs=0.015)


def test_bradley_terry_temperature():
    groups = [{"prompt": "p", "responses": ["a", "b"], "gold": [1.0, 0.0], "ranking": None}] * 4000
    pairs = label_groups(groups, AnnotatorConfig(temperature=0.5, flip_prob=0.0), "pairwise", seed=2)
    p_a = np.mean([p["chosen"] == "a" for p in pairs])
    assert p_a == pytest.approx(1 / (1 + np.exp(-2.0)), abs=0.02)


def test_length_bonus_makes_annotators_prefer_longer_answers():
    groups = [{"prompt": "p", "responses": ["short", "a much longer answer"], "gold": [0.5, 0.4], "ranking": None}]
    likes_length = AnnotatorConfig(flip_prob=0.0, length_bonus=0.1)
    assert label_groups(groups, likes_length, "pairwise", seed=0)[0]["chosen"] == "a much longer answer"
    assert label_groups(groups, AnnotatorConfig(flip_prob=0.0), "pairwise", seed=0)[0]["chosen"] == "short"


def test_ranking_mode_gives_all_pairs_consistent_with_the_ranking():
    groups = _groups(50, k=4)
    pairs = label_groups(groups, AnnotatorConfig(temperature=0.0, flip_prob=0.0), "ranking", seed=0)
    assert len(pairs) == 50 * 6
    for g, group in enumerate(groups):
        assert group["ranking"] == sorted(range(4), key=lambda i: -group["gold"][i])
        position = {group["responses"][i]: rank for rank, i in enumerate(group["ranking"])}
        for p in (p for p in pairs if p["group"] == g):
            assert position[p["chosen"]] < position[p["rejected"]]


def test_plackett_luce_ranking_probabilities():
    """P(ranking a > b > c) = w_a/(w_a+w_b+w_c) · w_b/(w_b+w_c) with w = exp(u / T)."""
    rng = np.random.default_rng(0)
    utility, n = np.array([1.0, 0.0, -1.0]), 20000
    counts = collections.Counter(tuple(plackett_luce_ranking(utility, 1.0, rng)) for _ in range(n))
    w = np.exp(utility)
    for perm in itertools.permutations(range(3)):
        a, b, c = perm
        expected = w[a] / (w[a] + w[b] + w[c]) * w[b] / (w[b] + w[c])
        assert counts[perm] / n == pytest.approx(expected, abs=0.012)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        PreferenceConfig(mode="tournament")
    with pytest.raises(ValueError, match="k >= 2"):
        PreferenceConfig(k=1)
    with pytest.raises(ValueError, match="flip_prob"):
        AnnotatorConfig(flip_prob=0.7)


def test_jsonl_round_trip_and_atomic_write(tmp_path):
    records = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    assert load_pairs(tmp_path / "pairs.jsonl") == records
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no temp file left behind

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q"}, {"prompt": Unserialisable()}])
    assert load_pairs(tmp_path / "pairs.jsonl") == records  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no records"),
        (['{"prompt": "p", "chosen": "a"}'], "line 1: missing the 'rejected' field"),
        (['{"prompt": "p", "chosen": "a", "rejected": "b"}', "{not json"], "line 2: not valid JSON"),
        (['{"prompt": "p", "chosen": "a", "rejected": 3}'], "line 1: the 'rejected' field must be a string"),
        (['["p", "a", "b"]'], "line 1: expected a JSON object"),
    ],
)
def test_malformed_preference_files_name_line_and_field(tmp_path, lines, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


def test_groups_ranking_must_be_a_permutation(tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": [0, 1], "ranking": [0, 0]}) + "\n")
    with pytest.raises(ValueError, match="record 1: field 'ranking'"):
        load_groups(path)
