"""Labelers: who says which of two responses is better. Simulated humans, an LM judge, a rule judge.

Every labeler is one protocol (`Labeler`): a batched ``prefer(prompts, responses_a, responses_b)`` that returns
P(a ≻ b) as an array ``(N,)`` in [0, 1], a `name` that every label it makes records (the pair's ``"labeler"``
field), and `stochastic`: whether a label is a draw from that probability (simulated humans, whose P is how often
a person would pick a) or its more probable side (judges, whose P is a confidence). The same batched call labels
a preference set (`label_pairs`, `label_groups_by`), labels freshly sampled pairs, and is a reward online
(P(response ≻ reference response) for a batch of episodes).

* `SimulatedAnnotator`: the task's simulated humans (`rlhf_env.tasks.base.AnnotatorConfig`) as a labeler:
  P(a ≻ b) = (1 − flip)·σ(Δu / T) + flip·σ(−Δu / T) on the utility u (gold, plus any length bonus), where σ(Δu / 0)
  is the step (½ at a tie). The shipped assets are labelled by `rlhf_env.pipeline.preferences.label_groups`, the
  same distribution with its own random stream (and the Plackett–Luce ranking mode).
* `LMJudge`: any local causal LM prompted with a comparison template (RLAIF, Lee et al. 2023): it reads the
  next-token logits of the two answer tokens (a softmax over just those two) once with a shown in the first slot
  and once with a shown in the second, and averages, P(a ≻ b) = ½·[P(first | a, b) + P(second | b, a)], as the
  paper does against position bias. By construction P(a ≻ b) + P(b ≻ a) = 1 and a judge that only ever answers
  one slot gives ½. `compare` returns both orders, so the bias is reported too: how often the orders disagree.
* `RuleJudge`: a constitution (after Bai et al. 2022): named `Principle`s, each a batched score of (prompt,
  response), the form of rlhf-gym's reward functions, or a judge of two responses (an `LMJudge` with the
  principle's own template), combined with stated weights: d = Σ_k w_k·s_k, where s_k = score_k(a) − score_k(b) or,
  for a judge, 2·P_k(a ≻ b) − 1. Then P = 1 if d > margin, 0 if d < −margin and ½ (a tie) otherwise, or σ(d / T)
  with a temperature T > 0. (Constitutional AI samples one principle per comparison; a fixed weighted sum is the
  deterministic version of that mixture.)

Ties: a probability of exactly ½ is no preference. `label_pairs` drops such a pair (``ties="drop"``, as the
simulated annotators drop gold ties) or flips a seeded coin (``ties="random"``). A pair of identical responses is
no comparison and is skipped.

Bad input is refused before any labelling, by named errors (all `ValueError`s): `TemplateError` (a template
without its ``{prompt}``, ``{response_a}`` and ``{response_b}`` slots, or with others), `AnswerTokenError` (an
answer that is not one known token of the judge's tokenizer), both when the judge is built; `PrincipleError` (a
principle that is not well formed when built, or whose score is not one finite number per response when called);
`LabelerError` (a labeler whose `prefer` returns anything but N probabilities). `label_pairs` asks for every
probability before it makes its first label, so an error leaves nothing half-labelled, and its caller nothing to
write (`rlhf_env.jsonl.write_jsonl` is atomic besides).

Legend: ``N`` comparisons, ``B`` sequences in a batch, ``P`` judge-prompt tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from rlhf_env.chat import prompt_text, require_chat_template
from rlhf_env.lm import pad_left, position_ids
from rlhf_env.pipeline.preferences import SIMULATED
from rlhf_env.tasks.base import AnnotatorConfig, Task
from rlhf_env.text import encode_prompts, model_max_length

TEMPLATE = (
    "Given the question and two responses, which response is better?\n\n"
    "Question: {prompt}\n\nResponse A: {response_a}\n\nResponse B: {response_b}\n\n"
    "Which response is better, A or B? Answer:"
)
"""The default comparison template (RLAIF's, shortened); the answer token follows its last character."""
SLOTS = ("prompt", "response_a", "response_b")


class TemplateError(ValueError):
    """A judge's template lacks one of its slots ``{prompt}``, ``{response_a}``, ``{response_b}``, has others, or
    is not a valid format string."""


class AnswerTokenError(ValueError):
    """A judge's answer strings are not two distinct single tokens that the tokenizer and the model know."""


class PrincipleError(ValueError):
    """A principle is not well formed, or its score returned something other than one finite number per response."""


class LabelerError(ValueError):
    """A labeler's ``prefer`` returned something other than one probability in [0, 1] per comparison."""


@runtime_checkable
class Labeler(Protocol):
    """What the preference pipeline needs from a labeler (simulated humans, an LM judge, a rule judge, yours)."""

    name: str
    """Recorded as the ``"labeler"`` of every pair it labels."""
    stochastic: bool
    """True: a label is a draw from P(a ≻ b); False: the more probable side wins."""

    def prefer(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """P(a ≻ b) for each comparison, ``(N,)`` in [0, 1]."""


def _check_lengths(prompts, responses_a, responses_b) -> int:
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses a and {len(responses_b)} responses b:"
                         " a comparison needs one of each")
    return len(prompts)


# --- simulated humans -----------------------------------------------------------------------------------------


class SimulatedAnnotator:
    """The task's simulated humans as a `Labeler`: Bradley–Terry on gold (plus any length bonus), with flips."""

    stochastic = True

    def __init__(self, task: Task, config: AnnotatorConfig | None = None, name: str = SIMULATED):
        self.task = task
        self.config = config or task.annotator
        self.name = name

    def prefer(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """P(a ≻ b) = (1 − flip)·σ(Δu / T) + flip·σ(−Δu / T), Δu = u(a) − u(b); σ(Δu / 0) is the step."""
        _check_lengths(prompts, responses_a, responses_b)
        u_a = np.array([self.config.utility(self.task.gold(p, r), r) for p, r in zip(prompts, responses_a)])
        u_b = np.array([self.config.utility(self.task.gold(p, r), r) for p, r in zip(prompts, responses_b)])
        if self.config.temperature == 0:
            sigma = 0.5 * (1 + np.sign(u_a - u_b))  # (N,)
        else:
            sigma = 1 / (1 + np.exp(-(u_a - u_b) / self.config.temperature))  # (N,)
        flip = self.config.flip_prob
        return (1 - flip) * sigma + flip * (1 - sigma)


# --- LM judge ------------------------------------------------------------------------------------------------


def check_template(template: str) -> None:
    """`TemplateError` unless `template` is a format string whose fields are exactly `SLOTS`, each at least once."""
    if not isinstance(template, str):
        raise TemplateError(f"a judge template must be a string, got {type(template).__name__}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise TemplateError(f"the judge template is not a valid format string ({error}); write a literal brace as "
                            "{{ or }}") from None
    missing = [slot for slot in SLOTS if slot not in fields]
    unknown = sorted({field for field in fields if field not in SLOTS})
    if missing or unknown:
        problems = ([f"lacks the slot(s) {', '.join('{' + s + '}' for s in missing)}"] if missing else []) + (
            [f"has unknown slot(s) {', '.join('{' + s + '}' for s in unknown)}"] if unknown else [])
        raise TemplateError(f"the judge template {' and '.join(problems)}: a comparison template holds "
                            "{prompt}, {response_a} and {response_b}, and its answer token follows its end")


def answer_token_ids(tokenizer, answers: Sequence[str], vocab_size: int | None = None) -> tuple[int, int]:
    """The token ids of the two answers (first slot, second slot); `AnswerTokenError` unless each answer encodes
    (without special tokens) as exactly one token that is not the unknown token and lies below the model's
    `vocab_size`, and the two differ. A judge reads one next-token probability per answer: an answer of several
    tokens would be read by its first token only."""
    if (isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) != 2
            or not all(isinstance(a, str) and a for a in answers)):
        raise AnswerTokenError(f"answers must be two non-empty strings (first slot, second slot), got {answers!r}")
    ids = []
    for answer in answers:
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise AnswerTokenError(
                f"the answer {answer!r} is {len(tokens)} tokens in the judge's tokenizer "
                f"({tokenizer.convert_ids_to_tokens(tokens)}); each answer must be exactly one token (with a "
                "byte-level BPE tokenizer, a leading space often makes one: ' A')")
        if tokenizer.unk_token_id is not None and tokens[0] == tokenizer.unk_token_id:
            raise AnswerTokenError(f"the answer {answer!r} is not in the judge tokenizer's vocabulary (it encodes as "
                                   f"the unknown token {tokenizer.unk_token!r}); add it as a token "
                                   "(`rlhf_env.pipeline.judge_training.judge_tokenizer`) or choose one it knows")
        if vocab_size is not None and tokens[0] >= vocab_size:
            raise AnswerTokenError(f"the answer {answer!r} is token {tokens[0]}, but the model's vocabulary has only "
                                   f"{vocab_size} tokens (resize its embeddings after adding tokens)")
        ids.append(int(tokens[0]))
    if ids[0] == ids[1]:
        raise AnswerTokenError(f"the answers {answers[0]!r} and {answers[1]!r} are the same token {ids[0]}")
    return ids[0], ids[1]


@dataclass(frozen=True)
class Judgement:
    """An LM judge's answers to N comparisons, each asked in both orders."""

    p_a_first: np.ndarray
    """P(a ≻ b) read with a in the first slot: P(first answer | a, b), ``(N,)``."""
    p_a_second: np.ndarray
    """P(a ≻ b) read with a in the second slot: P(second answer | b, a), ``(N,)``."""

    @property
    def p(self) -> np.ndarray:
        """P(a ≻ b) averaged over both orders, ``(N,)``: the judge's answer, free of its position bias."""
        return (self.p_a_first + self.p_a_second) / 2

    @property
    def position_disagreement(self) -> float:
        """Fraction of comparisons whose winner changes with the order: 0 for a judge blind to position, 1 for one
        that always answers the same slot (on data where the winner is in each slot equally often)."""
        return float(np.mean((self.p_a_first > 0.5) != (self.p_a_second > 0.5)))

    @property
    def first_slot(self) -> float:
        """Mean probability of answering the first slot, over both orders: ½ for no position preference."""
        return float(np.mean((self.p_a_first + 1 - self.p_a_second) / 2))


class LMJudge:
    """A causal LM that compares two responses by the probability of its answer token, both orders averaged.

    Args:
        model: a local causal LM (any transformers architecture), on any device; used in eval mode, not trained.
        tokenizer: its tokenizer.
        template: the comparison prompt with ``{prompt}``, ``{response_a}``, ``{response_b}``; the answer token
            is read right after its last character (`check_template`).
        answers: the tokens that name the first and the second slot (`answer_token_ids`).
        batch_size: judge prompts per forward pass.
        chat: send the filled template as one user message through the tokenizer's chat template (an instruct
            model), so that the answer is the first token of the assistant's turn.
        name: recorded as the ``"labeler"`` of its labels.

    Raises `TemplateError`, `AnswerTokenError` (and `rlhf_env.chat.NoChatTemplate` for ``chat=True`` without a
    template) here, before any comparison.
    """

    stochastic = False

    def __init__(self, model, tokenizer, template: str = TEMPLATE, answers: Sequence[str] = ("A", "B"),
                 batch_size: int = 64, chat: bool = False, name: str = "lm-judge"):
        check_template(template)
        self.answer_ids = answer_token_ids(tokenizer, answers, getattr(model.config, "vocab_size", None))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chat:
            require_chat_template(tokenizer, "a chat judge's prompt")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.answers, self.batch_size, self.chat, self.name = tuple(answers), batch_size, chat, name

    def render(self, prompt, first: str, second: str):
        """The judge prompt for one comparison: the filled template (a one-message conversation if `chat`)."""
        text = self.template.format(prompt=prompt_text(prompt), response_a=first, response_b=second)
        return [{"role": "user", "content": text}] if self.chat else text

    @torch.no_grad()
    def p_first(self, prompts: list, firsts: list[str], seconds: list[str]) -> np.ndarray:
        """P(the first slot wins) for each comparison as shown, ``(N,)``: a softmax over the two answer tokens'
        logits after the judge prompt (one order only: see `compare`)."""
        n = _check_lengths(prompts, firsts, seconds)
        judge_prompts = [self.render(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        queries = encode_prompts(self.tokenizer, judge_prompts, model_max_length(self.model))
        self.model.eval()
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for start in range(0, n, self.batch_size):
            ids, mask = pad_left(queries[start : start + self.batch_size], pad, device)  # (B, P), (B, P)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            two = logits[:, -1, list(self.answer_ids)].float()  # (B, 2): left padding puts every prompt's end last
            out.append(torch.softmax(two, dim=-1)[:, 0].cpu())  # (B,)
        return torch.cat(out).double().numpy()

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> Judgement:
        """Ask every comparison in both orders (one batched pass over 2N prompts)."""
        n = _check_lengths(prompts, responses_a, responses_b)
        p = self.p_first(list(prompts) * 2, list(responses_a) + list(responses_b),
                         list(responses_b) + list(responses_a))  # (2N,)
        return Judgement(p_a_first=p[:n], p_a_second=1 - p[n:])

    def prefer(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """P(a ≻ b), both orders averaged, ``(N,)``."""
        return self.compare(prompts, responses_a, responses_b).p


# --- rule judge ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principle:
    """One named principle of a constitution, with its weight: give exactly one of `score` and `judge`."""

    name: str
    """Names it in reports and errors."""
    score: Callable[[list, list[str]], Sequence[float]] | None = None
    """A batched score ``(prompts, responses) -> one number per response`` (higher is better), the form of
    rlhf-gym's reward functions: ``task.gold_reward``, `rlhf_env.tasks.sentiment.brevity`, your own."""
    judge: Labeler | None = None
    """Or a judge of two responses (an `LMJudge` prompted with this principle), whose 2·P(a ≻ b) − 1 counts."""
    weight: float = 1.0
    """Its weight in the sum (negative: a principle to violate)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PrincipleError(f"a principle needs a non-empty name, got {self.name!r}")
        if (self.score is None) == (self.judge is None):
            raise PrincipleError(f"principle {self.name!r}: give exactly one of score= (a function of prompts and "
                                 "responses) and judge= (a labeler of two responses)")
        if self.score is not None and not callable(self.score):
            raise PrincipleError(f"principle {self.name!r}: score must be callable, got {type(self.score).__name__}")
        if self.judge is not None and not isinstance(self.judge, Labeler):
            raise PrincipleError(f"principle {self.name!r}: judge must be a labeler (name, stochastic, prefer), "
                                 f"got {type(self.judge).__name__}")
        if not _is_number(self.weight):
            raise PrincipleError(f"principle {self.name!r}: weight must be a finite number, got {self.weight!r}")


def _is_number(value) -> bool:
    """A finite real number (bools count as 0 and 1: a yes/no principle scores that way)."""
    return isinstance(value, (numbers.Real, np.bool_)) and math.isfinite(float(value))


def principle_scores(principle: Principle, prompts: list, responses: list[str]) -> np.ndarray:
    """`principle.score` on a batch, checked: `PrincipleError` naming the principle and the first bad value unless
    it returns one finite number per response. ``(N,)`` float64."""
    values = principle.score(prompts, responses)
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise PrincipleError(f"principle {principle.name!r} returned {type(values).__name__} {values!r:.60}; a "
                             "score returns a sequence with one number per response")
    if len(values) != len(responses):
        raise PrincipleError(f"principle {principle.name!r} returned {len(values)} values for {len(responses)} "
                             "responses")
    for i, value in enumerate(values):
        if not _is_number(value):
            raise PrincipleError(f"principle {principle.name!r} returned {value!r} ({type(value).__name__}) for "
                                 f"response {i} ({responses[i]!r:.60}); a score must be a finite number")
    return np.asarray(values, dtype=np.float64)


class RuleJudge:
    """A constitution: weighted principles combined into P(a ≻ b) (the module docstring states the rule).

    Args:
        principles: the `Principle`s, with distinct names.
        margin: at temperature 0, a weighted difference d with |d| ≤ margin is a tie (P = ½).
        temperature: 0 for a hard preference; T > 0 for P = σ(d / T) (then `margin` must be 0).
        name: recorded as the ``"labeler"`` of its labels.
    """

    stochastic = False

    def __init__(self, principles: Sequence[Principle], margin: float = 0.0, temperature: float = 0.0,
                 name: str = "rule-judge"):
        principles = list(principles)
        if not principles or not all(isinstance(p, Principle) for p in principles):
            raise PrincipleError(f"a rule judge needs a non-empty list of Principle, got {principles!r:.80}")
        names = [p.name for p in principles]
        if len(set(names)) != len(names):
            raise PrincipleError(f"principle names must be distinct, got {names}")
        if not (_is_number(margin) and margin >= 0 and _is_number(temperature) and temperature >= 0):
            raise ValueError(f"margin and temperature must be finite and >= 0, got {margin!r} and {temperature!r}")
        if margin > 0 and temperature > 0:
            raise ValueError("a margin decides ties of the hard preference (temperature 0); with a temperature "
                             "there are no ties: set one of them")
        self.principles, self.margin, self.temperature, self.name = principles, margin, temperature, name

    def scores(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> dict[str, np.ndarray]:
        """Each principle's signed verdict s_k, ``(N,)`` by name: score(a) − score(b), or 2·P(a ≻ b) − 1."""
        n = _check_lengths(prompts, responses_a, responses_b)
        verdicts = {}
        for principle in self.principles:  # the scores first: a bad one fails before any judge's model runs
            if principle.score is not None:  # one call over both sides
                both = principle_scores(principle, list(prompts) * 2, list(responses_a) + list(responses_b))
                verdicts[principle.name] = both[:n] - both[n:]
        for principle in self.principles:
            if principle.judge is not None:
                p = check_probabilities(principle.judge.prefer(prompts, responses_a, responses_b), n,
                                        f"the judge of principle {principle.name!r}")
                verdicts[principle.name] = 2 * p - 1
        return verdicts

    def prefer(self, prompts: list, responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """P(a ≻ b) from the weighted sum d of the principles' verdicts, ``(N,)``."""
        verdicts = self.scores(prompts, responses_a, responses_b)
        d = sum(p.weight * verdicts[p.name] for p in self.principles)  # (N,)
        if self.temperature > 0:
            return 1 / (1 + np.exp(-d / self.temperature))
        return np.where(d > self.margin, 1.0, np.where(d < -self.margin, 0.0, 0.5))


# --- labelling -----------------------------------------------------------------------------------------------


def check_probabilities(p, n: int, who: str) -> np.ndarray:
    """`p` as a float64 ``(n,)`` array; `LabelerError` naming `who` unless it holds n numbers in [0, 1]."""
    try:
        array = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise LabelerError(f"{who} returned {type(p).__name__}, not an array of probabilities") from None
    if array.shape != (n,):
        raise LabelerError(f"{who} returned shape {array.shape} for {n} comparisons; expected ({n},)")
    if not np.all((array >= 0) & (array <= 1)):  # NaN fails too
        raise LabelerError(f"{who} returned values outside [0, 1] (e.g. {array[~((array >= 0) & (array <= 1))][0]})")
    return array


def label_pairs(labeler: Labeler, prompts: list, responses_a: list[str], responses_b: list[str], seed: int = 0,
                ties: str = "drop", gold_a: Sequence[float] | None = None, gold_b: Sequence[float] | None = None,
                group: Sequence[int] | None = None) -> list[dict]:
    """Label N comparisons with `labeler`: preference pairs in the pairs-JSONL format
    (`rlhf_env.pipeline.preferences`), each with ``"labeler"`` (its name) and ``"p_chosen"`` (its P of the chosen
    side), plus ``chosen_gold`` / ``rejected_gold`` and ``group`` when given.

    Every probability is asked for (one batched `prefer`) and checked before the first label is made. A stochastic
    labeler's label is a draw from P; a judge's is the more probable side. P = ½ exactly is a tie: dropped
    (``ties="drop"``) or a seeded coin flip (``ties="random"``). Identical responses are skipped.
    """
    n = _check_lengths(prompts, responses_a, responses_b)
    if ties not in ("drop", "random"):
        raise ValueError(f"ties must be 'drop' or 'random', got {ties!r}")
    for extra, what in ((gold_a, "gold_a"), (gold_b, "gold_b"), (group, "group")):
        if extra is not None and len(extra) != n:
            raise ValueError(f"{what} has {len(extra)} entries for {n} comparisons")
    keep = [i for i in range(n) if responses_a[i] != responses_b[i]]
    if not keep:
        return []
    p = check_probabilities(labeler.prefer([prompts[i] for i in keep], [responses_a[i] for i in keep],
                                           [responses_b[i] for i in keep]), len(keep), f"labeler {labeler.name!r}")
    draws = np.random.default_rng(seed).random(len(keep))  # one uniform per comparison: samples and tie coins
    pairs = []
    for k, i in enumerate(keep):
        if p[k] == 0.5:
            if ties == "drop":
                continue
            a_wins = bool(draws[k] < 0.5)
        else:
            a_wins = bool(draws[k] < p[k]) if labeler.stochastic else bool(p[k] > 0.5)
        chosen, rejected = (responses_a[i], responses_b[i]) if a_wins else (responses_b[i], responses_a[i])
        record = {"prompt": prompts[i], "chosen": chosen, "rejected": rejected}
        if gold_a is not None and gold_b is not None:
            gold_w, gold_l = (gold_a[i], gold_b[i]) if a_wins else (gold_b[i], gold_a[i])
            record.update(chosen_gold=float(gold_w), rejected_gold=float(gold_l))
        if group is not None:
            record["group"] = int(group[i])
        record.update(labeler=labeler.name, p_chosen=float(p[k] if a_wins else 1 - p[k]))
        pairs.append(record)
    return pairs


def label_groups_by(labeler: Labeler, groups: list[dict], seed: int = 0, ties: str = "drop") -> list[dict]:
    """Label all C(K, 2) pairs of each sampled group (`rlhf_env.pipeline.preferences.sample_groups`) with any
    labeler in one `label_pairs` call: the preference pipeline with an AI judge in the annotators' place."""
    prompts, a, b, gold_a, gold_b, index = [], [], [], [], [], []
    for g, group in enumerate(groups):
        responses, gold = group["responses"], group.get("gold")
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                prompts.append(group["prompt"])
                a.append(responses[i])
                b.append(responses[j])
                gold_a.append(gold[i] if gold is not None else math.nan)
                gold_b.append(gold[j] if gold is not None else math.nan)
                index.append(g)
    with_gold = all(group.get("gold") is not None for group in groups)
    return label_pairs(labeler, prompts, a, b, seed=seed, ties=ties, gold_a=gold_a if with_gold else None,
                       gold_b=gold_b if with_gold else None, group=index)
