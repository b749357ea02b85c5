"""Direct RLAIF (`rlhf_env.judge_reward.JudgeReward`): the reward is the judge's probability that the response beats
a π_ref sample of the same query, averaged over the references, usable as an env's reward_fn; bad judges are
refused by name."""

import copy

import numpy as np
import pytest
import torch

from rlhf_env.decoding.sampling import sample
from rlhf_env.judge_reward import JudgeReward
from rlhf_env.models import choose_backend
from rlhf_env.pipeline.labelers import LabelerError, Principle, RuleJudge
from rlhf_env.text import decode_responses, encode_prompts
from rlhf_env.vector_env import RLHFVectorEnv

SHORTER = RuleJudge([Principle("brevity", score=lambda prompts, responses: [-len(r.split()) for r in responses])])


def test_the_reward_is_the_judges_win_rate_against_reference_samples(policy, tokenizer, task):
    prompts = task.train_prompts()[:3]
    queries = encode_prompts(tokenizer, prompts, 40)
    responses = ["good", "a truly good and moving film", "bad plot"]
    reward = JudgeReward(SHORTER, policy, tokenizer, max_new_tokens=6, references=2, seed=7)
    got = reward(prompts, responses, query_ids=queries)
    # The same reference samples, drawn by hand from the same seed, judged by hand: 1 shorter, ½ tie, 0 longer.
    drawn = sample(policy, [q for q in queries for _ in range(2)], backend=choose_backend(policy), max_new_tokens=6,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                   generator=torch.Generator().manual_seed(7))
    references = decode_responses(tokenizer, drawn.response_lists())
    expected = [np.mean([np.sign(len(ref.split()) - len(y.split())) / 2 + 0.5 for ref in references[2 * i: 2 * i + 2]])
                for i, y in enumerate(responses)]
    assert got == pytest.approx(expected)
    assert reward.calls == 1 and reward.comparisons == 6 and reward.seconds_per_episode > 0


def test_an_env_pays_the_judges_reward(policy, tokenizer):
    reward = JudgeReward(SHORTER, policy, tokenizer, max_new_tokens=6)
    envs = RLHFVectorEnv(num_envs=4, policy=policy, reference=copy.deepcopy(policy), tokenizer=tokenizer,
                         reward_fn=reward, max_new_tokens=6)
    envs.reset(seed=0)
    scores = []
    while len(scores) < 4:
        actions = torch.multinomial(envs.next_token_distribution().exp(), 1)[:, 0].numpy()
        *_, terminated, truncated, infos = envs.step(actions)
        scores += [float(s) for s, done in zip(infos.get("score", []), terminated | truncated) if done]
    assert set(scores) <= {0.0, 0.5, 1.0} and reward.calls >= 1


def test_bad_judges_are_refused_by_name(policy, tokenizer, task):
    with pytest.raises(ValueError, match="judge must be a Labeler"):
        JudgeReward(lambda p, a, b: [0.5] * len(p), policy, tokenizer, 6)
    with pytest.raises(ValueError, match="references must be an integer ≥ 1"):
        JudgeReward(SHORTER, policy, tokenizer, 6, references=0)

    class Overconfident:
        name = "overconfident"

        def prefer(self, prompts, a, b):
            return [2.0] * len(prompts)

    reward = JudgeReward(Overconfident(), policy, tokenizer, 6)
    with pytest.raises(LabelerError, match="overconfident returned values outside"):
        reward(task.train_prompts()[:1], ["good"], query_ids=encode_prompts(tokenizer, task.train_prompts()[:1], 40))
