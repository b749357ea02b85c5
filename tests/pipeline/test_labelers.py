"""Labelers: simulated annotators, the LM judge (both orders averaged), the rule judge (weighted principles), labels
that record their source, and the named errors for bad input, raised before any model call or file write."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_env.chat import NoChatTemplate
from rlhf_env.jsonl import write_jsonl
from rlhf_env.pipeline.judge_training import TEMPLATE, judge_from_policy, judge_tokenizer
from rlhf_env.pipeline.labelers import (
    AnswerTokenError,
    LabelerError,
    LMJudge,
    Principle,
    PrincipleError,
    RuleJudge,
    SimulatedAnnotator,
    TemplateError,
    label_groups_by,
    label_pairs,
)
from rlhf_env.pipeline.preferences import label_groups, load_pairs
from rlhf_env.tasks.base import AnnotatorConfig
from rlhf_env.tasks.sentiment import brevity


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


class SlotBiasLM(torch.nn.Module):
    """A fake causal LM behind a judge template: at the last position the first answer's logit is
    ``bias + signal · (#"good" in the first slot − #"good" in the second)`` and the second answer's is 0; every
    other logit is −30. It counts its forward passes."""

    def __init__(self, tokenizer, bias: float, signal: float):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=128, vocab_size=len(tokenizer))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.bias, self.signal, self.calls = bias, signal, 0
        ids = tokenizer.convert_tokens_to_ids
        self.a_mark, self.b_mark, self.end_mark, self.good = ids("A:"), ids("B:"), ids("Which"), ids("good")
        self.first, self.second = ids("A"), ids("B")

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls += 1
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -30.0)  # (B, L, V)
        for row, ids in enumerate(input_ids.tolist()):
            a, b, end = ids.index(self.a_mark), ids.index(self.b_mark), ids.index(self.end_mark)
            difference = ids[a:b].count(self.good) - ids[b:end].count(self.good)
            logits[row, -1, self.first] = self.bias + self.signal * difference
            logits[row, -1, self.second] = 0.0
        return SimpleNamespace(logits=logits)


@pytest.fixture
def judge_tok(tokenizer):
    return judge_tokenizer(tokenizer, TEMPLATE)


def fake_judge(judge_tok, bias=3.0, signal=0.0):
    return LMJudge(SlotBiasLM(judge_tok, bias, signal), judge_tok, template=TEMPLATE, name="fake")


PROMPTS, GOOD, BAD = ["the plot was", "it is"], ["good", "good and good"], ["bad", "dull"]


# --- LM judge: both orders ------------------------------------------------------------------------------------


def test_a_judge_that_only_answers_the_first_slot_is_made_symmetric(judge_tok):
    judge = fake_judge(judge_tok, bias=3.0, signal=0.0)
    judgement = judge.compare(PROMPTS, GOOD, BAD)
    assert judgement.p_a_first == pytest.approx([sigmoid(3.0)] * 2)  # asked once, it always says "A"
    assert judgement.p == pytest.approx([0.5, 0.5], abs=1e-12)  # averaged: no preference at all
    assert judgement.position_disagreement == 1.0  # the two orders always disagree
    assert judgement.first_slot == pytest.approx(sigmoid(3.0))
    assert judge.model.calls == 1  # both orders in one batched pass


def test_position_bias_plus_signal_averages_to_the_signal(judge_tok):
    judge = fake_judge(judge_tok, bias=3.0, signal=1.0)
    p_good_bad = judge.prefer(PROMPTS, GOOD, BAD)
    p_bad_good = judge.prefer(PROMPTS, BAD, GOOD)
    # "good" once more in slot A: logit 3 + 1; "good" in slot B: 3 − 1 (then P(B) = 1 − σ(2)); twice: ±2.
    assert p_good_bad[0] == pytest.approx((sigmoid(4) + 1 - sigmoid(2)) / 2)
    assert p_good_bad[1] == pytest.approx((sigmoid(5) + 1 - sigmoid(1)) / 2)
    assert p_good_bad + p_bad_good == pytest.approx([1.0, 1.0], abs=1e-12)  # P(a ≻ b) + P(b ≻ a) = 1
    assert np.all(p_good_bad > 0.5)  # the signal wins in either argument order, although each single order says A
    assert judge.compare(PROMPTS, BAD, GOOD).p_a_first[0] > 0.5


def test_a_real_judge_is_symmetric_and_padding_free(policy, tokenizer):
    judge = judge_from_policy(policy, tokenizer)  # an untrained judge on the random tiny GPT-2
    prompts = ["the plot was", "honestly , the acting was not", "it"]
    a = ["good", "bad and very dull , it is good", "is fine"]
    b = ["bad , the cast is superb and moving", "good", "was not great"]
    p = judge.prefer(prompts, a, b)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    assert p + judge.prefer(prompts, b, a) == pytest.approx(np.ones(3), abs=1e-6)
    judge.batch_size = 1  # one prompt per forward: no padding; the batched answers must be the same
    assert judge.prefer(prompts, a, b) == pytest.approx(p, abs=1e-5)


# --- rule judge ---------------------------------------------------------------------------------------------


def test_rule_judge_weights_margin_and_temperature_as_documented(task):
    # "good": gold 1/2, brevity 1 − 1/32; "good and great": gold 2/3, brevity 1 − 3/32.
    prompts, a, b = ["the plot was"], ["good"], ["good and great"]

    def judge(brevity_weight, **kwargs):
        return RuleJudge([Principle("positive", score=task.gold_reward),
                          Principle("brevity", score=brevity, weight=brevity_weight)], **kwargs)

    verdicts = judge(0.5).scores(prompts, a, b)
    assert verdicts["positive"] == pytest.approx([1 / 2 - 2 / 3])
    assert verdicts["brevity"] == pytest.approx([2 / 32])
    assert judge(0.5).prefer(prompts, a, b) == [0.0]  # d = −1/6 + 1/32 < 0: the longer, more positive one
    assert judge(3.0).prefer(prompts, a, b) == [1.0]  # d = −1/6 + 6/32 = 1/48 > 0: brevity outweighs
    assert judge(3.0, margin=0.05).prefer(prompts, a, b) == [0.5]  # |d| ≤ margin: a tie
    assert judge(3.0, temperature=0.1).prefer(prompts, a, b) == pytest.approx([sigmoid((1 / 48) / 0.1)])


def test_a_judge_principle_counts_two_p_minus_one(judge_tok):
    rule = RuleJudge([Principle("judge", judge=fake_judge(judge_tok, bias=0.0, signal=1.0), weight=2.0),
                      Principle("length", score=lambda prompts, responses: [len(r.split()) for r in responses],
                            weight=-0.1)])
    # judge: P = (σ(1) + 1 − σ(−1)) / 2 = σ(1); length: 1 word vs 1 word.
    verdicts = rule.scores(["the plot was"], ["good"], ["bad"])
    assert verdicts["judge"] == pytest.approx([2 * sigmoid(1) - 1])
    assert rule.prefer(["the plot was"], ["good"], ["bad"]) == [1.0]


def test_ties_are_dropped_or_broken_by_a_seeded_coin(task):
    rule = RuleJudge([Principle("positive", score=task.gold_reward)])
    prompts, a, b = ["the plot was"] * 3, ["good", "bad", "great"], ["bad", "good", "superb"]
    assert task.gold("the plot was", "great") == task.gold("the plot was", "superb") == 0.5  # a tie
    pairs = label_pairs(rule, prompts, a, b)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good", "bad"), ("good", "bad")]
    with_coin = [label_pairs(rule, prompts, a, b, seed=s, ties="random") for s in range(20)]
    assert all(len(pairs) == 3 for pairs in with_coin)
    assert {pairs[2]["chosen"] for pairs in with_coin} == {"great", "superb"}
    assert label_pairs(rule, prompts, a, b, seed=3, ties="random") == with_coin[3]
    assert all(p["p_chosen"] == 0.5 for pairs in with_coin for p in pairs[2:])


# --- simulated annotators as a labeler --------------------------------------------------------------------------


class LookupTask:
    """A task stand-in whose gold reward is a table."""

    annotator = AnnotatorConfig(temperature=0.0, flip_prob=0.1)

    def __init__(self, gold):
        self.table = gold

    def gold(self, prompt, response):
        return self.table[response]


def test_simulated_annotator_probabilities():
    task = LookupTask({"x": 1.0, "y": 0.0, "z": 0.0, "long one here": 0.0})
    assert SimulatedAnnotator(task).prefer(["p"] * 3, ["x", "y", "y"], ["y", "x", "z"]) == pytest.approx(
        [0.9, 0.1, 0.5])
    soft = SimulatedAnnotator(task, AnnotatorConfig(temperature=0.5, flip_prob=0.1))
    s = sigmoid(2.0)
    assert soft.prefer(["p"], ["x"], ["y"]) == pytest.approx([0.9 * s + 0.1 * (1 - s)])
    lengthy = SimulatedAnnotator(task, AnnotatorConfig(flip_prob=0.0, length_bonus=0.1))
    assert lengthy.prefer(["p"], ["long one here"], ["y"]) == [1.0]


def test_simulated_labels_flip_at_the_configured_rate():
    rng = np.random.default_rng(0)
    groups = [{"prompt": f"p{g}", "responses": [f"r{g}_{i}" for i in range(4)],
               "gold": rng.choice([-0.5, 0.0, 0.25, 0.5, 0.75], size=4, replace=False).tolist()} for g in range(500)]
    task = LookupTask({r: gold for g in groups for r, gold in zip(g["responses"], g["gold"])})
    pairs = label_groups_by(SimulatedAnnotator(task), groups, seed=1)
    assert len(pairs) == 500 * 6
    assert np.mean([p["chosen_gold"] < p["rejected_gold"] for p in pairs]) == pytest.approx(0.1, abs=0.015)
    assert {p["labeler"] for p in pairs} == {"simulated"} and {round(p["p_chosen"], 9) for p in pairs} == {0.9, 0.1}


# --- labels carry their source ----------------------------------------------------------------------------------


def test_labels_record_their_labeler_through_the_jsonl(tmp_path, task, judge_tok):
    groups = [{"prompt": "the plot was", "responses": ["good", "bad", "good"], "gold": [0.5, -0.5, 0.5],
               "ranking": None}]
    simulated = label_groups(groups, AnnotatorConfig(flip_prob=0.0), "pairwise", seed=0)
    rule = label_groups_by(RuleJudge([Principle("positive", score=task.gold_reward)], name="constitution"), groups)
    ai = label_groups_by(fake_judge(judge_tok, bias=0.0, signal=1.0), groups)
    write_jsonl(tmp_path / "pairs.jsonl", simulated + rule + ai)
    loaded = load_pairs(tmp_path / "pairs.jsonl")
    assert [p["labeler"] for p in loaded] == ["simulated"] * 2 + ["constitution"] * 2 + ["fake"] * 2
    assert all((p["chosen"], p["rejected"], p["group"]) == ("good", "bad", 0) for p in loaded)
    assert [p["chosen_gold"] for p in ai] == [0.5, 0.5]  # identical responses (0 vs 2) are no comparison
    assert [p["p_chosen"] for p in ai] == pytest.approx([sigmoid(1)] * 2)


# --- bad input: named errors before any model call or file write ------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("Q: {prompt} A: {response_a} Answer:", r"lacks the slot\(s\) \{response_b\}"),
    ("{response_a} {response_b} Answer:", r"lacks the slot\(s\) \{prompt\}"),
    ("{prompt} {response_a} {response_b} {question}", r"unknown slot\(s\) \{question\}"),
    ("{prompt} {response_a} {response_b} {}", r"unknown slot"),
    ("{prompt} {response_a} {response_b} {oops", "not a valid format string"),
])
def test_a_template_without_its_slots_is_refused(judge_tok, template, message):
    model = SlotBiasLM(judge_tok, 0.0, 0.0)
    with pytest.raises(TemplateError, match=message):
        LMJudge(model, judge_tok, template=template)
    assert model.calls == 0


@pytest.mark.parametrize("answers, message", [
    (("good and", "bad"), r"'good and' is 2 tokens"),
    (("A", "A"), "are the same token"),
    (("A",), "two non-empty strings"),
    ("AB", "two non-empty strings"),
    (("A", ""), "two non-empty strings"),
])
def test_answers_must_be_two_single_tokens(judge_tok, answers, message):
    model = SlotBiasLM(judge_tok, 0.0, 0.0)
    with pytest.raises(AnswerTokenError, match=message):
        LMJudge(model, judge_tok, template=TEMPLATE, answers=answers)
    assert model.calls == 0


def test_answers_the_vocabulary_or_the_model_lacks_are_refused(tokenizer, judge_tok, policy):
    with pytest.raises(AnswerTokenError, match="not in the judge tokenizer's vocabulary"):
        LMJudge(policy, tokenizer, template=TEMPLATE)  # the world's tokenizer has no "A": it is <unk>
    with pytest.raises(AnswerTokenError, match="the model's vocabulary has only"):
        LMJudge(policy, judge_tok, template=TEMPLATE)  # the tokenizer knows "A", the world's model does not


def test_a_chat_judge_needs_a_chat_template(judge_tok):
    with pytest.raises(NoChatTemplate):
        LMJudge(SlotBiasLM(judge_tok, 0.0, 0.0), judge_tok, template=TEMPLATE, chat=True)


@pytest.mark.parametrize("returns, message", [
    (lambda prompts, responses: [None] * len(responses), r"returned None \(NoneType\) for response 0"),
    (lambda prompts, responses: ["high"] * len(responses), r"returned 'high' \(str\)"),
    (lambda prompts, responses: [float("nan")] * len(responses), "returned nan"),
    (lambda prompts, responses: [1.0], "returned 1 values for 4 responses"),
    (lambda prompts, responses: 0.5, "returned float"),
])
def test_principles_that_return_non_numbers_fail_before_any_labelling(tmp_path, judge_tok, returns, message):
    judge = fake_judge(judge_tok, bias=0.0, signal=1.0)
    rule = RuleJudge([Principle("judged", judge=judge), Principle("broken", score=returns)])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(PrincipleError, match=f"principle 'broken' {message}"):
        write_jsonl(out, label_pairs(rule, PROMPTS, GOOD, BAD))
    assert judge.model.calls == 0  # the scores are checked before any judge's model runs
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_malformed_principles_and_rule_judges_are_refused():
    score = brevity
    with pytest.raises(PrincipleError, match="exactly one of score= .* and judge="):
        Principle("both missing")
    with pytest.raises(PrincipleError, match="weight must be a finite number"):
        Principle("brevity", score=score, weight="heavy")
    with pytest.raises(PrincipleError, match="score must be callable"):
        Principle("brevity", score="shorter is better")
    with pytest.raises(PrincipleError, match="judge must be a labeler"):
        Principle("brevity", judge="Which response is shorter?")
    with pytest.raises(PrincipleError, match="distinct"):
        RuleJudge([Principle("b", score=score), Principle("b", score=score)])
    with pytest.raises(PrincipleError, match="non-empty list"):
        RuleJudge([])
    with pytest.raises(ValueError, match="set one of them"):
        RuleJudge([Principle("b", score=score)], margin=0.1, temperature=1.0)


@pytest.mark.parametrize("output, message", [
    (np.array([0.5]), r"shape \(1,\) for 2 comparisons"),
    (np.array([0.5, 1.5]), r"outside \[0, 1\]"),
    (np.array([0.5, np.nan]), r"outside \[0, 1\]"),
    ("yes", "not an array"),
])
def test_a_labeler_must_return_one_probability_per_comparison(output, message):
    labeler = SimpleNamespace(name="mine", stochastic=False, prefer=lambda prompts, a, b: output)
    with pytest.raises(LabelerError, match=f"labeler 'mine' returned .*{message}"):
        label_pairs(labeler, PROMPTS, GOOD, BAD)


def test_label_pairs_checks_its_arguments(task):
    rule = RuleJudge([Principle("positive", score=task.gold_reward)])
    with pytest.raises(ValueError, match="2 prompts, 1 responses a and 2 responses b"):
        label_pairs(rule, PROMPTS, GOOD[:1], BAD)
    with pytest.raises(ValueError, match="ties must be"):
        label_pairs(rule, PROMPTS, GOOD, BAD, ties="first")
    assert label_pairs(rule, ["p"], ["same"], ["same"]) == []
