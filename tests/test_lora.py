"""LoRA policies (the optional extra "lora", peft): π trains only its adapters, π_ref is the same base with the
adapters off, so the base weights are stored once; the KL is exactly 0 at initialisation and exact after training;
PPO (value head), REINFORCE and DPO train it; a checkpoint holds the adapter only, in PEFT's format, and resumes
bit for bit."""

import copy
import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers RLHF-v0)

peft = pytest.importorskip("peft")

from agents.checkpoint import state_digest  # noqa: E402
from agents.dpo import DPO, DPOConfig  # noqa: E402
from agents.ppo import PPO, PPOConfig  # noqa: E402
from agents.reinforce import Reinforce, ReinforceConfig  # noqa: E402
from rlhf_env.assets import asset_dir  # noqa: E402
from rlhf_env.lm import pad_left, pad_right, response_logprobs  # noqa: E402
from rlhf_env.lora import AdaptersOff  # noqa: E402
from rlhf_env.models import load_causal_lm  # noqa: E402
from rlhf_env.vector_env import RLHFVectorEnv  # noqa: E402

# peft 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias (a FutureWarning
# under transformers 5.24); the library filters it where it wraps a model, these tests build PeftModels themselves.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

GPT2_LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)  # the shipped π_SFT is a GPT-2


def gpt2_lora(**kwargs):
    return peft.LoraConfig(**(GPT2_LORA | kwargs))


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def llama_peft(tokenizer):
    """A tiny random Llama with a LoRA adapter on q/v, and an untouched copy of the base (an independent π_ref)."""
    base = tiny_llama(tokenizer)
    original = copy.deepcopy(base)
    torch.manual_seed(1)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return policy, original


def llama_envs(policy, tokenizer, num_envs=4, **kwargs):
    task = rlhf_env.tasks.get_task("sentiment")
    return RLHFVectorEnv(num_envs=num_envs, policy=policy, tokenizer=tokenizer, max_new_tokens=8,
                         reward_fn=task.gold_reward, **kwargs)


def adapter_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


def snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict, module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


def run_episodes(envs, steps: int = 24, seed: int = 0) -> tuple[list[dict], list[tuple]]:
    """Sample from the env's policy for `steps` steps: every step's infos, and (query, response, Σ KL_t) of every
    episode that finished."""
    generator = torch.Generator().manual_seed(seed)
    envs.reset(seed=seed)
    infos_seen, finished = [], []
    for _ in range(steps):
        queries, responses = envs.queries(), [list(r) for r in envs.unwrapped._episodes.responses]
        logp = envs.next_token_distribution()
        actions = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0].numpy()
        _, _, terminated, _, infos = envs.step(actions)
        infos_seen.append(infos)
        for row in np.flatnonzero(terminated):
            finished.append((queries[row], responses[row] + [int(actions[row])], float(infos["kl_sum"][row])))
    return infos_seen, finished


def sequence_logprob(model, query, response, pad):
    q, qm = pad_left([query], pad)
    r, rm = pad_right([response], pad)
    with torch.no_grad():
        return float(response_logprobs(model, q, qm, r, rm).sum())


# ---------------------------------------------------------------- the library without peft
def test_the_library_imports_without_peft_and_lora_names_the_extra():
    script = """
import sys
sys.modules["peft"] = None  # as if peft were not installed: `import peft` raises ImportError
import rlhf_env, rlhf_env.world, agents.ppo, agents.reinforce, agents.dpo, agents.checkpoint
try:
    rlhf_env.world.RLHFWorld(lora=object())
except ImportError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 'pip install "rlhf-gym[lora]"' in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- one base in memory, KL exact
def test_policy_and_reference_share_every_base_weight(tokenizer):
    policy, original = llama_peft(tokenizer)
    envs = llama_envs(policy, tokenizer)
    world = envs.world
    assert isinstance(world.reference, AdaptersOff) and world.policy is policy
    assert world.backends == {"policy": "hf", "reference": "hf"}  # the lean GPT-2 path cannot see adapters
    base = {p.data_ptr() for name, p in policy.named_parameters() if "lora_" not in name}
    reference = {p.data_ptr() for p in world.reference.parameters()}
    assert reference == base  # every reference weight is a base weight of π: the same storage
    storages = {p.untyped_storage().data_ptr() for p in [*policy.parameters(), *world.reference.parameters()]}
    assert len(storages) == len(base) + len(adapter_names(policy))  # base once, plus the adapters
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == adapter_names(policy)
    # A reference forward leaves the adapters' requires_grad flags as they were (peft's switch resets them).
    for name, p in policy.named_parameters():
        p.requires_grad_(name.endswith("lora_A.default.weight"))
    with torch.no_grad():
        world.reference(input_ids=torch.zeros((1, 3), dtype=torch.long))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n in adapter_names(policy) if n.endswith("lora_A.default.weight")}
    # π_ref is the base model, under its own names: its digest is that of the model before the adapters.
    assert state_digest(world.reference) == state_digest(original)
    # The built-in world's π_SFT wrapped by lora=: loaded once, not twice.
    full = gym.make_vec("RLHF-v0", num_envs=2, max_new_tokens=4).unwrapped.world
    lora = gym.make_vec("RLHF-v0", num_envs=2, max_new_tokens=4, lora=gpt2_lora()).unwrapped.world

    def parameter_bytes(world):
        tensors = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                   for p in [*world.policy.parameters(), *world.reference.parameters()]}
        return sum(tensors.values())

    base_bytes = sum(p.numel() * p.element_size() for p in full.reference.parameters())
    adapters = sum(p.numel() * p.element_size() for n, p in lora.policy.named_parameters() if "lora_" in n)
    assert parameter_bytes(full) == 2 * base_bytes
    assert parameter_bytes(lora) == base_bytes + adapters
    assert state_digest(lora.reference) == state_digest(full.reference)  # the same π_ref


def test_kl_is_exactly_zero_at_initialisation(tokenizer):
    policy, _ = llama_peft(tokenizer)
    steps, finished = run_episodes(llama_envs(policy, tokenizer), steps=12)
    assert finished and all(kl == 0 for _, _, kl in finished)
    paid = [infos for infos in steps if "kl" in infos]  # a step where every row autoresets pays nothing
    assert len(paid) > 6 and all((infos["kl"] == 0).all() for infos in paid)
    assert all((infos["logprob"] == infos["ref_logprob"]).all() for infos in paid)
    lora = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=6, lora=gpt2_lora())
    steps, finished = run_episodes(lora, steps=8)
    assert finished and all(kl == 0 for _, _, kl in finished)
    assert all((infos["kl"] == 0).all() for infos in steps if "kl" in infos)


def test_training_changes_only_the_adapters_and_the_kl_stays_exact(tokenizer):
    policy, original = llama_peft(tokenizer)
    envs = llama_envs(policy, tokenizer, num_envs=8)
    reference = envs.world.reference
    probe = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_before = reference(input_ids=probe).logits
    before = snapshot(policy)
    config = ReinforceConfig(episodes_per_update=8, samples_per_prompt=1, baseline="none", learning_rate=3e-2)
    agent = Reinforce(envs, config, progress=False)
    for _ in range(3):
        agent.update()
    moved = changed(before, policy)
    assert moved and moved <= adapter_names(policy)  # B moved off 0; no base weight changed
    with torch.no_grad():
        assert torch.equal(reference(input_ids=probe).logits, reference_before)  # bit for bit
        assert torch.equal(reference(input_ids=probe).logits, original(input_ids=probe).logits)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == adapter_names(policy)
    # The KL seam: Σ_t KL_t against independent full forwards of π (adapters on) and of the untouched base.
    _, finished = run_episodes(envs, steps=24, seed=1)
    assert len(finished) >= 8
    pad = envs.world.pad_token_id
    kls = []
    for query, response, kl_sum in finished:
        exact = sequence_logprob(policy, query, response, pad) - sequence_logprob(original, query, response, pad)
        assert kl_sum == pytest.approx(exact, abs=1e-5)
        with policy.disable_adapter():  # the same reference through peft's own switch
            assert sequence_logprob(policy, query, response, pad) == pytest.approx(
                sequence_logprob(original, query, response, pad), abs=1e-6)
        kls.append(abs(kl_sum))
    assert max(kls) > 1e-3  # the adapters did move π away from π_ref


# ---------------------------------------------------------------- the agents
def test_ppo_trains_the_adapters_and_its_value_head_only(digest):
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, lora=gpt2_lora())
    world = envs.unwrapped.world
    reference = digest(world.reference)
    agent = PPO(envs, PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1, learning_rate=1e-3),
                progress=False)
    before = snapshot(agent.model)
    agent.update()
    moved = changed(before, agent.model)
    adapters = {f"lm.{name}" for name in adapter_names(world.policy)}
    assert moved == adapters | {"value_head.weight", "value_head.bias"}
    assert digest(world.reference) == reference
    with pytest.raises(ValueError, match="separate_critic"):
        PPO(envs, PPOConfig(episodes_per_update=8, minibatch_size=4, separate_critic=True), progress=False)


def test_dpo_trains_the_adapters_only(small_pairs, digest):
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.5, lora=gpt2_lora())
    world = envs.unwrapped.world
    reference = digest(world.reference)
    agent = DPO(envs, DPOConfig(batch_size=16, learning_rate=1e-3, pairs=small_pairs(32),
                                eval_pairs=small_pairs(16, "eval")), progress=False)
    before = snapshot(world.policy)
    first = agent.update()
    assert first["loss/dpo"] == pytest.approx(np.log(2), abs=1e-6)  # π = π_ref exactly at the start
    agent.update()
    assert changed(before, world.policy) == adapter_names(world.policy)
    assert digest(world.reference) == reference


# ---------------------------------------------------------------- checkpoints
def make_lora_envs(**lora):
    return gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.1, kl_target=2.0, kl_horizon=20,
                        kl_batch_episodes=8, lora=gpt2_lora(**lora))


def comparable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/") or k in ("time/timesteps", "time/updates")}
            for m in metrics]


def test_an_adapters_only_checkpoint_in_peft_format_resumes_exactly(tmp_path, digest):
    config = PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=2, learning_rate=1e-3)
    straight = PPO(make_lora_envs(), config, progress=False)
    straight_metrics = [straight.update() for _ in range(4)]
    first = PPO(make_lora_envs(), config, progress=False)
    for _ in range(2):
        first.update()
    first.save(tmp_path / "ckpt")
    policy_dir = tmp_path / "ckpt" / "policy"
    files = {p.name for p in policy_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    base_bytes = sum(p.numel() * p.element_size() for p in first.world.reference.parameters())
    assert sum(p.stat().st_size for p in (tmp_path / "ckpt").rglob("*.safetensors")) < base_bytes / 4
    assert json.loads((policy_dir / "adapter_config.json").read_text())["r"] == GPT2_LORA["r"]
    # PEFT reads it as it is: the saved adapter on a fresh base computes the trained policy.
    loaded = peft.PeftModel.from_pretrained(load_causal_lm(asset_dir("sentiment") / "policy"), policy_dir)
    probe = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, first.lm(input_ids=probe).logits)
    # Load into a freshly built env: the next two updates are the straight run's, bit for bit.
    resumed_envs = make_lora_envs()
    resumed = PPO.load(tmp_path / "ckpt", resumed_envs, progress=False)
    assert comparable([resumed.update() for _ in range(2)]) == comparable(straight_metrics[2:])
    assert digest(resumed.model) == digest(straight.model)
    assert digest(resumed_envs.unwrapped.reference) == digest(load_causal_lm(asset_dir("sentiment") / "policy"))
    # Another adapter (other α), or a full policy, is another training problem: refused, naming the setting.
    with pytest.raises(ValueError, match="lora"):
        PPO.load(tmp_path / "ckpt", make_lora_envs(lora_alpha=16), progress=False)
    with pytest.raises(ValueError, match="lora"):
        PPO.load(tmp_path / "ckpt", gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.1, kl_target=2.0,
                                                 kl_horizon=20, kl_batch_episodes=8), progress=False)


# ---------------------------------------------------------------- what is refused, and an explicit reference
def test_an_explicit_reference_is_used_as_given(tokenizer):
    policy, _ = llama_peft(tokenizer)
    other = tiny_llama(tokenizer, seed=5)
    envs = llama_envs(policy, tokenizer, reference=other)
    assert envs.world.reference is other  # the base is not shared: π_ref is the module given
    _, finished = run_episodes(envs, steps=16)
    pad = envs.world.pad_token_id
    for query, response, kl_sum in finished:
        exact = sequence_logprob(policy, query, response, pad) - sequence_logprob(other, query, response, pad)
        assert kl_sum == pytest.approx(exact, abs=1e-5)


def test_a_task_without_shipped_assets_needs_no_reference_with_a_lora_policy(tokenizer, tmp_path):
    """Your own prompts, model folder and reward: π_ref is the base with the adapters off, so nothing is looked up in
    the task's (absent) assets, whether lora= wraps the folder's model or the policy is a PeftModel already."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the plot was\nthe movie is\nthe acting was\nthe story is\n")
    task = rlhf_env.tasks.FileTask(prompts, gold=lambda prompt, response: 0.0, max_new_tokens=4, eval_fraction=0.5)
    tiny_llama(tokenizer).save_pretrained(tmp_path / "policy")
    common = dict(num_envs=2, task=task, tokenizer=tokenizer, reward_fn=task.gold_reward)
    for policy, lora in ((tmp_path / "policy", peft.LoraConfig(r=4, target_modules=["q_proj"])),
                         (llama_peft(tokenizer)[0], None)):
        envs = RLHFVectorEnv(policy=policy, lora=lora, **common)
        assert isinstance(envs.world.reference, AdaptersOff)
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64) + tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="no shipped assets"):  # a full policy still needs a reference
        RLHFVectorEnv(policy=tmp_path / "policy", **common)


def test_what_a_lora_env_refuses_is_named(tokenizer):
    with pytest.raises(ValueError, match="LoraConfig"):
        gym.make_vec("RLHF-v0", num_envs=2, lora={"r": 8})
    with pytest.raises(ValueError, match="kl_mode"):
        gym.make_vec("RLHF-v0", num_envs=2, kl_mode="agent", lora=gpt2_lora())
    policy, _ = llama_peft(tokenizer)
    with pytest.raises(ValueError, match="already a PeftModel"):
        llama_envs(policy, tokenizer, lora=gpt2_lora())
    with pytest.raises(ValueError, match="bias"):
        gym.make_vec("RLHF-v0", num_envs=2, lora=gpt2_lora(bias="all"))
    with pytest.raises(ValueError, match="backend='gpt2'"):
        gym.make_vec("RLHF-v0", num_envs=2, lora=gpt2_lora(), backend="gpt2")


def test_the_memory_table_counts_published_architectures():
    from benchmarks.lora_memory import computed

    full, lora = computed("Qwen2.5-0.5B", "bf16")
    assert full["base_params"] == 494_032_768  # Qwen2.5-0.5B's published parameter count
    assert lora["trained_params"] == 24 * 8 * ((896 + 896) + (896 + 128))  # r·(in + out) of q_proj and v_proj
    assert full["weights"] == 2 * 2 * full["base_params"]  # two bf16 copies
    assert lora["weights"] == 2 * full["base_params"] + 4 * lora["trained_params"]  # one copy, fp32 adapters
