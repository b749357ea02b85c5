import math

import numpy as np
import pytest

from rlhf_env.kl import AdaptiveKLController, FixedKLController, kl_estimate


def test_estimators_hand_values():
    assert kl_estimate(-1.0, -1.5) == pytest.approx(0.5)
    assert kl_estimate(-1.0, -1.5, "k3") == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert kl_estimate(-2.0, -1.0, "k3") == pytest.approx(math.exp(1.0) - 1 - 1.0)
    assert kl_estimate(np.array([-1.0, -2.0]), np.array([-1.0, -1.0])).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(0.0, 0.0, "k2")


def test_k1_and_k3_are_unbiased_for_the_kl():
    rng = np.random.default_rng(0)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    exact = float(np.sum(p * np.log(p / q)))
    a = rng.choice(3, size=200000, p=p)
    for estimator in ("k1", "k3"):
        assert np.mean(kl_estimate(np.log(p[a]), np.log(q[a]), estimator)) == pytest.approx(exact, abs=0.01)


def test_adaptive_controller_follows_ziegler_et_al():
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    ctl.update(kl=9.0, n_steps=256)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(kl=5.4, n_steps=100)  # error −0.1
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))
    restored = AdaptiveKLController(beta=1.0, target=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_controller_and_validation():
    ctl = FixedKLController(0.05)
    ctl.update(kl=100.0, n_steps=10)
    assert ctl.beta == 0.05
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            FixedKLController(bad)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="horizon"):  # K = n_steps / horizon > 1: at K > 5, β would turn negative
        AdaptiveKLController(0.1, target=1.0, horizon=10).update(kl=100.0, n_steps=11)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="NaN"):
        ctl.update(kl=float("nan"), n_steps=2)
    ctl.update(kl=float("inf"), n_steps=2)  # infinitely far above target: the clipped error, +0.2
    assert ctl.beta == pytest.approx(0.104)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=float("inf"))
    FixedKLController(0.1).update(kl=float("nan"), n_steps=1)  # a fixed β ignores what it is fed


# ---------------------------------------------------------------- what the controller is fed
# Ziegler et al. (2019, §2.2) clip the error of the policy's KL, the batch mean, and move β once per batch with
# n_steps = the batch's episodes. The envs feed it one batch per `kl_batch_episodes` finished episodes; agents one
# batch per rollout, with the episodes they keep.


def adaptive_envs(num_envs=2, target=1.0, horizon=10, **kwargs):
    import gymnasium as gym

    import rlhf_env  # noqa: F401

    kwargs.setdefault("kl_batch_episodes", 2)
    return gym.make_vec("RLHF-v0", num_envs=num_envs, beta=0.1, kl_target=target, kl_horizon=horizon, **kwargs)


def test_a_batch_moves_beta_by_the_error_of_its_mean_kl():
    # The input: KL 0.0 and 3.0 (mean 1.5, above the target 1.0): β 0.1 → 0.1·(1 + 0.2·2/10) = 0.104.
    # Clipping each episode's error instead gives 0.1·(1 − 0.02)·(1 + 0.02) = 0.09996: β moves *down*.
    envs = adaptive_envs()
    envs.unwrapped.update_beta([0.0, 3.0])
    assert envs.unwrapped.beta == pytest.approx(0.104, abs=1e-12)
    envs.unwrapped.update_beta([0.9, 0.9])  # error −0.1: β·(1 − 0.1·2/10)
    assert envs.unwrapped.beta == pytest.approx(0.104 * 0.98, abs=1e-12)
    with pytest.raises(ValueError, match="episode KLs"):
        envs.unwrapped.update_beta([])


def test_off_target_beta_moves_by_e_to_the_0_2_per_horizon():
    # Twice the target for `horizon` episodes, in batches of 100: β grows by (1 + 0.2·100/H)^(H/100) ≈ e^0.2.
    envs = adaptive_envs(target=1.0, horizon=1000)
    for _ in range(10):
        envs.unwrapped.update_beta([0.5, 3.5] * 50)  # mean 2.0 although half the episodes are below target
    assert envs.unwrapped.beta == pytest.approx(0.1 * 1.02**10, rel=1e-12)
    assert 0.1 * 1.02**10 == pytest.approx(0.1 * math.exp(0.2), rel=0.01)


def two_row_episode_kls(policy, target, **kwargs):
    """Both rows of a 2-row env emit EOS on the first step, so both episodes end in the same step; returns the env
    and the two episodes' KL sums."""

    envs = adaptive_envs(target=target, policy=policy, kl_estimator="k3", **kwargs)
    envs.reset(seed=3)
    eos = envs.unwrapped.world.eos_token_id
    _, _, terminated, _, infos = envs.step(np.array([eos, eos]))
    assert terminated.all()
    return envs, infos["kl_sum"]


def test_the_vector_env_moves_beta_once_per_batch_of_episodes_by_their_mean(perturbed_policy):
    _, kls = two_row_episode_kls(perturbed_policy(scale=0.05), target=1.0)
    assert kls.min() > 0 and abs(kls[0] - kls[1]) > 0.1 * kls.max()  # two different, positive KLs (k3 ≥ 0)
    # Target = their mean: the batch's error is 0 and β must not move; per episode, the errors ±x move it.
    envs, again = two_row_episode_kls(perturbed_policy(scale=0.05), target=float(kls.mean()))
    assert np.array_equal(again, kls)
    assert envs.unwrapped.beta == pytest.approx(0.1, abs=1e-15)
    # A batch of one episode (kl_batch_episodes=1) is the rule applied to each: β moves.
    envs, _ = two_row_episode_kls(perturbed_policy(scale=0.05), target=float(kls.mean()), kl_batch_episodes=1)
    assert envs.unwrapped.beta != pytest.approx(0.1, abs=1e-9)


def test_a_refused_batch_stays_pending_and_beta_unchanged():
    envs = adaptive_envs(kl_batch_episodes=2)
    world = envs.unwrapped.world
    with pytest.raises(ValueError, match="NaN"):
        world.record_episode_kls([0.5, float("nan")])
    assert envs.unwrapped.beta == 0.1 and world._kl_batch == [0.5, pytest.approx(float("nan"), nan_ok=True)]


def test_the_single_env_waits_for_kl_batch_episodes_episodes():
    import gymnasium as gym

    env = gym.make("RLHF-v0", beta=0.1, kl_target=0.001, kl_horizon=10, kl_batch_episodes=2)
    eos = env.unwrapped.tokenizer.eos_token_id
    betas = []
    for seed in range(4):
        env.reset(seed=seed)
        env.step(eos)
        betas.append(env.unwrapped.beta)
    # π = π_ref here, so every KL is 0: error −1, clipped to −0.2, once per two episodes.
    assert betas == pytest.approx([0.1, 0.096, 0.096, 0.096 * 0.96], abs=1e-15)
    with pytest.raises(ValueError, match="kl_batch_episodes"):
        gym.make("RLHF-v0", kl_batch_episodes=0)
    default = gym.make("RLHF-v0", beta=0.1, kl_target=0.001, kl_horizon=100)  # a batch is 64 episodes by default
    for seed in range(63):
        default.reset(seed=seed)
        default.step(eos)
    assert default.unwrapped.beta == 0.1
    default.reset(seed=63)
    default.step(eos)
    assert default.unwrapped.beta == pytest.approx(0.1 * (1 - 0.2 * 64 / 100), abs=1e-15)
    with pytest.raises(ValueError, match="kl_horizon"):  # a 64-episode batch would move β by up to 128% at once
        gym.make("RLHF-v0", kl_target=1.0, kl_horizon=10)


def test_an_agent_moves_beta_once_per_rollout_from_the_episodes_it_keeps(monkeypatch):
    import agents.common
    from agents.evaluate import evaluate
    from agents.ppo import PPO, PPOConfig

    # 8 rows and a 12-token cap: rows that finish early run discarded autoreset episodes while the others go on.
    envs = adaptive_envs(num_envs=8, target=0.5, horizon=1000, max_new_tokens=12)
    agent = PPO(envs, PPOConfig(episodes_per_update=16, minibatch_size=8, update_epochs=1), progress=False)
    controller = envs.unwrapped.world.kl_controller
    calls, kept_episodes = [], []
    monkeypatch.setattr(controller, "update", lambda kl, n_steps, update=controller.update:
                        calls.append((kl, n_steps)) or update(kl, n_steps))
    collect = agents.common.collect_episodes
    monkeypatch.setattr(agents.common, "collect_episodes",
                        lambda *args, **kwargs: kept_episodes.append(collect(*args, **kwargs)) or kept_episodes[-1])
    metrics = agent.update()
    kls = [kl for episodes in kept_episodes for kl in episodes.kls]
    assert len(kept_episodes) == 2 and len(kls) == 16
    assert calls == [(pytest.approx(np.mean(kls), abs=1e-12), 16)]
    assert metrics["objective/kl"] == pytest.approx(np.mean(kls))
    evaluate(envs, 16)  # evaluation episodes never move β
    assert len(calls) == 1
