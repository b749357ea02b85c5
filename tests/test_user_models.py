"""Real users bring their own local models: the pipeline must work for any HF causal LM, not only our GPT-2."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from rlhf_env.decoding.sampling import sample
from rlhf_env.lm import response_logprobs
from rlhf_env.models import load_causal_lm
from rlhf_env.pipeline.reward_training import score_texts
from rlhf_env.pipeline.sft import SFTConfig, train_sft
from rlhf_env.reward_model import RewardModel


@pytest.fixture
def llama_dir(tokenizer, tmp_path):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_local_llama_samples_with_exact_logprobs(llama_dir, tokenizer, task):
    model = load_causal_lm(llama_dir)
    queries = [tokenizer(p)["input_ids"] for p in task.eval_prompts()[:12]]
    samples = sample(model, queries, backend="hf", max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    recomputed = response_logprobs(model, samples.query_ids, samples.query_mask, samples.responses,
                                   samples.response_mask)
    assert torch.allclose(recomputed, samples.logprobs, atol=1e-5)


def test_local_llama_fine_tunes_and_serves_as_reward_trunk(llama_dir, tokenizer, task):
    model = load_causal_lm(llama_dir)
    report = train_sft(model, tokenizer, task, SFTConfig(steps=15, n_demonstrations=300, n_eval=32),
                       progress=False)
    assert report["perplexity"] < len(tokenizer)  # better than uniform after a few steps
    reward_model = RewardModel(model.model).eval()
    assert isinstance(reward_model.trunk, LlamaModel)
    scores = score_texts(reward_model, tokenizer, ["the plot was", "it"], ["good", "is bad"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def tiny_causal_lm(kind: str, tokenizer, seed: int = 0):
    """A tiny random model of a real architecture, built from its config (nothing downloaded)."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        MambaConfig,
        MambaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    attention = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, **ids)
    config, cls = {
        "llama": (LlamaConfig(num_key_value_heads=2, **attention), LlamaForCausalLM),
        "qwen2": (Qwen2Config(num_key_value_heads=2, **attention), Qwen2ForCausalLM),
        "gpt_neox": (GPTNeoXConfig(**attention), GPTNeoXForCausalLM),
        "mistral": (MistralConfig(num_key_value_heads=2, sliding_window=16, **attention), MistralForCausalLM),
        "mamba": (MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8, **ids), MambaForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox"])
def test_other_architectures_run_through_the_env_with_an_exact_kl_seam(kind, tokenizer):
    import numpy as np

    from rlhf_env.lm import pad_left, pad_right
    from rlhf_env.vector_env import RLHFVectorEnv

    policy, reference = tiny_causal_lm(kind, tokenizer, seed=0), tiny_causal_lm(kind, tokenizer, seed=1)
    envs = RLHFVectorEnv(num_envs=3, policy=policy, reference=reference, tokenizer=tokenizer, max_new_tokens=8,
                         reward_fn=lambda prompts, responses: [0.0] * len(prompts),
                         compact_at=20)  # compaction is exercised
    assert envs.world.backends == {"policy": "hf", "reference": "hf"}
    envs.reset(seed=0)
    rng, checked = np.random.default_rng(0), 0
    while checked < 6:
        queries = envs.queries()
        logp = envs.next_token_logprobs
        actions = np.array([rng.choice(len(row), p=np.exp(row) / np.exp(row).sum()) for row in logp])
        responses = [list(r) for r in envs.unwrapped._episodes.responses]
        _, _, terminated, _, infos = envs.step(actions)
        for row in np.flatnonzero(terminated):  # Σ KL_t against an independent full forward of each model
            response = responses[row] + [int(actions[row])]
            q, qm = pad_left([queries[row]], tokenizer.pad_token_id)
            r, rm = pad_right([response], tokenizer.pad_token_id)
            with torch.no_grad():
                exact = response_logprobs(policy, q, qm, r, rm).sum() - response_logprobs(reference, q, qm, r, rm).sum()
            assert infos["kl_sum"][row] == pytest.approx(float(exact), abs=1e-5)
            checked += 1


@pytest.mark.parametrize("kind", ["mistral", "mamba"])
def test_a_model_whose_cache_the_env_cannot_handle_is_refused_when_the_env_is_built(kind, tokenizer):
    from rlhf_env.models import UnsupportedModel
    from rlhf_env.vector_env import RLHFVectorEnv

    with pytest.raises(UnsupportedModel, match="full-attention|max_position_embeddings"):
        RLHFVectorEnv(num_envs=2, policy=tiny_causal_lm(kind, tokenizer), reference=tiny_causal_lm(kind, tokenizer),
                      tokenizer=tokenizer, reward_fn=lambda prompts, responses: [0.0] * len(prompts))
