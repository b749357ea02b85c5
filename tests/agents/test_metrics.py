"""The run monitor names each failure mode on a synthetic history, and stays quiet on a healthy one."""

import numpy as np
import pytest

from agents.metrics import MetricsLogger, diagnose, read_history
from rlhf_env.files import FolderInUse


def history(n=16, **series):
    """A healthy run (score and gold rising together, KL moderate), with some series replaced."""
    t = np.linspace(0, 1, n)
    base = {"objective/score": 0.5 * t, "objective/gold_score": 0.4 * t, "objective/kl": 2 * t,
            "policy/entropy": 2.5 - 0.5 * t, "episode/well_formed": 0.97 + 0 * t, "loss/value": 0.1 - 0.05 * t,
            "objective/gold_agreement": 0.85 - 0.05 * t}
    base.update(series)
    return [{key: float(values[i]) for key, values in base.items()} for i in range(n)]


@pytest.mark.parametrize("series, flag", [
    ({"objective/kl": np.linspace(0, 12, 16)}, "KL climbing"),
    ({"policy/entropy": np.linspace(2.5, 0.2, 16)}, "entropy collapse"),
    ({"objective/gold_score": np.linspace(0.3, 0.1, 16)}, "reward hacking"),
    ({"objective/gold_agreement": np.linspace(0.85, 0.6, 16)}, "reward drifting from gold"),
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


def test_updates_without_gold_agreement_are_left_out_of_the_diagnosis():
    """NaN (a batch whose gold all ties) is no measurement: a run with a few of them is not flagged for them."""
    agreement = np.full(16, 0.8)
    agreement[12:14] = np.nan
    assert diagnose(history(**{"objective/gold_agreement": agreement})) == []


def test_gold_agreement_counts_pairs_ordered_as_gold_and_ties_as_half():
    """Hand-computed: gold 0, 1, 1, 2 gives the 5 pairs that differ on gold (the pair (1, 2) ties and is left out);
    scores 0, 2, 1, 1 order (0,1) (0,2) (0,3) right, (1,3) wrong, and tie on (2,3): (3 + ½) / 5."""
    from agents.rollout import gold_agreement

    assert gold_agreement(np.array([0.0, 2.0, 1.0, 1.0]), np.array([0.0, 1.0, 1.0, 2.0])) == pytest.approx(3.5 / 5)
    assert gold_agreement(np.array([3.0, 2.0, 1.0]), np.array([0.0, 1.0, 2.0])) == 0.0  # reversed
    assert np.isnan(gold_agreement(np.array([1.0, 2.0]), np.array([0.5, 0.5])))  # no pair differs on gold
    assert np.isnan(gold_agreement(np.array([1.0, 2.0]), np.array([0.0, np.nan])))


def test_logger_writes_jsonl_that_reads_back(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for row in history(3):
        logger.log(row)
    logger.close()
    assert read_history(tmp_path / "metrics.jsonl") == history(3)


def test_one_run_per_folder_and_a_fresh_run_never_appends_to_another(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(FolderInUse, match="in use by another run"):
        MetricsLogger(tmp_path, tensorboard=False)  # two runs on one folder would interleave their metrics
    logger.log({"time/updates": 1})
    logger.close()
    with pytest.raises(ValueError, match="already holds the metrics of a run"):
        MetricsLogger(tmp_path, tensorboard=False)
    assert read_history(tmp_path / "metrics.jsonl") == [{"time/updates": 1}]


def test_a_resumed_log_drops_the_updates_after_its_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for update in (1, 2, 3):  # the crashed run logged 3 updates; its last checkpoint was at update 2
        logger.log({"time/updates": update, "time/timesteps": 10 * update})
    del logger  # a crash: nothing closed, the lock goes with the process (here: the object)
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_at=(2, 20))
    assert [h["time/updates"] for h in resumed.history] == [1, 2]
    for update in (3, 4):
        resumed.log({"time/updates": update, "time/timesteps": 10 * update})
    resumed.close()
    assert [h["time/updates"] for h in read_history(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_torn_last_line_is_dropped_and_a_damaged_one_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"time/updates": 1}\n{"time/upd')  # killed in mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_history(path) == [{"time/updates": 1}]
    with pytest.warns(UserWarning, match="torn last line"):
        logger = MetricsLogger(tmp_path, tensorboard=False, resume_at=(1, 0))
    logger.log({"time/updates": 2})
    logger.close()
    assert read_history(path) == [{"time/updates": 1}, {"time/updates": 2}]
    path.write_text('{"time/updates": 1}\nnot json\n{"time/updates": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not JSON"):
        read_history(path)


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional dependency)."""

    instances = []

    def __init__(self, log_dir, purge_step=None):
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
