"""The grid's files: damaged cell records are named, and every file is written whole or not at all."""

import json

import pytest

import benchmarks.cell as cell
import rlhf_env.files as files
from benchmarks.cell import CellConfig
from benchmarks.report import report
from benchmarks.results import load_cells, read_cell, write_report
from benchmarks.run import main

CELLS = [CellConfig("optimum", budget=8, eval_episodes=4), CellConfig("sft", eval_episodes=16),
         CellConfig("rloo", budget=100, eval_episodes=16)]
REPORT = ["results.md", "results.json", "frontier.png", "overoptimisation.png", "learning_curves.png"]


def _write_cells(out, cell_record, gold=0.1):
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for config in CELLS:
        (out / "cells" / f"{config.name}.json").write_text(json.dumps(cell_record(config, gold)))


def _stop_at(monkeypatch, n: int, seen: list):
    """Make the n-th fault point raise, as if the process were killed there."""
    def hook(name):
        seen.append(name)
        if len(seen) == n:
            raise KeyboardInterrupt(f"killed at {name}")

    seen.clear()
    monkeypatch.setattr(files, "FAULT_HOOK", hook)


def _temporary_files(folder):
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name)


def test_a_damaged_cell_record_is_named_and_the_report_goes_on_without_it(tmp_path, capsys, cell_record):
    out = tmp_path / "grid"
    _write_cells(out, cell_record)
    damaged = {"truncated": json.dumps(cell_record(CellConfig("ppo", budget=100)))[:200],
               "a-list": "[1, 2]",
               "no-metrics": json.dumps({k: v for k, v in cell_record(CellConfig("dpo", budget=9)).items()
                                         if k != "metrics"}),
               "no-task": json.dumps({**cell_record(CellConfig("sft", seed=1)),
                                      "config": {"algorithm": "sft", "reward": "rm", "beta": 0.1, "budget": 0,
                                                 "seed": 1}})}
    for name, text in damaged.items():
        (out / "cells" / f"{name}.json").write_text(text)
    for name, reason in [("truncated", "does not parse"), ("a-list", "not an object"),
                         ("no-metrics", "lacks metrics"), ("no-task", "lacks config.task")]:
        with pytest.raises(ValueError, match=f"{name}.json is not a cell record.*{reason}"):
            read_cell(out / "cells" / f"{name}.json")

    assert sorted(c["name"] for c in load_cells(out)) == sorted(c.name for c in CELLS)
    error = capsys.readouterr().err
    assert all(f"{name}.json" in error for name in damaged)

    # --report-only reports the good cells, names the damaged ones and leaves them where they are.
    (out / "commands.txt").write_text("python -m benchmarks.run --quick\npython -m benchmarks.run --see")  # torn
    assert main(["--report-only", "--out", str(out), "--no-progress"]) == 0
    assert "truncated.json" in capsys.readouterr().err
    table = (out / "results.md").read_text()
    assert "3 cells from `python -m benchmarks.run --quick`;" in table and "--see" not in table
    assert all((out / "cells" / f"{name}.json").read_text() == text for name, text in damaged.items())


def test_the_report_files_are_the_old_ones_or_the_new_ones_wherever_it_stops(tmp_path, monkeypatch, cell_record):
    out = tmp_path / "grid"
    _write_cells(out, cell_record, gold=0.1)
    write_report(out)
    old = {name: (out / name).read_bytes() for name in REPORT}
    _write_cells(out, cell_record, gold=0.4)  # new numbers: every file changes
    seen, states = [], []
    for stop_at in range(1, 20):
        _stop_at(monkeypatch, stop_at, seen)
        try:
            write_report(out)
        except KeyboardInterrupt:
            states.append((seen[-1], {name: (out / name).read_bytes() for name in REPORT}))
            assert _temporary_files(out) == [], seen[-1]
            continue
        break
    assert len(states) >= len(REPORT)  # a fault point in every file's write, each one tried
    new = {name: (out / name).read_bytes() for name in REPORT}
    assert all(new[name] != old[name] for name in REPORT)
    for point, state in states:
        for name in REPORT:
            assert state[name] in (old[name], new[name]), (point, name)


def test_a_cell_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch, cell_record):
    config = CellConfig("sft")
    monkeypatch.setattr(cell, "run_cell", lambda config, progress=True: cell_record(config))
    (tmp_path / "config.json").write_text(json.dumps(cell_record(config)["config"]))
    seen = []
    _stop_at(monkeypatch, 1, seen)
    with pytest.raises(KeyboardInterrupt):
        cell.main([str(tmp_path / "config.json"), str(tmp_path / "cell.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no record, no partial file

    monkeypatch.setattr(files, "FAULT_HOOK", None)
    cell.main([str(tmp_path / "config.json"), str(tmp_path / "cell.json")])
    assert read_cell(tmp_path / "cell.json") == cell_record(config)


def test_a_benchmarks_json_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    path = tmp_path / "speed.json"
    report({"rows": 1}, str(path))
    seen = []
    _stop_at(monkeypatch, 1, seen)
    with pytest.raises(KeyboardInterrupt):
        report({"rows": 2}, str(path))
    assert json.loads(path.read_text()) == {"rows": 1} and _temporary_files(tmp_path) == []


def test_runs_on_other_feedback_or_processes_are_rows_of_their_own(tmp_path, cell_record):
    out = tmp_path / "bench"
    _write_cells(out, cell_record)
    for config in (CellConfig("rloo", budget=100, eval_episodes=16, feedback="iterated"),
                   CellConfig("rloo", budget=100, eval_episodes=16, feedback="lm_judge"),
                   CellConfig("rloo", budget=100, eval_episodes=16, processes=2)):
        (out / "cells" / f"{config.name}.json").write_text(json.dumps(cell_record(config, 0.3)))
    write_report(out)
    lines = [line.split(" | ") for line in (out / "results.md").read_text().splitlines()
             if line.startswith("| REINFORCE")]
    assert [line[0] for line in lines] == ["| REINFORCE + RLOO (K=4)", "| REINFORCE + RLOO (K=4), 2 processes",
                                           "| REINFORCE + RLOO (K=4), RM on LM-judge labels",
                                           "| REINFORCE + RLOO (K=4), iterated RM"]
    assert {line[4] for line in lines} == {"0.75"}  # the reward's agreement with gold on the policy's samples
    # the optimum is the task's own reward's: no share of it for rows that optimise another reward
    assert [line[7] for line in lines] == ["33%", "33%", "–", "–"]
    table = (out / "results.md").read_text()
    assert "| env steps/s |" in table
    assert "| 1 | 100 | 300 |" in table  # train time, env steps/s, peak memory of the made-up RLOO record
