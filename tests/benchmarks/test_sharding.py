"""The FSDP benchmark (`benchmarks.sharding`) reports what each rank holds and what a rollout costs; its run (2
fresh torchrun processes) is marked slow."""

import pytest

from benchmarks.sharding import MODES, main, table


def test_the_table_puts_each_rank_s_bytes_side_by_side_and_each_rollout_against_whole_weights():
    whole = {"parameters": 2**21, "gradients": 2**21, "adam_moments": 2**22, "reference": 2**21}
    fsdp = {key: value // 2 for key, value in whole.items()} | {"reference": 2**21}
    report = {"bytes_per_rank": {"whole": whole, "fsdp": fsdp},
              "rollout_seconds": {mode: 0.5 * (i + 1) for i, mode in enumerate(MODES)}}
    lines = table(report).splitlines()
    assert lines[2] == "| parameters | 2.00 MiB | 1.00 MiB |" and lines[5] == "| reference | 2.00 MiB | 2.00 MiB |"
    assert lines[9] == "| whole, gpt2 | 0.500 | 1.00× |"
    assert lines[12] == "| FSDP, all-gather per forward, hf | 2.000 | 4.00× |"


@pytest.mark.slow
def test_two_fsdp_processes_hold_half_of_the_training_state(tmp_path):
    report = main(["--rows", "4", "--max-new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "fsdp.json")])
    whole, fsdp = report["bytes_per_rank"]["whole"], report["bytes_per_rank"]["fsdp"]
    for key in ("parameters", "gradients", "adam_moments"):
        assert fsdp[key] == pytest.approx(whole[key] / 2, rel=0.01), key
    assert fsdp["reference"] == whole["reference"]  # π_ref stays whole
    assert set(report["rollout_seconds"]) == set(MODES) and (tmp_path / "fsdp.json").is_file()
