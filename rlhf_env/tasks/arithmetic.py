"""Verifiable arithmetic: add or subtract two numbers below 100, written digit by digit.

The smallest task whose gold reward is a checker rather than a model (the "verifiable rewards" setting of
reasoning RL, in miniature). A prompt is ``a + b =`` or ``a - b =`` with ``0 <= a, b <= 99`` and ``a >= b`` for
subtraction, so that no result is negative; every number is written one digit per word, because the word-level
tokenizer must see digits as tokens::

    prompt    "4 7 + 3 8 ="        response  "8 5"
    prompt    "5 2 - 3 8 ="        response  "1 4"

Gold reward: 1.0 if the response is exactly the right number (one digit per word, no leading zeros), else 0.0.
**Best reachable gold: 1.0.**

Demonstrations come from a *noisy teacher*, so that supervised fine-tuning alone cannot reach the best gold and RL
has something to fix. The teacher writes the right answer with probability 1 − ``P_ERROR`` = **0.7**; otherwise it
makes one mistake:

* if the problem has a carry (addition) or a borrow (subtraction), with probability ``P_FORGET_CARRY`` = 0.5 it
  forgets one of them, chosen uniformly: a forgotten carry into column i gives ``correct − 10**i``, a forgotten
  borrow gives ``correct + 10``;
* otherwise it is off by one in one digit of the right answer: one (digit, ±1) change drawn uniformly from those
  that keep a digit in 0..9 and add no leading zero.

Every mistake changes the number and keeps it well formed, so the teacher's accuracy is exactly 0.7 and all its
answers are well formed. Its distribution over answers is known in closed form (`teacher_distribution`), which
makes `ArithmeticTask.log_prob` exact.
"""

from __future__ import annotations

import math

import numpy as np

from rlhf_env.tasks.base import AnnotatorConfig, GeneratedTask

MAX_OPERAND = 99
OPERATORS = ("+", "-")
DIGITS = frozenset("0123456789")
P_ERROR = 0.3
"""Probability that the teacher makes a mistake: its accuracy is 1 − P_ERROR."""
P_FORGET_CARRY = 0.5
"""Given a mistake on a problem with a carry or borrow, the probability that the mistake is forgetting one."""


def digits(n: int) -> str:
    """``47 -> "4 7"``: a non-negative integer written one digit per word."""
    if n < 0:
        raise ValueError(f"only non-negative numbers are written, got {n}")
    return " ".join(str(n))


def parse_number(text: str) -> int | None:
    """The number a digit-per-word text spells, or `None` if it is not one (empty, a non-digit, a leading zero)."""
    words = text.split()
    if not words or any(len(w) != 1 or w not in DIGITS for w in words):
        return None
    if len(words) > 1 and words[0] == "0":
        return None
    return int("".join(words))


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """``"4 7 + 3 8 =" -> (47, "+", 38)``; raises ValueError for anything that is not an arithmetic prompt."""
    words = prompt.split()
    ops = [i for i, w in enumerate(words) if w in OPERATORS]
    if len(ops) != 1 or not words or words[-1] != "=":
        raise ValueError(f"not an arithmetic prompt (expected 'a + b =' or 'a - b =' digit by digit): {prompt!r}")
    i = ops[0]
    a, b = parse_number(" ".join(words[:i])), parse_number(" ".join(words[i + 1 : -1]))
    if a is None or b is None or a > MAX_OPERAND or b > MAX_OPERAND or (words[i] == "-" and a < b):
        raise ValueError(f"not an arithmetic prompt (operands 0..{MAX_OPERAND}, no negative result): {prompt!r}")
    return a, words[i], b


def format_prompt(a: int, op: str, b: int) -> str:
    """``(47, "+", 38) -> "4 7 + 3 8 ="``."""
    return f"{digits(a)} {op} {digits(b)} ="


def correct_answer(a: int, op: str, b: int) -> int:
    """The right answer to ``a op b``."""
    return a + b if op == "+" else a - b


def forgotten_carry_answers(a: int, op: str, b: int) -> list[int]:
    """What the teacher writes if it forgets each carry (or borrow) of the problem, one answer per carry.

    Column-wise addition that drops the carry into column i computes exactly ``a + b − 10**i``, whatever later
    carries it changes; for subtraction (at most two digits, ``a >= b``) the only borrow is from the tens into the
    units, and dropping it computes ``a − b + 10``.
    """
    answer = correct_answer(a, op, b)
    if op == "-":
        return [answer + 10] if a % 10 < b % 10 else []
    out, carry = [], 0
    for column in range(2):  # operands have at most two digits, so carries go into columns 1 and 2
        carry = (a // 10**column % 10 + b // 10**column % 10 + carry) // 10
        if carry:
            out.append(answer - 10 ** (column + 1))
    return out


def off_by_one_answers(answer: int) -> list[int]:
    """Every number that differs from `answer` by ±1 in one digit, keeps digits in 0..9 and has no leading zero."""
    text = str(answer)
    out = []
    for position, char in enumerate(text):
        for delta in (-1, 1):
            digit = int(char) + delta
            if not 0 <= digit <= 9 or (position == 0 and digit == 0 and len(text) > 1):
                continue
            out.append(int(text[:position] + str(digit) + text[position + 1 :]))
    return out


def teacher_distribution(a: int, op: str, b: int) -> dict[int, float]:
    """The noisy teacher's exact distribution over answers to ``a op b`` (see the module docstring)."""
    answer = correct_answer(a, op, b)
    dist = {answer: 1.0 - P_ERROR}
    forgotten, off_by_one = forgotten_carry_answers(a, op, b), off_by_one_answers(answer)
    p_forget = P_FORGET_CARRY if forgotten else 0.0
    # Two kinds of mistake can land on the same number (a forgotten carry is also a tens digit off by one), so
    # probabilities are added, not assigned.
    for wrong in forgotten:
        dist[wrong] = dist.get(wrong, 0.0) + P_ERROR * p_forget / len(forgotten)
    for wrong in off_by_one:
        dist[wrong] = dist.get(wrong, 0.0) + P_ERROR * (1 - p_forget) / len(off_by_one)
    return dist


class ArithmeticTask(GeneratedTask):
    """Answer ``a + b =`` / ``a - b =`` (operands 0..99) digit by digit. Gold ∈ {0, 1}; best reachable gold 1.0.

    Prompts: all 10,000 sums and 5,050 differences with a non-negative result (15,050), 10% held out for
    evaluation. Demonstrations: a teacher that is right 70% of the time (module docstring). Annotators: they see
    the gold order and click the wrong answer 10% of the time.

    >>> task = ArithmeticTask()
    >>> task.gold("4 7 + 3 8 =", "8 5")
    1.0
    >>> task.gold("4 7 + 3 8 =", "7 5")  # forgot the carry
    0.0
    >>> task.gold("4 7 + 3 8 =", "0 8 5"), task.is_well_formed("4 7 + 3 8 =", "0 8 5")  # a leading zero
    (0.0, False)
    >>> round(math.exp(task.log_prob("4 7 + 3 8 =", "8 5")), 3)
    0.7
    """

    name = "arithmetic"
    best_gold = 1.0
    max_new_tokens = 4  # the longest answer, 99 + 99 = 198, is 3 digits + EOS
    annotator = AnnotatorConfig(temperature=0.0, flip_prob=0.1)

    def __init__(self, eval_fraction: float = 0.1, seed: int = 0):
        prompts = [
            format_prompt(a, op, b)
            for a in range(MAX_OPERAND + 1)
            for b in range(MAX_OPERAND + 1)
            for op in OPERATORS
            if op == "+" or a >= b
        ]
        super().__init__(prompts, eval_fraction, seed)

    def demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
        return digits(sample_teacher(*parse_prompt(prompt), rng))

    def gold(self, prompt: str, response: str) -> float:
        return 1.0 if parse_number(response) == correct_answer(*parse_prompt(prompt)) else 0.0

    def is_well_formed(self, prompt: str, response: str) -> bool:
        return parse_number(response) is not None

    def log_prob(self, prompt: str, response: str) -> float | None:
        """Exact log-probability that the teacher writes `response`; `None` if it never would."""
        number = parse_number(response)
        p = teacher_distribution(*parse_prompt(prompt)).get(number, 0.0) if number is not None else 0.0
        return math.log(p) if p > 0 else None


def sample_teacher(a: int, op: str, b: int, rng: np.random.Generator) -> int:
    """Draw the noisy teacher's answer to ``a op b`` with one uniform draw from `rng`."""
    dist = teacher_distribution(a, op, b)
    u, total = rng.random(), 0.0
    for answer, p in dist.items():
        total += p
        if u < total:
            return answer
    return answer  # u fell in the rounding gap above the last cumulative sum (≈1e-16)
