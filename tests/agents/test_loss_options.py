"""The loss options of the critic-free recipes and their named presets (`agents.presets`), against hand-computed
values: the KL estimators as loss terms (value, gradient, and the expectation of the gradient on a toy policy), the
token weights of each loss aggregation on two episodes of unequal length, which tokens an asymmetric clip stops for
positive and negative advantages, GSPO's sequence ratio, the group and batch advantage normalisations as the agent
applies them, each preset's fields and sources; then every preset trains on the tiny default world, and a batch
split into micro-batches takes the same steps as the whole one with every new option."""

import math
import re
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.reinforce
import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.common import parse_command_line, run_command
from agents.core import (
    aggregate,
    aggregation_weights,
    group_mean,
    kl_estimates,
    policy_loss,
    reinforce_loss,
    rloo_baseline,
    sequence_log_ratio,
    uniform_groups,
)
from agents.ppo import PPO, PPOConfig
from agents.presets import PRESETS
from agents.reinforce import KLPaidTwice, Reinforce, ReinforceConfig
from agents.rollout import collect_episodes

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # relative L2: float rounding only


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_values_and_gradients_by_hand():
    # d = log π − log π_ref = 0.5, −0.5, 0.
    logprobs = torch.tensor([[-1.0, -2.0, -1.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, -1.5]], requires_grad=True)
    e = math.exp(0.5)
    expected = {
        "k1": ([0.5, -0.5, 0.0], [1.0, 1.0, 1.0]),  # d; ∂/∂log π = 1
        "k2": ([0.125, 0.125, 0.0], [0.5, -0.5, 0.0]),  # d²/2; ∂ = d
        "k3": ([1 / e - 0.5, e - 1.5, 0.0], [1 - 1 / e, 1 - e, 0.0]),  # e^{−d} − 1 + d; ∂ = 1 − e^{−d}
    }
    for estimator, (values, gradient) in expected.items():
        logprobs.grad = None
        kl = kl_estimates(logprobs, ref, estimator)
        assert kl[0].tolist() == pytest.approx(values, abs=1e-7), estimator
        kl.sum().backward()
        assert logprobs.grad[0].tolist() == pytest.approx(gradient, abs=1e-6), estimator
        assert ref.grad is None  # the reference is a constant
    # The gradient's sign: k2 and k3 push log π down where π > π_ref (d > 0) and up where π < π_ref; k1 always down.
    with pytest.raises(ValueError, match="estimator"):
        kl_estimates(logprobs, ref, "k4")


def test_kl_estimators_expected_gradients_on_a_toy_policy():
    # One state, three actions: E_{a~π}[∂k/∂log π(a) · ∇log π(a)] by enumeration, against the exact KLs' gradients.
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.1]), 0)

    def expected_gradient(estimator):
        logp = torch.log_softmax(theta, 0)
        loss = (logp.exp().detach() * kl_estimates(logp, ref, estimator)).sum()
        return torch.autograd.grad(loss, theta)[0]

    def exact(kl):
        return torch.autograd.grad(kl(torch.log_softmax(theta, 0)), theta)[0]

    reverse = exact(lambda logp: (logp.exp() * (logp - ref)).sum())  # ∇KL(π ‖ π_ref)
    forward = exact(lambda logp: (ref.exp() * (ref - logp)).sum())  # ∇KL(π_ref ‖ π)
    assert torch.allclose(expected_gradient("k1"), torch.zeros(3), atol=1e-7)  # on-policy, k1 pulls nowhere
    assert torch.allclose(expected_gradient("k2"), reverse, atol=1e-6)
    assert torch.allclose(expected_gradient("k3"), forward, atol=1e-6)
    assert not torch.allclose(reverse, forward, atol=1e-3)
    # k1 and k3 are unbiased for the KL's value, k2 is not.
    logp = torch.log_softmax(theta, 0).detach()
    value = float((logp.exp() * (logp - ref)).sum())
    for estimator, unbiased in (("k1", True), ("k2", False), ("k3", True)):
        mean = float((logp.exp() * kl_estimates(logp, ref, estimator)).sum())
        assert (mean == pytest.approx(value, rel=1e-5)) is unbiased, estimator


# ---------------------------------------------------------------- aggregation
# Two episodes of 3 and 1 tokens (padded to 4), the env's longest response L = 8: 2 episodes, 4 tokens.
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
L = 8
WEIGHTS = {
    "token_mean": [[1 / 4] * 3 + [0], [1 / 4, 0, 0, 0]],  # every token alike
    "seq_mean_token_mean": [[1 / 6] * 3 + [0], [1 / 2, 0, 0, 0]],  # 1/(|y_i|·N): the short episode's token weighs 3×
    "seq_mean_token_sum": [[1 / 2] * 3 + [0], [1 / 2, 0, 0, 0]],  # 1/N
    "seq_mean_token_sum_norm": [[1 / 16] * 3 + [0], [1 / 16, 0, 0, 0]],  # 1/(L·N), L the longest allowed, not the pad
}


@pytest.mark.parametrize("aggregation", WEIGHTS)
def test_aggregation_weights_by_hand(aggregation):
    weights = aggregation_weights(MASK, aggregation, max_tokens=L)
    assert weights.numpy() == pytest.approx(np.array(WEIGHTS[aggregation]))
    terms = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])  # 100s sit on padding
    assert float(aggregate(terms, MASK, aggregation, max_tokens=L)) == pytest.approx(
        float((torch.tensor(WEIGHTS[aggregation]) * terms).sum()))
    # One micro-batch per episode, with the whole batch's counts: the parts weigh each token as the whole does.
    for row in (0, 1):
        part = aggregation_weights(MASK[row: row + 1], aggregation, num_episodes=2, num_tokens=4, max_tokens=L)
        assert part[0].tolist() == pytest.approx(WEIGHTS[aggregation][row])


def test_an_unusable_row_weighs_nothing_and_the_norm_needs_its_length():
    mask = torch.cat([MASK, torch.zeros(1, 4)])  # a masked episode: not counted in N
    weights = aggregation_weights(mask, "seq_mean_token_mean", num_episodes=2)
    assert weights[2].tolist() == [0.0] * 4
    assert weights[:2].numpy() == pytest.approx(np.array(WEIGHTS["seq_mean_token_mean"]))
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(torch.ones(2, 4), MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(torch.ones(2, 4), MASK, "sum")


def test_reinforce_loss_gradient_follows_the_aggregation():
    logprobs = torch.full((2, 4), -1.0, requires_grad=True)
    advantages = torch.tensor([[2.0] * 4, [-1.0] * 4]) * MASK
    for aggregation, weights in WEIGHTS.items():
        logprobs.grad = None
        reinforce_loss(logprobs, advantages, MASK, aggregation=aggregation, max_tokens=L).backward()
        assert torch.allclose(logprobs.grad, -advantages * torch.tensor(weights)), aggregation


# ---------------------------------------------------------------- clipping
RATIOS = torch.tensor([[0.7, 0.9, 1.25, 1.35]])


def clipped_gradient(advantage: float, clip_range) -> tuple[list[float], float]:
    logprobs = RATIOS.log().requires_grad_(True)  # π_old: log-prob 0, so the ratio is exp(log π)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 4), torch.full((1, 4), advantage), torch.ones(1, 4),
                              clip_range)
    loss.backward()
    return logprobs.grad[0].tolist(), stats["clipfrac"]


def test_asymmetric_clip_stops_different_tokens_for_positive_and_negative_advantages():
    # DAPO's ε_low = 0.2, ε_high = 0.28: the ratio is kept in [0.8, 1.28]. ∂/∂log π = −A·ρ/4 where the unclipped
    # term is the active one, 0 where the clipped (constant) term is.
    grad, clipfrac = clipped_gradient(1.0, (0.2, 0.28))  # A > 0: only a ratio above 1.28 is stopped
    assert grad == pytest.approx([-0.7 / 4, -0.9 / 4, -1.25 / 4, 0.0]) and clipfrac == 0.25
    grad, clipfrac = clipped_gradient(-1.0, (0.2, 0.28))  # A < 0: only a ratio below 0.8 is stopped
    assert grad == pytest.approx([0.0, 0.9 / 4, 1.25 / 4, 1.35 / 4]) and clipfrac == 0.25
    grad, clipfrac = clipped_gradient(1.0, 0.2)  # symmetric: 1.25 > 1.2 is stopped too (clip-higher lets it grow)
    assert grad == pytest.approx([-0.7 / 4, -0.9 / 4, 0.0, 0.0]) and clipfrac == 0.5
    assert clipped_gradient(1.0, (0.2, 0.2)) == clipped_gradient(1.0, 0.2)


def test_sequence_ratio_is_the_geometric_mean_and_clips_whole_episodes():
    log_ratio = torch.tensor([[0.3, -0.1, 0.1, 9.0], [0.5, 9.0, 9.0, 9.0]])  # 9.0 on padding must not count
    assert torch.allclose(sequence_log_ratio(log_ratio, MASK), torch.tensor([[0.1, 0.1, 0.1, 0.0], [0.5, 0, 0, 0]]))
    ratios = log_ratio.exp()
    assert math.exp(0.1) == pytest.approx(float(ratios[0, :3].prod() ** (1 / 3)))
    # GSPO with A = 1 per episode, ε = 0.2, each episode's token mean: episode 0's ratio e^0.1 ≈ 1.105 is inside
    # the clip, so each of its 3 tokens gets −A·s·(1/3)·(1/2); episode 1's e^0.5 ≈ 1.65 is clipped whole: 0.
    logprobs = log_ratio.clone().requires_grad_(True)
    loss, stats = policy_loss(logprobs, torch.zeros(2, 4), torch.ones(2, 4) * MASK, MASK, 0.2,
                              aggregation="seq_mean_token_mean", ratio_level="sequence")
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2)
    loss.backward()
    s = math.exp(0.1)
    assert torch.allclose(logprobs.grad, torch.tensor([[-s / 6] * 3 + [0.0], [0.0] * 4]))
    assert stats["clipfrac"] == 0.25  # the clipped episode's one token of four


# ---------------------------------------------------------------- group statistics
def test_group_mean_includes_the_sample_and_scales_the_leave_one_out_advantage():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 0.0])
    assert group_mean(returns, 4).tolist() == [3.0] * 4 + [1.0] * 4
    assert torch.allclose(returns - group_mean(returns, 4), 3 / 4 * (returns - rloo_baseline(returns, 4)))
    valid = torch.tensor([True, True, False, True] + [True] * 4)  # the 3.0 is not data
    assert group_mean(returns, 4, valid).tolist() == [3.0] * 4 + [1.0] * 4  # (1 + 2 + 6) / 3


def test_uniform_groups_compare_the_valid_returns_exactly():
    returns = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 2.0, 1.0, 1.0])
    assert uniform_groups(returns, 4).tolist() == [True] * 4 + [False] * 4
    valid = torch.tensor([True] * 5 + [False] + [True] * 2)
    assert uniform_groups(returns, 4, valid).tolist() == [True] * 8


# ---------------------------------------------------------------- the agent
def make_envs(num_envs: int = 8, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=8, **kwargs)


def zero_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * len(responses)


def recorded_advantages(monkeypatch, config: ReinforceConfig, beta: float = 0.05):
    """One update of `config`; the advantages its loss saw, with the batch's episodes and mask."""
    calls, episodes = [], []
    for name in ("reinforce_loss", "policy_loss"):
        real = getattr(agents.reinforce, name)

        def recording(logprobs, *args, real=real, **kwargs):
            calls.append(args[1 if real is policy_loss else 0].detach().clone())
            return real(logprobs, *args, **kwargs)

        monkeypatch.setattr(agents.reinforce, name, recording)
    real_rollout = agents.reinforce.rollout
    monkeypatch.setattr(agents.reinforce, "rollout",
                        lambda agent, prompts: episodes.append(real_rollout(agent, prompts)) or episodes[-1])
    Reinforce(make_envs(beta=beta), config, progress=False).update()
    (advantages,) = calls
    return advantages, episodes[0]


def padded(rows: list[list[float]], width: int) -> np.ndarray:
    return np.array([row + [0.0] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("advantage_norm", ["none", "group_std", "batch"])
def test_the_agent_normalises_advantages_as_computed_by_hand(monkeypatch, advantage_norm):
    config = ReinforceConfig(episodes_per_update=8, samples_per_prompt=4, baseline="group_mean",
                             advantage_norm=advantage_norm, reward_to_go=advantage_norm == "batch")
    advantages, episodes = recorded_advantages(monkeypatch, config)
    width = advantages.shape[1]
    mask = padded([[1.0] * len(r) for r in episodes.responses], width)
    returns = np.array([sum(r) for r in episodes.rewards])  # G per episode
    expected = returns - returns.reshape(2, 4).mean(1).repeat(4)  # G − group mean
    if advantage_norm == "group_std":  # ÷ (Bessel std of the group + 1e-4), as GRPO
        expected = expected / (returns.reshape(2, 4).std(1, ddof=1).repeat(4) + 1e-4)
    expected = expected[:, None] * mask
    if advantage_norm == "batch":  # REINFORCE++: reward-to-go minus the group mean, whitened over all tokens
        to_go = padded([list(np.cumsum(r[::-1])[::-1]) for r in episodes.rewards], width)
        centred = (to_go - returns.reshape(2, 4).mean(1).repeat(4)[:, None]) * mask
        values = centred[mask == 1]
        expected = (centred - values.mean()) / values.std(ddof=1) * mask
    assert advantages.numpy() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("drop", [False, True])
def test_drop_uniform_groups_leaves_groups_with_equal_returns_out_of_the_loss_and_its_counts(monkeypatch, drop):
    # Two prompts × 4 samples; the first group's returns made equal (1.0 each), the second's left as sampled.
    envs = make_envs(beta=0.05)
    prompts = envs.unwrapped.world.prompt_pool("train")[:2]
    episodes = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0),
                                prompts=[p for p in prompts for _ in range(4)])
    for i in range(4):
        episodes.rewards[i] = [0.0] * (len(episodes.rewards[i]) - 1) + [1.0]
    assert len({sum(r) for r in episodes.rewards[4:]}) == 4
    calls = []
    real = agents.reinforce.reinforce_loss

    def recording(logprobs, advantages, mask, num_episodes, *args):
        calls.append((mask.clone(), float(num_episodes), args[1]))
        return real(logprobs, advantages, mask, num_episodes, *args)

    monkeypatch.setattr(agents.reinforce, "reinforce_loss", recording)
    config = ReinforceConfig(episodes_per_update=8, samples_per_prompt=4, baseline="group_mean",
                             loss_aggregation="token_mean", drop_uniform_groups=drop)
    Reinforce(envs, config, progress=False).update(episodes=episodes)
    (mask, num_episodes, num_tokens), = calls
    lengths = [len(r) for r in episodes.responses]
    assert bool(mask[:4].sum() == 0) is drop and mask[4:].sum(1).tolist() == lengths[4:]
    assert num_episodes == (4 if drop else 8) and float(num_tokens) == sum(lengths[4:] if drop else lengths)


def test_kl_in_loss_needs_the_env_beta_at_zero():
    with pytest.raises(KLPaidTwice, match="beta=0"):
        Reinforce(make_envs(beta=0.1), ReinforceConfig.preset("grpo", episodes_per_update=8), progress=False)
    with pytest.raises(KLPaidTwice):  # an adaptive β is not 0 either
        Reinforce(make_envs(beta=0.1, kl_target=1.0), ReinforceConfig(episodes_per_update=8, kl_in_loss=True),
                  progress=False)


def test_kl_in_loss_refuses_given_episodes_without_reference_log_probs():
    envs = make_envs(beta=0.0)
    prompt = envs.unwrapped.world.prompt_pool("train")[0]
    episodes = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0), prompts=[prompt] * 8)
    episodes.ref_logprobs = []
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=8, kl_in_loss=True), progress=False)
    with pytest.raises(ValueError, match="ref_logprobs"):
        agent.update(episodes=episodes)


def test_kl_in_loss_adds_the_coefficient_times_the_estimate(monkeypatch, perturbed_policy):
    # A policy away from π_ref, zero advantages (equal rewards, β = 0): the loss is kl_coef·k3 alone.
    envs = make_envs(beta=0.0, policy=perturbed_policy(), reward_fn=zero_reward)
    episodes = []
    real_rollout = agents.reinforce.rollout
    monkeypatch.setattr(agents.reinforce, "rollout",
                        lambda agent, prompts: episodes.append(real_rollout(agent, prompts)) or episodes[-1])
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=8, samples_per_prompt=2, kl_in_loss=True,
                                            kl_coef=0.3, loss_aggregation="seq_mean_token_mean"), progress=False)
    metrics = agent.update()
    d = [np.array(lp) - np.array(ref) for lp, ref in zip(episodes[0].logprobs, episodes[0].ref_logprobs)]
    expected = np.mean([np.mean(np.expm1(-x) + x) for x in d])  # each episode's token mean of k3, averaged
    assert metrics["loss/kl"] == pytest.approx(expected, rel=1e-4) and metrics["loss/kl"] > 0
    assert metrics["train/no_signal"] == 0 and metrics["train/grad_norm"] > 0
    assert metrics["objective/beta"] == 0.0


def test_the_kl_term_s_gradient_scales_with_kl_coef(perturbed_policy):
    def gradient(kl_coef):
        envs = make_envs(beta=0.0, policy=perturbed_policy(), reward_fn=zero_reward)
        return step_gradients(Reinforce(envs, ReinforceConfig(episodes_per_update=8, samples_per_prompt=2,
                                                              kl_in_loss=True, kl_coef=kl_coef, max_grad_norm=1e9),
                                        progress=False))[0]

    assert relative_difference(gradient(0.6), 2 * gradient(0.3)) <= TOLERANCE


# ---------------------------------------------------------------- presets
PAPERS = {"grpo": ("Shao et al. 2024", "DeepSeekMath"), "dr_grpo": ("Liu et al. 2025", "R1-Zero"),
          "dapo": ("Yu et al. 2025", "DAPO"), "rloo": ("Ahmadian et al. 2024", "Back to Basics"),
          "reinforce_pp": ("Hu 2025", "REINFORCE++")}


def test_each_preset_sets_the_published_recipe():
    grpo, dr_grpo, dapo, rloo, pp = (ReinforceConfig.preset(name) for name in PAPERS)
    assert (grpo.baseline, grpo.advantage_norm, grpo.loss_aggregation, grpo.clip_low, grpo.clip_high,
            grpo.kl_in_loss, grpo.kl_estimator, grpo.kl_coef, grpo.steps_per_batch) == (
        "group_mean", "group_std", "seq_mean_token_mean", 0.2, 0.2, True, "k3", 0.04, 1)
    assert (dr_grpo.baseline, dr_grpo.advantage_norm, dr_grpo.loss_aggregation, dr_grpo.clip_low,
            dr_grpo.clip_high, dr_grpo.kl_in_loss) == ("group_mean", "none", "seq_mean_token_sum_norm", 0.2, 0.2,
                                                       False)
    assert (dapo.baseline, dapo.advantage_norm, dapo.loss_aggregation, dapo.clip_low, dapo.clip_high,
            dapo.kl_in_loss, dapo.num_minibatches, dapo.update_epochs) == (
        "group_mean", "group_std", "token_mean", 0.2, 0.28, False, 16, 1)
    assert rloo == ReinforceConfig()  # the defaults are RLOO's recipe
    assert (rloo.baseline, rloo.loss_aggregation, rloo.clip_low, rloo.kl_in_loss) == (
        "rloo", "seq_mean_token_sum", None, False)
    assert (pp.baseline, pp.reward_to_go, pp.advantage_norm, pp.loss_aggregation, pp.clip_low, pp.clip_high,
            pp.kl_in_loss) == ("none", True, "batch", "token_mean", 0.2, 0.2, False)
    every = set(PRESETS["rloo"])  # every preset sets every loss field, whatever the defaults
    assert all(every <= set(fields) for fields in PRESETS.values())
    assert ReinforceConfig.preset("dapo", samples_per_prompt=8).samples_per_prompt == 8  # sizes stay the caller's
    with pytest.raises(ValueError, match="preset"):
        ReinforceConfig.preset("ppo")


def test_each_preset_names_its_source_in_the_docs():
    docs = (ROOT / "docs" / "agents.md").read_text()
    section = docs[docs.index("## Loss options and presets"):]
    module = (ROOT / "agents" / "presets.py").read_text()
    for name, (authors, title) in PAPERS.items():
        entry = re.search(rf"``{name}``, ([^\n]*)", module)
        assert entry and authors in entry.group(1) and title in entry.group(1), name
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}`"))
        assert authors in row and title in row, name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_on_the_tiny_world(name, digest):
    beta = 0.0 if PRESETS[name]["kl_in_loss"] else 0.05
    envs = make_envs(beta=beta)
    agent = Reinforce(envs, ReinforceConfig.preset(name, episodes_per_update=16, samples_per_prompt=4,
                                                   learning_rate=1e-3), progress=False)
    policy, reference = digest(envs.unwrapped.policy), digest(envs.unwrapped.reference)
    for _ in range(2):
        metrics = agent.update()
    assert digest(envs.unwrapped.policy) != policy and digest(envs.unwrapped.reference) == reference
    losses = [key for key in metrics if key.startswith(("loss/", "policy/", "train/grad_norm"))]
    assert all(math.isfinite(metrics[key]) for key in losses), metrics
    assert ("policy/clipfrac" in metrics) == (agent.config.clip_low is not None)
    assert ("loss/kl" in metrics) == agent.config.kl_in_loss
    if agent.config.steps_per_batch > 1:  # DAPO: 16 steps on the batch, the first at ratio exactly 1
        assert metrics["train/rollout_logprob_mismatch"] < 1e-4 and metrics["policy/ratio"] != 1.0


def test_several_steps_start_at_ratio_one_against_the_sampling_policy(monkeypatch):
    calls, counts = [], []
    real = agents.reinforce.policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        loss, stats = real(logprobs, old_logprobs, advantages, mask, *args, **kwargs)
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), stats))
        counts.append((mask.clone(), float(kwargs["num_episodes"]), float(kwargs["num_tokens"])))
        return loss, stats

    monkeypatch.setattr(agents.reinforce, "policy_loss", recording)
    config = ReinforceConfig(episodes_per_update=8, samples_per_prompt=4, clip_range=0.2, update_epochs=2,
                             num_minibatches=2, micro_batch_size=2, learning_rate=1e-3)
    metrics = Reinforce(make_envs(beta=0.05), config, progress=False).update()
    assert len(calls) == 2 * 2 * 2  # steps × micro-batches
    for logprobs, old, stats in calls[:2]:  # the first step: π is π_old exactly
        assert torch.equal(logprobs, old) and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    assert sum(stats["ratio"] for _, _, stats in calls[:2]) == pytest.approx(1.0)  # the micro-batches' shares
    assert not torch.equal(calls[2][0], calls[2][1])  # after one step the policy has moved
    for step in range(4):  # each step's normalisers count its own minibatch (2 micro-batches of 2 episodes)
        masks = [mask for mask, _, _ in counts[2 * step: 2 * step + 2]]
        assert {c[1:] for c in counts[2 * step: 2 * step + 2]} == {(4.0, float(sum(m.sum() for m in masks)))}
    assert 0 <= metrics["train/rollout_logprob_mismatch"] < 1e-4


def test_a_preset_config_survives_a_checkpoint_and_older_checkpoints_read(tmp_path):
    envs = make_envs(beta=0.0)
    config = ReinforceConfig.preset("grpo", episodes_per_update=8, samples_per_prompt=2)
    agent = Reinforce(envs, config, progress=False)
    agent.update()
    agent.save(tmp_path / "grpo")
    assert Reinforce.load(tmp_path / "grpo", make_envs(beta=0.0), progress=False).config == config
    saved = {k: v for k, v in asdict(ReinforceConfig()).items() if k != "advantage_norm"}  # before advantage_norm
    assert ReinforceConfig.from_saved(**saved, group_norm=True).advantage_norm == "group_std"
    assert ReinforceConfig.from_saved(**saved, group_norm=False) == ReinforceConfig()


def test_the_command_line_takes_a_preset_and_explicit_flags_override_it():
    args = parse_command_line("test", ReinforceConfig, ["--preset", "dapo", "--clip-range-high", "0.3"], PRESETS)
    assert (args.clip_range_low, args.clip_range_high, args.loss_aggregation, args.num_minibatches) == (
        0.2, 0.3, "token_mean", 16)
    assert parse_command_line("test", ReinforceConfig, [], PRESETS).baseline == "rloo"  # no preset: the defaults


def test_the_command_line_runs_a_kl_in_loss_preset_in_an_env_with_beta_zero(capsys):
    summary = agents.reinforce.main(["--preset", "grpo", "--episodes-per-update", "8", "--samples-per-prompt", "2",
                                     "--num-envs", "8", "--total-timesteps", "1", "--eval-episodes", "8",
                                     "--no-progress"])
    assert summary["preset"] == "grpo" and summary["beta"] == 0.0 and summary["kl_coef"] == 0.04
    assert summary["config"]["kl_in_loss"] and summary["eval_after"]["objective/beta"] == 0.04
    with pytest.raises(KLPaidTwice):
        run_command(Reinforce, ReinforceConfig, "test", ["--preset", "grpo", "--beta", "0.1", "--num-envs", "8",
                                                         "--episodes-per-update", "8"], presets=PRESETS,
                    loss_kl_coef=lambda config: config.kl_coef if config.kl_in_loss else None)


# ---------------------------------------------------------------- a split batch is the whole batch
def step_gradients(agent) -> list[torch.Tensor]:
    """One update; the gradient of every optimizer step (flattened)."""
    gradients, step = [], agent.optimizer.step

    def recording_step(*args, **kwargs):
        gradients.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                    for p in agent.params]).clone())
        return step(*args, **kwargs)

    agent.optimizer.step = recording_step
    agent.update()
    assert gradients, "the update took no optimizer step"
    return gradients


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


SPLIT = {
    "token_mean-clip_higher": dict(baseline="group_mean", advantage_norm="group_std", loss_aggregation="token_mean",
                                   clip_range_low=0.2, clip_range_high=0.28, num_minibatches=2, update_epochs=2),
    "seq_mean_token_mean-kl_k3": dict(baseline="group_mean", advantage_norm="group_std",
                                      loss_aggregation="seq_mean_token_mean", clip_range=0.2, kl_in_loss=True),
    "seq_mean_token_sum_norm": dict(baseline="group_mean", loss_aggregation="seq_mean_token_sum_norm",
                                    clip_range=0.2, num_minibatches=2),
    "batch_norm-k2": dict(baseline="none", reward_to_go=True, advantage_norm="batch", loss_aggregation="token_mean",
                          kl_in_loss=True, kl_estimator="k2"),
    "sequence_ratio": dict(baseline="rloo", loss_aggregation="seq_mean_token_mean", clip_range=0.2,
                           ratio_level="sequence", update_epochs=2),
    "value-token_mean": dict(baseline="value", value_init="small", loss_aggregation="token_mean", clip_range=0.2,
                             num_minibatches=2),
}


@pytest.mark.parametrize("options", SPLIT.values(), ids=SPLIT)
def test_micro_batches_take_the_steps_of_the_whole_batch(options, perturbed_policy):
    # A policy away from π_ref (the KL term has a gradient), unequal lengths, every step's gradient compared.
    config = dict(episodes_per_update=8, samples_per_prompt=4, max_grad_norm=1e9, learning_rate=1e-3, seed=0,
                  **options)

    def agent(micro):
        envs = make_envs(beta=0.0 if options.get("kl_in_loss") else 0.05, policy=perturbed_policy())
        return Reinforce(envs, ReinforceConfig(micro_batch_size=micro, **config), progress=False)

    whole_agent = agent(None)
    whole = step_gradients(whole_agent)
    history = whole_agent.logger.history[-1]
    assert history["episode/length"] != history["episode/length_p90"]  # the normalisers matter
    assert len(whole) == ReinforceConfig(**config).steps_per_batch
    for micro in (1, 2):
        split = step_gradients(agent(micro))
        assert len(split) == len(whole)
        for step, (a, b) in enumerate(zip(split, whole)):
            assert relative_difference(a, b) <= TOLERANCE, (micro, step)


def test_ppo_weights_its_policy_loss_by_the_aggregation():
    # The first step (ratio 1, no value loss, no entropy): the token sum is L = 8 times the sum over L, and a token
    # mean is not an episode mean on episodes of unequal lengths.
    def gradient(aggregation):
        config = PPOConfig(episodes_per_update=8, minibatch_size=8, update_epochs=1, max_grad_norm=1e9, vf_coef=0.0,
                           seed=0, loss_aggregation=aggregation)
        return step_gradients(PPO(make_envs(beta=0.05), config, progress=False))[0]

    token_sum, normalised = gradient("seq_mean_token_sum"), gradient("seq_mean_token_sum_norm")
    assert relative_difference(token_sum, 8 * normalised) <= TOLERANCE
    assert relative_difference(gradient("token_mean"), gradient("seq_mean_token_mean")) > 0.01


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_ppo_gradient_accumulation_equals_the_whole_minibatch_for_per_episode_aggregations(aggregation):
    config = dict(episodes_per_update=8, minibatch_size=8, update_epochs=1, max_grad_norm=1e9, seed=0,
                  loss_aggregation=aggregation, clip_range_low=0.1, clip_range_high=0.3)
    whole = step_gradients(PPO(make_envs(beta=0.05), PPOConfig(**config), progress=False))[0]
    for steps in (2, 4):
        split = step_gradients(PPO(make_envs(beta=0.05), PPOConfig(gradient_accumulation_steps=steps, **config),
                                   progress=False))[0]
        assert relative_difference(split, whole) <= TOLERANCE, steps
