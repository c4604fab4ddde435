"""BatchMetadata: the device-side description of one ragged step over the paged KV cache.

A step carries T query tokens from B sequences packed along one axis (prefill chunks and decodes
mixed). Padding tokens point at sequence slot 0 with position 0 and write their K/V into page 0,
which the block manager never hands out; padding sequence slots have `seq_lens == 0`.
"""

import dataclasses
import functools

import jax
import numpy as np


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["token_ids", "positions", "slot_mapping", "token_seq", "query_start", "seq_lens",
                 "block_tables", "logits_indices"],
    meta_fields=["max_query_len"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class BatchMetadata:
    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32: position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32: page * page_size + offset where its K/V are written
    token_seq: jax.Array  # [T] int32: the sequence slot each token belongs to
    query_start: jax.Array  # [B + 1] int32: offsets of each sequence's tokens in the packed axis
    seq_lens: jax.Array  # [B] int32: context length of each sequence once this step's tokens are in
    block_tables: jax.Array  # [B, P] int32: page ids of each sequence, 0-padded
    logits_indices: jax.Array  # [B] int32: the packed index of each sequence's last token
    # Static: an upper bound on any sequence's query tokens this step (1 for a decode-only step).
    # Kernels size their grids by it; it is part of the compiled shape bucket.
    max_query_len: int = 1

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


NULL_PAGE = 0  # never allocated: padding tokens write here


def build_batch(
    seq_tokens: list[list[int]],
    seq_starts: list[int],
    block_tables: list[list[int]],
    page_size: int,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    pages_per_seq: int | None = None,
    max_query_len: int | None = None,
) -> BatchMetadata:
    """Pack a step's sequences into host numpy arrays, padded to the given bucket sizes.

    Args:
      seq_tokens: per sequence, the token ids it computes this step.
      seq_starts: per sequence, the position of its first token this step (tokens already cached).
      block_tables: per sequence, its page ids (enough pages for start + len(tokens)).
      page_size: tokens per page.
      num_tokens, num_seqs, pages_per_seq, max_query_len: padded sizes (defaults: exact).
    """
    total = sum(len(t) for t in seq_tokens)
    T = num_tokens or total
    B = num_seqs or len(seq_tokens)
    P = pages_per_seq or max(1, max(len(b) for b in block_tables))
    Q = max_query_len or max(len(t) for t in seq_tokens)
    if total > T or len(seq_tokens) > B or any(len(b) > P for b in block_tables) or any(
        len(t) > Q for t in seq_tokens
    ):
        raise ValueError("batch does not fit its bucket")
    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.full(T, NULL_PAGE * page_size, np.int32)
    token_seq = np.zeros(T, np.int32)
    query_start = np.full(B + 1, total, np.int32)
    seq_lens = np.zeros(B, np.int32)
    tables = np.full((B, P), NULL_PAGE, np.int32)
    logits_indices = np.zeros(B, np.int32)
    offset = 0
    for i, (tokens, start, table) in enumerate(zip(seq_tokens, seq_starts, block_tables)):
        n = len(tokens)
        pos = np.arange(start, start + n, dtype=np.int32)
        table_arr = np.asarray(table, np.int32)
        token_ids[offset : offset + n] = tokens
        positions[offset : offset + n] = pos
        slot_mapping[offset : offset + n] = table_arr[pos // page_size] * page_size + pos % page_size
        token_seq[offset : offset + n] = i
        query_start[i] = offset
        seq_lens[i] = start + n
        tables[i, : len(table)] = table_arr
        logits_indices[i] = offset + n - 1
        offset += n
    return BatchMetadata(
        token_ids, positions, slot_mapping, token_seq, query_start, seq_lens, tables, logits_indices, Q
    )
