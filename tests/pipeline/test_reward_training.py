"""Training the reward model: the losses against hand-computed values, accuracy, listwise training, and clear
errors for data it cannot train on."""

import math

import pytest
import torch

from rlhf_env.pipeline.reward_training import (
    bradley_terry_loss,
    centering_loss,
    evaluate_reward_model,
    listwise_loss,
    pairwise_accuracy,
)
from rlhf_env.reward_model import RewardModel
from rlhf_env.text import encode_pairs


def test_bradley_terry_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_listwise_loss_hand_values():
    rewards = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, math.log(2)]])
    best = torch.tensor([0, 2])
    # group 1: -log(e^2 / (e^2 + 2)); group 2: -log(2 / (1 + e + 2))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(2 / (3 + math.e))) / 2
    assert listwise_loss(rewards, best).item() == pytest.approx(expected, rel=1e-6)
    # With K = 2 the listwise loss is the Bradley-Terry loss.
    pair = torch.tensor([[0.3, -0.4]])
    assert listwise_loss(pair, torch.tensor([0])).item() == pytest.approx(
        bradley_terry_loss(pair[:, 0], pair[:, 1]).item(), rel=1e-6)


def test_centering_and_accuracy_hand_values():
    assert centering_loss(torch.tensor([[1.0, 2.0], [0.0, -1.0]])).item() == pytest.approx((9 + 1) / 2)
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.0])) == 0.625


def test_gold_accuracy_orders_by_gold_not_by_label(reward_model, tokenizer):
    pairs = [  # the second label is flipped: gold prefers the "rejected" side
        {"prompt": "the plot was", "chosen": "good", "rejected": "bad", "chosen_gold": 0.5, "rejected_gold": -0.5},
        {"prompt": "the plot was", "chosen": "bad", "rejected": "good", "chosen_gold": -0.5, "rejected_gold": 0.5},
        {"prompt": "it", "chosen": "is old", "rejected": "is odd", "chosen_gold": 0.0, "rejected_gold": 0.0},
    ]
    report = evaluate_reward_model(reward_model, tokenizer, pairs[:2])
    assert report["accuracy_labels"] == 0.5  # the same two texts, labelled once each way round
    with torch.no_grad():
        texts = encode_pairs(tokenizer, ["the plot was"] * 2, ["good", "bad"], 64).rows(slice(None))
        good, bad = reward_model.score(*texts)
    assert report["accuracy_gold"] == float(good > bad)  # both pairs agree once ordered by gold
    assert evaluate_reward_model(reward_model, tokenizer, pairs)["n_gold_pairs"] == 2  # the gold tie is left out


def test_listwise_training_learns_the_ranking(policy, tokenizer):
    from rlhf_env.pipeline.reward_training import RewardConfig, train_reward_model

    groups = [{"prompt": "the plot was", "responses": ["bad", "good", "dull", "superb"], "gold": [-0.5, 0.5, -0.5, 0.5],
               "ranking": [3, 1, 0, 2]}] * 8
    model = RewardModel(policy.transformer)
    report = train_reward_model(model, tokenizer, pairs=[], groups=groups,
                                config=RewardConfig(loss="listwise", steps=30, batch_size=4, lr=3e-3))
    assert report["final_train_loss"] < 0.5 * math.log(4)  # from chance (ln 4) towards picking the best
    from rlhf_env.pipeline.reward_training import score_texts

    scores = score_texts(model, tokenizer, ["the plot was"] * 4, groups[0]["responses"])
    assert int(scores.argmax()) == 3


def test_listwise_training_needs_rankings(policy, tokenizer):
    from rlhf_env.pipeline.reward_training import RewardConfig, train_reward_model

    groups = [{"prompt": "it", "responses": ["is bad", "is good"], "gold": [-0.5, 0.5], "ranking": None}]
    with pytest.raises(ValueError, match="needs groups with a 'ranking'"):
        train_reward_model(RewardModel(policy.transformer), tokenizer, [], groups, RewardConfig(loss="listwise"))


def test_training_without_pairs_is_a_clear_error(policy, tokenizer):
    from rlhf_env.pipeline.reward_training import train_reward_model

    with pytest.raises(ValueError, match="no preference pairs"):
        train_reward_model(RewardModel(policy.transformer), tokenizer, pairs=[])
