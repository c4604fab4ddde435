"""Test inputs for the paged-attention kernels: poisoned KV caches, shuffled block tables, batches.

Every slot that no sequence owns (the null page 0, pages nobody holds, the tail of a sequence's
last page) holds large random values, and block-table entries past a sequence's pages point at
such poisoned pages, so a kernel that reads one wrong key changes its output visibly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.layers.attention import paged_attention_xla
from jaxllm.engine.step_inputs import build_batch

POISON = 1e4
# On the CPU the kernels run in the Pallas interpreter; on a GPU the same tests run them compiled.
INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def make_cache(rng, seq_lens, *, num_kv_heads, page_size, head_dim, pages_per_seq, dtype):
    """Random pages for sequences of the given lengths.

    Returns (k_pages, v_pages [K, P, S, d] in dtype, block_tables [B, pages_per_seq] int32 numpy).
    Page ids are shuffled; table entries past a sequence's last page point at poisoned pages.
    """
    num_seqs = len(seq_lens)
    used = [-(-n // page_size) for n in seq_lens]
    spare = 4  # pages nobody owns, poisoned, that padding table entries point at
    num_pages = 1 + sum(used) + spare
    ids = rng.permutation(np.arange(1, num_pages))
    owned, poisoned = ids[: sum(used)], ids[sum(used) :]
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = rng.uniform(-POISON, POISON, shape).astype(np.float32)
    v = rng.uniform(-POISON, POISON, shape).astype(np.float32)
    tables = rng.choice(poisoned, size=(num_seqs, pages_per_seq)).astype(np.int32)
    offset = 0
    for b, (n, pages) in enumerate(zip(seq_lens, used)):
        tables[b, :pages] = owned[offset : offset + pages]
        offset += pages
        for pos in range(n):
            page, slot = tables[b, pos // page_size], pos % page_size
            k[:, page, slot] = rng.normal(size=(num_kv_heads, head_dim))
            v[:, page, slot] = rng.normal(size=(num_kv_heads, head_dim))
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), tables


def make_batch(seq_starts, query_lens, tables, *, page_size, num_tokens, max_query_len):
    """BatchMetadata (jnp arrays) for sequences computing query_lens tokens from seq_starts.

    `tables` may have more rows than sequences: the extra rows become padding slots.
    """
    seq_tokens = [[7] * n for n in query_lens]
    batch = build_batch(
        seq_tokens, list(seq_starts), [list(row) for row in tables[: len(query_lens)]], page_size,
        num_tokens=num_tokens, num_seqs=tables.shape[0], pages_per_seq=tables.shape[1],
        max_query_len=max_query_len,
    )
    # Padding slots keep their poisoned table rows: a kernel must not read them.
    return dataclasses.replace(jax.tree.map(jnp.asarray, batch), block_tables=jnp.asarray(tables))


def xla_reference(q, k_pages, v_pages, batch, *, scale, window):
    """paged_attention_xla with exact float32 matmuls (XLA would use TF32 on a GPU)."""
    with jax.default_matmul_precision("highest"):
        return paged_attention_xla(q, k_pages, v_pages, batch, scale=scale, window=window)


def assert_close(actual, expected, dtype, *, rows=None):
    actual = np.asarray(actual.astype(jnp.float32))
    expected = np.asarray(expected.astype(jnp.float32))
    if rows is not None:
        actual, expected = actual[rows], expected[rows]
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def lower_for_h100(fn, *args) -> str:
    """Lower `fn(*args)` for CUDA on an abstract H100, even on a CPU-only jaxlib: the Pallas call
    becomes Triton IR inside a `__gpu$xla.gpu.triton` custom call. Skips where that is impossible."""
    try:
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    except (AttributeError, TypeError) as e:
        pytest.skip(f"this jax cannot describe an abstract GPU: {e}")
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
