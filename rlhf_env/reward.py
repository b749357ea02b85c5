"""The RLHF reward, paid token by token (Ziegler et al. 2019; Ouyang et al. 2022): two pure functions.

Every token pays ``r_t = −β·KL_t`` (`token_reward`); the last token adds the score of the whole response, less a
penalty when the token cap cut it off before EOS (`terminal_reward`). So Σ_t r_t = R(x, y) − β·Σ_t KL_t, and with
the k1 estimator Σ_t KL_t = log π(y|x) − log π_ref(y|x). A NaN/±inf score is refused (`NonFiniteReward`) or, with
``nonfinite_reward="mask"``, paid as 0.0 and flagged so that no agent takes it for data.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf_env.kl import kl_estimate

NONFINITE_POLICIES = ("raise", "mask")


class NonFiniteReward(ValueError):
    """The reward model or reward function returned NaN or ±inf."""


def token_reward(logprobs: np.ndarray, ref_logprobs: np.ndarray, beta: float,
                 estimator: str = "k1") -> tuple[np.ndarray, np.ndarray]:
    """``(kl, reward)`` of tokens: KL_t by `estimator` from log π and log π_ref of each token (arrays ``(N,)``,
    nats) and r_t = −β·KL_t. Both ``(N,)`` float64.

    >>> kl, reward = token_reward(np.array([-1.0, -2.0]), np.array([-1.5, -2.0]), beta=0.1)
    >>> kl.tolist(), reward.tolist()
    ([0.5, 0.0], [-0.05, -0.0])
    """
    kl = np.asarray(kl_estimate(np.asarray(logprobs, np.float64), np.asarray(ref_logprobs, np.float64), estimator))
    return kl, -beta * kl


def checked_score(score: float, nonfinite_reward: str = "raise", context: str = "") -> tuple[float, bool]:
    """``(score, False)`` for a finite score. For NaN/±inf: `NonFiniteReward` (``nonfinite_reward="raise"``,
    `context` appended to its message) or ``(0.0, True)`` (``"mask"``: the flag says the score is not data)."""
    if math.isfinite(score):
        return float(score), False
    if nonfinite_reward == "raise":
        raise NonFiniteReward(f"the reward returned {score}{context}")
    return 0.0, True


def terminal_reward(score: float, finished: bool, missing_eos_penalty: float = 0.0, nonfinite_reward: str = "raise",
                    context: str = "") -> tuple[float, float, bool]:
    """What the last token of an episode adds to its −β·KL: ``(reward, score, masked)``, where ``reward`` is the
    score (`checked_score`) less `missing_eos_penalty` unless the response ended with EOS (`finished`).

    >>> terminal_reward(0.8, finished=False, missing_eos_penalty=0.5)
    (0.30000000000000004, 0.8, False)
    >>> terminal_reward(float("nan"), finished=True, nonfinite_reward="mask")
    (0.0, 0.0, True)
    """
    score, masked = checked_score(score, nonfinite_reward, context)
    return score - (0.0 if finished else missing_eos_penalty), score, masked
