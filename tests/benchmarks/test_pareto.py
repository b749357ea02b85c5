"""The two-objective setting and the Pareto sweep: the sentiment task's gold objectives, cells with a weight and a
KL target, the grid's ``--pareto``, the front check and the report."""

import json

import gymnasium as gym
import numpy as np
import pytest

import rlhf_env
from agents.evaluate import best_of_n, evaluate
from benchmarks.cell import CellConfig, env_kwargs, run_cell
from benchmarks.pareto import front_status
from benchmarks.results import write_report
from benchmarks.run import PARETO, command_line, grid_from_args
from rlhf_env.assets import asset_dir
from rlhf_env.tasks.sentiment import BREVITY_WORDS, brevity


def test_the_sentiment_task_has_two_gold_objectives_that_pull_apart():
    task = rlhf_env.tasks.get_task("sentiment")
    objectives = task.objectives()
    assert list(objectives) == ["sentiment", "brevity"] and objectives["sentiment"] == task.gold_reward
    # The best review at each length: longer ones reach more sentiment gold and less brevity.
    best = ["good", "good and great", "good and great , it is good and great",
            "good and great , it is good and great , it is good and great"]
    sentiment = objectives["sentiment"](["the plot was"] * 4, best)
    assert sentiment == pytest.approx([1 / 2, 2 / 3, 4 / 5, 6 / 7])
    assert brevity(["p"] * 4, best) == [1 - n / BREVITY_WORDS for n in (1, 3, 9, 15)]
    assert brevity(["p"], [""]) == [1.0]
    for name in ("verbose", "arithmetic"):  # one objective: the gold reward
        other = rlhf_env.tasks.get_task(name)
        assert other.objectives() == {"gold": other.gold_reward}


def test_evaluations_report_each_gold_objective_of_a_task_with_several():
    envs = gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8)
    metrics = evaluate(envs, 16, seed=1)
    assert metrics["objective/gold/sentiment"] == metrics["objective/gold_score"]
    lengths = metrics["episode/length"]  # tokens, EOS included when the response ended
    assert 1 - lengths / BREVITY_WORDS <= metrics["objective/gold/brevity"] <= 1 - (lengths - 1) / BREVITY_WORDS
    assert "objective/gold/brevity" in best_of_n(envs, 2, 8, seed=1)
    single = gym.make_vec("RLHF-Arithmetic-v0", num_envs=4)
    assert not [key for key in evaluate(single, 4, seed=1) if key.startswith("objective/gold/")]


def test_a_weighted_cell_pays_the_two_objectives_with_its_weights():
    task = rlhf_env.tasks.get_task("sentiment")
    kwargs = env_kwargs(CellConfig("rloo", budget=10, weight=0.25, kl_target=2.0, kl_horizon=500), task)
    assert kwargs["rewards"] == {"sentiment": asset_dir(task) / "reward_model", "brevity": brevity}
    assert kwargs["reward_weights"] == {"sentiment": 0.75, "brevity": 0.25}
    assert (kwargs["kl_target"], kwargs["kl_horizon"]) == (2.0, 500)
    gold = env_kwargs(CellConfig("rloo", budget=10, reward="gold", weight=1.0), task)
    assert gold["rewards"]["sentiment"] == task.gold_reward and "kl_target" not in gold
    assert env_kwargs(CellConfig("rloo", budget=10, reward="gold"), task) == {
        "beta": 0.1, "device": "auto", "reward_fn": task.gold_reward}
    with pytest.raises(ValueError, match="two gold objectives.*'verbose' has \\['gold'\\]"):
        env_kwargs(CellConfig("rloo", budget=10, weight=0.5), rlhf_env.tasks.get_task("verbose"))
    with pytest.raises(ValueError, match="weight must be in \\[0, 1\\]"):
        CellConfig("rloo", budget=10, weight=1.5)
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        CellConfig("rloo", budget=10, kl_target=0.0)
    names = {CellConfig("rloo", budget=10).name, CellConfig("rloo", budget=10, weight=0.0).name,
             CellConfig("rloo", budget=10, weight=0.5).name, CellConfig("rloo", budget=10, kl_target=2.0).name,
             CellConfig("rloo", budget=10, kl_target=2.0, kl_horizon=500).name}
    assert len(names) == 5


def test_a_weighted_cell_trains_on_the_weighted_sum_and_reports_both_golds(tmp_path):
    record = run_cell(CellConfig("rloo", budget=600, weight=0.5, kl_target=1.0, kl_horizon=100, num_envs=8,
                                 eval_episodes=16, threads=1), progress=False)
    metrics = record["metrics"]
    assert metrics["objective/score"] == pytest.approx(
        0.5 * metrics["objective/score/sentiment"] + 0.5 * metrics["objective/score/brevity"], abs=1e-6)
    assert metrics["objective/score/brevity"] == pytest.approx(metrics["objective/gold/brevity"])
    assert metrics["objective/beta"] != 0.1  # the adaptive controller moved β toward the target
    assert all("objective/gold/brevity" in point for point in record["checkpoints"])


def test_the_pareto_grid_sweeps_weights_at_one_kl_budget():
    cells = PARETO.cells()
    assert len({c.name for c in cells}) == len(cells)
    trained = [c for c in cells if c.algorithm in ("rloo", "ppo")]
    assert {c.weight for c in trained} == set(PARETO.weights) and len(PARETO.weights) >= 5
    assert {c.kl_target for c in trained} == {PARETO.kl_target}
    assert {(c.algorithm, c.budget) for c in cells if c.algorithm == "best_of_n"} == {("best_of_n", 32)}
    assert not [c for c in cells if c.algorithm == "optimum"]
    assert sum(c.algorithm == "sft" for c in cells) == len(PARETO.seeds)
    grid = grid_from_args(command_line().parse_args(["--pareto", "--weights", "0", "1", "--kl-target", "3",
                                                     "--algorithms", "rloo", "--seeds", "4"]))
    assert (grid.weights, grid.kl_target, grid.budgets, grid.seeds) == ((0.0, 1.0), 3.0, {"rloo": 400_000}, (4,))
    for argv, message in ((["--pareto", "--quick"], "pick one"), (["--weights", "0.5"], "add --pareto")):
        with pytest.raises(SystemExit, match=message):
            grid_from_args(command_line().parse_args(argv))


def test_the_front_check_names_dominated_unsupported_and_hull_points():
    # (0, 1) and (1, 0) span the hull; (0.4, 0.4) is under the chord x + y = 1 by 0.2; (0.3, 0.3) is dominated.
    status = front_status([(0.0, 1.0), (0.4, 0.4), (1.0, 0.0), (0.3, 0.3)])
    assert status == ["on the hull", "unsupported (gap 0.200)", "on the hull", "dominated (by #1)"]
    # A concave front (x² + y² = 1 sampled) is all hull; a point on a chord counts as on it.
    circle = [(np.cos(a), np.sin(a)) for a in np.linspace(0, np.pi / 2, 5)]
    assert front_status(circle) == ["on the hull"] * 5
    assert front_status([(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)])[1] == "unsupported (gap 0.000)"


def test_the_report_has_the_pareto_table_and_plot(tmp_path, cell_record):
    cells = tmp_path / "cells"
    cells.mkdir()
    golds = {0.0: (0.6, 0.80), 0.5: (0.3, 0.82), 0.9: (0.5, 0.90)}  # λ = 0.5 is dominated by λ = 0.9
    configs = [CellConfig("sft", weight=0.0)] + [
        CellConfig("rloo", budget=100, weight=w, kl_target=2.5, seed=s) for w in golds for s in (0, 1)]
    for config in configs:
        record = cell_record(config)
        sentiment, short = golds.get(config.weight, (0.0, 0.7)) if config.algorithm == "rloo" else (0.0, 0.7)
        record["metrics"] |= {"objective/gold/sentiment": sentiment + 0.01 * config.seed,
                              "objective/gold/brevity": short, "objective/beta": 0.2}
        (cells / f"{config.name}.json").write_text(json.dumps(record))
    ordinary = cell_record(CellConfig("ppo", budget=100))  # a grid and a sweep may share a folder
    (cells / f"{ordinary['name']}.json").write_text(json.dumps(ordinary))
    written = write_report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "## Pareto front: sentiment, sentiment vs brevity" in text and "toward **2.5 nats**" in text
    assert "| 1 | REINFORCE + RLOO (K=4) | 0.5 | 0.305 ± 0.007 | 0.820 ± 0.000 |" in text
    assert "| dominated (by #2) |" in text and text.count("| on the hull |") == 2
    assert "## sentiment, reward = rm, β = 0.1" in text  # the ordinary cell's table is still there
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG" and tmp_path / "pareto.png" in written
    pareto = json.loads((tmp_path / "results.json").read_text())[-1]["pareto"][0]
    assert pareto["objectives"] == ["sentiment", "brevity"] and len(pareto["rows"]) == 4
