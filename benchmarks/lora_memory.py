"""Memory of the model state per configuration, full π + π_ref against LoRA: ``python -m benchmarks.lora_memory``.

Prints a markdown table (the one in docs/agents.md, "LoRA"). Two kinds of rows:

* **measured**: an env built each way and one REINFORCE update run in it; the bytes are counted on the live
  tensors: the distinct storages of π's and π_ref's parameters (shared ones once), the gradients the update left,
  and Adam's moments.
* **computed**: real architectures (Qwen2.5-0.5B, Llama-2-7B) instantiated from their published configs on the
  ``meta`` device (no weights, no download; the parameter counts equal the published ones), their LoRA adapters
  counted the same way, and the bytes computed: weights N·b per copy, gradients and Adam's two moments in the
  parameters' dtype (3·N·b for the trained ones). peft keeps adapters in fp32 over a bf16 base (its default
  ``autocast_adapter_dtype``), so adapter bytes are 4 per parameter in both dtypes.

Activations and KV caches are not counted (they depend on batch and length, and LoRA does not change them).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

LORA = dict(r=8, lora_alpha=16)
ARCHITECTURES = {  # published configs: Qwen/Qwen2.5-0.5B and meta-llama/Llama-2-7b-hf
    "Qwen2.5-0.5B": ("Qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "Llama-2-7B": ("Llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
}
GiB = 2**30


def _lora_config(target_modules, **kwargs):
    from peft import LoraConfig

    return LoraConfig(target_modules=target_modules, **LORA, **kwargs)


@contextlib.contextmanager
def _quiet():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model (rlhf_env.lora)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def measured(name: str, env_kwargs, lora) -> list[dict]:
    """Build the env full and with LoRA (``env_kwargs(kind)``: its models; `lora`: the LoraConfig), run one
    REINFORCE update in each, count the live bytes."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401
    from agents.reinforce import Reinforce, ReinforceConfig

    rows = []
    for kind in ("full", "lora"):
        kwargs = dict(env_kwargs(kind), lora=lora) if kind == "lora" else env_kwargs(kind)
        envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, **kwargs)
        world = envs.unwrapped.world
        agent = Reinforce(envs, ReinforceConfig(episodes_per_update=8, samples_per_prompt=1, baseline="none"),
                          progress=False)
        agent.update()
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in [*world.policy.parameters(), *world.reference.parameters()]}
        grads = sum(p.grad.numel() * p.grad.element_size() for p in agent.params if p.grad is not None)
        adam = sum(v.numel() * v.element_size() for state in agent.optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
        base = sum(p.numel() for p in world.reference.parameters())
        rows.append({"model": name, "how": "measured", "dtype": "fp32", "config": kind, "base_params": base,
                     "trained_params": sum(p.numel() for p in agent.params), "weights": sum(storages.values()),
                     "grads": grads, "adam": adam})
    return rows


def computed(name: str, dtype: str) -> list[dict]:
    """Parameter counts of a published architecture (meta device) and the bytes each configuration needs."""
    import transformers
    from peft import get_peft_model

    family, config = ARCHITECTURES[name]
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    width = {"fp32": 4, "bf16": 2}[dtype]
    with _quiet(), torch.device("meta"):
        model = model_cls(config_cls(**config))
        base = sum(p.numel() for p in model.parameters())
        adapters = sum(p.numel() for p in get_peft_model(model, _lora_config(["q_proj", "v_proj"])).parameters()
                       if p.requires_grad)
    return [{"model": name, "how": "computed", "dtype": dtype, "config": "full", "base_params": base,
             "trained_params": base, "weights": 2 * base * width, "grads": base * width, "adam": 2 * base * width},
            {"model": name, "how": "computed", "dtype": dtype, "config": "lora", "base_params": base,
             "trained_params": adapters, "weights": base * width + adapters * 4, "grads": adapters * 4,
             "adam": 2 * adapters * 4}]


def _size(n: int) -> str:
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def table(rows: list[dict]) -> str:
    lines = ["| model | how | dtype | configuration | trained parameters | π + π_ref weights | gradients "
             "| Adam moments | total |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = "full π + π_ref" if row["config"] == "full" else f"LoRA r={LORA['r']} (π_ref = base, adapters off)"
        total = row["weights"] + row["grads"] + row["adam"]
        lines.append(f"| {row['model']} ({row['base_params']:,} parameters) | {row['how']} | {row['dtype']} | {label} "
                     f"| {row['trained_params']:,} | {_size(row['weights'])} | {_size(row['grads'])} "
                     f"| {_size(row['adam'])} | **{_size(total)}** |")
    return "\n".join(lines)


def main() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_env.assets import asset_dir
    from rlhf_env.models import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(asset_dir("sentiment") / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    def llamas(kind):  # full: π and π_ref, two copies; LoRA: one base, wrapped by the env
        return {"policy": llama(), "reference": llama()} if kind == "full" else {"policy": llama()}

    with _quiet():
        rows = measured("π_SFT (GPT-2, shipped)", lambda kind: {}, _lora_config(["c_attn"], fan_in_fan_out=True))
        rows += measured("tiny Llama (random)", llamas, _lora_config(["q_proj", "v_proj"]))
    for name in ARCHITECTURES:
        for dtype in ("fp32", "bf16"):
            rows += computed(name, dtype)
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
