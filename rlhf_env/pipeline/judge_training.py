"""A judge built in the built-in world: π_SFT fine-tuned on a few human-labelled comparisons into an `LMJudge`.

No instruct model can be downloaded, so the world makes its own AI labeller (RLAIF's judge, Lee et al. 2023, in
miniature): a copy of the task's π_SFT, which already reads the task's language, learns to answer a comparison
template with the token of the better response after seeing `n` human (simulated-annotator) labels. It then
labels any number of pairs at the cost of a forward pass each: AI feedback bootstrapped from a few human labels.

* `judge_tokenizer`: the world's word-level tokenizer knows only the task's words, so the template's words and the
  answers ("A", "B") are added as new whole-word tokens (ids after the world's; the world's ids are unchanged).
* `judge_from_policy`: a GPT-2 with π_SFT's weights, the new tokens' embedding rows and a longer context (a
  comparison holds two responses: π_SFT's 64 positions are too few), the new rows at GPT-2's random init.
* `judge_examples`: each labelled pair in both orders (chosen first → "A", chosen second → "B"), so the judge
  cannot learn a position; the target is the answer token alone, and only it carries loss.
* `train_judge`: the two above and the SFT loop (`rlhf_env.pipeline.sft.fit_responses`).
* `evaluate_judge`: agreement with gold and with the human labels on held-out pairs, and the position bias.

``python -m benchmarks.judges`` measures agreement against the number of human labels (docs/world.md, "AI feedback").
"""

from __future__ import annotations

import copy
import string
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import GPT2LMHeadModel

from rlhf_env.lm import pad_left, pad_right
from rlhf_env.pipeline.labelers import LMJudge, check_template
from rlhf_env.pipeline.sft import SFTConfig, fit_responses
from rlhf_env.text import PairedText, encode_prompts, model_max_length

TEMPLATE = "Question: {prompt} Response A: {response_a} Response B: {response_b} Which is better? Answer:"
"""The built-in judge's template: RLAIF's comparison prompt, short (every word is a token the judge must learn)."""
ANSWERS = ("A", "B")


@dataclass(frozen=True)
class JudgeConfig:
    """How the built-in judge is made from π_SFT and fine-tuned."""

    steps: int = 300
    """Optimizer steps (each a batch of `batch_size` examples; an example is one pair in one order)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    n_positions: int = 128
    """The judge's context: template + prompt + both responses + the answer token."""
    judge_batch_size: int = 256
    """Comparisons per forward pass when the judge labels."""
    seed: int = 0
    """Seeds the new weights and the batch order."""

    def sft(self) -> SFTConfig:
        """The SFT loop's settings (`rlhf_env.pipeline.sft.fit_responses`)."""
        return SFTConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                         weight_decay=self.weight_decay, seed=self.seed)


def judge_tokenizer(tokenizer, template: str = TEMPLATE, answers: tuple[str, str] = ANSWERS):
    """A copy of `tokenizer` that also knows every whitespace-separated word of `template`'s text and the
    `answers`: each that encodes to the unknown token is added as a whole-word token (after the existing ids, which
    keep their meaning). A tokenizer without an unknown token (byte-level BPE) encodes everything: the copy is
    unchanged."""
    check_template(template)
    literal = " ".join(text for text, _, _, _ in string.Formatter().parse(template))
    unknown = []
    for word in [*literal.split(), *answers]:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids and word not in unknown:
            unknown.append(word)
    judge = copy.deepcopy(tokenizer)
    judge.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in unknown])
    return judge


def judge_from_policy(policy: GPT2LMHeadModel, tokenizer, template: str = TEMPLATE,
                      answers: tuple[str, str] = ANSWERS, config: JudgeConfig = JudgeConfig()) -> LMJudge:
    """An (untrained) `LMJudge` on a copy of the GPT-2 `policy`: its weights, plus embedding rows for the tokens
    `judge_tokenizer` adds and position rows up to `config.n_positions`, those new rows at GPT-2's random init
    (seeded). `policy` is not changed."""
    if not isinstance(policy, GPT2LMHeadModel):
        raise ValueError(f"the built-in judge is made from a GPT-2 π_SFT, got {type(policy).__name__}; any other "
                         "causal LM can be an LMJudge as it is")
    tokens = judge_tokenizer(tokenizer, template, answers)
    model_config = copy.deepcopy(policy.config)
    model_config.vocab_size = len(tokens)
    model_config.n_positions = max(config.n_positions, policy.config.n_positions)
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(model_config)
    old = policy.state_dict()
    new = model.state_dict()
    for name, tensor in new.items():  # π_SFT's weights; the rows for new tokens and positions stay as initialised
        source = old[name]
        if source.shape[1:] != tensor.shape[1:] or source.shape[0] > tensor.shape[0]:
            raise ValueError(f"cannot extend {name}: {tuple(source.shape)} into {tuple(tensor.shape)}")
        tensor[: source.shape[0]] = source.to(tensor.dtype)
    model.load_state_dict(new)
    model.to(next(policy.parameters()).device).eval()
    return LMJudge(model, tokens, template=template, answers=answers, batch_size=config.judge_batch_size,
                   name="lm-judge")


def judge_examples(judge: LMJudge, pairs: list[dict]) -> PairedText:
    """Each labelled pair twice, chosen first (target: the first answer) and chosen second (the second answer), as
    queries = judge prompts and responses = the one answer token (no EOS: nothing else carries loss)."""
    prompts = [p["prompt"] for p in pairs] * 2
    firsts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    seconds = [p["rejected"] for p in pairs] + [p["chosen"] for p in pairs]
    targets = [[judge.answer_ids[0]]] * len(pairs) + [[judge.answer_ids[1]]] * len(pairs)
    texts = [judge.render(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
    queries = encode_prompts(judge.tokenizer, texts, model_max_length(judge.model) - 1)  # room for the answer
    pad = judge.tokenizer.pad_token_id if judge.tokenizer.pad_token_id is not None else judge.tokenizer.eos_token_id
    query_ids, query_mask = pad_left(queries, pad)  # (2n, P)
    response_ids, response_mask = pad_right(targets, pad)  # (2n, 1)
    return PairedText(query_ids, query_mask, response_ids, response_mask)


def train_judge(policy: GPT2LMHeadModel, tokenizer, pairs: list[dict], config: JudgeConfig = JudgeConfig(),
                progress: bool = True) -> tuple[LMJudge, dict]:
    """Make a judge from `policy` (`judge_from_policy`) and fine-tune it on the labelled `pairs` in both orders,
    loss on the answer token only; returns the judge (eval mode) and a report (pairs, seconds, final loss)."""
    if not pairs:
        raise ValueError("no labelled pairs to train the judge on")
    start = time.perf_counter()
    judge = judge_from_policy(policy, tokenizer, config=config)
    data = judge_examples(judge, pairs).to(next(judge.model.parameters()).device)
    losses = fit_responses(judge.model, data, config.sft(), desc="judge", progress=progress)
    return judge, {"n_pairs": len(pairs), "train_seconds": round(time.perf_counter() - start, 1),
                   "final_train_loss": float(np.mean(losses[-50:])), "config": asdict(config)}


def _agreement(p: np.ndarray, a_is_right: np.ndarray) -> float:
    """Share of comparisons where P(a ≻ b) sides with the truth (a tie, P = ½, counts half)."""
    said = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))  # (N,)
    return float(np.mean(np.where(a_is_right, said, 1 - said)))


def evaluate_judge(judge: LMJudge, pairs: list[dict]) -> dict:
    """The judge on labelled pairs (a = the labelled chosen response): agreement with the labels and, on pairs
    whose gold rewards differ, with gold; the same for one order alone (each order's verdict, averaged over the
    two: what a judge asked once, in a random order, would reach); the position bias; the labelling speed."""
    start = time.perf_counter()
    judgement = judge.compare([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                              [p["rejected"] for p in pairs])
    seconds = time.perf_counter() - start
    labelled = np.ones(len(pairs), dtype=bool)
    report = {"n_pairs": len(pairs), "agreement_labels": _agreement(judgement.p, labelled),
              "position_disagreement": judgement.position_disagreement, "first_slot": judgement.first_slot,
              "pairs_per_second": round(len(pairs) / seconds, 1)}
    if all("chosen_gold" in p and "rejected_gold" in p for p in pairs):
        gold_w = np.array([p["chosen_gold"] for p in pairs])
        gold_l = np.array([p["rejected_gold"] for p in pairs])
        differ = gold_w != gold_l
        right = (gold_w > gold_l)[differ]
        report["agreement_gold"] = _agreement(judgement.p[differ], right)
        report["agreement_gold_one_order"] = (_agreement(judgement.p_a_first[differ], right)
                                              + _agreement(judgement.p_a_second[differ], right)) / 2
        report["labels_agreement_gold"] = float(np.mean(right))  # the human labels' own accuracy, for reference
        report["n_gold_pairs"] = int(differ.sum())
    return report
