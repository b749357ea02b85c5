"""The reward arithmetic, as pure functions: −β·KL_t per token, the score (less a missing-EOS penalty) at the end,
and what a non-finite score does."""

import math

import numpy as np
import pytest
import torch

from rlhf_env.reward import NonFiniteReward, checked_score, real_score, terminal_reward, token_reward


def test_token_reward_is_minus_beta_times_the_estimated_kl():
    logprobs, ref_logprobs = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
    kl, reward = token_reward(logprobs, ref_logprobs, beta=0.2)
    assert kl.tolist() == [0.5, -1.0, 0.0] and reward.tolist() == pytest.approx([-0.1, 0.2, 0.0])
    kl3, reward3 = token_reward(logprobs, ref_logprobs, beta=0.2, estimator="k3")
    assert kl3 == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    assert reward3 == pytest.approx(-0.2 * kl3)


def test_terminal_reward_pays_the_score_and_the_missing_eos_penalty_only_without_eos():
    assert terminal_reward(0.7, finished=True, missing_eos_penalty=0.5) == (0.7, 0.7, False)
    assert terminal_reward(0.7, finished=False, missing_eos_penalty=0.5) == pytest.approx((0.2, 0.7, False))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_raises_or_is_masked_to_zero(bad):
    with pytest.raises(NonFiniteReward, match="returned .* for prompt 'p'"):
        checked_score(bad, "raise", " for prompt 'p'")
    assert checked_score(bad, "mask") == (0.0, True)
    assert terminal_reward(bad, finished=False, missing_eos_penalty=0.5, nonfinite_reward="mask") == (-0.5, 0.0, True)


@pytest.mark.parametrize("beyond", [1e39, -1e39, 3.5e38])
def test_a_score_beyond_float32_counts_as_non_finite(beyond):
    with pytest.raises(NonFiniteReward):
        checked_score(beyond, "raise")
    assert checked_score(beyond, "mask") == (0.0, True)
    assert checked_score(3e38, "raise") == (3e38, False)
    with pytest.raises(NonFiniteReward):  # each fits float32, the reward does not
        terminal_reward(-3e38, finished=False, missing_eos_penalty=3e38)


@pytest.mark.parametrize("value", [1, 0.5, np.float16(0.5), np.uint8(1), np.array(0.5), torch.tensor(0.5),
                                   torch.tensor(1, dtype=torch.int32)])
def test_real_numbers_are_scores(value):
    assert real_score(value, "reward_fn f", "p") == float(value)


@pytest.mark.parametrize("value", ["1.5", None, 1j, [1.0], (1.0,), np.array([1.0]), np.array(1j), True,
                                   np.bool_(True), torch.tensor(True), torch.tensor([1.0]), np.array("1")])
def test_anything_else_is_a_type_error_naming_the_function_and_prompt(value):
    with pytest.raises(TypeError, match=f"reward_fn f must return a real number .*{type(value).__name__}.*prompt 'p'"):
        real_score(value, "reward_fn f", "p")
