"""A custom agent on RLHF-v0: a bigram policy trained by REINFORCE; the env computes the KL for *its* policy."""
import sys

import gymnasium as gym
import numpy as np
import torch

import rlhf_env  # noqa: F401  (registers RLHF-v0)


class BigramAgent:  # rlhf_env.agent.Agent: predict and action_logprobs on batched observations
    def __init__(self, vocab_size: int, seed: int = 0):
        self.logits = torch.zeros(vocab_size, vocab_size, requires_grad=True)  # π(next | last token): uniform
        self.generator = torch.Generator().manual_seed(seed)
    def distribution(self, obs) -> torch.distributions.Categorical:
        ids, mask = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
        last = ids.gather(1, mask.cumsum(1).argmax(1, keepdim=True))[:, 0]  # each row's last real token
        return torch.distributions.Categorical(logits=self.logits[last])
    @torch.no_grad()
    def predict(self, obs, state=None, episode_start=None, deterministic=False):
        return torch.multinomial(self.distribution(obs).probs, 1, generator=self.generator)[:, 0].numpy(), None
    @torch.no_grad()
    def action_logprobs(self, obs, actions):  # asked by the env at every step, before it pays the reward
        return self.distribution(obs).log_prob(torch.as_tensor(actions)).numpy()


def main(updates: int = 200, episodes: int = 16, seed: int = 0) -> None:
    env = gym.make("RLHF-v0", kl_mode="agent", beta=1.0, max_new_tokens=6)
    agent = BigramAgent(env.action_space.n, seed)
    env.unwrapped.attach_agent(agent)  # per-token KL = log π_agent − log π_ref, exactly
    optimizer = torch.optim.Adam([agent.logits], lr=0.3)
    for update in range(updates):
        observations, actions, to_go, gold = [], [], [], []
        for episode in range(episodes):
            (obs, _), done, rewards = env.reset(seed=seed + update * episodes + episode), False, []
            while not done:
                observations.append({key: value[None] for key, value in obs.items()})
                actions.append(int(agent.predict(observations[-1])[0][0]))
                obs, reward, done, _, info = env.step(actions[-1])
                rewards.append(reward)
            to_go.extend(np.cumsum(rewards[::-1])[::-1]), gold.append(info["gold_score"])
        batch = {key: np.concatenate([o[key] for o in observations]) for key in observations[0]}
        advantages = torch.as_tensor(np.array(to_go) - np.mean(to_go), dtype=torch.float32)  # reward-to-go − mean
        loss = -(advantages * agent.distribution(batch).log_prob(torch.as_tensor(actions))).sum() / episodes
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        print(f"update {update:3d}  mean gold {np.mean(gold):6.3f}")


if __name__ == "__main__":  # python examples/custom_agent.py [updates]
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
