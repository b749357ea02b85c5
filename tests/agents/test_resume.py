"""Resume: N updates + save + load in a fresh process + N updates equals 2N updates straight (parameters and every
logged number except wall time), adaptive β included, and the reference is still the shipped one."""

import inspect
import json
import subprocess
import sys

import gymnasium as gym
import pytest

from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env.assets import asset_dir
from rlhf_env.models import load_causal_lm


def make_envs():  # adaptive β: the controller's state must be saved too
    return gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.1, kl_target=2.0, kl_horizon=20,
                        kl_batch_episodes=8)


RESUME_SCRIPT = """
import json, sys, importlib, torch
torch.set_num_threads(1)
from helpers import digest, make_envs
module, name, checkpoint, out = sys.argv[1:]
envs = make_envs()
agent = getattr(importlib.import_module(module), name).load(checkpoint, envs, progress=False)
metrics = [agent.update() for _ in range(2)]
json.dump({"metrics": metrics, "policy": digest(getattr(agent, "model", None) or agent.lm),
           "reference": digest(envs.unwrapped.reference), "beta": envs.unwrapped.beta}, open(out, "w"))
"""

AGENTS = {  # a config, or a function of the `small_pairs` fixture that makes one
    "ppo": (PPO, PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=2)),
    "rloo": (Reinforce, ReinforceConfig(episodes_per_update=8, micro_batch_size=4)),
    "moving_average": (Reinforce, ReinforceConfig(episodes_per_update=8, samples_per_prompt=1,
                                                  baseline="moving_average")),
    "value": (Reinforce, ReinforceConfig(episodes_per_update=8, baseline="value", value_init="small",
                                         reward_to_go=True, advantage_norm="group_std")),
    # Several clipped steps per batch on minibatches drawn from the numpy stream: its state must be saved too.
    "dapo": (Reinforce, ReinforceConfig.preset("dapo", episodes_per_update=8, num_minibatches=2, update_epochs=2)),
    # 40 pairs in batches of 16: the 4 updates cross an epoch boundary (a new order is drawn and must be restored).
    "dpo": (DPO, lambda pairs: DPOConfig(batch_size=16, micro_batch_size=8, learning_rate=1e-3,
                                         pairs=pairs(40), eval_pairs=pairs(16, "eval"))),
}


def _comparable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/") or k in ("time/timesteps", "time/updates")}
            for m in metrics]


@pytest.mark.parametrize("name", AGENTS)
def test_resume_in_a_fresh_process_equals_the_straight_run(tmp_path, name, digest, small_pairs):
    cls, config = AGENTS[name]
    config = config(small_pairs) if callable(config) else config
    straight_envs = make_envs()
    straight = cls(straight_envs, config, progress=False)
    straight_metrics = [straight.update() for _ in range(4)]
    first = cls(make_envs(), config, progress=False)
    for _ in range(2):
        first.update()
    first.save(tmp_path / "ckpt")
    (tmp_path / "helpers.py").write_text("import hashlib\nimport gymnasium as gym\nimport rlhf_env\n\n"
                                         + inspect.getsource(digest) + f"\ndigest = {digest.__name__}\n\n"
                                         + inspect.getsource(make_envs))
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    subprocess.run([sys.executable, str(tmp_path / "resume.py"), cls.__module__, cls.__name__,
                    str(tmp_path / "ckpt"), str(tmp_path / "out.json")], check=True, cwd=tmp_path)
    resumed = json.loads((tmp_path / "out.json").read_text())
    assert resumed["policy"] == digest(getattr(straight, "model", None) or straight.lm)
    assert _comparable(resumed["metrics"]) == _comparable(straight_metrics[2:])
    assert resumed["beta"] == straight_envs.unwrapped.beta
    assert resumed["reference"] == digest(load_causal_lm(asset_dir("sentiment") / "policy"))


def test_a_direct_rlaif_reward_resumes_drawing_the_same_reference_samples(tmp_path, digest):
    """The judge reward samples π_SFT references from its own generator; a checkpoint holds that generator's state,
    so a resumed run is paid what the uninterrupted run is (without it the resumed rewards differ)."""
    from rlhf_env.assets import load_assets
    from rlhf_env.judge_reward import JudgeReward
    from rlhf_env.pipeline.feedback import constitution

    tokenizer, reference, _ = load_assets(asset_dir("sentiment"))

    def judged_envs():  # a fresh reward each time, its generator at the seed's start
        reward = JudgeReward(constitution("sentiment"), reference, tokenizer, max_new_tokens=8, references=2, seed=3)
        return gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, reward_fn=reward)

    config = ReinforceConfig(episodes_per_update=8)
    straight = Reinforce(judged_envs(), config, progress=False)
    straight_metrics = [straight.update() for _ in range(4)]
    first = Reinforce(judged_envs(), config, progress=False)
    for _ in range(2):
        first.update()
    first.save(tmp_path / "ckpt")
    resumed = Reinforce.load(tmp_path / "ckpt", judged_envs(), progress=False)
    resumed_metrics = [resumed.update() for _ in range(2)]
    assert _comparable(resumed_metrics) == _comparable(straight_metrics[2:])
    assert digest(resumed.lm) == digest(straight.lm)
