"""The iterated reward model: a round samples the current policy, labels the samples, retrains the reward model on
old + new pairs and swaps it into the env; resuming from its checkpoint (and the agent's) is the uninterrupted run;
what cannot work is refused."""

import gymnasium as gym
import pytest
import torch

import rlhf_env  # noqa: F401  (registers the envs)
from agents.iterated_rm import IteratedRewardModel, IteratedRMConfig
from agents.reinforce import Reinforce, ReinforceConfig
from rlhf_env.assets import asset_dir, load_preference_pairs
from rlhf_env.pipeline.preferences import load_groups
from rlhf_env.pipeline.reward_training import score_texts

PREFERENCES = asset_dir("sentiment") / "preferences"
PAIRS = load_preference_pairs(asset_dir("sentiment"))[:200]  # re-derived on demand in a fresh clone
GROUPS = load_groups(PREFERENCES / "groups_train.jsonl")[:50]
SMALL = IteratedRMConfig(every=1, prompts_per_round=8, steps=3, batch_size=8, warmup_steps=1, replay=64,
                         center_groups=20)


def untimed(history):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in history]


def make_envs():
    return gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, beta=0.1)


def make_agent(envs):
    return Reinforce(envs, ReinforceConfig(episodes_per_update=8, samples_per_prompt=2), progress=False)


def test_a_round_labels_the_policys_samples_and_swaps_a_retrained_reward_model(digest):
    envs = make_envs()
    original = envs.unwrapped.reward_model
    before = digest(original)
    iterated = IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS)
    line = iterated.round()
    assert envs.unwrapped.reward_model is not original and digest(original) == before  # a new model, the old kept
    assert digest(envs.unwrapped.reward_model) != before
    assert line["round"] == 1 and line["new_pairs"] == len(iterated.new_pairs) == iterated.labels > 0
    assert line["new_pairs"] <= 8 * 6  # C(4, 2) = 6 pairs per prompt, fewer where two samples tie
    assert 0 <= line["rm_accuracy_labels"] <= 1 and 0 <= line["after/rm_accuracy_labels"] <= 1
    assert {"prompt", "chosen", "rejected", "chosen_gold"} <= set(iterated.new_pairs[0])


def test_every_n_updates_and_at_most_max_rounds():
    envs = make_envs()
    iterated = IteratedRewardModel(envs, IteratedRMConfig(every=2, max_rounds=1, prompts_per_round=4, steps=1,
                                                          batch_size=4, warmup_steps=0), pairs=PAIRS, groups=GROUPS)
    make_agent(envs).learn(8 * 8 * 5, callback=iterated)  # at least 5 updates
    assert [line["updates"] for line in iterated.history] == [2]


def test_resume_from_both_checkpoints_is_the_uninterrupted_run(tmp_path, digest):
    def run(updates, agent, iterated):
        while agent.num_updates < updates:
            agent.update()
            iterated(agent, {})

    envs = make_envs()
    agent, iterated = make_agent(envs), IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS)
    run(4, agent, iterated)
    expected = digest(agent.lm), digest(envs.unwrapped.reward_model), untimed(iterated.history)

    envs = make_envs()
    agent, iterated = make_agent(envs), IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS)
    run(2, agent, iterated)
    iterated.save(tmp_path / "rm")
    agent.save(tmp_path / "agent")
    envs = make_envs()  # a fresh process's env: the original reward model
    with pytest.raises(ValueError, match="trained in another env"):  # the agent alone: the env's RM is not its own
        Reinforce.load(tmp_path / "agent", envs, progress=False)
    iterated = IteratedRewardModel.load(tmp_path / "rm", envs, pairs=PAIRS, groups=GROUPS)
    agent = Reinforce.load(tmp_path / "agent", envs, progress=False)
    run(4, agent, iterated)
    assert (digest(agent.lm), digest(envs.unwrapped.reward_model), untimed(iterated.history)) == expected


def test_what_cannot_work_is_refused(tmp_path, task):
    with pytest.raises(ValueError, match="IteratedRMConfig.k must be an integer ≥ 2"):
        IteratedRMConfig(k=1)
    with pytest.raises(ValueError, match="IteratedRMConfig.every must be an integer ≥ 1"):
        IteratedRMConfig(every=0)
    gold = gym.make_vec("RLHF-v0", num_envs=2, max_new_tokens=8, reward_fn=task.gold_reward)
    with pytest.raises(ValueError, match="single reward_model="):
        IteratedRewardModel(gold, SMALL, pairs=PAIRS, groups=GROUPS)
    envs = make_envs()
    with pytest.raises(ValueError, match="original preference pairs"):
        IteratedRewardModel(envs, SMALL, pairs=[], groups=GROUPS)
    IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS).save(tmp_path / "rm")
    with pytest.raises(ValueError, match="other original pairs"):
        IteratedRewardModel.load(tmp_path / "rm", envs, pairs=PAIRS[:10], groups=GROUPS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to write"):
        IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS).save(tmp_path / "other")


def test_a_round_trains_on_every_new_pair_and_a_fresh_replay_of_original_ones(monkeypatch):
    import agents.iterated_rm as module

    seen = []
    monkeypatch.setattr(module, "train_reward_model", lambda model, tokenizer, pairs, *rest, **kw: seen.append(pairs))
    envs = make_envs()
    iterated = IteratedRewardModel(envs, SMALL, pairs=PAIRS, groups=GROUPS)
    for _ in range(2):
        iterated.round()
    first, second = seen
    assert len(first) == 64 + iterated.history[0]["new_pairs"]
    assert len(second) == 64 + iterated.labels and second[64:] == iterated.new_pairs  # all new pairs, every round
    assert all(p in PAIRS for p in first[:64] + second[:64]) and first[:64] != second[:64]  # drawn afresh


def test_the_retrained_reward_model_keeps_the_original_scale_and_zero():
    envs = make_envs()
    iterated = IteratedRewardModel(envs, IteratedRMConfig(prompts_per_round=8, steps=20, batch_size=8, replay=64,
                                                          center_groups=20, learning_rate=5e-3), pairs=PAIRS,
                                   groups=GROUPS)
    iterated.round()
    prompts = [g["prompt"] for g in iterated.groups for _ in g["responses"]]
    responses = [r for g in iterated.groups for r in g["responses"]]
    original = score_texts(make_envs().unwrapped.reward_model, envs.unwrapped.tokenizer, prompts, responses)
    new = score_texts(envs.unwrapped.reward_model, envs.unwrapped.tokenizer, prompts, responses)
    assert float(new.std()) == pytest.approx(float(original.std()), rel=1e-3)
    assert abs(float(new.mean())) < 1e-3 and not torch.allclose(new, original, atol=1e-2)  # retrained all the same



def test_any_labeler_labels_the_rounds_and_its_name_is_on_every_new_pair():
    from rlhf_env.pipeline.labelers import Principle, RuleJudge

    shorter = RuleJudge([Principle("brevity", score=lambda prompts, responses: [-len(r.split()) for r in responses])])
    envs = make_envs()
    iterated = IteratedRewardModel(envs, SMALL, labeler=shorter, pairs=PAIRS, groups=GROUPS)
    iterated.round()
    assert iterated.new_pairs and all(p["labeler"] == shorter.name for p in iterated.new_pairs)
    assert all(len(p["chosen"].split()) < len(p["rejected"].split()) for p in iterated.new_pairs)


def test_a_round_that_raises_changes_nothing_and_a_retry_is_the_same_round(digest):
    calls = []

    def flaky(groups, seed):
        calls.append(seed)
        if len(calls) == 1:
            raise RuntimeError("the labelling service is down")
        from rlhf_env.pipeline.preferences import label_groups
        return label_groups(groups, make_envs().unwrapped.task.annotator, "pairwise", seed)

    envs = make_envs()
    before = digest(envs.unwrapped.reward_model)
    iterated = IteratedRewardModel(envs, SMALL, labeler=flaky, pairs=PAIRS, groups=GROUPS)
    with pytest.raises(RuntimeError, match="service is down"):
        iterated.round()
    assert digest(envs.unwrapped.reward_model) == before and iterated.rounds == 0 and not iterated.new_pairs
    iterated.round()
    assert calls[0] == calls[1] and iterated.rounds == 1
