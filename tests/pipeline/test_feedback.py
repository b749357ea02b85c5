"""Reward models from AI feedback (rlhf_env.pipeline.feedback): the constitution's labels as documented, a build
that trains on the judge's labels (not the human ones) and writes all or nothing, and bad input refused first."""

import json

import pytest

import rlhf_env.pipeline.feedback as feedback
from rlhf_env.pipeline.assets import BuildConfig, build_assets
from rlhf_env.pipeline.judge_training import JudgeConfig
from rlhf_env.pipeline.labelers import label_pairs
from rlhf_env.reward_model import RewardModel
from rlhf_env.tasks.sentiment import keyword_sentiment


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A seconds-long build of the sentiment task's assets (the same code paths, tiny budgets)."""
    folder = tmp_path_factory.mktemp("assets") / "sentiment"
    build_assets("sentiment", folder, BuildConfig.quick(seed=1), progress=False)
    return folder


def test_the_constitution_reads_words_not_negation_and_gates_on_grammar():
    judge = feedback.constitution("sentiment")
    prompts = ["the plot was", "the plot was not", "the plot was", "the plot was"]
    a = ["good", "bad", "good good good", "good"]
    b = ["bad", "good", "bad", "great"]
    verdicts = judge.scores(prompts, a, b)
    # positive words: (p − n)/(p + n + 1) of each side, read without negation
    assert list(verdicts["positive words"]) == pytest.approx([0.5 - (-0.5), -0.5 - 0.5, 0.75 - (-0.5), 0.0])
    # well formed: "good good good" is adjective spam, which the grammar refuses; its weight 2 outweighs the words
    assert list(verdicts["well formed"]) == [0.0, 0.0, -1.0, 0.0]
    # "not bad" is positive on gold, negative to the word list: the constitution prefers "not good"
    assert list(judge.prefer(prompts, a, b)) == [1.0, 0.0, 0.0, 0.5]
    pairs = label_pairs(judge, prompts, a, b)  # the tie (good vs great) is dropped
    assert [(p["chosen"], p["labeler"]) for p in pairs] == [("good", "constitution"), ("good", "constitution"),
                                                           ("bad", "constitution")]
    assert keyword_sentiment(["x"], ["very good and great but dull"]) == [(2 - 1) / (3 + 1)]


def test_a_task_without_a_constitution_or_an_unknown_source_is_refused_before_any_labelling(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(feedback, "label_groups_by", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="no built-in constitution"):
        feedback.build_feedback_reward_model("rule_judge", tmp_path / "out", task="verbose", progress=False)
    with pytest.raises(ValueError, match="unknown feedback source 'crowd'"):
        feedback.build_feedback_reward_model("crowd", tmp_path / "out", task="sentiment", progress=False)
    assert not called and not (tmp_path / "out").exists()


def test_the_rule_judge_reward_model_is_trained_on_the_constitutions_labels(assets, tmp_path, monkeypatch):
    import rlhf_env.pipeline.feedback as module

    seen = {}
    real = module.train_reward_model

    def recording(model, tokenizer, pairs, groups, config, progress):
        seen["pairs"], seen["config"] = pairs, config
        return real(model, tokenizer, pairs, groups, config, progress)

    monkeypatch.setattr(module, "train_reward_model", recording)
    report = feedback.build_feedback_reward_model("rule_judge", tmp_path / "rm", directory=assets, progress=False)
    manifest = json.loads((assets / "manifest.json").read_text())
    assert {p["labeler"] for p in seen["pairs"]} == {"constitution"}
    judge = feedback.constitution("sentiment")
    assert all(judge.prefer([p["prompt"]], [p["chosen"]], [p["rejected"]])[0] == 1.0 for p in seen["pairs"])
    assert seen["config"].steps == manifest["config"]["reward"]["steps"]  # trained as the asset build trains
    assert seen["config"].seed == manifest["config"]["seed"] + 6
    assert report["labelling"]["labels"] == len(seen["pairs"]) <= report["labelling"]["comparisons"]
    assert 0 <= report["labelling"]["labels_agreement_gold"] <= 1
    assert {"accuracy_gold", "accuracy_labels", "offset"} <= set(report["reward_model"])
    assert json.loads((tmp_path / "rm" / "feedback.json").read_text())["source"] == "rule_judge"
    RewardModel.from_pretrained(tmp_path / "rm" / "reward_model")  # the standard format, loadable


def test_the_lm_judge_is_fine_tuned_on_a_few_human_labels_then_labels_everything(assets, tmp_path):
    report = feedback.build_feedback_reward_model("lm_judge", tmp_path / "rm", directory=assets, progress=False,
                                                  judge_config=JudgeConfig(steps=2, batch_size=4, warmup_steps=1))
    assert report["judge"]["human_labels"] == report["judge"]["n_pairs"] <= feedback.LM_JUDGE_LABELS
    assert {"agreement_gold", "position_disagreement"} <= set(report["judge"]["held_out"])
    assert report["labelling"]["labels"] > report["judge"]["human_labels"] // 2


def test_a_failed_build_leaves_nothing_behind(assets, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(feedback, "train_reward_model", broken)
    with pytest.raises(RuntimeError, match="killed"):
        feedback.build_feedback_reward_model("rule_judge", tmp_path / "rm", directory=assets, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_is_keyed_by_source_seed_and_world(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_GYM_CACHE", str(tmp_path))
    folders = {feedback.feedback_dir(s, "sentiment", seed) for s in feedback.SOURCES for seed in (0, 1)}
    assert len(folders) == 4 and all(f.parent == tmp_path / "feedback" for f in folders)
    built = []
    monkeypatch.setattr(feedback, "build_feedback_reward_model", lambda source, folder, **kw: (
        built.append(source), folder.mkdir(parents=True), (folder / feedback.REPORT).write_text("{}")))
    path = feedback.feedback_reward_model("rule_judge", "sentiment")
    assert feedback.feedback_reward_model("rule_judge", "sentiment") == path  # the second call reads the cache
    assert built == ["rule_judge"] and path == feedback.feedback_dir("rule_judge", "sentiment") / "reward_model"
