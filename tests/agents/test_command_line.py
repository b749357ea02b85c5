"""Each agent's command line describes every flag (the config fields' docstrings) and offers the choices of its
string options."""

import subprocess
import sys

import pytest

from agents.common import command_line, field_docs
from agents.dpo import DPOConfig
from agents.ppo import PPOConfig
from agents.reinforce import ReinforceConfig

CONFIGS = {"ppo": PPOConfig, "reinforce": ReinforceConfig, "dpo": DPOConfig}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_flag_has_a_description(name):
    config_cls = CONFIGS[name]
    parser = command_line("test", config_cls)
    undocumented = [action.option_strings for action in parser._actions if not action.help]
    assert undocumented == []
    assert set(field_docs(config_cls)) == {f for f in config_cls.__dataclass_fields__}  # every field documented


def test_string_options_offer_their_choices_and_none_is_parsed():
    args = command_line("test", ReinforceConfig).parse_args(["--baseline", "value", "--micro-batch-size", "none"])
    assert args.baseline == "value" and args.micro_batch_size is None
    with pytest.raises(SystemExit):
        command_line("test", ReinforceConfig).parse_args(["--baseline", "rlooo"])


def test_help_prints_each_description():
    out = subprocess.run([sys.executable, "-m", "agents.ppo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "Passes over each batch (K)." in " ".join(out.split()) and "{zero,small,reward_model}" in out
