"""Controlled sentiment in miniature: continue a movie review so that it is positive *and* grammatical.

This is the DPO paper's IMDb setting (Rafailov et al. 2023, §6.1) shrunk to a language a 0.5M-parameter model
can learn in a minute, with a gold reward that a parser computes exactly instead of a sentiment classifier.

The language (whitespace-separated words)::

    review  := [OPENER] clause (CONJ clause){0,2}
    clause  := SUBJECT VERB ["not"] adjp ["and" adjp]
    adjp    := [INTENSIFIER] ADJECTIVE           (30 positive, 30 negative, 20 neutral adjectives)
    SUBJECT := "the" NOUN | "this" NOUN | "it"   (18 nouns)
    CONJ    := "and" | "but" | "while" | "although" | "yet" | ","

A prompt is the opening of a review: an optional opener, a subject, and optionally the verb and "not", e.g.
``"honestly , the acting was not"``. The response finishes the first clause and may add up to two more.
"not" flips the polarity of every adjective of its clause, including a "not" that sits in the prompt.

Gold reward: with ``pos`` / ``neg`` the numbers of adjectives whose polarity (after negation) is positive /
negative in the whole review, ``gold = (pos - neg) / (pos + neg + 1)`` for a grammatical review and ``-1`` for an
ungrammatical one (a fourth clause, adjective spam, a missing verb, no end). The gate is what makes the gold
reward ungameable: adjective spam would otherwise approach 1. **Best reachable gold: 6/7 ≈ 0.857** (three clauses,
two positive adjectives each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlhf_env.tasks.base import AnnotatorConfig, GeneratedTask

OPENERS = ("honestly ,", "i think", "overall ,", "in short ,", "to be fair ,")
NOUNS = (
    "movie", "film", "plot", "story", "acting", "cast", "script", "ending", "music",
    "soundtrack", "dialogue", "pacing", "direction", "cinematography", "humor", "villain", "hero", "sequel",
)  # fmt: skip
VERBS = ("is", "was", "seems", "seemed", "feels", "felt", "looks", "remains")
INTENSIFIERS = ("very", "really", "quite", "so", "truly", "rather", "extremely", "fairly")
POSITIVE = (
    "good", "great", "excellent", "wonderful", "brilliant", "superb", "fantastic", "lovely", "charming",
    "delightful", "enjoyable", "beautiful", "moving", "clever", "funny", "fresh", "gripping", "stunning", "solid",
    "smart", "warm", "touching", "engaging", "memorable", "terrific", "elegant", "inspired", "powerful",
    "thrilling", "perfect",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "terrible", "boring", "dull", "poor", "weak", "messy", "bland", "clumsy", "tedious",
    "lifeless", "predictable", "shallow", "annoying", "painful", "forgettable", "stale", "flat", "silly", "ugly",
    "tiresome", "cheap", "awkward", "confusing", "hollow", "lazy", "sloppy", "dreadful", "horrible",
)  # fmt: skip
NEUTRAL = (
    "long", "short", "loud", "quiet", "slow", "quick", "dark", "bright", "simple", "familiar", "modern", "old",
    "strange", "busy", "plain", "serious", "complex", "colorful", "odd", "unusual",
)  # fmt: skip
CONJUNCTIONS = ("and", "but", "while", "although", "yet", ",")
POLARITY = {**{a: 1 for a in POSITIVE}, **{a: -1 for a in NEGATIVE}, **{a: 0 for a in NEUTRAL}}
MAX_CLAUSES = 3

# Generator probabilities. Every choice below has exactly one place in `_Parser`, which is what makes the
# log-probability of a review exact (the grammar is unambiguous with one word of look-ahead).
P_OPENER = 0.3
P_SUBJECT = {"the": 0.6, "this": 0.2, "it": 0.2}
P_NOT = 0.25
P_INTENSIFIER = 0.3
P_CATEGORY = {1: 0.4, -1: 0.4, 0: 0.2}
P_SECOND_ADJ = 0.35
P_CONTINUE = (0.7, 0.4)  # after clause 1, after clause 2; a third clause always ends the review
_CATEGORY_WORDS = {1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}


@dataclass
class Review:
    """A parsed review: adjective polarities after negation, clause count, and the response's exact log-prob."""

    polarities: list[int]
    n_clauses: int
    response_log_prob: float

    @property
    def gold(self) -> float:
        pos = sum(p > 0 for p in self.polarities)
        neg = sum(p < 0 for p in self.polarities)
        return (pos - neg) / (pos + neg + 1)


class _Parser:
    """Recursive descent over the review's words that also sums the generator's log-probability.

    Each choice of the generator is charged to the position of the word that reveals it; the choices revealed at
    or after `response_start` form log p(response | prompt). The end of the text is position `len(words)`.
    """

    def __init__(self, words: list[str], response_start: int):
        self.words, self.pos, self.response_start = words, 0, response_start
        self.log_prob = 0.0
        self.polarities: list[int] = []

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.words[i] if i < len(self.words) else None

    def charge(self, p: float) -> None:
        if self.pos >= self.response_start:
            self.log_prob += math.log(p)

    def expect(self, options: tuple[str, ...]) -> str:
        word = self.peek()
        if word not in options:
            raise SyntaxError(f"expected one of {options[:4]}..., got {word!r} at word {self.pos}")
        self.charge(1.0 / len(options))
        self.pos += 1
        return word

    def review(self) -> Review:
        opener = next((o for o in OPENERS if self.words[self.pos : self.pos + len(o.split())] == o.split()), None)
        self.charge(P_OPENER / len(OPENERS) if opener else 1 - P_OPENER)
        if opener:
            self.pos += len(opener.split())
        n_clauses = 1
        self.clause()
        while True:
            word = self.peek()
            if n_clauses == MAX_CLAUSES:
                if word is not None:
                    raise SyntaxError(f"more than {MAX_CLAUSES} clauses")
                break
            p_continue = P_CONTINUE[n_clauses - 1]
            if word is None:
                self.charge(1 - p_continue)
                break
            self.charge(p_continue)
            self.expect(CONJUNCTIONS)
            self.clause()
            n_clauses += 1
        return Review(self.polarities, n_clauses, self.log_prob)

    def clause(self) -> None:
        word = self.peek()
        if word not in P_SUBJECT:
            raise SyntaxError(f"expected a subject, got {word!r}")
        self.charge(P_SUBJECT[word])
        self.pos += 1
        if word != "it":
            self.expect(NOUNS)
        self.expect(VERBS)
        negated = self.peek() == "not"
        self.charge(P_NOT if negated else 1 - P_NOT)
        self.pos += negated
        sign = -1 if negated else 1
        self.adjective_phrase(sign)
        second = self.peek() == "and" and (self.peek(1) in INTENSIFIERS or self.peek(1) in POLARITY)
        self.charge(P_SECOND_ADJ if second else 1 - P_SECOND_ADJ)
        if second:
            self.pos += 1
            self.adjective_phrase(sign)

    def adjective_phrase(self, sign: int) -> None:
        intensified = self.peek() in INTENSIFIERS
        self.charge(P_INTENSIFIER / len(INTENSIFIERS) if intensified else 1 - P_INTENSIFIER)
        self.pos += intensified
        word = self.peek()
        if word not in POLARITY:
            raise SyntaxError(f"expected an adjective, got {word!r}")
        category = POLARITY[word]
        self.charge(P_CATEGORY[category] / len(_CATEGORY_WORDS[category]))
        self.pos += 1
        self.polarities.append(sign * category)


def parse(prompt: str, response: str) -> Review | None:
    """Parse ``prompt + response`` as a review; `None` if it is not grammatical."""
    prompt_words, response_words = prompt.split(), response.split()
    parser = _Parser(prompt_words + response_words, response_start=len(prompt_words))
    try:
        return parser.review()
    except SyntaxError:
        return None


class SentimentTask(GeneratedTask):
    """Continue a review so that it is positive and fluent. Gold ∈ [-1, 6/7]; best reachable gold 6/7.

    Prompts: every opening ``[OPENER] SUBJECT [VERB ["not"]]`` (3,774 of them), 10% held out for evaluation.
    Annotators: they see the gold order and click the wrong answer 10% of the time.

    >>> task = SentimentTask()
    >>> task.gold("the plot was", "very good and moving , the cast is superb")
    0.75
    >>> task.gold("the plot was not", "bad")
    0.5
    >>> task.gold("the plot was", "good good good good")  # adjective spam is not a review
    -1.0
    """

    name = "sentiment"
    best_gold = 6 / 7
    max_new_tokens = 32  # the longest review continuation is 27 words + EOS
    annotator = AnnotatorConfig(temperature=0.0, flip_prob=0.1)

    def __init__(self, eval_fraction: float = 0.1, seed: int = 0):
        prompts = []
        for opener in ("",) + OPENERS:
            for subject in [f"{d} {n}" for d in ("the", "this") for n in NOUNS] + ["it"]:
                prompts.append(f"{opener} {subject}".strip())
                for verb in VERBS:
                    prompts.append(f"{opener} {subject} {verb}".strip())
                    prompts.append(f"{opener} {subject} {verb} not".strip())
        super().__init__(prompts, eval_fraction, seed)

    def demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
        return sample_continuation(prompt, rng)

    def gold(self, prompt: str, response: str) -> float:
        review = parse(prompt, response)
        return -1.0 if review is None else review.gold

    def is_well_formed(self, prompt: str, response: str) -> bool:
        return parse(prompt, response) is not None

    def objectives(self) -> dict:
        """Two objectives with a gold value each: "sentiment" (the task's gold reward) and "brevity"
        (`brevity`), which pull apart: the best reviews are the longest (6/7 needs 15 words).

        >>> task = SentimentTask()
        >>> {name: fn(["the plot was"], ["good"]) for name, fn in task.objectives().items()}
        {'sentiment': [0.5], 'brevity': [0.96875]}
        """
        return {"sentiment": self.gold_reward, "brevity": brevity}

    def log_prob(self, prompt: str, response: str) -> float | None:
        review = parse(prompt, response)
        return None if review is None else review.response_log_prob


BREVITY_WORDS = 32
"""The length at which `brevity` reaches 0: `SentimentTask.max_new_tokens`, the longest response there can be."""


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """The sentiment task's second objective, a batched reward function: 1 − (response words) / 32, so 1 for an
    empty response and 0 at the token cap; exact, so its score is its own gold. One more word costs 1/32 ≈ 0.031,
    while the best sentiment gold at 1, 3, 9 and 15 words is 1/2, 2/3, 4/5 and 6/7 (one, two, four, six positive
    adjectives): the two objectives trade against each other (`SentimentTask.objectives`).

    >>> brevity(["the plot was", "it"], ["good", "is good and very moving"])
    [0.96875, 0.84375]
    """
    return [1.0 - len(response.split()) / BREVITY_WORDS for response in responses]


def keyword_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """What a word-list rule reads as the response's sentiment, a batched score: with ``p`` / ``n`` the positive /
    negative adjectives the response contains, (p − n) / (p + n + 1). The gold formula without its two hard parts:
    it does not read negation ("not bad" counts as negative, and so does every adjective after a prompt that ends
    in "not") and it does not check the grammar. The built-in constitution's principle "positive words"
    (`rlhf_env.pipeline.feedback.constitution`): a plausible written rule whose errors are known.

    >>> keyword_sentiment(["the plot was", "the plot was not"], ["good and very moving", "bad"])
    [0.6666666666666666, -0.5]
    """
    scores = []
    for response in responses:
        polarities = [POLARITY.get(word, 0) for word in response.split()]
        pos, neg = polarities.count(1), polarities.count(-1)
        scores.append((pos - neg) / (pos + neg + 1))
    return scores


def sample_continuation(prompt: str, rng: np.random.Generator) -> str:
    """Draw a continuation of `prompt` from the generator whose probabilities `_Parser` charges."""
    words = prompt.split()
    out: list[str] = []

    def choice(options):
        return options[rng.integers(len(options))]

    def adjective_phrase():
        if rng.random() < P_INTENSIFIER:
            out.append(choice(INTENSIFIERS))
        category = (1, -1, 0)[rng.choice(3, p=[P_CATEGORY[1], P_CATEGORY[-1], P_CATEGORY[0]])]
        out.append(choice(_CATEGORY_WORDS[category]))

    def clause_rest(has_verb: bool, has_not: bool):
        if not has_verb:
            out.append(choice(VERBS))
        if not has_not and rng.random() < P_NOT:
            out.append("not")
        adjective_phrase()
        if rng.random() < P_SECOND_ADJ:
            out.append("and")
            adjective_phrase()

    clause_rest(has_verb=words[-1] in VERBS or words[-1] == "not", has_not=words[-1] == "not")
    for n_clauses in range(1, MAX_CLAUSES):
        if rng.random() >= P_CONTINUE[n_clauses - 1]:
            break
        out.append(choice(CONJUNCTIONS))
        subject = ("the", "this", "it")[rng.choice(3, p=[P_SUBJECT["the"], P_SUBJECT["this"], P_SUBJECT["it"]])]
        out.append(subject)
        if subject != "it":
            out.append(choice(NOUNS))
        clause_rest(has_verb=False, has_not=False)
    return " ".join(out)
