"""The run monitor names each failure mode on a synthetic history, and stays quiet on a healthy one."""

import numpy as np
import pytest
import torch

from agents.checkpoint import load_training_state, save_training_state
from agents.metrics import MetricsLogger, diagnose, read_history


def history(n=16, **series):
    """A healthy run (score and gold rising together, KL moderate), with some series replaced."""
    t = np.linspace(0, 1, n)
    base = {"objective/score": 0.5 * t, "objective/gold_score": 0.4 * t, "objective/kl": 2 * t,
            "policy/entropy": 2.5 - 0.5 * t, "episode/well_formed": 0.97 + 0 * t, "loss/value": 0.1 - 0.05 * t}
    base.update(series)
    return [{key: float(values[i]) for key, values in base.items()} for i in range(n)]


@pytest.mark.parametrize("series, flag", [
    ({"objective/kl": np.linspace(0, 12, 16)}, "KL climbing"),
    ({"policy/entropy": np.linspace(2.5, 0.2, 16)}, "entropy collapse"),
    ({"objective/gold_score": np.linspace(0.3, 0.1, 16)}, "reward hacking"),
    ({"episode/well_formed": np.linspace(0.97, 0.85, 16)}, "grammar falling"),
    ({"loss/value": np.array([0.05, 0.5] * 8)}, "value loss oscillating"),
    ({"objective/score": np.zeros(16), "objective/gold_score": np.zeros(16), "objective/kl": np.zeros(16)},
     "nothing moving"),
])
def test_each_failure_mode_is_flagged(series, flag):
    flags = diagnose(history(**series))
    assert any(f.startswith(flag) for f in flags), flags


def test_a_healthy_run_raises_no_flag():
    assert diagnose(history()) == []


def test_logger_writes_jsonl_that_reads_back(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for row in history(3):
        logger.log(row)
    logger.close()
    assert read_history(tmp_path / "metrics.jsonl") == history(3)


def test_training_state_round_trips_optimizer_and_rngs(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.tensor([1.0, -2.0, 3.0])
    optimizer.step()
    rng, generator = np.random.default_rng(5), torch.Generator().manual_seed(5)
    rng.random(), torch.rand(2, generator=generator)
    save_training_state(tmp_path, optimizer, rng, generator, {"counter": 7})
    expected = (rng.random(), torch.rand(2, generator=generator), optimizer.state_dict()["state"][0]["exp_avg"])
    new_optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.5)
    rng2, generator2 = np.random.default_rng(0), torch.Generator().manual_seed(0)
    state = load_training_state(tmp_path, new_optimizer, rng2, generator2)
    assert state == {"counter": 7}
    assert rng2.random() == expected[0] and torch.equal(torch.rand(2, generator=generator2), expected[1])
    assert torch.equal(new_optimizer.state_dict()["state"][0]["exp_avg"], expected[2])
    assert new_optimizer.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_training_state(tmp_path / "missing", new_optimizer, rng2, generator2)


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional dependency)."""

    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        self.closed = True


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    logger = MetricsLogger(tmp_path)
    logger.log({"time/timesteps": 64, "objective/kl": 1.5, "loss/value": float("nan"), "note": "text"})
    logger.close()
    writer = FakeSummaryWriter.instances[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [("time/timesteps", 64, 64), ("objective/kl", 1.5, 64)]  # NaN and text skipped


def test_real_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    logger = MetricsLogger(tmp_path)
    logger.log({"time/timesteps": 1, "objective/kl": 0.5})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
