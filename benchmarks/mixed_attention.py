"""A mixed step's attention on one GPU, its decodes computed two ways side by side: in the ragged
kernel with the prompt chunks, or by the split-K decode kernel beside it (the Pallas backend's
DECODES_APART, jaxllm/layers/attention.py), with the largest difference between the two.

    PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 python benchmarks/mixed_attention.py [--kv-dtype fp8]
        [--steps 8192:2048:1892x192:49x128:0,8192:2048:342x2048:4x1960:0]

A step is T:B:DxC:PxL:S: T tokens and B sequence slots (the engine's bucket), D decodes of C
tokens of context, P prompt chunks of L tokens after S cached ones; the Llama-3.1-8B heads
(32 query, 8 KV, d 128), pages of 32 tokens, bf16 queries, one layer. The defaults are a 128/128
run's mixed step (~1,900 decodes beside ~50 new prompts) and a 2048/128 run's (~340 decodes of
~2,000 tokens beside 4 prompts).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from common import device_name, time_calls
from jaxllm.layers import attention
from jaxllm.layers.attention import FP8_KV, kv_storage_dtype, paged_attention_pallas, to_kv_dtype
from jaxllm.layers.batch import BatchMetadata

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 32


def parse_step(text: str) -> dict:
    t, b, d, p, s = text.split(":")
    (nd, ctx), (np_, lp) = (tuple(int(v) for v in part.split("x")) for part in (d, p))
    return dict(tokens=int(t), slots=int(b), decodes=nd, context=ctx, prompts=np_, prompt_len=lp, cached=int(s))


def make_step(rng, step: dict, kv_dtype):
    """(q, k_pages, v_pages, BatchMetadata) of one mixed step: decodes in the first slots, then the
    prompt chunks, padding tokens and slots after."""
    T, B = step["tokens"], step["slots"]
    q_lens = [1] * step["decodes"] + [step["prompt_len"]] * step["prompts"]
    lens = [step["context"]] * step["decodes"] + [step["cached"] + step["prompt_len"]] * step["prompts"]
    if sum(q_lens) > T or len(q_lens) > B:
        raise SystemExit(f"{step}: {sum(q_lens)} tokens in {len(q_lens)} sequences exceed T={T}, B={B}")
    pages_per_seq = -(-max(lens) // PAGE)
    num_pages = 1 + sum(-(-n // PAGE) for n in lens)
    ids = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    tables = np.zeros((B, pages_per_seq), np.int32)
    at = 0
    for b, n in enumerate(lens):
        k = -(-n // PAGE)
        tables[b, :k] = ids[at : at + k]
        at += k
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    shape = (KV_HEADS, num_pages, PAGE, HEAD_DIM)
    k_pages, v_pages = (to_kv_dtype(jax.random.normal(key, shape, jnp.bfloat16), kv_storage_dtype(kv_dtype))
                        for key in keys[:2])  # fmt: skip
    q = jax.random.normal(keys[2], (T, HEADS, HEAD_DIM), jnp.bfloat16)
    query_start = np.zeros(B + 1, np.int32)
    query_start[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    query_start[len(q_lens) + 1 :] = sum(q_lens)
    seq_lens = np.zeros(B, np.int32)
    seq_lens[: len(lens)] = lens
    batch = BatchMetadata(
        token_ids=jnp.zeros((T,), jnp.int32), positions=jnp.zeros((T,), jnp.int32),
        slot_mapping=jnp.zeros((T,), jnp.int32), token_seq=jnp.zeros((T,), jnp.int32),
        query_start=jnp.asarray(query_start), seq_lens=jnp.asarray(seq_lens), block_tables=jnp.asarray(tables),
        logits_indices=jnp.zeros((B,), jnp.int32), max_query_len=T,
    )  # fmt: skip
    return q, k_pages, v_pages, batch, sum(q_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="8192:2048:1892x192:49x128:0,8192:2048:342x2048:4x1960:0")
    parser.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), default="fp8")
    parser.add_argument("--interpret", action="store_true", help="the Pallas interpreter (a CPU check of the script)")
    args = parser.parse_args()
    kv_dtype = FP8_KV if args.kv_dtype == "fp8" else jnp.bfloat16
    print(f"device: {device_name()}, jax {jax.__version__}, KV {args.kv_dtype}, page {PAGE}, heads {HEADS}/{KV_HEADS}")
    rng = np.random.default_rng(0)
    for text in args.steps.split(","):
        step = parse_step(text)
        q, k_pages, v_pages, batch, real = make_step(rng, step, kv_dtype)
        outs, times = {}, {}
        engine_default = attention.DECODES_APART[0]
        for apart in (False, True):
            attention.DECODES_APART[0] = apart  # read when time_calls traces the call
            times[apart], first = time_calls(
                lambda q, k, v, b: paged_attention_pallas(q, k, v, b, scale=HEAD_DIM**-0.5, interpret=args.interpret),
                [(q, k_pages, v_pages, batch)], repeats=5,
            )  # fmt: skip
            outs[apart] = np.asarray(first[:real], np.float32)
        attention.DECODES_APART[0] = engine_default
        diff = float(np.max(np.abs(outs[True] - outs[False])))
        print(f"{text}: decodes in the ragged kernel {times[False] * 1e6:8.1f} us   apart (decode kernel) "
              f"{times[True] * 1e6:8.1f} us   max |difference| {diff:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
