"""benchmarks.throughput on other architectures: a random model of the built-in policy's size, decoded by the env
through its own forward and compared with its own generate."""

import json

import pytest

import benchmarks.throughput as throughput
from rlhf_env.models import choose_backend


@pytest.mark.parametrize("arch", sorted(throughput.ARCHITECTURES))
def test_each_architecture_is_the_built_in_size_on_its_backend(arch):
    envs = throughput.make_env(batch=2, length=4, device="cpu", dtype="float32", arch=arch)
    policy = envs.world.policy
    assert type(policy).__name__ == throughput.ARCHITECTURES[arch][1]
    assert policy.config.hidden_size == 128 and policy.config.num_hidden_layers == 2
    expected = "hf" if arch == "gpt_neox" else "llama"  # the Llama family decodes on its lean path
    assert choose_backend(policy) == expected == envs.world.backends["policy"]
    assert envs.world.reference is not policy


def test_the_command_reports_env_and_generate_tokens_per_second_for_the_arch(capsys):
    throughput.main(["--arch", "qwen2", "--batches", "2", "--length", "4", "--lengths", "4", "--steps", "8",
                     "--repeats", "1", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "qwen2"
    row = report["throughput"][0]
    assert row["env_tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="unknown --arch 'mamba'"):
        throughput.arch_model("mamba")
