"""The GPU check script itself, on a machine without a GPU: its plan, its parsing of each step, its report."""

import json

import pytest
import torch

import benchmarks.gpu_check as gpu_check


def test_the_plan_has_every_step_and_the_two_process_run_only_with_two_gpus(tmp_path):
    names = [name for name, *_ in gpu_check.steps("cuda", False, gpus=1, out=tmp_path)]
    assert names == ["cuda tests", "throughput fp32", "throughput bf16", "rloo learning"]
    plan = gpu_check.steps("cuda", False, gpus=2, out=tmp_path)
    assert plan[-1][0] == "rloo 2 processes" and "--nproc_per_node" in plan[-1][1]
    assert sum(limit for _, _, limit, _ in plan) <= 8 * 60  # the budget for the whole check
    assert all("--device" not in command or command[command.index("--device") + 1] == "cuda"
               for _, command, _, _ in plan)


def test_each_step_s_numbers_are_read_from_its_output():
    throughput = {"throughput": [{"batch": 64, "env_tokens_per_s": 900, "generate_tokens_per_s": 1500,
                                  "env_over_generate": 0.6}]}
    step = {"name": "throughput bf16", "output_tail": "a warning\n" + json.dumps(throughput, indent=2)}
    assert gpu_check.result_of(step) == "batch 64: env 900 tok/s, generate 1500 tok/s (0.6×)"
    summary = {"eval_before": {"objective/gold_score": -0.04, "objective/kl": 0.0}, "timesteps": 150000,
               "eval_after": {"objective/gold_score": 0.5, "objective/kl": 1.25}, "train_seconds": 30.0,
               "processes": 2, "config": {"nested": {"x": 1}}}
    step = {"name": "rloo 2 processes", "output_tail": "log line {not json}\n" + json.dumps(summary, indent=2)}
    assert gpu_check.result_of(step) == ("held-out gold -0.040 → 0.500, KL 1.25, 150000 env steps in 30.0 s on 2 "
                                         "process(es)")
    assert gpu_check.result_of({"name": "cuda tests", "output_tail": "...\n5 passed in 3.1s\n"}) == "5 passed in 3.1s"
    assert gpu_check.result_of({"name": "rloo learning", "output_tail": "Traceback: boom"}) == ""
    record = {"commit": "abc", "date": "today", "argv": [], "machine": {"gpus": []},
              "steps": [{"name": "cuda tests", "exit_code": 0, "seconds": 1.0, "result": "5 passed"}]}
    assert "| cuda tests | 0 | 1.0 | 5 passed |" in gpu_check.summarise(record)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_check_says_so_and_writes_nothing(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu_with_tiny_budgets(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["exit_code"] for s in record["steps"]] == [0, 0, 0, 0]
    assert all(s["result"] for s in record["steps"])
    assert "| rloo learning | 0 |" in (tmp_path / "gpu_check.md").read_text()
