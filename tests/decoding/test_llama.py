"""The lean Llama-family decode (`rlhf_env.decoding.llama`) against transformers' own forward."""

import copy

import pytest
import torch
import transformers

from rlhf_env.decoding.batched import BatchedDecoder
from rlhf_env.decoding.llama import LlamaStack, can_stack_llama, is_plain_llama
from rlhf_env.lm import position_ids
from rlhf_env.models import choose_backend

VOCAB = 97
FAMILY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama_mha_tied_biased": ("LlamaConfig", "LlamaForCausalLM",
                              dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
}


def model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_name, model_name, extra = FAMILY[kind]
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_name)(**{**sizes, **extra, **overrides})
    torch.manual_seed(seed)
    lm = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # biases are initialised to zero: make them count
        for name, parameter in lm.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return lm


def left_padded(batch: int = 3, width: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a shorter query, left-padded
    return ids * mask, mask


@pytest.mark.parametrize("kind", FAMILY)
def test_logits_match_the_models_own_forward_alone_and_stacked(kind):
    """Prefill of left-padded queries, then 5 decoding steps: every model's next-token logits equal a full forward
    of transformers over the whole sequence so far (fp32 rounding)."""
    policy, reference = model(kind, 0), model(kind, 1)
    assert is_plain_llama(policy) and can_stack_llama([policy, reference])
    for models in ([policy], [policy, reference]):
        stack = LlamaStack(models)
        ids, mask = left_padded()
        cache, logits = stack.forward(ids, mask, position_ids(mask), None)
        generator = torch.Generator().manual_seed(1)
        for _ in range(6):
            with torch.no_grad():
                for m, lm in enumerate(models):
                    full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
                    torch.testing.assert_close(logits[:, m], full, rtol=0, atol=2e-5)
            new = torch.randint(3, VOCAB, (ids.shape[0], 1), generator=generator)
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            cache, logits = stack.forward(new, mask, position_ids(mask)[:, -1:], cache)


def test_identical_stacked_models_give_identical_bits():
    """π and an exact copy as π_ref, stacked: every decoding step's log-probs are bit-identical (KL = 0)."""
    policy = model("llama")
    decoder = BatchedDecoder([policy, copy.deepcopy(policy)], ["llama", "llama"], batch=3)
    assert len(decoder.runners) == 1 and isinstance(decoder.runners[0], LlamaStack)
    ids, _ = left_padded()
    logprobs = decoder.feed([row.tolist() for row in ids], [True] * 3)
    for step in range(5):
        assert torch.equal(logprobs[:, 0], logprobs[:, 1])
        logprobs = decoder.feed([[5 + step]] * 3, [False] * 3)


def test_parameters_are_read_live():
    """An in-place change to the policy (an optimizer step) is seen at the next forward, stacked or not."""
    policy, reference = model("qwen2", 0), model("qwen2", 1)
    ids, mask = left_padded()
    for models in ([policy], [policy, reference]):
        stack = LlamaStack(models)
        _, before = stack.forward(ids, mask, position_ids(mask), None)
        with torch.no_grad():
            policy.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        _, after = stack.forward(ids, mask, position_ids(mask), None)
        with torch.no_grad():
            full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        assert not torch.allclose(before[:, 0], after[:, 0])
        torch.testing.assert_close(after[:, 0], full, rtol=0, atol=2e-5)


def test_only_plain_llama_family_models_take_the_lean_path():
    hooked = model("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    not_plain = {
        "a forward hook": hooked,
        "attention dropout": model("llama", attention_dropout=0.1),
        "an MLP bias": model("llama", mlp_bias=True),
        "another activation": model("llama", hidden_act="gelu"),
        "a sliding window": model("mistral", sliding_window=16),
        "a bare trunk": model("llama").model,
    }
    for why, lm in not_plain.items():
        assert not is_plain_llama(lm), why
        assert choose_backend(lm) == "hf", why
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                                 bos_token_id=1, eos_token_id=2))
    assert not is_plain_llama(gpt2)
    assert not can_stack_llama([model("llama"), model("llama", num_hidden_layers=3)])
    assert not can_stack_llama([model("llama"), model("qwen2")])
    other_rope = {"rope_type": "default", "rope_theta": 500.0}
    assert not can_stack_llama([model("llama"), model("llama", rope_parameters=other_rope)])


def test_a_model_that_does_not_stack_decodes_alone():
    """Two plain Llamas of different depth: one `LlamaStack` each, still matching their own forwards."""
    shallow, deep = model("llama"), model("llama", 1, num_hidden_layers=3)
    decoder = BatchedDecoder([shallow, deep], ["llama", "llama"], batch=3)
    assert [len(runner.models) for runner in decoder.runners] == [1, 1]
    ids, mask = left_padded()
    logprobs = decoder.feed([row[row != 0].tolist() for row in ids], [True] * 3)
    with torch.no_grad():
        for m, lm in enumerate((shallow, deep)):
            full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
            torch.testing.assert_close(logprobs[:, m], torch.log_softmax(full, -1), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["llama", "llama_mha_tied_biased", "qwen2"])
def test_a_large_single_model_decodes_on_its_own_parameters(kind, monkeypatch):
    """Above the stacking size a single model's weights are used in place (no copy of its parameters, which would
    double its memory and be remade after every optimizer step), and the logits still match its own forward."""
    import rlhf_env.decoding.llama

    monkeypatch.setattr(rlhf_env.decoding.llama, "STACK_MAX_PARAMETERS", 1000)
    policy = model(kind)
    stack = LlamaStack([policy])
    own = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    used = [t for layer in stack.weights()["layers"] for pairs in (layer["qkv"], layer["o"], layer["gate_up"],
                                                                   layer["down"]) for pair in pairs for t in pair
            if t is not None]
    assert len(used) >= 7 and all(t.untyped_storage().data_ptr() in own for t in used)
    ids, mask = left_padded()
    _, logits = stack.forward(ids, mask, position_ids(mask), None)
    with torch.no_grad():
        full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], full, rtol=0, atol=2e-5)
