import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_env.lm import pad_left, pad_right, position_ids


def test_left_padding_positions_start_at_zero():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_bad_input():
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1], []], pad_id=0)


token_lists = st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=9), min_size=1, max_size=6)


@given(token_lists)
def test_padding_round_trips_and_positions_count_real_tokens(sequences):
    ids, mask = pad_left(sequences, pad_id=0)
    positions = position_ids(mask)
    for row, m, pos, original in zip(ids, mask, positions, sequences):
        assert row[m.bool()].tolist() == original
        assert pos[m.bool()].tolist() == list(range(len(original)))
    ids, mask = pad_right(sequences, pad_id=0)
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == sequences
