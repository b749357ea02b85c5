"""benchmarks.run: the grid's cells, resuming, reproducible cells, and the report (table and plots); one writer per
folder, damaged cells moved aside and rerun, and no cell outliving its grid."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import benchmarks.cell as cell
import benchmarks.run as run
import rlhf_env  # noqa: F401  (registers the envs)
from agents.reinforce import Reinforce, ReinforceConfig
from benchmarks.cell import CellConfig, Checkpoints, training_curve
from benchmarks.results import read_cell
from benchmarks.run import FULL, QUICK, command_line, grid_from_args, main, run_grid
from rlhf_env.files import FolderLock

ROOT = Path(__file__).parents[2]


def test_cell_configs_reject_bad_input():
    with pytest.raises(ValueError, match="unknown algorithm"):
        CellConfig("sac")
    with pytest.raises(ValueError, match="budget"):
        CellConfig("ppo", budget=0)
    with pytest.raises(ValueError, match="reward"):
        CellConfig("ppo", budget=10, reward="human")
    assert CellConfig("sft").name != CellConfig("sft", seed=1).name != CellConfig("sft", beta=0.2).name
    with pytest.raises(ValueError, match="processes must be"):
        CellConfig("rloo", budget=10, processes=0)
    with pytest.raises(ValueError, match="trains nothing"):
        CellConfig("best_of_n", budget=4, processes=2)
    with pytest.raises(ValueError, match="num_envs=63 is not a multiple of processes=2"):
        CellConfig("rloo", budget=10, num_envs=63, processes=2)


def test_feedback_sources_are_cells_of_their_own(monkeypatch):
    with pytest.raises(ValueError, match="unknown feedback"):
        CellConfig("rloo", budget=10, feedback="crowd")
    for bad in (dict(algorithm="rloo", reward="gold"), dict(algorithm="dpo"), dict(algorithm="best_of_n")):
        with pytest.raises(ValueError, match="needs reward='rm' and an RL algorithm"):
            CellConfig(**bad, budget=10, feedback="iterated")
    with pytest.raises(ValueError, match="one process"):
        CellConfig("rloo", budget=10, feedback="iterated", processes=2)
    assert CellConfig("rloo", budget=10, feedback="iterated").name == CellConfig("rloo", budget=10).name + "-fiterated"
    grid = run.Grid(rewards=("rm", "gold"), budgets={"sft": 0, "rloo": 10, "dpo": 10}, feedbacks=("human", "iterated"))
    assert sorted((c.algorithm, c.reward, c.feedback) for c in grid.cells() if c.algorithm != "optimum") == [
        ("dpo", "gold", "human"), ("dpo", "rm", "human"), ("rloo", "gold", "human"), ("rloo", "rm", "human"),
        ("rloo", "rm", "iterated"), ("sft", "gold", "human"), ("sft", "rm", "human")]
    args = command_line().parse_args(["--quick", "--feedback", "human", "iterated"])
    assert grid_from_args(args).feedbacks == ("human", "iterated")


def test_an_iterated_cell_records_its_rounds_and_labels(monkeypatch):
    import functools

    import agents.iterated_rm

    monkeypatch.setattr(agents.iterated_rm, "IteratedRMConfig", functools.partial(
        agents.iterated_rm.IteratedRMConfig, every=1, prompts_per_round=4, steps=1, batch_size=4, replay=8,
        center_groups=4))
    record = cell.run_cell(CellConfig("rloo", budget=2000, feedback="iterated", eval_episodes=16), progress=False)
    rounds = record["feedback"]["rounds"]
    assert [line["round"] for line in rounds] == list(range(1, record["timing"]["updates"] + 1))
    assert record["feedback"]["labels"] == sum(line["new_pairs"] for line in rounds) > 0
    assert record["timing"]["train_seconds"] >= sum(line["seconds"] for line in rounds)


def test_ai_feedback_cells_train_on_the_judges_reward_model(monkeypatch, tmp_path):
    """rule_judge / lm_judge cells take the cached reward model of their source (here a stand-in: the shipped one,
    whose report says so) and record its report; a weight with other feedback is refused."""
    import rlhf_env.pipeline.feedback as feedback
    from rlhf_env.assets import asset_dir

    with pytest.raises(ValueError, match="two-objective cells"):
        CellConfig("rloo", budget=10, feedback="rule_judge", weight=0.5)
    asked = []
    monkeypatch.setattr(feedback, "feedback_reward_model", lambda source, task, progress: (
        asked.append(source), asset_dir(task) / "reward_model")[1])
    monkeypatch.setattr(feedback, "feedback_report", lambda source, task: {"source": source, "stand_in": True})
    config = CellConfig("rloo", budget=1000, feedback="lm_judge", eval_episodes=16)
    task = rlhf_env.tasks.get_task("sentiment")
    assert cell.env_kwargs(config, task)["reward_model"] == asset_dir(task) / "reward_model"
    record = cell.run_cell(config, progress=False)
    assert record["feedback"] == {"source": "lm_judge", "stand_in": True} and asked == ["lm_judge", "lm_judge"]


def test_a_direct_rlaif_cell_is_paid_the_constitutions_win_rate_and_records_its_cost():
    record = cell.run_cell(CellConfig("rloo", budget=1000, feedback="direct_rlaif", eval_episodes=16),
                           progress=False)
    judged = record["feedback"]
    assert judged["judge"] == "constitution" and judged["references"] == cell.DIRECT_RLAIF_REFERENCES
    assert judged["comparisons"] >= judged["references"] * record["timing"]["timesteps"] // 32  # every episode
    assert judged["seconds_per_episode"] > 0
    assert 0 <= record["metrics"]["objective/score"] <= 1  # a win rate
    assert record["curve"] and all(0 <= point["objective/score"] <= 1 for point in record["curve"])


def test_a_cell_of_several_processes_runs_under_torchrun_and_is_its_own_row():
    one, two = CellConfig("rloo", budget=10), CellConfig("rloo", budget=10, processes=2)
    assert two.name == one.name + "-p2"
    assert run.cell_command(one, Path("c.json"), Path("o.json")) == [*run.CELL_COMMAND, "c.json", "o.json"]
    assert run.cell_command(one, Path("c.json"), Path("o.json"), progress=False)[-1] == "--no-progress"
    assert run.cell_command(two, Path("c.json"), Path("o.json")) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "benchmarks.cell", "c.json", "o.json"]
    cells = run.Grid(budgets={"sft": 0, "rloo": 10}, best_of=(2,), processes=2).cells()
    assert {c.algorithm: c.processes for c in cells} == {"optimum": 1, "best_of_n": 1, "sft": 1, "rloo": 2}
    assert grid_from_args(command_line().parse_args(["--quick", "--processes", "2"])).processes == 2
    with pytest.raises(ValueError, match="processes=2 but 1 process"):  # N processes need torchrun
        cell.cell_ranks(two)


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


def test_a_grid_cell_trains_on_two_processes_under_torchrun(tmp_path):
    """Every rank trains, rank 0 alone evaluates (its callback's collective has no partner on rank 1: the run must
    not hang on it) and writes the one record; the report gives the run its own row."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--algorithms", "rloo", "--seeds", "0",
               "--budget-scale", "0.0075", "--eval-episodes", "16", "--optimum-samples", "8", "--optimum-prompts",
               "4", "--processes", "2", "--out", str(out), "--no-progress"]
    subprocess.run(command, check=True, timeout=300, cwd=ROOT)
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert [name.split("-")[0] for name in cells] == ["optimum", "rloo"] and cells[1].endswith("-p2.json")
    record = read_cell(out / "cells" / cells[1])
    assert record["machine"]["processes"] == 2 and record["config"]["processes"] == 2
    assert record["timing"]["timesteps"] >= 3000 and record["timing"]["updates"] >= 2  # both ranks' episodes
    assert len(record["checkpoints"]) >= 3 and record["curve"]
    assert "REINFORCE + RLOO (K=4), 2 processes" in (out / "results.md").read_text()


# A stand-in for `python -m benchmarks.cell CONFIG OUT` that trains nothing: it writes a made-up record for the cell.
STAND_IN = """
import json, sys
from pathlib import Path
record = json.loads({template!r})
record["config"] = json.loads(Path(sys.argv[1]).read_text())
record["name"] = Path(sys.argv[2]).name[:-len(".json")]
Path(sys.argv[2]).write_text(json.dumps(record))
"""


@pytest.fixture
def stand_in_cells(tmp_path, monkeypatch, cell_record):
    """Make `run_grid` start the stand-in instead of training cells."""
    script = tmp_path / "stand_in_cell.py"
    script.write_text(STAND_IN.format(template=json.dumps(cell_record(CellConfig("sft")))))
    monkeypatch.setattr(run, "CELL_COMMAND", [sys.executable, str(script)])


def test_damaged_cells_are_moved_aside_and_rerun(tmp_path, capsys, cell_record, stand_in_cells):
    out = tmp_path / "grid"
    cells = [CellConfig("sft", seed=seed, eval_episodes=16) for seed in range(4)]
    paths = [out / "cells" / f"{c.name}.json" for c in cells]
    paths[0].parent.mkdir(parents=True)
    paths[0].write_text(json.dumps(cell_record(cells[0])))  # finished
    truncated = json.dumps(cell_record(cells[1]))[:300]
    paths[1].write_text(truncated)
    paths[1].with_name(paths[1].name + ".damaged").write_text("an older damaged copy")
    no_metrics = json.dumps({k: v for k, v in cell_record(cells[2]).items() if k != "metrics"})
    paths[2].write_text(no_metrics)
    finished = paths[0].read_bytes(), paths[0].stat().st_mtime_ns

    assert run_grid(cells, out, progress=False) == []
    printed = capsys.readouterr().out
    assert f"{paths[1]} is not a cell record" in printed and f"{paths[1]}.damaged-1" in printed
    assert f"{paths[2]} is not a cell record: it lacks metrics" in printed and f"{paths[2]}.damaged" in printed
    assert "1 of 4 cells already done" in printed
    # Moved aside, not deleted (an older damaged copy kept too); every cell finished, the good one not rerun.
    assert paths[1].with_name(paths[1].name + ".damaged-1").read_text() == truncated
    assert paths[1].with_name(paths[1].name + ".damaged").read_text() == "an older damaged copy"
    assert paths[2].with_name(paths[2].name + ".damaged").read_text() == no_metrics
    assert [read_cell(p)["name"] for p in paths] == [c.name for c in cells]
    assert (paths[0].read_bytes(), paths[0].stat().st_mtime_ns) == finished
    assert not list(out.glob("cells/*.config.json"))


def test_one_writer_per_folder(tmp_path, capsys, stand_in_cells):
    out = tmp_path / "grid"
    argv = ["--quick", "--algorithms", "sft", "--seeds", "0", "--out", str(out), "--no-progress"]
    with FolderLock(out):  # another run holds the folder
        assert main(argv) == 2
        assert main(["--report-only", *argv]) == 2
        error = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {os.getpid()})" in error
    assert not (out / "cells").exists()  # nothing ran

    # Another process holds it: refused, naming that process; once it dies (SIGKILL), the folder is free.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlhf_env.files import FolderLock\n"
                               "lock = FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(argv) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.communicate()
    with FolderLock(out):
        pass


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# A stand-in for a long cell: it writes its pid next to its OUT, then sleeps; asked to stop (SIGTERM), it notes it.
SLEEPING_CELL = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[2])

def stop(signum, frame):
    out.with_name("stopped").write_text("SIGTERM")
    sys.exit(1)

signal.signal(signal.SIGTERM, stop)
out.with_name("pid.tmp").write_text(str(os.getpid()))
os.replace(out.with_name("pid.tmp"), out.with_name("pid"))
time.sleep(120)
"""
# A grid of one such cell.
SLEEPING_GRID = """
import sys
from pathlib import Path
import benchmarks.run as run
from benchmarks.cell import CellConfig
run.CELL_COMMAND = [sys.executable, sys.argv[2]]
run.run_grid([CellConfig("sft")], Path(sys.argv[1]), progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda how: how.name)
def test_a_killed_grid_takes_its_cell_with_it(tmp_path, how):
    (tmp_path / "sleeping_cell.py").write_text(SLEEPING_CELL)
    # A test run started in the background by a shell without job control (`cmd &` in a script) ignores SIGINT,
    # and so would the grid, which inherits it: Ctrl-C reaches a foreground grid, so the grid gets SIGINT back.
    grid = subprocess.Popen([sys.executable, "-c", SLEEPING_GRID, str(tmp_path / "grid"),
                             str(tmp_path / "sleeping_cell.py")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid_file = tmp_path / "grid" / "cells" / "pid"
    cell = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert grid.poll() is None and time.monotonic() < deadline, grid.communicate()
            time.sleep(0.05)
        cell = int(pid_file.read_text())
        assert _alive(cell)
        grid.send_signal(how)
        _, error = grid.communicate(timeout=90)  # seconds on an idle machine; generous for a loaded one
        deadline = time.monotonic() + 5
        while _alive(cell) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(cell), f"the cell outlived its grid ({how.name})"
        if how != signal.SIGKILL:  # stopped (SIGTERM) and waited for by the grid itself, which says so
            assert (tmp_path / "grid" / "cells" / "stopped").is_file()
            assert "cell sft-sentiment" in error and "was stopped" in error, error
            assert grid.returncode == (128 + signal.SIGTERM if how == signal.SIGTERM else -signal.SIGINT)
    finally:  # the cell first: it holds the grid's output pipes, which communicate() reads to their end
        if cell is not None and _alive(cell):
            os.kill(cell, signal.SIGKILL)
        grid.kill()
        grid.communicate()  # reaps the grid and closes its pipes (no ResourceWarning in a later test)
