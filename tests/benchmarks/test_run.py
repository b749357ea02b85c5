"""benchmarks.run: the grid's cells, resuming, reproducible cells, and the report (table and plots)."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents.reinforce import Reinforce, ReinforceConfig
from benchmarks.cell import CellConfig, Checkpoints, training_curve
from benchmarks.run import FULL, QUICK, command_line, grid_from_args, main


def test_cell_configs_reject_bad_input():
    with pytest.raises(ValueError, match="unknown algorithm"):
        CellConfig("sac")
    with pytest.raises(ValueError, match="budget"):
        CellConfig("ppo", budget=0)
    with pytest.raises(ValueError, match="reward"):
        CellConfig("ppo", budget=10, reward="human")
    assert CellConfig("sft").name != CellConfig("sft", seed=1).name != CellConfig("sft", beta=0.2).name


def test_the_quick_grid_runs_every_algorithm_of_the_issue_on_the_default_task():
    cells = QUICK.cells()
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    assert {c.task for c in cells} == {"sentiment"} and {c.seed for c in cells} == {0, 1}
    algorithms = {c.algorithm for c in cells}
    assert {"sft", "best_of_n", "ppo", "rloo", "dpo", "optimum"} <= algorithms
    assert sum(c.algorithm == "optimum" for c in cells) == 1  # one per (task, reward, β), not per seed
    full = FULL.cells()
    assert {c.algorithm for c in full} >= {"grpo", "reinforce_ma", "reinforce_value"}
    assert len({c.beta for c in full}) >= 3 and len({c.task for c in full}) >= 2


def test_command_line_narrows_and_scales_the_grid():
    args = command_line().parse_args(["--quick", "--algorithms", "rloo", "grpo", "--budget-scale", "0.5",
                                      "--seeds", "3", "--betas", "0.05", "0.2"])
    grid = grid_from_args(args)
    assert grid.budgets == {"rloo": QUICK.budgets["rloo"] // 2, "grpo": FULL.budgets["grpo"] // 2}
    assert grid.best_of == () and grid.seeds == (3,) and grid.betas == (0.05, 0.2)


def test_training_curve_averages_windows_of_updates():
    history = [{"time/timesteps": 10 * (i + 1), "time/update_seconds": 0.5, "objective/gold_score": float(i)}
               for i in range(10)]
    curve = training_curve(history, points=5)
    assert [p["updates"] for p in curve] == [2, 4, 6, 8, 10]
    assert [p["objective/gold_score"] for p in curve] == [0.5, 2.5, 4.5, 6.5, 8.5]
    assert curve[-1]["timesteps"] == 100 and curve[-1]["seconds"] == pytest.approx(5.0)


def _train(with_checkpoints: bool) -> tuple[list[dict], dict, list]:
    torch.manual_seed(0)
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=6)
    agent = Reinforce(envs, ReinforceConfig(episodes_per_update=8, samples_per_prompt=4), progress=False)
    checkpoints = Checkpoints(envs, budget=200, seed=3, count=3, episodes=8) if with_checkpoints else None
    agent.learn(200, callback=checkpoints)
    history = [{k: v for k, v in h.items() if not k.startswith("time/")} for h in agent.logger.history]
    return history, {k: v.clone() for k, v in agent.lm.state_dict().items()}, checkpoints.points if checkpoints else []


def test_held_out_checkpoints_do_not_change_the_course_of_training():
    plain_history, plain_weights, _ = _train(False)
    history, weights, points = _train(True)
    assert history == plain_history
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    assert len(points) == 4 and points[0]["timesteps"] == 0 and points[-1]["timesteps"] >= 200
    assert points[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # before training, π = π_ref


def test_a_tiny_grid_writes_cells_table_and_plots_resumes_and_reproduces(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--algorithms", "sft", "rloo", "best_of_n", "--best-of", "2", "--seeds", "0",
            "--budget-scale", "0.002", "--eval-episodes", "16", "--optimum-samples", "8", "--optimum-prompts", "4",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    cells = sorted((out / "cells").glob("*.json"))
    assert [p.name.split("-")[0] for p in cells] == ["best_of_n", "optimum", "rloo", "sft"]
    records = {p.name.split("-")[0]: json.loads(p.read_text()) for p in cells}
    rloo = records["rloo"]
    assert {"config", "commit", "metrics", "timing", "memory", "curve", "checkpoints", "machine"} <= set(rloo)
    assert rloo["config"]["seed"] == 0 and rloo["timing"]["updates"] >= 1 and rloo["memory"]["peak_rss_mib"] > 100
    assert records["best_of_n"]["metrics"]["objective/kl"] == pytest.approx(np.log(2) - 0.5)
    assert records["sft"]["metrics"]["objective/kl"] == pytest.approx(0.0, abs=1e-4)

    table = (out / "results.md").read_text()
    for text in ("π_SFT (floor)", "best-of-2", "REINFORCE + RLOO", "% of optimum", "KL-regularised optimum"):
        assert text in table
    for plot in ("frontier.png", "overoptimisation.png", "learning_curves.png"):
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # Resume: finished cells are not rerun.
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 of 4 cells already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps

    # Reproduce: the same cell in a fresh process gives bit-identical numbers (as the grid runs cells).
    config_path = tmp_path / "rloo.config.json"
    config_path.write_text(json.dumps(rloo["config"]))
    subprocess.run([sys.executable, "-m", "benchmarks.cell", str(config_path), str(tmp_path / "rloo.json")],
                   check=True)
    again = json.loads((tmp_path / "rloo.json").read_text())
    assert again["metrics"] == rloo["metrics"]

    def untimed(points):
        return [{k: v for k, v in p.items() if k != "seconds"} for p in points]

    assert untimed(again["checkpoints"]) == untimed(rloo["checkpoints"])
