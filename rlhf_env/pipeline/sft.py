"""Supervised fine-tuning: π_SFT, which is also the frozen reference π_ref and the RL starting point.

The loss is token-level cross-entropy on the **response tokens only** (EOS included). Loss on the prompt too
makes the model spend capacity continuing prompts instead of answering them: a prototype of this pipeline froze at
71% grammatical samples that way.

Works for any local Hugging Face causal LM and tokenizer: the tiny built-in GPT-2s, or a user's own model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf_env.decoding.sampling import sample
from rlhf_env.lm import response_logprobs
from rlhf_env.models import choose_backend
from rlhf_env.pipeline.optimization import adamw_with_schedule, gradient_step
from rlhf_env.tasks.base import Task
from rlhf_env.text import PairedText, decode_responses, encode_pairs, encode_prompts, model_max_length


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning settings; the defaults build the sentiment task's π_SFT in about a minute on 2 cores."""

    steps: int = 1000
    """Optimizer steps (a fixed count, not a time budget, so that builds are reproducible)."""
    batch_size: int = 64
    """Demonstrations per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    n_demonstrations: int = 30000
    """Training demonstrations drawn from the task's generator."""
    n_eval: int = 1000
    """Held-out demonstrations (eval prompts) for perplexity, and eval prompts sampled for grammar/EOS rates."""
    seed: int = 0
    """Seeds the demonstrations, batch order and evaluation samples."""
    sampling_backend: str = "hf"
    """How the evaluation samples run (`rlhf_env.models.choose_backend`): "hf", the arithmetic the shipped assets
    were built with (so `python -m rlhf_env.assets check` reproduces their bits); "auto" is faster on a GPT-2."""


def sft_loss(model, batch: tuple[torch.Tensor, ...], num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (prompt tokens carry no loss).

    `num_tokens` replaces the batch's response-token count as the denominator (a micro-batch's share of a larger
    batch's mean)."""
    query_ids, query_mask, response_ids, response_mask = batch
    logprobs = response_logprobs(model, query_ids, query_mask, response_ids, response_mask)  # (B, T)
    return -(logprobs.sum() / (response_mask.sum() if num_tokens is None else num_tokens))


def train_sft(model, tokenizer, task: Task, config: SFTConfig = SFTConfig(), progress: bool = True) -> dict:
    """Fine-tune `model` in place on `task`'s demonstrations; returns the evaluation report plus timings."""
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    demos = task.demonstrations(config.n_demonstrations, rng)
    max_length = model_max_length(model)
    data = encode_pairs(tokenizer, [p for p, _ in demos], [r for _, r in demos], max_length)
    device = next(model.parameters()).device
    losses = fit_responses(model, data.to(device), config, desc="SFT", progress=progress)
    train_seconds = time.perf_counter() - start
    report = evaluate_policy(model, tokenizer, task, n=config.n_eval, seed=config.seed + 1,
                             backend=config.sampling_backend)
    report.update(train_seconds=round(train_seconds, 1), final_train_loss=float(np.mean(losses[-100:])),
                  config=asdict(config))
    return report


def fit_responses(model, data: PairedText, config: SFTConfig, desc: str = "SFT", progress: bool = True) -> list[float]:
    """The SFT loop: `config.steps` AdamW steps (`rlhf_env.pipeline.optimization`) of `sft_loss` on batches of
    `config.batch_size` rows of `data` drawn with replacement (seeded by `config.seed`); returns each step's loss
    and leaves `model` in eval mode. Only the response tokens of `data` carry loss, so a row whose response is
    one answer token trains that token alone (the LM judge, `rlhf_env.pipeline.judge_training`)."""
    device = next(model.parameters()).device
    optimizer, schedule = adamw_with_schedule(model, config.lr, config.weight_decay, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        index = torch.randint(len(data), (config.batch_size,), generator=generator)
        loss = sft_loss(model, data.rows(index.to(device)))
        gradient_step(model, optimizer, schedule, loss)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate_policy(model, tokenizer, task: Task, n: int = 1000, seed: int = 1, batch_size: int = 256,
                    backend: str = "auto") -> dict:
    """Held-out perplexity (vs the generator's floor when the task knows it) and sample quality at temperature 1.

    Returns perplexity, perplexity_floor and their ratio; and for samples on eval prompts: the grammar-pass
    (well-formed) rate, the EOS rate, mean gold reward and mean length.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    try:
        demos = task.demonstrations(n, rng, split="eval")
    except ValueError:  # a user's task may have no held-out demonstrations: then there is no perplexity to report
        demos = []
    report = {}
    if demos:
        report.update(_perplexity(model, tokenizer, task, demos, batch_size))
    prompts = [task.eval_prompts()[i] for i in rng.integers(len(task.eval_prompts()), size=n)]
    report.update(sample_quality(model, tokenizer, task, prompts, seed=seed, backend=backend))
    return report


@torch.no_grad()
def heldout_perplexity(model, tokenizer, task: Task, n: int = 1000, seed: int = 1, batch_size: int = 256) -> dict:
    """`model`'s perplexity on `n` held-out demonstrations (eval prompts), and the generator's floor when the task
    knows it: how far a policy has moved from the demonstrations' language (π_SFT sits within 1% of the floor)."""
    model.eval()
    demos = task.demonstrations(n, np.random.default_rng(seed), split="eval")
    return _perplexity(model, tokenizer, task, demos, batch_size)


def _perplexity(model, tokenizer, task: Task, demos: list[tuple[str, str]], batch_size: int) -> dict:
    data = encode_pairs(tokenizer, [p for p, _ in demos], [r for _, r in demos], model_max_length(model))
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = tuple(t.to(device) for t in data.rows(slice(start, start + batch_size)))
        nll -= response_logprobs(model, *batch).sum().item()
        tokens += int(batch[3].sum())
    report = {"perplexity": math.exp(nll / tokens)}
    floor = [task.log_prob(p, r) for p, r in demos]
    if all(lp is not None for lp in floor):
        report["perplexity_floor"] = math.exp(-sum(floor) / tokens)
        report["perplexity_ratio"] = report["perplexity"] / report["perplexity_floor"]
    return report


@torch.no_grad()
def sample_quality(model, tokenizer, task: Task, prompts: list[str], seed: int = 0, batch_size: int = 256,
                   temperature: float = 1.0, backend: str = "auto") -> dict:
    """Sample one response per prompt; report the well-formed rate, EOS rate, mean gold reward and length."""
    backend = choose_backend(model, backend)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    queries = encode_prompts(tokenizer, prompts, model_max_length(model) - task.max_new_tokens)
    well_formed, finished, gold, length = [], [], [], []
    for start in range(0, len(queries), batch_size):
        samples = sample(model, queries[start : start + batch_size], backend=backend,
                         max_new_tokens=task.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         temperature=temperature, generator=generator)
        texts = decode_responses(tokenizer, samples.response_lists())
        for prompt, text, done in zip(prompts[start : start + batch_size], texts, samples.finished.tolist()):
            well_formed.append(done and task.is_well_formed(prompt, text))
            finished.append(done)
            gold.append(task.gold(prompt, text))
        length.extend(samples.response_mask.sum(1).tolist())
    return {"grammar_pass": float(np.mean(well_formed)), "eos_rate": float(np.mean(finished)),
            "gold_mean": float(np.mean(gold)), "length_mean": float(np.mean(length))}


