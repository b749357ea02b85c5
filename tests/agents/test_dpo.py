"""DPO: the loss by hand (sigmoid, label smoothing, IPO) and at π = π_ref, padding never counts, bad pair files are
named, the held-out accuracy and the command line, and a short run learns."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.dpo
import rlhf_env  # noqa: F401  (registers RLHF-v0)
from agents.core import dpo_loss
from agents.dpo import DPO, DPOConfig, sequence_logprobs
from agents.evaluate import win_rate_vs_reference
from agents.rollout import Episodes, collect_episodes
from rlhf_env.pipeline.preferences import load_pairs
from rlhf_env.text import encode_pairs


def make_envs(**kwargs):
    return gym.make_vec("RLHF-v0", num_envs=8, max_new_tokens=8, **kwargs)


def small_config(small_pairs, n=64, n_eval=64, **kwargs):
    return DPOConfig(pairs=small_pairs(n), eval_pairs=small_pairs(n_eval, "eval"), **kwargs)


@pytest.mark.parametrize("loss_type, smoothing, beta, loss, d_chosen", [
    # h = (−1 − −1.5) − (−2 − −1.5) = 1
    ("sigmoid", 0.0, 0.5, math.log1p(math.exp(-0.5)), -0.5 / (1 + math.exp(0.5))),  # −log σ(βh), −β·σ(−βh)
    ("sigmoid", 0.1, 0.5, 0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)),
     -0.9 * 0.5 / (1 + math.exp(0.5)) + 0.1 * 0.5 / (1 + math.exp(-0.5))),
    ("ipo", 0.0, 0.25, (1 - 2) ** 2, 2 * (1 - 2)),  # (h − 1/(2β))², its derivative 2(h − 1/(2β))
], ids=["dpo", "label-smoothing", "ipo"])
def test_loss_and_gradient_match_a_hand_computed_pair(loss_type, smoothing, beta, loss, d_chosen):
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, torch.tensor([-1.5]), torch.tensor([-1.5]),
                                                      beta, loss_type, smoothing)
    losses.sum().backward()
    assert losses.item() == pytest.approx(loss, abs=1e-6)
    assert chosen.grad.item() == pytest.approx(d_chosen, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(-d_chosen, abs=1e-6)  # the loss depends on the margin only
    assert chosen_reward.item() == pytest.approx(beta * 0.5) and rejected_reward.item() == pytest.approx(-beta * 0.5)


def test_policy_equal_to_reference_gives_exactly_ln2_and_zero_implicit_rewards(tmp_path, small_pairs):
    logps = torch.tensor([-3.0, -7.5, -0.25])
    losses, chosen, rejected = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2))) and not chosen.any() and not rejected.any()
    # The agent's first update: π starts as π_SFT = π_ref.
    agent = DPO(make_envs(beta=0.1), small_config(small_pairs, batch_size=32), progress=False)
    metrics = agent.update()
    assert metrics["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics["rewards/chosen"]) < 1e-6 and abs(metrics["rewards/margins"]) < 1e-6
    assert agent.evaluate_preferences()["eval_rewards/accuracies"] != 0.5  # after one step: no longer all ties


def test_padding_never_enters_the_sums(tmp_path, small_pairs):
    envs = make_envs()
    world = envs.unwrapped.world
    pairs = load_pairs(small_pairs(8))
    text = encode_pairs(world.tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], 64)
    lengths = text.query_mask.sum(1) + text.response_mask.sum(1)
    short = int(lengths.argmin())
    with torch.no_grad():
        alone = sequence_logprobs(world.policy, world.backends["policy"], text, np.array([short]))
        batched = sequence_logprobs(world.policy, world.backends["policy"], text, np.arange(8))
        # Whatever the padding holds, nothing changes.
        noisy = text.to("cpu")
        noisy.query_ids = torch.where(text.query_mask.bool(), text.query_ids, 7)
        noisy.response_ids = torch.where(text.response_mask.bool(), text.response_ids, 9)
        garbage = sequence_logprobs(world.policy, world.backends["policy"], noisy, np.arange(8))
    assert int(lengths.max()) > int(lengths[short])  # the batch really pads this pair
    assert alone.item() == pytest.approx(batched[short].item(), abs=1e-5)
    assert torch.allclose(garbage, batched, atol=1e-6)


def test_a_malformed_pair_file_names_its_line_and_field_before_any_model_runs(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "the film", "chosen": "was great", "rejected": "was bad"}\n'
                    '{"prompt": "the plot", "chosen": "works"}\n')
    monkeypatch.setattr(agents.dpo, "Preferences", lambda *a, **k: pytest.fail("a model ran"))
    with pytest.raises(ValueError, match=r"line 2: missing the 'rejected' field"):
        DPO(make_envs(), DPOConfig(pairs=str(path)), progress=False)
    path.write_text('{"prompt": "the film", "chosen": 3, "rejected": "was bad"}\n')
    with pytest.raises(ValueError, match=r"line 1: the 'chosen' field must be a string"):
        DPO(make_envs(), DPOConfig(pairs=str(path)), progress=False)


def test_bad_configs_are_refused():
    for kwargs in [dict(loss_type="hinge"), dict(label_smoothing=0.5), dict(batch_size=0),
                   dict(batch_size=10, micro_batch_size=4)]:
        with pytest.raises(ValueError):
            DPOConfig(**kwargs)


def test_each_update_trains_the_policy_and_never_the_reference(tmp_path, digest, small_pairs):
    envs = make_envs()
    agent = DPO(envs, small_config(small_pairs, batch_size=16, micro_batch_size=8), progress=False)
    reference, policy = digest(envs.unwrapped.reference), digest(agent.lm)
    agent.update()
    assert digest(envs.unwrapped.reference) == reference and digest(agent.lm) != policy


def test_non_finite_loss_skips_the_step(tmp_path, digest, small_pairs):
    agent = DPO(make_envs(), small_config(small_pairs, batch_size=16), progress=False)
    with torch.no_grad():
        agent.lm.transformer.ln_f.weight.fill_(float("nan"))
    before = digest(agent.lm)
    assert agent.update()["train/skipped"] == 1 and digest(agent.lm) == before


def test_win_rate_against_the_reference_counts_wins_and_half_ties():
    envs = make_envs()
    episodes = collect_episodes(envs.unwrapped, 0, torch.Generator().manual_seed(0), split="eval")
    world = envs.unwrapped.world
    assert win_rate_vs_reference(world, episodes, seed=0) not in (0.0, 1.0)  # π = π_ref: both win sometimes
    always = Episodes(prompts=episodes.prompts, queries=episodes.queries, gold_scores=[10.0] * len(episodes))
    never = Episodes(prompts=episodes.prompts, queries=episodes.queries, gold_scores=[-10.0] * len(episodes))
    assert win_rate_vs_reference(world, always, 0) == 1.0 and win_rate_vs_reference(world, never, 0) == 0.0


def test_command_line_trains_evaluates_and_saves(tmp_path, small_pairs):
    summary = agents.dpo.main(["--total-timesteps", "64", "--num-envs", "8", "--eval-episodes", "16",
                               "--batch-size", "32", "--pairs", small_pairs(64),
                               "--eval-pairs", small_pairs(32, "eval"), "--out", str(tmp_path / "run"),
                               "--no-progress"])
    assert summary["updates"] == 2 and summary["timesteps"] == 64
    assert summary["eval_before"]["eval_rewards/accuracies"] == 0.5  # π = π_ref: every pair a tie
    assert "objective/win_rate" in summary["eval_after"] and "objective/kl" in summary["eval_after"]
    assert (tmp_path / "run" / "model" / "policy").is_dir() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_short_run_raises_held_out_preference_accuracy(tmp_path, small_pairs):
    agent = DPO(make_envs(beta=0.1), small_config(small_pairs, n=2048, n_eval=512, batch_size=64, learning_rate=1e-3),
                progress=False)
    before = agent.evaluate_preferences()
    agent.learn(64 * 40)
    after = agent.evaluate_preferences()
    assert agent.logger.history[-1]["loss/dpo"] < math.log(2)
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"] + 0.05
