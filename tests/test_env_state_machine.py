"""Hypothesis drives both envs through random mixes of resets, valid and invalid steps, steps after the end,
pickling and closing, and checks the invariants after every rule."""

import pickle

import numpy as np
import pytest
import torch
from gymnasium.error import InvalidAction, ResetNeeded
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rlhf_env.assets import asset_dir, load_assets
from rlhf_env.env import RLHFEnv
from rlhf_env.models import load_causal_lm
from rlhf_env.vector_env import RLHFVectorEnv

MAX_NEW_TOKENS = 5  # short episodes, so that ends, steps after the end and restarts come up often
INVALID_ACTIONS = [-1, 10**6, 2**63 - 1, 3.0, "3", None, [3], np.array([3]), torch.tensor(3), True]
_MODELS = {}


def world_kwargs() -> dict:
    """The shipped models, loaded once per test session; each env gets its own (cheap) world around them."""
    if not _MODELS:
        tokenizer, policy, reward_model = load_assets(asset_dir("sentiment"))
        _MODELS.update(tokenizer=tokenizer, policy=policy, reward_model=reward_model,
                       reference=load_causal_lm(asset_dir("sentiment") / "policy"))
    return dict(_MODELS, max_new_tokens=MAX_NEW_TOKENS, missing_eos_penalty=0.5)


def check_reward_parts(reward, terminated, info, penalty=0.5):
    """The reward is −β·KL_t, plus the score (less the missing-EOS penalty) on the last step."""
    assert np.isfinite(reward)
    expected = -info["beta"] * info["kl"]
    if terminated:
        expected += info["score"] - (0.0 if info["finished"] else penalty)
    assert reward == pytest.approx(expected, abs=1e-9)


class SingleEnvMachine(RuleBasedStateMachine):
    @initialize()
    def make_env(self):
        self.env = RLHFEnv(**world_kwargs())
        self.active, self.length, self.prompt_tokens, self.obs = False, 0, 0, None

    def _snapshot(self):
        batch = self.env._episodes
        return batch.observation(0), list(batch.responses[0]), bool(batch.active[0])

    @rule(seed=st.none() | st.integers(0, 2**31), split=st.sampled_from([None, "train", "eval"]))
    def reset(self, seed, split):
        self.obs, info = self.env.reset(seed=seed, options=None if split is None else {"split": split})
        self.active, self.length, self.prompt_tokens = True, 0, info["prompt_tokens"]

    @precondition(lambda self: self.active)
    @rule(token=st.integers(0, 135) | st.just(2))  # 2 = EOS: ends episodes early
    def step_valid(self, token):
        self.obs, reward, terminated, truncated, info = self.env.step(token)
        self.length += 1
        assert truncated is False
        assert terminated == (token == self.env.world.eos_token_id or self.length == MAX_NEW_TOKENS)
        check_reward_parts(reward, terminated, info)
        self.active = not terminated

    @precondition(lambda self: self.active)
    @rule(action=st.sampled_from(INVALID_ACTIONS))
    def step_invalid(self, action):
        before = self._snapshot()
        with pytest.raises(InvalidAction):
            self.env.step(action)
        after = self._snapshot()
        assert before[1:] == after[1:] and all(np.array_equal(before[0][k], after[0][k]) for k in before[0])

    @precondition(lambda self: not self.active)
    @rule(token=st.integers(0, 135))
    def step_without_episode(self, token):
        with pytest.raises(ResetNeeded):
            self.env.step(token)

    @rule()
    def pickle_round_trip(self):
        clone = pickle.loads(pickle.dumps(self.env))
        if self.active:
            assert np.array_equal(clone.next_token_logprobs, self.env.next_token_logprobs)
        self.env = clone

    @rule()
    def close(self):
        self.env.close()
        self.active = False

    @invariant()
    def observation_is_consistent(self):
        if self.obs is None:
            return
        assert self.env.observation_space.contains(self.obs)
        if self.active:
            assert int(self.obs["attention_mask"].sum()) == self.prompt_tokens + self.length
            assert len(self.env._episodes.responses[0]) == self.length


class VectorEnvMachine(RuleBasedStateMachine):
    """The same invariants per row, with NEXT_STEP autoreset: a row that ended restarts on the next step."""

    num_envs = 3

    @initialize()
    def make_env(self):
        self.env = RLHFVectorEnv(num_envs=self.num_envs, **world_kwargs())
        self.started, self.obs = False, None
        self.lengths = np.zeros(self.num_envs, dtype=int)
        self.restarting = np.zeros(self.num_envs, dtype=bool)
        self.prompt_tokens = np.zeros(self.num_envs, dtype=int)

    @rule(seed=st.none() | st.integers(0, 2**31))
    def reset(self, seed):
        self.obs, infos = self.env.reset(seed=seed)
        self.started = True
        self.lengths[:], self.restarting[:] = 0, False
        self.prompt_tokens = infos["prompt_tokens"].copy()

    @precondition(lambda self: self.started)
    @rule(tokens=st.lists(st.integers(0, 135) | st.just(2), min_size=3, max_size=3))
    def step_valid(self, tokens):
        self.obs, rewards, terminated, truncated, infos = self.env.step(np.array(tokens))
        assert not truncated.any() and np.isfinite(rewards).all()
        for row in range(self.num_envs):
            if self.restarting[row]:  # this step started the row's next episode: no reward, no token
                assert rewards[row] == 0.0 and not terminated[row] and infos["_prompt"][row]
                self.lengths[row] = 0
                self.prompt_tokens[row] = len(self.env._episodes.queries[row])
                continue
            self.lengths[row] += 1
            info = {key: infos[key][row] for key in ("beta", "kl", "score", "finished") if infos.get(f"_{key}",
                                                                                                 [False] * 3)[row]}
            check_reward_parts(rewards[row], terminated[row], info)
        self.restarting = terminated.copy()

    @precondition(lambda self: self.started)
    @rule(actions=st.sampled_from([np.array([1, 2]), np.array([1.0, 2.0, 3.0]), np.array([-1, 2, 3]), None, "123",
                                   np.array([4, 5, 10**6])]))
    def step_invalid(self, actions):
        before = self.env._episodes.observation(), [list(r) for r in self.env._episodes.responses]
        with pytest.raises(InvalidAction):
            self.env.step(actions)
        after = self.env._episodes.observation(), [list(r) for r in self.env._episodes.responses]
        assert before[1] == after[1] and all(np.array_equal(before[0][k], after[0][k]) for k in before[0])

    @precondition(lambda self: not self.started)
    @rule()
    def step_before_reset(self):
        with pytest.raises(ResetNeeded):
            self.env.step(np.zeros(self.num_envs, dtype=np.int64))

    @rule()
    def pickle_round_trip(self):
        self.env = pickle.loads(pickle.dumps(self.env))

    @rule()
    def close(self):
        self.env.close()
        self.started = False

    @invariant()
    def observations_are_consistent(self):
        if self.obs is None:
            return
        assert self.env.observation_space.contains(self.obs)
        if self.started:
            assert np.array_equal(self.obs["attention_mask"].sum(1), self.prompt_tokens + self.lengths)


SETTINGS = settings(max_examples=25, stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestSingleEnvMachine = SingleEnvMachine.TestCase
TestSingleEnvMachine.settings = SETTINGS
TestVectorEnvMachine = VectorEnvMachine.TestCase
TestVectorEnvMachine.settings = SETTINGS
