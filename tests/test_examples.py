"""The scripts in examples/ run as a user runs them (tiny budgets here; their full runs are in the README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import sb3 as sb3_benchmark

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_custom_agent_example_is_short_and_runs():
    assert len((EXAMPLES / "custom_agent.py").read_text().splitlines()) <= 50
    out = _run("custom_agent.py", "2")
    assert "update   1  mean gold" in out


def test_sb3_example_trains_and_reports_both_policies():
    out = _run("sb3_ppo.py", "--timesteps", "256", "--eval-episodes", "16")
    result = json.loads(out[out.index("{"):])
    for policy in ("uniform_random", "trained"):
        assert result[policy]["episodes"] == 16 and -1 <= result[policy]["gold_score"] <= 1
    assert result["uniform_random"]["kl_sum"] > 0


def test_own_model_example_runs_ppo_on_a_local_model_and_prompt_file():
    assert "held-out gold" in _run("own_model.py", "--updates", "1")


def test_own_stack_example_trains_lora_with_rloo_on_a_chat_model_an_rm_with_its_own_tokenizer_and_a_rule(tmp_path):
    pytest.importorskip("peft")  # the extras it names: lora and datasets
    pytest.importorskip("datasets")
    out = _run("own_stack.py", "--updates", "2", "--eval-episodes", "16", "--out", str(tmp_path))
    assert "episodes end at ['<eos>', '<|im_end|>']" in out  # the chat template's end-of-turn token
    assert "reward model 'rm' reads the text with its own tokenizer" in out
    before, after = (next(line for line in out.splitlines() if line.startswith(label)) for label in ("before", "after"))
    assert "x rm" in before and "x concise" in before and "KL 0.000 nats" in before  # LoRA starts at π_ref exactly
    assert "KL" in after
    adapters = tmp_path / "checkpoint" / "policy"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f.name for f in adapters.iterdir()}
    assert not (adapters / "model.safetensors").exists()  # the adapters only, no base weights


def test_sb3_benchmark_rows(capsys):
    result = sb3_benchmark.main(["--timesteps", "128", "--eval-episodes", "16", "--seeds", "0"])
    assert set(result) >= {"uniform_random", "ppo", "a2c", "commit"}
    row = result["a2c"][0]
    assert row["episodes"] == 16 and row["train_seconds"] >= 0 and 0 <= row["well_formed"] <= 1
