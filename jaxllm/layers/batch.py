"""BatchMetadata: the device-side description of one ragged step over the paged KV cache.

A step carries T query tokens from B sequences packed along one axis (prefill chunks and decodes
mixed). Padding tokens point at sequence slot 0 with position 0 and write their K/V into page 0,
which the block manager never hands out; padding sequence slots have `seq_lens == 0`. The engine
packs it on the host (jaxllm/engine/step_inputs.py:build_batch).
"""

import dataclasses
import functools

import jax


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
