"""The REINFORCE agent: K samples per prompt in groups, zero signal leaves parameters alone, every parameter
trains, the reference never moves, bad numbers are caught, the command line runs, and a short run learns."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.reinforce
import rlhf_env
from agents.evaluate import evaluate
from agents.reinforce import Reinforce, ReinforceConfig
from agents.rollout import NonFiniteLogits
from rlhf_env.reward import per_item

SMALL = ReinforceConfig(episodes_per_update=8, micro_batch_size=4)


def make_envs(num_envs=8, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=8, **kwargs)


def test_rollouts_hold_k_samples_of_each_prompt_in_consecutive_groups(monkeypatch):
    agent = Reinforce(make_envs(num_envs=4), ReinforceConfig(episodes_per_update=8, samples_per_prompt=4),
                      progress=False)
    seen = []
    real = agents.reinforce.rollout
    monkeypatch.setattr(agents.reinforce, "rollout", lambda a, prompts: seen.append(real(a, prompts)) or seen[-1])
    agent.update()
    prompts = seen[0].prompts
    assert len(prompts) == 8 and prompts[0:4] == [prompts[0]] * 4 and prompts[4:8] == [prompts[4]] * 4
    assert len(set(map(tuple, seen[0].responses[:4]))) > 1  # four different samples of one prompt


def test_zero_signal_batch_leaves_the_parameters_unchanged(digest):
    # β = 0 and a constant reward: every return is equal, so every RLOO advantage is exactly 0. A first update with
    # signal gives Adam momentum, which would move the parameters on a zero gradient if the step were taken.
    reward = {"constant": False}
    envs = make_envs(beta=0.0, reward_fn=per_item(lambda prompt, response: 1.0 if reward["constant"]
                                                   else len(response) / 10))
    agent = Reinforce(envs, SMALL, progress=False)
    before = digest(agent.lm)
    assert agent.update()["train/no_signal"] == 0 and digest(agent.lm) != before
    reward["constant"] = True
    before = digest(agent.lm)
    metrics = agent.update()
    assert digest(agent.lm) == before
    assert metrics["train/no_signal"] == 1 and metrics["policy/advantage_std"] == 0.0


@pytest.mark.parametrize("config", [SMALL, ReinforceConfig(episodes_per_update=8, baseline="value",
                                                           value_init="small", reward_to_go=True)],
                         ids=["rloo", "value"])
def test_each_update_touches_every_trainable_parameter_and_never_the_reference(config, digest):
    envs = make_envs(beta=0.1)
    agent = Reinforce(envs, config, progress=False)
    module = agent.model or agent.lm
    reference_before = digest(envs.unwrapped.reference)
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    metrics = agent.update()
    assert [name for name, p in module.named_parameters() if torch.equal(p, before[name])] == []
    assert agent.lm is envs.unwrapped.policy
    assert digest(envs.unwrapped.reference) == reference_before
    assert not any(p.requires_grad for p in envs.unwrapped.reference.parameters())
    assert metrics["train/skipped"] == 0 and np.isfinite(metrics["loss/policy"])


def test_nan_logits_in_the_update_skip_the_step_and_leave_parameters_unchanged(digest):
    agent = Reinforce(make_envs(backend="hf"), SMALL, progress=False)  # the model's own forward runs its hooks
    agent.lm.lm_head.register_forward_hook(  # NaN only in the training forward (the one with gradients)
        lambda module, args, out: out * float("nan") if torch.is_grad_enabled() else out)
    before = digest(agent.lm)
    metrics = agent.update()
    assert digest(agent.lm) == before and metrics["train/skipped"] == 1


def test_nan_policy_weights_raise_a_named_error_before_sampling():
    envs = make_envs()
    agent = Reinforce(envs, SMALL, progress=False)
    with torch.no_grad():
        envs.unwrapped.policy.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits):
        agent.update()


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="baseline must be one of"):
        ReinforceConfig(baseline="critic")
    with pytest.raises(ValueError, match="samples_per_prompt ≥ 2"):
        ReinforceConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="multiple"):
        ReinforceConfig(episodes_per_update=10, samples_per_prompt=4)
    with pytest.raises(ValueError, match="multiple"):
        Reinforce(make_envs(num_envs=3), SMALL, progress=False)
    with pytest.raises(ValueError, match="kl_mode"):
        Reinforce(make_envs(kl_mode="reference"), SMALL, progress=False)
    with pytest.raises(ValueError, match="not 'reinforce'"):
        Reinforce.load(_ppo_checkpoint(), make_envs())


def _ppo_checkpoint():
    import tempfile

    from agents.ppo import PPO, PPOConfig

    directory = tempfile.mkdtemp()
    PPO(make_envs(), PPOConfig(episodes_per_update=8, minibatch_size=4), progress=False).save(directory)
    return directory


def test_predict_follows_the_policy():
    envs = make_envs()
    agent = Reinforce(envs, SMALL, progress=False)
    env = gym.make("RLHF-v0", policy=envs.unwrapped.policy)
    obs, _ = env.reset(seed=3)
    action, state = agent.predict(obs, deterministic=True)
    assert state is None and int(action) == int(np.argmax(env.unwrapped.next_token_logprobs))


def test_command_line_writes_metrics_model_and_summary(tmp_path):
    out = tmp_path / "run"
    summary = agents.reinforce.main(["--reward", "gold", "--baseline", "moving_average", "--samples-per-prompt", "1",
                                     "--total-timesteps", "200", "--num-envs", "8", "--episodes-per-update", "8",
                                     "--micro-batch-size", "8", "--eval-episodes", "8", "--out", str(out),
                                     "--no-progress"])
    assert summary["algorithm"] == "Reinforce" and summary["config"]["baseline"] == "moving_average"
    assert (out / "model" / "policy" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["updates"] == summary["updates"] >= 1


def test_a_short_rloo_run_on_the_gold_reward_raises_held_out_gold():
    task = rlhf_env.tasks.get_task("sentiment")
    envs = gym.make_vec("RLHF-v0", num_envs=64, reward_fn=task.gold_reward, beta=0.1)
    before = evaluate(envs, 128)["objective/gold_score"]
    agent = Reinforce(envs, ReinforceConfig(), progress=False)
    for _ in range(40):
        agent.update()
    after = evaluate(envs, 128)
    assert after["objective/gold_score"] > before + 0.15
    assert after["objective/kl"] < 5 and after["episode/well_formed"] > 0.9
