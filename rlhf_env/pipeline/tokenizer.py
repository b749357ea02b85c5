"""Task tokenizers, trained with the `tokenizers` library and served as `transformers.PreTrainedTokenizerFast`.

Built-in tasks write whitespace-separated words, so a word-level vocabulary round-trips their text exactly and
keeps every token meaningful (the sentiment vocabulary is ~150 tokens). User corpora of free text can use
byte-level BPE instead, which round-trips any string.

Conventions (the same for any Hugging Face tokenizer the pipeline is given):

* `tokenizer(prompt)` encodes a *query*; ours prepends `<bos>` through its post-processor.
* `tokenizer(response, add_special_tokens=False)` encodes a response; the pipeline appends `eos_token_id`.
* `<pad>`, `<bos>`, `<eos>` and `<unk>` are distinct ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order


def train_tokenizer(texts: Iterable[str], kind: str = "word", vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`.

    Args:
        texts: the corpus (prompts and responses of a task).
        kind: ``"word"`` (whitespace words, for the built-in tasks) or ``"bpe"`` (byte-level BPE, any text).
        vocab_size: upper bound on the vocabulary, special tokens included (``"bpe"`` fills it; ``"word"`` keeps
            every word it sees while the bound allows).

    Returns:
        A fast tokenizer with distinct pad/bos/eos/unk tokens whose post-processor prepends ``<bos>``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
        # WordLevel has no decoder of its own; joining with spaces inverts WhitespaceSplit on normalised text.
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'word' or 'bpe'")
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
