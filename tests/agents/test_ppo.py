"""PPO: the first step is exactly on-policy, every parameter trains, the reference never moves, bad numbers are
caught, runs resume exactly in a fresh process, and a short run raises the gold reward."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.ppo
import rlhf_env
from agents.evaluate import evaluate
from agents.metrics import read_history
from agents.ppo import PPO, PPOConfig
from agents.rollout import NonFiniteLogits

SMALL = PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=2)


def make_envs(num_envs=8, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=8, **kwargs)


def test_first_minibatch_ratio_is_exactly_one_and_nothing_is_clipped(monkeypatch):
    calls = []

    def recording_policy_loss(logprobs, old_logprobs, *args, **kwargs):
        loss, stats = policy_loss(logprobs, old_logprobs, *args, **kwargs)
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), stats))
        return loss, stats

    policy_loss = agents.ppo.policy_loss
    monkeypatch.setattr(agents.ppo, "policy_loss", recording_policy_loss)
    agent = PPO(make_envs(), SMALL, progress=False)
    agent.update()
    logprobs, old_logprobs, stats = calls[0]
    assert torch.equal(logprobs, old_logprobs)
    assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    assert not torch.equal(calls[1][0], calls[1][1])  # after one step the policy has moved


def test_each_update_touches_every_trainable_parameter_and_never_the_reference(digest):
    envs = make_envs(beta=0.1)
    agent = PPO(envs, SMALL, progress=False)
    reference = envs.unwrapped.reference
    reference_before = digest(reference)
    before = {name: p.detach().clone() for name, p in agent.model.named_parameters() if p.requires_grad}
    agent.update()
    unchanged = [name for name, p in agent.model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert agent.model.lm is envs.unwrapped.policy  # the env acts with the weights being trained
    assert digest(reference) == reference_before
    assert not any(p.requires_grad for p in reference.parameters())


def test_nan_logits_in_the_update_skip_the_step_and_leave_parameters_unchanged(digest):
    agent = PPO(make_envs(backend="hf"), SMALL, progress=False)  # the model's own forward runs its hooks
    agent.model.lm.lm_head.register_forward_hook(  # NaN only in the training forward (the one with gradients)
        lambda module, args, out: out * float("nan") if torch.is_grad_enabled() else out)
    before = digest(agent.model)
    metrics = agent.update()
    assert digest(agent.model) == before
    assert metrics["train/skipped_minibatches"] == SMALL.update_epochs * SMALL.num_minibatches


def test_nan_policy_weights_raise_a_named_error_before_sampling():
    envs = make_envs()
    agent = PPO(envs, SMALL, progress=False)
    with torch.no_grad():
        envs.unwrapped.policy.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits):
        agent.update()


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="multiple"):
        PPO(make_envs(num_envs=3), SMALL, progress=False)
    with pytest.raises(ValueError, match="multiple"):
        PPO(make_envs(), PPOConfig(episodes_per_update=8, minibatch_size=3), progress=False)
    with pytest.raises(ValueError, match="vector env"):
        PPO(gym.make("RLHF-v0"), SMALL, progress=False)
    with pytest.raises(ValueError, match="kl_mode"):
        PPO(make_envs(kl_mode="reference"), SMALL, progress=False)
    with pytest.raises(ValueError, match="separate_critic"):
        PPO(make_envs(), PPOConfig(episodes_per_update=8, minibatch_size=4, value_init="reward_model"),
            progress=False)


def test_predict_follows_the_policy():
    envs = make_envs()
    agent = PPO(envs, SMALL, progress=False)
    env = gym.make("RLHF-v0", policy=envs.unwrapped.policy)  # same weights in a single env
    obs, _ = env.reset(seed=3)
    action, state = agent.predict(obs, deterministic=True)
    assert state is None and env.action_space.contains(int(action))
    assert int(action) == int(np.argmax(env.unwrapped.next_token_logprobs))
    batch_actions, _ = agent.predict({k: np.stack([v, v]) for k, v in obs.items()}, deterministic=True)
    assert batch_actions.tolist() == [int(action)] * 2


def test_command_line_writes_metrics_model_and_summary_and_diagnoses(tmp_path, capsys):
    out = tmp_path / "run"
    summary = agents.ppo.main(["--reward", "gold", "--total-timesteps", "200", "--num-envs", "8",
                               "--episodes-per-update", "8", "--minibatch-size", "4", "--eval-episodes", "8",
                               "--out", str(out), "--no-progress"])
    history = read_history(out / "metrics.jsonl")
    assert len(history) == summary["updates"] >= 1 and "objective/gold_score" in history[0]
    assert (out / "model" / "policy" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["timesteps"] >= 200
    flags = agents.ppo.main(["--diagnose", str(out / "metrics.jsonl")])
    assert flags == ["too few updates to diagnose (need 8)"]


def test_a_short_run_on_the_gold_reward_raises_held_out_gold():
    task = rlhf_env.tasks.get_task("sentiment")
    envs = gym.make_vec("RLHF-v0", num_envs=64, reward_fn=task.gold_reward, beta=0.1)
    before = evaluate(envs, 128)["objective/gold_score"]
    agent = PPO(envs, PPOConfig(learning_rate=3e-4), progress=False)  # a larger step: fast early progress
    for _ in range(30):
        agent.update()
    after = evaluate(envs, 128)
    assert after["objective/gold_score"] > before + 0.2
    assert after["objective/kl"] < 5 and after["episode/well_formed"] > 0.9


def test_ptx_term_and_gradient_accumulation_run_and_are_logged(digest):
    config = PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1, ptx_coef=0.5, ptx_batch_size=4,
                       gradient_accumulation_steps=2, separate_critic=True, value_init="reward_model")
    agent = PPO(make_envs(), config, progress=False)
    before = digest(agent.model)
    metrics = agent.update()
    assert metrics["loss/ptx"] > 0 and metrics["train/skipped_minibatches"] == 0
    assert digest(agent.model) != before
    # The critic started as the reward model: its first values are the RM's view of each prefix.
    assert agent.model.critic_trunk is not None and metrics["val/mean"] != 0.0


def _record_gae(monkeypatch):
    seen = {}
    real_gae = agents.ppo.gae

    def recording_gae(rewards, values, mask, gamma, lam):
        seen["rewards"], seen["mask"] = rewards.clone(), mask.clone()
        return real_gae(rewards, values, mask, gamma, lam)

    monkeypatch.setattr(agents.ppo, "gae", recording_gae)
    return seen


def test_score_clip_clips_only_the_score_part_of_the_last_reward(monkeypatch):
    seen = _record_gae(monkeypatch)
    envs = make_envs(beta=0.1)
    config = PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1, score_clip=0.05)
    agent = PPO(envs, config, progress=False)
    episodes = []
    real_rollout = agents.ppo.rollout
    monkeypatch.setattr(agents.ppo, "rollout", lambda a: episodes.append(real_rollout(a)) or episodes[-1])
    agent.update()
    batch, rewards = episodes[0], seen["rewards"]
    assert max(abs(s) for s in batch.scores) > 0.05  # the clip is active for some episode
    for i, (row, score) in enumerate(zip(batch.rewards, batch.scores)):
        expected = list(row)
        expected[-1] += float(np.clip(score, -0.05, 0.05)) - score  # the KL part (−β·KL_t) is untouched
        assert rewards[i, : len(row)].tolist() == pytest.approx(expected, abs=1e-6)
        assert rewards[i, len(row):].abs().sum() == 0


def test_whiten_rewards_gives_unit_variance_without_shifting_the_mean(monkeypatch):
    seen = _record_gae(monkeypatch)
    agent = PPO(make_envs(beta=0.1), PPOConfig(episodes_per_update=8, minibatch_size=4, update_epochs=1,
                                               whiten_rewards=True), progress=False)
    episodes = []
    real_rollout = agents.ppo.rollout
    monkeypatch.setattr(agents.ppo, "rollout", lambda a: episodes.append(real_rollout(a)) or episodes[-1])
    agent.update()
    raw = torch.tensor([r for row in episodes[0].rewards for r in row])
    mask = seen["mask"].bool()
    whitened = seen["rewards"][mask]
    assert whitened.var().item() == pytest.approx(1.0, rel=1e-3)
    assert whitened.mean().item() == pytest.approx(raw.mean().item(), abs=1e-5)  # mean kept: a reward's sign
    assert torch.allclose(whitened - whitened.mean(), (raw - raw.mean()) / raw.std(), atol=1e-4)
    assert seen["rewards"][~mask].abs().sum() == 0


def test_target_kl_stops_the_epochs_early():
    base = dict(episodes_per_update=8, minibatch_size=4, update_epochs=4, learning_rate=1e-3)
    assert PPO(make_envs(), PPOConfig(**base), progress=False).update()["train/epochs"] == 4
    stopped = PPO(make_envs(), PPOConfig(**base, target_kl=1e-9), progress=False).update()
    assert stopped["train/epochs"] == 1  # epoch 0's second minibatch already moved past 1e-9
    assert stopped["policy/approx_kl"] > 1e-9
