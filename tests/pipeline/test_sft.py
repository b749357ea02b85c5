import pytest
import torch

from rlhf_env.pipeline.sft import SFTConfig, sft_loss, train_sft
from rlhf_env.text import encode_pairs


def test_loss_is_on_response_tokens_only(policy, tokenizer):
    batch = encode_pairs(tokenizer, ["the plot was", "it"], ["good", "is bad and dull"], 64).rows(slice(None))
    query_ids, query_mask, response_ids, response_mask = batch
    # Hand computation: full forward, pick the logit columns that predict response tokens.
    with torch.no_grad():
        nll, count = 0.0, 0
        for i in range(2):
            q = query_ids[i][query_mask[i].bool()]
            r = response_ids[i][response_mask[i].bool()]
            logits = policy(input_ids=torch.cat([q, r])[None]).logits[0]
            logp = torch.log_softmax(logits[len(q) - 1 : -1], -1).gather(-1, r[:, None])
            nll -= logp.sum().item()
            count += len(r)
        assert sft_loss(policy, batch).item() == pytest.approx(nll / count, rel=1e-5)
    assert int(response_mask.sum()) == count == 2 + 5


def test_short_sft_lowers_held_out_perplexity(policy, tokenizer, task):
    from rlhf_env.pipeline.sft import evaluate_policy

    before = evaluate_policy(policy, tokenizer, task, n=64, seed=1)["perplexity"]
    report = train_sft(policy, tokenizer, task, SFTConfig(steps=40, n_demonstrations=2000, n_eval=64),
                       progress=False)
    assert report["perplexity"] < 0.5 * before
    assert 12 < report["perplexity_floor"] < 18  # the sentiment generator's exact floor is about 15
    assert 1.0 < report["perplexity_ratio"]  # nothing beats the generator's own distribution on its samples
