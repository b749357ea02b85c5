"""Data-parallel agents on torch.distributed (`agents.distributed`), on 2 gloo processes of one thread each
(`distributed_worker.py`, started here with a free port and a timeout, so a hang fails instead of blocking).

The update of 2 ranks × B/2 episodes equals the update of 1 process × B on the same episodes of unequal lengths:
the gradient of every optimizer step (after the all-reduce and the clip on the global norm) and the parameters
after the update, for PPO (minibatches drawn over the whole batch, gradient accumulation, whitened rewards and
advantages, entropy, ptx), REINFORCE (RLOO, group norm, a value baseline, a LoRA policy; the moving average;
several clipped steps with batch whitening, a token mean and a KL loss term; GSPO's sequence ratio) and DPO, with
rank 1's policy perturbed before the agent is built (it starts from rank 0's). Real rollouts keep β and the
parameters identical on both ranks, β following the whole batch's KL, while the ranks sample different prompts. A
2-rank run saved, stopped and resumed equals the uninterrupted 2-rank run; another number of processes is refused.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import distributed_worker as worker
import gymnasium as gym
import numpy as np
import pytest
import torch
from distributed_worker import ROOT, launch

from agents.common import seeded_generators
from agents.distributed import SINGLE, Ranks, RanksDisagree, WorldSizeMismatch, rank_generators
from agents.reinforce import Reinforce, ReinforceConfig
from agents.rollout import collect_episodes
from rlhf_env.kl import AdaptiveKLController

TOLERANCE = 1e-5  # relative L2: float rounding only
ENV = dict(num_envs=4, max_new_tokens=16, beta=0.05)
LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)  # adapters on the shipped GPT-2


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact_jobs(pairs: str) -> dict:
    clip = dict(max_grad_norm=0.5, learning_rate=1e-3, seed=0)  # the clip is active: it must see the global norm
    return {
        "ppo": {"agent": "ppo", "env": ENV, "config": dict(
            episodes_per_update=8, minibatch_size=4, update_epochs=2, gradient_accumulation_steps=2,
            whiten_rewards=True, ent_coef=0.01, ptx_coef=0.5, ptx_batch_size=5, **clip)},
        "rloo": {"agent": "reinforce", "env": ENV, "perturb_rank": 1, "config": dict(  # unclipped: a wrong scale
            episodes_per_update=8, samples_per_prompt=2, baseline="rloo", micro_batch_size=2, **clip | {
                "max_grad_norm": 1e9})},
        "lora": {"agent": "reinforce", "env": ENV | {"lora": LORA}, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="rloo", **clip | {"max_grad_norm": 1e9})},
        "group_norm": {"agent": "reinforce", "env": ENV, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="rloo", advantage_norm="group_std", **clip)},
        # Several clipped steps on minibatches drawn over the whole batch, batch whitening, a token mean, k2 loss.
        "steps": {"agent": "reinforce", "env": ENV | {"beta": 0.0}, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="group_mean", advantage_norm="batch",
            loss_aggregation="token_mean", clip_range_low=0.2, clip_range_high=0.28, update_epochs=2,
            num_minibatches=2, kl_in_loss=True, kl_estimator="k2", micro_batch_size=1, **clip)},
        # GSPO's sequence ratio on each episode's token sum over the longest length, group std.
        "sequence": {"agent": "reinforce", "env": ENV, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="group_mean", advantage_norm="group_std",
            loss_aggregation="seq_mean_token_sum_norm", clip_range=0.2, ratio_level="sequence", num_minibatches=2,
            **clip)},
        "value": {"agent": "reinforce", "env": ENV, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="value", value_init="small", reward_to_go=True,
            **clip)},
        "moving_average": {"agent": "reinforce", "env": ENV, "config": dict(
            episodes_per_update=8, samples_per_prompt=1, baseline="moving_average", **clip)},
        "dpo": {"agent": "dpo", "env": ENV | {"beta": 0.1}, "config": dict(  # unclipped
            batch_size=8, micro_batch_size=2, pairs=pairs, eval_pairs=pairs, **clip | {"max_grad_norm": 1e9})},
    }


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, small_pairs):
    """The whole batch (8 episodes: 4 prompts × 2 samples) and, for every job, the single-process update on it
    and the 2-rank update on its halves."""
    folder = tmp_path_factory.mktemp("exact")
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=16, beta=0.05)
    prompts = envs.unwrapped.world.prompt_pool("train")[:4]
    batch = collect_episodes(envs.unwrapped, 3, torch.Generator().manual_seed(3),
                             prompts=[p for p in prompts for _ in range(2)])
    (folder / "episodes.json").write_text(json.dumps(asdict(batch)))
    jobs = exact_jobs(small_pairs(64))
    single = {}
    for name, spec in jobs.items():
        agent = worker.build(spec)
        gradients = worker.record_steps(agent)
        metrics = agent.update() if spec["agent"] == "dpo" else agent.update(episodes=batch)
        single[name] = {"gradients": gradients, "parameters": worker.trained(agent), "metrics": metrics,
                        "initial": worker.trained(worker.build(spec)),
                        "moving_average": getattr(agent, "moving_average", None)}
    ranks = launch(folder, "exact", {"agents": jobs})
    distributed = [{name: torch.load(folder / f"{name}-rank{rank}.pt") for name in jobs} for rank in range(2)]
    return batch, single, ranks, distributed


def test_the_batch_has_unequal_lengths_within_and_across_the_ranks_shares(exact_runs):
    batch = exact_runs[0]
    lengths = [len(r) for r in batch.responses]
    assert len(set(lengths)) > 2
    assert max(lengths[:4]) != max(lengths[4:])  # the ranks pad to different widths


@pytest.mark.parametrize("name", ["ppo", "rloo", "group_norm", "steps", "sequence", "value", "lora", "dpo"])
def test_two_ranks_update_as_one_process_on_the_whole_batch(exact_runs, name):
    _, single, _, distributed = exact_runs
    expected = single[name]
    for rank in range(2):
        got = distributed[rank][name]
        assert len(got["gradients"]) == len(expected["gradients"]) >= 1
        for step, (a, b) in enumerate(zip(got["gradients"], expected["gradients"])):
            assert relative_difference(a, b) <= TOLERANCE, (rank, step)
        assert relative_difference(got["parameters"], expected["parameters"]) <= TOLERANCE, rank
    # The replicas are the same parameters, bit for bit (one all-reduced gradient, the same step on each).
    assert torch.equal(distributed[0][name]["parameters"], distributed[1][name]["parameters"])
    # The update is not negligible next to the tolerance.
    moved = relative_difference(expected["parameters"], expected["initial"])
    assert moved > 100 * TOLERANCE


def test_the_clip_sees_the_global_norm(exact_runs):
    _, single, _, _ = exact_runs
    clipped = [name for name, run in single.items()
               if run["metrics"]["train/grad_norm"] > exact_jobs("")[name]["config"]["max_grad_norm"]]
    assert {"ppo", "group_norm"} <= set(clipped) and not {"rloo", "dpo"} & set(clipped)


@pytest.mark.parametrize("name", ["ppo", "rloo", "group_norm", "steps", "sequence", "value", "lora", "moving_average",
                                  "dpo"])
def test_metrics_are_the_whole_batch_s_on_every_rank(exact_runs, name):
    _, single, ranks, _ = exact_runs
    assert ranks[0][name] == ranks[1][name]
    if name == "moving_average":  # the batch's mean return, for the next update's baseline
        assert ranks[0][name]["moving_average"] == pytest.approx(single[name]["moving_average"], rel=1e-6)
        assert single[name]["moving_average"] != 0
    expected = worker.comparable(single[name]["metrics"])
    got = ranks[0][name]["metrics"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


RESUME_JOB = {"agents": {
    "ppo": {"agent": "ppo", "env": ENV | {"kl_target": 0.5, "kl_horizon": 64}, "config": dict(
        episodes_per_update=8, minibatch_size=4, update_epochs=2, seed=1)},
    "rloo": {"agent": "reinforce", "env": ENV, "config": dict(
        episodes_per_update=8, samples_per_prompt=2, baseline="moving_average", seed=1)},
}}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, small_pairs):
    """Each agent: 4 updates straight on 2 ranks (with β, KLs and prompts after each); 2 updates, saved; and, in
    fresh processes, the checkpoint resumed for 2 updates."""
    folder = tmp_path_factory.mktemp("resume")
    job = json.loads(json.dumps(RESUME_JOB))
    job["agents"]["dpo"] = {"agent": "dpo", "env": ENV | {"beta": 0.1}, "config": dict(
        batch_size=8, pairs=small_pairs(20), eval_pairs=small_pairs(20), learning_rate=1e-3, seed=1)}
    straight = launch(folder, "straight", job)
    return folder, job, straight, launch(folder, "resume", job)


def test_rollouts_keep_beta_and_parameters_identical_on_every_rank(two_rank_runs):
    first, second = (r["ppo"] for r in two_rank_runs[2])  # adaptive β
    assert first["digest"] == second["digest"]  # the replicas stayed the same
    controller = AdaptiveKLController(0.05, 0.5, 64)
    for update, (a, b) in enumerate(zip(first["updates"], second["updates"])):
        assert a["beta"] == b["beta"] and a["metrics"] == b["metrics"], update
        controller.update(float(np.mean(a["kls"] + b["kls"])), 8)  # the whole batch's mean KL, in rank order
        assert a["beta"] == controller.beta, update
        assert a["metrics"]["time/episodes"] == 8 * (update + 1)  # counters are the whole batch's
    assert controller.beta != 0.05


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_the_ranks_sample_different_prompts(two_rank_runs, name):
    first, second = (r[name]["updates"] for r in two_rank_runs[2])
    for a, b in zip(first, second):
        assert len(a["prompts"]) == len(b["prompts"]) == 4 and a["prompts"] != b["prompts"]
    assert first[0]["prompts"] != first[1]["prompts"]


@pytest.mark.parametrize("name", ["ppo", "rloo", "dpo"])
def test_a_two_rank_resume_equals_the_uninterrupted_two_rank_run(two_rank_runs, name):
    _, _, straight, resumed = two_rank_runs
    for rank in range(2):
        assert resumed[rank][name]["digest"] == straight[rank][name]["digest"], rank
        assert resumed[rank][name]["metrics"] == [u["metrics"] for u in straight[rank][name]["updates"][2:]], rank
        assert resumed[rank][name]["beta"] == straight[rank][name]["beta"], rank


def test_a_two_rank_checkpoint_is_refused_by_one_process(two_rank_runs):
    folder, job, _, _ = two_rank_runs
    with pytest.raises(WorldSizeMismatch, match="saved by 2 process"):
        worker.build(job["agents"]["ppo"], load=str(folder / "ppo-checkpoint"))


# ---------------------------------------------------------------- one process: no communication, named errors
def test_one_process_keeps_its_single_stream():
    rng, shared, generator = seeded_generators(7)
    assert shared is rng and Ranks.current() == SINGLE
    assert rng.integers(1 << 30) == np.random.default_rng(7).integers(1 << 30)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(7).get_state())


def test_ranks_draw_different_reproducible_streams():
    draws = [rank_generators(7, Ranks(rank, 2))[0].integers(1 << 30, size=4) for rank in (0, 1, 0)]
    assert not np.array_equal(draws[0], draws[1]) and np.array_equal(draws[0], draws[2])
    samples = [torch.rand(4, generator=rank_generators(7, Ranks(rank, 2))[1]) for rank in (0, 1)]
    assert not torch.equal(*samples)


@pytest.mark.parametrize("config, match", [
    (dict(episodes_per_update=6, samples_per_prompt=1), r"episodes_per_update \(6\) must be a multiple of the "
                                                        r"number of ranks \(4\)"),
    (dict(episodes_per_update=8, samples_per_prompt=1), r"share / num_envs: 2 is not a multiple of 4"),
])
def test_a_batch_the_ranks_cannot_split_is_refused_by_name(config, match):
    from agents.common import acting_world

    with pytest.raises(ValueError, match=match):
        acting_world(gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8), "Reinforce",
                     config["episodes_per_update"], Ranks(0, 4))


def test_given_episodes_are_checked_before_any_model_call():
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8)
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=4, samples_per_prompt=2), progress=False)
    prompts = envs.unwrapped.world.prompt_pool("train")[:4]
    batch = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0), prompts=prompts)
    with pytest.raises(ValueError, match="not 2 samples of one prompt"):
        agent.update(episodes=batch)
    batch.responses = batch.responses[:3]
    with pytest.raises(ValueError, match="share of the batch, 4 episodes"):
        agent.update(episodes=batch)
    assert agent.num_updates == 0


def test_ranks_that_disagree_are_named():
    class TwoRanks(Ranks):
        def gather(self, obj):  # what rank 0 gathers when rank 1 was given 2
            return [obj, 2]

    TwoRanks(0, 2).check_same("sizes", 2)
    with pytest.raises(RanksDisagree, match="rank 1 has 2"):
        TwoRanks(0, 2).check_same("sizes", 1)


def test_torchrun_trains_reinforce_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "agents.reinforce", "--baseline", "rloo", "--reward", "gold", "--total-timesteps", "600",
               "--episodes-per-update", "8", "--num-envs", "4", "--eval-episodes", "8", "--no-progress",
               "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["timesteps"] >= 600
    assert done.stdout.count('"algorithm"') == 1  # rank 0 alone prints the summary
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["time/updates"] for h in history] == list(range(1, summary["updates"] + 1))  # logged once
    assert json.loads((out / "model" / "training_state.json").read_text())["world_size"] == 2
