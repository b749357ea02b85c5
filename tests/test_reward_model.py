"""The reward model: the score is read at the last real token, padding changes nothing, save/load round-trips,
loading refuses what it must."""

import pytest
import torch

from rlhf_env.reward_model import RewardModel
from rlhf_env.text import encode_pairs


@pytest.mark.parametrize("backend", ["gpt2", "hf"])
def test_score_is_read_at_eos_not_at_padding(reward_model, tokenizer, backend):
    q, qm, r, rm = encode_pairs(tokenizer, ["the plot was"], ["good and moving"], 64).rows(slice(None))
    with torch.no_grad():
        base = reward_model.score(q, qm, r, rm, backend=backend)
        # Append padding columns filled with real words: masked, they must not change the score.
        junk = torch.full((1, 5), tokenizer.convert_tokens_to_ids("terrible"))
        padded = reward_model.score(q, qm, torch.cat([r, junk], 1), torch.cat([rm, torch.zeros_like(junk)], 1),
                                    backend=backend)
        # The same text without EOS is read at its last word instead: a different score.
        no_eos = reward_model.score(q, qm, r[:, :-1], rm[:, :-1], backend=backend)
    assert torch.allclose(base, padded, atol=1e-5)
    assert not torch.allclose(base, no_eos, atol=1e-3)


@pytest.mark.parametrize("backend", ["gpt2", "hf"])
def test_same_sequence_scores_the_same_alone_and_in_a_padded_batch(reward_model, tokenizer, backend):
    prompts = ["it", "honestly , the acting was not", "the plot"]
    responses = ["was good", "bad and boring , the cast is very good", "seems fine"]

    def score(prompts, responses):
        return reward_model.score(*encode_pairs(tokenizer, prompts, responses, 64).rows(slice(None)), backend=backend)

    with torch.no_grad():
        batch = score(prompts, responses)
        alone = torch.cat([score([p], [r]) for p, r in zip(prompts, responses)])
    assert torch.allclose(batch, alone, atol=1e-5)


def test_save_then_load_gives_identical_scores(reward_model, tokenizer, tmp_path):
    reward_model.offset.fill_(0.25)
    reward_model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    batch = encode_pairs(tokenizer, ["the plot was", "it"], ["good", "is bad and dull"], 64).rows(slice(None))
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
