"""The 'xla' attention path's query tiles on this machine: `paged_attention_xla` over one layer's
poisoned paged cache (SmolLM2's heads: 3 KV heads of 3 query heads, head_dim 64, pages of 32, float32)
at every tile size R, beside the size `query_tile_rows` picks, for prompts, mixed steps and
speculative-decoding-like steps.

  PYTHONPATH=$PWD python benchmarks/xla_attention_tiles.py

Each cell: ms a call, the mean of 5 calls after the first (which compiles).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.layers import attention
from tests.paged_kv import make_batch, make_cache

KV_HEADS, GROUP, HEAD_DIM, PAGE = 3, 3, 64, 32
ROWS = (1, 4, 8, 16, 32, 64, 128)
# (label, sequence lengths, query tokens of each, tokens T, slots B, block-table pages P)
CASES = [
    ("one prompt of 2,048", [2048], [2048], 2048, 1, 64),
    ("one prompt of 2,000 in the CPU engine's bucket", [2000], [2000], 2048, 256, 64),
    ("4 prompts of 512", [512] * 4, [512] * 4, 2048, 4, 16),
    ("16 prompts of 128", [128] * 16, [128] * 16, 2048, 16, 4),
    ("a 512-token chunk after 988", [1500], [512], 512, 1, 64),
    ("a prompt of 1,000 and 64 decodes at 500", [1000] + [500] * 64, [1000] + [1] * 64, 1064, 65, 32),
    ("8 prompts of 100 and 24 decodes at 300", [100] * 8 + [300] * 24, [100] * 8 + [1] * 24, 824, 32, 16),
    ("32 sequences of 5 tokens at 400", [400] * 32, [5] * 32, 160, 32, 16),
]


def time_call(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(5):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / 5 * 1e3


def main():
    picks = attention.query_tile_rows
    print(f"paged_attention_xla, one layer, {jax.devices()[0].device_kind}; ms a call at tile size R")
    print("| step | picked R | " + " | ".join(f"R={r}" for r in ROWS) + " |")
    print("|---|---|" + "---|" * len(ROWS))
    for label, lens, query_lens, T, B, P in CASES:
        rng = np.random.default_rng(0)
        k_pages, v_pages, tables = make_cache(rng, lens + [0] * (B - len(lens)), num_kv_heads=KV_HEADS,
                                              page_size=PAGE, head_dim=HEAD_DIM, pages_per_seq=P,
                                              dtype=jnp.float32)  # fmt: skip
        starts = [n - q for n, q in zip(lens, query_lens)]
        batch = make_batch(starts, query_lens, tables, page_size=PAGE, num_tokens=T, max_query_len=T)
        q = jnp.asarray(rng.normal(size=(T, KV_HEADS * GROUP, HEAD_DIM)), jnp.float32)
        cells = []
        for rows in ROWS:
            attention.query_tile_rows = lambda *args, rows=rows: rows
            fn = jax.jit(lambda q, k, v, b: attention.paged_attention_xla(q, k, v, b, scale=HEAD_DIM**-0.5))
            cells.append(f"{time_call(fn, q, k_pages, v_pages, batch):.1f}" if rows <= T else "")
        attention.query_tile_rows = picks
        print(f"| {label} (T {T}, B {B}) | {picks(T, B, T, GROUP)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
