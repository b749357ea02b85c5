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
    grpo = trl_grpo(world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert grpo["updates_timed"] == 1 and 1 <= grpo["mean_response_tokens"] <= 8
    dpo = trl_dpo(world, pairs=4, updates=1, warmup=1)
    assert dpo["steps_timed"] == 1 and dpo["seconds_per_step"] > 0
