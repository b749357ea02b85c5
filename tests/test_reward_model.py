"""The reward model: the score is read where a transformers sequence classifier reads it, padding changes nothing,
it saves as a standard classifier and loads any (GPT-2, Llama) with its offset, loading refuses what it must; and a
reward model with its own tokenizer scores the episode's text as that tokenizer encodes it."""

import json
from unittest import mock

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from agents.policy import ActorCritic
from rlhf_env.assets import asset_dir
from rlhf_env.env import RLHFEnv
from rlhf_env.lm import pad_left, pad_right
from rlhf_env.models import load_tokenizer
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.reward_model import RewardModel, encode_for_reward_model
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


def llama_classifier(tokenizer, seed: int = 0, context: int = 64, pad_token_id="tokenizer"):
    """A tiny random `LlamaForSequenceClassification` with one label (its RMSNorm has no bias to fold into)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id if pad_token_id == "tokenizer" else pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_()  # big enough that a wrong column shows
    return model


def gpt2_classifier(tokenizer, seed: int = 0, context: int = 64):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32, n_layer=2, n_head=4, num_labels=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_()
    return model


@torch.no_grad()
def own_scores(classifier, sequences: list[list[int]]) -> torch.Tensor:
    """The classifier's own forward on each unpadded sequence (a batch of one, as transformers reads it)."""
    return torch.tensor([float(classifier(input_ids=torch.tensor([s])).logits[0, 0]) for s in sequences])


def env_batch(tokenizer, prompts, responses):
    """Left-padded queries and right-padded responses (EOS appended), as the env pads them, and the unpadded
    sequences."""
    queries = [tokenizer(p)["input_ids"] for p in prompts]
    answers = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    return (*pad_left(queries, tokenizer.pad_token_id), *pad_right(answers, tokenizer.pad_token_id)), \
        [q + a for q, a in zip(queries, answers)]


PROMPTS = ["it", "honestly , the acting was not", "the plot"]
RESPONSES = ["was good", "bad and boring , the cast is very good", "seems fine"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_standard_classifier_scores_as_its_own_forward_on_each_unpadded_sequence(kind, tokenizer, tmp_path):
    classifier = (gpt2_classifier if kind == "gpt2" else llama_classifier)(tokenizer)
    classifier.save_pretrained(tmp_path / "rm")
    reward_model = RewardModel.from_pretrained(tmp_path / "rm")
    assert reward_model.backend == ("gpt2" if kind == "gpt2" else "hf")
    batch, sequences = env_batch(tokenizer, PROMPTS, RESPONSES)
    expected = own_scores(classifier, sequences)
    for backend in ("gpt2", "hf") if kind == "gpt2" else ("hf",):
        assert torch.allclose(reward_model.score(*batch, backend=backend), expected, atol=1e-5), backend
    # A real token equal to the pad id is not read, as transformers does not read it: the column before it is.
    q, qm, r, rm = batch
    r, rm = torch.cat([r, torch.full((3, 1), tokenizer.pad_token_id)], 1), torch.cat([rm, torch.ones(3, 1)], 1).long()
    for backend in ("gpt2", "hf") if kind == "gpt2" else ("hf",):
        assert torch.allclose(reward_model.score(q, qm, r, rm, backend=backend),
                              own_scores(classifier, [s + [tokenizer.pad_token_id] for s in sequences]), atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_reward_model_built_here_loads_as_a_standard_classifier_with_its_offset(kind, tokenizer, tmp_path):
    trunk = (gpt2_classifier if kind == "gpt2" else llama_classifier)(tokenizer, seed=1).base_model
    torch.manual_seed(0)
    reward_model = RewardModel(trunk).eval()
    with torch.no_grad():
        reward_model.head.weight.normal_()
        reward_model.head.bias.fill_(0.5)
    reward_model.offset.fill_(2.25)
    batch, sequences = env_batch(tokenizer, PROMPTS, RESPONSES)
    before = reward_model.score(*batch)
    reward_model.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm/config.json").read_text())
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert torch.allclose(loaded.score(*batch), before, atol=1e-5)
    if kind == "gpt2":  # the offset lives in ln_f's bias: a plain transformers load pays the normalised score
        assert config["reward_offset"] == 0.0 and float(loaded.offset) == 0.0
        assert torch.allclose(own_scores(classifier, sequences), before, atol=1e-5)
    else:  # RMSNorm has no bias: the offset stays in the config, and a plain transformers load misses it
        assert config["reward_offset"] == pytest.approx(2.25 - 0.5)
        assert torch.allclose(own_scores(classifier, sequences) - 1.75, before, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_critic_initialised_from_the_reward_model_values_as_it_scores(kind, tokenizer, policy, tmp_path):
    trunk = (gpt2_classifier if kind == "gpt2" else llama_classifier)(tokenizer, seed=2).base_model
    reward_model = RewardModel(trunk).eval()
    reward_model.offset.fill_(-0.75)
    reward_model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    critic = ActorCritic(policy, "hf", "reward_model", separate_critic=True, reward_model=loaded)
    (q, qm, r, rm), _ = env_batch(tokenizer, PROMPTS, RESPONSES)
    full = torch.ones(len(PROMPTS), 1, dtype=torch.long)
    # The value of the state after the whole response (one dummy token appended) is the score of that response.
    _, values = critic(q, qm, torch.cat([r, full], 1), torch.cat([rm, full], 1))
    last = rm.sum(1)  # the column of the dummy token: the state that holds the whole response
    with torch.no_grad():
        assert torch.allclose(values[torch.arange(len(PROMPTS)), last], loaded.score(q, qm, r, rm), atol=1e-5)


def test_save_then_load_gives_the_same_scores_and_an_old_format_folder_still_loads(reward_model, tokenizer,
                                                                                   tmp_path):
    reward_model.offset.fill_(0.25)
    batch = encode_pairs(tokenizer, ["the plot was", "it"], ["good", "is bad and dull"], 64).rows(slice(None))
    reward_model.save_pretrained(tmp_path / "new")
    assert torch.allclose(RewardModel.from_pretrained(tmp_path / "new").score(*batch), reward_model.score(*batch),
                          atol=1e-5)
    # rlhf-gym 0.2 saved the trunk, reward_head.safetensors and reward_config.json: it loads, unchanged.
    legacy = tmp_path / "legacy"
    reward_model.trunk.save_pretrained(legacy)
    head = {k: v.contiguous() for k, v in reward_model.head.state_dict().items()}
    save_file(head, legacy / "reward_head.safetensors")
    (legacy / "reward_config.json").write_text(json.dumps({"offset": 0.25}))
    old = RewardModel.from_pretrained(legacy)
    assert torch.equal(old.score(*batch), reward_model.score(*batch)) and float(old.offset) == 0.25
    old.save_pretrained(legacy)  # saving it again writes the standard format
    assert not (legacy / "reward_head.safetensors").exists()
    assert torch.allclose(RewardModel.from_pretrained(legacy).score(*batch), reward_model.score(*batch), atol=1e-5)


def test_loading_refuses_pickles_other_label_counts_and_foreign_directories(reward_model, tokenizer, tmp_path):
    reward_model.trunk.config.save_pretrained(tmp_path)
    torch.save(reward_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        RewardModel.from_pretrained(tmp_path)
    two = gpt2_classifier(tokenizer)
    two.config.num_labels = 2
    GPT2ForSequenceClassification(two.config).save_pretrained(tmp_path / "two_labels")
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel.from_pretrained(tmp_path / "two_labels")
    reward_model.trunk.config.num_labels = 1
    reward_model.trunk.save_pretrained(tmp_path / "trunk_only")  # no score layer: it would be random
    with pytest.raises(ValueError, match="score.weight"):
        RewardModel.from_pretrained(tmp_path / "trunk_only")
    (tmp_path / "no_config").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "no_config/model.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        RewardModel.from_pretrained(tmp_path / "no_config")
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModel.from_pretrained(tmp_path / "missing")


# --- a reward model with its own tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer(task):
    """A byte-level BPE (another vocabulary, same special-token names) trained on a few hundred task prompts."""
    return train_tokenizer(task.train_prompts()[:400], kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def env_tokenizer():
    """The default task's (the env's policy's) tokenizer."""
    return load_tokenizer(asset_dir("sentiment") / "tokenizer")


def test_the_same_tokenizer_passes_the_env_ids_straight_through(env_tokenizer, tmp_path):
    classifier = gpt2_classifier(env_tokenizer)
    classifier.save_pretrained(tmp_path / "rm")
    env_tokenizer.save_pretrained(tmp_path / "rm")  # a copy of the policy's tokenizer, in the RM's folder
    env = RLHFEnv(reward_model=tmp_path / "rm")
    assert env.world.reward_model.tokenizer is not None and env.world.reward_tokenizer is None
    env.reset(seed=0)
    with mock.patch.object(PreTrainedTokenizerFast, "__call__") as encode:
        for _ in range(env.world.max_new_tokens):
            _, _, terminated, _, info = env.step(env.action_space.sample())
            if terminated:
                break
    assert encode.call_count == 0 and np.isfinite(info["score"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_reward_model_with_its_own_tokenizer_scores_the_text_as_that_tokenizer_encodes_it(kind, bpe_tokenizer,
                                                                                            tmp_path):
    classifier = (llama_classifier if kind == "llama" else gpt2_classifier)(bpe_tokenizer)
    classifier.save_pretrained(tmp_path / "rm")
    if kind == "llama":  # the tokenizer saved in the reward model's folder (standard practice)
        bpe_tokenizer.save_pretrained(tmp_path / "rm")
        envs = gym.make_vec("RLHF-v0", num_envs=3, reward_model=tmp_path / "rm")
    else:  # or given as reward_tokenizer= (a local folder or an object)
        bpe_tokenizer.save_pretrained(tmp_path / "tok")
        envs = gym.make_vec("RLHF-v0", num_envs=3, reward_model=tmp_path / "rm", reward_tokenizer=tmp_path / "tok")
    world = envs.unwrapped.world
    assert world.reward_tokenizer is not None
    tok = world.tokenizer
    envs.reset(seed=0)
    for _ in range(world.max_new_tokens):  # the env runs, and pays finite scores
        _, rewards, _, _, _ = envs.step(envs.action_space.sample())
        assert np.isfinite(rewards).all()
    # One batched score of episodes of different lengths: each as the classifier scores its own encoding of the
    # text that the policy's tokenizer decodes from query + response (for the task's word-level tokenizer,
    # prompt + " " + response).
    prompts = ["it", "honestly , the acting was not", "the plot"]
    responses = ["was good", "bad and boring , the cast is very good", ""]
    queries = [tok(p)["input_ids"] for p in prompts]
    answers = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
    calls, encode = [], type(bpe_tokenizer).__call__

    def counted(self, *args, **kwargs):
        calls.append(self)
        return encode(self, *args, **kwargs)

    with mock.patch.object(type(bpe_tokenizer), "__call__", counted):
        scores = world.score(prompts, queries, answers, texts, [True] * len(prompts))
    assert len(calls) == 1  # batched: one call for every finished episode
    joined = [f"{p} {r}" if r else p for p, r in zip(prompts, responses)]
    assert [tok.decode(q + a, skip_special_tokens=True) for q, a in zip(queries, answers)] == joined
    encoded = [bpe_tokenizer(text)["input_ids"] for text in joined]
    assert all(ids[0] == bpe_tokenizer.bos_token_id for ids in encoded)  # the reward model's own special tokens
    assert np.allclose(scores, own_scores(classifier, encoded), atol=1e-5)


def test_a_text_longer_than_the_reward_models_context_loses_the_prompts_first_tokens(task, bpe_tokenizer):
    text = task.train_prompts()[0] + " " + "good and moving " * 8
    ids = bpe_tokenizer(text)["input_ids"]
    cut, mask = encode_for_reward_model(bpe_tokenizer, [text, "it"], max_length=len(ids) - 5)
    assert cut[0].tolist() == ids[:1] + ids[6:]  # BOS kept, the next five tokens (the prompt's first) dropped
    assert mask.sum(1).tolist() == [len(ids) - 5, len(bpe_tokenizer("it")["input_ids"])]


def test_a_reward_model_with_its_own_tokenizer_may_have_a_smaller_vocabulary(env_tokenizer):
    small = train_tokenizer(["the plot was good", "it is bad"])  # a word-level tokenizer of 12 tokens
    assert len(small) < len(env_tokenizer)
    classifier = llama_classifier(small)
    with pytest.raises(ValueError, match="reward model's vocabulary"):  # ids passed through: refused
        RLHFEnv(reward_model=RewardModel.from_classifier(classifier))
    env = RLHFEnv(reward_model=RewardModel.from_classifier(classifier), reward_tokenizer=small)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(env.unwrapped.tokenizer.eos_token_id)
    assert terminated and np.isfinite(info["score"])


def test_a_causal_lm_folder_is_named_as_one(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a causal LM"):
        RewardModel.from_pretrained(tmp_path)


def test_a_critic_cannot_start_as_a_reward_model_that_reads_other_ids(bpe_tokenizer, tmp_path):
    from agents.ppo import PPO, PPOConfig

    llama_classifier(bpe_tokenizer).save_pretrained(tmp_path / "rm")
    bpe_tokenizer.save_pretrained(tmp_path / "rm")
    envs = gym.make_vec("RLHF-v0", num_envs=4, reward_model=tmp_path / "rm")
    config = PPOConfig(episodes_per_update=4, minibatch_size=4, separate_critic=True, value_init="reward_model")
    with pytest.raises(ValueError, match="its own tokenizer's ids"):
        PPO(envs, config, progress=False)
