"""The RLHF reward, paid token by token (Ziegler et al. 2019; Ouyang et al. 2022): two pure functions.

Every token pays ``r_t = −β·KL_t`` (`token_reward`); the last token adds the score of the whole response, less a
penalty when the token cap cut it off before EOS (`terminal_reward`). So Σ_t r_t = R(x, y) − β·Σ_t KL_t, and with
the k1 estimator Σ_t KL_t = log π(y|x) − log π_ref(y|x). A NaN/±inf score is refused (`NonFiniteReward`) or, with
``nonfinite_reward="mask"``, paid as 0.0 and flagged so that no agent takes it for data. "Finite" means finite in
float32: agents train in float32, where a score beyond ±3.4e38 (e.g. 1e39) becomes ±inf, so such a score counts as
non-finite too (`fits_float32`).

Scores come from user code (a ``reward_fn``, a task's ``gold``), so they are checked before any arithmetic
(`real_score`): a real number (int, float, a numpy real scalar, or a 0-d numpy array / torch tensor of real dtype)
is accepted; a bool, a string, None, a complex number or a sequence is a `TypeError` naming the function.

A reward function is **batched**, the convention of TRL's reward functions: it is called once per batch of finished
episodes as ``fn(prompts: list[str], responses: list[str], **context) -> Sequence[float]`` (`call_reward_fn`;
`REWARD_CONTEXT` lists what the context holds). A function of one response, ``f(prompt, response) -> float``, is
made batched with `per_item` (``reward_fn=per_item(f)``); passed as it is, it gets a `TypeError` saying so.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlhf_env.kl import kl_estimate

NONFINITE_POLICIES = ("raise", "mask")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # ≈ 3.4e38: the largest magnitude an agent's float32 can hold


class NonFiniteReward(ValueError):
    """The reward model or reward function returned NaN or ±inf (or a number beyond float32's range), or a token's
    KL estimate or reward is not finite."""


def fits_float32(value: float) -> bool:
    """Whether `value` is finite once stored in float32 (|value| ≤ 3.4e38, not NaN)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def real_score(value, source: str, prompt: str) -> float:
    """`value`, returned by user code `source` (e.g. ``"reward_fn my_reward"``) for `prompt`, as a float.

    Accepts int, float, numpy real scalars and 0-d numpy arrays / torch tensors of a real (integer or floating)
    dtype; NaN and ±inf pass here (`checked_score` decides about them). Raises `TypeError` naming `source`, the
    prompt and the value's type for anything else: str, None, complex, sequences and arrays with more than one
    element, and bool (refused: a pass/fail flag is ambiguous as a reward; return ``float(flag)`` if 1.0/0.0 is
    meant).

    >>> real_score(np.float32(0.5), "reward_fn f", "p")
    0.5
    """
    item = value
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
            item = value.item()
    elif isinstance(value, np.ndarray):
        if value.ndim == 0 and value.dtype.kind in "iuf":
            item = value.item()
    if isinstance(item, numbers.Real) and not isinstance(item, (bool, np.bool_)):
        return float(item)
    raise TypeError(f"{source} must return a real number (int or float), got {type(value).__name__} "
                    f"{_shown(value)} for prompt {prompt!r}")


REWARD_CONTEXT = ("query_ids", "response_ids", "finished", "task")
"""What a batched reward function may take besides prompts and responses, by keyword: the prompts' and responses'
token ids (lists of lists; a response ends with its EOS when it has one), whether each response ended with EOS
(``finished``; False: the token cap cut it off), and the task. Only the names in the function's signature are passed
(all of them to a function with ``**context``)."""

PER_ITEM_HINT = ("reward functions are batched: fn(prompts: list[str], responses: list[str], **context) -> one float "
                 "per response, called once per batch of finished episodes; make a function of one response, "
                 "f(prompt, response) -> float, batched with rlhf_env.reward.per_item(f)")


def callable_name(fn) -> str:
    """A function's name for messages and checkpoints (its qualname, or its type's)."""
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def per_item(fn: Callable[[str, str], float]) -> Callable[..., list[float]]:
    """A batched reward function that calls ``fn(prompt, response) -> float`` for each response in turn.

    >>> batched = per_item(lambda prompt, response: float(len(response)))
    >>> batched(["a", "b"], ["xy", "z"])
    [2.0, 1.0]
    """
    @functools.wraps(fn)
    def batched(prompts: list[str], responses: list[str]) -> list[float]:
        return [fn(prompt, response) for prompt, response in zip(prompts, responses)]

    batched.__qualname__ = f"per_item({callable_name(fn)})"
    del batched.__wrapped__  # its signature is the batched one, not fn's
    return batched


def context_names(fn: Callable) -> tuple[str, ...]:
    """The `REWARD_CONTEXT` names `fn` takes by keyword (all of them with ``**kwargs``; none if its signature cannot
    be read)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return REWARD_CONTEXT
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(name for name in REWARD_CONTEXT if name in names)


def call_reward_fn(fn: Callable, prompts: list[str], responses: list[str], context: dict,
                   names: tuple[str, ...] | None = None) -> list[float]:
    """Call the batched reward function `fn` once for ``len(prompts)`` responses and return its scores as floats.

    `context` holds the `REWARD_CONTEXT` values; only `names` (default: `context_names(fn)`) are passed. Raises,
    naming the function: `TypeError` if it returns anything but a sequence (a list, tuple, 1-d array or tensor) or
    an element is not a real number (`real_score`), `ValueError` if the sequence has the wrong length. An error
    raised inside `fn` gets a note on the batched convention. NaN/±inf are returned for the caller to check.
    """
    source = f"reward_fn {callable_name(fn)}"
    names = context_names(fn) if names is None else names
    try:
        out = fn(prompts, responses, **{name: context[name] for name in names})
    except Exception as error:
        error.add_note(f"({source} was called with lists of {len(prompts)} prompts and responses; if it is a "
                       f"function of one response: {PER_ITEM_HINT})")
        raise
    if isinstance(out, torch.Tensor) and out.ndim == 1:
        out = out.tolist()
    elif isinstance(out, np.ndarray) and out.ndim == 1:
        out = list(out)
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise TypeError(f"{source} returned {type(out).__name__} {_shown(out)} for a batch of {len(prompts)} "
                        f"responses: {PER_ITEM_HINT}")
    if len(out) != len(prompts):
        raise ValueError(f"{source} returned {len(out)} scores for {len(prompts)} responses (one per response)")
    return [real_score(value, source, prompt) for value, prompt in zip(out, prompts)]


def _shown(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def token_reward(logprobs: np.ndarray, ref_logprobs: np.ndarray, beta: float,
                 estimator: str = "k1") -> tuple[np.ndarray, np.ndarray]:
    """``(kl, reward)`` of tokens: KL_t by `estimator` from log π and log π_ref of each token (arrays ``(N,)``,
    nats) and r_t = −β·KL_t. Both ``(N,)`` float64.

    >>> kl, reward = token_reward(np.array([-1.0, -2.0]), np.array([-1.5, -2.0]), beta=0.1)
    >>> kl.tolist(), reward.tolist()
    ([0.5, 0.0], [-0.05, -0.0])
    """
    kl = np.asarray(kl_estimate(np.asarray(logprobs, np.float64), np.asarray(ref_logprobs, np.float64), estimator))
    return kl, -beta * kl


def checked_score(score: float, nonfinite_reward: str = "raise", context: str = "") -> tuple[float, bool]:
    """``(score, False)`` for a finite score. For NaN/±inf, or a magnitude beyond float32's (> 3.4e38, which is
    inf where agents train): `NonFiniteReward` (``nonfinite_reward="raise"``, `context` appended to its message) or
    ``(0.0, True)`` (``"mask"``: the flag says the score is not data)."""
    if fits_float32(score):
        return float(score), False
    if nonfinite_reward == "raise":
        raise NonFiniteReward(f"the reward returned {score}{context}")
    return 0.0, True


def terminal_reward(score: float, finished: bool, missing_eos_penalty: float = 0.0, nonfinite_reward: str = "raise",
                    context: str = "") -> tuple[float, float, bool]:
    """What the last token of an episode adds to its −β·KL: ``(reward, score, masked)``, where ``reward`` is the
    score (`checked_score`) less `missing_eos_penalty` unless the response ended with EOS (`finished`). A reward
    that leaves float32's range (a score near ±3.4e38 less a penalty) is treated as a non-finite score.

    >>> terminal_reward(0.8, finished=False, missing_eos_penalty=0.5)
    (0.30000000000000004, 0.8, False)
    >>> terminal_reward(float("nan"), finished=True, nonfinite_reward="mask")
    (0.0, 0.0, True)
    """
    score, masked = checked_score(score, nonfinite_reward, context)
    reward = score - (0.0 if finished else missing_eos_penalty)
    if not fits_float32(reward):
        checked_score(reward, nonfinite_reward, context)  # raises under "raise"
        return 0.0, 0.0, True
    return reward, score, masked


def check_token_rewards(kl: np.ndarray, reward: np.ndarray, logprobs, ref_logprobs, rows=None) -> None:
    """Raise `NonFiniteReward` unless every token's KL estimate and reward ``(N,)`` are finite in float32 (a −inf
    log π_ref, or a k3 estimate that overflows, would otherwise reach the agent as inf or NaN). Whatever
    ``nonfinite_reward`` says: that policy masks scores of whole responses, not the per-token KL. `rows` (the
    env rows of the N tokens) only goes into the message. One vectorised test per step: it runs on every token."""
    kl, reward = np.asarray(kl), np.asarray(reward)
    ok = (np.abs(kl) <= FLOAT32_MAX) & (np.abs(reward) <= FLOAT32_MAX)  # False for NaN as well
    if ok.all():
        return
    i = int(np.flatnonzero(~ok)[0])
    where = "" if rows is None else f" (row {rows[i]})"
    raise NonFiniteReward(f"token {i} of the step{where} has KL estimate {float(kl[i])} and reward "
                          f"{float(reward[i])} (log π {logprobs[i]}, log π_ref {ref_logprobs[i]}): not finite in "
                          "float32")