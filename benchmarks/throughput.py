"""Env rollout throughput next to raw `generate` of the same policy: ``python -m benchmarks.throughput``.

Prints JSON. Both sides produce responses of exactly ``length`` tokens (EOS is masked out for the agent and
``min_new_tokens`` forces `generate`), so tokens/s compare like with like:

* ``env``: the vector env with ``num_envs = batch``, acting by sampling from ``next_token_logprobs`` the way an
  LM agent does. Each token costs one policy *and* one reference forward, plus the RM at episode ends and the
  prompt prefill of restarting rows.
* ``generate``: ``policy.generate`` alone (no reference, no reward model), sampling with ``top_k=0``.

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


def env_tokens_per_second(batch: int, length: int, steps: int, device: str, dtype: str = "float32") -> float:
    envs = RLHFVectorEnv(num_envs=batch, max_new_tokens=length, device=device, dtype=DTYPES[dtype])
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


def generate_tokens_per_second(batch: int, length: int, repeats: int, device: str, dtype: str = "float32") -> float:
    envs = RLHFVectorEnv(num_envs=batch, max_new_tokens=length, device=device, dtype=DTYPES[dtype])
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # Alternate the two sides and keep medians: this machine's speed drifts by 10-15% within a minute.
        env, gen = [], []
        for _ in range(args.repeats):
            env.append(env_tokens_per_second(batch, args.length, args.steps, args.device, args.dtype))
            gen.append(generate_tokens_per_second(batch, args.length, max(2, args.steps // args.length),
                                                  args.device, args.dtype))
        env, gen = float(np.median(env)), float(np.median(gen))
        rows.append({"batch": batch, "length": args.length, "env_tokens_per_s": round(env),
                     "generate_tokens_per_s": round(gen), "env_over_generate": round(env / gen, 3)})
    scaling = []
    for length in [int(n) for n in args.lengths.split(",")]:
        env = env_tokens_per_second(64, length, args.steps, args.device, args.dtype)
        scaling.append({"batch": 64, "length": length, "env_tokens_per_s": round(env)})
    commit = git_commit()
    print(json.dumps({"commit": commit, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "machine": platform.machine(), "throughput": rows,
                      "length_scaling": scaling}, indent=2))


if __name__ == "__main__":
    main()
