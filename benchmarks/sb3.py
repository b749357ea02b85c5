"""stable-baselines3 PPO and A2C on the small configuration of RLHF-v0, next to a uniform-random policy.

``python -m benchmarks.sb3 [--timesteps 100000] [--seeds 0 1] [--out FILE]`` prints JSON: per algorithm and seed,
the held-out gold reward, RM score, sequence KL to π_ref (of SB3's own policy, via ``kl_mode="agent"``),
well-formed rate, length and training wall time. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from stable_baselines3 import A2C, PPO

from benchmarks.report import git_commit, report
from rlhf_env.agent import RandomAgent, evaluate_agent
from rlhf_env.sb3 import SMALL_CONFIG, SB3PolicyLogprobs, SB3VecEnv

ALGORITHMS = {
    "ppo": lambda venv, seed: PPO("MultiInputPolicy", venv, n_steps=64, batch_size=256, seed=seed),
    "a2c": lambda venv, seed: A2C("MultiInputPolicy", venv, n_steps=8, learning_rate=1e-3, seed=seed),
}


def run(algorithm: str, timesteps: int, seed: int, eval_episodes: int, num_envs: int = 16) -> dict:
    """Train one SB3 algorithm on the small configuration and evaluate it on held-out prompts."""
    venv = SB3VecEnv.make(num_envs=num_envs, **SMALL_CONFIG)
    model = ALGORITHMS[algorithm](venv, seed)
    venv.attach(model)
    start = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    seconds = time.perf_counter() - start
    return dict(evaluate_agent(venv.envs, SB3PolicyLogprobs(model), eval_episodes), train_seconds=round(seconds, 2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", choices=sorted(ALGORITHMS), default=["ppo", "a2c"])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-episodes", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = git_commit()
    venv = SB3VecEnv.make(num_envs=16, **SMALL_CONFIG)
    results = {"commit": commit, "config": SMALL_CONFIG, "timesteps": args.timesteps,
               "uniform_random": evaluate_agent(venv.envs, RandomAgent(venv.action_space.n, seed=0),
                                                args.eval_episodes)}
    for algorithm in args.algorithms:
        results[algorithm] = {seed: run(algorithm, args.timesteps, seed, args.eval_episodes) for seed in args.seeds}
    return report(results, args.out)


if __name__ == "__main__":
    main()
