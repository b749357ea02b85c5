"""Every configuration an agent's constructor accepts either trains or is refused at construction with a
`ValueError` naming the field: degenerate sizes (one episode, one token, one sample per group, one pair) train;
sizes and coefficients that would crash or silently do nothing sensible mid-training are refused."""

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.dpo import DPO, DPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig

AGENTS = {"ppo": (PPO, PPOConfig), "reinforce": (Reinforce, ReinforceConfig), "dpo": (DPO, DPOConfig)}

REFUSED = [
    ("ppo", {"episodes_per_update": 0}, "episodes_per_update"),
    ("ppo", {"minibatch_size": 0}, "minibatch_size"),
    ("ppo", {"update_epochs": 0}, "update_epochs"),
    ("ppo", {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ("ppo", {"minibatch_size": 16, "gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
    ("ppo", {"ptx_coef": 0.1, "ptx_batch_size": 0}, "ptx_batch_size"),
    ("ppo", {"clip_range": 0.0}, "clip_range"),
    ("ppo", {"clip_range_value": -0.2}, "clip_range_value"),
    ("ppo", {"max_grad_norm": 0.0}, "max_grad_norm"),
    ("ppo", {"learning_rate": -1e-4}, "learning_rate"),
    ("ppo", {"adam_eps": 0.0}, "adam_eps"),
    ("ppo", {"gamma": 1.5}, "gamma"),
    ("ppo", {"lam": -0.1}, "lam"),
    ("ppo", {"target_kl": 0.0}, "target_kl"),
    ("ppo", {"score_clip": 0.0}, "score_clip"),
    ("ppo", {"vf_coef": -0.1}, "vf_coef"),
    ("ppo", {"ent_coef": float("nan")}, "ent_coef"),
    ("ppo", {"value_init": "bogus"}, "value_init"),
    ("reinforce", {"episodes_per_update": 0}, "episodes_per_update"),
    ("reinforce", {"samples_per_prompt": 0}, "samples_per_prompt"),
    ("reinforce", {"samples_per_prompt": 1, "baseline": "rloo"}, "samples_per_prompt"),
    ("reinforce", {"samples_per_prompt": 1, "baseline": "none", "advantage_norm": "group_std"}, "samples_per_prompt"),
    ("reinforce", {"episodes_per_update": 6, "samples_per_prompt": 4}, "samples_per_prompt"),
    ("reinforce", {"micro_batch_size": 0}, "micro_batch_size"),
    ("reinforce", {"micro_batch_size": 5}, "micro_batch_size"),
    ("reinforce", {"group_norm_eps": 0.0}, "group_norm_eps"),
    ("reinforce", {"max_grad_norm": 0.0}, "max_grad_norm"),
    ("reinforce", {"learning_rate": -1e-4}, "learning_rate"),
    ("reinforce", {"value_init": "reward_model", "baseline": "value"}, "value_init"),
    ("reinforce", {"baseline": "bogus"}, "baseline"),
    ("reinforce", {"advantage_norm": "std"}, "advantage_norm"),
    ("reinforce", {"loss_aggregation": "sum"}, "loss_aggregation"),
    ("reinforce", {"ratio_level": "episode"}, "ratio_level"),
    ("reinforce", {"kl_estimator": "k4"}, "kl_estimator"),
    ("reinforce", {"kl_coef": -0.1}, "kl_coef"),
    ("reinforce", {"clip_range": 0.0}, "clip_range"),
    ("reinforce", {"clip_range": 1.5}, "clip_range"),
    ("reinforce", {"clip_range_low": 1.0, "clip_range_high": 0.2}, "clip_range_low"),
    ("reinforce", {"clip_range_high": 0.28}, "clip_range_low and clip_range_high"),  # one side is no clip
    ("reinforce", {"update_epochs": 0}, "update_epochs"),
    ("reinforce", {"num_minibatches": 3}, "num_minibatches"),
    ("reinforce", {"update_epochs": 2}, "update_epochs"),  # several steps need the clip
    ("reinforce", {"num_minibatches": 2}, "num_minibatches"),
    ("reinforce", {"ratio_level": "sequence"}, "ratio_level"),  # GSPO's ratio needs the clip
    ("reinforce", {"samples_per_prompt": 1, "baseline": "group_mean"}, "samples_per_prompt"),
    ("reinforce", {"samples_per_prompt": 1, "baseline": "none", "drop_uniform_groups": True}, "samples_per_prompt"),
    ("reinforce", {"baseline": "value", "advantage_norm": "batch"}, "advantage_norm"),
    ("ppo", {"clip_range_low": 1.0}, "clip_range_low"),
    ("ppo", {"clip_range_high": 0.0}, "clip_range_high"),
    ("ppo", {"loss_aggregation": "sum"}, "loss_aggregation"),
    ("dpo", {"batch_size": 0}, "batch_size"),
    ("dpo", {"micro_batch_size": 0}, "micro_batch_size"),
    ("dpo", {"batch_size": 8, "micro_batch_size": 3}, "micro_batch_size"),
    ("dpo", {"max_grad_norm": 0.0}, "max_grad_norm"),
    ("dpo", {"learning_rate": -1e-4}, "learning_rate"),
    ("dpo", {"loss_type": "hinge"}, "loss_type"),
]


@pytest.mark.parametrize("algorithm, options, field", REFUSED, ids=[f"{a}-{f}" for a, _, f in REFUSED])
def test_bad_sizes_and_coefficients_are_refused_naming_the_field(algorithm, options, field):
    _, config_cls = AGENTS[algorithm]
    with pytest.raises(ValueError, match=field):
        config_cls(**options)


def test_refusals_that_depend_on_the_env_come_at_construction(tmp_path, small_pairs):
    with pytest.raises(ValueError, match="num_envs"):  # a rollout runs every row once
        PPO(gym.make_vec("RLHF-v0", num_envs=2), PPOConfig(episodes_per_update=3, minibatch_size=3))
    with pytest.raises(ValueError, match="beta"):  # the DPO loss is a function of β·log-ratio
        DPO(gym.make_vec("RLHF-v0", num_envs=1, beta=0.0), DPOConfig(pairs=small_pairs(8)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gym.make_vec("RLHF-v0", num_envs=1, max_new_tokens=0)
    from rlhf_env.assets import asset_dir
    from rlhf_env.tasks.custom import FileTask

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\nthe film is\nthe acting was\n" * 4)
    task = FileTask(prompts, gold=lambda prompt, response: 0.0)  # no demonstrations file
    assets = asset_dir("sentiment")
    world = dict(task=task, policy=assets / "policy", reference=assets / "policy", tokenizer=assets / "tokenizer",
                 reward_fn=task.gold_reward)
    with pytest.raises(ValueError, match="demonstrations"):  # PPO-ptx would fail at its first minibatch
        PPO(gym.make_vec("RLHF-v0", num_envs=2, **world), PPOConfig(episodes_per_update=2, minibatch_size=2,
                                                                    ptx_coef=0.1))
    PPO(gym.make_vec("RLHF-v0", num_envs=2, **world), PPOConfig(episodes_per_update=2, minibatch_size=2)).update()
    for bad in ({"temperature": float("nan")}, {"missing_eos_penalty": float("nan")}, {"kl_horizon": 0},
                {"kl_target": float("inf")}):
        with pytest.raises(ValueError, match="temperature|missing_eos_penalty|horizon|target"):
            gym.make_vec("RLHF-v0", num_envs=1, **bad)
    with pytest.raises(ValueError, match="kl_horizon"):  # one rollout may move an adaptive β by at most 0.2·1
        PPO(gym.make_vec("RLHF-v0", num_envs=4, kl_target=1.0, kl_horizon=32, kl_batch_episodes=4),
            PPOConfig(episodes_per_update=64))


DEGENERATE = [
    ("ppo", {"episodes_per_update": 1, "minibatch_size": 1}, {"num_envs": 1, "max_new_tokens": 1}),
    ("ppo", {"episodes_per_update": 1, "minibatch_size": 1, "whiten_rewards": True, "ptx_coef": 0.1,
             "ptx_batch_size": 1, "gradient_accumulation_steps": 1}, {"num_envs": 1, "max_new_tokens": 1}),
    ("ppo", {"episodes_per_update": 2, "minibatch_size": 2, "gradient_accumulation_steps": 2, "ptx_coef": 0.1,
             "ptx_batch_size": 1, "update_epochs": 1, "target_kl": 1e-9}, {"num_envs": 2, "max_new_tokens": 1}),
    ("reinforce", {"episodes_per_update": 1, "samples_per_prompt": 1, "baseline": "moving_average"},
     {"num_envs": 1, "max_new_tokens": 1}),
    ("reinforce", {"episodes_per_update": 1, "samples_per_prompt": 1, "baseline": "value"},
     {"num_envs": 1, "max_new_tokens": 1}),
    ("reinforce", {"episodes_per_update": 1, "samples_per_prompt": 1, "baseline": "none", "reward_to_go": True},
     {"num_envs": 1, "max_new_tokens": 1}),
    ("reinforce", {"episodes_per_update": 2, "samples_per_prompt": 2, "baseline": "rloo", "advantage_norm": "group_std",
                   "micro_batch_size": 1}, {"num_envs": 1, "max_new_tokens": 1}),
    ("dpo", {"batch_size": 1}, {"num_envs": 1}),
    ("dpo", {"batch_size": 12, "micro_batch_size": 4}, {"num_envs": 1}),  # more than the 8 pairs: epochs wrap
]


@pytest.mark.parametrize("algorithm, options, env_options", DEGENERATE,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(DEGENERATE)])
def test_degenerate_but_valid_sizes_train(algorithm, options, env_options, tmp_path, small_pairs):
    agent_cls, config_cls = AGENTS[algorithm]
    if algorithm == "dpo":
        pairs = small_pairs(8)
        options = dict(options, pairs=pairs, eval_pairs=pairs)
    envs = gym.make_vec("RLHF-v0", beta=0.1, kl_target=1.0, **env_options)
    agent = agent_cls(envs, config_cls(**options), progress=False)
    for _ in range(2):
        metrics = agent.update()
    assert metrics["time/updates"] == 2
    # gold_agreement needs two episodes that differ on gold: NaN (undefined) with one episode per update
    assert all(np.isfinite(v) for k, v in metrics.items()
               if k.startswith(("objective/gold", "time/")) and k != "objective/gold_agreement")
    agreement = metrics.get("objective/gold_agreement", np.nan)
    assert np.isnan(agreement) or 0.0 <= agreement <= 1.0
