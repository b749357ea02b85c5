import numpy as np
import pytest
from transformers import AutoTokenizer

from rlhf_env.pipeline.tokenizer import train_tokenizer


def test_special_tokens_are_distinct(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert None not in ids and len(set(ids)) == 4


def test_word_tokenizer_round_trips_task_text(tokenizer, task):
    for prompt, response in task.demonstrations(200, np.random.default_rng(0)):
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # queries start with <bos>
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in r
        assert tokenizer.decode(r) == response


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "honestly , the plot was not very good"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_bpe_round_trips_any_text():
    corpus = ["The café served 12 croissants; 7+5=12!", "naïve résumé — ünïcode", "tabs\tand  spaces"] * 20
    tok = train_tokenizer(corpus, kind="bpe", vocab_size=300)
    for text in corpus[:3] + ["unseen words ☃ here"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["a b"], kind="sentencepiece")
