"""stable-baselines3 PPO (or A2C) on a small configuration of RLHF-v0, compared with a uniform-random policy.

The env holds only π_ref and the reward model; SB3's own MLP policy acts, and the env asks it for log π(a|s) of
every action (`SB3VecEnv.attach`), so the per-token KL penalty is the one of the policy that acted.

    python examples/sb3_ppo.py --timesteps 100000
"""

import argparse
import json

from stable_baselines3 import A2C, PPO

from rlhf_env.agent import RandomAgent, evaluate_agent
from rlhf_env.sb3 import SMALL_CONFIG, SB3PolicyLogprobs, SB3VecEnv


def main(algorithm: str = "ppo", timesteps: int = 100_000, seed: int = 0, eval_episodes: int = 256) -> dict:
    venv = SB3VecEnv.make(num_envs=16, **SMALL_CONFIG)  # 4-token responses, β = 0.5
    if algorithm == "ppo":
        model = PPO("MultiInputPolicy", venv, n_steps=64, batch_size=256, learning_rate=3e-4, seed=seed)
    else:
        model = A2C("MultiInputPolicy", venv, n_steps=8, learning_rate=1e-3, seed=seed)
    venv.attach(model)  # the env's KL is now log π_SB3 − log π_ref
    random_agent = RandomAgent(venv.action_space.n, seed=seed)
    before = evaluate_agent(venv.envs, random_agent, eval_episodes)
    model.learn(total_timesteps=timesteps)
    after = evaluate_agent(venv.envs, SB3PolicyLogprobs(model), eval_episodes)
    result = {"algorithm": algorithm, "timesteps": timesteps, "uniform_random": before, "trained": after}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=["ppo", "a2c"], default="ppo")
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=256)
    args = parser.parse_args()
    main(args.algorithm, args.timesteps, args.seed, args.eval_episodes)
