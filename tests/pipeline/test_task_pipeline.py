"""Every built-in task goes through the pipeline's text stages: tokenizer coverage, round trips, encoding."""

import numpy as np
import pytest

from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.tasks import TASKS, get_task
from rlhf_env.text import encode_pairs


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_text_round_trips_through_its_tokenizer(name):
    task = get_task(name)
    tokenizer = train_tokenizer(task.tokenizer_corpus(np.random.default_rng(0), n=1000))
    demos = task.demonstrations(300, np.random.default_rng(1), split="eval")
    for prompt, response in demos:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == response
        assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) == prompt
    data = encode_pairs(tokenizer, [p for p, _ in demos], [r for _, r in demos], max_length=64)
    assert int(data.response_mask.sum(1).max()) <= task.max_new_tokens  # every demonstration fits the cap
    golds = [task.gold(p, r) for p, r in demos]
    assert max(golds) <= task.best_gold + 1e-12


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")
