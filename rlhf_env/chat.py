"""Prompts that are conversations: checking them, tokenizing them through a tokenizer's chat template, and finding the
template's end-of-turn token.

A prompt is either a string or a **conversation**, a list of messages ``{"role": str, "content": str}`` (the form of
transformers' chat templates and TRL's conversational datasets). A conversation is tokenized by the tokenizer's
chat template with the generation prompt (`encode_conversation`): the query ends where the assistant's answer
begins. Reward functions and ``task.gold`` receive the conversation itself as the prompt, and the response as
decoded text.

>>> check_prompt([{"role": "user", "content": "hi"}], "prompt 0")
[{'role': 'user', 'content': 'hi'}]
>>> check_prompt(7, "prompt 0")
Traceback (most recent call last):
...
ValueError: prompt 0: expected a string or a conversation (a list of {"role": ..., "content": ...} messages), got int 7
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping

CONVERSATION = 'a conversation (a list of {"role": ..., "content": ...} messages)'
_MARKER = "rlhfgymendofturnprobe"  # an assistant message whose end the template is asked to render


class NoChatTemplate(ValueError):
    """A prompt is a conversation, but the tokenizer has no chat template to turn it into tokens."""


def is_conversation(prompt) -> bool:
    """Whether `prompt` has a conversation's form (a list or tuple; `check_prompt` checks its messages)."""
    return isinstance(prompt, (list, tuple))


def check_prompt(prompt, where: str) -> str | list[dict]:
    """`prompt` as the env uses it: a non-blank string as it is, a conversation as a new list of message dicts.

    Message keys other than ``role`` and ``content`` are kept, except those whose value is None (`datasets` fills
    them in where messages of one column have different keys). `ValueError` naming `where` for anything else: a
    blank string, an empty conversation, a message that is not a dict with a non-empty string ``role`` and a string
    ``content``, a conversation whose contents are all blank, or a value of another type.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is blank")
        return prompt
    if not is_conversation(prompt):
        raise ValueError(f"{where}: expected a string or {CONVERSATION}, got {type(prompt).__name__} "
                         f"{_shown(prompt)}")
    if not prompt:
        raise ValueError(f"{where}: the conversation has no messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}, message {i}: expected a dict with 'role' and 'content', got "
                             f"{type(message).__name__} {_shown(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}, message {i}: 'role' must be a non-empty string, got {_shown(role)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}, message {i}: 'content' must be a string, got {type(content).__name__} "
                             f"{_shown(content)}")
        messages.append({key: value for key, value in message.items() if value is not None})
    if not any(message["content"].strip() for message in messages):
        raise ValueError(f"{where}: every message of the conversation is blank")
    return messages


def prompt_key(prompt) -> Hashable:
    """A hashable key for a prompt: a string is its own key, a conversation a tagged JSON text of its messages."""
    if isinstance(prompt, str):
        return prompt
    return ("conversation", json.dumps(prompt, sort_keys=True, ensure_ascii=False))


def prompt_text(prompt) -> str:
    """A prompt as plain text: a string as it is, a conversation as its messages' contents, one per line (for
    tokenizer corpora and comparisons, not for the models, which read conversations through the template)."""
    return prompt if isinstance(prompt, str) else "\n".join(message["content"] for message in prompt)


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, where: str) -> None:
    """`NoChatTemplate` naming `where` unless `tokenizer` has a chat template."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate(
            f"{where} is a conversation, but the tokenizer ({type(tokenizer).__name__}) has no chat template: pass "
            "a tokenizer that has one (tokenizer.chat_template = a Jinja template), or prompts that are strings")


def encode_conversation(tokenizer, messages: list[dict], where: str = "the prompt") -> list[int]:
    """The token ids of `messages` rendered by the tokenizer's chat template with the generation prompt: the text
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` tokenized without adding special
    tokens (the template writes those it wants, a BOS included). `NoChatTemplate` if there is no template."""
    require_chat_template(tokenizer, where)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens, added special tokens (``<|im_end|>`` ...) included."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, token in decoder.items() if getattr(token, "special", False)}


def detect_end_of_turn(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant message (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, the EOS for templates that close a turn with
    it), found by rendering a two-message conversation. None when the tokenizer has no template, the template fails
    on that conversation, or no special token follows the assistant's text."""
    if not has_chat_template(tokenizer):
        return None
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that insists on other conversations: no token can be read off it
        return None
    if not isinstance(text, str) or _MARKER not in text:
        return None
    after = text[text.rindex(_MARKER) + len(_MARKER):]
    special = special_ids(tokenizer) - {tokenizer.unk_token_id}  # an unknown word is no end of turn
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in special:
            return int(token)
    return None


def _shown(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
