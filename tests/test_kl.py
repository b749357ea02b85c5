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
