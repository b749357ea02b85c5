"""Shared fixtures: the sentiment task, its tokenizer and tiny random models (all built in well under a second)."""

import logging

import numpy as np
import pytest
import torch
import transformers

from rlhf_env.models import build_policy
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.tasks.sentiment import SentimentTask

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)


class _DeprecationRecords(logging.Handler):
    """Collects transformers' logged deprecation notices: they go through `logging`, not `warnings`, so
    ``filterwarnings = error`` alone would let a deprecated call pass (transformers logs each notice once)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """Fail any test during which transformers logs that a call we made is deprecated."""
    handler = _DeprecationRecords()
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        yield
    finally:
        library_logger.removeHandler(handler)
    assert not handler.messages, f"transformers says we call a deprecated API: {handler.messages}"


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
