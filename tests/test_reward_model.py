import math

import pytest
import torch

from rlhf_env.lm import pad_left, pad_right
from rlhf_env.pipeline.reward_training import (
    bradley_terry_loss,
    centering_loss,
    evaluate_reward_model,
    listwise_loss,
    pairwise_accuracy,
)
from rlhf_env.reward_model import RewardModel


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


@pytest.fixture
def reward_model(policy):
    torch.manual_seed(0)
    model = RewardModel(policy.transformer).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a head big enough that position mistakes show
    return model


def _encode(tokenizer, prompts, responses):
    queries = [tokenizer(p)["input_ids"] for p in prompts]
    answers = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    return (*pad_left(queries, tokenizer.pad_token_id), *pad_right(answers, tokenizer.pad_token_id))


def test_score_is_read_at_eos_not_at_padding(reward_model, tokenizer):
    q, qm, r, rm = _encode(tokenizer, ["the plot was"], ["good and moving"])
    with torch.no_grad():
        base = reward_model.score(q, qm, r, rm)
        # Append padding columns filled with real words: masked, they must not change the score.
        junk = torch.full((1, 5), tokenizer.convert_tokens_to_ids("terrible"))
        padded = reward_model.score(q, qm, torch.cat([r, junk], 1), torch.cat([rm, torch.zeros_like(junk)], 1))
        # The same text without EOS is read at its last word instead: a different score.
        no_eos = reward_model.score(q, qm, r[:, :-1], rm[:, :-1])
    assert torch.allclose(base, padded, atol=1e-5)
    assert not torch.allclose(base, no_eos, atol=1e-3)


def test_same_sequence_scores_the_same_alone_and_in_a_padded_batch(reward_model, tokenizer):
    prompts = ["it", "honestly , the acting was not", "the plot"]
    responses = ["was good", "bad and boring , the cast is very good", "seems fine"]
    with torch.no_grad():
        batch = reward_model.score(*_encode(tokenizer, prompts, responses))
        alone = torch.cat([reward_model.score(*_encode(tokenizer, [p], [r])) for p, r in zip(prompts, responses)])
    assert torch.allclose(batch, alone, atol=1e-5)


def test_save_then_load_gives_identical_scores(reward_model, tokenizer, tmp_path):
    reward_model.offset.fill_(0.25)
    reward_model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    batch = _encode(tokenizer, ["the plot was", "it"], ["good", "is bad and dull"])
    with torch.no_grad():
        assert torch.equal(loaded.score(*batch), reward_model.score(*batch))
    assert float(loaded.offset) == 0.25


def test_loading_refuses_pickles_and_foreign_directories(reward_model, tmp_path):
    reward_model.trunk.config.save_pretrained(tmp_path)
    torch.save(reward_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        RewardModel.from_pretrained(tmp_path)
    reward_model.trunk.save_pretrained(tmp_path / "trunk_only")
    with pytest.raises(ValueError, match="reward_head"):
        RewardModel.from_pretrained(tmp_path / "trunk_only")


def test_gold_accuracy_orders_by_gold_not_by_label(reward_model, tokenizer):
    pairs = [  # the second label is flipped: gold prefers the "rejected" side
        {"prompt": "the plot was", "chosen": "good", "rejected": "bad", "chosen_gold": 0.5, "rejected_gold": -0.5},
        {"prompt": "the plot was", "chosen": "bad", "rejected": "good", "chosen_gold": -0.5, "rejected_gold": 0.5},
        {"prompt": "it", "chosen": "is old", "rejected": "is odd", "chosen_gold": 0.0, "rejected_gold": 0.0},
    ]
    report = evaluate_reward_model(reward_model, tokenizer, pairs[:2])
    assert report["accuracy_labels"] == 0.5  # the same two texts, labelled once each way round
    with torch.no_grad():
        good, bad = reward_model.score(*_encode(tokenizer, ["the plot was"] * 2, ["good", "bad"]))
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
