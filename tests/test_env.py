"""RLHF-v0 (single env): Gymnasium/SB3 conformance, the KL seam, seeding, and bad input."""

import json
import pickle
import random
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import InvalidAction, ResetNeeded

import rlhf_env  # registers RLHF-v0 and the per-task ids
from rlhf_env.assets import asset_dir
from rlhf_env.env import RLHFEnv
from rlhf_env.lm import pad_left, pad_right, response_logprobs
from rlhf_env.reward import NonFiniteReward
from rlhf_env.tasks import FileTask


@pytest.fixture(scope="module")
def env():
    return RLHFEnv()


def sampled_episode(env, seed, prompt_seed=0, options=None):
    """Act by sampling from the env's own next-token distribution (what an LM agent does)."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=prompt_seed, options=options)
    steps = [(obs, 0.0, False, info)]
    while True:
        logp = env.unwrapped.next_token_logprobs
        action = int(rng.choice(len(logp), p=np.exp(logp) / np.exp(logp).sum()))
        obs, reward, terminated, truncated, info = env.step(action)
        assert truncated is False
        steps.append((obs, reward, terminated, info))
        if terminated:
            return steps


def test_gymnasium_and_sb3_checkers_pass(env):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(gym.make("RLHF-v0").unwrapped)  # warnings are errors in this test suite (pyproject filterwarnings)
    sb3_check_env(gym.make("RLHF-v0"))


def test_make_with_no_arguments_gives_the_default_task():
    env = gym.make("RLHF-v0")
    assert env.unwrapped.task.name == "sentiment"
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("task", ["sentiment", "verbose", "arithmetic"])
def test_each_built_in_task_has_its_own_id_single_and_vector(task):
    env = gym.make(rlhf_env.env_id(task))
    assert env.unwrapped.task.name == task
    assert env.observation_space.contains(env.reset(seed=0)[0])
    envs = gym.make_vec(rlhf_env.env_id(task), num_envs=2)
    assert envs.unwrapped.task.name == task and envs.action_space.shape == (2,)


def test_kl_terms_sum_to_the_sequence_log_ratio(perturbed_policy):
    env = RLHFEnv(policy=perturbed_policy(), beta=0.3)
    for seed in range(3):
        steps = sampled_episode(env, seed, prompt_seed=seed)
        infos = [s[3] for s in steps[1:]]
        rewards = [s[1] for s in steps[1:]]
        query = env.tokenizer(steps[0][3]["prompt"])["input_ids"]
        response = env.unwrapped._episodes.responses[0]
        q, qm = pad_left([query], env.tokenizer.pad_token_id)
        r, rm = pad_right([response], env.tokenizer.pad_token_id)
        with torch.no_grad():
            log_ratio = response_logprobs(env.policy, q, qm, r, rm) - response_logprobs(env.reference, q, qm, r, rm)
        kl_sum = sum(i["kl"] for i in infos)
        assert abs(kl_sum) > 1e-3  # the policies differ, so the seam is really tested
        assert kl_sum == pytest.approx(float(log_ratio.sum()), abs=1e-5)
        assert infos[-1]["kl_sum"] == pytest.approx(kl_sum, abs=1e-9)
        # Σ r_t = R − β·Σ KL_t: the reward parts add up.
        assert sum(rewards) == pytest.approx(infos[-1]["score"] - 0.3 * kl_sum, abs=1e-9)


def test_policy_equal_to_reference_gives_exactly_zero_kl(env):
    for _, reward, terminated, info in sampled_episode(env, seed=3)[1:]:
        assert info["kl"] == 0.0
        if not terminated:
            assert reward == 0.0


def test_k3_estimator_is_never_negative(perturbed_policy):
    env = RLHFEnv(policy=perturbed_policy(), kl_estimator="k3")
    kls = [s[3]["kl"] for s in sampled_episode(env, seed=0)[1:]]
    assert all(k >= 0 for k in kls) and any(k > 0 for k in kls)


@pytest.mark.parametrize("lean", [True, False], ids=["lean-stacked", "own-forward"])
def test_one_policy_and_one_reference_forward_per_token_one_rm_forward_per_episode(monkeypatch, lean,
                                                                                   count_model_forwards):
    env = RLHFEnv(backend="gpt2" if lean else "hf")
    calls, fed = count_model_forwards({"policy": env.policy, "reference": env.reference}, lean)
    rm_calls = []
    score = env.reward_model.score
    monkeypatch.setattr(env.reward_model, "score", lambda *a, **k: rm_calls.append(1) or score(*a, **k))
    steps = 0
    for seed in range(3):
        steps += len(sampled_episode(env, seed, prompt_seed=seed)) - 1
    # One forward per step: the prefill of the query, then one per generated token but the last.
    assert calls == {"policy": steps, "reference": steps} and len(rm_calls) == 3
    if lean:
        assert fed["policy"] == fed["reference"] > steps  # queries and tokens, each fed once to each model
        assert [r.models for r in env._episodes.decoder.runners] == [[env.policy, env.reference]]  # one stacked forward


def _trajectory(env, seed):
    return [(s[0]["input_ids"].tolist(), s[1], s[2]) for s in sampled_episode(env, seed=seed, prompt_seed=seed)]


def test_same_seed_same_episode_even_with_global_rngs_scrambled(env):
    first = _trajectory(env, 5)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert _trajectory(env, 5) == first
    assert _trajectory(env, 6) != first


def test_same_seed_same_episode_across_processes(env):
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_env as t; from rlhf_env.env import RLHFEnv;"
        "print(json.dumps(t._trajectory(RLHFEnv(), 5)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(_trajectory(env, 5)))


def test_reset_options(env):
    obs, info = env.reset(seed=0, options={"prompt": "the plot was not"})
    assert info["prompt"] == "the plot was not"
    _, info = env.reset(seed=0, options={"split": "eval"})
    assert info["prompt"] in env.task.eval_prompts()
    with pytest.raises(ValueError, match="unknown reset options \\['temperature'\\]"):
        env.reset(options={"temperature": 2})
    with pytest.raises(ValueError, match="split"):
        env.reset(options={"split": "test"})
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        env.reset(options={"prompt": "   "})
    with pytest.raises(ValueError, match="tokens long"):
        env.reset(options={"prompt": "the plot was good " * 20})


@pytest.mark.parametrize(
    "action",
    [-1, "n", 2**63 - 1, 3.0, "3", None, [3], np.array([3]), torch.tensor(3), True, np.float32(3.0)],
    ids=["-1", "n", "2**63-1", "3.0", "'3'", "None", "[3]", "array([3])", "tensor(3)", "True", "float32"],
)
def test_invalid_actions_are_named_and_change_nothing(env, action):
    env.reset(seed=0)
    env.step(int(env.tokenizer.convert_tokens_to_ids("was")))
    before = (env.unwrapped._observation(), env.next_token_logprobs, list(env._episodes.responses[0]))
    if action == "n":
        action = env.action_space.n
    with pytest.raises(InvalidAction):
        env.step(action)
    after = (env.unwrapped._observation(), env.next_token_logprobs, list(env._episodes.responses[0]))
    assert np.array_equal(before[0]["input_ids"], after[0]["input_ids"])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_numpy_integer_actions_are_accepted(env):
    env.reset(seed=0)
    env.step(np.int64(5))
    env.step(np.array(6))
    assert env._episodes.responses[0] == [5, 6]


def test_step_before_reset_and_after_the_end_needs_reset():
    env = RLHFEnv()
    with pytest.raises(ResetNeeded):
        env.step(5)
    env.reset(seed=0)
    env.step(env.tokenizer.eos_token_id)
    with pytest.raises(ResetNeeded):
        env.step(5)
    with pytest.raises(ResetNeeded):
        _ = env.next_token_logprobs


def test_token_cap_terminates_with_the_score_and_the_missing_eos_penalty():
    env = RLHFEnv(max_new_tokens=3, missing_eos_penalty=1.0)
    env.reset(seed=0, options={"prompt": "the plot was"})
    good = env.tokenizer.convert_tokens_to_ids("good")
    rewards = []
    for _ in range(3):
        _, reward, terminated, truncated, info = env.step(good)
        rewards.append(reward)
    assert terminated and not truncated and not info["finished"] and info["length"] == 3
    assert rewards[-1] == pytest.approx(-0.1 * info["kl"] + info["score"] - 1.0)


def test_reward_fn_replaces_the_reward_model():
    task = rlhf_env.tasks.get_task("sentiment")
    env = RLHFEnv(reward_fn=task.gold_reward)
    assert env.reward_model is None
    env.reset(seed=0, options={"prompt": "the plot was not"})
    for word in ["bad", "<eos>"]:
        _, _, terminated, _, info = env.step(env.tokenizer.convert_tokens_to_ids(word))
    assert terminated and info["score"] == info["gold_score"] == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_raise_or_are_masked(bad):
    env = RLHFEnv(reward_fn=lambda prompts, responses: [bad] * len(prompts))
    env.reset(seed=0)
    with pytest.raises(NonFiniteReward, match="returned"):
        env.step(env.tokenizer.eos_token_id)
    masked = RLHFEnv(reward_fn=lambda prompts, responses: [bad] * len(prompts), nonfinite_reward="mask")
    masked.reset(seed=0)
    _, reward, _, _, info = masked.step(masked.tokenizer.eos_token_id)
    assert np.isfinite(reward) and info["score_nonfinite"] and info["score"] == 0.0


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(ValueError, match="KL estimator"):
        RLHFEnv(kl_estimator="k2")
    with pytest.raises(ValueError, match="not both"):
        RLHFEnv(reward_model=asset_dir("sentiment") / "reward_model", reward_fn=len)
    (tmp_path / "prompts.txt").write_text("the food was\nthe plot is\n")
    with pytest.raises(ValueError, match="no shipped assets"):
        RLHFEnv(task=FileTask(tmp_path / "prompts.txt", gold=lambda prompt, response: 0.0))
    with pytest.raises(ValueError, match="beta"):
        RLHFEnv(beta=-1.0)


def test_render_ansi_shows_prompt_text_and_reward_parts():
    env = RLHFEnv(render_mode="ansi")
    env.reset(seed=0, options={"prompt": "the plot was"})
    env.step(env.tokenizer.convert_tokens_to_ids("good"))
    text = env.render()
    assert "prompt:   the plot was" in text and "response: good" in text and "kl" in text
    env.step(env.tokenizer.eos_token_id)
    assert "score" in env.render() and "gold" in env.render()


def test_env_pickles_mid_episode(env):
    env.reset(seed=0)
    env.step(5)
    clone = pickle.loads(pickle.dumps(env))
    assert clone._episodes.responses[0] == env._episodes.responses[0]
    assert np.array_equal(clone.next_token_logprobs, env.next_token_logprobs)
