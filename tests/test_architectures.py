"""Every architecture the env supports, end to end: tiny random models built from their configs (nothing downloaded),
saved to a temporary folder and loaded by path, as a user's local model would be. For each: the KL seam is exact,
PPO, REINFORCE (RLOO) and DPO each run two updates, and a checkpoint resumes bit for bit. Models whose cache the
env cannot decode are refused by name when the env is built (docs/environment.md, "Models: backends and
architectures")."""

import copy
import logging

import numpy as np
import pytest
import torch
import transformers

from agents.checkpoint import state_digest
from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env.lm import pad_left, pad_right, response_logits
from rlhf_env.models import UnsupportedModel, check_decodable
from rlhf_env.vector_env import RLHFVectorEnv

# row -> (config class, model class, config fields besides the sizes and token ids). Each row's model is 2 layers
# of width 64 (`tiny_model`); "gpt2" has its dropout off (as rlhf_env.models.build_policy makes it) and takes the
# lean "gpt2" backend, "gpt2_dropout" keeps transformers' default 0.1 (as the released GPT-2 checkpoints have it),
# which the lean path does not implement, so it runs through the model's own forward like every other row.
ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt2_dropout": ("GPT2Config", "GPT2LMHeadModel", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # Pythia
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    # Gemma 2 alternates sliding-window and full layers; with every layer full (a window no shorter than the
    # context is full attention) it runs.
    "gemma2_full_attention": ("Gemma2Config", "Gemma2ForCausalLM",
                              dict(num_key_value_heads=2, head_dim=16, layer_types=["full_attention"] * 2)),
}
REFUSED = {  # row -> (..., as above, what refuses it): caches the env cannot splice row by row
    # config.layer_types names the layers: refused from the config, before any forward
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16), "config"),
    # sliding_window = None does not switch off sliding layer_types (the model's forward would crash)
    "qwen2_sliding_layers_without_a_window": ("Qwen2Config", "Qwen2ForCausalLM",
                                              dict(num_key_value_heads=2, sliding_window=None,
                                                   layer_types=["full_attention", "sliding_attention"]), "config"),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(state_size=8, max_position_embeddings=64), "config"),
    # no layer_types: the two-token forward's cache tells
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM",
                               dict(num_key_value_heads=2, sliding_window=16), "cache"),
}
SIZES = {"GPT2Config": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
         "MambaConfig": dict(hidden_size=64, num_hidden_layers=2)}
ATTENTION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
MAX_NEW_TOKENS = 6


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(autouse=True)
def no_logged_warnings():
    """No warnings, logged ones included (``filterwarnings = error`` sees only `warnings.warn`): transformers logs
    through its own logger, which does not propagate to the root, and `agents.checkpoint` logs a resume that will
    not be bit for bit."""
    records = _Records()
    loggers = [logging.getLogger("transformers"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert not records.messages, records.messages


def tiny_model(spec: tuple, tokenizer, seed: int) -> torch.nn.Module:
    """A 2-layer, 64-wide random model of `spec` (an `ARCHITECTURES` or `REFUSED` entry) for `tokenizer`'s ids."""
    config_name, model_name, extra = spec[:3]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, config_name)(**SIZES.get(config_name, ATTENTION), **ids, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """``saved(kind) -> folder``: `kind`'s tiny model saved twice, ``folder/policy`` (seed 0) and
    ``folder/reference`` (seed 1), in safetensors."""
    root = tmp_path_factory.mktemp("architectures")

    def folder(kind: str):
        if not (root / kind).is_dir():
            for name, seed in (("policy", 0), ("reference", 1)):
                tiny_model(ARCHITECTURES[kind], tokenizer, seed).save_pretrained(root / kind / name)
        return root / kind

    return folder


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward with variance under a random policy (longer is better), so that every agent has a gradient."""
    return [len(response) / 10 for response in responses]


def make_envs(folder, tokenizer, num_envs: int = 4, reference: str = "policy") -> RLHFVectorEnv:
    """The env on `folder`'s models, loaded by path: π = ``policy``, π_ref = `reference` (the same weights, loaded
    again, unless ``"reference"``)."""
    return RLHFVectorEnv(num_envs=num_envs, policy=folder / "policy", reference=folder / reference,
                         tokenizer=tokenizer, reward_fn=response_length, max_new_tokens=MAX_NEW_TOKENS, beta=0.1)


def digest(agent) -> str:
    """The agent's trained weights (PPO's policy and value head, the others' policy) as one sha256."""
    return state_digest(getattr(agent, "model", None) or agent.lm)


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without wall-clock times (the update and timestep counters stay)."""
    return [{k: v for k, v in m.items() if not k.startswith("time/") or k in ("time/timesteps", "time/updates")}
            for m in metrics]


AGENTS = {  # name -> (agent class, its config as a function of the `small_pairs` fixture)
    "ppo": (PPO, lambda pairs: PPOConfig(episodes_per_update=4, minibatch_size=2, update_epochs=2,
                                         learning_rate=1e-3, value_init="small")),
    "rloo": (Reinforce, lambda pairs: ReinforceConfig(episodes_per_update=4, samples_per_prompt=2,
                                                      learning_rate=1e-3)),
    # 12 pairs in batches of 8: the second update crosses an epoch boundary (a new order is drawn, which a checkpoint
    # saved after it must restore).
    "dpo": (DPO, lambda pairs: DPOConfig(batch_size=8, micro_batch_size=4, learning_rate=1e-3, pairs=pairs(12),
                                         eval_pairs=pairs(4, "eval"))),
}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_the_backend_is_lean_for_plain_gpt2_and_llama_family_models_and_the_models_own_forward_otherwise(
        kind, saved, tokenizer):
    envs = make_envs(saved(kind), tokenizer, num_envs=1)
    expected = "gpt2" if kind == "gpt2" else "llama" if kind in ("llama", "qwen2", "mistral") else "hf"
    assert envs.world.backends == {"policy": expected, "reference": expected}
    assert type(envs.world.policy).__name__ == ARCHITECTURES[kind][1]


def fp64_logprobs(model, query_ids, query_mask, responses, response_mask) -> torch.Tensor:
    """log π(y_t | x, y_<t) ``(1, T)`` of an fp64 copy of `model`, kept in fp64 (`response_logprobs` returns fp32)."""
    logits = response_logits(model, query_ids, query_mask, responses, response_mask)  # (1, T, V), fp64
    return torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0] * response_mask


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_the_kl_seam_is_exact(kind, saved, tokenizer):
    """Σ_t KL_t the env pays = log π(y|x) − log π_ref(y|x) by one independent full forward of each model (in fp64,
    so that the comparison measures the env's fp32 rounding alone), across row compaction (``compact_at``) and
    autoresets."""
    folder = saved(kind)
    envs = RLHFVectorEnv(num_envs=3, policy=folder / "policy", reference=folder / "reference", tokenizer=tokenizer,
                         reward_fn=response_length, max_new_tokens=8, compact_at=20)
    policy, reference = (copy.deepcopy(model).double() for model in (envs.world.policy, envs.world.reference))
    envs.reset(seed=0)
    rng, checked = np.random.default_rng(0), 0
    while checked < 6:
        queries = envs.queries()
        logp = envs.next_token_logprobs
        actions = np.array([rng.choice(len(row), p=np.exp(row) / np.exp(row).sum()) for row in logp])
        responses = [list(r) for r in envs.unwrapped._episodes.responses]
        _, _, terminated, _, infos = envs.step(actions)
        for row in np.flatnonzero(terminated):
            q, qm = pad_left([queries[row]], tokenizer.pad_token_id)
            r, rm = pad_right([responses[row] + [int(actions[row])]], tokenizer.pad_token_id)
            with torch.no_grad():
                exact = (fp64_logprobs(policy, q, qm, r, rm) - fp64_logprobs(reference, q, qm, r, rm)).sum()
            assert abs(exact) > 1e-3  # two different models: a seam that always said 0 would fail
            assert infos["kl_sum"][row] == pytest.approx(float(exact), abs=1e-5)
            checked += 1


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_agent_runs_two_updates_that_train_the_policy_and_never_the_reference(kind, agent, saved, tokenizer,
                                                                                  small_pairs):
    cls, config = AGENTS[agent]
    envs = make_envs(saved(kind), tokenizer)
    learner = cls(envs, config(small_pairs), progress=False)
    reference = state_digest(envs.world.reference)
    before = digest(learner)
    for update in (1, 2):
        metrics = learner.update()
        assert metrics["time/updates"] == update
        after = digest(learner)
        assert after != before, f"update {update} left the {agent} model as it was"
        before = after
        loss = metrics["loss/dpo" if agent == "dpo" else "loss/policy"]
        assert np.isfinite(loss)
        if agent == "ppo":  # the training forward agrees with the env's cached decoding
            assert metrics["train/rollout_logprob_mismatch"] < 1e-4
    assert state_digest(envs.world.reference) == reference


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ppo_trains_through_the_forward_that_sampled(kind, saved, tokenizer):
    """One epoch, one minibatch: the policy has not moved yet when its training forward runs, so the ratio
    π/π_old is exactly 1 on every token; dropout in the training forward (a model whose config has it) would not
    leave it there."""
    agent = PPO(make_envs(saved(kind), tokenizer),
                PPOConfig(episodes_per_update=4, minibatch_size=4, update_epochs=1), progress=False)
    metrics = agent.update()
    assert metrics["policy/ratio"] == 1.0 and metrics["policy/approx_kl"] == 0.0 and metrics["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_a_checkpoint_resumes_exactly(kind, agent, saved, tokenizer, small_pairs, tmp_path):
    """2 updates, save, load into a fresh env and agent, 1 more update == 3 updates straight: the same weights (bit
    for bit) and the same metrics."""
    cls, config = AGENTS[agent]
    config, folder = config(small_pairs), saved(kind)
    straight = cls(make_envs(folder, tokenizer), config, progress=False)
    straight_metrics = [straight.update() for _ in range(3)]
    first = cls(make_envs(folder, tokenizer), config, progress=False)
    first.update()
    first.update()
    first.save(tmp_path / "checkpoint")
    resumed = cls.load(tmp_path / "checkpoint", make_envs(folder, tokenizer), progress=False)
    resumed_metrics = [resumed.update()]
    assert digest(resumed) == digest(straight)
    np.testing.assert_equal(comparable(resumed_metrics), comparable(straight_metrics[2:]))  # NaN equals NaN here


@pytest.mark.parametrize("kind", REFUSED)
def test_a_model_whose_cache_the_env_cannot_handle_is_refused_by_name_when_the_env_is_built(kind, tokenizer, tmp_path):
    for name, seed in (("policy", 0), ("reference", 1)):
        tiny_model(REFUSED[kind], tokenizer, seed).save_pretrained(tmp_path / name)
    with pytest.raises(UnsupportedModel, match="full attention|full-attention"):
        make_envs(tmp_path, tokenizer, reference="reference")
    model, refused_by = tiny_model(REFUSED[kind], tokenizer, 0), REFUSED[kind][3]
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    with pytest.raises(UnsupportedModel, match="layer_types has" if refused_by == "config" else "keeps a"):
        check_decodable(model)
    assert len(forwards) == (0 if refused_by == "config" else 1)
