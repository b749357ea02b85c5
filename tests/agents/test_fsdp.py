"""FSDP2 training (`agents.fsdp`) on 2 gloo processes of one thread each (`distributed_worker.py`).

The sharded 2-rank update equals the single-process update of the whole batch on the same episodes (the gradient
of every optimizer step, after FSDP's reduce-scatter and the clip on the global norm, and the parameters after):
RLOO with rank 1's policy perturbed before the agent is built (the shards are cut from rank 0's model), a value
baseline (the value head a unit of its own), PPO with minibatches the ranks share unevenly (zero-weighted filler
micro-batches), gradient accumulation, ptx and an active clip, PPO with a separate critic, and DPO. Each rank
holds about half of the parameters and of Adam's moments. Real rollouts decode with the current whole weights;
a run saved, stopped and resumed under FSDP equals the uninterrupted one, and its checkpoint, in the unsharded
format, resumes without FSDP. Without a process group, or with a LoRA policy, FSDP is refused by name.
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
from safetensors.torch import load_file

from agents.checkpoint import TENSORS_FILE
from agents.fsdp import FSDPIncompatible, FSDPNeedsProcessGroup
from agents.ppo import PPO, PPOConfig
from agents.reinforce import Reinforce, ReinforceConfig
from agents.rollout import collect_episodes
from rlhf_env.models import load_causal_lm

TOLERANCE = 1e-5  # relative L2: float rounding only
ENV = dict(num_envs=4, max_new_tokens=16, beta=0.05)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact_jobs(pairs: str) -> dict:
    clip = dict(max_grad_norm=0.5, learning_rate=1e-3, seed=0)  # the clip is active: it must see the global norm
    unclipped = clip | {"max_grad_norm": 1e9}
    return {
        "rloo": {"agent": "reinforce", "env": ENV, "perturb_rank": 1, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="rloo", micro_batch_size=2, **unclipped)},
        "value": {"agent": "reinforce", "env": ENV, "config": dict(
            episodes_per_update=8, samples_per_prompt=2, baseline="value", value_init="small", **clip)},
        "ppo": {"agent": "ppo", "env": ENV, "config": dict(
            episodes_per_update=8, minibatch_size=4, update_epochs=2, gradient_accumulation_steps=2,
            whiten_rewards=True, ent_coef=0.01, ptx_coef=0.5, ptx_batch_size=3, **clip)},
        "critic": {"agent": "ppo", "env": ENV, "config": dict(
            episodes_per_update=8, minibatch_size=4, update_epochs=1, separate_critic=True, value_init="small",
            **clip)},
        "dpo": {"agent": "dpo", "env": ENV | {"beta": 0.1}, "config": dict(
            batch_size=8, micro_batch_size=2, pairs=pairs, eval_pairs=pairs, **unclipped)},
        "poisoned": {"agent": "reinforce", "env": ENV, "poison_rank": 1, "config": dict(  # rank 1's loss is NaN
            episodes_per_update=8, samples_per_prompt=2, baseline="rloo", micro_batch_size=2, **unclipped)},
    }


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, small_pairs):
    """The whole batch (8 episodes: 4 prompts × 2 samples) and, for every job, the single-process update on it and
    the sharded 2-rank update on its halves."""
    folder = tmp_path_factory.mktemp("fsdp-exact")
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=16, beta=0.05)
    prompts = envs.unwrapped.world.prompt_pool("train")[:4]
    batch = collect_episodes(envs.unwrapped, 3, torch.Generator().manual_seed(3),
                             prompts=[p for p in prompts for _ in range(2)])
    (folder / "episodes.json").write_text(json.dumps(asdict(batch)))
    jobs = exact_jobs(small_pairs(64))
    single = {}
    for name, spec in jobs.items():
        if "poison_rank" in spec:
            continue
        agent = worker.build(spec)
        gradients = worker.record_steps(agent)
        metrics = agent.update() if spec["agent"] == "dpo" else agent.update(episodes=batch)
        single[name] = {"gradients": gradients, "parameters": worker.trained(agent), "metrics": metrics,
                        "initial": worker.trained(worker.build(spec))}
    ranks = launch(folder, "exact", {"agents": {name: spec | {"fsdp": True} for name, spec in jobs.items()}})
    sharded = [{name: torch.load(folder / f"{name}-rank{rank}.pt") for name in jobs} for rank in range(2)]
    return single, ranks, sharded


def test_a_loss_that_is_not_finite_on_one_rank_skips_the_step_on_both(exact_runs, small_pairs):
    """Rank 1 meets a NaN loss at its first micro-batch and still runs the backward passes rank 0 runs (each one a
    reduce-scatter both must join); then neither steps."""
    _, ranks, sharded = exact_runs
    initial = worker.trained(worker.build(exact_jobs(small_pairs(64))["poisoned"]))
    for rank in range(2):
        assert ranks[rank]["poisoned"]["metrics"]["train/skipped"] == 1
        assert torch.equal(sharded[rank]["poisoned"]["parameters"], initial), rank


@pytest.mark.parametrize("name", ["rloo", "value", "ppo", "critic", "dpo"])
def test_the_sharded_update_is_the_single_process_update_of_the_whole_batch(exact_runs, name):
    single, _, sharded = exact_runs
    expected = single[name]
    for rank in range(2):
        got = sharded[rank][name]
        assert len(got["gradients"]) == len(expected["gradients"]) >= 1
        for step, (a, b) in enumerate(zip(got["gradients"], expected["gradients"])):
            assert relative_difference(a, b) <= TOLERANCE, (rank, step)
        assert relative_difference(got["parameters"], expected["parameters"]) <= TOLERANCE, rank
    assert torch.equal(sharded[0][name]["parameters"], sharded[1][name]["parameters"])  # one model, gathered
    assert relative_difference(expected["parameters"], expected["initial"]) > 100 * TOLERANCE  # it moved


@pytest.mark.parametrize("name", ["rloo", "value", "ppo", "critic", "dpo"])
def test_sharded_metrics_are_the_whole_batch_s(exact_runs, name):
    single, ranks, _ = exact_runs
    assert ranks[0][name]["metrics"] == ranks[1][name]["metrics"]
    expected, got = worker.comparable(single[name]["metrics"]), ranks[0][name]["metrics"]
    assert set(got) == set(expected)
    if name == "dpo":  # at π = π_ref every margin is 0 in one process (π and π_ref through one lean path: ties
        # count half), rounding noise of ~1e-6 under FSDP (π through transformers' forward): a coin toss per pair
        assert expected.pop("rewards/accuracies") == 0.5 and 0 <= got.pop("rewards/accuracies") <= 1
        assert abs(got["rewards/margins"]) < 1e-5
    for key, value in expected.items():
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if name == "ppo":  # the clip was active, on the global norm
        assert got["train/grad_norm"] > exact_jobs("")[name]["config"]["max_grad_norm"]


@pytest.mark.parametrize("name", ["rloo", "ppo", "dpo"])
def test_each_rank_holds_half_of_the_parameters_and_of_adam_s_moments(exact_runs, name):
    _, ranks, _ = exact_runs
    held = [ranks[rank][name]["held"] for rank in range(2)]
    model = held[0]["model"]
    assert held[0]["model"] == held[1]["model"] > 400_000
    assert held[0]["parameters"] + held[1]["parameters"] == model
    assert held[0]["moments"] + held[1]["moments"] == 2 * model  # exp_avg and exp_avg_sq
    for rank in range(2):  # each tensor cut in two along its first dimension (an odd one a row apart)
        assert abs(held[rank]["parameters"] - model / 2) < 0.01 * model, rank


RESUME_JOB = {"agents": {
    "ppo": {"agent": "ppo", "env": ENV, "fsdp": True, "config": dict(
        episodes_per_update=8, minibatch_size=4, update_epochs=2, seed=1)},
    "rloo": {"agent": "reinforce", "env": ENV, "fsdp": True, "config": dict(
        episodes_per_update=8, samples_per_prompt=2, baseline="rloo", seed=1)},
}}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Each agent under FSDP: 4 updates with real rollouts; 2 updates, saved; in fresh processes the checkpoint
    resumed under FSDP and without it (plain data parallelism, "<name>/plain"), each for 2 updates."""
    folder = tmp_path_factory.mktemp("fsdp-resume")
    straight = launch(folder, "straight", RESUME_JOB)
    both = {"agents": {**RESUME_JOB["agents"], **{f"{name}/plain": spec | {"load_fsdp": False, "checkpoint": name}
                                                   for name, spec in RESUME_JOB["agents"].items()}}}
    resumed = launch(folder, "resume", both)
    return folder, straight, resumed


def test_rollouts_decode_with_the_current_whole_weights(resume_runs):
    _, straight, _ = resume_runs
    first, second = (r["ppo"] for r in straight)
    assert first["digest"] == second["digest"]
    for update in first["updates"]:  # the env's log-probs at sampling time are the trained policy's
        assert update["metrics"]["train/rollout_logprob_mismatch"] < 1e-4
    assert first["updates"][0]["prompts"] != second["updates"][0]["prompts"]  # each rank its own rollouts


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_a_sharded_resume_equals_the_uninterrupted_sharded_run(resume_runs, name):
    _, straight, resumed = resume_runs
    for rank in range(2):
        assert resumed[rank][name]["loaded_digest"] == straight[rank][name]["saved_digest"], rank
        assert resumed[rank][name]["digest"] == straight[rank][name]["digest"], rank
        assert resumed[rank][name]["metrics"] == [u["metrics"] for u in straight[rank][name]["updates"][2:]], rank


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_a_sharded_checkpoint_resumes_without_fsdp(resume_runs, name):
    _, straight, resumed = resume_runs
    for rank in range(2):  # the very weights the sharded run saved, then the same course
        plain = resumed[rank][f"{name}/plain"]
        assert plain["loaded_digest"] == straight[rank][name]["saved_digest"], rank
        for a, b in zip(plain["metrics"], resumed[rank][name]["metrics"]):
            assert a["time/timesteps"] == b["time/timesteps"]  # the same samples
            for key in ("objective/score", "loss/policy", "train/grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_a_sharded_checkpoint_has_the_unsharded_format(resume_runs, tmp_path):
    folder = resume_runs[0]
    envs = gym.make_vec("RLHF-v0", **ENV)
    agent = PPO(envs, PPOConfig(**RESUME_JOB["agents"]["ppo"]["config"]), progress=False)
    agent.update()
    agent.save(tmp_path / "plain")
    sharded, plain = folder / "ppo-checkpoint", tmp_path / "plain"
    files = [sorted(p.name for p in (d / "policy").iterdir()) for d in (sharded, plain)]
    assert files[0] == files[1]
    config = json.loads((sharded / "policy" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    shapes = [{k: v.shape for k, v in load_file(d / TENSORS_FILE).items() if k.startswith("optimizer/")}
              for d in (sharded, plain)]
    assert shapes[0] == shapes[1] and len(shapes[0]) > 50
    policies = [load_causal_lm(d / "policy").state_dict() for d in (sharded, plain)]
    assert {k: v.shape for k, v in policies[0].items()} == {k: v.shape for k, v in policies[1].items()}
    loaded = load_causal_lm(sharded / "policy")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied


def test_torchrun_trains_reinforce_with_fsdp_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "agents.reinforce", "--fsdp", "--baseline", "rloo", "--reward", "gold", "--total-timesteps",
               "300", "--episodes-per-update", "8", "--num-envs", "4", "--eval-episodes", "8", "--no-progress",
               "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["fsdp"] is True and summary["timesteps"] >= 300
    assert summary["eval_after"]["episodes"] == 8
    assert json.loads((out / "model" / "training_state.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------- one process: named refusals
def test_fsdp_without_a_process_group_is_refused_by_name():
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8)
    for build in (lambda: Reinforce(envs, ReinforceConfig(episodes_per_update=4), progress=False, fsdp=True),
                  lambda: PPO(envs, PPOConfig(episodes_per_update=4, minibatch_size=4), progress=False, fsdp=True)):
        with pytest.raises(FSDPNeedsProcessGroup, match="torchrun"):
            build()


def test_fsdp_with_a_lora_policy_is_refused_by_name():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8, lora=lora)
    with pytest.raises(FSDPIncompatible, match="LoRA"):
        Reinforce(envs, ReinforceConfig(episodes_per_update=4), progress=False, fsdp=True)


def test_fsdp_with_several_reinforce_steps_per_batch_is_refused_by_name():
    from agents.presets import PRESETS

    envs = gym.make_vec("RLHF-v0", num_envs=4, max_new_tokens=8)
    config = ReinforceConfig(**{**PRESETS["dapo"], "episodes_per_update": 16, "samples_per_prompt": 4})
    with pytest.raises(FSDPIncompatible, match="one gradient step per batch"):
        Reinforce(envs, config, progress=False, fsdp=True)
