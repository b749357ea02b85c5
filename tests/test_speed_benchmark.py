"""The speed benchmark's own side runs on its tiny world (TRL's side needs the optional `compare` extra)."""

import pytest

from benchmarks.speed import build_tiny_world, ours_dpo, ours_ppo, ours_rloo, trl_dpo, trl_rloo


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


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16 calls transformers' deprecated checkpointing API
def test_trl_rloo_runs_on_the_same_world(tmp_path):
    pytest.importorskip("trl")
    world = build_tiny_world(tmp_path)
    world.pop("parameters")
    result = trl_rloo(world, prompts=2, k=4, length=8, updates=1, warmup=1)
    assert result["updates_timed"] == 1 and 1 <= result["mean_response_tokens"] <= 8
    dpo = trl_dpo(world, pairs=4, updates=1, warmup=1)
    assert dpo["steps_timed"] == 1 and dpo["seconds_per_step"] > 0
