"""Shared fixtures: the sentiment task, its tokenizer and tiny random models (all built in well under a second), and
the helpers several test files use (each a fixture, so that no test file imports another)."""

import hashlib
import logging

import numpy as np
import pytest
import torch
import transformers

from rlhf_env.assets import asset_dir, load_preference_pairs
from rlhf_env.decoding.gpt2 import GPT2Stack
from rlhf_env.jsonl import write_jsonl
from rlhf_env.lm import pad_left, pad_right, response_logprobs
from rlhf_env.models import build_policy, load_causal_lm
from rlhf_env.pipeline.tokenizer import train_tokenizer
from rlhf_env.reward_model import RewardModel
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


@pytest.fixture
def reward_model(policy):
    """A reward model on the random tiny policy's trunk (eval mode)."""
    torch.manual_seed(0)
    model = RewardModel(policy.transformer).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a head big enough that position mistakes show
    return model


def model_digest(module) -> str:
    """A hash of every tensor of `module`'s state dict (bit-exact comparisons of whole models)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def digest():
    """`model_digest`: ``digest(module)``."""
    return model_digest


@pytest.fixture
def perturbed_policy():
    """``perturbed_policy(scale=0.05, seed=0)``: π_SFT with noise on its weights, a policy that differs from π_ref."""

    def make(scale: float = 0.05, seed: int = 0):
        policy = load_causal_lm(asset_dir("sentiment") / "policy")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
        return policy

    return make


@pytest.fixture
def count_model_forwards(monkeypatch):
    """``count_model_forwards(models, lean=True) -> (calls, tokens)``: per named model, the forwards it really runs
    and the real (unmasked) tokens fed to them. On the lean path every `GPT2Stack.forward` runs each model it stacks;
    on the models' own forward (``lean=False``) each model's token embedding runs (counted by a hook)."""

    def count(models: dict, lean: bool = True) -> tuple[dict, dict]:
        calls, tokens = dict.fromkeys(models, 0), dict.fromkeys(models, 0)
        names = {id(model): name for name, model in models.items()}
        stacked_forward = GPT2Stack.forward

        def counting_forward(stack, ids, attention_mask, positions, cache):
            for model in stack.models:
                calls[names[id(model)]] += 1
                tokens[names[id(model)]] += int(attention_mask[:, -ids.shape[1]:].sum())
            return stacked_forward(stack, ids, attention_mask, positions, cache)

        monkeypatch.setattr(GPT2Stack, "forward", counting_forward)
        for name, model in models.items() if not lean else []:
            model.get_input_embeddings().register_forward_hook(
                lambda module, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
        return calls, tokens

    return count


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory):
    """``small_pairs(n=256, split="train")``: the path of a JSONL file holding the first `n` preference pairs of the
    shipped sentiment data."""
    directory = tmp_path_factory.mktemp("pairs")

    def path(n: int = 256, split: str = "train") -> str:
        file = directory / f"pairs_{split}_{n}.jsonl"
        if not file.is_file():
            write_jsonl(file, load_preference_pairs(asset_dir("sentiment"), split)[:n])
        return str(file)

    return path


@pytest.fixture
def reference_logprob():
    """``reference_logprob(env, prompt_ids, response)``: log π_ref(y|x) by one full forward of the env's reference,
    independent of the env's cached decoding."""

    def logprob(env, prompt_ids, response) -> float:
        world = env.world
        q, qm = pad_left([prompt_ids], world.pad_token_id)
        r, rm = pad_right([response], world.pad_token_id)
        return float(response_logprobs(world.reference, q, qm, r, rm).sum())

    return logprob


@pytest.fixture
def cell_record():
    """``cell_record(config)``: a benchmark cell record as `benchmarks.cell.run_cell` writes it, with made-up numbers
    (every key the report reads; a training curve and checkpoints for the trained algorithms)."""
    from dataclasses import asdict

    metrics = {"objective/gold_score": 0.1, "objective/score": 0.2, "objective/kl": 0.5, "objective/rlhf_reward": 0.1,
               "objective/win_rate": 0.5, "episode/well_formed": 1.0, "episode/length": 5.0, "perplexity": 10.0,
               "objective/gold_agreement": 0.75}

    def make(config, gold: float = 0.1) -> dict:
        points = [{"timesteps": t, "updates": t, "seconds": t, **metrics, "objective/gold_score": gold * t / 100}
                  for t in (0, 50, 100)] if config.algorithm not in ("sft", "best_of_n", "optimum") else []
        values = ({"optimum": 0.3, "n_samples": 8, "n_prompts": 4, "ess_mean": 2.0} if config.algorithm == "optimum"
                  else {**metrics, "objective/gold_score": gold})
        return {"name": config.name, "config": asdict(config), "commit": "abc1234", "metrics": values,
                "timing": {"train_seconds": 1.0, "wall_seconds": 2.0, "updates": 2, "timesteps": 100},
                "memory": {"peak_rss_mib": 300.0}, "curve": points, "checkpoints": points,
                "machine": {"device": "cpu", "threads": 1, "torch": torch.__version__}}

    return make
