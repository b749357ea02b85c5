"""The built-in judge: its tokenizer and model made from π_SFT, its training examples (both orders, loss on the answer
token only), a judge that learns a simple preference, and its evaluation against hand-computed numbers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_env.pipeline.judge_training import (
    TEMPLATE,
    JudgeConfig,
    evaluate_judge,
    judge_examples,
    judge_from_policy,
    judge_tokenizer,
    train_judge,
)
from rlhf_env.pipeline.labelers import Judgement, TemplateError
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.tasks.sentiment import NEGATIVE, POSITIVE


def test_the_judge_tokenizer_adds_the_template_words_and_keeps_the_world_ids(tokenizer):
    judge = judge_tokenizer(tokenizer, TEMPLATE)
    added = ["Question:", "Response", "A:", "B:", "Which", "better?", "Answer:", "A", "B"]
    assert len(judge) == len(tokenizer) + len(added)  # "is" is a word of the task already
    text = "the plot was not bad , it is superb"
    assert judge(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert [judge(w, add_special_tokens=False)["input_ids"] for w in ("A", "B")] == [[len(tokenizer) + 7],
                                                                                     [len(tokenizer) + 8]]
    assert judge("Answer: A")["input_ids"][1:] == [len(tokenizer) + 6, len(tokenizer) + 7]  # whole words only
    assert len(tokenizer) == len(judge) - len(added)  # the world's tokenizer is not changed
    bpe = train_tokenizer(["the plot was good", "Answer: A or B?"] * 20, kind="bpe", vocab_size=300)
    assert len(judge_tokenizer(bpe, TEMPLATE)) == len(bpe)  # byte-level BPE encodes everything already
    with pytest.raises(TemplateError):
        judge_tokenizer(tokenizer, "{prompt} {response_a} Answer:")


def test_the_judge_model_is_the_policy_with_new_rows(policy, tokenizer):
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    judge = judge_from_policy(policy, tokenizer, config=JudgeConfig(n_positions=96))
    new = judge.model.state_dict()
    assert judge.model.config.n_positions == 96 and judge.model.config.vocab_size == len(judge.tokenizer)
    for name, tensor in before.items():
        assert torch.equal(new[name][: tensor.shape[0]], tensor), name
        assert torch.equal(policy.state_dict()[name], tensor), name  # the policy is unchanged
    assert new["transformer.wpe.weight"].shape[0] == 96 and new["transformer.wte.weight"].shape[0] == len(tokenizer) + 9
    assert not judge.model.training
    with pytest.raises(ValueError, match="made from a GPT-2"):
        judge_from_policy(torch.nn.Linear(2, 2), tokenizer)


def test_examples_are_both_orders_with_the_answer_token_alone(policy, tokenizer):
    judge = judge_from_policy(policy, tokenizer)
    pairs = [{"prompt": "the plot was", "chosen": "good", "rejected": "bad , it is dull"}]
    data = judge_examples(judge, pairs)
    assert data.response_ids.shape == (2, 1) and data.response_mask.tolist() == [[1], [1]]  # no EOS: one token
    assert data.response_ids[:, 0].tolist() == list(judge.answer_ids)  # chosen first → "A", second → "B"
    queries = [judge.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(data.query_ids, data.query_mask)]
    assert queries == [
        "<bos> Question: the plot was Response A: good Response B: bad , it is dull Which is better? Answer:",
        "<bos> Question: the plot was Response A: bad , it is dull Response B: good Which is better? Answer:"]


def adjective_pairs(n, seed):
    rng = np.random.default_rng(seed)
    return [{"prompt": "the plot was", "chosen": str(rng.choice(POSITIVE)), "rejected": str(rng.choice(NEGATIVE)),
             "chosen_gold": 0.5, "rejected_gold": -0.5} for _ in range(n)]


def test_a_judge_learns_a_simple_preference_from_few_labels(policy, tokenizer):
    config = JudgeConfig(steps=150, lr=3e-3, batch_size=32)
    judge, report = train_judge(policy, tokenizer, adjective_pairs(100, seed=0), config, progress=False)
    assert report["n_pairs"] == 100 and report["final_train_loss"] < 0.3
    held_out = adjective_pairs(100, seed=1)
    result = evaluate_judge(judge, held_out)
    assert result["agreement_gold"] >= 0.9 and result["agreement_labels"] == result["agreement_gold"]
    assert result["position_disagreement"] <= 0.1  # it reads the responses, not the slots
    with pytest.raises(ValueError, match="no labelled pairs"):
        train_judge(policy, tokenizer, [], config)


def test_evaluate_judge_against_hand_computed_numbers():
    # Four labelled pairs (a = the labelled chosen one): the judge sides with a in 3 of 4 averaged verdicts.
    judgement = Judgement(p_a_first=np.array([0.9, 0.8, 0.7, 0.9]), p_a_second=np.array([0.3, 0.4, 0.3, 0.1]))
    judge = SimpleNamespace(compare=lambda prompts, a, b: judgement)  # P = 0.6, 0.6, 0.5 (a tie), 0.5
    pairs = [{"prompt": "p", "chosen": "x", "rejected": "y", "chosen_gold": g_w, "rejected_gold": g_l}
             for g_w, g_l in [(1, 0), (0, 1), (1, 0), (1, 1)]]
    report = evaluate_judge(judge, pairs)
    assert report["agreement_labels"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    # Gold differs in the first three; the second's label is wrong: the judge agrees with gold in 1 + 0 + 0.5.
    assert report["agreement_gold"] == pytest.approx(1.5 / 3) and report["n_gold_pairs"] == 3
    assert report["labels_agreement_gold"] == pytest.approx(2 / 3)
    assert report["agreement_gold_one_order"] == pytest.approx(((1 + 0 + 1) + (0 + 1 + 0)) / 6)
    assert report["position_disagreement"] == 1.0
    assert report["first_slot"] == pytest.approx(np.mean([0.8, 0.7, 0.7, 0.9]))
