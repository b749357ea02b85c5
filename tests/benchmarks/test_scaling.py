"""The scaling benchmark (`benchmarks.scaling`) times what it says; its full run (three settings in fresh
processes, one of them torchrun) is marked slow."""

import pytest

from benchmarks.scaling import SETTINGS, main, measure, table


def test_one_process_times_the_stated_updates():
    result = measure("rloo", episodes=8, max_new_tokens=4, updates=2, warmup=0)
    assert result["processes"] == 1 and result["updates_timed"] == 2
    assert result["seconds_per_update"] > 0 and 8 <= result["tokens_per_update"] <= 8 * 4
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_update"] / result["seconds_per_update"],
                                                   rel=0.5)


def test_the_table_compares_each_setting_with_one_process_one_thread():
    rows = [{"processes": p, "threads": t, "seconds_per_update": 1.0 / (i + 1), "tokens_per_s": 100.0 * (i + 1)}
            for i, (p, t) in enumerate(SETTINGS)]
    lines = table(rows).splitlines()
    assert lines[2] == "| 1 process(es) × 1 thread(s) | 1.000 | 100 | 1.00× |"
    assert lines[3] == "| 2 process(es) × 1 thread(s) | 0.500 | 200 | 2.00× |"


def test_an_odd_batch_is_refused():
    with pytest.raises(SystemExit):
        main(["--episodes", "7"])


@pytest.mark.slow
def test_every_setting_runs_in_fresh_processes(tmp_path):
    report = main(["--episodes", "8", "--max-new-tokens", "4", "--updates", "1", "--warmup", "0",
                   "--out", str(tmp_path / "scaling.json")])
    assert [(r["processes"], r["threads"]) for r in report["settings"]] == SETTINGS
    assert (tmp_path / "scaling.json").is_file()
