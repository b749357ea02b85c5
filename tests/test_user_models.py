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
