"""Several rewards with weights (``rewards=``, ``reward_weights=``): each reward is reported as ``score/<name>`` and
paid as Σ w_i·r_i, each equals what that reward alone gives, weights change at the next episode only, bad input is
named and changes nothing, a NaN reward follows ``nonfinite_reward``, agents report ``objective/score/<name>`` and a
checkpoint remembers which rewards it was trained with."""

import logging
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.checkpoint import env_settings
from agents.evaluate import best_of_n, evaluate, kl_regularised_optimum
from agents.ppo import PPO, PPOConfig
from agents.rollout import collect_episodes, episode_stats
from rlhf_env.assets import asset_dir
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.reward import NonFiniteReward
from rlhf_env.tasks import get_task

RM = asset_dir("sentiment") / "reward_model"
TASK = get_task("sentiment")
N = 4  # max_new_tokens: short episodes


def length(prompts, responses):
    return [float(len(r.split())) for r in responses]


class Counting:
    """A batched reward function that records the size of each call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, prompts, responses):
        self.calls.append(len(prompts))
        return self.fn(prompts, responses)


def make(**kwargs):
    return gym.make("RLHF-v0", max_new_tokens=N, **kwargs)


def make_vec(num_envs, **kwargs):
    return gym.make_vec("RLHF-v0", num_envs=num_envs, max_new_tokens=N, **kwargs)


def episode(env, tokens=(7, 9), seed=0):
    """Reset with `seed`, step `tokens` then EOS; the last step's reward and info."""
    env.reset(seed=seed)
    for token in tokens:
        env.step(token)
    _, reward, terminated, _, info = env.step(env.unwrapped.world.eos_token_id)
    assert terminated
    return reward, info


THREE = {"rm": RM, "gold": TASK.gold_reward, "len": length}
WEIGHTS = [2.0, -0.5, 0.25]


def test_each_reward_is_reported_and_the_paid_score_is_their_weighted_sum():
    reward, info = episode(make(rewards=THREE, reward_weights=WEIGHTS))
    parts = [info["score/rm"], info["score/gold"], info["score/len"]]
    assert all(isinstance(p, float) and math.isfinite(p) for p in parts)
    assert info["score"] == pytest.approx(sum(w * r for w, r in zip(WEIGHTS, parts)), abs=1e-9)
    assert reward == pytest.approx(info["non_score_reward"] + info["score"], abs=1e-9)  # ended with EOS: no penalty
    assert info["score/len"] == 2.0 and abs(info["score/rm"] - info["score"]) > 1e-3  # the weights did apply


def test_each_reward_equals_what_it_gives_alone():
    _, info = episode(make(rewards=THREE, reward_weights=WEIGHTS))
    alone = {"rm": dict(reward_model=RM), "gold": dict(reward_fn=TASK.gold_reward), "len": dict(reward_fn=length)}
    for name, kwargs in alone.items():
        _, single = episode(make(**kwargs))
        assert info[f"score/{name}"] == single["score"], name
        assert not any(key.startswith("score/") for key in single)  # the single-reward env's info is as before


def test_a_list_of_rewards_is_named_r0_r1_and_weights_default_to_one():
    _, info = episode(make(rewards=[RM, length]))
    assert info["score"] == pytest.approx(info["score/r0"] + info["score/r1"], abs=1e-9)
    assert make(rewards=[RM, length]).unwrapped.reward_weights == {"r0": 1.0, "r1": 1.0}


def test_the_vector_env_stacks_each_reward_and_scores_each_reward_model_in_one_forward(monkeypatch):
    gold, short = Counting(TASK.gold_reward), Counting(length)
    envs = make_vec(4, rewards={"rm": RM, "gold": gold, "len": short}, reward_weights={"len": 0.5})
    model = envs.unwrapped.world.reward_sources[0].model
    forwards = []
    score = model.score
    monkeypatch.setattr(model, "score", lambda *a, **k: forwards.append(1) or score(*a, **k))
    envs.reset(seed=0)
    envs.step(np.full(4, 7))
    assert gold.calls == short.calls == [] and forwards == []
    _, rewards, terminated, _, infos = envs.step(np.full(4, envs.unwrapped.world.eos_token_id))
    assert terminated.all() and gold.calls == short.calls == [4] and forwards == [1]  # one call per reward per batch
    for key in ("score/rm", "score/gold", "score/len"):
        assert infos[key].shape == (4,) and infos[key].dtype == np.float64 and infos[f"_{key}"].all()
    expected = infos["score/rm"] + infos["score/gold"] + 0.5 * infos["score/len"]
    np.testing.assert_allclose(infos["score"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rewards, infos["non_score_reward"] + infos["score"], rtol=0, atol=1e-9)
    single = make_vec(4, reward_model=RM)
    single.reset(seed=0)
    single.step(np.full(4, 7))
    _, _, _, _, alone = single.step(np.full(4, single.unwrapped.world.eos_token_id))
    np.testing.assert_array_equal(infos["score/rm"], alone["score"])


def test_weights_change_at_the_next_episode_only():
    env = make(rewards={"rm": RM, "len": length})
    eos = env.unwrapped.world.eos_token_id
    env.reset(seed=0)
    env.step(7)
    env.unwrapped.set_reward_weights({"len": 3.0})  # mid-episode
    assert env.unwrapped.reward_weights == {"rm": 1.0, "len": 3.0}
    *_, info = env.step(eos)
    assert info["score"] == pytest.approx(info["score/rm"] + 1.0 * info["score/len"], abs=1e-9)  # the old weights
    _, info = episode(env, tokens=(7,), seed=1)
    assert info["score"] == pytest.approx(info["score/rm"] + 3.0 * info["score/len"], abs=1e-9)  # the new ones


def test_weights_change_at_each_rows_next_episode_in_the_vector_env():
    envs = make_vec(2, rewards={"rm": RM, "len": length})
    eos = envs.unwrapped.world.eos_token_id

    def paid(infos, row, w_len):
        return infos["score"][row] == pytest.approx(infos["score/rm"][row] + w_len * infos["score/len"][row],
                                                    abs=1e-9)

    envs.reset(seed=0)
    envs.step(np.array([7, 7]))
    envs.unwrapped.set_reward_weights([1.0, 3.0])  # both rows are mid-episode
    _, _, terminated, _, infos = envs.step(np.array([eos, 7]))
    assert terminated.tolist() == [True, False] and paid(infos, 0, 1.0)  # row 0 started before the change
    _, _, terminated, _, infos = envs.step(np.array([7, eos]))  # row 0 autoresets: its new episode starts now
    assert terminated.tolist() == [False, True] and paid(infos, 1, 1.0) and not infos["_score"][0]
    _, _, terminated, _, infos = envs.step(np.array([eos, 7]))  # row 1 autoresets
    assert terminated.tolist() == [True, False] and paid(infos, 0, 3.0)
    _, _, terminated, _, infos = envs.step(np.array([7, eos]))
    assert terminated.tolist() == [False, True] and paid(infos, 1, 3.0)


def test_weights_change_at_the_next_episode_with_same_step_autoreset():
    envs = make_vec(1, rewards={"rm": RM, "len": length}, autoreset_mode="SameStep")
    eos = envs.unwrapped.world.eos_token_id
    envs.reset(seed=0)
    envs.step(np.array([7]))
    envs.unwrapped.set_reward_weights({"len": -2.0})  # mid-episode
    _, _, _, _, infos = envs.step(np.array([eos]))  # ends, and the row's next episode starts in the same step
    final = infos["final_info"]
    assert final["score/len"][0] > 0  # a weight change shows
    assert final["score"][0] == pytest.approx(final["score/rm"][0] + final["score/len"][0], abs=1e-9)
    envs.step(np.array([7]))
    _, _, _, _, infos = envs.step(np.array([eos]))
    final = infos["final_info"]
    assert final["score"][0] == pytest.approx(final["score/rm"][0] - 2.0 * final["score/len"][0], abs=1e-9)


@pytest.mark.parametrize("weights, message", [
    ({"nope": 1.0}, r"unknown reward names \['nope'\]"),
    ([1.0], "1 weights for 2 rewards"),
    ([1.0, 2.0, 3.0], "3 weights for 2 rewards"),
    ({"len": float("nan")}, "weight of 'len' must be a finite real number"),
    ([1.0, float("inf")], "weight of 'len' must be a finite real number"),
    ({"rm": True}, "weight of 'rm' must be a finite real number"),
    ({"rm": "2"}, "weight of 'rm' must be a finite real number"),
    ("heavy", "must be a dict"),
])
def test_bad_weights_are_named_and_change_nothing(weights, message):
    env = make(rewards={"rm": RM, "len": length}, reward_weights={"len": 0.5})
    env.reset(seed=0)
    env.step(7)
    with pytest.raises(ValueError, match=message):
        env.unwrapped.set_reward_weights(weights)
    assert env.unwrapped.reward_weights == {"rm": 1.0, "len": 0.5}
    _, info = episode(env, tokens=(7,), seed=1)  # the next episode still uses the weights in force
    assert info["score"] == pytest.approx(info["score/rm"] + 0.5 * info["score/len"], abs=1e-9)
    with pytest.raises(ValueError, match=message):
        make(rewards={"rm": RM, "len": length}, reward_weights=weights)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards={"len": length}, reward_fn=length), "not both"),
    (dict(rewards={"len": length}, reward_model=RM), "not both"),
    (dict(rewards={}), "rewards is empty"),
    (dict(rewards=[]), "rewards is empty"),
    (dict(rewards=length), "must be a dict"),
    (dict(rewards={"": length}), "non-empty strings"),
    (dict(rewards={"a/b": length}), "without '/'"),
    (dict(rewards={"x": 3.0}), r"rewards\['x'\] must be callable"),
    (dict(rewards={"g": TASK.gold}), "task.gold_reward"),
    (dict(reward_weights=[1.0]), "single reward"),
    (dict(reward_fn=length, reward_weights={"reward_fn": 2.0}), "single reward"),
    (dict(rewards={"rm": RM}, reward_tokenizer=asset_dir("sentiment") / "tokenizer"), "reward_tokenizer"),
])
def test_bad_rewards_are_refused_when_the_env_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def classifier(tokenizer, vocab_size=None):
    """A tiny random GPT-2 sequence classifier (num_labels=1) for `tokenizer`."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_()
    return model


def test_a_reward_model_with_its_own_tokenizer_in_rewards_scores_as_it_does_alone(tmp_path):
    bpe = train_tokenizer(TASK.train_prompts()[:400], kind="bpe", vocab_size=300)
    classifier(bpe).save_pretrained(tmp_path / "rm")
    bpe.save_pretrained(tmp_path / "rm")  # its own tokenizer, in its folder
    env = make(rewards={"own": tmp_path / "rm", "rm": RM})
    assert env.unwrapped.world.reward_sources[0].tokenizer is not None  # re-encodes the text
    assert env.unwrapped.world.reward_sources[1].tokenizer is None  # reads the env's ids
    _, info = episode(env)
    _, alone = episode(make(reward_model=tmp_path / "rm"))
    assert info["score/own"] == alone["score"] and math.isfinite(info["score/own"])


def test_each_reward_model_in_rewards_is_checked_as_reward_model_is():
    small = classifier(make().unwrapped.tokenizer, vocab_size=10)  # reads the env's ids, with too few rows
    with pytest.raises(ValueError, match="reward model 'small''s vocabulary"):
        make(rewards={"rm": RM, "small": small})
    with pytest.raises(ValueError, match="reward model's vocabulary"):
        make(reward_model=small)


def test_a_single_reward_env_refuses_weights():
    env = make(reward_fn=length)
    with pytest.raises(ValueError, match="single reward"):
        env.unwrapped.set_reward_weights([2.0])
    assert env.unwrapped.world.reward_model is None and env.unwrapped.world.reward_names == []


def nan_reward(prompts, responses):
    return [float("nan")] * len(prompts)


def test_a_nan_reward_is_named_under_raise_and_the_step_changes_nothing():
    env = make(rewards={"rm": RM, "broken": nan_reward}, reward_weights={"broken": 0.0})  # weight 0: still NaN
    env.reset(seed=0)
    before = env.unwrapped.next_token_logprobs
    with pytest.raises(NonFiniteReward, match="the reward 'broken' returned nan"):
        env.step(env.unwrapped.world.eos_token_id)
    np.testing.assert_array_equal(env.unwrapped.next_token_logprobs, before)  # the episode goes on
    assert env.unwrapped._episodes.responses[0] == []
    env.step(7)  # and can be stepped on
    envs = make_vec(2, rewards={"rm": RM, "broken": nan_reward})
    for evaluation in (lambda: best_of_n(envs, 2, 2), lambda: kl_regularised_optimum(envs, n_prompts=1, n_samples=2)):
        with pytest.raises(NonFiniteReward, match="the reward 'broken' returned nan"):
            evaluation()


def test_a_nan_reward_is_masked_under_mask_and_left_out_of_the_metrics():
    envs = make_vec(2, rewards={"rm": RM, "broken": nan_reward}, nonfinite_reward="mask")
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step(np.full(2, envs.unwrapped.world.eos_token_id))
    assert infos["score_nonfinite"].all() and (infos["score"] == 0.0).all()
    assert np.isnan(infos["score/broken"]).all() and np.isfinite(infos["score/rm"]).all()  # raw, as reported
    np.testing.assert_allclose(rewards, infos["non_score_reward"])
    episodes = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0))
    stats = episode_stats(episodes, 0.1, TASK)
    assert stats["episode/score_masked"] == 2 and math.isnan(stats["objective/score/rm"])


def test_episodes_and_evaluation_report_each_reward():
    envs = make_vec(4, rewards={"rm": RM, "len": length}, reward_weights=[1.0, 0.5])
    episodes = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0))
    assert sorted(episodes.component_scores) == ["len", "rm"]
    stats = episode_stats(episodes, 0.1, TASK)
    for name in ("rm", "len"):
        assert stats[f"objective/score/{name}"] == pytest.approx(np.mean(episodes.component_scores[name]))
    assert stats["objective/score"] == pytest.approx(stats["objective/score/rm"] + 0.5 * stats["objective/score/len"],
                                                     abs=1e-9)
    assert envs.unwrapped.reward_weights == {"rm": 1.0, "len": 0.5}
    evaluated = evaluate(envs, 4)
    assert {"objective/score/rm", "objective/score/len"} <= set(evaluated)
    assert evaluated["objective/score"] == pytest.approx(
        evaluated["objective/score/rm"] + 0.5 * evaluated["objective/score/len"], abs=1e-9)
    single = evaluate(make_vec(4), 4)
    assert not any(key.startswith("objective/score/") for key in single)


def test_best_of_n_and_the_optimum_use_the_weighted_score():
    short = Counting(length)
    envs = make_vec(4, rewards={"rm": RM, "len": short}, reward_weights={"len": -1.0})
    stats = best_of_n(envs, 4, 4, seed=0)
    assert short.calls == [16]  # one call for every sample
    assert stats["objective/score"] == pytest.approx(stats["objective/score/rm"] - stats["objective/score/len"],
                                                     abs=1e-9)
    rm_only = best_of_n(make_vec(4, rewards={"rm": RM, "len": length}, reward_weights={"len": 0.0}), 4, 4, seed=0)
    assert stats["objective/score/len"] <= rm_only["objective/score/len"]  # a length penalty picks shorter answers
    weighted = kl_regularised_optimum(envs, beta=0.1, n_prompts=2, n_samples=4)
    envs.unwrapped.set_reward_weights({"len": 0.0})
    assert kl_regularised_optimum(envs, beta=0.1, n_prompts=2, n_samples=4)["optimum"] != weighted["optimum"]


def test_value_init_from_the_reward_model_needs_a_single_reward_model():
    envs = make_vec(4, rewards={"rm": RM, "len": length})
    assert envs.unwrapped.reward_model is None
    config = PPOConfig(episodes_per_update=4, minibatch_size=4, update_epochs=1, separate_critic=True,
                       value_init="reward_model")
    with pytest.raises(ValueError, match=r"several rewards \['rm', 'len'\]"):
        PPO(envs, config, progress=False)


def test_a_checkpoint_remembers_its_rewards_and_allows_other_weights(tmp_path, caplog):
    config = PPOConfig(episodes_per_update=4, minibatch_size=4, update_epochs=1)
    agent = PPO(make_vec(4, rewards={"rm": RM, "len": length}, reward_weights=[1.0, 0.5]), config, progress=False)
    agent.save(tmp_path / "ckpt")
    saved = env_settings(agent.world)
    assert set(saved["reward"]["components"]) == {"rm", "len"} and saved["reward_weights"] == {"rm": 1.0, "len": 0.5}
    for rewards in ({"rm": RM, "gold": TASK.gold_reward}, {"rm": RM}, {"rm": RM, "len": TASK.gold_reward},
                    {"rm2": RM, "len": length}):
        with pytest.raises(ValueError, match="trained in another env.*reward"):
            PPO.load(tmp_path / "ckpt", make_vec(4, rewards=rewards), progress=False)
    with pytest.raises(ValueError, match="trained in another env.*reward"):
        PPO.load(tmp_path / "ckpt", make_vec(4), progress=False)
    other = make_vec(4, rewards={"rm": RM, "len": length}, reward_weights=[1.0, 2.0])
    with caplog.at_level(logging.WARNING, logger="agents.checkpoint"):
        PPO.load(tmp_path / "ckpt", other, progress=False)
    assert "reward_weights" in caplog.text
    assert other.unwrapped.reward_weights == {"rm": 1.0, "len": 2.0}  # the env keeps its own weights
