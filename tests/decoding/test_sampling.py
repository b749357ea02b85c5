"""The one sampler: exact log-probs of the unfiltered distribution, EOS handling, seeds, both backends."""

import pytest
import torch

from rlhf_env.decoding.sampling import sample
from rlhf_env.lm import position_ids, response_logprobs
from rlhf_env.models import choose_backend


def _queries(tokenizer, task, n=24):
    return [tokenizer(p)["input_ids"] for p in task.eval_prompts()[:n]]


@pytest.mark.parametrize("backend", ["gpt2", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_padded_recomputation(policy, tokenizer, task, temperature, backend):
    queries = _queries(tokenizer, task)
    assert len({len(q) for q in queries}) > 1  # mixed query lengths: left padding is exercised
    samples = sample(policy, queries, backend=backend, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                     generator=torch.Generator().manual_seed(0))
    recomputed = response_logprobs(policy, samples.query_ids, samples.query_mask, samples.responses,
                                   samples.response_mask, temperature=temperature)
    assert samples.response_mask.sum() > 0
    assert torch.allclose(recomputed, samples.logprobs, atol=1e-5, rtol=0)


def test_recorded_logprobs_are_the_unfiltered_distribution(policy, tokenizer, task):
    """With top-k filtering (transformers' default top_k=50) log-probs of rare tokens would be -inf or shifted."""
    queries = _queries(tokenizer, task, 4)
    samples = sample(policy, queries, backend="gpt2", max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    logits = policy(input_ids=samples.query_ids, attention_mask=samples.query_mask,
                    position_ids=position_ids(samples.query_mask)).logits[:, -1]
    expected = torch.log_softmax(logits, -1).gather(-1, samples.responses[:, :1])[:, 0]
    assert torch.allclose(samples.logprobs[:, 0], expected, atol=1e-5)


def test_eos_ends_a_response_and_padding_follows(policy, tokenizer, task):
    queries = _queries(tokenizer, task, 16)
    # Raise the EOS logit by 3 (P(EOS) ≈ 13% a step) so that sequences end at different steps, or not at all.
    eos_bias = torch.zeros(len(tokenizer))
    eos_bias[tokenizer.eos_token_id] = 3.0
    policy.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eos_bias)
    assert choose_backend(policy) == "hf"  # a hook keeps the model on its own forward, where the hook runs
    samples = sample(policy, queries, backend="hf", max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(1))
    for row, mask, logp, done in zip(samples.responses, samples.response_mask, samples.logprobs, samples.finished):
        eos = (row == tokenizer.eos_token_id).nonzero()
        if done:
            end = int(eos[0]) + 1
            assert mask[:end].all() and not mask[end:].any()
            assert (row[end:] == tokenizer.pad_token_id).all() and (logp[end:] == 0).all()
        else:
            assert len(eos) == 0 and mask.all()
    assert 0 < int(samples.finished.sum()) < len(queries)  # both kinds of ending were exercised


def test_same_generator_seed_same_samples_on_either_backend(policy, tokenizer, task):
    queries = _queries(tokenizer, task, 8)
    kwargs = dict(max_new_tokens=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    a = sample(policy, queries, backend="gpt2", generator=torch.Generator().manual_seed(5), **kwargs)
    b = sample(policy, queries, backend="gpt2", generator=torch.Generator().manual_seed(5), **kwargs)
    c = sample(policy, queries, backend="gpt2", generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.responses, c.responses)
    # The two arithmetics agree to float rounding: the same draws pick the same tokens here.
    hf = sample(policy, queries, backend="hf", generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(hf.responses, a.responses) and torch.allclose(hf.logprobs, a.logprobs, atol=1e-5)


def test_bad_temperature_is_refused(policy):
    with pytest.raises(ValueError, match="temperature"):
        sample(policy, [[1, 4]], backend="gpt2", max_new_tokens=2, eos_token_id=2, pad_token_id=0, temperature=0.0)
