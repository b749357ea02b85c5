"""Shared fixtures: the sentiment task, its tokenizer and tiny random models (all built in well under a second)."""

import numpy as np
import pytest
import torch
import transformers

from rlhf_env.models import build_policy
from rlhf_env.tasks.sentiment import SentimentTask
from rlhf_env.tokenizer import train_tokenizer

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def task():
    return SentimentTask()


@pytest.fixture(scope="session")
def tokenizer(task):
    return train_tokenizer(task.tokenizer_corpus(np.random.default_rng(0), n=2000))


@pytest.fixture
def policy(tokenizer):
    """A randomly initialised tiny GPT-2 (dropout off, eval mode)."""
    return build_policy(tokenizer, "tiny", n_positions=64, seed=0).eval()
