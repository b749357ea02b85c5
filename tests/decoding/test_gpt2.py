"""The lean GPT-2 decode path computes what the Hugging Face forward computes; other models use their own forward."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_env.decoding.gpt2
from rlhf_env.decoding.gpt2 import GPT2Stack, can_stack, gpt2_forward, is_plain_gpt2
from rlhf_env.env import RLHFEnv
from rlhf_env.lm import pad_left, pad_right, position_ids, response_logprobs
from rlhf_env.models import build_policy, choose_backend
from rlhf_env.vector_env import RLHFVectorEnv


def test_lean_forward_matches_the_hugging_face_forward_over_padding_and_dead_columns(policy, tokenizer):
    queries = [tokenizer(text)["input_ids"] for text in ["the food was", "it is not", "the plot"]]
    ids, mask = pad_left(queries, tokenizer.pad_token_id, torch.device("cpu"))  # rows of different lengths
    positions = position_ids(mask)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf = policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = gpt2_forward(policy, ids, mask, positions, None)
        hf_cache, next_positions = hf.cache, positions[:, -1] + 1
        assert torch.allclose(logits, hf.logits[:, -1], atol=1e-5)
        for step in range(6):
            token = torch.randint(4, len(tokenizer), (3, 1), generator=generator)
            live = torch.tensor([[1], [step % 2], [1]])  # row 1 is idle every other step: a dead column
            mask = torch.cat([mask, live], dim=1)
            hf = policy(input_ids=token, attention_mask=mask, position_ids=next_positions[:, None] * live,
                        cache=hf_cache, use_cache=True)
            cache, logits = gpt2_forward(policy, token, mask, next_positions[:, None] * live, cache)
            hf_cache, next_positions = hf.cache, next_positions + live[:, 0]
            rows = live[:, 0].bool()
            assert torch.isfinite(logits).all()
            assert torch.allclose(logits[rows], hf.logits[rows, -1], atol=1e-5)


def test_lean_path_is_taken_only_where_it_computes_the_same_thing(policy, tokenizer):
    assert is_plain_gpt2(policy)
    noisy = build_policy(tokenizer, "tiny", seed=0)
    noisy.config.resid_pdrop = 0.1  # the lean path has no dropout: decided from the config, whatever the mode
    assert not is_plain_gpt2(noisy.eval()) and not is_plain_gpt2(noisy.train())
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert not is_plain_gpt2(llama)
    hooked = build_policy(tokenizer, "tiny", seed=0)
    handle = hooked.lm_head.register_forward_hook(lambda module, args, out: out + 1)  # a hook must still run
    assert not is_plain_gpt2(hooked)
    handle.remove()
    assert is_plain_gpt2(hooked)

    class Adapter(torch.nn.Module):  # a layer swapped in (as LoRA does): the lean path would skip it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    hooked.transformer.h[0].mlp.c_fc = Adapter(hooked.transformer.h[0].mlp.c_fc)
    assert not is_plain_gpt2(hooked)


def test_the_backend_is_chosen_once_from_the_model(policy, tokenizer):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert choose_backend(policy) == "gpt2" and choose_backend(policy, "hf") == "hf"
    assert choose_backend(llama) == "llama" and choose_backend(llama, "hf") == "hf"
    with pytest.raises(ValueError, match="plain GPT-2"):
        choose_backend(llama, "gpt2")
    with pytest.raises(ValueError, match="plain Llama"):
        choose_backend(policy, "llama")
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend(policy, "fast")
    env = RLHFEnv(backend="hf")
    assert env.world.backends == {"policy": "hf", "reference": "hf", "reward_model": "hf"}
    assert RLHFEnv().world.backends == {"policy": "gpt2", "reference": "gpt2", "reward_model": "gpt2"}


def test_lean_training_forward_matches_the_hugging_face_forward_and_its_gradients(policy, tokenizer, perturbed_policy):
    from agents.policy import ActorCritic, response_logits

    queries = [tokenizer(t)["input_ids"] for t in ["the food was", "it is not", "the plot of the film"]]
    responses = [tokenizer(t)["input_ids"] for t in ["great .", "bad at all and dull", "fine"]]
    batch = (*pad_left(queries, tokenizer.pad_token_id), *pad_right(responses, tokenizer.pad_token_id))
    model = ActorCritic(perturbed_policy(), "gpt2", value_init="small").train()
    results = {}
    for lean in (True, False):
        model.backend = "gpt2" if lean else "hf"
        model.zero_grad()
        logits, values = model(*batch, temperature=0.7)
        reference_logits, hidden = response_logits(model.lm, *batch, model.backend, temperature=0.7,
                                                   output_hidden_states=True)
        mask = batch[3].bool()
        loss = logits.log_softmax(-1).gather(-1, batch[2][..., None])[..., 0][mask].sum() + values[mask].sum()
        loss.backward()
        results[lean] = (logits.detach(), values.detach(), hidden.detach(),
                         {name: p.grad.clone() for name, p in model.named_parameters()})
    (lean_logits, lean_values, lean_hidden, lean_grads), (logits, values, hidden, grads) = results[True], results[False]
    real = torch.cat([batch[1], batch[3]], dim=1).bool()  # padding columns compute nothing anyone reads
    assert torch.allclose(lean_logits[mask], logits[mask], atol=1e-5)
    assert torch.allclose(lean_values[mask], values[mask], atol=1e-5)
    assert torch.allclose(lean_hidden[real], hidden[real], atol=1e-5)
    assert lean_grads.keys() == grads.keys() and len(grads) > 20
    for name, grad in grads.items():  # every parameter's gradient, the tied embedding included
        assert torch.allclose(lean_grads[name], grad, atol=1e-5, rtol=1e-4), name
        assert grad.abs().sum() > 0, name


def _rollout(envs, steps, seed):
    """Fixed actions (independent of the log-probs), so both decode paths see the very same tokens."""
    rng = np.random.default_rng(seed)
    envs.reset(seed=seed)
    records = []
    for _ in range(steps):
        _, reward, terminated, _, info = envs.step(rng.integers(4, envs.world.vocab_size, envs.num_envs))
        missing = np.zeros(envs.num_envs)  # a step where every row restarts carries no log-probs
        records.append((reward, terminated, info.get("logprob", missing), info.get("ref_logprob", missing)))
    return records


def test_vector_env_gives_the_same_rewards_on_both_decode_paths(perturbed_policy):
    kwargs = dict(num_envs=4, policy=perturbed_policy(scale=0.02), compact_at=40, max_new_tokens=12)
    lean = _rollout(RLHFVectorEnv(**kwargs), steps=60, seed=3)
    slow = _rollout(RLHFVectorEnv(**kwargs, backend="hf"), steps=60, seed=3)
    for (reward, terminated, logprob, ref), (reward2, terminated2, logprob2, ref2) in zip(lean, slow):
        assert np.array_equal(terminated, terminated2)
        np.testing.assert_allclose(reward, reward2, atol=1e-5)
        np.testing.assert_allclose(logprob, logprob2, atol=1e-5)
        np.testing.assert_allclose(ref, ref2, atol=1e-5)


def test_a_non_gpt2_policy_runs_through_its_own_forward_with_an_exact_kl_seam(tokenizer, task):
    def llama(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return LlamaForCausalLM(config).eval()

    policy, reference = llama(0), llama(1)
    envs = RLHFVectorEnv(num_envs=3, policy=policy, reference=reference, tokenizer=tokenizer,
                         reward_fn=task.gold_reward, max_new_tokens=8)
    rng = np.random.default_rng(0)
    envs.reset(seed=0)
    kl_sums, checked = np.zeros(3), 0
    for _ in range(30):
        rows = [list(r) for r in envs._episodes.responses]
        queries = [list(q) for q in envs._episodes.queries]
        _, _, terminated, _, info = envs.step(rng.integers(4, len(tokenizer), 3))
        if "kl" in info:  # absent on steps where every row restarts
            kl_sums += np.where(info["_kl"], info["kl"], 0.0)
        for row in np.flatnonzero(terminated):
            response = rows[row] + [int(envs._episodes.responses[row][-1])]
            query_ids, query_mask = pad_left([queries[row]], tokenizer.pad_token_id, torch.device("cpu"))
            response_ids, response_mask = torch.tensor([response]), torch.ones(1, len(response), dtype=torch.long)
            logp = [response_logprobs(m, query_ids, query_mask, response_ids, response_mask).sum().item()
                    for m in (policy, reference)]
            assert kl_sums[row] == pytest.approx(logp[0] - logp[1], abs=1e-4)
            kl_sums[row], checked = 0.0, checked + 1
    assert checked >= 3


def _decode_steps(stack, vocab, steps=12, batch=6, seed=0):
    """Prefill ragged queries, then decode `steps` tokens (some rows idle at times); the log-probs of every step."""
    generator = torch.Generator().manual_seed(seed)
    queries = [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in range(3, 3 + batch)]
    ids, mask = pad_left(queries, 0, torch.device("cpu"))
    positions = position_ids(mask)
    cache, logits = stack.forward(ids, mask, positions, None)
    outputs, next_positions = [logits], positions[:, -1] + 1
    for step in range(steps):
        token = torch.randint(4, vocab, (batch, 1), generator=generator)
        live = (torch.arange(batch)[:, None] + step) % 3 != 0
        mask = torch.cat([mask, live.long()], dim=1)
        cache, logits = stack.forward(token, mask, next_positions[:, None] * live, cache)
        next_positions = next_positions + live[:, 0]
        outputs.append(logits)
    return torch.stack(outputs)  # (steps + 1, B, M, V)


def test_stacked_models_match_each_model_alone_and_identical_models_agree_bit_for_bit(perturbed_policy):
    policy, other = perturbed_policy(scale=0.0), perturbed_policy(scale=0.05)
    vocab = policy.config.vocab_size
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # thread-dependent rounding is what would break KL = 0 for π = π_ref
    try:
        with torch.no_grad():
            stacked = _decode_steps(GPT2Stack([policy, other]), vocab)
            alone = torch.cat([_decode_steps(GPT2Stack([m]), vocab) for m in (policy, other)], dim=2)
            twins = _decode_steps(GPT2Stack([policy, policy]), vocab)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(stacked, alone, atol=1e-5) and (stacked[:, :, 0] - stacked[:, :, 1]).abs().max() > 0.1
    assert torch.equal(twins[:, :, 0], twins[:, :, 1])


def test_stacked_weights_follow_in_place_updates_of_the_live_policy(perturbed_policy):
    live, frozen = perturbed_policy(scale=0.0), perturbed_policy(scale=0.0)
    stack = GPT2Stack([live, frozen])
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        _, before = stack.forward(ids, mask, position_ids(mask), None)
        live.transformer.ln_f.bias.add_(1.0)  # what an optimizer step does
        _, after = stack.forward(ids, mask, position_ids(mask), None)
        _, expected = gpt2_forward(live, ids, mask, position_ids(mask), None)
    assert torch.equal(before[:, 0], before[:, 1]) and not torch.equal(after[:, 0], before[:, 0])
    assert torch.allclose(after[:, 0], expected, atol=1e-5) and torch.equal(after[:, 1], before[:, 1])


def test_a_decoder_reads_replaced_parameter_objects_when_every_row_starts_afresh(perturbed_policy):
    """FSDP swaps its gathered parameters in for the shards (new objects, not an in-place change): the decoder
    must read the modules again at the next full restart, not decode with the objects it found when built."""
    from rlhf_env.decoding.batched import BatchedDecoder

    live, frozen, other = perturbed_policy(scale=0.0), perturbed_policy(scale=0.0), perturbed_policy(scale=0.05)
    decoder = BatchedDecoder([live, frozen], ["gpt2", "gpt2"], batch=2)
    query = [[5, 6, 7], [8, 9]]
    before = decoder.feed(query, [True, True]).clone()
    live.load_state_dict(other.state_dict(), assign=True)  # new parameter objects in the modules
    after = decoder.feed(query, [True, True])
    with torch.no_grad():
        expected = BatchedDecoder([other], ["gpt2"], batch=2).feed(query, [True, True])
    assert torch.equal(before[:, 0], before[:, 1]) and not torch.allclose(after[:, 0], before[:, 0])
    assert torch.allclose(after[:, 0], expected[:, 0], atol=1e-5) and torch.equal(after[:, 1], before[:, 1])


def test_stacking_is_only_chosen_for_small_models_of_one_shape(monkeypatch, perturbed_policy):
    policy, other, different = perturbed_policy(seed=0), perturbed_policy(seed=1), perturbed_policy(seed=2)
    different.config.layer_norm_epsilon = 1e-3  # same weight shapes, different arithmetic
    assert can_stack([policy, other]) and not can_stack([policy, different])
    monkeypatch.setattr(rlhf_env.decoding.gpt2, "STACK_MAX_PARAMETERS", 1000)
    assert not can_stack([policy, other]) and can_stack([policy])  # one model: views, no copy


def test_lean_reward_model_scores_match_the_hugging_face_trunk(tokenizer, monkeypatch):
    from rlhf_env.assets import asset_dir
    from rlhf_env.reward_model import RewardModel

    model = RewardModel.from_pretrained(asset_dir("sentiment") / "reward_model")
    queries = [tokenizer(t)["input_ids"] for t in ["the food was", "it is not", "the plot of the film"]]
    responses = [tokenizer(t)["input_ids"] for t in ["great .", "bad at all and dull", "fine"]]
    query_ids, query_mask = pad_left(queries, tokenizer.pad_token_id, torch.device("cpu"))
    response_ids, response_mask = pad_right(responses, tokenizer.pad_token_id, device=torch.device("cpu"))
    lean_calls = []
    hidden_states = GPT2Stack.hidden_states
    monkeypatch.setattr(GPT2Stack, "hidden_states", lambda *a, **k: lean_calls.append(1) or hidden_states(*a, **k))
    assert model.backend == "gpt2"  # decided when it was loaded
    lean = model.score(query_ids, query_mask, response_ids, response_mask)
    assert lean_calls == [1]  # scoring really took the lean path
    hugging_face = model.score(query_ids, query_mask, response_ids, response_mask, backend="hf")  # its own forward
    assert lean_calls == [1] and torch.allclose(lean, hugging_face, atol=1e-5) and lean.std() > 0
