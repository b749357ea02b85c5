"""Our PPO on your own local model and prompt file, with your own gold reward.

The stand-ins for your files are built here in a temporary folder: a tiny random GPT-2 with its tokenizer (saved
with ``save_pretrained``, as any local Hugging Face model) and a prompt file, one prompt per line. Replace
`make_stand_ins` by your paths. The reward is a function of the text (``reward_fn``), so no reward model is needed.

    python examples/own_model.py --updates 40
"""

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.evaluate import evaluate
from agents.ppo import PPO, PPOConfig
from rlhf_env.assets import asset_dir
from rlhf_env.models import load_tokenizer
from rlhf_env.tasks import FileTask


def make_stand_ins(folder: Path) -> tuple[Path, Path]:
    """A model folder (weights + tokenizer) and a prompt file, as a user would have them."""
    tokenizer = load_tokenizer(asset_dir("sentiment") / "tokenizer")  # any local tokenizer folder
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    nouns = ["movie", "film", "plot", "story", "acting", "cast", "script", "ending", "music", "hero"]
    (folder / "prompts.txt").write_text("\n".join(f"the {noun} {verb}" for noun in nouns for verb in ("was", "is")))
    return folder / "model", folder / "prompts.txt"


def says_great(prompt: str, response: str) -> float:
    """The gold reward: does the response use the word "great"?"""
    return float("great" in response.split())


def main(updates: int = 40, seed: int = 0) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        model, prompts = make_stand_ins(Path(tmp))
        task = FileTask(prompts, gold=says_great, max_new_tokens=8)
        envs = gym.make_vec("RLHF-v0", num_envs=16, task=task, policy=model, reference=model, tokenizer=model,
                            reward_fn=task.gold_reward, beta=0.02)
        agent = PPO(envs, PPOConfig(episodes_per_update=16, learning_rate=3e-4, seed=seed), progress=False)

        before = evaluate(envs, 128)["objective/gold_score"]  # held-out prompts, sampled from the policy
        agent.learn(total_timesteps=updates * 16 * 8)
        after = evaluate(envs, 128)["objective/gold_score"]
    print(f"held-out gold (share of responses saying 'great'): {before:.3f} -> {after:.3f}")
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=40)
    main(parser.parse_args().updates)
