"""The host packing of a step (engine/step_inputs.py) against a plain per-sequence reference, and the
per-step bans of a row (engine/step_request.py)."""

import numpy as np
import pytest

from jaxllm.engine.step_inputs import build_batch
from jaxllm.layers.batch import NULL_PAGE


def reference_batch(seq_tokens, seq_starts, block_tables, page_size, T, B, P):
    """One sequence at a time, as the packing was first written."""
    total = sum(map(len, seq_tokens))
    token_ids, positions, token_seq = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    slot_mapping = np.full(T, NULL_PAGE * page_size, np.int32)
    query_start, seq_lens = np.full(B + 1, total, np.int32), np.zeros(B, np.int32)
    tables, logits_indices = np.full((B, P), NULL_PAGE, np.int32), np.zeros(B, np.int32)
    offset = 0
    for i, (tokens, start, table) in enumerate(zip(seq_tokens, seq_starts, block_tables)):
        n = len(tokens)
        pos = np.arange(start, start + n)
        token_ids[offset : offset + n] = tokens
        positions[offset : offset + n] = pos
        slot_mapping[offset : offset + n] = np.asarray(table)[pos // page_size] * page_size + pos % page_size
        token_seq[offset : offset + n] = i
        query_start[i], seq_lens[i], logits_indices[i] = offset, start + n, offset + n - 1
        tables[i, : len(table)] = table
        offset += n
    return token_ids, positions, slot_mapping, token_seq, query_start, seq_lens, tables, logits_indices


@pytest.mark.parametrize("seed", range(5))
def test_build_batch_matches_the_per_sequence_packing(seed):
    rng = np.random.default_rng(seed)
    page_size, n = 4, int(rng.integers(1, 9))
    seq_tokens, starts, tables = [], [], []
    for _ in range(n):
        start, count = int(rng.integers(0, 30)), int(rng.integers(1, 12))
        pages = -(-(start + count) // page_size) + int(rng.integers(0, 2))  # sometimes a page to spare
        seq_tokens.append([int(t) for t in rng.integers(0, 1000, count)])
        starts.append(start)
        tables.append([int(p) for p in rng.permutation(np.arange(1, 200))[:pages]])
    T, B, P = sum(map(len, seq_tokens)) + 5, n + 2, max(map(len, tables)) + 1
    got = build_batch(seq_tokens, starts, tables, page_size, T, B, P)
    want = reference_batch(seq_tokens, starts, tables, page_size, T, B, P)
    fields = ("token_ids", "positions", "slot_mapping", "token_seq", "query_start", "seq_lens", "block_tables",
              "logits_indices")  # fmt: skip
    for name, expected in zip(fields, want):
        np.testing.assert_array_equal(getattr(got, name), expected, err_msg=name)


def test_build_batch_refuses_a_block_table_short_of_its_tokens():
    with pytest.raises(ValueError, match="lacks the pages"):
        build_batch([[1, 2, 3]], [6], [[5, 7]], 4, 8, 2, 4)  # positions 6..8 need a third page


def test_banned_tokens_only_after_a_bad_words_prefix_and_below_min_tokens():
    from jaxllm import SamplingParams
    from jaxllm.engine.sequence import Request, Sequence
    from jaxllm.engine.step_request import banned_tokens

    params = SamplingParams(max_tokens=8, min_tokens=2)
    request = Request(0, None, [5, 6], params, None, stop_token_ids=frozenset({2}), bad_word_ids=((7, 8, 9), (6, 4)))
    seq = Sequence(seq_id=0, request=request, index=0, token_ids=[5, 6], num_prompt_tokens=2, seed=0)
    assert banned_tokens(seq) == [2, 4]  # below min_tokens: the end token; the prompt ends with 6: 4
    seq.token_ids += [7, 8, 1]
    assert banned_tokens(seq) == []
    seq.token_ids += [7, 8]
    assert banned_tokens(seq) == [9]
    plain = Request(1, None, [5], SamplingParams(max_tokens=4), None)
    assert banned_tokens(Sequence(seq_id=1, request=plain, index=0, token_ids=[5, 6], num_prompt_tokens=1, seed=0)) == []
