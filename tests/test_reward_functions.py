"""Batched reward functions: one call per batch of finished episodes, the context they ask for, and named errors
for every other shape of function or result, before the step changes anything."""

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env
from agents.evaluate import best_of_n, kl_regularised_optimum
from rlhf_env.reward import REWARD_CONTEXT, NonFiniteReward, per_item


class Counting:
    """A batched reward function that records each call: the response count and the context it got."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, responses, **context):
        self.calls.append((len(prompts), sorted(context)))
        return [float(len(r.split())) for r in responses]


def eos_everywhere(envs):
    return np.full(envs.num_envs, envs.unwrapped.world.eos_token_id)


def test_the_function_is_called_once_per_batch_of_finished_episodes():
    fn = Counting()
    envs = gym.make_vec("RLHF-v0", num_envs=4, reward_fn=fn, max_new_tokens=4)
    envs.reset(seed=0)
    envs.step(np.zeros(4, dtype=np.int64) + 5)  # nobody ends
    assert fn.calls == []
    _, _, terminated, _, infos = envs.step(eos_everywhere(envs))
    assert terminated.all() and fn.calls == [(4, sorted(REWARD_CONTEXT))]  # one call, four responses
    assert infos["_score"].all()


def test_a_function_gets_only_the_context_its_signature_names():
    seen = {}

    def reward(prompts, responses, finished, response_ids):
        seen.update(finished=finished, response_ids=response_ids)
        return [1.0] * len(prompts)

    env = gym.make("RLHF-v0", reward_fn=reward)
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    env.step(7)
    env.step(eos)
    assert seen == {"finished": [True], "response_ids": [[7, eos]]}


def test_task_gold_reward_and_per_item_give_the_gold():
    task = rlhf_env.tasks.get_task("sentiment")
    prompts, responses = ["the plot was not", "the plot was"], ["bad , the cast is superb", "good good good good"]
    expected = [task.gold(p, r) for p, r in zip(prompts, responses)]
    assert task.gold_reward(prompts, responses) == expected == per_item(task.gold)(prompts, responses)
    assert "per_item" in per_item(task.gold).__qualname__


def test_task_gold_itself_is_refused_when_the_env_is_built():
    task = rlhf_env.tasks.get_task("sentiment")
    with pytest.raises(ValueError, match="task.gold_reward"):
        gym.make("RLHF-v0", reward_fn=task.gold)


@pytest.mark.parametrize("fn, error, message", [
    (lambda prompt, response: 1.0, TypeError, "per_item"),  # a per-item function passed as it is
    (lambda prompts, responses: [1.0] * (len(prompts) + 1), ValueError, "2 scores for 1 responses"),
    (lambda prompts, responses: ["1.5"] * len(prompts), TypeError, "real number"),
    (lambda prompts, responses: "1.5", TypeError, "per_item"),
    (lambda prompts, responses: np.ones((len(prompts), 1)), TypeError, "ndarray"),
])
def test_a_result_that_is_not_one_number_per_response_is_named_and_changes_nothing(fn, error, message):
    env = gym.make("RLHF-v0", reward_fn=fn)
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    before = env.unwrapped.next_token_logprobs
    with pytest.raises(error, match=message):
        env.step(eos)
    assert np.array_equal(env.unwrapped.next_token_logprobs, before)  # the episode goes on: retry the step


def test_an_error_inside_the_function_carries_a_note_on_the_convention():
    def per_item_style(prompt, response):
        return len(response.split())  # a list has no .split

    env = gym.make("RLHF-v0", reward_fn=per_item_style)
    env.reset(seed=0)
    with pytest.raises(AttributeError) as raised:
        env.step(env.unwrapped.tokenizer.eos_token_id)
    assert any("per_item" in note for note in raised.value.__notes__)


def test_nan_from_a_batched_function_follows_nonfinite_reward():
    fn = lambda prompts, responses: [float("nan")] * len(prompts)  # noqa: E731
    env = gym.make("RLHF-v0", reward_fn=fn)
    env.reset(seed=0)
    with pytest.raises(NonFiniteReward):
        env.step(env.unwrapped.tokenizer.eos_token_id)
    masked = gym.make("RLHF-v0", reward_fn=fn, nonfinite_reward="mask")
    masked.reset(seed=0)
    *_, info = masked.step(masked.unwrapped.tokenizer.eos_token_id)
    assert info["score_nonfinite"] and info["score"] == 0.0


def test_evaluation_calls_a_batched_function_once_per_batch():
    fn = Counting()
    envs = gym.make_vec("RLHF-v0", num_envs=4, reward_fn=fn, max_new_tokens=4)
    best_of_n(envs, 4, 8, seed=0)
    assert [n for n, _ in fn.calls] == [32]  # 8 prompts × 4 samples, one call
    optimum_fn = Counting()
    kl_regularised_optimum(envs, optimum_fn, beta=0.1, n_prompts=3, n_samples=4)
    assert [n for n, _ in optimum_fn.calls] == [4, 4, 4]  # one call per prompt's samples
