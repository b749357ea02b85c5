"""Env rollout throughput next to raw `generate` of the same policy: ``python -m benchmarks.throughput``.

Prints JSON. Both sides produce responses of exactly ``length`` tokens (EOS is masked out for the agent and
``min_new_tokens`` forces `generate`), so tokens/s compare like with like:

* ``env``: the vector env with ``num_envs = batch``, acting by sampling from ``next_token_logprobs`` the way an
  LM agent does. Each token costs one policy *and* one reference forward, plus the RM at episode ends and the
  prompt prefill of restarting rows.
* ``generate``: ``policy.generate`` alone (no reference, no reward model), sampling with ``top_k=0``.

``--arch llama|qwen2|gpt_neox|mistral`` measures the same on a random model of that architecture at the built-in
policy's size (`arch_model`: width 128, 2 layers, 4 heads, MLP 512, the world's tokenizer and context), passed to
the env as its policy and reference (a copy) while the reward model stays the world's: the env then decodes
Llama, Qwen2 and Mistral on the ``"llama"`` backend and GPT-NeoX through its own transformers forward
(`rlhf_env.models.choose_backend`), against the same model's `generate`. ``--arch gpt2`` is the built-in GPT-2
policy on the lean path (the default).

Run it alone on the machine (two torch processes on 2 cores slow each other 25–45×).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from benchmarks.report import git_commit
from rlhf_env.decoding.sampling import gumbel_max
from rlhf_env.vector_env import RLHFVectorEnv

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --arch -> (config class, model class, fields besides the sizes and token ids): decoders users bring.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),  # Pythia
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
}


def arch_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random `arch` causal LM the size of the built-in policy (`rlhf_env.models.PRESETS["tiny"]`: hidden 128, 2
    layers, 4 heads; MLP 4 × hidden; context 64), for the world's tokenizer. `ValueError` for an unknown arch."""
    import transformers

    from rlhf_env.assets import asset_dir
    from rlhf_env.models import PRESETS, load_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {arch!r}; expected gpt2 or one of {sorted(ARCHITECTURES)}")
    tokenizer = load_tokenizer(asset_dir("sentiment") / "tokenizer")
    config_name, model_name, extra = ARCHITECTURES[arch]
    size = PRESETS["tiny"]
    config = getattr(transformers, config_name)(
        hidden_size=size["n_embd"], num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
        intermediate_size=4 * size["n_embd"], max_position_embeddings=64, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def make_env(batch: int, length: int, device: str, dtype: str, arch: str) -> RLHFVectorEnv:
    """The vector env of the measurement: the built-in world, or with ``arch`` other than gpt2 that architecture's
    random model as π and (a copy) as π_ref."""
    kwargs = dict(num_envs=batch, max_new_tokens=length, device=device, dtype=DTYPES[dtype])
    if arch != "gpt2":
        import copy

        policy = arch_model(arch)
        kwargs.update(policy=policy, reference=copy.deepcopy(policy))
    return RLHFVectorEnv(**kwargs)


def env_tokens_per_second(batch: int, length: int, steps: int, device: str, dtype: str = "float32",
                          arch: str = "gpt2") -> float:
    envs = make_env(batch, length, device, dtype, arch)
    eos = envs.tokenizer.eos_token_id
    generator = torch.Generator(device=envs.world.device).manual_seed(0)
    envs.reset(seed=0)

    def act():
        logp = envs.next_token_distribution().clone()  # (B, V) the distribution the env already computed
        logp[:, eos] = -float("inf")
        return gumbel_max(logp, generator).cpu().numpy()

    for _ in range(length + 2):  # warm-up: one full episode per row
        envs.step(act())
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        *_, infos = envs.step(act())
        tokens += int(infos.get("_logprob", np.zeros(batch, bool)).sum())  # rows that took a token (not resetting)
    return tokens / (time.perf_counter() - start)


def generate_tokens_per_second(batch: int, length: int, repeats: int, device: str, dtype: str = "float32",
                               arch: str = "gpt2") -> float:
    envs = make_env(batch, length, device, dtype, arch)
    policy, tokenizer = envs.policy, envs.tokenizer
    prompts = envs.task.train_prompts()[:batch]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(envs.world.device)  # left-padded
    kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=0, top_p=1.0,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    policy.generate(**encoded, **kwargs)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        policy.generate(**encoded, **kwargs)
    return batch * length * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--length", type=int, default=32, help="response tokens per episode")
    parser.add_argument("--lengths", default="8,16,32,48", help="response lengths for the scaling sweep (batch 64)")
    parser.add_argument("--steps", type=int, default=160, help="measured env steps per setting")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per side (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the models' dtype (both sides)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", *ARCHITECTURES],
                        help="the policy architecture (gpt2: the built-in policy; others: a random model of its size)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # Alternate the two sides and keep medians: this machine's speed drifts by 10-15% within a minute.
        env, gen = [], []
        for _ in range(args.repeats):
            env.append(env_tokens_per_second(batch, args.length, args.steps, args.device, args.dtype, args.arch))
            gen.append(generate_tokens_per_second(batch, args.length, max(2, args.steps // args.length),
                                                  args.device, args.dtype, args.arch))
        env, gen = float(np.median(env)), float(np.median(gen))
        rows.append({"batch": batch, "length": args.length, "env_tokens_per_s": round(env),
                     "generate_tokens_per_s": round(gen), "env_over_generate": round(env / gen, 3)})
    scaling = []
    for length in [int(n) for n in args.lengths.split(",")]:
        env = env_tokens_per_second(64, length, args.steps, args.device, args.dtype, args.arch)
        scaling.append({"batch": 64, "length": length, "env_tokens_per_s": round(env)})
    commit = git_commit()
    print(json.dumps({"commit": commit, "arch": args.arch, "device": args.device, "dtype": args.dtype,
                      "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "machine": platform.machine(), "throughput": rows,
                      "length_scaling": scaling}, indent=2))


if __name__ == "__main__":
    main()
