"""Every built-in task's assets ship inside the package: they must load and match their manifest; the default
task's must also meet the targets.

The targets are the foundation issue's acceptance numbers; the manifest records what the build measured.
`test_rebuild_reproduces_shipped_assets` (slow) rebuilds from seed 0 and compares every file bit for bit.
"""

import json

import pytest
import torch

from rlhf_env.assets import MANIFEST, asset_dir, file_hashes, load_assets, load_preference_pairs
from rlhf_env.assets.__main__ import main as assets_main
from rlhf_env.pipeline.reward_training import evaluate_reward_model
from rlhf_env.tasks import TASKS

SHIPPED = asset_dir("sentiment")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((SHIPPED / MANIFEST).read_text())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_files_match_their_manifest(task):
    manifest = json.loads((asset_dir(task) / MANIFEST).read_text())
    shipped = file_hashes(asset_dir(task))
    unshipped = {"preferences/pairs_train.jsonl"}  # re-derived on demand, see load_preference_pairs
    assert set(manifest["sha256"]) - set(shipped) <= unshipped
    for name, digest in shipped.items():
        assert manifest["sha256"][name] == digest, name


def test_file_hashes_ignore_the_library_release_that_wrote_a_config_and_nothing_else(tmp_path):
    # transformers writes its own version into config.json: a rebuild under a newer release must still compare
    # equal when every computed value is (the check failed on every config when 5.24 replaced 5.23).
    config = {"n_embd": 128, "transformers_version": "5.23.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "weights.json").write_text(json.dumps({"transformers_version": "5.23.0", "w": [1.0]}))
    before = file_hashes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, transformers_version="5.99.0"), indent=4))
    assert file_hashes(tmp_path) == before
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_embd=256)))
    assert file_hashes(tmp_path)["config.json"] != before["config.json"]
    (tmp_path / "weights.json").write_text(json.dumps({"transformers_version": "5.23.0", "w": [2.0]}))
    assert file_hashes(tmp_path)["weights.json"] != before["weights.json"]


def test_shipped_build_met_the_targets(manifest):
    sft, rm = manifest["sft"], manifest["reward_model"]
    assert sft["perplexity_ratio"] <= 1.05
    assert sft["grammar_pass"] >= 0.90
    assert sft["eos_rate"] >= 0.98
    assert rm["accuracy_gold"] >= 0.85
    assert manifest["seconds"]["total"] < 300


def test_shipped_reward_model_reproduces_its_reported_accuracy(manifest):
    tokenizer, policy, reward_model = load_assets(SHIPPED)
    eval_pairs = load_preference_pairs(SHIPPED, "eval")
    report = evaluate_reward_model(reward_model, tokenizer, eval_pairs)
    assert report["accuracy_gold"] == pytest.approx(manifest["reward_model"]["accuracy_gold"], abs=1e-9)
    assert not policy.training and not reward_model.training
    assert all(p.dtype == torch.float32 for p in policy.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_rebuild_reproduces_shipped_assets(task):
    assert assets_main(["check", "--task", task, "--no-progress"]) == 0
