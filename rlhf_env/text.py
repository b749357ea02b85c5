"""Text → token ids → padded tensors, with input checks: prompts as queries, responses with EOS, aligned pairs.

Legend: ``N`` examples, ``P`` query tokens (left-padded), ``T`` response tokens (right-padded, EOS included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_env.chat import check_prompt, encode_conversation, is_conversation
from rlhf_env.lm import pad_left, pad_right


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list, max_length: int) -> list[list[int]]:
    """Tokenize prompts as queries, refusing any that are empty or do not fit `max_length` tokens.

    A prompt is a string (``tokenizer(prompt)``, special tokens included) or a conversation, a list of
    ``{"role", "content"}`` messages, rendered by the tokenizer's chat template with the generation prompt
    (`rlhf_env.chat.encode_conversation`; `rlhf_env.chat.NoChatTemplate` without a template, `ValueError` for a
    malformed conversation)."""
    queries = []
    special = set(tokenizer.all_special_ids)  # a costly property: read it once, not per prompt
    for i, prompt in enumerate(prompts):
        if is_conversation(prompt):
            ids = encode_conversation(tokenizer, check_prompt(prompt, f"prompt {i}"), f"prompt {i}")
        elif not isinstance(prompt, str):
            check_prompt(prompt, f"prompt {i}")  # raises, naming the type
        else:
            ids = tokenizer(prompt)["input_ids"]
            content = [t for t in ids if t not in special]
            if not prompt.strip() or not content:
                raise ValueError(f"prompt {i} ({prompt!r}) tokenizes to no tokens besides special tokens")
        if len(ids) > max_length:
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens long, more than the {max_length} the model allows here "
                f"({str(prompt)[:60]!r}...)"
            )
        queries.append(ids)
    return queries


def encode_responses(tokenizer: PreTrainedTokenizerBase, responses: list[str]) -> list[list[int]]:
    """Tokenize responses without special tokens and append EOS (the model must learn to stop)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; responses need one to end")
    return [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]


def decode_responses(tokenizer: PreTrainedTokenizerBase, responses: list[list[int]]) -> list[str]:
    """Decode response token lists, dropping EOS and padding."""
    return [tokenizer.decode(r, skip_special_tokens=True) for r in responses]


@dataclass
class PairedText:
    """Queries and responses as padded tensors, row i of each belonging together."""

    query_ids: torch.Tensor  # (N, P)
    query_mask: torch.Tensor  # (N, P)
    response_ids: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, T)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def rows(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows `index` as ``(query_ids, query_mask, response_ids, response_mask)``, with the columns that are
        padding in every selected row cut off (a batch costs its own longest example, not the dataset's)."""
        query_mask, response_mask = self.query_mask[index], self.response_mask[index]
        p = int(query_mask.sum(1).max())
        t = int(response_mask.sum(1).max())
        return self.query_ids[index][:, -p:], query_mask[:, -p:], self.response_ids[index][:, :t], response_mask[:, :t]

    def to(self, device) -> PairedText:
        return PairedText(self.query_ids.to(device), self.query_mask.to(device), self.response_ids.to(device),
                          self.response_mask.to(device))


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> PairedText:
    """Encode aligned prompts and responses; raise `ValueError` if a query plus response exceeds `max_length`.
    A tokenizer without a pad token pads with EOS (the masks mark the real tokens)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    queries = encode_prompts(tokenizer, prompts, max_length)
    answers = encode_responses(tokenizer, responses)
    for i, (q, a) in enumerate(zip(queries, answers)):
        if len(q) + len(a) > max_length:
            raise ValueError(f"example {i}: query + response is {len(q) + len(a)} tokens, over {max_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # GPT-2's has none
    query_ids, query_mask = pad_left(queries, pad)
    response_ids, response_mask = pad_right(answers, pad)
    return PairedText(query_ids, query_mask, response_ids, response_mask)


def model_max_length(model) -> int:
    """The longest sequence the model's position embeddings allow."""
    return int(model.config.max_position_embeddings)
