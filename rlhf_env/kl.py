"""KL estimators and the KL coefficient controllers.

With ``d = log π(a|s) − log π_ref(a|s)`` for the sampled token:

* ``k1 = d``: unbiased for KL(π‖π_ref) per token, can be negative on a single sample. Summed over an episode it is
  exactly ``log π(y|x) − log π_ref(y|x)``, so Σ_t r_t = R − β·log(π(y|x)/π_ref(y|x)) (`rlhf_env.reward`).
* ``k3 = exp(−d) − 1 + d``: unbiased too, never negative, lower variance when π ≈ π_ref (Schulman, "Approximating
  KL divergence", 2020).

The adaptive controller is Ziegler et al. (2019), §2.2: β ← β·(1 + K·clip((KL − target)/target, −0.2, 0.2)), with
``K = n_steps / horizon``. It moves once per **batch** of finished episodes: KL is the batch's mean episode KL (the
policy's KL, whose error the paper clips, not each episode's) and ``n_steps`` the number of episodes in the batch,
so that over ``horizon`` episodes off target β moves by about e^{±0.2}. The envs feed it one batch per
``kl_batch_episodes`` finished episodes; the agents here, one batch per rollout (`rlhf_env.env.RLHFWorld.update_beta`).
Its state belongs in every checkpoint.
"""

from __future__ import annotations

import math

import numpy as np

KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logprob: float | np.ndarray, ref_logprob: float | np.ndarray, estimator: str = "k1"):
    """Per-token KL estimate from the sampled token's log-probs under π and π_ref."""
    d = np.asarray(logprob, dtype=np.float64) - np.asarray(ref_logprob, dtype=np.float64)
    if estimator == "k1":
        out = d
    elif estimator == "k3":
        out = np.expm1(-d) + d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    return float(out) if out.ndim == 0 else out


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float):
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, kl: float, n_steps: int) -> None:
        """A fixed β ignores the observed KL."""

    def state_dict(self) -> dict:
        return {"kind": "fixed", "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller that steers the episode KL towards `target`."""

    def __init__(self, beta: float, target: float, horizon: int = 10000):
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"the initial beta must be a finite number > 0, got {beta}")
        if not (target > 0 and math.isfinite(target)):
            raise ValueError(f"the KL target must be a finite number > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"the horizon must be > 0, got {horizon}")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move β once for a batch of `n_steps` episodes whose mean episode KL is `kl` (nats; +inf counts as far
        above target).

        `ValueError`, with β unchanged, for a NaN `kl` or a batch longer than the horizon: β moves by up to
        ±0.2·n_steps/horizon at once, more than 20% beyond it (and at n_steps > 5·horizon it would turn negative).
        """
        if math.isnan(kl):
            raise ValueError("the batch's mean KL is NaN: β cannot follow it")
        if not 0 < n_steps <= self.horizon:
            raise ValueError(f"a KL-controller batch of {n_steps} episodes must be ≥ 1 and ≤ the horizon "
                             f"({self.horizon})")
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.beta *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = float(state["beta"]), float(state["target"]), int(state["horizon"])
