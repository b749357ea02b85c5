import json

import pytest
import torch

import rlhf_env.pipeline.assets as building
from rlhf_env.assets import load_assets
from rlhf_env.assets.__main__ import main as assets_main
from rlhf_env.lm import response_logprobs
from rlhf_env.pipeline.assets import BuildConfig, build_assets
from rlhf_env.text import encode_pairs, encode_prompts


def test_bad_prompts_are_refused_by_name(tokenizer):
    with pytest.raises(ValueError, match="prompt 1 .*tokenizes to no tokens"):
        encode_prompts(tokenizer, ["the plot", ""], max_length=64)
    with pytest.raises(ValueError, match="prompt 0 .*tokenizes to no tokens"):
        encode_prompts(tokenizer, ["   "], max_length=64)
    with pytest.raises(ValueError, match="prompt 0 is 41 tokens long, more than the 32"):
        encode_prompts(tokenizer, ["the plot was good " * 10], max_length=32)
    with pytest.raises(ValueError, match="example 0: query \\+ response is"):
        encode_pairs(tokenizer, ["the plot was"], ["good and great " * 10], max_length=16)


def test_quick_build_is_bitwise_reproducible(tmp_path):
    a = build_assets("sentiment", tmp_path / "a", BuildConfig.quick(seed=3), progress=False)
    b = build_assets("sentiment", tmp_path / "b", BuildConfig.quick(seed=3), progress=False)
    c = build_assets("sentiment", tmp_path / "c", BuildConfig.quick(seed=4), progress=False)
    assert a["sha256"] == b["sha256"]
    assert a["sha256"]["policy/model.safetensors"] != c["sha256"]["policy/model.safetensors"]
    for name in ("tokenizer/tokenizer.json", "policy/model.safetensors", "reward_model/model.safetensors",
                 "reward_model/reward_head.safetensors", "preferences/pairs_train.jsonl",
                 "preferences/groups_eval.jsonl"):
        assert name in a["sha256"]


def test_built_assets_load_and_the_rm_is_centred_on_sft_samples(tmp_path):
    build_assets("sentiment", tmp_path / "a", BuildConfig.quick(), progress=False)
    tokenizer, policy, reward_model = load_assets(tmp_path / "a")
    groups = [json.loads(line) for line in (tmp_path / "a/preferences/groups_train.jsonl").read_text().splitlines()]
    from rlhf_env.pipeline.reward_training import score_texts

    scores = score_texts(reward_model, tokenizer, [g["prompt"] for g in groups for _ in g["responses"]],
                         [r for g in groups for r in g["responses"]])
    assert abs(float(scores.mean())) < 1e-4
    batch = encode_pairs(tokenizer, ["the plot was"], ["good"], 64).rows(slice(None))
    assert torch.isfinite(response_logprobs(policy, *batch)).all()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(building, "train_reward_model", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        build_assets("sentiment", tmp_path / "out", BuildConfig.quick(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_into_a_directory(tmp_path, capsys):
    assert assets_main(["build", "--quick", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"perplexity_ratio"' in out and "assets written to" in out
    assert (tmp_path / "s" / "manifest.json").is_file()


def test_loading_a_non_asset_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not an asset directory"):
        load_assets(tmp_path)


def test_unshipped_pairs_are_rederived_bit_for_bit(tmp_path):
    from rlhf_env.assets import load_preference_pairs
    from rlhf_env.pipeline.preferences import load_pairs

    build_assets("sentiment", tmp_path / "a", BuildConfig.quick(), progress=False)
    pairs_file = tmp_path / "a/preferences/pairs_train.jsonl"
    original = load_pairs(pairs_file)
    pairs_file.unlink()
    assert load_preference_pairs(tmp_path / "a") == original
    assert load_pairs(pairs_file) == original  # written back next to the groups

    pairs_file.unlink()
    groups_file = tmp_path / "a/preferences/groups_train.jsonl"
    groups_file.write_text(groups_file.read_text().replace('"gold": [', '"gold": [0.99, ', 1)
                           .replace('"responses": [', '"responses": ["the plot", ', 1))
    with pytest.raises(ValueError, match="does not match the manifest"):
        load_preference_pairs(tmp_path / "a")
