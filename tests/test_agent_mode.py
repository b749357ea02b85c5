"""kl_mode="agent": the env asks the acting agent for log π(a|s), so the KL is exact for a policy it does not hold;
and the vector env's SAME_STEP autoreset (SB3's convention)."""

import numpy as np
import pytest
from gymnasium.error import ResetNeeded

from rlhf_env.agent import Agent, RandomAgent
from rlhf_env.env import RLHFEnv
from rlhf_env.lm import pad_left, pad_right, response_logprobs
from rlhf_env.vector_env import RLHFVectorEnv


class TableAgent:
    """A fixed state-independent policy with uneven probabilities (so log π differs per token)."""

    def __init__(self, vocab_size: int, seed: int = 0):
        logits = np.random.default_rng(seed).normal(size=vocab_size) * 2
        self.logp = logits - np.log(np.exp(logits).sum())
        self.rng = np.random.default_rng(seed + 1)
        self.calls = 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        rows = np.asarray(observation["input_ids"]).reshape(-1, np.shape(observation["input_ids"])[-1]).shape[0]
        return self.rng.choice(len(self.logp), size=rows, p=np.exp(self.logp)), None

    def action_logprobs(self, observations, actions):
        self.calls += 1
        assert observations["input_ids"].ndim == 2 and len(actions) == observations["input_ids"].shape[0]
        return self.logp[actions]


def reference_logprob(env, prompt_ids, response):
    """log π_ref(y|x) by one full forward of the reference, independent of the env's cached decoding."""
    world = env.world
    q, qm = pad_left([prompt_ids], world.pad_token_id)
    r, rm = pad_right([response], world.pad_token_id)
    return float(response_logprobs(world.reference, q, qm, r, rm).sum())


def test_agent_mode_kl_sums_to_the_agents_sequence_log_ratio(reference_logprob):
    env = RLHFEnv(kl_mode="agent", beta=0.2)
    agent = TableAgent(env.world.vocab_size)
    env.attach_agent(agent)
    assert env.policy is None and env._episodes.decoder.models == [env.reference]  # no policy forward in the env
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        query = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
        done, rewards, logp_agent, response = False, 0.0, 0.0, []
        while not done:
            action = int(agent.predict(obs)[0][0])
            obs, reward, done, _, step_info = env.step(action)
            rewards += reward
            logp_agent += agent.logp[action]
            response.append(action)
            assert step_info["logprob"] == pytest.approx(agent.logp[action])
        expected = logp_agent - reference_logprob(env, query, response)
        assert step_info["kl_sum"] == pytest.approx(expected, abs=1e-4)
        assert rewards == pytest.approx(step_info["score"] - 0.2 * expected, abs=1e-4)


def test_agent_mode_vector_env_matches_the_single_env():
    single = RLHFEnv(kl_mode="agent")
    envs = RLHFVectorEnv(num_envs=1, kl_mode="agent")
    single.attach_agent(TableAgent(single.world.vocab_size))
    envs.attach_agent(TableAgent(single.world.vocab_size))
    single.reset(seed=7)
    envs.reset(seed=7)
    actions = np.random.default_rng(0).integers(4, single.world.vocab_size, 5)
    for action in actions:
        _, reward, _, _, info = single.step(int(action))
        _, rewards, _, _, infos = envs.step(np.array([action]))
        assert rewards[0] == pytest.approx(reward, abs=1e-5)
        assert infos["logprob"][0] == info["logprob"]


def test_agent_mode_errors_come_before_any_change():
    env = RLHFEnv(kl_mode="agent")
    obs, _ = env.reset(seed=0)
    with pytest.raises(RuntimeError, match="attach_agent"):
        env.step(5)  # no agent attached yet
    with pytest.raises(TypeError, match="action_logprobs"):
        env.attach_agent(object())
    with pytest.raises(ValueError, match="kl_mode='agent'"):
        RLHFEnv().attach_agent(RandomAgent(10))

    class Bad(RandomAgent):
        def __init__(self, out):
            super().__init__(10)
            self.out = out

        def action_logprobs(self, observations, actions):
            return self.out

    for out, message in ((np.array([np.nan]), "finite"), (np.array([0.5]), "<= 0"), (np.zeros(2), "shape")):
        env.attach_agent(Bad(out))
        with pytest.raises(ValueError, match=message):
            env.step(5)
        after = env._episodes.observation(0)
        assert np.array_equal(after["input_ids"], obs["input_ids"]) and env._episodes.responses[0] == []
    env.attach_agent(RandomAgent(env.world.vocab_size))
    env.step(5)  # the env still works after the rejected calls
    with pytest.raises(ValueError, match="no acting policy"):
        RLHFEnv(kl_mode="agent", policy=env.reference)


def test_random_agent_pays_exactly_minus_log_v_for_its_half():
    env = RLHFEnv(kl_mode="agent", beta=1.0)
    agent = RandomAgent(env.world.vocab_size, seed=0)
    assert isinstance(agent, Agent) and isinstance(TableAgent(3), Agent)
    env.attach_agent(agent)
    obs, _ = env.reset(seed=0)
    _, reward, _, _, info = env.step(agent.predict(obs)[0])
    assert info["logprob"] == pytest.approx(-np.log(env.world.vocab_size))
    assert info["kl"] == pytest.approx(info["logprob"] - info["ref_logprob"])
    assert agent.predict({"input_ids": np.zeros((3, 5))})[0].shape == (3,)


def _greedy_episodes(autoreset_mode, per_row):
    """(prompt, response, score) of each row's first finished episodes, acting greedily under π."""
    envs = RLHFVectorEnv(num_envs=2, autoreset_mode=autoreset_mode, max_new_tokens=6)
    _, infos = envs.reset(seed=3)
    prompts, done = list(infos["prompt"]), [[], []]
    while min(len(d) for d in done) < per_row:
        obs, _, terminated, _, infos = envs.step(envs.next_token_logprobs.argmax(axis=1))
        ended = infos.get("final_info", infos)
        for row in np.flatnonzero(terminated):
            done[row].append((prompts[row], ended["response_text"][row], round(float(ended["score"][row]), 5)))
            if autoreset_mode == "SameStep":
                assert infos["final_obs"][row]["attention_mask"].sum() > obs["attention_mask"][row].sum()
                assert obs["attention_mask"][row, envs.world.max_prompt_tokens:].sum() == 0  # a fresh episode
                prompts[row] = infos["prompt"][row]
        if autoreset_mode == "NextStep":
            for row in np.flatnonzero(infos.get("_prompt", [])):
                prompts[row] = infos["prompt"][row]
    return [d[:per_row] for d in done]


def test_same_step_autoreset_gives_the_same_episodes_as_next_step():
    same, nxt = _greedy_episodes("SameStep", 3), _greedy_episodes("NextStep", 3)
    assert same == nxt
    assert RLHFVectorEnv(num_envs=1, autoreset_mode="SameStep").metadata["autoreset_mode"].value == "SameStep"
    with pytest.raises(ValueError, match="autoreset_mode"):
        RLHFVectorEnv(num_envs=1, autoreset_mode="Disabled")
    with pytest.raises(ResetNeeded):
        RLHFVectorEnv(num_envs=1, autoreset_mode="SameStep").step(np.array([1]))


def test_evaluate_agent_leaves_masked_scores_out_and_never_moves_beta():
    from rlhf_env.agent import evaluate_agent

    def odd_words_nan(prompts, responses):
        return [float("nan") if len(response.split()) % 2 else 1.0 for response in responses]

    envs = RLHFVectorEnv(num_envs=4, kl_mode="agent", max_new_tokens=6, reward_fn=odd_words_nan,
                         nonfinite_reward="mask", beta=0.1, kl_target=0.01, kl_horizon=10, kl_batch_episodes=4)
    stats = evaluate_agent(envs, RandomAgent(envs.single_action_space.n, seed=0), episodes=16)
    assert 0 < stats["score_masked"] < 16 and stats["score"] == 1.0
    assert envs.beta == 0.1  # 16 evaluation episodes far off the KL target, and β has not moved
