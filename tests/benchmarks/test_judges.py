"""The judge benchmark's command runs end to end at a toy size and writes its rows with the commit."""

import json

from benchmarks.judges import COLUMNS, main


def test_the_judge_benchmark_writes_rows_and_a_table(tmp_path, capsys):
    out = tmp_path / "judges.json"
    results = main(["--labels", "0,4", "--steps", "2", "--batch-size", "4", "--eval-pairs", "12", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert [r["labels"] for r in results["rows"]] == [0, 4] and results["eval_pairs"] == 12
    assert all(r["n_pairs"] == 12 and 0 <= r["agreement_gold"] <= 1 for r in results["rows"])
    assert "reward_model_accuracy_gold" in results["rows"][1] and "reward_model_accuracy_gold" not in results["rows"][0]
    assert results["command"].startswith("python -m benchmarks.judges --labels 0,4")
    assert results["references"]["reward_model_accuracy_gold"] > 0.85  # the shipped RM, from its manifest
    printed = capsys.readouterr().out
    assert "| " + " | ".join(COLUMNS) + " |" in printed and "\n| 4 | " in printed
