"""Pallas (Triton) paged-attention kernels for NVIDIA GPUs, each with its plain-jnp reference.

`paged_attention` has the signature of `jaxllm.layers.attention.paged_attention_xla`, so it can be
registered as the `'pallas'` attention backend: a decode-only step (max_query_len == 1) goes to
the split-K decode kernel, anything else to the ragged prefill/mixed kernel.
"""

from __future__ import annotations

import jax

from jaxllm.layers.batch import BatchMetadata
from pallas_kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

__all__ = [
    "paged_attention",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    batch: BatchMetadata,
    *,
    scale: float,
    window: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention through the Pallas kernels.

    Args:
      q: [T, H, d] queries, H a multiple of the KV heads K.
      k_pages, v_pages: [K, P, S, d], already holding this step's keys and values.
      batch: token -> sequence map and block tables. When batch.max_query_len == 1 the step is
        decode-only: T must equal the number of sequence slots and token i belongs to slot i.
      scale: softmax scale.
      window: sliding window (keys with position > query position - window), or None.
      interpret: run the kernels in the Pallas interpreter (CPU).
    Returns:
      [T, H, d] in q's dtype; padding tokens and padding sequence slots give zeros.
    """
    if batch.max_query_len == 1:
        if q.shape[0] != batch.num_seqs:
            raise ValueError(
                f"a decode-only step (max_query_len 1) needs one token per sequence slot; "
                f"got {q.shape[0]} tokens for {batch.num_seqs} slots"
            )
        return paged_decode_attention(
            q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=scale, window=window,
            interpret=interpret,
        )
    return ragged_paged_attention(
        q, k_pages, v_pages, batch.query_start, batch.seq_lens, batch.block_tables,
        max_query_len=batch.max_query_len, scale=scale, window=window, interpret=interpret,
    )
