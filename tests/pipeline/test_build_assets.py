import json

import pytest
import torch

import rlhf_env.files as files
import rlhf_env.pipeline.assets as building
from rlhf_env.assets import MANIFEST, file_hashes, load_assets, load_preference_pairs
from rlhf_env.assets.__main__ import main as assets_main
from rlhf_env.jsonl import write_jsonl
from rlhf_env.lm import response_logprobs
from rlhf_env.pipeline.assets import BuildConfig, build_assets, check_replaceable
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
                 "reward_model/config.json", "preferences/pairs_train.jsonl",
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
    # The reward model is a standard classifier: transformers' own load and forward pay the same, centred scores.
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a/reward_model").eval()
    prompts, responses = [g["prompt"] for g in groups[:4]], [g["responses"][0] for g in groups[:4]]
    with torch.no_grad():
        own = [float(classifier(input_ids=torch.tensor([tokenizer(p)["input_ids"] + tokenizer(
            r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])).logits[0, 0])
               for p, r in zip(prompts, responses)]
    assert torch.allclose(torch.tensor(own), score_texts(reward_model, tokenizer, prompts, responses), atol=1e-5)
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
    assert {p["labeler"] for p in original} == {"simulated"}

    stale = [{k: v for k, v in p.items() if k != "labeler"} for p in original]  # an older release's cached file
    write_jsonl(pairs_file, stale)
    assert load_preference_pairs(tmp_path / "a") == original
    assert load_pairs(pairs_file) == original  # replaced by the re-derived file

    pairs_file.unlink()
    groups_file = tmp_path / "a/preferences/groups_train.jsonl"
    groups_file.write_text(groups_file.read_text().replace('"gold": [', '"gold": [0.99, ', 1)
                           .replace('"responses": [', '"responses": ["the plot", ', 1))
    with pytest.raises(ValueError, match="does not match the manifest"):
        load_preference_pairs(tmp_path / "a")


def _users_project(folder):
    """A folder of someone's work that a build must not touch."""
    (folder / "src").mkdir(parents=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "src" / "main.py").write_text("print('hi')\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Any build that gets past its checks fails at once (the refusals must come before the minutes-long work)."""
    def started(*args, **kwargs):
        raise AssertionError("the build started")

    monkeypatch.setattr(building, "train_tokenizer", started)


def _fake_previous_build(folder):
    """What a previous build leaves: files, and a manifest whose sha256 lists every one of them."""
    for name, text in [("policy/model.safetensors", "old weights"), ("preferences/pairs_train.jsonl", "{}\n")]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    manifest = {"task": "sentiment", "sha256": file_hashes(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_a_build_never_deletes_what_it_did_not_make(tmp_path, no_training):
    project = tmp_path / "my project"
    before = _users_project(project)
    with pytest.raises(ValueError, match="my project.*src, thesis.txt"):
        build_assets("sentiment", project, BuildConfig.quick(), progress=False)
    assert _contents(project) == before

    # A previous build with someone's file added beside it: the file is named, nothing is touched.
    previous = tmp_path / "assets"
    _fake_previous_build(previous)
    (previous / "preferences" / "notes.txt").write_text("mine")
    before = _contents(previous)
    with pytest.raises(ValueError, match="manifest.json does not list preferences/notes.txt"):
        build_assets("sentiment", previous, BuildConfig.quick(), progress=False)
    assert _contents(previous) == before

    # A manifest.json that is not a build's (no "sha256") does not make the folder a build.
    other = tmp_path / "checkpoint"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"files": {}}))
    with pytest.raises(ValueError, match="neither empty nor a task.s assets.*holds manifest.json"):
        check_replaceable(other)
    (other / MANIFEST).write_text('{"sha256": {')  # truncated
    with pytest.raises(ValueError, match="checkpoint"):
        check_replaceable(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "checkpoint", "my project"]  # no temp sibling

    # Missing, empty, and a previous build are fine.
    check_replaceable(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    (previous / "preferences" / "notes.txt").unlink()
    check_replaceable(previous)


def test_the_cli_refuses_a_folder_of_other_files_before_building(tmp_path, monkeypatch, capsys, no_training):
    project = tmp_path / "my project"
    before = _users_project(project)
    with pytest.raises(SystemExit) as exit_:
        assets_main(["build", "--quick", "--no-progress", "--out", str(project)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "my project" in error and "thesis.txt" in error and "src" in error
    assert _contents(project) == before

    monkeypatch.chdir(project)  # `--out .` must not empty the working directory
    with pytest.raises(SystemExit) as exit_:
        assets_main(["build", "--quick", "--no-progress", "--out", "."])
    assert exit_.value.code == 2 and "thesis.txt" in capsys.readouterr().err
    assert _contents(project) == before


def test_a_rebuild_replaces_the_previous_build_in_one_step_whenever_it_stops(tmp_path, monkeypatch):
    out = tmp_path / "assets"
    out.mkdir()
    previous = _fake_previous_build(out)
    seen = []
    for stop_at in range(1, 10):
        def hook(name, stop_at=stop_at):
            seen.append(name)
            if len(seen) == stop_at:
                raise KeyboardInterrupt(f"killed at {name}")

        seen.clear()
        monkeypatch.setattr(files, "FAULT_HOOK", hook)
        try:
            manifest = build_assets("sentiment", out, BuildConfig.quick(), progress=False)
        except KeyboardInterrupt:
            # Stopped at a fault point: the previous build, complete, or the new one, complete.
            manifest = json.loads((out / MANIFEST).read_text())
            assert manifest == previous or manifest["task"] == "sentiment" and "config" in manifest, seen[-1]
            assert file_hashes(out) == manifest["sha256"], seen[-1]
            assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"], seen[-1]  # no temporary sibling
            continue
        break
    assert "filled" in seen and stop_at > 2  # the swap has fault points, and each one was tried
    monkeypatch.setattr(files, "FAULT_HOOK", None)
    assert file_hashes(out) == manifest["sha256"] and manifest != previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]

    # load_preference_pairs re-derives pairs_train.jsonl into the folder: still a build's own file.
    (out / "preferences" / "pairs_train.jsonl").unlink()
    load_preference_pairs(out)
    check_replaceable(out)
