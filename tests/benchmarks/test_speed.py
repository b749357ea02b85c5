"""The speed benchmark's own side runs on its tiny world (TRL's side needs the optional `compare` extra)."""

import subprocess

import pytest

from benchmarks.speed import (
    MODEL_SIZES,
    build_tiny_world,
    ours_dpo,
    ours_grpo,
    ours_ppo,
    ours_rloo,
    side,
    trl_dpo,
    trl_grpo,
    trl_rloo,
)


def test_ours_rloo_times_updates_of_the_stated_work(tmp_path):
    world = build_tiny_world(tmp_path)
    assert 450_000 < world.pop("parameters") < 500_000  # the 0.48M-parameter GPT-2 of the peers
    result = ours_rloo(world, prompts=2, k=4, length=8, updates=2, warmup=1)
    assert result["updates_timed"] == 2 and result["seconds_per_update"] > 0
    assert 1 <= result["mean_response_tokens"] <= 8
    phases = result["phases"]  # where the time goes: each phase measured, none negative
    assert set(phases) == {"rollout: decoding π and π_ref, KL, env", "reward model", "rest"}
    assert all(seconds > 0 for seconds in phases.values())
    dpo = ours_dpo(world, pairs=4, updates=2, warmup=1)
    assert dpo["steps_timed"] == 2 and dpo["pairs_per_s"] > 0
    ppo = ours_ppo(world, prompts=2, k=4, length=8, updates=2, warmup=1, epochs=1, minibatch=8)
    assert ppo["updates_timed"] == 2 and 1 <= ppo["mean_response_tokens"] <= 8
    grpo = ours_grpo(world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert grpo["updates_timed"] == 1 and grpo["tokens_per_s"] > 0


def test_each_side_runs_alone_and_reports_its_peak_memory(tmp_path):
    world = build_tiny_world(tmp_path)
    world.pop("parameters")
    result = side("ours_rloo", world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert result["updates_timed"] == 1 and 100 < result["peak_rss_mib"] < 10_000
    with pytest.raises(subprocess.CalledProcessError):  # the child refuses a name that is not a side
        side("build_tiny_world", world)


def test_scaling_worlds_have_the_stated_sizes(tmp_path):
    sizes = {name: build_tiny_world(tmp_path / name, n_prompts=50, shape=shape)["parameters"]
             for name, shape in MODEL_SIZES.items()}
    assert 0.4e6 < sizes["0.5M"] < 0.6e6 and 3e6 < sizes["4M"] < 5e6 and 25e6 < sizes["30M"] < 35e6


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16 calls transformers' deprecated checkpointing API
def test_trl_rloo_runs_on_the_same_world(tmp_path):
    pytest.importorskip("trl")
    world = build_tiny_world(tmp_path)
    world.pop("parameters")
    result = trl_rloo(world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert result["updates_timed"] == 1 and 1 <= result["mean_response_tokens"] <= 8
    assert set(result["phases"]) == {"generate", "reward model", "rest"}
    assert all(seconds > 0 for seconds in result["phases"].values())
    grpo = trl_grpo(world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert grpo["updates_timed"] == 1 and 1 <= grpo["mean_response_tokens"] <= 8
    dpo = trl_dpo(world, pairs=4, updates=1, warmup=1)
    assert dpo["steps_timed"] == 1 and dpo["seconds_per_step"] > 0


def test_alternating_rounds_pool_every_timed_update_per_side(monkeypatch):
    import benchmarks.speed as speed

    order = []

    def fake_side(name, world, **work):  # each run times 2 updates; TRL's side twice as slow as ours
        order.append(name)
        scale = 2.0 if name.startswith("trl") else 1.0
        seconds = [scale * (len(order) + i / 10) for i in range(2)]
        return dict(speed._summary(seconds, [8.0, 8.0], 8), peak_rss_mib=100.0 * len(order))

    monkeypatch.setattr(speed, "side", fake_side)
    ours, theirs = speed.alternate(["ours_rloo", "trl_rloo"], {}, rounds=3, prompts=2, k=4, length=8)
    assert order == ["ours_rloo", "trl_rloo"] * 3  # in turn, so drift reaches both sides alike
    assert ours["updates_timed"] == theirs["updates_timed"] == 6
    assert ours["run_medians"] == [1.05, 3.05, 5.05] and theirs["run_medians"] == [4.1, 8.1, 12.1]
    assert ours["seconds_per_update"] == 3.05 and ours["peak_rss_mib"] == 500.0  # median of 6; largest peak
    row = speed._versus(ours, theirs, "work")
    assert row["speedup"] == round(theirs["seconds_per_update"] / 3.05, 2)
    assert row["speedup_per_round"] == [round(4.1 / 1.05, 2), round(8.1 / 3.05, 2), round(12.1 / 5.05, 2)]


def test_phases_time_wrapped_calls_per_update_and_take_nested_ones_out():
    import types

    from benchmarks.speed import Phases

    clock = {"now": 0.0}

    def advance(seconds):
        clock["now"] += seconds

    phases = Phases()
    owner = types.SimpleNamespace(outer=lambda: (advance(1.0), owner.inner()), inner=lambda: advance(0.25))
    import benchmarks.speed as speed

    real = speed.time.perf_counter
    speed.time.perf_counter = lambda: clock["now"]
    try:
        phases.wrap(owner, "inner", "inner")
        phases.wrap(owner, "outer", "outer")
        for _ in range(3):
            owner.outer()
            phases.end_update(2.0, {"inner": "outer"})
    finally:
        speed.time.perf_counter = real
    assert phases.summary(skip=1) == {"outer": 1.0, "inner": 0.25, "rest": 0.75}


def test_scaling_points_alternate_the_sides_for_every_round(monkeypatch, tmp_path):
    import benchmarks.speed as speed

    order = []

    def fake_side(name, world, **work):
        order.append((name, work["length"]))
        return dict(speed._summary([1.0], [8.0], 32), peak_rss_mib=1.0, phases={"rest": 1.0})

    monkeypatch.setattr(speed, "side", fake_side)
    monkeypatch.setattr(speed, "build_tiny_world", lambda directory, **kwargs: {"parameters": 1})
    out = speed.scaling(tmp_path, updates=1, warmup=1, rounds=2)
    assert order[:4] == [("ours_rloo", 16), ("trl_rloo", 16)] * 2
    assert len(order) == 2 * 2 * (len(speed.SCALING_LENGTHS) + len(speed.MODEL_SIZES))
    assert out["response_length"][0]["ours"]["run_medians"] == [1.0, 1.0]
    assert out["response_length"][0]["ours"]["phases"] == {"rest": 1.0}
