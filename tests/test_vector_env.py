"""The native vector env: same episodes as the single env, one forward per model per step, exact KL seam."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import InvalidAction, ResetNeeded

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from rlhf_env.env import RLHFEnv
from rlhf_env.lm import pad_left, pad_right, response_logprobs
from rlhf_env.vector_env import RLHFVectorEnv


def sample_actions(logp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = np.exp(logp)
    return np.array([rng.choice(p.shape[1], p=row / row.sum()) for row in p])


def test_make_vec_uses_the_native_vector_env():
    envs = gym.make_vec("RLHF-v0", num_envs=3)
    assert isinstance(envs, RLHFVectorEnv)
    obs, infos = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)
    assert envs.action_space.shape == (3,) and len(infos["prompt"]) == 3


def test_one_row_vector_env_matches_the_single_env_exactly():
    env, envs = RLHFEnv(), RLHFVectorEnv(num_envs=1)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=7)
    vobs, _ = envs.reset(seed=7)
    episodes = 0
    while episodes < 4:
        assert np.array_equal(obs["input_ids"], vobs["input_ids"][0])
        assert np.array_equal(env.next_token_logprobs, envs.next_token_logprobs[0])
        action = sample_actions(envs.next_token_logprobs, rng)
        obs, reward, terminated, _, info = env.step(int(action[0]))
        vobs, vreward, vterminated, _, vinfo = envs.step(action)
        assert reward == vreward[0] and terminated == vterminated[0] and info["kl"] == vinfo["kl"][0]
        if terminated:
            assert info["score"] == vinfo["score"][0] and info["response_text"] == vinfo["response_text"][0]
            episodes += 1
            obs, _ = env.reset()
            vobs, vreward, _, _, vinfo = envs.step(action)  # NEXT_STEP autoreset: the action is ignored
            assert vreward[0] == 0.0 and vinfo["prompt"][0] == env.unwrapped._episodes.prompts[0]


def test_rows_draw_the_prompts_of_single_envs_seeded_seed_plus_row():
    envs = RLHFVectorEnv(num_envs=3)
    _, infos = envs.reset(seed=10)
    singles = [RLHFEnv().reset(seed=10 + i)[1]["prompt"] for i in range(3)]
    assert list(infos["prompt"]) == singles


def test_kl_seam_is_exact_per_row_across_restarts_and_cache_compaction(perturbed_policy):
    envs = RLHFVectorEnv(num_envs=4, policy=perturbed_policy(scale=0.02), beta=0.2, compact_at=48)
    rng = np.random.default_rng(1)
    envs.reset(seed=0)
    kl_sums = np.zeros(4)
    checked, compactions_seen, largest = 0, False, 0.0
    while checked < 12:
        queries = [list(q) for q in envs._episodes.queries]
        width_before = envs._episodes.decoder.mask.shape[1]
        obs, rewards, terminated, _, infos = envs.step(sample_actions(envs.next_token_logprobs, rng))
        compactions_seen |= envs._episodes.decoder.mask.shape[1] < width_before
        kl_sums += np.where(infos.get("_kl", np.zeros(4, bool)), infos.get("kl", np.zeros(4)), 0.0)
        for row in np.flatnonzero(terminated):
            response = envs._episodes.responses[row]
            q, qm = pad_left([queries[row]], 0)
            r, rm = pad_right([response], 0)
            with torch.no_grad():
                exact = float((response_logprobs(envs.policy, q, qm, r, rm)
                               - response_logprobs(envs.reference, q, qm, r, rm)).sum())
            assert kl_sums[row] == pytest.approx(exact, abs=1e-5)
            largest = max(largest, abs(exact))
            assert rewards[row] == pytest.approx(infos["score"][row] - 0.2 * infos["kl"][row], abs=1e-9)
            kl_sums[row] = 0.0
            checked += 1
    assert compactions_seen and largest > 0.1  # the cache was compacted, and the policies really differ


def test_each_token_goes_through_each_model_once_and_the_rm_once_per_ending_step(monkeypatch, count_model_forwards):
    envs = RLHFVectorEnv(num_envs=8)
    calls, tokens = count_model_forwards({"policy": envs.policy, "reference": envs.reference})
    calls["reward"] = 0
    score = envs.reward_model.score
    monkeypatch.setattr(envs.reward_model, "score", lambda *a, **k: calls.__setitem__("reward", calls["reward"] + 1)
                        or score(*a, **k))
    rng = np.random.default_rng(0)
    _, infos = envs.reset(seed=0)
    expected_tokens = int(infos["prompt_tokens"].sum())
    steps, decode_steps, restart_steps, ending_steps = 0, 0, 0, 0
    restarting = np.zeros(8, dtype=bool)
    for _ in range(40):
        _, _, terminated, _, infos = envs.step(sample_actions(envs.next_token_logprobs, rng))
        steps += 1
        decode_steps += bool((~restarting & ~terminated).any())
        restart_steps += bool(restarting.any())
        ending_steps += bool(terminated.any())
        expected_tokens += int((~restarting & ~terminated).sum())  # generated tokens that the next step needs
        expected_tokens += sum(len(q) for q, r in zip(envs._episodes.queries, restarting) if r)
        restarting = terminated
    assert calls["policy"] == calls["reference"] == 1 + decode_steps + restart_steps
    assert tokens["policy"] == tokens["reference"] == expected_tokens  # nothing is computed twice
    assert calls["reward"] == ending_steps


@pytest.mark.parametrize(
    "actions",
    [np.array([1, 2]), np.array([1.0, 2.0, 3.0]), np.array([-1, 2, 3]), np.array([1, 2, 10**6]), None, "123",
     [[1], [2], [3]], np.array([True, False, True])],
    ids=["short", "float", "negative", "too-large", "None", "str", "nested", "bool"],
)
def test_invalid_actions_are_named_and_change_nothing(actions):
    envs = RLHFVectorEnv(num_envs=3)
    obs, _ = envs.reset(seed=0)
    before = envs.next_token_logprobs
    with pytest.raises(InvalidAction):
        envs.step(actions)
    assert np.array_equal(envs._observations()["input_ids"], obs["input_ids"])
    assert np.array_equal(envs.next_token_logprobs, before)


def test_step_before_reset_and_bad_reset_options():
    envs = RLHFVectorEnv(num_envs=2)
    with pytest.raises(ResetNeeded):
        envs.step(np.array([1, 2]))
    with pytest.raises(ValueError, match="unknown reset options"):
        envs.reset(options={"temperature": 2})
    with pytest.raises(ValueError, match="expected 2 seeds"):
        envs.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="num_envs"):
        RLHFVectorEnv(num_envs=0)


def test_bfloat16_models_give_finite_rewards_and_zero_kl_when_policy_is_reference():
    envs = RLHFVectorEnv(num_envs=4, dtype=torch.bfloat16)
    assert envs.policy.dtype == envs.reference.dtype == torch.bfloat16
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(40):
        _, rewards, terminated, _, infos = envs.step(sample_actions(envs.next_token_logprobs, rng))
        assert np.isfinite(rewards).all()
        if "kl" in infos:
            assert not infos["kl"][infos["_kl"]].any()  # π is a copy of π_ref: the same bf16 arithmetic
        ended += int(terminated.sum())
    assert ended >= 4


def test_reset_option_prompts_pins_one_prompt_per_row():
    envs = RLHFVectorEnv(num_envs=3)
    prompts = ["the food was", "the food was", "honestly , it is"]
    _, infos = envs.reset(seed=0, options={"prompts": prompts})
    assert list(infos["prompt"]) == prompts
    for bad in [{"prompts": prompts[:2]}, {"prompts": "the food was"}, {"prompts": prompts, "prompt": "x"}]:
        with pytest.raises(ValueError, match="prompt"):
            envs.reset(seed=0, options=bad)
